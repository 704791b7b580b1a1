"""The onnxruntime feature pipeline: inputs, alignment, parity with training, fast JPEG decoding,
provider fallback, the embed command, and running with torch blocked."""
import io
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.images import preprocess as reference_preprocess
from tests.conftest import ROOT
from tests.no_torch import BLOCK_TORCH

pytestmark = pytest.mark.slow  # an exported model and real sessions in every test

# ---------------------------------------------------------------------------------------------
# fixtures: a real exported small CNN, and JPEGs made from real photos

@pytest.fixture(scope="module")
def model_dir(exported_model, fmnist_small):
    """small_cnn (seeded random weights) exported by the export stage, with fp16 and int8."""
    return exported_model(fmnist_small, heads=[("specific", [f"c{i}" for i in range(10)])],
                          fp16=True, int8=True)


@pytest.fixture(scope="module")
def pipe(model_dir):
    from runtime import FeaturePipeline
    with FeaturePipeline(model_dir, device="cpu", batch_size=8) as p:
        yield p


def _photos():
    import matplotlib
    import sklearn.datasets
    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    paths = [os.path.join(folder, "china.jpg"), os.path.join(folder, "flower.jpg"),
             os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data",
                          "grace_hopper.jpg")]
    return [Image.open(p).convert("RGB") for p in paths]


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """Real photos cropped and resized to ~200x150 and ~500x375 JPEGs, plus the awkward kinds:
    grey, progressive, CMYK, EXIF-rotated."""
    out = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    photos = _photos()
    for i in range(12):
        img = photos[i % 3]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = [(200, 150), (150, 200), (500, 375)][i % 3]
        img.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC).save(
            out / f"photo{i:02d}.jpg", quality=90)
    base = photos[0].resize((240, 160), Image.BICUBIC)
    base.convert("L").save(out / "grey.jpg", quality=90)
    base.save(out / "progressive.jpg", quality=85, progressive=True)
    base.convert("CMYK").save(out / "cmyk.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    base.save(out / "rotated.jpg", quality=90, exif=exif.tobytes())
    return str(out)


def _reference_vectors(pipe, items):
    pre = pipe.preprocessing_
    return pipe.embed_arrays(np.stack([reference_preprocess(x, pre) for x in items]))


def _cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ---------------------------------------------------------------------------------------------
# inputs and alignment

def test_every_input_kind_matches_reference(pipe, fmnist_small):
    from runtime import EmbedResult, iter_inputs
    folder = os.path.join(fmnist_small, "test", "tops")
    files = sorted(str(p) for p in Path(folder).rglob("*.png"))
    first = files[0]
    with open(first, "rb") as f:
        raw = f.read()
    pil = Image.open(first)
    rgb = np.asarray(Image.open(first).convert("RGB"))
    grey = np.asarray(Image.open(first).convert("L"))
    assert grey.ndim == 2 and rgb.shape[2] == 3

    items = [first, Path(first), raw, pil, rgb, grey]
    result = pipe.embed(items)
    assert isinstance(result, EmbedResult)
    assert result.vectors.dtype == np.float32 and result.vectors.shape == (6, pipe.feature_dim_)
    assert result.errors == {} and result.ok.all()
    assert result.ids == [first, first, "#2", "#3", "#4", "#5"]
    expected = _reference_vectors(pipe, [first])[0]
    np.testing.assert_allclose(result.vectors, np.tile(expected, (6, 1)), rtol=1e-4, atol=1e-5)

    # a folder expands to its images, recursively and sorted; a generator streams
    by_folder = pipe.embed(folder)
    assert by_folder.ids == files and len(files) == 80
    np.testing.assert_allclose(by_folder.vectors, _reference_vectors(pipe, files),
                               rtol=1e-4, atol=1e-5)
    streamed = pipe.embed(p for p in files[:11])
    assert streamed.ids == files[:11]
    np.testing.assert_allclose(streamed.vectors, by_folder.vectors[:11], rtol=1e-4, atol=1e-5)
    # a single item, and an NxHxWxC array of images
    single = pipe.embed(raw)
    assert single.vectors.shape == (1, pipe.feature_dim_) and single.ids == ["#0"]
    stack = pipe.embed(np.stack([rgb, rgb]))
    np.testing.assert_allclose(stack.vectors, np.tile(expected, (2, 1)), rtol=1e-4, atol=1e-5)
    assert [i for i, _ in iter_inputs([folder, first])][-1] == first
    empty = pipe.embed([])
    assert empty.vectors.shape == (0, pipe.feature_dim_) and empty.ids == []


def test_bad_items_are_reported_and_rows_stay_aligned(pipe, fmnist_small, tmp_path):
    good = sorted(str(p) for p in Path(fmnist_small, "train").rglob("*.png"))[:4]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    truncated = tmp_path / "truncated.jpg"
    buf = io.BytesIO()
    _photos()[1].resize((120, 90)).save(buf, "JPEG", quality=90)
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    missing = str(tmp_path / "missing.png")
    items = [good[0], str(corrupt), good[1], missing, 42, b"junk bytes", good[2],
             str(truncated), np.zeros((4, 4, 7), np.uint8), good[3]]
    result = pipe.embed(items)  # batch_size 8: failures in both batches
    bad = {1, 3, 4, 5, 7, 8}
    assert set(result.errors) == bad
    assert result.ok.tolist() == [i not in bad for i in range(len(items))]
    assert np.isnan(result.vectors[sorted(bad)]).all()
    assert not np.isnan(result.vectors[result.ok]).any()
    np.testing.assert_allclose(result.vectors[result.ok], _reference_vectors(pipe, good),
                               rtol=1e-4, atol=1e-5)
    e = result.errors
    assert e[1].startswith(str(corrupt)) and "cannot decode" in e[1]
    assert e[3] == f"{missing}: file not found"
    assert e[4].startswith("#4") and "unsupported input type" in e[4]
    assert e[5].startswith("#5") and "not a known image format" in e[5]
    assert e[7].startswith(str(truncated)) and "cannot decode" in e[7]
    assert e[8].startswith("#8") and "HxWxC" in e[8]
    # streamed, each batch keys its errors by position within the batch
    batches = list(pipe.iter_batches(items))
    assert [len(b[0]) for b in batches] == [8, 2]
    assert set(batches[0][2]) == {1, 3, 4, 5, 7} and set(batches[1][2]) == {0}
    assert batches[1][2][0] == e[8]


def test_streaming_keeps_a_bounded_window(model_dir, fmnist_small):
    from runtime import FeaturePipeline
    files = sorted(str(p) for p in Path(fmnist_small, "test").rglob("*.png"))[:100]
    pulled = []

    def source():
        for f in files:
            pulled.append(f)
            yield f

    for workers in (0, 2, 3):
        pulled.clear()
        with FeaturePipeline(model_dir, device="cpu", batch_size=8, prefetch=2,
                             stream_workers=workers) as p:
            assert p.stream_workers_ == (0 if workers < 2 else workers)
            batches = p.iter_batches(source())
            ids, vectors, errors = next(batches)
            assert len(ids) == 8 and vectors.shape == (8, p.feature_dim_) and errors == {}
            # overlapped: the batch being inferred + 2 decoding; interleaved: one per worker
            # (at least prefetch + 1); never the whole stream
            assert len(pulled) <= max(3, workers) * 8, (workers, len(pulled))
            rest = list(batches)
        assert sum(len(b[0]) for b in rest) == 92 and len(pulled) == 100


def test_decode_workers_adapt_only_when_not_fixed(model_dir, jpeg_folder):
    """A tiny model waits for exact (PIL) decoding: an idle core should be lent to decoding."""
    from runtime import FeaturePipeline, available_cores
    jpegs = sorted(str(p) for p in Path(jpeg_folder).glob("*.jpg")) * 3
    cores = available_cores()
    with FeaturePipeline(model_dir, device="cpu", batch_size=4, fast_decode=False,
                         stream_workers=0) as p:
        # the model gets every core; one decode worker per 4 cores runs beside it
        assert p.threads_ == cores and p.decode_threads_ == max(1, min(8, cores // 4))
        seen = {p.decode_parallelism_}
        for _ in p.iter_batches(jpegs):
            seen.add(p.decode_parallelism_)
        assert p.decode_threads_ <= min(seen) and max(seen) <= cores
        if cores >= 2:
            assert max(seen) > p.decode_threads_, seen
    with FeaturePipeline(model_dir, device="cpu", batch_size=4, fast_decode=False,
                         decode_threads=1, stream_workers=0) as fixed:
        for _ in fixed.iter_batches(jpegs):
            assert fixed.decode_parallelism_ == 1


def test_interleaved_workers_match_the_overlapped_schedule(model_dir, jpeg_folder, fmnist_small):
    """CPU streams split between workers that decode then infer give the same rows, in order,
    with bad items in place, as one model thread fed by a decode pool; one batch goes to the
    session with every thread."""
    from runtime import FeaturePipeline
    files = sorted(str(p) for p in Path(fmnist_small, "test").rglob("*.png"))[:37]
    jpegs = sorted(str(p) for p in Path(jpeg_folder).glob("*.jpg"))
    items = files[:20] + ["missing.png"] + jpegs + [b"junk"] + files[20:]
    with FeaturePipeline(model_dir, device="cpu", batch_size=8, threads=2) as inter, \
            FeaturePipeline(model_dir, device="cpu", batch_size=8, threads=2,
                            stream_workers=0) as overlap:
        assert inter.stream_workers_ == 2 and inter.stream_threads_ == 1
        assert overlap.stream_workers_ == 0 and overlap.stream_threads_ == 0
        a, b = inter.embed(items), overlap.embed(items)
        assert a.ids == b.ids and a.errors == b.errors and set(a.errors) == {20, 21 + len(jpegs)}
        np.testing.assert_allclose(a.vectors[a.ok], b.vectors[b.ok], rtol=1e-5, atol=1e-6)
        assert np.isnan(a.vectors[~a.ok]).all()
        # the streamed batches keep their order and their errors keyed within the batch
        batches = list(inter.iter_batches(iter(items)))
        assert [len(x[0]) for x in batches] == [8] * (len(items) // 8) + [len(items) % 8]
        assert batches[2][2] == {4: a.errors[20]}
        # a single batch (and a single item) runs on the main session: same numbers
        one = inter.embed(items[:5])
        np.testing.assert_allclose(one.vectors, a.vectors[:5], rtol=1e-5, atol=1e-6)


def test_decode_processes_match_decode_threads(model_dir, jpeg_folder, fmnist_small, tmp_path):
    """Paths and bytes decoded in worker processes give the rows and errors of decode threads;
    PIL images, arrays and bad types still go through threads; a killed worker costs a restart,
    not the stream."""
    import signal

    from runtime import FeaturePipeline
    files = sorted(str(p) for p in Path(fmnist_small, "test").rglob("*.png"))[:9]
    jpegs = sorted(str(p) for p in Path(jpeg_folder).glob("*.jpg"))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(Path(jpegs[0]).read_bytes()[:3000])
    items = (files[:4] + ["missing.png", Image.open(files[4]), Path(jpegs[1]).read_bytes(),
             42, b"junk"] + jpegs + [str(truncated), np.zeros((40, 30, 3), np.uint8)] + files[4:])
    with FeaturePipeline(model_dir, device="cpu", batch_size=8, threads=2,
                         decode_processes=2) as procs, \
            FeaturePipeline(model_dir, device="cpu", batch_size=8, threads=2,
                            stream_workers=0) as threads:
        assert procs.decode_processes_ == 2 and procs.stream_workers_ == 0
        assert threads.decode_processes_ == 0  # the CPU default
        a, b = procs.embed(items), threads.embed(items)
        assert a.ids == b.ids and a.errors == b.errors
        bad = {4, 7, 8, 9 + len(jpegs)}
        assert set(a.errors) == bad, a.errors
        np.testing.assert_allclose(a.vectors[a.ok], b.vectors[b.ok], rtol=1e-5, atol=1e-6)
        assert np.isnan(a.vectors[~a.ok]).all()
        # a consumer that stops early leaves no worker writing into a batch in use
        first = next(iter(procs.iter_batches(items)))
        assert first[0] == a.ids[:8]
        np.testing.assert_allclose(procs.embed(items).vectors[a.ok], a.vectors[a.ok],
                                   rtol=1e-5, atol=1e-6)
        with FeaturePipeline(model_dir, device="cpu", batch_size=8, threads=2,
                             decode_processes=2, normalize_in_model=False) as floats:
            c = floats.embed(items)  # workers normalise into a float ring
            assert not floats.normalize_in_model_ and c.errors == a.errors
            np.testing.assert_allclose(c.vectors[c.ok], a.vectors[a.ok], rtol=1e-5, atol=1e-6)
        pids = procs._processes().start()
        assert len(pids) == 2 and os.getpid() not in pids
        os.kill(pids[0], signal.SIGKILL)
        # until the pool has noticed, a slice may fail as a whole: only those images, and only
        # until a fresh pool has started
        for _ in range(3):
            again = procs.embed(items)
            died = {k for k, m in again.errors.items() if "decode worker process died" in m}
            assert ({k: m for k, m in again.errors.items() if k not in died}
                    == {k: m for k, m in a.errors.items() if k not in died})
            np.testing.assert_allclose(again.vectors[again.ok], a.vectors[again.ok],
                                       rtol=1e-5, atol=1e-6)
            if not died:
                break
        assert not died and again.errors == a.errors


# ---------------------------------------------------------------------------------------------
# preprocessing

def test_preprocessing_matches_training_transform(model_dir, fmnist_small, jpeg_folder):
    from runtime import FeaturePipeline
    from runtime.decode import preprocess
    pngs = sorted(str(p) for p in Path(fmnist_small, "test").rglob("*.png"))[:5]
    jpegs = sorted(str(p) for p in Path(jpeg_folder).glob("*.jpg"))
    with FeaturePipeline(model_dir, device="cpu", fast_decode=False) as exact:
        pre = exact.preprocessing_
        in_memory = [Image.open(jpegs[0]), np.asarray(Image.open(pngs[0])),
                     open(jpegs[1], "rb").read()]
        items = pngs + jpegs + in_memory
        batch, errors = exact.preprocess(items)
        assert errors == {}
        reference = np.stack([reference_preprocess(x, pre) for x in items])
        assert batch.dtype == np.float32 and batch.shape == (len(items), 3, 32, 32)
        np.testing.assert_array_equal(batch, reference)  # identical, not close
    # the fast path leaves everything but JPEG files exactly as training did
    for x in pngs + in_memory[:2]:
        np.testing.assert_array_equal(preprocess(x, pre, fast=True), reference_preprocess(x, pre))


def test_fast_jpeg_path_within_tolerance(pipe, jpeg_folder):
    from runtime.decode import _simplejpeg_crop, exif_orientation, preprocess
    pre = pipe.preprocessing_
    jpegs = sorted(str(p) for p in Path(jpeg_folder).glob("*.jpg"))
    data = {os.path.basename(p): open(p, "rb").read() for p in jpegs}
    # libjpeg-turbo takes the plain ones; CMYK and rotated photos go through PIL
    assert _simplejpeg_crop(data["photo00.jpg"], pre) is not None
    assert _simplejpeg_crop(data["grey.jpg"], pre) is not None
    assert _simplejpeg_crop(data["progressive.jpg"], pre) is not None
    assert _simplejpeg_crop(data["cmyk.jpg"], pre) is None
    assert exif_orientation(data["rotated.jpg"]) == 6 and exif_orientation(data["grey.jpg"]) == 1
    assert _simplejpeg_crop(data["rotated.jpg"], pre) is None

    fast = np.stack([preprocess(p, pre, fast=True) for p in jpegs])
    exact = np.stack([reference_preprocess(p, pre) for p in jpegs])
    # libjpeg-turbo's RGBX output is seen by PIL as RGB without a copy (this Pillow allows it),
    # and the crop lands in the caller's buffer: the same pixels as a fresh array
    from runtime import decode
    assert decode._RGB_VIEW
    rgbx = np.random.default_rng(0).integers(0, 256, (7, 5, 4), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(decode._rgb_view(rgbx)), rgbx[..., :3])
    row = np.zeros((3,) + fast.shape[2:] + (3,), np.uint8)
    for p in jpegs[:2] + [data_path for data_path in jpegs if "cmyk" in data_path]:
        middle = row[1]
        assert decode.load_crop(p, pre, out=middle) is middle
        np.testing.assert_array_equal(row[1], decode.load_crop(p, pre))
    assert not row[0].any() and not row[2].any()
    grey_levels = np.abs(fast - exact).mean(axis=(1, 2, 3)) * 255 * np.mean(pre.std)
    assert grey_levels.max() < 2.5, dict(zip(map(os.path.basename, jpegs), grey_levels))
    assert grey_levels.mean() < 1.5
    cos = _cosine(pipe.embed_arrays(fast), pipe.embed_arrays(exact))
    assert cos.min() >= 0.99, cos
    # and through the whole pipeline (batched, threaded)
    end_to_end = pipe.embed(jpeg_folder)
    assert end_to_end.errors == {}
    assert _cosine(end_to_end.vectors, pipe.embed_arrays(exact)).min() >= 0.99


def test_uint8_front_is_bit_identical_to_numpy_normalisation(model_dir, jpeg_folder, tmp_path):
    """The graph front (uint8 NHWC -> normalised NCHW inside onnxruntime) gives the float model
    exactly the tensor NumPy's normalisation gives it, for every variant and a fused model."""
    import onnx
    import onnxruntime as ort

    from runtime import FeaturePipeline, NearestClassMeanProbe, fuse_probe, load_description
    from runtime.decode import load_crop, normalize_batch
    from runtime.prefix import INPUT_METADATA_KEY, PrefixError, add_uint8_front, uint8_input_model

    jpegs = sorted(str(p) for p in Path(jpeg_folder).glob("*.jpg"))
    with FeaturePipeline(model_dir, device="cpu", batch_size=8) as p:
        pre = p.preprocessing_
        crops = np.stack([load_crop(x, pre) for x in jpegs])
        floats = normalize_batch(crops, pre)
        # a probe on these photos, fused into the model: its outputs keep working too
        probe = NearestClassMeanProbe().fit(p.embed_arrays(floats),
                                            [i % 3 for i in range(len(jpegs))])
    fused = fuse_probe(model_dir, probe, str(tmp_path / "fused.onnx"))["path"]
    rng = np.random.default_rng(0)
    random_crops = rng.integers(0, 256, (5,) + crops.shape[1:], dtype=np.uint8)
    for path in [os.path.join(model_dir, f) for f in ("model.onnx", "model.fp16.onnx",
                                                      "model.int8.onnx")] + [fused]:
        front = uint8_input_model(path)
        session = ort.InferenceSession(front.model, providers=["CPUExecutionProvider"])
        plain = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        (image,) = session.get_inputs()
        assert image.name == "image" and image.type == "tensor(uint8)"
        assert image.shape[1:] == [32, 32, 3]
        meta = session.get_modelmeta().custom_metadata_map
        assert meta[INPUT_METADATA_KEY] == "uint8 NHWC"
        assert load_description(path, session).to_dict() == front.description.to_dict()
        names = [o.name for o in plain.get_outputs()]
        assert [o.name for o in session.get_outputs()] == names
        for batch in (crops, random_crops):
            got = session.run(names, {"image": batch})
            want = plain.run(names, {"image": normalize_batch(batch, pre)})
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w, err_msg=f"{path}")
    # a model taking something else is refused with the reason (the pipeline then uses NumPy)
    model = onnx.load(os.path.join(model_dir, "model.onnx"))
    add_uint8_front(model, pre.mean, pre.std, 32)
    with pytest.raises(PrefixError, match="not float"):
        add_uint8_front(model, pre.mean, pre.std, 32)
    with pytest.raises(PrefixError, match="not \\(N, 3, 64, 64\\)"):
        add_uint8_front(onnx.load(os.path.join(model_dir, "model.onnx")), pre.mean, pre.std, 64)


def test_pipeline_with_and_without_the_front_agree(model_dir, jpeg_folder, fmnist_small):
    from runtime import FeaturePipeline
    items = sorted(str(p) for p in Path(jpeg_folder).glob("*.jpg")) + sorted(
        str(p) for p in Path(fmnist_small, "test").rglob("*.png"))[:10] + ["missing.jpg"]
    for variant in ("fp32", "int8"):
        with FeaturePipeline(model_dir, device="cpu", batch_size=8, variant=variant) as front, \
                FeaturePipeline(model_dir, device="cpu", batch_size=8, variant=variant,
                                normalize_in_model=False) as numpy_path:
            assert front.normalize_in_model_ and not numpy_path.normalize_in_model_
            assert front.batch_shape_ == (32, 32, 3) and numpy_path.batch_shape_ == (3, 32, 32)
            assert numpy_path.float_session_ is numpy_path.session_
            a, b = front.embed(items), numpy_path.embed(items)
            assert a.ids == b.ids and a.errors == b.errors and list(a.errors) == [len(items) - 1]
            np.testing.assert_array_equal(a.vectors, b.vectors)
            # preprocess() and embed_arrays() keep their float NCHW contract
            arrays, errors = front.preprocess(items)
            arrays_b, _ = numpy_path.preprocess(items)
            assert arrays.dtype == np.float32 and arrays.shape == (len(items) - 1, 3, 32, 32)
            np.testing.assert_array_equal(arrays, arrays_b)
            np.testing.assert_array_equal(front.embed_arrays(arrays), a.vectors[a.ok])
            assert front.float_session_ is not front.session_


# ---------------------------------------------------------------------------------------------
# providers, variants, caches

def test_provider_fallback_is_reported(model_dir, fmnist_small):
    from runtime import FeaturePipeline, ProviderFallbackWarning, cuda_device_count
    if cuda_device_count()[0] > 0:
        pytest.skip("a CUDA device is present: no fallback to observe")
    with pytest.warns(ProviderFallbackWarning, match="asked for cuda .* running on CPU"):
        p = FeaturePipeline(model_dir, device="cuda", batch_size=4)
    assert p.provider_ == "CPUExecutionProvider" and p.fell_back_
    assert "CUDA" in p.fallback_reason_
    files = sorted(str(x) for x in Path(fmnist_small, "test").rglob("*.png"))[:5]
    assert p.embed(files).ok.all()  # and it still works
    p.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProviderFallbackWarning)  # auto: expected, no warning
        auto = FeaturePipeline(model_dir, device="auto")
    assert auto.provider_ == "CPUExecutionProvider" and auto.fell_back_
    assert auto.threads_ + auto.decode_threads_ >= 2


def test_variants_agree_with_fp32(pipe, model_dir, fmnist_small):
    from runtime import FeaturePipeline
    files = sorted(str(x) for x in Path(fmnist_small, "test").rglob("*.png"))[::4]
    fp32 = pipe.embed(files).vectors
    for variant, floor in (("fp16", 0.999), ("int8", 0.99)):
        with FeaturePipeline(model_dir, device="cpu", variant=variant) as p:
            assert p.model_path_.endswith(f"model.{variant}.onnx")
            assert p.description_.architecture == "small_cnn"
            vectors = p.embed(files).vectors
        assert vectors.dtype == np.float32 and vectors.shape == fp32.shape
        assert _cosine(vectors, fp32).min() >= floor, variant


def test_model_errors_and_options(model_dir, fmnist_small, tmp_path):
    import shutil

    from runtime import FeaturePipeline
    only_fp32 = tmp_path / "only_fp32"
    only_fp32.mkdir()
    shutil.copy(os.path.join(model_dir, "model.onnx"), only_fp32)
    with pytest.raises(FileNotFoundError, match=r"no model.int8.onnx for variant 'int8' "
                                                r"\(variants here: fp32\)"):
        FeaturePipeline(str(only_fp32), variant="int8")
    # the description travels inside the ONNX file: no description.json needed
    assert FeaturePipeline(str(only_fp32), device="cpu").description_.architecture == "small_cnn"
    with pytest.raises(ValueError, match="unknown device"):
        FeaturePipeline(model_dir, device="tpu")
    with pytest.raises(ValueError, match="no output 'logits'"):
        FeaturePipeline(model_dir, output="logits")
    files = sorted(str(x) for x in Path(fmnist_small, "test").rglob("*.png"))[:6]
    first = FeaturePipeline(model_dir, device="cpu", cache_optimized=True,
                            cache_dir=str(tmp_path / "cache"), threads=1, decode_threads=1)
    assert first.optimized_model_ and os.path.exists(first.optimized_model_)
    again = FeaturePipeline(model_dir, device="cpu", cache_optimized=True,
                            cache_dir=str(tmp_path / "cache"))
    assert again.optimized_model_ == first.optimized_model_
    assert again.description_.architecture == "small_cnn"
    np.testing.assert_allclose(again.embed(files).vectors, first.embed(files).vectors, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected an array of shape \(N, 3, 32, 32\)"):
        first.embed_arrays(np.zeros((2, 3, 16, 16), np.float32))
    assert first.embed_arrays(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, 256)
    first.close()
    again.close()


def test_bucketed_iobinding_runner(pipe):
    """The GPU path's IOBinding + batch-size buckets, run on CPU OrtValues (no GPU here)."""
    from runtime.pipeline import _DeviceRunner, bucket_sizes
    assert bucket_sizes(32) == [1, 2, 4, 8, 16, 32] and bucket_sizes(24) == [1, 2, 4, 8, 16, 24]
    runner = _DeviceRunner(pipe.float_session_, pipe.input_name_, "embedding",
                           pipe.input_shape_, pipe.feature_dim_, [1, 2, 4, 8], 0, False,
                           np.float32, np.float32, device_type="cpu")
    rng = np.random.default_rng(0)
    for n in (1, 3, 5, 8, 11):
        x = rng.standard_normal((n,) + pipe.input_shape_).astype(np.float32)
        expected = pipe.float_session_.run(["embedding"], {"image": x})[0]
        np.testing.assert_allclose(runner.run(x), expected, rtol=1e-4, atol=1e-5)
    assert sorted(runner.slots) == [1, 4, 8]  # 3 and 5 padded to buckets, 11 = 8 + 3 -> 4
    # the uint8 front binds SxSx3 uint8 buffers
    assert pipe.normalize_in_model_ and pipe.batch_shape_ == (32, 32, 3)
    runner = _DeviceRunner(pipe.session_, pipe.input_name_, "embedding", pipe.batch_shape_,
                           pipe.feature_dim_, [1, 2, 4, 8], 0, False, np.uint8, np.float32,
                           device_type="cpu")
    for n in (3, 8):
        crops = rng.integers(0, 256, (n,) + pipe.batch_shape_, dtype=np.uint8)
        expected = pipe.session_.run(["embedding"], {"image": crops})[0]
        np.testing.assert_array_equal(runner.run(crops), expected)


# ---------------------------------------------------------------------------------------------
# the embed command, and the runtime with torch blocked

def test_embed_cli_end_to_end(model_dir, fmnist_small, jpeg_folder, tmp_path):
    from click.testing import CliRunner
    sys.path.insert(0, ROOT)
    import cli
    listed = sorted(str(p) for p in Path(jpeg_folder).glob("photo*.jpg"))[:3]
    list_file = tmp_path / "list.txt"
    list_file.write_text("# three photos and a missing file\n" + "\n".join(
        os.path.relpath(p, tmp_path) for p in listed) + "\nnot_there.jpg\n\n")
    out = tmp_path / "feats" / "features.npy"
    result = CliRunner().invoke(cli.main, [
        "embed", model_dir, jpeg_folder, f"@{list_file}", "fashion-mnist:per_class=20",
        "--out", str(out), "--device", "cpu", "--batch-size", "16", "--threads", "1"])
    assert result.exit_code == 0, result.output
    features = np.load(out)
    ids = json.loads((tmp_path / "feats" / "features.ids.json").read_text())
    errors = json.loads((tmp_path / "feats" / "features.errors.json").read_text())
    n_jpegs = len(list(Path(jpeg_folder).glob("*.jpg")))
    assert features.dtype == np.float32 and features.shape == (n_jpegs + 4 + 400, 256)
    assert len(ids) == len(features)
    missing_row = n_jpegs + 3
    assert ids[missing_row].endswith("not_there.jpg") and list(errors) == [str(missing_row)]
    assert "file not found" in errors[str(missing_row)]
    assert np.isnan(features[missing_row]).all()
    assert np.isfinite(np.delete(features, missing_row, axis=0)).all()
    assert ids[n_jpegs + 4].startswith("train/") and ids[-1].startswith("test/")
    assert all(not os.path.isabs(i) for i in ids[n_jpegs + 4:])
    assert "1 failed" in result.output and "file not found" in result.output
    # rows match the library on the same files
    with_lib = CliRunner().invoke(cli.main, ["embed", model_dir, listed[0], "--out",
                                             str(tmp_path / "one.npy"), "--device", "cpu"])
    assert with_lib.exit_code == 0, with_lib.output
    np.testing.assert_allclose(np.load(tmp_path / "one.npy")[0], features[ids.index(listed[0])],
                               rtol=1e-4, atol=1e-5)
    # every item failing is an error; a bad --out is a usage error
    failed = CliRunner().invoke(cli.main, ["embed", model_dir, str(tmp_path / "nope.png"),
                                           "--out", str(tmp_path / "x.npy")])
    assert failed.exit_code == 1 and "all 1 images failed" in failed.output
    usage = CliRunner().invoke(cli.main, ["embed", model_dir, jpeg_folder, "--out", "x.csv"])
    assert usage.exit_code == 2 and "must end in .npy" in usage.output


NO_TORCH = BLOCK_TORCH + textwrap.dedent("""
    import importlib, json, os, pkgutil
    import runtime
    # every module of the runtime, sub-packages included, imports without torch
    modules = sorted(m.name[len("runtime."):] for m in
                     pkgutil.walk_packages(runtime.__path__, prefix="runtime."))
    for m in modules:
        importlib.import_module("runtime." + m)
    from runtime import FeaturePipeline
    p = FeaturePipeline(sys.argv[2], device="auto", batch_size=4)
    # a folder among items would be one error row: expand it (rows == inputs)
    items = [*runtime.iter_folder(sys.argv[3]), open(sys.argv[4], "rb").read(), "missing.png"]
    r = p.embed(items)
    import numpy as np
    with FeaturePipeline(sys.argv[2], device="cpu", batch_size=4, decode_processes=2) as pp:
        r2 = pp.embed(items)
    procs_same = (sorted(r2.errors) == sorted(r.errors)
                  and bool(np.allclose(r2.vectors[r2.ok], r.vectors[r.ok], atol=1e-5)))
    from click.testing import CliRunner
    import cli
    out = os.path.join(sys.argv[5], "f.npy")
    cli_result = CliRunner().invoke(cli.main, ["embed", sys.argv[2], sys.argv[3], "--out", out])
    print(json.dumps({"modules": modules, "shape": list(r.vectors.shape), "errors": len(r.errors),
                      "ok": r.ok.tolist(), "cli": cli_result.exit_code,
                      "cli_output": cli_result.output, "procs_same": procs_same,
                      "torch_loaded": any(k.split(".")[0] == "torch" for k in sys.modules)}))
""")


def test_runtime_works_with_torch_blocked(model_dir, jpeg_folder, tmp_path):
    jpeg = sorted(Path(jpeg_folder).glob("photo*.jpg"))[0]
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, ROOT, model_dir, jpeg_folder,
                           str(jpeg), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"pipeline", "decode", "providers", "cli", "cli.embed", "probes.linear",
            "evaluation.run", "service.app"} <= set(report["modules"])
    n = len(list(Path(jpeg_folder).glob("*.jpg")))
    assert report["shape"] == [n + 2, 256] and report["errors"] == 1
    assert report["ok"] == [True] * (n + 1) + [False]
    assert report["cli"] == 0, report["cli_output"]
    assert report["torch_loaded"] is False
    assert report["procs_same"] is True  # decode worker processes need no torch either
