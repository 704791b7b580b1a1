"""Execution providers: ask for the fastest, check what the session really got, and say so.

onnxruntime quietly runs on the CPU when a GPU provider cannot start (missing driver, missing
CUDA/cuDNN/TensorRT libraries) and prints its own fallback notice on stdout. `create_session`
builds the provider chain with sensible options, keeps stdout clean, then reads
`session.get_providers()` to report the provider actually in use and why it fell back.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field

import onnxruntime as ort

log = logging.getLogger("unirep.runtime")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)
DEVICES = {"auto": [TENSORRT, CUDA, CPU], "tensorrt": [TENSORRT, CUDA, CPU],
           "cuda": [CUDA, CPU], "cpu": [CPU]}


class ProviderFallbackWarning(RuntimeWarning):
    """The session runs on a slower provider than the one asked for."""


def available_cores() -> int:
    """Cores this process may run on (affinity-aware, so containers and taskset are honoured)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def cuda_device_count() -> tuple[int, str]:
    """How many CUDA devices the driver sees, asked through the driver API (no torch, no CUDA
    runtime needed), and why there are none when zero."""
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        driver = ctypes.CDLL(name)
    except OSError:
        return 0, f"no NVIDIA driver ({name} not found)"
    status = driver.cuInit(0)
    if status != 0:
        return 0, f"the NVIDIA driver failed to initialise (cuInit error {status})"
    count = ctypes.c_int(0)
    status = driver.cuDeviceGetCount(ctypes.byref(count))
    if status != 0 or count.value == 0:
        return 0, "the NVIDIA driver sees no device"
    return count.value, ""


_preloaded = False


def preload_gpu_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels so onnxruntime-gpu finds them; torch would
    normally do this, and the runtime never imports torch."""
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            ort.preload_dlls()
        except Exception as e:  # best effort: system-wide CUDA installs work without it
            log.debug("onnxruntime.preload_dlls failed: %s", e)


def session_options(threads: int, optimized_model_path: str | None = None
                    ) -> ort.SessionOptions:
    """CPU-friendly options: full graph optimisation, `threads` intra-op threads that sleep
    instead of spinning (decode threads share the cores), one inter-op thread."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    return so


def provider_options(provider: str, *, device_id: int = 0, fp16: bool = False,
                     cache_dir: str | None = None, cuda_graph: bool = False,
                     input_name: str = "image", input_chw: tuple[int, int, int] | None = None,
                     batch_sizes: tuple[int, int, int] | None = None, int8: bool = False
                     ) -> dict:
    """Options for one provider. `batch_sizes` = (min, opt, max) for TensorRT's profile, so one
    engine serves every batch-size bucket instead of rebuilding per shape."""
    if provider == CUDA:
        return {"device_id": str(device_id), "cudnn_conv_algo_search": "HEURISTIC",
                "do_copy_in_default_stream": "1", "enable_cuda_graph": "1" if cuda_graph else "0"}
    if provider == TENSORRT:
        from .gpu.tensorrt import tensorrt_options
        opts = tensorrt_options(cache_dir, fp16=fp16, int8=int8, device_id=device_id,
                                cuda_graph=cuda_graph)
        if input_chw and batch_sizes:
            shape = "x".join(str(d) for d in input_chw)
            lo, opt, hi = batch_sizes
            opts.update({"trt_profile_min_shapes": f"{input_name}:{lo}x{shape}",
                         "trt_profile_opt_shapes": f"{input_name}:{opt}x{shape}",
                         "trt_profile_max_shapes": f"{input_name}:{hi}x{shape}"})
        return opts
    return {}


def default_cache_dir(model_path: str) -> str:
    """MODEL_DIR/.cache when writable, else a per-model folder in the user cache."""
    beside = os.path.join(os.path.dirname(os.path.abspath(model_path)), ".cache")
    parent = os.path.dirname(beside)
    if os.access(parent, os.W_OK) and (not os.path.exists(beside) or os.access(beside, os.W_OK)):
        return beside
    key = hashlib.sha256(os.path.abspath(model_path).encode()).hexdigest()[:16]
    root = os.path.expanduser(os.environ.get("UNIREP_CACHE", "~/.cache/unirep"))
    return os.path.join(root, "runtime", key)


def optimized_model_path(model_path: str, cache_dir: str, provider: str, tag: str = "") -> str:
    """Where the optimised graph for this exact file, provider and onnxruntime version lives;
    `tag` names a rewritten form of the file (e.g. "u8" for the uint8-input graph)."""
    st = os.stat(model_path)
    key = "|".join(map(str, (os.path.abspath(model_path), st.st_size, st.st_mtime_ns, provider,
                             ort.__version__) + ((tag,) if tag else ())))
    stem = os.path.splitext(os.path.basename(model_path))[0] + (f".{tag}" if tag else "")
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{stem}.{provider.replace('ExecutionProvider', '').lower()}"
                                   f".{digest}.opt.onnx")


@dataclass
class SessionInfo:
    session: ort.InferenceSession
    provider: str                 # the provider really running the model
    requested: list[str]          # the chain asked for, best first
    fell_back: bool               # provider != requested[0]
    reason: str = ""              # why it fell back, when it did
    optimized_model: str | None = None
    notes: list[str] = field(default_factory=list)


def _ep_error(captured: str) -> str:
    """onnxruntime's own stdout fallback notice, reduced to its cause."""
    for line in captured.splitlines():
        if line.startswith("EP Error"):
            return line[len("EP Error"):].split(" when using ")[0].strip()
    return ""


def _new_session(model_path, so, chain, options):
    """`model_path`: a file, or the serialised model itself (bytes)."""
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        session = ort.InferenceSession(model_path, sess_options=so, providers=chain,
                                       provider_options=options)
    return session, _ep_error(captured.getvalue())


def provider_chain(device: str) -> tuple[list[str], list[str], bool]:
    """(providers to try, reasons for those left out, whether the CPU is the expected outcome)
    for `device`: what this onnxruntime build and machine can offer, GPU libraries loaded.
    `auto` on a machine without a CUDA device goes to the CPU quietly."""
    requested = list(DEVICES[device])
    available = ort.get_available_providers()
    reasons = [f"this onnxruntime build has no {p} (install onnxruntime-gpu)"
               for p in requested if p not in available]
    chain = [p for p in requested if p in available]
    if TENSORRT in chain:  # the pip wheels' libnvinfer is on no search path: load it first
        from .gpu.tensorrt import preload_tensorrt
        trt_ok, trt_why = preload_tensorrt()
        if not trt_ok:
            chain.remove(TENSORRT)
            reasons.append(f"TensorRT: {trt_why}")
    expected_cpu = False
    if any(p in GPU_PROVIDERS for p in chain):
        count, why = cuda_device_count()
        if count == 0:
            reasons.append(f"no CUDA device: {why}")
            if device == "auto":
                chain, expected_cpu = [CPU], True
        else:
            preload_gpu_libraries()
    return chain, reasons, expected_cpu


def create_session(model_path: str, device: str = "auto", threads: int = 1, *,
                   device_id: int = 0, fp16: bool = False, cache_dir: str | None = None,
                   cuda_graph: bool = False, input_chw: tuple[int, int, int] | None = None,
                   batch_sizes: tuple[int, int, int] | None = None, input_name: str = "image",
                   cache_optimized: bool = False, model: bytes | None = None,
                   cache_tag: str = "", int8: bool = False) -> SessionInfo:
    """Open `model_path` on `device` (auto|cpu|cuda|tensorrt) and report what it really got.

    `model`: the serialised graph to run instead of the file's own (a rewritten form of it, such
    as the uint8-input graph); `model_path` still names it in messages and cache keys, with
    `cache_tag` telling the forms apart. `input_chw`: the per-image input shape for TensorRT's
    profile (whatever the layout).

    `auto` skips the GPU providers quietly when no CUDA device exists; an explicit GPU request is
    always tried, and a fallback is announced with a ProviderFallbackWarning."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"{model_path}: no such ONNX model")
    requested = list(DEVICES[device])
    chain, reasons, expected_cpu = provider_chain(device)
    cache_dir = cache_dir or default_cache_dir(model_path)
    options = [provider_options(p, device_id=device_id, fp16=fp16, cache_dir=os.path.join(
        cache_dir, "tensorrt"), cuda_graph=cuda_graph, input_name=input_name,
        input_chw=input_chw, batch_sizes=batch_sizes, int8=int8) for p in chain]

    optimized, source = None, (model if model is not None else model_path)
    if cache_optimized and chain == [CPU]:
        optimized = optimized_model_path(model_path, cache_dir, CPU, cache_tag)
        if os.path.exists(optimized):
            source = optimized
    write_to = None
    if optimized and source is not optimized:
        os.makedirs(cache_dir, exist_ok=True)
        write_to = optimized + f".tmp-{os.getpid()}"
    so = session_options(threads, write_to)

    try:
        session, ep_error = _new_session(source, so, chain, options)
    except Exception as e:
        if chain == [CPU]:
            raise ValueError(f"{model_path}: onnxruntime cannot load this model ({e})") from e
        session = None
        if cuda_graph:  # graphs need every node on the GPU; keep the GPU without them
            reasons.append(f"CUDA graphs unavailable for this model ({e})")
            options = [provider_options(p, device_id=device_id, fp16=fp16, cache_dir=os.path.join(
                cache_dir, "tensorrt"), input_name=input_name, input_chw=input_chw,
                batch_sizes=batch_sizes, int8=int8) for p in chain]
            try:
                session, ep_error = _new_session(source, session_options(threads), chain, options)
            except Exception as e2:
                e = e2
        if session is None:
            reasons.append(f"{chain[0]} failed to start ({e})")
            session, ep_error = _new_session(source, session_options(threads), [CPU], [{}])
    if ep_error:
        reasons.append(ep_error)
    if write_to and optimized and os.path.exists(write_to):  # write_to is set only with optimized
        os.replace(write_to, optimized)  # whole file or nothing for the next reader

    provider = session.get_providers()[0]
    fell_back = provider != requested[0]
    if provider in GPU_PROVIDERS and provider != requested[0] and requested[0] in chain:
        reasons.append(f"{requested[0]} could not take the model (see onnxruntime's log)")
    if fell_back and provider == CPU and not reasons:
        reasons.append("onnxruntime could not start the GPU provider (see its log above: "
                       "CUDA 13 and cuDNN 9 libraries are required)")
    reason = "; ".join(dict.fromkeys(reasons))
    info = SessionInfo(session, provider, requested, fell_back, reason if fell_back else "",
                       optimized if optimized and os.path.exists(optimized) else None)
    if fell_back:
        message = (f"asked for {device} ({requested[0]}) but running on {provider}"
                   + (f": {reason}" if reason else ""))
        if expected_cpu:  # auto on a machine without a GPU: the normal case, not a problem
            log.info(message)
        else:
            warnings.warn(message, ProviderFallbackWarning, stacklevel=3)
    return info
