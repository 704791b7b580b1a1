"""Exported Caffe2 nets run in a REAL Caffe2 runtime (torch 1.8.1's `caffe2`, Python 3.8, built by
`make caffe2-env`), not only in our NumPy reference executor: every registered architecture, a
combination and a fused probe match onnxruntime within the export's fp32 tolerance; `export
--format caffe2` records the real runtime's proof in export.json; `caffe2-run` gives the rows that
`embed` gives. Skipped, with the reason, only where this machine has no Python 3.8."""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from export import caffe2_runtime
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _python38_exists() -> bool:
    found = shutil.which("python3.8")
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    return bool(found or glob.glob(os.path.join(pyenv, "versions", "3.8.*", "bin", "python")))


@pytest.fixture(scope="module")
def caffe2_python():
    try:
        python = caffe2_runtime.find_caffe2_python()
        caffe2_runtime.runtime_info(python)
    except caffe2_runtime.Caffe2Unavailable as e:
        if not _python38_exists():
            pytest.skip(f"no Python 3.8 on this machine, so no real Caffe2 runtime: {e}")
        pytest.fail(f"a Python 3.8 exists but the Caffe2 environment does not work: {e}")
    return python


@pytest.fixture(scope="module")
def images(fmnist_small):
    test = sorted(glob.glob(os.path.join(fmnist_small, "test", "**", "*.png"), recursive=True))
    train = sorted(glob.glob(os.path.join(fmnist_small, "train", "**", "*.png"), recursive=True))
    return {"test": test[::40], "calibration": train[::10]}


def _ort(onnx_path, x):
    import onnxruntime as ort
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": x})))


def _assert_real_matches(onnx_path, out_dir, x, python):
    """Convert, run batch 1 and the whole batch in the real runtime, compare with onnxruntime."""
    from export.caffe2 import convert_onnx_file
    from export.parity import FP32_ATOL, FP32_RTOL
    info = convert_onnx_file(onnx_path, out_dir)
    (one, full), run = caffe2_runtime.run_real_caffe2(
        info["files"]["init_net"], info["files"]["predict_net"], [x[:1], x], python=python)
    expected = _ort(onnx_path, x)
    assert run["runtime"].startswith("caffe2 (torch 1.8.1") and run["python"].startswith("3.8")
    assert set(full) == set(expected)
    for name, want in expected.items():
        for got, ref in ((full[name], want), (one[name], want[:1])):
            assert got.shape == ref.shape and got.dtype == ref.dtype, name
            scale = float(np.abs(ref).max())
            diff = float(np.abs(got.astype(np.float64) - ref).max())
            assert diff <= FP32_RTOL * scale + FP32_ATOL, f"{name}: max |diff| {diff:.3g} at scale {scale:.3g}"
    return info, run


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "resnet50", "mobilenet_v3_small",
                                  "mobilenet_v3_large", "efficientnet_lite0"])
def test_every_architecture_runs_in_the_real_caffe2_runtime(arch, caffe2_python, images, tmp_path):
    from tests.test_caffe2 import _batch, _calibrate_batchnorm, _export, _Exported
    from train.models import load_run
    from train.runs import untrained_run
    untrained_run(arch, str(tmp_path / "run"), heads=[("specific", [f"c{i}" for i in range(10)])],
                  input_size=32)
    network, _ = load_run(str(tmp_path / "run"))
    x = _batch(images["test"], arch)
    _calibrate_batchnorm(network, _batch(images["calibration"], arch))
    onnx_path = _export(_Exported(network), x, str(tmp_path / "model.onnx"), True, ["embedding", "logits_specific"])
    info, run = _assert_real_matches(onnx_path, str(tmp_path / "caffe2"), x, caffe2_python)
    assert "Conv" in run["ops"] and "FC" in run["ops"]


def test_combination_runs_in_the_real_caffe2_runtime(caffe2_python, images, tmp_path):
    import torch

    from tests.test_caffe2 import _batch, _calibrate_batchnorm, _Combined, _export
    from train.models import create_backbone
    torch.manual_seed(0)
    x = _batch(images["test"], "small_cnn")
    combined = _calibrate_batchnorm(_Combined(create_backbone("small_cnn"), create_backbone("resnet18")),
                                    _batch(images["calibration"], "small_cnn"))
    onnx_path = _export(combined, x, str(tmp_path / "combined.onnx"), True, ["embedding"])
    _, run = _assert_real_matches(onnx_path, str(tmp_path / "caffe2"), x, caffe2_python)
    assert {"Concat", "ReduceMax", "Abs", "Div"} <= set(run["ops"])


def _cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), *args], capture_output=True,
                          text=True, timeout=900, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def caffe2_model(tmp_path_factory, fmnist_small, caffe2_python):
    """A small CNN exported by the export stage with --format caffe2 (real runtime available)."""
    from train.runs import untrained_run
    base = tmp_path_factory.mktemp("caffe2-export")
    untrained_run("small_cnn", str(base / "run"), heads=[("specific", [f"c{i}" for i in range(10)])],
                  input_size=32, seed=3)
    done = _cli("export", str(base / "run"), "--out", str(base / "model"), "--format", "caffe2",
                "--check-data", fmnist_small)
    assert done.returncode == 0, done.stderr[-2000:]
    return str(base / "model"), done


def test_export_records_the_real_runtime_proof(caffe2_model):
    model_dir, done = caffe2_model
    with open(os.path.join(model_dir, "export.json")) as f:
        caffe2 = json.load(f)["parity"]["caffe2"]
    real = caffe2["real_runtime"]
    assert real["available"] and real["ok"] and real["runtime"].startswith("caffe2 (torch 1.8.1")
    assert real["batch_sizes"] == [1, 7] and real["outputs"]["embedding"]["min_cosine"] > 0.99999
    assert caffe2["proved_by"] == ["reference executor", real["runtime"]]
    assert "Caffe2 proven by reference executor and caffe2 (torch 1.8.1" in done.stderr
    shown = _cli("inspect", model_dir)
    assert "parity caffe2 (torch 1.8.1" in shown.stdout and "caffe2 reference executor" in shown.stdout


def test_caffe2_run_gives_the_rows_embed_gives(caffe2_model, fmnist_small, tmp_path):
    model_dir, _ = caffe2_model
    folder = tmp_path / "imgs"
    shutil.copytree(os.path.join(fmnist_small, "test", "bag"), folder)
    (folder / "zz-broken.png").write_bytes(b"not an image")
    assert _cli("caffe2-run", model_dir, str(folder), "--out", str(tmp_path / "c2.npy"),
                "--batch-size", "8").returncode == 0
    assert _cli("embed", model_dir, str(folder), "--out", str(tmp_path / "ort.npy")).returncode == 0
    c2, ort = np.load(tmp_path / "c2.npy"), np.load(tmp_path / "ort.npy")
    with open(tmp_path / "c2.ids.json") as f1, open(tmp_path / "ort.ids.json") as f2:
        assert json.load(f1) == json.load(f2)
    assert c2.shape == ort.shape and np.isnan(c2[-1]).all() and np.isnan(ort[-1]).all()
    np.testing.assert_allclose(c2[:-1], ort[:-1], atol=1e-5 * float(np.abs(ort[:-1]).max()))
    with open(tmp_path / "c2.errors.json") as f:
        errors = json.load(f)
    assert list(errors) == [str(len(c2) - 1)] and "zz-broken.png" in errors[str(len(c2) - 1)]


def test_fused_probe_runs_in_the_real_caffe2_runtime(caffe2_model, caffe2_python, fmnist_small, images, tmp_path):
    from common.images import preprocess
    from common.model_dir import ModelDir
    model_dir, _ = caffe2_model
    assert _cli("probe", "fit", model_dir, "--data", fmnist_small, "--out", str(tmp_path / "probe")).returncode == 0
    fused = str(tmp_path / "fused.onnx")
    assert _cli("probe", "fuse", model_dir, str(tmp_path / "probe"), "--out", fused).returncode == 0
    pre = ModelDir(model_dir).description.preprocessing
    x = np.stack([preprocess(p, pre) for p in images["test"]]).astype(np.float32)
    _, run = _assert_real_matches(fused, str(tmp_path / "caffe2"), x, caffe2_python)
    assert {"Softmax", "ArgMax"} <= set(run["ops"])


def test_without_the_environment_export_keeps_the_reference_proof(fmnist_small, tmp_path):
    from train.runs import untrained_run
    untrained_run("small_cnn", str(tmp_path / "run"), heads=[("specific", ["a", "b"])], input_size=32)
    env = dict(os.environ, UNIREP_CAFFE2_PYTHON=str(tmp_path / "no-such-python"))
    done = _cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "model"), "--format", "caffe2",
                "--check-data", fmnist_small, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "model" / "export.json") as f:
        caffe2 = json.load(f)["parity"]["caffe2"]
    assert caffe2["ok"] and caffe2["proved_by"] == ["reference executor"]
    assert caffe2["real_runtime"] == {"available": False, "reason": caffe2["real_runtime"]["reason"]}
    assert "make caffe2-env" in caffe2["real_runtime"]["reason"]
    assert "proven by the reference executor only" in done.stdout + done.stderr
    missing = _cli("caffe2-run", str(tmp_path / "model"), fmnist_small, "--out", str(tmp_path / "x.npy"), env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].startswith("Error: no Caffe2 runtime at $UNIREP_CAFFE2_PYTHON")


@pytest.mark.parametrize("forms", ["small_forms_graph", "operator_forms_graph"])
def test_operator_forms_run_in_the_real_caffe2_runtime(forms, caffe2_python, tmp_path):
    """Every op form the reference executor is tested on (pads, pooling pad rules, grouped and dilated
    convolution, Gemm alpha/beta, HardSwish, Clip, Max, ExpandDims, Squeeze, Transpose...) is also
    one the real runtime accepts with the same numbers."""
    import onnx

    import tests.test_caffe2 as forms_module
    model, x = getattr(forms_module, forms)()
    path = str(tmp_path / "forms.onnx")
    onnx.save(model, path)
    _assert_real_matches(path, str(tmp_path / "caffe2"), x, caffe2_python)
