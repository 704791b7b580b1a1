"""`cli.py import`: ONNX files exported elsewhere (timm's own onnx_export, a plain
torch.onnx.export with a fixed batch) of small timm and torchvision models with seeded random
weights, imported into model folders and proven against the original files on real photos;
then every stage (embed, probe, serve, bulk, evaluate, export --format triton) on one of them;
and every refusal in one line, with nothing written."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from tests.conftest import ROOT

pytest.importorskip("timm")
pytestmark = pytest.mark.slow

IMAGENET = ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]
MIN_COSINE = 0.99999


# ---------------------------------------------------------------------------------------------
# Foreign ONNX files: made with other exporter paths than ours, as a user brings them

def _timm_model(name: str, **kwargs):
    import timm
    import torch
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()


def _timm_export(name: str, path: str, dynamic_size: bool = False,
                 keep_initializers: bool = False) -> str:
    """timm's own exporter (timm.utils.onnx: TorchScript path, names input0/output0)."""
    from timm.utils.onnx import onnx_export
    model = _timm_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_export(model, path, input_size=model.pretrained_cfg["input_size"], batch_size=2,
                    opset=17, dynamic_size=dynamic_size, keep_initializers=keep_initializers)
    return path


class _ViewFlatten:
    """A user's own small CNN whose flatten is `x.view(x.shape[0], -1)`: exported with one
    example image, the Reshape target [1, -1] is a constant that bakes the batch in."""

    @staticmethod
    def build():
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
                self.fc = torch.nn.Linear(8 * 15 * 15, 32)

            def forward(self, x):
                y = torch.relu(self.conv(x))
                return self.fc(y.view(y.shape[0], -1))

        torch.manual_seed(0)
        return Net().eval()


def _plain_export(model, path: str, size: int, **kwargs) -> str:
    """torch.onnx.export as a user calls it: one example image, so a fixed batch of 1."""
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), path, dynamo=False,
                          opset_version=17, **kwargs)
    return path


def make_foreign(key: str, path: str) -> str:
    """The foreign ONNX file `key` at `path` (see the keys below)."""
    if key.startswith("timm-keepinit-"):  # weights also listed as graph inputs
        return _timm_export(key[len("timm-keepinit-"):], path, keep_initializers=True)
    if key.startswith("timm-dynsize-"):
        return _timm_export(key[len("timm-dynsize-"):], path, dynamic_size=True)
    if key.startswith("timm-"):
        return _timm_export(key[len("timm-"):], path)
    if key == "view-b1":
        return _plain_export(_ViewFlatten.build(), path, 64)
    if key == "torchvision-mobilenet-b1":
        import torch
        import torchvision
        torch.manual_seed(0)
        model = torchvision.models.mobilenet_v3_small(weights=None)
        model.classifier = torch.nn.Identity()  # the pooled 576-d features
        return _plain_export(model.eval(), path, 128)
    if key == "vit-b1":
        return _plain_export(_timm_model("test_vit"), path, 160)
    return _plain_export(_two_outputs(key), path, 160,  # "named" or "ambiguous"
                         output_names=["logits", "features"] if key == "named" else ["a", "b"],
                         input_names=["pixel_values"])


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """{key: path} of foreign ONNX files, made on first request."""
    base = tmp_path_factory.mktemp("foreign")
    made: dict[str, str] = {}

    def get(key: str) -> str:
        if key not in made:
            made[key] = make_foreign(key, str(base / f"{key}.onnx"))
        return made[key]

    return get


def _two_outputs(key: str):
    import torch
    trunk = _timm_model("test_resnet")

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk, self.head = trunk, torch.nn.Linear(96, 5)

        def forward(self, x):
            f = self.trunk(x)
            return self.head(f), f.reshape(-1, 96, 1, 1)  # the features as [N, D, 1, 1]

    return Two().eval()


@pytest.fixture(scope="module")
def photos():
    """Real JPEG photos in class folders (crops of the photos matplotlib and scikit-learn ship)."""
    from benchmarks.corpus import ensure_corpus
    return ensure_corpus(count=48)


@pytest.fixture(scope="module")
def photo_files(photos):
    """Real photos of several sizes: the corpus crops and the full-size source photos."""
    from benchmarks.corpus import source_photos
    files = [os.path.join(root, f) for root, _, names in sorted(os.walk(photos))
             for f in sorted(names) if f.endswith(".jpg")][::4]
    return files + sorted(source_photos().values())


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def do_import(src: str, out: str, *args) -> dict:
    code, output = run_cli("import", src, "--out", out, "--parity-images", 8, *args)
    assert code == 0, output
    with open(os.path.join(out, "export.json")) as f:
        return json.load(f)


def reference_embeddings(src: str, files: list[str], pre) -> np.ndarray:
    """The original file in onnxruntime, one image at a time, on our own NumPy preprocessing
    of the photos (common.images.preprocess: the reference transform)."""
    import onnxruntime as ort

    from common.images import preprocess
    session = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rows = [session.run(None, {name: preprocess(f, pre)[None]})[0] for f in files]
    return np.concatenate([np.asarray(r, np.float32).reshape(1, -1) for r in rows])


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


# ---------------------------------------------------------------------------------------------
# Parity on real photos, several families and exporters

@pytest.mark.parametrize("key, args", [
    ("timm-test_resnet", ["--like", "timm:test_resnet"]),
    ("timm-test_vit", ["--like", "timm:test_vit"]),
    ("timm-test_convnext", ["--like", "timm:test_convnext"]),
    ("timm-test_efficientnet", ["--like", "timm:test_efficientnet"]),
    ("timm-dynsize-test_convnext", ["--like", "timm:test_convnext"]),
    ("timm-keepinit-test_resnet", ["--like", "timm:test_resnet"]),
    ("view-b1", ["--resize-size", "72", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]),
    ("torchvision-mobilenet-b1", ["--input-size", "128", "--resize-size", "146",
                                  "--interpolation", "bilinear", *IMAGENET]),
])
def test_imported_models_match_the_original_on_real_photos(foreign, photos, photo_files,
                                                           tmp_path, key, args):
    from runtime import FeaturePipeline
    src = foreign(key)
    out = str(tmp_path / "model")
    report = do_import(src, out, "--check-data", photos, *args)
    assert report["exporter"] == "import" and report["parity"]["onnxruntime"]["ok"]
    assert report["parity"]["onnxruntime"]["batch_sizes"] == [1, 7]
    io = report["io"]
    assert list(io["inputs"]) == ["image"] and list(io["outputs"]) == ["embedding"]
    assert io["inputs"]["image"]["shape"][0] == "batch"
    with FeaturePipeline(out, device="cpu", fast_decode=False, batch_size=5) as pipe:
        assert pipe.normalize_in_model_  # the runtime put its uint8 front on it
        got = pipe.embed(photo_files)
        assert got.ok.all()
        expected = reference_embeddings(src, photo_files, pipe.preprocessing_)
    assert got.vectors.shape == expected.shape
    assert min_cosine(got.vectors, expected) >= MIN_COSINE
    rewrite = report["imported_from"]["rewrite"]
    if key.endswith("-b1"):  # the fixed batch of 1 was opened and proven at batch 7
        assert rewrite["batch_was"] == 1
        assert rewrite["opened_reshapes"] == (1 if key == "view-b1" else 0)
    if "dynsize" in key:  # height and width were open: fixed to the crop size
        assert io["inputs"]["image"]["shape"] == ["batch", 3, 160, 160]


def test_preprocessing_from_timm_and_from_our_registry(foreign, photos, tmp_path):
    from common.model_dir import ModelDir
    report = do_import(foreign("timm-test_vit"), str(tmp_path / "vit"), "--check-data", photos,
                       "--like", "timm:test_vit", "--resize-size", "170")
    pre = ModelDir(str(tmp_path / "vit")).description.preprocessing
    # timm's test_vit: 160 px, crop_pct 0.95 (-> 168), bicubic, mean/std 0.5; the option wins
    assert (pre.input_size, pre.resize_size, pre.interpolation) == (160, 170, "bicubic")
    assert pre.mean == [0.5, 0.5, 0.5] and pre.std == [0.5, 0.5, 0.5]
    assert report["imported_from"]["preprocessing_from"]["resize_size"] == "option"
    assert report["imported_from"]["preprocessing_from"]["mean"].startswith("timm data config")
    do_import(foreign("torchvision-mobilenet-b1"), str(tmp_path / "mb"), "--check-data", photos,
              "--like", "mobilenet_v3_small", "--input-size", "128")
    pre = ModelDir(str(tmp_path / "mb")).description.preprocessing
    assert (pre.input_size, pre.resize_size) == (128, 256)
    assert pre.mean == [0.485, 0.456, 0.406]


def test_the_resize_rounding_is_borrowed_or_given(foreign, photos, tmp_path):
    from common.description import Preprocessing
    from common.model_dir import ModelDir
    src = foreign("timm-test_resnet")
    if "resize_rounding" not in Preprocessing.__dataclass_fields__:
        assert "always rounds" in _refusal(tmp_path, src, "--resize-rounding", "truncate")
        return
    do_import(src, str(tmp_path / "t"), "--check-data", photos, "--like", "timm:test_resnet")
    pre = ModelDir(str(tmp_path / "t")).description.preprocessing
    assert pre.resize_rounding == "truncate"  # torchvision's Resize, as timm's transform
    do_import(src, str(tmp_path / "r"), "--check-data", photos, "--like", "timm:test_resnet",
              "--resize-rounding", "round")
    assert ModelDir(str(tmp_path / "r")).description.preprocessing.resize_rounding == "round"


def _tensor_outputs(src: str, op_types: tuple[str, ...]) -> list[str]:
    import onnx
    return [n.output[0] for n in onnx.load(src).graph.node if n.op_type in op_types]


@pytest.mark.parametrize("key, pick", [
    ("timm-test_resnet", lambda names: [names[3], names[8]]),       # two ReLU maps [N, C, H, W]
    ("timm-test_vit", lambda names: [names[len(names) // 2]]),      # a block's tokens [N, T, D]
])
def test_taps_pool_normalise_and_concatenate_tensors_of_the_graph(foreign, photos, photo_files,
                                                                   tmp_path, key, pick):
    import onnx
    import onnxruntime as ort

    from common.images import preprocess
    from common.model_dir import ModelDir
    from runtime import FeaturePipeline
    src = foreign(key)
    taps = pick(_tensor_outputs(src, ("Relu", "Add"))) + ["final"]
    out = str(tmp_path / "tapped")
    report = do_import(src, out, "--check-data", photos, "--like", f"timm:{key[5:]}",
                       "--taps", ",".join(taps))
    desc = ModelDir(out).description
    assert [t["tap"] for t in desc.extra["taps"]] == taps
    assert report["feature_dim"] == desc.feature_dim == sum(t["dim"] for t in desc.extra["taps"])

    # independently: the original with the taps as outputs, pooled and normalised in NumPy
    model = onnx.load(src)
    for name in taps[:-1]:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with FeaturePipeline(out, device="cpu", fast_decode=False) as pipe:
        got = pipe.embed(photo_files).vectors
        x = np.stack([preprocess(f, pipe.preprocessing_) for f in photo_files])
    names = taps[:-1] + [session.get_outputs()[0].name]
    parts = []
    for y in session.run(names, {session.get_inputs()[0].name: x}):
        v = y.mean(axis=(2, 3)) if y.ndim == 4 else y.mean(axis=1) if y.ndim == 3 else y
        parts.append(v / np.abs(v).max(axis=1, keepdims=True))
    assert min_cosine(got, np.concatenate(parts, axis=1)) >= MIN_COSINE


def test_tap_names_are_checked(foreign, tmp_path):
    src = foreign("timm-test_resnet")
    assert "names no tensor of the graph: nope" in _refusal(tmp_path, src, "--taps", "nope,final")
    assert "named twice" in _refusal(tmp_path, src, "--taps", "final,final")


def test_the_output_named_like_an_embedding_is_chosen_and_flattened(foreign, photos, tmp_path):
    from runtime import FeaturePipeline
    src = foreign("named")  # outputs logits [1, 5] and features [1, 96, 1, 1]
    report = do_import(src, str(tmp_path / "m"), "--check-data", photos, "--like",
                       "timm:test_resnet")
    assert report["imported_from"]["embedding_output"] == "features"
    assert report["imported_from"]["rewrite"]["output_change"].startswith("flatten")
    assert report["feature_dim"] == 96 and report["graph"]["ops"].get("Gemm") is None
    logits = do_import(src, str(tmp_path / "l"), "--check-data", photos, "--like",
                       "timm:test_resnet", "--output", "logits")
    assert logits["feature_dim"] == 5
    with FeaturePipeline(str(tmp_path / "l"), device="cpu") as pipe:
        assert pipe.feature_dim_ == 5


# ---------------------------------------------------------------------------------------------
# Every stage on an imported folder

@pytest.fixture(scope="module")
def imported(foreign, photos, tmp_path_factory):
    """timm's export of a random test_resnet, imported with fp16 and int8 variants."""
    out = str(tmp_path_factory.mktemp("imported") / "resnet")
    do_import(foreign("timm-test_resnet"), out, "--check-data", photos, "--like",
              "timm:test_resnet", "--fp16", "--int8", "--calib", photos)
    return out


def test_variants_and_inspect(imported, photo_files):
    from runtime import FeaturePipeline
    assert {"model.fp16.onnx", "model.int8.onnx"} <= set(os.listdir(imported))
    with FeaturePipeline(imported, device="cpu") as pipe:
        fp32 = pipe.embed(photo_files[:6]).vectors
    for variant, floor in (("fp16", 0.999), ("int8", 0.9)):
        with FeaturePipeline(imported, device="cpu", variant=variant) as pipe:
            assert min_cosine(pipe.embed(photo_files[:6]).vectors, fp32) >= floor
    code, text = run_cli("inspect", imported)
    assert code == 0 and "onnx:timm-test_resnet" in text and "input  image" in text


def test_fp16_of_an_imported_vit(foreign, photos, photo_files, tmp_path):
    """timm's ViT export casts its attention scale to float32: the fp16 variant keeps those
    Casts in float32 (the converter would otherwise retype their outputs)."""
    from runtime import FeaturePipeline
    out = str(tmp_path / "vit")
    report = do_import(foreign("timm-test_vit"), out, "--check-data", photos, "--like",
                       "timm:test_vit", "--fp16")
    assert any("Cast" in n for n in report["variants"]["fp16"]["kept_float32_nodes"])
    with FeaturePipeline(out, device="cpu") as fp32, \
            FeaturePipeline(out, device="cpu", variant="fp16") as fp16:
        assert min_cosine(fp16.embed(photo_files).vectors,
                          fp32.embed(photo_files).vectors) >= 0.999


def test_embed_probe_evaluate_and_bulk(imported, photos, photo_files, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from runtime import FeaturePipeline
    with FeaturePipeline(imported, device="cpu") as pipe:
        library = pipe.embed(photo_files)
    code, text = run_cli("embed", imported, *photo_files, "--out", tmp_path / "f.npy",
                         "--device", "cpu")
    assert code == 0, text
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), library.vectors, rtol=1e-5,
                               atol=1e-6)

    code, text = run_cli("embed", imported, photos, "--out", tmp_path / "bulk", "--device",
                         "cpu", "--shard-size", 20)
    assert code == 0, text
    shards = sorted(str(p) for p in (tmp_path / "bulk").glob("shard-*.parquet"))
    assert len(shards) == 3  # 48 rows, 20 a shard
    table = pa.concat_tables(
        [pq.read_table(p) for p in shards])
    assert table.num_rows == 48 and set(table.column_names) >= {"id", "embedding", "error"}
    rows = {i: np.asarray(e, np.float32) for i, e in
            zip(table.column("id").to_pylist(), table.column("embedding").to_pylist())}
    first = photo_files[0]
    row = next(v for k, v in rows.items() if first.endswith(k))
    np.testing.assert_allclose(row, library.vectors[0], rtol=1e-5, atol=1e-6)

    code, text = run_cli("probe", "fit", imported, "--data", photos, "--out", tmp_path / "p",
                         "--kind", "ncm")
    assert code == 0, text
    code, text = run_cli("probe", "predict", imported, tmp_path / "p", *photo_files[:-3],
                         "--out", tmp_path / "preds.jsonl")
    assert code == 0, text
    with open(tmp_path / "preds.jsonl") as f:
        preds = [json.loads(line) for line in f]
    assert len(preds) == len(photo_files) - 3
    # each corpus photo is a crop of one source photo: the folder name is its class
    right = [p["label"] == os.path.basename(os.path.dirname(p["id"])) for p in preds]
    assert np.mean(right) > 0.5

    code, text = run_cli("probe", "fuse", imported, tmp_path / "p", "--out",
                         tmp_path / "fused.onnx")
    assert code == 0, text
    import onnxruntime as ort
    fused = ort.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"])
    with FeaturePipeline(imported, device="cpu", fast_decode=False) as pipe:
        arrays, _ = pipe.preprocess(photo_files[:4])
        plain = pipe.embed_arrays(arrays)
    got = fused.run(["embedding"], {fused.get_inputs()[0].name: arrays})[0]
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-6)

    code, text = run_cli("evaluate", imported, "-t", photos, "--out", tmp_path / "rep",
                         "--no-cache", "--device", "cpu")
    assert code == 0, text
    with open(tmp_path / "rep" / "report.json") as f:
        report = json.load(f)
    assert report["models"]["resnet"]["embedding_dim"] == 96


def test_serve_with_a_real_client(imported, photo_files):
    import tritonclient.http as httpclient

    from runtime import FeaturePipeline
    from tests.test_serve import running_server
    data = [open(p, "rb").read() for p in photo_files[:5]]
    with FeaturePipeline(imported, device="cpu") as pipe:
        expected = pipe.embed(data).vectors
    with running_server(imported, "--name", "imported", timeout=180) as (port, _):
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        try:
            meta = client.get_model_metadata("imported")
            assert {o["name"] for o in meta["outputs"]} >= {"embedding"}
            inp = httpclient.InferInput("image", [len(data)], "BYTES")
            inp.set_data_from_numpy(np.array(data, dtype=object), binary_data=True)
            result = client.infer("imported", [inp], outputs=[
                httpclient.InferRequestedOutput("embedding", binary_data=True)])
            np.testing.assert_allclose(result.as_numpy("embedding"), expected, rtol=1e-5,
                                       atol=1e-6)
        finally:
            client.close()


def test_export_triton_from_the_imported_folder(imported, photo_files, tmp_path):
    import onnxruntime as ort

    from runtime import FeaturePipeline
    from runtime.decode import load_crop
    repo = str(tmp_path / "repo")
    code, text = run_cli("export", imported, "--format", "triton", "--out", repo)
    assert code == 0, text
    assert sorted(os.listdir(repo)) == ["resnet", "resnet_decode", "resnet_images"]
    session = ort.InferenceSession(os.path.join(repo, "resnet", "1", "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    with FeaturePipeline(imported, device="cpu", fast_decode=False) as pipe:
        expected = pipe.embed(photo_files[:4]).vectors
        crops = np.stack([load_crop(p, pipe.preprocessing_, fast=False) for p in photo_files[:4]])
    got = session.run(["embedding"], {session.get_inputs()[0].name: crops})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Refusals: one line, a non-zero exit, nothing written

def _tiny(path: str, inputs, outputs=None, *, external: str | None = None) -> str:
    """A small ONNX graph: a 1x1 Conv (3 -> 4 channels) + global pooling, on the given input
    value infos (or a Cast for inputs that are not images)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    weight = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    first = inputs[0].name
    if inputs[0].type.tensor_type.elem_type == TensorProto.FLOAT and \
            len(inputs[0].type.tensor_type.shape.dim) == 4:
        nodes = [helper.make_node("Conv", [first, "w"], ["c"]),
                 helper.make_node("GlobalAveragePool", ["c"], ["p"]),
                 helper.make_node("Flatten", ["p"], ["out"])]
    else:
        nodes = [helper.make_node("Cast", [first], ["out"], to=TensorProto.FLOAT)]
    outputs = outputs or [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if external:
        onnx.save(model, path, save_as_external_data=True, location=os.path.basename(external),
                  size_threshold=0)
    else:
        onnx.save(model, path)
    return path


def _input(name, elem, dims):
    from onnx import helper
    return helper.make_tensor_value_info(name, elem, dims)


def _refusal(tmp_path, src: str, *args) -> str:
    out = tmp_path / "out"
    before = sorted(os.listdir(tmp_path))
    result = CliRunner().invoke(cli.main, ["import", src, "--out", str(out), *IMAGENET,
                                           "--resize-size", "40", *map(str, args)])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert not out.exists() and sorted(os.listdir(tmp_path)) == before  # nothing half-written
    return errors[0]


def test_refusals_name_the_problem(tmp_path, foreign, photos):
    from onnx import TensorProto as T
    bad = tmp_path / "photo.onnx"
    bad.write_bytes(open(os.path.join(photos, "china", os.listdir(
        os.path.join(photos, "china"))[0]), "rb").read())
    assert "not an ONNX" in _refusal(tmp_path, str(bad))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert "not an ONNX" in _refusal(tmp_path, str(empty))
    assert "no such file" in _refusal(tmp_path, str(tmp_path / "missing.onnx"))

    cases = [
        ([_input("ids", T.INT64, ["batch", 77])], "no image input"),
        ([_input("x", T.FLOAT, ["batch", 3, 32])], "rank 3"),
        ([_input("x", T.FLOAT, ["batch", 32, 32, 3])], "channels-last"),
        ([_input("x", T.FLOAT, ["batch", 1, 32, 32])], "1 channel(s)"),
        ([_input("x", T.FLOAT, ["batch", 3, 32, 48])], "not square"),
        ([_input("x", T.FLOAT, ["batch", 3, 32, 32]), _input("y", T.FLOAT, [1])], "2 inputs"),
    ]
    for k, (inputs, words) in enumerate(cases):
        src = _tiny(str(tmp_path / f"case{k}.onnx"), inputs)
        assert words in _refusal(tmp_path, src), words
    square = _tiny(str(tmp_path / "square.onnx"), [_input("x", T.FLOAT, ["batch", 3, 32, 32])])
    assert "takes 32x32" in _refusal(tmp_path, square, "--input-size", "64")
    code, text = run_cli("import", square, "--out", tmp_path, "--overwrite", *IMAGENET,
                         "--resize-size", 36)
    assert code == 1 and "holds the file being imported" in text and os.path.exists(square)
    code, text = run_cli("import", square, "--out", tmp_path / "m", "--input-size", "32")
    assert code == 1 and "give --resize-size, --mean, --std" in text

    assert "cannot be made dynamic" in _refusal(tmp_path, foreign("vit-b1"), "--check-data",
                                                 photos)
    # the same ViT with its batch declared dynamic: the claim is checked, not believed
    import onnx
    liar = onnx.load(foreign("vit-b1"))
    liar.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(liar, str(tmp_path / "liar.onnx"))
    assert "declares a dynamic batch, but the graph fails at batch 7" in _refusal(
        tmp_path, str(tmp_path / "liar.onnx"), "--check-data", photos)
    ambiguous = _refusal(tmp_path, foreign("ambiguous"), "--check-data", photos)
    assert "choose one with --output" in ambiguous and "a [1, 5]" in ambiguous
    assert "no output 'x'" in _refusal(tmp_path, foreign("ambiguous"), "--output", "x")
    assert "timm has no architecture" in _refusal(tmp_path, square, "--like", "timm:nope")
    assert "unknown architecture" in _refusal(tmp_path, square, "--like", "nope")


def test_every_dimension_open_as_optimum_writes_it(tmp_path, photos):
    """Hugging Face optimum names the input pixel_values [batch_size, num_channels, height,
    width], all symbolic: the import fixes channels and size, keeps the batch open."""
    from onnx import TensorProto as T

    from runtime import FeaturePipeline
    src = _tiny(str(tmp_path / "hf.onnx"), [_input("pixel_values", T.FLOAT, [
        "batch_size", "num_channels", "height", "width"])])
    report = do_import(src, str(tmp_path / "m"), "--input-size", 32, "--resize-size", 36,
                       *IMAGENET, "--check-data", photos)
    assert report["io"]["inputs"]["image"]["shape"] == ["batch", 3, 32, 32]
    with FeaturePipeline(str(tmp_path / "m"), device="cpu") as pipe:
        assert pipe.embed(sorted(glob.glob(os.path.join(photos, "*", "*.jpg")))[:9]).ok.all()


def test_external_data_must_stay_beside_the_file(tmp_path, photos):
    import onnx
    from onnx import TensorProto as T
    folder = tmp_path / "ext"
    folder.mkdir()
    src = _tiny(str(folder / "model.onnx"), [_input("x", T.FLOAT, ["batch", 3, 32, 32])],
                external=str(folder / "weights.bin"))
    # beside the file: imported, and the weights travel inside the new model.onnx
    code, text = run_cli("import", src, "--out", tmp_path / "ok", *IMAGENET, "--resize-size",
                         36, "--check-data", photos, "--parity-images", 4)
    assert code == 0, text
    assert sorted(os.listdir(tmp_path / "ok")) == ["description.json", "export.json",
                                                   "model.onnx"]
    # pointing outside its folder: refused before anything is read
    os.replace(folder / "weights.bin", tmp_path / "weights.bin")
    model = onnx.load(src, load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../weights.bin"
    onnx.save(model, src)
    assert "points outside" in _refusal(tmp_path / "ext", src)


def test_the_command_line_exits_non_zero_with_one_line(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("these are not the weights you are looking for\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), "import", str(bad),
                           "--out", str(tmp_path / "m"), "--input-size", "32",
                           "--resize-size", "36", *IMAGENET], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "not an ONNX" in proc.stderr, proc.stderr
    assert not (tmp_path / "m").exists()


def test_the_import_benchmark_runs_every_row(photos):
    from benchmarks.bench_import import run
    report = run("test_resnet", photos, batch_size=8, repeats=1, limit=16)
    assert set(report["speed"]) == {"imported_model_only", "original_model_only",
                                    "torch_model_only", "ours_end_to_end",
                                    "original_recipe_end_to_end"}
    assert all(f["images"] == 16 and f["images_per_s"] > 0 for f in report["speed"].values())
    assert report["import_parity"]["min_cosine"] >= MIN_COSINE
    assert report["input_size"] == 160 and report["feature_dim"] == 96
