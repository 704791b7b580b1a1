"""ONNX export: parity with PyTorch on real images, combinations, fp16/int8 variants, metadata,
fresh sessions at batch 1 and 7, Caffe2 via export, clear errors and atomic output folders."""
import glob
import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import cli
from common.data import load_dataset
from common.description import ONNX_METADATA_KEY, ModelDescription
from common.images import preprocess
from export import parity
from export.onnx_export import ExportError, export_runs, fold_batchnorm
from train.models import load_run
from train.runs import untrained_run

pytestmark = pytest.mark.slow  # exports real models and proves parity

try:
    import export.caffe2
    import export.caffe2_exec  # noqa: F401
    HAVE_CAFFE2 = True
except ImportError:
    HAVE_CAFFE2 = False


def _make_run(run_dir, data, arch="small_cnn", seed=0, input_size=None):
    dataset = load_dataset(data)
    desc = untrained_run(arch, str(run_dir), heads=[(lv.name, lv.classes) for lv in dataset.levels],
                         levels=dataset.levels, input_size=input_size, seed=seed)
    desc.data = {"spec": data}
    desc.save(os.path.join(str(run_dir), "description.json"))
    return str(run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist_small):
    root = tmp_path_factory.mktemp("runs")
    return {"a": _make_run(root / "a", fmnist_small, seed=0),
            "b": _make_run(root / "b", fmnist_small, seed=1),
            "wide": _make_run(root / "wide", fmnist_small, seed=2, input_size=48)}


@pytest.fixture(scope="module")
def test_images(fmnist_small):
    """Nine real test-split images (parity uses the train split): unseen by the export checks."""
    paths = sorted(glob.glob(os.path.join(fmnist_small, "test", "**", "*.png"), recursive=True))
    return paths[:: max(1, len(paths) // 9)][:9]


@pytest.fixture(scope="module")
def single(runs, fmnist_small, tmp_path_factory):
    """One export with logits, fp16, int8 (and Caffe2 when available), shared by several tests."""
    out = str(tmp_path_factory.mktemp("models") / "single")
    formats = ("onnx", "caffe2") if HAVE_CAFFE2 else ("onnx",)
    report = export_runs([runs["a"]], out, formats=formats, logits=True, fp16=True,
                         int8_calib=fmnist_small, variant_images=120, calib_images=64)
    return out, report


def _fresh(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def _batch(paths, pre):
    return np.stack([preprocess(p, pre) for p in paths]).astype(np.float32)


def _cos(a, b):
    return parity.cosine_rows(a, b)


def test_single_export_files_metadata_and_parity(single, runs):
    out, report = single
    for name in ("model.onnx", "description.json", "export.json", "model.fp16.onnx",
                 "model.int8.onnx"):
        assert os.path.isfile(os.path.join(out, name)), name
    model = onnx.load(os.path.join(out, "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
    assert model.opset_import[0].version >= 17
    assert {o.domain for o in model.opset_import} == {""}  # plain ONNX, portable

    meta = {p.key: p.value for p in model.metadata_props}
    embedded = json.loads(meta[ONNX_METADATA_KEY])
    with open(os.path.join(out, "description.json")) as f:
        assert json.load(f) == embedded
    desc = ModelDescription.from_dict(embedded)  # the round trip the runtime relies on
    assert desc.combination == "single" and desc.feature_dim == 256
    assert desc.source_runs == [os.path.abspath(runs["a"])]
    assert [lv.name for lv in desc.levels] == ["generic", "specific"]
    assert len(desc.levels[-1].classes) == 10
    assert desc.versions["export"]["opset"] == 18
    assert {"torch", "onnx", "onnxruntime"} <= set(desc.versions["export"])
    assert [h["output"] for h in desc.heads] == ["logits_generic", "logits_specific"]

    with open(os.path.join(out, "export.json")) as f:
        assert json.load(f) == report
    assert report["exporter"] in ("dynamo", "torchscript")
    assert report["io"]["inputs"]["image"]["shape"] == ["batch", 3, 32, 32]
    assert report["io"]["outputs"]["embedding"]["shape"] == ["batch", 256]
    onnx_parity = report["parity"]["onnxruntime"]
    assert onnx_parity["batch_sizes"] == [1, 7] and onnx_parity["ok"]
    assert report["parity"]["images"] == 16
    for name in ("embedding", "logits_generic", "logits_specific"):
        fig = onnx_parity["outputs"][name]
        assert fig["max_abs_diff"] <= 1e-3 * fig["scale"] + 1e-5
        assert fig["min_cosine"] >= 0.9999
    size = os.path.getsize(os.path.join(out, "model.onnx"))
    assert report["files"]["model.onnx"]["bytes"] == size


def test_single_matches_torch_in_fresh_sessions(single, runs, test_images):
    out, _ = single
    network, desc = load_run(runs["a"])
    x = _batch(test_images[:7], desc.preprocessing)
    with torch.no_grad():
        feats = network.forward_features(torch.from_numpy(x))
        logits = [h(feats).numpy() for h in network.heads]
    feats = feats.numpy()
    for bs in (1, 7):
        session = _fresh(os.path.join(out, "model.onnx"))
        outs = [session.run(None, {"image": x[i:i + bs]}) for i in range(0, len(x), bs)]
        emb = np.concatenate([o[0] for o in outs])
        assert emb.shape == (7, 256)
        assert np.abs(emb - feats).max() <= 1e-4 * np.abs(feats).max()
        for k, ref in enumerate(logits):
            got = np.concatenate([o[k + 1] for o in outs])
            np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))


def test_fp16_and_int8_variants(single, test_images):
    out, report = single
    fp32, fp16, int8 = (os.path.join(out, n) for n in ("model.onnx", "model.fp16.onnx",
                                                       "model.int8.onnx"))
    # fp16: half-precision weights, float32 at the edges
    m16 = onnx.load(fp16)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m16.graph.initializer)
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in m16.graph.output)
    # int8: QDQ with int8 weights
    m8 = onnx.load(int8)
    ops = {n.op_type for n in m8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in m8.graph.initializer)
    for m in (m16, m8):  # each variant carries the description too
        meta = {p.key: p.value for p in m.metadata_props}
        assert json.loads(meta[ONNX_METADATA_KEY])["feature_dim"] == 256

    sizes = {k: os.path.getsize(p) for k, p in (("fp32", fp32), ("fp16", fp16), ("int8", int8))}
    assert sizes["fp16"] < 0.6 * sizes["fp32"] and sizes["int8"] < 0.4 * sizes["fp32"]

    x = _batch(test_images, ModelDescription.load(out).preprocessing)
    ref = _fresh(fp32).run(["embedding"], {"image": x})[0]
    for path, min_cos in ((fp16, 0.999), (int8, 0.98)):
        for bs in (1, 7):  # fresh session, batch 1 and 7
            session = _fresh(path)
            got = np.concatenate([session.run(["embedding"], {"image": x[i:i + bs]})[0]
                                  for i in range(0, len(x), bs)])
            assert got.dtype == np.float32 and got.shape == ref.shape
            assert _cos(ref, got).min() >= min_cos

    for variant in ("fp16", "int8"):
        v = report["variants"][variant]
        emb = v["drift_vs_fp32"]["outputs"]["embedding"]
        assert v["drift_vs_fp32"]["batch_sizes"] == [1, 7]
        assert 0.98 <= emb["min_cosine"] <= emb["mean_cosine"] <= 1.0 + 1e-9
        probe = v["probe"]
        assert probe["classes"] == 10 and probe["train"] + probe["test"] <= 120
        assert probe["accuracy_fp32"] > 0.3  # random conv features beat chance (0.1) easily
        assert abs(probe["change"] - (probe["accuracy"] - probe["accuracy_fp32"])) < 1e-12
        assert abs(probe["change"]) <= 0.1
    assert report["variants"]["int8"]["calibration_images"] == 64


def test_variants_keep_combination_normalisation_in_float32(runs, tmp_path, fmnist_small):
    from export.variants import make_fp16, make_int8, tail_nodes
    report = export_runs([runs["a"], runs["b"]], str(tmp_path / "combo"), parity_images=8)
    path = str(tmp_path / "combo" / "model.onnx")
    assert report["combination"] == "concat-linf"
    make_fp16(path, str(tmp_path / "f16.onnx"), {})
    descs = [load_run(runs[k])[1] for k in "ab"]
    images, _ = parity.load_check_images(descs, None, 32)
    make_int8(path, str(tmp_path / "i8.onnx"), {}, images)
    int8 = onnx.load(str(tmp_path / "i8.onnx"))
    producers = {o: n for n in int8.graph.node for o in n.output}
    for node in int8.graph.node:  # the L-inf normalisation reads float values, not dequantised ones
        if node.op_type in ("Div", "Concat"):
            assert all(producers[i].op_type != "DequantizeLinear" for i in node.input
                       if i in producers), node.name
    ref = _fresh(path).run(["embedding"], {"image": images})[0]
    for variant in ("f16.onnx", "i8.onnx"):
        got = _fresh(str(tmp_path / variant)).run(["embedding"], {"image": images})[0]
        assert _cos(ref, got).min() >= 0.98
        assert np.allclose(np.abs(got[:, :256]).max(1), 1, atol=1e-3)
    kept = tail_nodes(onnx.load(path))
    assert {"Abs", "ReduceMax", "Div", "Concat"} <= {n.op_type for n in onnx.load(path).graph.node
                                                     if n.name in kept}
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "f16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for node in inferred.graph.node:
        if node.name in kept and node.op_type in ("Div", "ReduceMax", "Concat"):
            assert types.get(node.output[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT


def test_combination_is_concat_of_linf_normalised_features(runs, tmp_path, test_images):
    out = str(tmp_path / "combo")
    formats = ("onnx", "caffe2") if HAVE_CAFFE2 else ("onnx",)
    report = export_runs([runs["a"], runs["b"]], out, formats=formats, parity_images=8)
    if HAVE_CAFFE2:
        assert report["parity"]["caffe2"]["ok"] and report["formats"] == ["onnx", "caffe2"]
    desc = ModelDescription.load(out)
    assert desc.combination == "concat-linf" and desc.feature_dim == 512
    assert len(desc.components) == 2 and desc.architecture == "small_cnn+small_cnn"
    assert [c["source_run"] for c in desc.components] == [os.path.abspath(runs[k]) for k in "ab"]
    assert report["io"]["outputs"]["embedding"]["shape"] == ["batch", 512]

    x = _batch(test_images, desc.preprocessing)
    expected = []
    for key in "ab":
        network, _ = load_run(runs[key])
        with torch.no_grad():
            f = network.forward_features(torch.from_numpy(x)).numpy()
        expected.append(f / np.abs(f).max(axis=1, keepdims=True))
    expected = np.concatenate(expected, axis=1)
    for bs in (1, 7):
        session = _fresh(os.path.join(out, "model.onnx"))
        got = np.concatenate([session.run(["embedding"], {"image": x[i:i + bs]})[0]
                              for i in range(0, len(x), bs)])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        for part in (got[:, :256], got[:, 256:]):  # each network's block peaks at exactly 1
            assert np.allclose(np.abs(part).max(1), 1)


def test_mobilenet_small_input_exports_with_parity(tmp_path, fmnist_small, test_images):
    run = _make_run(tmp_path / "mnv3", fmnist_small, arch="mobilenet_v3_small", input_size=64)
    out = str(tmp_path / "mnv3_model")
    report = export_runs([run], out, parity_images=8)
    assert report["parity"]["onnxruntime"]["ok"]
    assert report["io"]["inputs"]["image"]["shape"] == ["batch", 3, 64, 64]
    assert "BatchNormalization" not in report["graph"]["ops"]
    network, desc = load_run(run)
    x = _batch(test_images[:7], desc.preprocessing)
    with torch.no_grad():
        ref = network.forward_features(torch.from_numpy(x)).numpy()
    session = _fresh(os.path.join(out, "model.onnx"))
    one = np.concatenate([session.run(["embedding"], {"image": x[i:i + 1]})[0] for i in range(7)])
    seven = _fresh(os.path.join(out, "model.onnx")).run(["embedding"], {"image": x})[0]
    for got in (one, seven):
        assert got.shape == (7, 1024)
        assert _cos(ref, got).min() >= 0.9999


def test_dynamo_failure_falls_back_to_legacy_exporter(runs, tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def dynamo_breaks(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, **kwargs)
    monkeypatch.setattr(torch.onnx, "export", dynamo_breaks)
    report = export_runs([runs["a"]], str(tmp_path / "fallback"), parity_images=8)
    assert report["exporter"] == "torchscript"
    assert "simulated dynamo failure" in report["dynamo_error"]
    assert report["parity"]["onnxruntime"]["ok"]


def test_legacy_exporter_at_opset_17(runs, tmp_path):
    report = export_runs([runs["a"]], str(tmp_path / "legacy"), opset=17, parity_images=8)
    assert report["exporter"] == "torchscript" and report["opset"] == 17
    assert report["parity"]["onnxruntime"]["ok"]
    assert "BatchNormalization" not in report["graph"]["ops"]
    model = onnx.load(str(tmp_path / "legacy" / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


@pytest.mark.skipif(not HAVE_CAFFE2, reason="export.caffe2 / export.caffe2_exec not in this tree")
def test_caffe2_format_with_parity(single, test_images):
    from export.caffe2_exec import run_caffe2
    out, report = single
    for name in ("init_net.pb", "predict_net.pb", "value_info.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    c2 = report["parity"]["caffe2"]
    assert c2["ok"] and c2["reference"] == "onnxruntime"
    assert c2["outputs"]["embedding"]["min_cosine"] >= 0.9999
    x = _batch(test_images[:3], ModelDescription.load(out).preprocessing)
    got = run_caffe2(os.path.join(out, "init_net.pb"), os.path.join(out, "predict_net.pb"),
                     {"image": x})
    ref = _fresh(os.path.join(out, "model.onnx")).run(["embedding"], {"image": x})[0]
    assert _cos(ref, np.asarray(got["embedding"])).min() >= 0.9999


def test_fold_batchnorm_into_conv_keeps_outputs():
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    scale, bias = rng.uniform(0.5, 2, 4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    mean, var = rng.normal(size=4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w, "w"), (scale, "s"), (bias, "b"), (mean, "m"), (var, "v"))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], epsilon=1e-3,
                          name="bn")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # what every onnxruntime reads
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(),
                                  providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert fold_batchnorm(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Conv"]
    after = ort.InferenceSession(model.SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Errors and atomicity (through the CLI where the user would meet them)

def _cli(args):
    return CliRunner().invoke(cli.main, args)


def test_cli_errors_are_clear(runs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(runs["a"], broken)
    with open(broken / "model.pt", "r+b") as f:
        f.truncate(os.path.getsize(broken / "model.pt") // 2)
    result = _cli(["export", str(broken), "--out", str(tmp_path / "m1")])
    assert result.exit_code == 2 and "model.pt is corrupt" in result.output
    assert not (tmp_path / "m1").exists()

    result = _cli(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "m2")])
    assert result.exit_code == 2 and "run folder not found" in result.output

    result = _cli(["export", runs["a"], runs["wide"], "--out", str(tmp_path / "m3")])
    assert result.exit_code == 2 and "preprocessing differs" in result.output
    assert "input_size: 32" in result.output and "48" in result.output

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    result = _cli(["export", runs["a"], "--out", str(tmp_path / "taken")])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"

    result = _cli(["export", runs["a"], "--out", str(tmp_path / "m4"), "--int8"])
    assert result.exit_code == 2 and "--int8 needs --calib" in result.output
    result = _cli(["export", runs["a"], "--out", str(tmp_path / "m5"), "--format", "tflite"])
    assert result.exit_code == 2 and "unknown --format tflite" in result.output
    result = _cli(["export", runs["a"], "--out", runs["a"], "--overwrite"])
    assert result.exit_code == 2 and "would replace the run folder" in result.output
    assert os.path.exists(os.path.join(runs["a"], "model.pt"))

    no_data = tmp_path / "no_data"
    untrained_run("small_cnn", str(no_data))  # its description names no training data
    result = _cli(["export", str(no_data), "--out", str(tmp_path / "m6")])
    assert result.exit_code == 2 and "--check-data" in result.output

    result = _cli(["inspect", str(tmp_path / "taken")])
    assert result.exit_code == 2 and "no model.onnx" in result.output


def test_failed_parity_writes_nothing_and_keeps_old_model(runs, tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("previous model")
    monkeypatch.setattr(parity, "FP32_RTOL", 0.0)   # an impossible bar: any rounding fails it
    monkeypatch.setattr(parity, "FP32_ATOL", -1.0)
    with pytest.raises(ExportError) as err:
        export_runs([runs["a"]], str(out), parity_images=8, overwrite=True)
    message = str(err.value)
    assert "parity failed" in message and "max abs diff" in message and "min cosine" in message
    assert sorted(os.listdir(out)) == ["old.txt"]  # the old model is untouched
    assert os.listdir(tmp_path) == ["model"]  # no temp folder left beside it

    with pytest.raises(ExportError):
        export_runs([runs["a"]], str(tmp_path / "fresh"), parity_images=8, opset=17)
    assert not (tmp_path / "fresh").exists()


def test_overwrite_replaces_and_inspect_reports(single, runs, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("previous model")
    result = _cli(["export", runs["a"], "--out", str(out), "--overwrite", "--parity-images", "8"])
    assert result.exit_code == 0, result.output
    assert "parity onnxruntime/PyTorch embedding" in result.output
    assert sorted(os.listdir(out)) == ["description.json", "export.json", "model.onnx"]
    assert sorted(os.listdir(tmp_path)) == ["model"]

    model_dir, report = single
    result = _cli(["inspect", model_dir])
    assert result.exit_code == 0, result.output
    text = result.output
    for expected in ("architecture: small_cnn (256-d)",
                     "generic (5 classes) > specific (10 classes)",
                     "input  image: float32 [batchx3x32x32]", "output logits_specific",
                     "variants: fp32, fp16, int8", "parity onnxruntime vs PyTorch, embedding",
                     "model.int8.onnx", "resize shorter side to 32", "fp16: cosine to fp32"):
        assert expected in text, expected
    fig = report["parity"]["onnxruntime"]["outputs"]["embedding"]
    assert f"{fig['max_abs_diff']:.2e}" in text
    result = _cli(["inspect", model_dir, "--json"])
    assert json.loads(result.output)["export"] == report
