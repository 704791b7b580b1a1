"""GPU decoding as one more schedule, tested on the CPU: runtime.schedules.GpuDecode with a
decoder that keeps the GPU decoder's contract but writes host arrays, through the engine's
device runner bound to those arrays (Engine.bound, run here on CPU memory with the exact
IOBinding code a GPU runs). Its rows equal the CPU schedule's rows, bad items keep their rows
with the CPU's wording, rows the model made non-finite are refused the same way; the resolver
grants GPU decoding only where the session, the uint8 front and the libraries allow, and says
why otherwise; a decoder that will not start falls back with its reason."""
import io
import sys
import threading
import types
import warnings
from itertools import islice

import numpy as np
import pytest
from PIL import Image


def _photos():
    from benchmarks.corpus import source_photos
    return {name: Image.open(path).convert("RGB") for name, path in source_photos().items()}


def _model_folder(folder, *, log: bool):
    """A real ONNX model with its description, built here (no export, so the test is quick):
    a seeded 3x3 convolution, ReLU and global pooling (8-d), or, with `log`, the log of each
    channel's mean (NaN for images darker than mid-grey after normalisation)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from common.description import ModelDescription, Preprocessing
    folder.mkdir()
    if log:
        nodes = [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
                 helper.make_node("Flatten", ["pooled"], ["flat"]),
                 helper.make_node("Log", ["flat"], ["embedding"])]
        inits, dim = [], 3
    else:
        weight = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
        nodes = [helper.make_node("Conv", ["image", "w"], ["conv"], pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["conv"], ["act"]),
                 helper.make_node("GlobalAveragePool", ["act"], ["pooled"]),
                 helper.make_node("Flatten", ["pooled"], ["embedding"])]
        inits, dim = [numpy_helper.from_array(weight, "w")], 8
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                      ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    desc = ModelDescription(architecture="tiny", feature_dim=dim,
                            preprocessing=Preprocessing(input_size=32, resize_size=36))
    (folder / "description.json").write_text(desc.to_json())
    return str(folder)


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory):
    return _model_folder(tmp_path_factory.mktemp("gpu-schedule") / "conv", log=False)


@pytest.fixture(scope="module")
def log_model(tmp_path_factory):
    return _model_folder(tmp_path_factory.mktemp("gpu-schedule") / "log", log=True)


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """Real photos as JPEG files, JPEG bytes, a PNG, a PIL image, and every kind of bad item:
    corrupt bytes, a corrupt file, a missing file, a folder inside a list."""
    out = tmp_path_factory.mktemp("gpu-items")
    good = []
    for name, photo in _photos().items():
        for w, h in ((500, 375), (300, 640), (90, 60)):
            path = out / f"{name}-{w}x{h}.jpg"
            photo.resize((w, h), Image.BICUBIC).save(path, "JPEG", quality=90)
            good.append(str(path))
    photo = next(iter(_photos().values()))
    buf = io.BytesIO()
    photo.resize((200, 150)).save(buf, "JPEG", quality=85)
    png = out / "photo.png"
    photo.resize((120, 160)).save(png)
    corrupt = out / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    (out / "a-folder").mkdir()
    return [good[0], b"not an image", good[1], str(out / "missing.jpg"), buf.getvalue(),
            good[2], str(corrupt), str(png), photo.resize((70, 50)), str(out / "a-folder")
            ] + good[3:]


class HostDecoder:
    """The GPU decoder's contract (new_batch, decode -> {k: '<item>: <cause>'}) with host
    arrays and the CPU's exact transform: what GpuDecode needs from runtime.gpu, without one."""

    def __init__(self, pre):
        self.pre, self.made, self.calls = pre, [], 0
        self.threads: set[int] = set()
        self.stats = {"gpu": 0, "cpu": 0, "failed": 0}  # as GpuDecoder counts them

    def new_batch(self, size):
        batch = np.zeros((size, self.pre.input_size, self.pre.input_size, 3), np.uint8)
        self.made.append(size)
        return batch

    def decode(self, items, out):
        from common.images import ImageDecodeError
        from runtime.decode import load_crop
        self.calls += 1
        self.threads.add(threading.get_ident())
        errors = {}
        for k, item in enumerate(items):
            try:
                load_crop(item, self.pre, fast=False, out=out[k])
            except ImageDecodeError as e:
                errors[k] = str(e)
        self.stats["cpu"] += len(items) - len(errors)
        self.stats["failed"] += len(errors)
        return errors


def _engine(model, buckets=(1, 2, 4, 8), cuda_graph=False):
    """An engine on the CPU whose device runner works on CPU memory: the GPU's IOBinding code,
    bound buffers included, without a GPU."""
    from runtime.engine import Engine, _DeviceRunner
    engine = Engine.open(model, device="cpu", threads=1, batch_size=max(buckets))
    assert engine.normalize_in_model and engine.batch_shape == (32, 32, 3)
    engine._runner = _DeviceRunner(engine.session, engine.input_name, "embedding",
                                   engine.batch_shape, engine.feature_dim, list(buckets), 0,
                                   cuda_graph, np.uint8, np.float32, device_type="cpu")
    return engine


def _schedules(engine, batch_size=4, prefetch=2):
    from runtime.resolve import resolve_pipeline_config
    from runtime.schedules import DecodeThreads, GpuDecode, ThreadPool
    plan = dict(cores=4, batch_size=batch_size, prefetch=prefetch, buckets=engine._runner.buckets)
    gpu_config = resolve_pipeline_config(gpu=True, decode="gpu", gpu_decode_ready=(True, ""),
                                         **plan)
    cpu_config = resolve_pipeline_config(gpu=True, decode_processes=0, **plan)
    assert gpu_config.schedule == "gpu" and cpu_config.schedule == "threads"
    pool = ThreadPool(4)
    decoder = HostDecoder(engine.preprocessing)
    gpu = GpuDecode(engine, gpu_config, fast_decode=False, pool=pool, decoder=decoder)
    cpu = DecodeThreads(engine, cpu_config, fast_decode=False, pool=pool)
    return cpu, gpu, pool


def _embed(schedule, inputs, batch_size=4, inline=False):
    """What FeaturePipeline.embed does with a schedule: (ids, vectors, errors)."""
    from runtime.inputs import iter_inputs
    stream = iter_inputs(inputs)
    chunks = iter(lambda: list(islice(stream, batch_size)), [])
    ids, blocks, errors = [], [], {}
    for batch_ids, vectors, batch_errors in schedule.iter_batches(chunks, inline=inline):
        errors.update({len(ids) + j: m for j, m in batch_errors.items()})
        ids += batch_ids
        blocks.append(vectors)
    return ids, np.concatenate(blocks), errors


# ---------------------------------------------------------------------------------------------
# the schedule's contract

def test_gpu_schedule_rows_equal_the_cpu_schedule_with_bad_items_aligned(conv_model, items):
    engine = _engine(conv_model)
    cpu, gpu, pool = _schedules(engine)
    try:
        ids, vectors, errors = _embed(gpu, items)
        cpu_ids, cpu_vectors, cpu_errors = _embed(cpu, items)
    finally:
        pool.close()
    assert ids == cpu_ids and len(ids) == len(items)
    assert errors == cpu_errors  # same rows, same wording
    assert sorted(errors) == [1, 3, 6, 9]
    assert errors[3].endswith("missing.jpg: file not found")
    assert errors[6].startswith(items[6] + ": ") and "bytes>" not in errors[6]
    assert "is a folder" in errors[9]
    ok = [k for k in range(len(items)) if k not in errors]
    assert np.isnan(vectors[sorted(errors)]).all() and np.isfinite(vectors[ok]).all()
    np.testing.assert_allclose(vectors[ok], cpu_vectors[ok], rtol=1e-6, atol=1e-6)
    # one decoder call per batch; one bound buffer per bucket, made once and reused
    assert gpu.decoder.calls == -(-len(items) // 4)
    made = gpu.decoder.made
    assert sorted(made) == sorted(engine._runner.external) and len(set(made)) == len(made)
    assert set(made) <= {1, 2, 4}
    seconds = gpu.seconds  # where the time went, for the device check's arithmetic
    assert seconds["batches"] == gpu.decoder.calls and seconds["decoding"] > 0
    assert seconds["model"] > 0 and seconds["reads_waited"] >= 0


def test_gpu_schedule_single_item_inline_and_early_stop(conv_model, items):
    engine = _engine(conv_model)
    cpu, gpu, pool = _schedules(engine)
    try:
        got = _embed(gpu, items[0], inline=True)
        want = _embed(cpu, items[0], inline=True)
        assert got[0] == want[0] == [items[0]] and not got[2]
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-6)
        # a consumer that stops after the first batch leaves no reads running
        many = (items[k % 3 * 2] for k in range(400))
        from runtime.inputs import iter_inputs
        stream = iter_inputs(many)
        batches = gpu.iter_batches(iter(lambda: list(islice(stream, 4)), []))
        first = next(batches)
        batches.close()
        assert len(first[0]) == 4 and not first[2]
    finally:
        pool.close()
    assert gpu.decoder.threads == {threading.get_ident()}  # decoded in the calling thread


def test_gpu_schedule_refuses_non_finite_rows_like_the_cpu_schedule(log_model):
    engine = _engine(log_model)
    cpu, gpu, pool = _schedules(engine)
    dark = np.zeros((40, 40), np.uint8)
    bright = np.full((40, 40, 3), 250, np.uint8)
    inputs = [bright, dark, bright, dark, dark, b"not an image"]
    try:
        ids, vectors, errors = _embed(gpu, inputs)
        cpu_result = _embed(cpu, inputs)
    finally:
        pool.close()
    assert errors == cpu_result[2]
    assert sorted(errors) == [1, 3, 4, 5]
    assert errors[1] == "#1: model produced non-finite values (NaN or inf)"
    assert "non-finite" not in errors[5]
    assert np.isnan(vectors[[1, 3, 4, 5]]).all() and np.isfinite(vectors[[0, 2]]).all()
    np.testing.assert_allclose(vectors[[0, 2]], cpu_result[1][[0, 2]], rtol=1e-6)


def test_gpu_schedule_from_several_threads_gives_the_sequential_rows(conv_model, items):
    """The runner's lock covers the bound buffer from decode to output: four threads running
    batches through it at once get the rows one thread gets."""
    engine = _engine(conv_model)
    _, gpu, pool = _schedules(engine)
    good = [x for x in items if isinstance(x, str) and x.endswith(".jpg")
            and "missing" not in x and "corrupt" not in x]
    orders = [np.random.default_rng(k).permutation(len(good)) for k in range(4)]
    results, failures = [None] * 4, []

    def work(k):
        try:
            results[k] = _embed(gpu, [good[i] for i in orders[k]], batch_size=3)
        except Exception as e:  # re-raised below
            failures.append(e)
    try:
        sequential = _embed(gpu, good, batch_size=3)[1]
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        pool.close()
    assert not failures and all(r is not None for r in results)
    for order, (_, vectors, errors) in zip(orders, results):
        assert not errors
        np.testing.assert_array_equal(vectors, sequential[order])


# ---------------------------------------------------------------------------------------------
# the engine's bound buffers

def test_bound_buffers_share_the_runner_lock_and_its_graph_ids(conv_model):
    from runtime.engine import Engine
    engine = _engine(conv_model, cuda_graph=True)
    runner = engine._runner
    crops = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    expected = engine.session.run(["embedding"], {"image": crops})[0]
    with engine.bound(3, lambda n: np.zeros((n, 32, 32, 3), np.uint8)) as slot:
        assert runner._lock.locked() and slot.size == 4 and slot.rows == 3
        slot.buffer[:3] = crops
        np.testing.assert_allclose(slot.run(), expected, rtol=1e-5, atol=1e-6)
    assert not runner._lock.locked()
    np.testing.assert_allclose(engine.run(crops), expected, rtol=1e-5, atol=1e-6)
    # every binding its own CUDA-graph id, handed out in one place
    assert runner.graph_ids == {("bound", 4): 0, ("own", 4): 1}
    small = lambda n: np.zeros((n, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="must be"), engine.bound(2, small):
        pass
    with pytest.raises(ValueError, match="do not fit the largest bucket"), engine.bound(9, small):
        pass
    plain = Engine.open(conv_model, device="cpu", threads=1, batch_size=4)
    with pytest.raises(RuntimeError, match="need the model on a GPU"):
        plain.bound(2, lambda n: None)


# ---------------------------------------------------------------------------------------------
# the row checks

def test_finish_rows_and_the_naming_of_read_ahead_items():
    from runtime.schedules import NON_FINITE, finish_rows, named
    vectors = np.ones((5, 2), np.float32)
    vectors[2, 1], vectors[3, 0] = np.inf, np.nan
    errors = {1: "b: cannot decode image"}
    out = finish_rows(vectors, errors, ["a", "b", "c", "d", "e"])
    assert errors == {1: "b: cannot decode image", 2: f"c: {NON_FINITE}", 3: f"d: {NON_FINITE}"}
    assert np.isnan(out[1:4]).all() and (out[[0, 4]] == 1).all()
    data = b"x" * 12
    assert named("<12 bytes>: not a known image format", data, "/p/a.jpg") == \
        "/p/a.jpg: not a known image format"
    assert named("<12 bytes>: oops", data, data) == "<12 bytes>: oops"  # bytes as given
    assert named("something else", data, "/p/a.jpg") == "something else"


# ---------------------------------------------------------------------------------------------
# the resolver's choices

def test_resolver_grants_gpu_decoding_only_where_everything_is_there():
    from runtime.resolve import resolve_pipeline_config
    ready = (True, "")
    c = resolve_pipeline_config(cores=16, gpu=True, decode="gpu", gpu_decode_ready=ready)
    assert (c.schedule, c.decode, c.decode_reason) == ("gpu", "gpu", "")
    assert (c.threads, c.decode_threads, c.decode_processes, c.stream_workers) == (1, 15, 0, 0)
    # processes asked for: the device decodes, so threads only read files ahead of it
    assert resolve_pipeline_config(cores=16, gpu=True, decode="gpu", gpu_decode_ready=ready,
                                   decode_processes=8).decode_processes == 0
    refused = {
        "the model's session is not on a GPU (CUDA or TensorRT provider)":
            dict(gpu=False, gpu_decode_ready=ready),
        "the model has no uint8 input front (runtime.prefix), which GPU decoding feeds":
            dict(gpu=True, gpu_decode_ready=ready, uint8_front=False),
        "cupy is not installed (No module named 'cupy'; pip install cupy-cuda13x)":
            dict(gpu=True, gpu_decode_ready=(False, "cupy is not installed (No module named "
                                                    "'cupy'; pip install cupy-cuda13x)")),
        "its libraries were not checked (runtime.gpu.decoder.gpu_decode_available)":
            dict(gpu=True),
    }
    for reason, facts in refused.items():
        c = resolve_pipeline_config(cores=16, decode="gpu", **facts)
        assert (c.decode, c.decode_reason) == ("cpu", reason)
        assert c.schedule == ("processes" if facts["gpu"] else "interleaved")
    c = resolve_pipeline_config(cores=16, gpu=True, gpu_decode_ready=ready)  # not asked
    assert (c.schedule, c.decode, c.decode_reason) == ("processes", "cpu", "")
    with pytest.raises(ValueError, match="unknown decode mode 'nvjpeg'; choose from cpu, gpu"):
        resolve_pipeline_config(cores=2, gpu=True, decode="nvjpeg")


def test_gpu_decode_available_names_what_is_missing(monkeypatch):
    from runtime.gpu.decoder import gpu_decode_available
    ok, why = gpu_decode_available()
    if ok:
        pytest.skip("this machine can decode on the GPU")
    assert why and ("pip install" in why or "CUDA device" in why)
    # cupy present, nvImageCodec missing; then both present but no device
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 0))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)
    ok, why = gpu_decode_available()
    assert not ok and why.startswith("nvImageCodec is not installed") and "nvjpeg" in why
    nvidia = types.ModuleType("nvidia")
    nvidia.nvimgcodec = types.ModuleType("nvidia.nvimgcodec")
    monkeypatch.setitem(sys.modules, "nvidia", nvidia)
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", nvidia.nvimgcodec)
    assert gpu_decode_available() == (False, "no CUDA device")


# ---------------------------------------------------------------------------------------------
# opening the schedule: granted, refused, a decoder that will not start

def _open(engine, monkeypatch, decoder_result):
    import runtime.gpu.decoder as D
    from runtime.resolve import resolve_pipeline_config
    from runtime.schedules import open_schedule
    monkeypatch.setattr(D, "gpu_decode_available", lambda: (True, ""))
    monkeypatch.setattr(D, "open_decoder", lambda pre, device_id=0: decoder_result)

    def plan(ready):  # as on a GPU machine
        return resolve_pipeline_config(cores=16, gpu=True, decode="gpu", gpu_decode_ready=ready,
                                       batch_size=8)
    return open_schedule(engine, plan, decode="gpu", fast_decode=True)


def test_open_schedule_opens_the_decoder_or_falls_back_with_its_reason(conv_model, monkeypatch):
    from runtime.gpu.decoder import GpuDecodeFallbackWarning
    from runtime.schedules import GpuDecode, ProcessDecode
    engine = _engine(conv_model)
    decoder = HostDecoder(engine.preprocessing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config, pool, schedule = _open(engine, monkeypatch, (decoder, ""))
    assert isinstance(schedule, GpuDecode) and schedule.decoder is decoder
    assert config.decode == "gpu" and pool.workers == config.max_decode
    schedule.warmup()  # binds and runs every bucket once
    assert sorted(engine._runner.external) == sorted(decoder.made) == [1, 2, 4, 8]
    pool.close()
    why = "GPU decoder failed to start (RuntimeError: CUDA driver too old)"
    with pytest.warns(GpuDecodeFallbackWarning, match=r"not available: GPU decoder failed to "
                                                      r"start \(RuntimeError: CUDA driver"):
        config, pool, schedule = _open(engine, monkeypatch, (None, why))
    assert (config.decode, config.decode_reason, config.schedule) == ("cpu", why, "processes")
    assert isinstance(schedule, ProcessDecode)
    schedule.close()
    pool.close()


def test_pipeline_on_the_cpu_asked_for_gpu_decoding_says_why(conv_model, items):
    from runtime import FeaturePipeline
    from runtime.gpu.decoder import GpuDecodeFallbackWarning
    with pytest.warns(GpuDecodeFallbackWarning, match="not on a GPU"):
        pipe = FeaturePipeline(conv_model, device="cpu", batch_size=4, decode="gpu")
    with pipe, FeaturePipeline(conv_model, device="cpu", batch_size=4) as plain:
        assert (pipe.decode_backend_, pipe.config_.schedule) == ("cpu", "interleaved")
        assert pipe.decode_fallback_reason_ == pipe.config_.decode_reason != ""
        got, want = pipe.embed(items), plain.embed(items)
        assert got.errors == want.errors and got.ids == want.ids
        np.testing.assert_array_equal(got.vectors, want.vectors)


# ---------------------------------------------------------------------------------------------
# the device check's alignment stage, on a host decoder (it runs for real only on a GPU)

def test_device_check_alignment_stage_on_the_gpu_schedule(conv_model, items, tmp_path):
    """scripts/device_check.py's alignment stage over a pipeline whose schedule is GpuDecode
    (host decoder, CPU-bound buffers): the code that will run in the GPU window, run here."""
    import importlib.util
    import os

    from runtime import FeaturePipeline
    from tests.conftest import ROOT
    spec = importlib.util.spec_from_file_location(
        "device_check", os.path.join(ROOT, "scripts", "device_check.py"))
    dc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dc)

    def pipes(c, decode="cpu", **kwargs):
        pipe = FeaturePipeline(conv_model, device="cpu", batch_size=4, **kwargs)
        if decode == "gpu":  # what open_schedule builds on a GPU machine
            pipe.engine_._runner = _engine(conv_model)._runner
            _, gpu, pool = _schedules(pipe.engine_)
            pipe._pool.close()
            pipe.config_, pipe.schedule_, pipe._pool = gpu.config, gpu, pool
        return pipe
    args = types.SimpleNamespace(work=str(tmp_path))
    check = types.SimpleNamespace(args=args, state={"device": "cuda", "paths": [items[0]]})
    dc._pipes = pipes
    out = dc.st_alignment(check)
    assert out["same_errors_as_cpu_schedule"], (out["errors"], out["cpu_errors"])
    assert sorted(int(k) for k in out["errors"]) == [1, 2, 3, 6]
    assert out["error_rows_nan"] and out["neighbours_max_abs_diff"] < 1e-5
    assert out["good_rows_cosine_to_exact"] > 0.9999
    assert set(out["awkward_jpegs_cosine"]) == {"grey", "progressive", "cmyk", "exif_rotated"}
    assert min(out["awkward_jpegs_cosine"].values()) > 0.9999 and not out["awkward_errors"]
    # the corrupt bytes and file reach the decoder; the missing file and the folder fail ahead
    assert out["gpu_decode_stats"]["failed"] == 2
