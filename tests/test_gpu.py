"""GPU decoding, TensorRT set-up and fidelity: the CPU side here, the GPU side when one exists.

On the CPU: the resampling reference the kernels mirror is bit-exact with Pillow on real
photos; the packed per-image tables drive the kernel's indexing to the same pixels; asking for
GPU decoding without a GPU warns and decodes on the CPU with aligned rows; TensorRT's libraries
are found in a tensorrt_libs folder and loaded core first, and a missing TensorRT falls back
with the reason. With a CUDA device, cupy and nvImageCodec: the kernels are bit-exact with the
reference and the GPU path meets the fidelity bound."""
import io
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT


def _photos():
    from benchmarks.corpus import source_photos
    return {name: Image.open(path).convert("RGB") for name, path in source_photos().items()}


def _gpu_decode_ready():
    from runtime.gpu.decoder import gpu_decode_available
    return gpu_decode_available()


GPU_OK, GPU_WHY = _gpu_decode_ready()
needs_gpu = pytest.mark.skipif(not GPU_OK, reason=f"needs a CUDA device, cupy and nvImageCodec: "
                                                  f"{GPU_WHY}")


@pytest.fixture(scope="module")
def model_dir(exported_model, digits_small):
    """small_cnn (seeded random weights) exported by the export stage (digits: they ship with
    scikit-learn, so this also runs on a GPU machine without the dataset cache)."""
    return exported_model(digits_small, heads=[("specific", [f"c{i}" for i in range(10)])])


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """Real photos as JPEG files of several shapes (landscape, portrait, tall, small)."""
    out = tmp_path_factory.mktemp("gpu-jpegs")
    paths = []
    for name, photo in _photos().items():
        for w, h in ((500, 375), (300, 640), (90, 60)):
            path = out / f"{name}-{w}x{h}.jpg"
            photo.resize((w, h), Image.BICUBIC).save(path, "JPEG", quality=90)
            paths.append(str(path))
    return paths


# ---------------------------------------------------------------------------------------------
# imports and the reference

def test_gpu_modules_import_without_a_gpu_and_stay_off_the_core_path():
    code = textwrap.dedent("""
        import sys
        import runtime
        from runtime import FeaturePipeline
        assert not any(m.startswith("runtime.gpu") for m in sys.modules), "runtime.gpu loaded"
        import runtime.gpu.decoder, runtime.gpu.fidelity
        import runtime.gpu.kernels, runtime.gpu.resample, runtime.gpu.tensorrt
        heavy = [m for m in ("cupy", "torch", "nvidia.nvimgcodec") if m in sys.modules]
        assert not heavy, heavy
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("kind", ["bilinear", "bicubic"])
def test_resample_reference_is_bit_exact_with_pillow(kind):
    """Landscape, portrait, tall (the other pass order), square, up- and downscaling."""
    from common.description import Preprocessing
    from common.images import resize_and_crop
    from runtime.gpu.resample import plan_window, resize_crop
    shapes = [(500, 375), (375, 500), (300, 640), (180, 700), (333, 333), (90, 60), (41, 97)]
    checked = 0
    for photo in _photos().values():
        for w, h in shapes:
            img = photo.resize((w, h), Image.BICUBIC)
            for resize, crop in ((256, 224), (36, 32), (64, 64)):
                pre = Preprocessing(input_size=crop, resize_size=resize, interpolation=kind)
                expected = np.asarray(resize_and_crop(img, pre))
                got = resize_crop(np.asarray(img), resize, crop, kind)
                assert got.shape == (crop, crop, 3)
                assert np.array_equal(got, expected), (w, h, resize, crop)
                checked += 1
    assert checked == 3 * len(shapes) * 3
    assert plan_window(300, 640, 256, 224, kind).vertical_first
    assert not plan_window(500, 375, 256, 224, kind).vertical_first
    with pytest.raises(ValueError, match="smaller than"):  # the reference pads: CPU path
        plan_window(100, 100, 32, 64, kind)


def test_packed_tables_drive_the_kernel_indexing_to_the_reference_pixels():
    """One launch's tables for a mixed batch (both pass orders), executed as the kernel
    indexes them, give each image's reference crop."""
    from runtime.gpu import kernels as K
    from runtime.gpu.resample import plan_window, run_pass
    photos = list(_photos().values())
    images = [np.ascontiguousarray(np.asarray(photos[k % len(photos)].resize(size)))
              for k, size in enumerate([(500, 375), (300, 640), (256, 300), (120, 90)])]
    plans = [plan_window(im.shape[1], im.shape[0], 256, 224, "bilinear") for im in images]
    assert {p.vertical_first for p in plans} == {True, False}
    tables = K.pack_pass([p.first for p in plans])
    temps = K.emulate_pass(images, *tables)
    crops = K.emulate_pass(temps, *K.pack_pass([p.second for p in plans]))
    for image, plan, crop in zip(images, plans, crops):
        assert np.array_equal(crop, run_pass(run_pass(image, plan.first), plan.second))
    assert "resample_pass" in K.KERNEL_SOURCE and "22" in K.KERNEL_SOURCE


def test_jpeg_header_components():
    from runtime.gpu.decoder import jpeg_components
    photo = next(iter(_photos().values())).resize((64, 48))

    def jpeg(img, **kw):
        buf = io.BytesIO()
        img.save(buf, "JPEG", **kw)
        return buf.getvalue()
    assert jpeg_components(jpeg(photo)) == 3
    assert jpeg_components(jpeg(photo, progressive=True)) == 3
    assert jpeg_components(jpeg(photo.convert("L"))) == 1
    assert jpeg_components(jpeg(photo.convert("CMYK"))) == 4
    assert jpeg_components(b"\xff\xd8\xff\xe0\x00") is None
    assert jpeg_components(b"not a jpeg at all") is None


# ---------------------------------------------------------------------------------------------
# asking for GPU decoding without a GPU

@pytest.mark.skipif(GPU_OK, reason="this machine can decode on the GPU")
def test_gpu_decode_without_a_gpu_warns_and_keeps_rows_aligned(model_dir, jpegs):
    from runtime import FeaturePipeline
    from runtime.gpu.decoder import GpuDecodeFallbackWarning, GpuDecoder, GpuUnavailable
    with pytest.warns(GpuDecodeFallbackWarning, match="decoding on the CPU"):
        pipe = FeaturePipeline(model_dir, device="cpu", batch_size=4, decode="gpu")
    assert pipe.decode_backend_ == "cpu" and pipe.decode_fallback_reason_
    items = [jpegs[0], b"not an image", jpegs[1], "/no/such/file.jpg", jpegs[2]]
    got = pipe.embed(items)
    ref = FeaturePipeline(model_dir, device="cpu", batch_size=4).embed(items)
    assert sorted(got.errors) == [1, 3]
    assert "/no/such/file.jpg" in got.errors[3]
    assert np.isnan(got.vectors[[1, 3]]).all()
    np.testing.assert_array_equal(got.vectors[[0, 2, 4]], ref.vectors[[0, 2, 4]])
    with pytest.raises(GpuUnavailable):
        GpuDecoder(pipe.preprocessing_)
    with pytest.raises(ValueError, match="unknown decode mode"):
        FeaturePipeline(model_dir, device="cpu", decode="nvjpeg")


# ---------------------------------------------------------------------------------------------
# TensorRT library set-up

def _fake_tensorrt(root):
    folder = root / "site-packages" / "tensorrt_libs"
    folder.mkdir(parents=True)
    for name in ("libnvonnxparser.so.10", "libnvinfer_plugin.so.10", "libnvinfer.so.10",
                 "libnvinfer_builder_resource.so.10.14.1", "libnvinfer_lean.so.10"):
        (folder / name).write_bytes(b"")
    return str(root / "site-packages"), str(folder)


def test_tensorrt_libraries_found_and_loaded_core_first(tmp_path, monkeypatch):
    from runtime.gpu import tensorrt as T
    site_dir, folder = _fake_tensorrt(tmp_path)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/other")
    assert T.find_tensorrt_libs([str(tmp_path / "elsewhere"), site_dir]) == folder
    loaded = []
    ok, where = T.preload_tensorrt([site_dir], loader=loaded.append)
    assert ok and where == folder
    names = [os.path.basename(p) for p in loaded]
    assert names[0] == "libnvinfer.so.10"
    assert names.index("libnvinfer_builder_resource.so.10.14.1") < names.index(
        "libnvinfer_plugin.so.10") < names.index("libnvonnxparser.so.10")
    assert len(names) == 5
    assert os.environ["LD_LIBRARY_PATH"].split(os.pathsep) == [folder, "/opt/other"]


def test_tensorrt_missing_or_broken_says_why(tmp_path):
    from runtime.gpu import tensorrt as T
    ok, why = T.preload_tensorrt([str(tmp_path)], loader=lambda p: None)
    assert not ok
    assert why == "libnvinfer.so.10 not found (pip install tensorrt-cu13-libs==10.x)"
    site_dir, _ = _fake_tensorrt(tmp_path)

    def refuse(path):
        raise OSError("libcudart.so.13: cannot open shared object file")
    ok, why = T.preload_tensorrt([site_dir], loader=refuse)
    assert not ok and "libnvinfer.so.10 does not load" in why and "libcudart" in why


def test_tensorrt_options_caches_fp16_int8(tmp_path):
    from runtime.gpu.tensorrt import engine_files, tensorrt_options
    cache = str(tmp_path / "trt")
    opts = tensorrt_options(cache, int8=True)
    assert opts["trt_int8_enable"] == "True" and opts["trt_fp16_enable"] == "True"
    assert opts["trt_engine_cache_path"] == cache == opts["trt_timing_cache_path"]
    assert opts["trt_engine_cache_enable"] == "True" and os.path.isdir(cache)
    assert tensorrt_options(None, fp16=True)["trt_int8_enable"] == "False"
    (tmp_path / "trt" / "m_123.engine").write_bytes(b"x")
    assert [os.path.basename(p) for p in engine_files(cache)] == ["m_123.engine"]


def test_tensorrt_asked_without_it_falls_back_with_the_reason(model_dir):
    from runtime import FeaturePipeline
    from runtime.gpu.tensorrt import preload_tensorrt
    if preload_tensorrt()[0]:
        pytest.skip("TensorRT loads on this machine")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        pipe = FeaturePipeline(model_dir, device="tensorrt", batch_size=4)
    assert pipe.fell_back_ and pipe.provider_ != "TensorrtExecutionProvider"
    assert "libnvinfer.so.10 not found (pip install tensorrt-cu13-libs==10.x)" in \
        pipe.fallback_reason_


# ---------------------------------------------------------------------------------------------
# fidelity

@pytest.mark.slow
def test_fidelity_of_the_fast_cpu_decode_against_the_exact_path(model_dir):
    from benchmarks.jpeg_target import labelled_jpegs
    from runtime import FeaturePipeline
    from runtime.gpu.fidelity import compare, measure_fidelity
    items, labels = labelled_jpegs("digits", per_class=40, size=160)
    assert len(items) == 400 and len(np.unique(labels)) == 10
    exact = FeaturePipeline(model_dir, device="cpu", fast_decode=False)
    fast = FeaturePipeline(model_dir, device="cpu", fast_decode=True)
    report = measure_fidelity(fast, exact, items, labels)
    assert report["images"] == 400 and report["failed_candidate"] == 0
    assert 0.999 < report["cosine_mean"] <= 1.0 + 1e-9
    assert report["cosine_min"] <= report["cosine_mean"]
    assert report["accuracy_reference"] > 0.3  # a real target, far above 10% chance
    same = measure_fidelity(exact, exact, items[:100], labels[:100])
    assert same["cosine_min"] > 0.999999 and same["accuracy_change_points"] == 0.0
    assert same["within_bound"]
    vectors = exact.embed(items[:100]).vectors
    noisy = vectors + np.random.default_rng(0).normal(0, vectors.std(), vectors.shape)
    assert not compare(noisy.astype(np.float32), vectors, labels[:100])["within_bound"]


# ---------------------------------------------------------------------------------------------
# on a GPU

@needs_gpu
def test_gpu_kernels_match_the_reference_bit_for_bit(jpegs):
    import cupy

    from runtime.gpu import kernels as K
    from runtime.gpu.resample import plan_window, run_pass
    images = [np.ascontiguousarray(np.asarray(Image.open(p).convert("RGB"))) for p in jpegs]
    plans = [plan_window(im.shape[1], im.shape[0], 72, 64, "bicubic") for im in images]
    srcs = [cupy.asarray(im) for im in images]
    temps = [cupy.zeros((p.first.rows, p.first.cols, 3), cupy.uint8) for p in plans]
    out = cupy.zeros((len(images), 64, 64, 3), cupy.uint8)
    for which, ins, outs in (("first", srcs, temps), ("second", temps, list(out))):
        params, *tables = K.pack_pass([getattr(p, which) for p in plans])
        for i, (s, d) in enumerate(zip(ins, outs)):
            params[i, [K.SRC, K.SRC_PITCH, K.DST, K.DST_PITCH]] = (
                s.data.ptr, s.strides[0], d.data.ptr, d.strides[0])
        K.launch_pass(params, *tables)
    cupy.cuda.Device().synchronize()
    got = cupy.asnumpy(out)
    for k, (im, plan) in enumerate(zip(images, plans)):
        assert np.array_equal(got[k], run_pass(run_pass(im, plan.first), plan.second))


@needs_gpu
def test_gpu_decode_fidelity_and_alignment(model_dir, jpegs):
    from benchmarks.jpeg_target import labelled_jpegs
    from runtime import FeaturePipeline
    from runtime.gpu.fidelity import measure_fidelity
    gpu = FeaturePipeline(model_dir, device="cuda", batch_size=32, decode="gpu")
    assert gpu.decode_backend_ == "gpu"
    exact = FeaturePipeline(model_dir, device="cuda", batch_size=32, fast_decode=False)
    items, labels = labelled_jpegs("digits", per_class=40, size=160)
    report = measure_fidelity(gpu, exact, items, labels)
    assert report["cosine_mean"] >= 0.999
    assert abs(report["accuracy_change_points"]) <= 0.5  # 200 test images: 1 image = 0.5
    mixed = gpu.embed([jpegs[0], b"not an image", jpegs[1]])
    alone = gpu.embed([jpegs[0], jpegs[1]])
    assert list(mixed.errors) == [1] and np.isnan(mixed.vectors[1]).all()
    np.testing.assert_allclose(mixed.vectors[[0, 2]], alone.vectors, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the device check script

def _checkout_files():
    """{path: (size, mtime)} of every file in the checkout but Git's and Python's own caches."""
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
    found = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                st = os.stat(path)
                found[os.path.relpath(path, ROOT)] = (st.st_size, st.st_mtime_ns)
    return found


def _device_check(args, env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("DEVICE_CHECK_OUT", "DEVICE_CHECK_WORK", "OUT")}
    return subprocess.run(["bash", "scripts/device_check.sh", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(base, PYTHON=sys.executable, **env))


@pytest.mark.slow
def test_device_check_dry_run_skips_gpu_stages_and_writes_nowhere_in_the_checkout(tmp_path):
    """The CPU dry run of scripts/device_check.sh: the GPU stages skipped with their reason,
    the rest run; results and work files in a temporary folder, none in the checkout (its
    docs/gpu/ keeps the committed figures). Then a rerun of one stage into $DEVICE_CHECK_OUT,
    reusing the export."""
    import json
    if GPU_OK:
        pytest.skip("a GPU is present: the dry run is for CPU machines")
    before = _checkout_files()
    done = _device_check(["--arch", "small_cnn", "--images", "16", "--batch-size", "8",
                          "--repeats", "1", "--no-int8", "--target-per-class", "6",
                          "--target-size", "48"], {"TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    results = done.stdout.strip().splitlines()[-1].removeprefix("results: ")
    assert results.startswith(str(tmp_path)) and results.endswith("device-check-small_cnn.json")
    assert _checkout_files() == before
    report = json.loads(open(results).read())
    stages = report["stages"]
    assert [k for k, v in stages.items() if v["status"] == "ok"] == [
        "env", "model", "model_only", "end_to_end", "fidelity"]
    for name in ("kernels", "alignment", "tensorrt"):
        assert stages[name]["status"] == "skipped" and stages[name]["reason"]
    assert stages["env"]["gpu_decode"] is False and stages["env"]["gpu_decode_reason"]
    assert stages["fidelity"]["gpu_decode"]["reason"] == "no CUDA device"
    assert stages["fidelity"]["fast_cpu_decode"]["cosine_mean"] > 0.999
    assert stages["end_to_end"]["figures"]["decode_threads"]["images"] == 16
    # on the CPU, decode_processes=0 leaves the CPU's default: interleaved streams
    assert stages["end_to_end"]["schedules"] == {"decode_processes": "processes",
                                                 "decode_threads": "interleaved"}
    assert os.path.exists(results[:-len(".json")] + ".log")
    out = tmp_path / "chosen"
    again = _device_check(["--arch", "small_cnn", "--images", "16", "--batch-size", "8",
                           "--stages", "env"], {"TMPDIR": str(tmp_path),
                                                "DEVICE_CHECK_OUT": str(out)})
    assert again.returncode == 0, again.stderr[-3000:]
    stages = json.loads((out / "device-check-small_cnn.json").read_text())["stages"]
    assert stages["model"]["status"] == "ok" and stages["model"]["seconds"] < 60  # reused
    assert stages["fidelity"] == {"status": "skipped", "reason": "not in --stages"}
    wrong = _device_check(["--stages", "env,warp"], {"TMPDIR": str(tmp_path)})
    assert wrong.returncode == 2 and "unknown stages warp" in wrong.stderr
    assert _checkout_files() == before


def test_device_scripts_parse_and_name_no_checkout_folder_for_results():
    """The device-machine scripts are valid bash, and none writes results into docs/gpu/."""
    scripts = [os.path.join(ROOT, "scripts", "device_check.sh")] + [
        os.path.join(ROOT, "scripts", "gpu_carry", n) for n in ("go.sh", "pack.sh", "unpack.sh")]
    for path in scripts:
        done = subprocess.run(["bash", "-n", path], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (path, done.stderr)
        text = open(path).read()
        assert "docs/gpu/device-check" not in text and "cp docs/gpu" not in text, path
    go = open(scripts[1]).read()
    assert "DEVICE_CHECK_OUT=$OUT" in go
