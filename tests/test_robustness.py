"""Robustness: a hostile library generated at test time (a few MB in tmp_path) against every
stage. Each bad input must give a clear per-item or one-line error, nothing else may be lost,
memory per image stays bounded, and a job killed with SIGKILL leaves nothing half-written.
"""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cli
from common.atomic import atomic_open, clean_stale_temps, make_temp_dir
from common.checks import check_output, output_problem
from common.data import load_dataset, scan_imagefolder, spec_problem
from common.description import DescriptionError, ModelDescription, Preprocessing
from common.images import ImageDecodeError, open_image, preprocess, resize_and_crop
from runtime import decode
from runtime.probes import ProbeFileError, load_probe, make_probe, save_probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
TIMEOUT = 300


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image (gradients plus noise), so resampling is exercised."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255.0 / max(w - 1, 1), y * 255.0 / max(h - 1, 1),
                     (x + y) * 127.0 / max(w + h - 2, 1)], axis=-1)
    noise = rng.normal(0, 12, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _whole_resize_then_crop(img: Image.Image, pre: Preprocessing) -> np.ndarray:
    """The transform as it always was: resize the whole image, pad if needed, centre crop."""
    w, h = img.size
    t = pre.resize_size
    if min(w, h) != t:
        nw, nh = (t, max(1, round(h * t / w))) if w <= h else (max(1, round(w * t / h)), t)
        img = img.resize((nw, nh), Image.BILINEAR)
    s = pre.input_size
    w, h = img.size
    if w < s or h < s:
        canvas = Image.new("RGB", (max(w, s), max(h, s)), tuple(pre.background))
        canvas.paste(img, ((canvas.width - w) // 2, (canvas.height - h) // 2))
        img, w, h = canvas, canvas.width, canvas.height
    left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
    return np.asarray(img.crop((left, top, left + s, top + s)))


# ---------------------------------------------------------------------------------------------
# shared: one small exported model (random weights) and a probe fitted on it

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, digits_small):
    from export.onnx_export import export_runs
    from train.runs import untrained_run

    base = tmp_path_factory.mktemp("robust")
    untrained_run("small_cnn", str(base / "run"), heads=[("digit", [str(d) for d in range(10)])],
                  input_size=16, width=8, feature_dim=32)
    export_runs([str(base / "run")], str(base / "model"), check_data=digits_small,
                parity_images=4)
    return str(base / "model")


@pytest.fixture(scope="module")
def probe_dir(model_dir, tmp_path_factory, digits_small):
    out = str(tmp_path_factory.mktemp("probe") / "p")
    result = CliRunner().invoke(cli.main, ["probe", "fit", model_dir, "--data", digits_small,
                                           "--out", out, "--kind", "ncm", "--device", "cpu",
                                           "--threads", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def _run_cli(*args, cwd=ROOT, env=ENV):
    return subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=TIMEOUT)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Error")]


# ---------------------------------------------------------------------------------------------
# 1. memory per image: crop window only, pixel limit

@pytest.mark.parametrize("size,pre", [
    ((500, 375), Preprocessing(input_size=224, resize_size=256)),
    ((375, 500), Preprocessing(input_size=224, resize_size=256)),
    ((640, 480), Preprocessing(input_size=224, resize_size=224)),
    ((28, 28), Preprocessing(input_size=32, resize_size=32)),
    ((64, 48), Preprocessing(input_size=40, resize_size=32)),   # pads with the background
    ((300, 200), Preprocessing(input_size=16, resize_size=16)),
])
def test_normal_images_are_bit_identical_to_the_whole_resize(size, pre):
    img = _photo(*size, seed=size[0])
    assert np.array_equal(np.asarray(resize_and_crop(img, pre)), _whole_resize_then_crop(img, pre))
    exact = decode.load_crop(_png_bytes(img), pre, fast=False)
    assert np.array_equal(exact, _whole_resize_then_crop(img, pre))


@pytest.mark.parametrize("size,pre", [
    ((12, 3000), Preprocessing(input_size=32, resize_size=36)),
    ((3000, 12), Preprocessing(input_size=32, resize_size=36)),
    ((10, 4000), Preprocessing(input_size=40, resize_size=32)),  # window and padding
])
def test_extreme_shapes_resample_only_the_window_within_one_level(size, pre):
    img = _photo(*size, seed=1)
    window = np.asarray(resize_and_crop(img, pre)).astype(int)
    reference = _whole_resize_then_crop(img, pre).astype(int)
    assert window.shape == reference.shape == (pre.input_size, pre.input_size, 3)
    assert np.abs(window - reference).max() <= 1
    for fast in (True, False):
        crop = decode.load_crop(_png_bytes(img), pre, fast=fast).astype(int)
        assert np.abs(crop - reference).max() <= 1


PEAK_RSS_SCRIPT = textwrap.dedent("""
    import io, sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from PIL import Image
    from common.description import Preprocessing
    from common.images import preprocess
    from runtime.decode import load_crop
    import train.imagesets  # the training data layer's decoder (imports torch: before the baseline)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) // 1024
    shapes = [(1, 20000), (20000, 1), (3, 9000)]
    files = []
    for w, h in shapes:
        buf = io.BytesIO()
        Image.fromarray((np.arange(w * h) % 251).astype(np.uint8).reshape(h, w)).save(buf, "PNG")
        files.append(buf.getvalue())
    pre = Preprocessing(input_size=224, resize_size=256)
    before = status("VmRSS:")
    for data in files:
        for fast in (True, False):
            assert load_crop(data, pre, fast=fast).shape == (224, 224, 3)
        assert preprocess(data, pre).shape == (3, 224, 224)
        open(sys.argv[2], "wb").write(data)
        assert train.imagesets._decode(sys.argv[2], pre).shape == (224, 224, 3)
    print(status("VmHWM:") - before)
""")


def test_extreme_aspect_images_keep_peak_memory_flat(tmp_path):
    """1x20000 at 224 px: resized whole it would be 224x4.5M pixels (3 GB); now < 300 MB peak
    growth, through the runtime's fast and exact decoders and the training data layer."""
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, ROOT, str(tmp_path / "x.png")],
                          capture_output=True, text=True, env=ENV, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth_mb = int(proc.stdout.split()[-1])
    assert growth_mb < 300, f"peak RSS grew by {growth_mb} MB"


def test_huge_image_refused_on_its_header_naming_the_limit(tmp_path, monkeypatch):
    monkeypatch.delenv("UNIREP_MAX_PIXELS", raising=False)
    path = tmp_path / "huge.png"
    Image.new("1", (12000, 12000)).save(path)  # 144 MP in a small file (1 bit per pixel)
    assert path.stat().st_size < 2_000_000
    pre = Preprocessing(input_size=32, resize_size=32)
    for load in (lambda: decode.load_crop(str(path), pre, fast=True),
                 lambda: decode.load_crop(str(path), pre, fast=False),
                 lambda: open_image(str(path))):
        with pytest.raises(ImageDecodeError) as e:
            load()
        assert str(path) in str(e.value) and "100,000,000" in str(e.value)
        assert "UNIREP_MAX_PIXELS" in str(e.value)
    # the limit is configurable; PIL's own bomb check (at twice it) gives the same error
    monkeypatch.setenv("UNIREP_MAX_PIXELS", "1000")
    small = _png_bytes(_photo(40, 30))     # 1,200 pixels: our check
    bomb = _png_bytes(_photo(60, 60))      # 3,600 pixels: PIL's check
    for data in (small, bomb):
        for fast in (True, False):
            with pytest.raises(ImageDecodeError, match="limit of 1,000 pixels"):
                decode.load_crop(data, pre, fast=fast)
    jpeg = io.BytesIO()
    _photo(40, 30).save(jpeg, "JPEG")
    with pytest.raises(ImageDecodeError, match="limit of 1,000"):
        decode.load_crop(jpeg.getvalue(), pre, fast=True)
    monkeypatch.setenv("UNIREP_MAX_PIXELS", "2000")
    assert decode.load_crop(small, pre).shape == (32, 32, 3)
    monkeypatch.setenv("UNIREP_MAX_PIXELS", "lots")
    with pytest.raises(ImageDecodeError, match="UNIREP_MAX_PIXELS='lots'"):
        decode.load_crop(small, pre)


# ---------------------------------------------------------------------------------------------
# 2. bad items through embed: per-item errors, rows aligned, right numbers

def test_hostile_items_through_embed(model_dir, tmp_path, digits_small, monkeypatch):
    from runtime.pipeline import FeaturePipeline

    monkeypatch.setenv("UNIREP_MAX_PIXELS", "5000")
    good = load_dataset(digits_small).paths("test")[0]
    good_u8 = np.asarray(Image.open(good).convert("L"))
    png = _png_bytes(_photo(50, 40))
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "garbage.png").write_bytes(os.urandom(3000))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "toobig.png").write_bytes(_png_bytes(_photo(100, 60)))  # 6,000 pixels
    nan = np.full((8, 8), np.nan, np.float32)
    items = [good, str(tmp_path / "truncated.png"), str(tmp_path / "garbage.png"),
             str(tmp_path / "empty.png"), str(tmp_path / "toobig.png"),
             good_u8, good_u8.astype(np.uint16) * 257, nan, good_u8.astype(np.float32) / 255,
             good_u8.astype(bool), good_u8.astype(object), np.zeros((8, 8, 2), np.uint8), good]
    with FeaturePipeline(model_dir, device="cpu", threads=1, batch_size=4) as pipe:
        result = pipe.embed(items)
    assert len(result) == len(items) == len(result.vectors)
    expected_errors = {1: "truncated.png", 2: "garbage.png", 3: "empty.png",
                       4: "limit of 5,000 pixels", 7: "must be uint8 or uint16, not float32",
                       8: "not float32", 9: "not bool", 10: "not object", 11: "HxW or HxWxC"}
    assert set(result.errors) == set(expected_errors)
    for i, words in expected_errors.items():
        assert words in result.errors[i], result.errors[i]
        assert "\n" not in result.errors[i]
        assert np.isnan(result.vectors[i]).all()
    ok = result.ok
    assert ok.tolist() == [i not in expected_errors for i in range(len(items))]
    assert np.isfinite(result.vectors[ok]).all()
    # uint16 is scaled by its depth like a 16-bit file (x * 257 -> x), not clipped to white
    np.testing.assert_array_equal(result.vectors[6], result.vectors[5])
    np.testing.assert_array_equal(result.vectors[0], result.vectors[12])
    # a grey 16-bit PNG of the same pixels gives the same row as the uint16 array
    img16 = Image.fromarray(good_u8.astype(np.uint16) * 257)
    assert img16.mode.startswith("I;16")
    with FeaturePipeline(model_dir, device="cpu", threads=1) as pipe:
        again = pipe.embed([_png_bytes(img16)])
    np.testing.assert_allclose(again.vectors[0], result.vectors[6], rtol=0, atol=1e-6)


def test_float_image_with_nan_is_an_error(tmp_path):
    path = tmp_path / "nan.tif"
    Image.fromarray(np.array([[0.5, np.nan], [0.1, 0.2]], np.float32), "F").save(path)
    pre = Preprocessing(input_size=8, resize_size=8)
    for fast in (True, False):
        with pytest.raises(ImageDecodeError, match="nan.tif.*NaN or infinite"):
            decode.load_crop(str(path), pre, fast=fast)


@pytest.mark.parametrize("change,words", [
    ({"std": [0.5, 0.0, 0.5]}, "std must be positive"),
    ({"std": [0.5, 0.5]}, "std must be 3 finite numbers"),
    ({"mean": [0.5, float("nan"), 0.5]}, "mean must be 3 finite numbers"),
    ({"input_size": 0}, "input_size must be a positive integer"),
    ({"interpolation": "lanczos9"}, "interpolation must be one of"),
    ({"background": [255, 255, 300]}, "background must be 3 integers"),
])
def test_unusable_descriptions_refused_when_loaded(model_dir, tmp_path, change, words):
    doc = json.load(open(os.path.join(model_dir, "description.json")))
    doc["preprocessing"].update(change)
    path = tmp_path / "description.json"
    path.write_text(json.dumps(doc))  # json writes NaN as a bare token, as a careless tool would
    with pytest.raises(DescriptionError) as e:
        ModelDescription.load(str(path))
    assert str(path) in str(e.value) and words in str(e.value)
    assert "\n" not in str(e.value)
    path.write_text("{ not json")
    with pytest.raises(DescriptionError, match="description.json: not a valid model description"):
        ModelDescription.load(str(tmp_path))


def test_model_whose_metadata_has_std_zero_is_refused(model_dir, tmp_path):
    import onnx

    from runtime.pipeline import FeaturePipeline
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    model = onnx.load(str(bad / "model.onnx"))
    for prop in model.metadata_props:
        if prop.key == "unirep.description":
            doc = json.loads(prop.value)
            doc["preprocessing"]["std"] = [0.0, 0.0, 0.0]
            prop.value = json.dumps(doc)
    onnx.save(model, str(bad / "model.onnx"))
    (bad / "description.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="std must be positive"):
        FeaturePipeline(str(bad), device="cpu", threads=1)


# ---------------------------------------------------------------------------------------------
# 3. probe files

def _corrupt(kind: str, folder):
    npz, js = os.path.join(folder, "probe.npz"), os.path.join(folder, "probe.json")
    doc = json.load(open(js))
    if kind == "truncated npz":
        data = open(npz, "rb").read()
        open(npz, "wb").write(data[: len(data) // 2])
        return npz, "probe.npz: unreadable"
    if kind == "garbage json":
        open(js, "w").write('{"format": "unirep.probe", ')
        return js, "not valid JSON"
    if kind == "unexpected state key":
        doc["state"]["__class__"] = 1
        json.dump(doc, open(js, "w"))
        return js, "'__class__'] unexpected"
    if kind == "missing state key":
        del doc["state"]["temperature_"]
        json.dump(doc, open(js, "w"))
        return js, "missing"
    if kind in ("wrong shape", "unexpected array", "nan weights", "object array"):
        arrays = dict(np.load(npz))
        if kind == "wrong shape":
            arrays["means_"] = arrays["means_"][:, :5]
            words = "shape (10, 5), expected (10, 32)"
        elif kind == "unexpected array":
            arrays["evil"] = np.zeros(3)
            words = "['evil'] are unexpected"
        elif kind == "nan weights":
            arrays["means_"][0, 0] = np.nan
            words = "NaN or infinite"
        else:
            arrays["means_"] = np.array([{"a": 1}], dtype=object)
            words = "probe.npz: unreadable"
        with open(npz, "wb") as f:
            np.savez(f, **arrays)
        return npz, words
    if kind == "other dimension":
        doc["feature_dim"] = doc["state"]["n_features_in_"] = 8
        json.dump(doc, open(js, "w"))
        return npz, "expected (10, 8)"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated npz", "garbage json", "unexpected state key",
                                  "missing state key", "wrong shape", "unexpected array",
                                  "nan weights", "object array", "other dimension"])
def test_corrupt_probe_files_give_one_line_naming_the_file(probe_dir, model_dir, tmp_path, kind):
    folder = tmp_path / "probe"
    shutil.copytree(probe_dir, folder)
    path, words = _corrupt(kind, str(folder))
    with pytest.raises(ProbeFileError) as e:
        load_probe(str(folder))
    assert path in str(e.value) and words in str(e.value), str(e.value)
    image = tmp_path / "x.png"
    _photo(20, 20).save(image)
    out = tmp_path / "preds.jsonl"
    result = CliRunner().invoke(cli.main, ["probe", "predict", model_dir, str(folder), str(image),
                                           "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 1 and not out.exists()
    assert _error_lines(result.output) == [_error_lines(result.output)[0]]
    assert path in result.output and "Traceback" not in result.output


def test_probe_for_another_model_dimension_is_refused(model_dir, tmp_path):
    rng = np.random.default_rng(0)
    probe = make_probe("logreg", C=1.0).fit(rng.normal(size=(40, 8)), np.arange(40) % 2)
    save_probe(probe, str(tmp_path / "p8"))
    assert load_probe(str(tmp_path / "p8")).n_features_in_ == 8
    image = tmp_path / "x.png"
    _photo(20, 20).save(image)
    result = CliRunner().invoke(cli.main, ["probe", "predict", model_dir, str(tmp_path / "p8"),
                                           str(image), "--out", str(tmp_path / "o.jsonl"),
                                           "--device", "cpu"])
    assert result.exit_code != 0 and "8-d features" in result.output
    assert "32-d" in result.output and not (tmp_path / "o.jsonl").exists()


def test_predictions_stay_valid_json_when_the_probe_gives_nan(model_dir, probe_dir, tmp_path):
    folder = tmp_path / "probe"
    shutil.copytree(probe_dir, folder)
    doc = json.load(open(folder / "probe.json"))
    doc["state"]["temperature_"] = 1e308  # finite, but the softmax overflows to NaN
    json.dump(doc, open(folder / "probe.json", "w"))
    image = tmp_path / "x.png"
    _photo(20, 20).save(image)
    out = tmp_path / "preds.jsonl"
    result = CliRunner().invoke(cli.main, ["probe", "predict", model_dir, str(folder), str(image),
                                           str(tmp_path / "missing.png"), "--out", str(out),
                                           "--device", "cpu"])
    text = out.read_text() if out.exists() else ""
    assert "NaN" not in text and "Infinity" not in text
    records = [json.loads(line) for line in text.splitlines()]  # strict JSON parses
    assert len(records) == 2 or result.exit_code != 0
    for record in records:
        assert "error" in record or 0 <= record["score"] <= 1


# ---------------------------------------------------------------------------------------------
# 4. options: every bad value refused before any work, in one Error line

BAD_OPTIONS = [
    (["train", "--data", "digits", "--out", "{out}", "--epochs", "-1"], "--epochs"),
    (["train", "--data", "digits", "--out", "{out}", "--batch-size", "0"], "--batch-size"),
    (["train", "--data", "digits", "--out", "{out}", "--lr", "nan"], "--lr"),
    (["train", "--data", "digits", "--out", "{out}", "--lr", "inf"], "--lr"),
    (["train", "--data", "digits", "--out", "{out}", "--lr", "0"], "--lr"),
    (["train", "--data", "digits", "--out", "{out}", "--momentum", "1.5"], "--momentum"),
    (["train", "--data", "digits", "--out", "{out}", "--weight-decay", "-1"], "--weight-decay"),
    (["train", "--data", "digits", "--out", "{out}", "--val-fraction", "1"], "--val-fraction"),
    (["train", "--data", "digits", "--out", "{out}", "--label-smoothing", "1"],
     "--label-smoothing"),
    (["train", "--data", "digits", "--out", "{out}", "--per-class", "0"], "--per-class"),
    (["train", "--data", "digits", "--out", "{out}", "--input-size", "0"], "--input-size"),
    (["train", "--data", "digits", "--out", "{out}", "--threads", "100000"], "--threads"),
    (["train", "--data", "digits", "--out", "{out}", "--workers", "-2"], "--workers"),
    (["train", "--data", "digits", "--out", "{out}", "--k", "1"], "--k"),
    (["train", "--data", "digits", "--out", "{out}", "--finer-k", "0"], "--finer-k"),
    (["train", "--data", "digits", "--out", "{out}", "--alpha", "nan"], "--alpha"),
    (["train", "--data", "digits", "--out", "{out}", "--cache-gb", "-1"], "--cache-gb"),
    (["train", "--data", "digits", "--out", "{out}", "--seed", "-3"], "--seed"),
    (["train", "--data", "digits", "--out", "{out}", "--loss-weights", "1,nan"],
     "--loss-weights"),
    (["train", "--data", "digits:per_class=abc", "--out", "{out}"], "per_class"),
    (["train", "--data", "digits:colour=red", "--out", "{out}"], "unknown option 'colour'"),
    (["train", "--data", "digits", "--out", "{file}/run"], "--out"),
    (["export", "{model}", "--out", "{file}/m"], "--out"),
    (["export", "{model}", "--out", "{out}", "--opset", "3"], "--opset"),
    (["export", "{model}", "--out", "{out}", "--parity-images", "0"], "--parity-images"),
    (["export", "{model}", "--out", "{out}", "--int8", "--calib", "mnist:per_class=-4"],
     "--calib"),
    (["probe", "fit", "{model}", "--data", "digits", "--out", "{file}"], "--out"),
    (["probe", "fit", "{model}", "--data", "digits:per_class=x", "--out", "{out}"], "--data"),
    (["probe", "fit", "{model}", "--data", "digits", "--out", "{out}", "--C", "0"], "--C"),
    (["probe", "fit", "{model}", "--data", "digits", "--out", "{out}", "--C", "nan"], "--C"),
    (["probe", "fit", "{model}", "--data", "digits", "--out", "{out}", "--val-fraction", "2"],
     "--val-fraction"),
    (["probe", "fit", "{model}", "--data", "digits", "--out", "{out}", "--k", "0"], "--k"),
    (["probe", "predict", "{model}", "{probe}", "x.png", "--out", "{file}/p.jsonl"], "--out"),
    (["probe", "predict", "{model}", "{probe}", "x.png", "--out", "{out}", "--top-k", "0"],
     "--top-k"),
    (["probe", "fuse", "{model}", "{probe}", "--out", "{file}/f.onnx"], "--out"),
    (["inspect", "{file}"], "{file}"),
]


@pytest.mark.parametrize("args,named", BAD_OPTIONS, ids=[" ".join(a[:2]) + " " + n
                                                          for a, n in BAD_OPTIONS])
def test_bad_option_values_fail_before_any_work(model_dir, probe_dir, tmp_path, args, named):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    fill = {"out": str(tmp_path / "out"), "file": str(a_file), "model": model_dir,
            "probe": probe_dir}
    result = CliRunner().invoke(cli.main, [a.format(**fill) for a in args])
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    errors = _error_lines(result.output)
    assert len(errors) == 1, result.output
    assert named.format(**fill) in errors[0], errors[0]
    assert not (tmp_path / "out").exists()  # nothing was written: no work started


def test_output_checks(tmp_path):
    (tmp_path / "f").write_text("x")
    assert output_problem(str(tmp_path / "new" / "deeper"), "folder") is None
    assert output_problem(str(tmp_path / "p.jsonl"), "file") is None
    assert "is a file" in output_problem(str(tmp_path / "f"), "folder")
    assert "is a folder" in output_problem(str(tmp_path), "file")
    assert "no folder can be made" in output_problem(str(tmp_path / "f" / "x"), "file")
    with pytest.raises(ValueError, match="choose another output path"):
        check_output(str(tmp_path / "f" / "x"))
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert spec_problem("digits:per_class=3") is None
    assert "positive integer" in spec_problem("digits:per_class=0")


# ---------------------------------------------------------------------------------------------
# 5. folders and files

def test_symlink_loops_yield_each_image_once(tmp_path, digits_small):
    src = sorted(load_dataset(digits_small).paths("train"))[:4]
    root = tmp_path / "data"
    for cls, files in (("a", src[:2]), ("b", src[2:])):
        (root / cls).mkdir(parents=True)
        for i, f in enumerate(files):
            shutil.copy(f, root / cls / f"{i}.png")
    os.symlink("..", root / "a" / "up")           # a -> data -> a -> ...
    os.symlink(str(root / "b"), root / "a" / "b_again")
    ds = scan_imagefolder(str(root))
    paths = ds.paths("all")
    real = [os.path.realpath(p) for p in paths]
    assert len(real) == len(set(real)) == 4
    assert sum("links back" in p for p in ds.problems) >= 1


def test_a_file_linked_into_both_splits_stays_in_test_only(tmp_path, digits_small):
    src = sorted(load_dataset(digits_small).paths("train"))[:4]
    root = tmp_path / "data"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
    for i, f in enumerate(src):
        shutil.copy(f, root / ("train" if i < 2 else "test") / ("a" if i % 2 else "b") / f"{i}.png")
    os.symlink(str(root / "test" / "a"), root / "train" / "a" / "leak")
    ds = scan_imagefolder(str(root))
    train = {os.path.realpath(p) for p in ds.paths("train")}
    test = {os.path.realpath(p) for p in ds.paths("test")}
    assert not train & test and len(test) == 2 and len(train) == 2
    assert any("kept in test only" in p for p in ds.problems)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_unreadable_folder_is_reported(tmp_path, digits_small):
    src = sorted(load_dataset(digits_small).paths("train"))[:2]
    for cls, f in zip(("a", "b"), src):
        (tmp_path / "d" / cls).mkdir(parents=True)
        shutil.copy(f, tmp_path / "d" / cls / "0.png")
    os.chmod(tmp_path / "d" / "b", 0)
    try:
        ds = scan_imagefolder(str(tmp_path / "d"))
    finally:
        os.chmod(tmp_path / "d" / "b", 0o755)
    assert len(ds.paths("all")) == 1
    assert any("cannot be read" in p for p in ds.problems)
    assert "problem(s) while scanning" in ds.summary()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_cleaned(tmp_path):
    dead = _dead_pid()
    stale_file = tmp_path / f".tmp-{dead}-abc.npy"
    stale_dir = tmp_path / f".tmp-{dead}-model-xyz"
    live = tmp_path / f".tmp-{os.getpid()}-mine.npy"
    other = tmp_path / ".tmp-notapid.npy"
    for p in (stale_file, live, other):
        p.write_bytes(b"half")
    stale_dir.mkdir()
    (stale_dir / "model.onnx").write_bytes(b"half")
    with atomic_open(str(tmp_path / "out.json"), "w") as f:
        f.write("{}")
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and other.exists() and (tmp_path / "out.json").read_text() == "{}"
    assert clean_stale_temps(str(tmp_path)) == []
    made = make_temp_dir(str(tmp_path), tag="x")
    assert os.path.basename(made).startswith(f".tmp-{os.getpid()}-x-")


# ---------------------------------------------------------------------------------------------
# 6. kill -9 in the middle, then rerun

def _start_and_kill(args, marker: str, cwd, timeout=TIMEOUT):
    """Start `cli.py args`, SIGKILL it when stderr shows `marker`; returns True if killed."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "cli.py"), *map(str, args)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=ENV, cwd=cwd)
    killed = False
    try:
        for line in proc.stderr:
            if marker in line:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=timeout)
        proc.stderr.close()
    return killed and proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_train_then_resume_with_another_spelling(tmp_path, digits_small):
    common = ["--data", digits_small, "--epochs", "6", "--input-size", "16", "--arch-kwargs",
              "width=4,feature_dim=16", "--batch-size", "32", "--device", "cpu", "--threads", "1"]
    assert _start_and_kill(["train", *common, "--out", "run/"], "epoch 2/6", cwd=tmp_path)
    run = tmp_path / "run"
    assert (run / "checkpoint.pt").exists() and not (run / "model.pt").exists()
    resumed = _run_cli("train", *common, "--out", "./run", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch" in resumed.stderr
    assert (run / "model.pt").exists()
    epochs = [json.loads(line)["epoch"] for line in open(run / "metrics.jsonl")]
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]


@pytest.mark.slow
def test_kill_export_leaves_no_model_and_the_rerun_cleans_up(tmp_path, digits_small):
    from train.runs import untrained_run
    untrained_run("small_cnn", str(tmp_path / "run"), input_size=16, width=4, feature_dim=16)
    args = ["export", tmp_path / "run", "--out", tmp_path / "model", "--check-data", digits_small,
            "--parity-images", "2"]
    assert _start_and_kill(args, "-> ONNX", cwd=tmp_path)
    assert not (tmp_path / "model").exists()
    left = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert left  # the killed export's temporary folder, named after its pid
    done = _run_cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "model" / "model.onnx").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


@pytest.mark.slow
def test_kill_probe_predict_leaves_no_partial_output(model_dir, probe_dir, tmp_path,
                                                     digits_small):
    out = tmp_path / "preds.jsonl"
    args = ["probe", "predict", model_dir, probe_dir, digits_small, "--out", out,
            "--device", "cpu", "--threads", "1"]
    assert _start_and_kill(args, "provider", cwd=tmp_path)
    assert not out.exists()
    done = _run_cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in open(out)]
    images = [f for _, _, files in os.walk(digits_small) for f in files if f.endswith(".png")]
    assert len(records) == len(images) and all("label" in r for r in records)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_preprocess_reference_matches_exact_decoder():
    """The reference transform and the runtime's exact path stay one definition."""
    pre = Preprocessing(input_size=24, resize_size=28)
    data = _png_bytes(_photo(90, 70, seed=3))
    np.testing.assert_array_equal(preprocess(data, pre), decode.preprocess(data, pre, fast=False))
