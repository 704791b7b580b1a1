#!/usr/bin/env python
"""The GPU device check: everything issues 14 and 26 ask of a lent GPU machine, in one run
that fits a 15-minute device window (about 6 minutes here, the rest for the machine's start
and the transfers of scripts/gpu_carry/, with room to rerun a stage with --stages).

Stages, in order of importance (each time-boxed; a failure is recorded in the JSON and the
next stage still runs; a stage the budget no longer reaches is recorded as skipped):
  env         versions, the GPU, onnxruntime providers, whether GPU decoding can run and why not
  model       export ARCH with random weights (fp32 + fp16) and the JPEG corpus
  kernels     the resize kernels against their NumPy reference (bit-exact) on decoded photos
  model_only  onnxruntime CUDA fp16 (IOBinding, with and without CUDA graphs), fp32, and
              PyTorch eager fp16 channels_last, on the same arrays
  end_to_end  JPEG files -> embeddings: the GPU decode schedule (runtime.schedules.GpuDecode),
              decode processes, decode threads, and the PyTorch recipe (ImageFolder +
              DataLoader with one worker per core); each against model-only, with the GPU
              schedule's time per batch split into reads waited, decoding and the model
  alignment   bad items (corrupt bytes and file, a missing file, a PNG, a PIL image, a folder)
              and awkward JPEGs (grey, progressive, CMYK, EXIF-rotated) in a GPU-decoded batch:
              the same error rows and wording as the CPU schedule, neighbours unchanged
  fidelity    GPU decode and the fast CPU decode against the exact CPU transform on a
              labelled JPEG target (digits, 1,797 images; cosine mean/min, probe accuracy
              change; bound 0.999 and 0.2 point)
  tensorrt    TensorRT FP16 and INT8 (the QDQ model, exported here only when TensorRT loads):
              engine build time, cache hit on a second session, model-only throughput; or the
              reason it cannot load
Results: OUT_DIR/device-check-ARCH.json and .log, OUT_DIR being --out-dir, else
$DEVICE_CHECK_OUT, else a new temporary folder (printed): never the checkout, so a dry run
leaves docs/gpu/ as committed. Work files (exported models, engines) go to --work, else
$DEVICE_CHECK_WORK, else TMPDIR/unirep-device-check (kept, so a rerun reuses the export).

    DEVICE_CHECK_OUT=$OUT scripts/device_check.sh             # the H200 run (gpu_carry/go.sh)
    scripts/device_check.sh --arch small_cnn --images 64 --batch-size 16   # CPU dry run
    scripts/device_check.sh --stages env,alignment            # rerun some stages
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import numpy as np  # noqa: E402

from common.atomic import atomic_open  # noqa: E402

_LOG: io.TextIOBase | None = None
START = time.perf_counter()


def log(message: str) -> None:
    line = f"[{time.perf_counter() - START:6.1f}s] {message}"
    print(line, file=sys.stderr, flush=True)
    if _LOG is not None:
        _LOG.write(line + "\n")
        _LOG.flush()


class StageTimeout(Exception):
    pass


@contextlib.contextmanager
def time_box(seconds: float):
    """Raise StageTimeout in this (main) thread after `seconds` (Python code only: a call
    blocked inside a C library ends when it returns)."""
    def expire(signum, frame):
        raise StageTimeout(f"stage exceeded its {seconds:.0f} s time box")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Check:
    """The report, its stages, and where it is written after every stage."""

    def __init__(self, args):
        self.args = args
        self.report: dict = {"arch": args.arch, "batch_size": args.batch_size,
                             "images": args.images, "stages": {}}
        self.state: dict = {}

    def stage(self, name: str, fn, box: float, needs: tuple[str, ...] = ()):
        left = self.args.budget_s - (time.perf_counter() - START)
        if self.args.stages and name not in self.args.stages | {"env", "model"}:
            return self._record(name, {"status": "skipped", "reason": "not in --stages"})
        missing = [n for n in needs if n not in self.state]
        if missing:
            return self._record(name, {"status": "skipped",
                                       "reason": f"needs {', '.join(missing)} (earlier stage "
                                                 "failed or was skipped)"})
        if left < 5:
            return self._record(name, {"status": "skipped",
                                       "reason": f"time budget of {self.args.budget_s} s spent"})
        log(f"== {name} (time box {min(box, left):.0f} s)")
        t0 = time.perf_counter()
        try:
            with time_box(min(box, left)), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = fn(self) or {}
            result.setdefault("status", "ok")
            if caught:
                result["warnings"] = sorted({str(w.message)[:400] for w in caught})
        except Skip as e:
            result = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # recorded; the next stage still runs
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        return self._record(name, result)

    def _record(self, name: str, result: dict):
        self.report["stages"][name] = result
        summary = {k: v for k, v in result.items() if k not in ("traceback",)}
        log(f"{name}: {json.dumps(summary, default=str)[:1500]}")
        if result.get("traceback"):
            log(result["traceback"])
        self.save()
        return result

    def save(self) -> None:
        with atomic_open(self.args.json, "w") as f:
            json.dump(self.report, f, indent=2, default=str)


class Skip(Exception):
    """A stage that does not apply here (no GPU, no TensorRT); the message says why."""


def gpu_name() -> str | None:
    from runtime.providers import cuda_device_count
    count, _ = cuda_device_count()
    if not count:
        return None
    with contextlib.suppress(Exception):
        import torch
        return torch.cuda.get_device_name()
    return "CUDA device"


# ---------------------------------------------------------------------------------------------
# stages

def st_env(c: Check) -> dict:
    import onnxruntime as ort

    from runtime.gpu.decoder import gpu_decode_available
    from runtime.gpu.tensorrt import find_tensorrt_libs
    from runtime.providers import cuda_device_count
    count, why = cuda_device_count()
    ok, decode_why = gpu_decode_available()
    out = {"python": platform.python_version(), "cpu": platform.processor(),
           "cores": os.cpu_count(), "onnxruntime": ort.__version__,
           "onnxruntime_file": ort.__file__, "providers": ort.get_available_providers(),
           "cuda_devices": count, "no_cuda_reason": why, "gpu": gpu_name(),
           "gpu_decode": ok, "gpu_decode_reason": decode_why,
           "tensorrt_libs": find_tensorrt_libs()}
    for mod in ("torch", "torchvision", "cupy", "numpy", "PIL", "simplejpeg"):
        with contextlib.suppress(Exception):
            out[mod] = __import__(mod).__version__
    with contextlib.suppress(Exception):
        from nvidia import nvimgcodec
        out["nvimgcodec"] = getattr(nvimgcodec, "__version__", "present")
    c.state["device"] = "cuda" if count else "cpu"
    if not count:
        log(f"no CUDA device ({why}): GPU stages will be skipped; CPU parts still run")
    return out


def st_model(c: Check) -> dict:
    from benchmarks.corpus import ensure_corpus
    from benchmarks.runtime_bench import image_files
    corpus = ensure_corpus(count=c.args.images)
    paths, _ = image_files(corpus)
    c.state["corpus"], c.state["paths"] = corpus, paths
    from benchmarks.bench_gpu import prepare_model
    run_dir, model_dir = prepare_model(c.args.arch, c.args.work, corpus)
    c.state["run_dir"], c.state["model_dir"] = run_dir, model_dir
    out = {"corpus": corpus, "jpegs": len(paths), "model_dir": model_dir,
           "variants": sorted(f for f in os.listdir(model_dir) if f.endswith(".onnx"))}
    return out


def export_int8(c: Check) -> float | None:
    """The INT8 (QDQ) variant, calibrated on the corpus, made once: seconds it took, or None
    when it was already there."""
    model_dir = c.state["model_dir"]
    if os.path.exists(os.path.join(model_dir, "model.int8.onnx")):
        return None
    from benchmarks.runtime_bench import make_int8
    from runtime import FeaturePipeline
    t0 = time.perf_counter()
    with FeaturePipeline(model_dir, device="cpu") as p:
        pre = p.preprocessing_
    make_int8(model_dir, c.state["paths"][:64], pre)
    return round(time.perf_counter() - t0, 1)


def st_kernels(c: Check) -> dict:
    """GPU kernels vs the NumPy reference on host-decoded photos, uploaded as they are."""
    from runtime.gpu.decoder import gpu_decode_available
    ok, why = gpu_decode_available()
    if not ok:
        raise Skip(why)
    import cupy
    from PIL import Image

    from runtime.gpu import kernels as K
    from runtime.gpu.resample import plan_window, run_pass
    worst, compared = 0, 0
    rng = np.random.default_rng(0)
    for path in c.state["paths"][:8]:
        photo = Image.open(path).convert("RGB")
        for kind in ("bilinear", "bicubic"):
            w, h = int(rng.integers(40, 900)), int(rng.integers(40, 900))
            image = np.ascontiguousarray(np.asarray(photo.resize((w, h))))
            plan = plan_window(w, h, 256, 224, kind) if min(w, h) * 256 >= 224 else None
            if plan is None:
                continue
            expected = run_pass(run_pass(image, plan.first), plan.second)
            src = cupy.asarray(image)
            temp = cupy.empty((plan.first.rows, plan.first.cols, 3), cupy.uint8)
            out = cupy.zeros((224, 224, 3), cupy.uint8)
            for p, s, d in ((plan.first, src, temp), (plan.second, temp, out)):
                params, st, cn, wt = K.pack_pass([p])
                params[0, [K.SRC, K.SRC_PITCH, K.DST, K.DST_PITCH]] = (
                    s.data.ptr, s.strides[0], d.data.ptr, d.strides[0])
                K.launch_pass(params, st, cn, wt)
            cupy.cuda.Device().synchronize()
            worst = max(worst, int(np.abs(cupy.asnumpy(out).astype(int) - expected).max()))
            compared += 1
    return {"compared": compared, "max_abs_diff": worst, "bit_exact": worst == 0}


def _pipes(c: Check, **kwargs):
    from runtime import FeaturePipeline
    return FeaturePipeline(c.state["model_dir"], device=c.state["device"],
                           batch_size=c.args.batch_size, **kwargs)


def st_model_only(c: Check) -> dict:
    from benchmarks.bench_gpu import torch_model_only, torch_side
    from benchmarks.runtime_bench import Config, time_round_robin
    device = c.state["device"]
    half = device == "cuda"
    variant = "fp16" if half else "fp32"
    bs = c.args.batch_size
    pipes = {"plain": _pipes(c, variant=variant)}
    if half:
        pipes["graph"] = _pipes(c, variant=variant, cuda_graph=True)
        pipes["fp32"] = _pipes(c)
    arrays = pipes["plain"].preprocess(c.state["paths"][:bs])[0]
    arrays = np.ascontiguousarray(np.concatenate([arrays] * 4))
    c.state["arrays"] = arrays
    for p in pipes.values():
        p.warmup()
    configs = [Config(f"ort_{k}", f"onnxruntime {k} {p.provider_}",
                      lambda p=p: (p.embed_arrays(arrays), len(arrays))[1], [])
               for k, p in pipes.items()]
    try:
        model = torch_side(c.state["run_dir"], device, half)
        torch_model_only(model, arrays[:bs], bs, device, half)
        c.state["torch_model"] = model
        configs.append(Config("torch", f"PyTorch eager {'fp16 channels_last' if half else 'fp32'}",
                              lambda: torch_model_only(model, arrays, bs, device, half), []))
    except ImportError as e:
        log(f"PyTorch side skipped: {e}")
    out = {"pipelines": {k: {"provider": p.provider_, "fell_back": p.fell_back_,
                             "reason": p.fallback_reason_, "cuda_graph": p.cuda_graph_}
                         for k, p in pipes.items()},
           "figures": time_round_robin(configs, c.args.repeats)}
    best = max((k for k in pipes if k != "fp32"),
               key=lambda k: out["figures"][f"ort_{k}"]["images_per_s"])
    c.state["best_model_only"] = out["figures"][f"ort_{best}"]["images_per_s"]
    c.state["best_graph"] = best == "graph"
    out["best"] = best
    for p in pipes.values():
        p.close()
    return out


def st_tensorrt(c: Check) -> dict:
    if c.state["device"] != "cuda":
        raise Skip("no CUDA device")
    from benchmarks.runtime_bench import Config, time_round_robin
    from runtime.gpu.tensorrt import engine_files, preload_tensorrt
    from runtime.providers import TENSORRT
    ok, why = preload_tensorrt()
    if not ok:
        raise Skip(why)
    arrays = c.state.get("arrays")
    out: dict = {"libraries": why}
    if c.args.int8:
        out["int8_export_s"] = export_int8(c)
    configs = []
    for variant in ("fp16", "int8"):
        if not os.path.exists(os.path.join(c.state["model_dir"], f"model.{variant}.onnx")):
            out[variant] = {"status": "skipped", "reason": f"no model.{variant}.onnx"}
            continue
        cache = os.path.join(c.args.work, f"trt-cache-{variant}")
        shutil.rmtree(cache, ignore_errors=True)
        from runtime import FeaturePipeline
        row = {}
        for attempt in ("build", "cached"):
            t0 = time.perf_counter()
            p = FeaturePipeline(c.state["model_dir"], device="tensorrt", variant=variant,
                                batch_size=c.args.batch_size, cache_dir=cache)
            p.warmup()  # TensorRT builds the engine on the first run of a shape
            row[f"{attempt}_s"] = round(time.perf_counter() - t0, 2)
            row["engines"] = len(engine_files(os.path.join(cache, "tensorrt")))
        row.update(provider=p.provider_, fell_back=p.fell_back_, reason=p.fallback_reason_,
                   cache_hit=row["cached_s"] < 0.5 * row["build_s"])
        out[variant] = row
        if p.provider_ == TENSORRT and arrays is not None:
            configs.append(Config(f"trt_{variant}", f"TensorRT {variant}",
                                  lambda p=p: (p.embed_arrays(arrays), len(arrays))[1], []))
    if configs:
        out["figures"] = time_round_robin(configs, c.args.repeats)
        if "best_model_only" in c.state:
            out["vs_cuda_model_only"] = {k: round(v["images_per_s"] / c.state["best_model_only"], 3)
                                         for k, v in out["figures"].items()}
    return out


def st_end_to_end(c: Check) -> dict:
    from benchmarks.bench_gpu import torch_recipe
    from benchmarks.runtime_bench import Config, time_round_robin
    device, paths, bs = c.state["device"], c.state["paths"], c.args.batch_size
    variant = "fp16" if device == "cuda" else "fp32"
    graph = bool(c.state.get("best_graph"))
    pipes = {}
    out: dict = {}
    if device == "cuda":
        gpu = _pipes(c, variant=variant, cuda_graph=graph, decode="gpu")
        out["gpu_decode_backend"] = gpu.decode_backend_
        out["gpu_decode_reason"] = gpu.decode_fallback_reason_
        if gpu.config_.schedule == "gpu":
            pipes["gpu_decode"] = gpu
        else:
            log(f"GPU decode not available: {gpu.decode_fallback_reason_}")
            gpu.close()
    procs = _pipes(c, variant=variant, cuda_graph=graph,
                   decode_processes=None if device == "cuda" else 2)
    threads = _pipes(c, variant=variant, cuda_graph=graph, decode_processes=0)
    pipes["decode_processes"], pipes["decode_threads"] = procs, threads
    for p in pipes.values():
        p.warmup()
        p.embed(paths[:bs])
    configs = [Config(k, k.replace("_", " "), lambda p=p: len(p.embed(paths)), [])
               for k, p in pipes.items()]
    model = c.state.get("torch_model")
    if model is not None:
        cores = os.cpu_count() or 1
        configs.append(Config("recipe", f"PyTorch recipe ({cores} workers)",
                              lambda: torch_recipe(model, c.state["corpus"],
                                                   procs.preprocessing_, bs, device,
                                                   device == "cuda", cores), []))
    out["figures"] = time_round_robin(configs, c.args.repeats)
    out["decode_processes"] = procs.decode_processes_
    out["decode_threads"] = threads.decode_threads_
    out["schedules"] = {k: p.schedule_.name for k, p in pipes.items()}
    best = c.state.get("best_model_only")
    if best:
        out["of_model_only"] = {k: round(v["images_per_s"] / best, 3)
                                for k, v in out["figures"].items()}
    if "gpu_decode" in pipes:
        schedule = pipes["gpu_decode"].schedule_
        out["gpu_decode_stats"] = dict(schedule.decoder.stats)
        # where a GPU-decoded batch's time goes: the arithmetic of what limits end to end
        batches = max(1, schedule.seconds["batches"])
        out["gpu_decode_ms_per_batch"] = {k: round(1000 * schedule.seconds[k] / batches, 2)
                                          for k in ("reads_waited", "decoding", "model")}
    for p in pipes.values():
        p.close()
    return out


def st_fidelity(c: Check) -> dict:
    from benchmarks.jpeg_target import labelled_jpegs
    from runtime.gpu.fidelity import measure_fidelity
    device = c.state["device"]
    items, labels = labelled_jpegs(c.args.target, per_class=c.args.target_per_class,
                                   size=c.args.target_size)
    out: dict = {"target": c.args.target, "items": len(items), "size": c.args.target_size}
    exact = _pipes(c, fast_decode=False, decode_processes=0)
    fast = _pipes(c, fast_decode=True, decode_processes=0)
    out["fast_cpu_decode"] = measure_fidelity(fast, exact, items, labels)
    if device == "cuda":
        gpu = _pipes(c, decode="gpu")
        if gpu.decode_backend_ == "gpu":
            out["gpu_decode"] = measure_fidelity(gpu, exact, items, labels)
            photos = c.state["paths"][:c.args.batch_size]
            ref = exact.embed(photos)
            got = gpu.embed(photos)
            from runtime.gpu.fidelity import cosine_rows
            cos = cosine_rows(got.vectors, ref.vectors)
            out["gpu_decode_photos"] = {"images": len(photos), "cosine_mean": float(cos.mean()),
                                        "cosine_min": float(cos.min())}
        else:
            out["gpu_decode"] = {"status": "skipped", "reason": gpu.decode_fallback_reason_}
        gpu.close()
    else:
        out["gpu_decode"] = {"status": "skipped", "reason": "no CUDA device"}
    exact.close()
    fast.close()
    return out


def awkward_jpegs(folder: str, photo_path: str) -> dict[str, bytes]:
    """Grey, progressive, CMYK and EXIF-rotated JPEGs made from a real photo."""
    from PIL import Image
    photo = Image.open(photo_path).convert("RGB")
    out = {}
    for name, img, kw in (("grey", photo.convert("L"), {}),
                          ("progressive", photo, {"progressive": True}),
                          ("cmyk", photo.convert("CMYK"), {})):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90, **kw)
        out[name] = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    out["exif_rotated"] = buf.getvalue()
    return out


def bad_items(folder: str, photo_path: str) -> list:
    """A batch with every kind of bad item between real photos: corrupt bytes, a corrupt
    file, a missing file, a PNG (the CPU path of the GPU decoder), a PIL image, a folder."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    photo = Image.open(photo_path).convert("RGB")
    corrupt = os.path.join(folder, "corrupt.jpg")
    with open(corrupt, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a JPEG")
    png = os.path.join(folder, "photo.png")
    photo.resize((120, 160)).save(png)
    inner = os.path.join(folder, "a-folder")
    os.makedirs(inner, exist_ok=True)
    return [photo_path, b"not an image", corrupt, os.path.join(folder, "missing.jpg"), png,
            photo.resize((70, 50)), inner, photo_path]


def st_alignment(c: Check) -> dict:
    """Bad items in a GPU-decoded batch: the same error rows and wording as the CPU schedule,
    the good rows equal to the same items embedded alone; awkward JPEGs against the exact
    transform."""
    if c.state["device"] != "cuda":
        raise Skip("no CUDA device")
    from runtime.gpu.fidelity import cosine_rows
    paths = c.state["paths"]
    gpu = _pipes(c, decode="gpu")
    if gpu.config_.schedule != "gpu":
        gpu.close()
        raise Skip(gpu.decode_fallback_reason_)
    exact = _pipes(c, fast_decode=False, decode_processes=0)
    items = bad_items(os.path.join(c.args.work, "bad-items"), paths[0])
    mixed, cpu = gpu.embed(items), exact.embed(items)
    good = [k for k in range(len(items)) if k not in mixed.errors]
    alone = gpu.embed([items[k] for k in good]).vectors
    out: dict = {"errors": {str(k): v for k, v in mixed.errors.items()},
                 "same_errors_as_cpu_schedule": mixed.errors == cpu.errors,
                 "cpu_errors": {str(k): v for k, v in cpu.errors.items()},
                 "error_rows_nan": bool(np.isnan(mixed.vectors[list(mixed.errors)]).all()),
                 "neighbours_max_abs_diff": float(np.abs(mixed.vectors[good] - alone).max()),
                 "good_rows_cosine_to_exact": round(float(cosine_rows(
                     mixed.vectors[good], cpu.vectors[good]).min()), 6)}
    kinds = awkward_jpegs(c.args.work, paths[0])
    got = gpu.embed(list(kinds.values()))
    ref = exact.embed(list(kinds.values()))
    cos = cosine_rows(got.vectors, ref.vectors)
    out["awkward_jpegs_cosine"] = {k: round(float(v), 6) for k, v in zip(kinds, cos)}
    out["awkward_errors"] = {str(k): v for k, v in got.errors.items()}
    out["gpu_decode_stats"] = dict(gpu.schedule_.decoder.stats)
    gpu.close()
    exact.close()
    return out


def main(argv=None) -> int:
    global _LOG
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=2048, help="JPEGs in the corpus")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                        help="export and time the INT8 (QDQ) variant for TensorRT")
    parser.add_argument("--target", default="digits",
                        help="labelled built-in (or folder) for fidelity, train+test used; "
                             "digits ships inside scikit-learn, so it exists on a machine with "
                             "no network and no dataset cache")
    parser.add_argument("--target-per-class", type=int, default=200,
                        help="images a class (half fit the probe, half score it: 1,000 test "
                             "images make one image 0.1 point)")
    parser.add_argument("--target-size", type=int, default=320,
                        help="px the target's JPEGs are written at")
    parser.add_argument("--budget-s", type=float, default=360,
                        help="whole run, seconds (scripts/device_check.sh stops it at +60)")
    parser.add_argument("--stages", type=lambda s: set(filter(None, s.split(","))),
                        default=set(), help="comma-separated stages to run (env and model "
                                            f"always run); default all: {', '.join(STAGES)}")
    parser.add_argument("--work", default=os.environ.get("DEVICE_CHECK_WORK") or os.path.join(
        tempfile.gettempdir(), "unirep-device-check"), help="exported models, engines, items")
    parser.add_argument("--out-dir", default=os.environ.get("DEVICE_CHECK_OUT"),
                        help="where the JSON and log go (default $DEVICE_CHECK_OUT, else a new "
                             "temporary folder; never the checkout unless named here)")
    args = parser.parse_args(argv)
    unknown = args.stages - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(STAGES)}")
    args.out_dir = args.out_dir or tempfile.mkdtemp(prefix="unirep-device-check-out-")
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"device-check-{args.arch}")
    args.json = stem + ".json"
    _LOG = open(stem + ".log", "w")
    c = Check(args)
    log(f"device check: {vars(args)}")
    for name, (fn, box, needs) in STAGES.items():
        c.stage(name, fn, box, needs=needs)
    c.report["total_s"] = round(time.perf_counter() - START, 1)
    c.save()
    _LOG.close()
    dest = os.environ.get("OUT")  # the device machine's folder that comes back
    if dest and os.path.abspath(dest) != os.path.abspath(args.out_dir):
        os.makedirs(dest, exist_ok=True)
        for suffix in (".json", ".log"):
            shutil.copy(stem + suffix, dest)
    failed = [k for k, v in c.report["stages"].items() if v.get("status") == "failed"]
    print(json.dumps({k: v.get("status") for k, v in c.report["stages"].items()}))
    print(f"results: {args.json}")
    return 1 if failed else 0


# name: (stage, time box in seconds, what it needs from earlier stages), in running order
STAGES = {
    "env": (st_env, 30, ()),
    "model": (st_model, 150, ("device",)),
    "kernels": (st_kernels, 30, ("paths",)),
    "model_only": (st_model_only, 60, ("model_dir",)),
    "end_to_end": (st_end_to_end, 90, ("model_dir",)),
    "alignment": (st_alignment, 30, ("model_dir",)),
    "fidelity": (st_fidelity, 75, ("model_dir",)),
    "tensorrt": (st_tensorrt, 60, ("model_dir",)),
}


if __name__ == "__main__":
    sys.exit(main())
