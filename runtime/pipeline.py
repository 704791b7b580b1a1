"""The feature pipeline: images in, float32 embeddings out, with onnxruntime and no torch.

    pipe = FeaturePipeline("models/spe")              # device="auto": TensorRT > CUDA > CPU
    result = pipe.embed(["a.jpg", "photos/", pil_image, jpeg_bytes])
    result.vectors            # (N, D) float32, NaN rows where result.errors says why
    for ids, vectors, errors in pipe.iter_batches(huge_generator): ...

On the CPU, a stream of several batches is split between a few workers, each of which decodes
a whole batch and then runs the model on it with its share of the cores (2 cores: 2 workers
with one onnxruntime thread each), so every core runs one thread at a time. On a GPU (and with
stream_workers=0) decoding runs beside the model while the calling thread runs it: batch k+1
and k+2 are decoded while batch k is inferred, by decode worker processes writing into shared
memory (the GPU default with 4+ decode workers: threads would share one GIL) or by a thread
pool. Either way a bounded window of batches is in flight, so memory stays flat on any stream.
Inputs: paths, folders (expanded to their images, sorted, recursively), bytes, PIL images,
HxW / HxWxC uint8 arrays, or any iterable of them. A bad item becomes an error entry and a NaN
row; the rest of its batch goes on.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from common.description import ONNX_METADATA_KEY, ModelDescription
from common.images import is_image_file

from . import providers as P
from .decode import normalize_batch
from .prefix import PrefixError, uint8_input_model
from .procdecode import DecodeProcesses, decode_rows, travels

log = logging.getLogger("unirep.runtime")

VARIANTS = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
_SINGLE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)


@dataclass
class EmbedResult:
    """Embeddings aligned with the inputs (after folders are expanded to their files).

    `vectors[i]` belongs to `ids[i]` (a path, or '#i' for in-memory items); failed items have a
    NaN row and `errors[i]` names the item and the cause."""

    vectors: np.ndarray
    ids: list[str]
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> np.ndarray:
        mask = np.ones(len(self.ids), dtype=bool)
        mask[list(self.errors)] = False
        return mask

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------------------------------------
# inputs

def is_single_input(x: Any) -> bool:
    """A single item (possibly a folder) rather than a collection of items."""
    return isinstance(x, _SINGLE_TYPES) or (isinstance(x, np.ndarray) and x.ndim in (2, 3))


def iter_folder(folder: str) -> Iterator[str]:
    """Image files under `folder`, recursively, in sorted order; hidden entries skipped."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if is_image_file(name) and not name.startswith("."):
                yield os.path.join(dirpath, name)


def iter_inputs(inputs: Any) -> Iterator[tuple[str, Any]]:
    """Flatten inputs lazily into (id, item): folders become their files, 4-D arrays their
    images, iterables their elements (one level); anything else is an item (maybe a bad one)."""
    if is_single_input(inputs) or not _iterable(inputs):
        items: Iterable = (inputs,)
    else:
        items = inputs
    index = 0
    for item in items:
        if isinstance(item, (str, os.PathLike)) and os.path.isdir(item):
            found = False
            for path in iter_folder(os.fspath(item)):
                found = True
                yield path, path
                index += 1
            if not found:
                log.warning("%s: folder holds no image files", item)
            continue
        if isinstance(item, (str, os.PathLike)):
            yield os.fspath(item), item
        else:
            yield f"#{index}", item
        index += 1


def _iterable(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return x.ndim == 4
    try:
        iter(x)
    except TypeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# model loading

def resolve_model(model_dir: str, variant: str = "fp32") -> str:
    """Path of the ONNX file for `variant` inside MODEL_DIR (or `model_dir` itself if a file)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if os.path.isfile(model_dir):
        return model_dir
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: no such model folder (make one with "
                                "`python cli.py export RUN_DIR --out MODEL_DIR`)")
    path = os.path.join(model_dir, VARIANTS[variant])
    if not os.path.isfile(path):
        have = [v for v, f in VARIANTS.items() if os.path.isfile(os.path.join(model_dir, f))]
        raise FileNotFoundError(
            f"{model_dir}: no {VARIANTS[variant]} for variant {variant!r} (variants here: "
            f"{', '.join(have) or 'none'}); export it with the matching `export` option")
    return path


def load_description(model_path: str, session: ort.InferenceSession | None = None
                     ) -> ModelDescription:
    """The model description from the ONNX metadata, else description.json beside the model."""
    if session is not None:
        text = session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
        if text:
            return ModelDescription.from_json(text)
    beside = os.path.join(os.path.dirname(os.path.abspath(model_path)), "description.json")
    if os.path.exists(beside):
        return ModelDescription.load(beside)
    raise ValueError(f"{model_path}: no model description (neither ONNX metadata "
                     f"'{ONNX_METADATA_KEY}' nor description.json); re-export the model")


def default_threads(cores: int, gpu: bool, threads: int | None, decode_threads: int | None
                    ) -> tuple[int, int]:
    """(onnxruntime intra-op threads, decode threads).

    CPU: the model gets every core and one decode worker per 4 cores (at least one) runs beside
    it. Decoding costs about a tenth of a CNN's compute, onnxruntime's threads do not spin
    (allow_spinning=0) and the worker mostly waits on the bounded queue, so on 2 cores 2+1 keeps
    both cores busy where 1+1 would leave half of the model's throughput unused (measured by
    `bench`); the adaptive gate adds decode workers only when the model waits for images.
    That is the overlapped schedule (one batch; stream_workers=0); CPU streams of several
    batches are interleaved instead (see FeaturePipeline), which oversubscribes nothing.
    GPU: the model needs one host thread; decode gets the rest."""
    if gpu:
        decode = decode_threads or max(1, cores - 1)
        return threads or 1, decode
    decode = decode_threads or max(1, min(8, cores // 4))
    return threads or cores, decode


def bucket_sizes(batch_size: int) -> list[int]:
    """Powers of two below `batch_size`, then `batch_size`: few distinct shapes to compile."""
    sizes, b = [], 1
    while b < batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [batch_size]


class _DeviceRunner:
    """CUDA/TensorRT inference through IOBinding: fixed device buffers per batch-size bucket,
    host->device copy in place, optional CUDA graph per bucket (a graph needs fixed addresses
    and shapes, hence the buckets)."""

    def __init__(self, session, input_name, output_name, chw, dim, buckets, device_id,
                 cuda_graph, in_dtype, out_dtype, device_type: str = "cuda"):
        self.session, self.input_name, self.output_name = session, input_name, output_name
        self.chw, self.dim, self.buckets = tuple(chw), dim, sorted(buckets)
        self.device_id, self.cuda_graph = device_id, cuda_graph
        self.in_dtype, self.out_dtype = in_dtype, out_dtype
        self.device_type = device_type  # "cpu" lets the tests run this exact code without a GPU
        self.slots: dict[int, tuple] = {}

    def _slot(self, size: int):
        if size not in self.slots:
            x = ort.OrtValue.ortvalue_from_shape_and_type((size,) + self.chw, self.in_dtype,
                                                           self.device_type, self.device_id)
            y = ort.OrtValue.ortvalue_from_shape_and_type((size, self.dim), self.out_dtype,
                                                           self.device_type, self.device_id)
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(self.input_name, x)
            binding.bind_ortvalue_output(self.output_name, y)
            run_options = ort.RunOptions()
            if self.cuda_graph:
                run_options.add_run_config_entry("gpu_graph_id", str(self.buckets.index(size)))
            self.slots[size] = (binding, x, y, run_options)
        return self.slots[size]

    def run(self, batch: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(batch), self.buckets[-1]):
            part = batch[start:start + self.buckets[-1]]
            size = next(b for b in self.buckets if b >= len(part))
            if size > len(part):  # pad up to the bucket so the shape (and graph) repeats
                pad = np.zeros((size - len(part),) + part.shape[1:], dtype=part.dtype)
                part = np.concatenate([part, pad])
            binding, x, y, run_options = self._slot(size)
            x.update_inplace(np.ascontiguousarray(part, dtype=self.in_dtype))
            self.session.run_with_iobinding(binding, run_options)
            out.append(binding.copy_outputs_to_cpu()[0][:len(batch) - start])
        return np.concatenate(out) if out else np.empty((0, self.dim), self.out_dtype)


class _Gate:
    """A semaphore whose limit can change: at most `limit` decode tasks run at once, so the pool
    may hold a worker per core while only the workers the model leaves room for are busy."""

    def __init__(self, limit: int):
        self.limit, self.active = limit, 0
        self.cond = threading.Condition()

    def set_limit(self, limit: int) -> None:
        with self.cond:
            self.limit = limit
            self.cond.notify_all()

    def __enter__(self):
        with self.cond:
            while self.active >= self.limit:
                self.cond.wait()
            self.active += 1

    def __exit__(self, *exc):
        with self.cond:
            self.active -= 1
            self.cond.notify()


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(double)": np.float64}


class FeaturePipeline:
    """Images -> embeddings with an exported model (MODEL_DIR or a .onnx file).

    device: auto | cpu | cuda | tensorrt. threads: onnxruntime intra-op threads; decode_threads:
    decoding workers (defaults fit the cores this process may use). batch_size: images per
    model call. variant: fp32 | fp16 | int8 (model.onnx, model.fp16.onnx, model.int8.onnx).
    fast_decode: libjpeg-turbo DCT-downscaled JPEG decoding (False = the exact training
    transform). normalize_in_model: feed the model uint8 NHWC crops and let a graph front
    (runtime.prefix) scale, standardise and transpose them, bit-identical to NumPy's
    normalisation and cheaper (False, or a model that cannot take the front: float batches
    normalised by the decode workers). prefetch: batches decoded ahead of the model.
    buckets: batch sizes the GPU path pads to (default: powers of two up to batch_size).
    cuda_graph: capture a CUDA graph per bucket. cache_optimized: keep the optimised CPU graph
    in the model's cache folder. stream_workers (CPU): workers that each decode a batch and
    then run the model on it with threads // stream_workers onnxruntime threads, for streams
    of more than one batch (default min(4, threads), or 0 when decode_threads is given; 0 or
    1: a decode pool beside the model thread, as on GPUs). Interleaving keeps one thread per
    core: a decode pool beside a model using every core oversubscribes them, and the model's
    threads lose about as much time to that as decoding costs (ResNet-18 on 2 cores, same
    run: 79 images/s overlapped, 83 interleaved, the model alone 90). A second session with
    the smaller thread count is opened for it (the model's memory once more); a single batch
    (one image, a short list) runs on the main session with every thread, for latency.
    decode_processes: decode paths and bytes in this many worker processes instead of threads
    (runtime.procdecode), for machines where the GIL, not the cores, limits decoding: on a
    16-core GPU machine 15 decode threads gave 1,355 images/s against a model that takes
    6,488. Default: on a GPU with 4 or more decode workers, that many processes; else 0
    (threads). PIL images and arrays are always decoded by threads.
    decode: "cpu" (default) or "gpu": JPEGs decoded by nvImageCodec and resized by CUDA
    kernels into the batch the model reads on the device (runtime.gpu); other items take the
    CPU's exact transform; without a GPU, cupy or nvImageCodec a warning says why and the
    CPU decodes (decode_backend_, decode_fallback_reason_).

    After construction: provider_ (really in use), fell_back_, fallback_reason_, description_,
    preprocessing_, feature_dim_, input_shape_ (the float model input, 3xSxS, as embed_arrays
    takes it), normalize_in_model_, batch_shape_ (one image as `embed` feeds the model: SxSx3
    uint8 with the front, else 3xSxS), threads_, decode_threads_, model_path_, session_ (the
    session `embed` runs), float_session_ (float input, for embed_arrays; opened on first use
    when it differs from session_), buckets_ (GPU only), cuda_graph_, optimized_model_,
    decode_parallelism_ (decode
    workers per batch now: starts at decode_threads_ and, unless decode_threads was given,
    grows up to the core count while the model waits for images, shrinks when it never does),
    stream_workers_ (0 when streams are not interleaved), stream_threads_ (onnxruntime threads
    of each interleaved worker), decode_processes_ (0: decoding in threads).
    """

    def __init__(self, model_dir: str, device: str = "auto", threads: int | None = None,
                 decode_threads: int | None = None, batch_size: int = 32, variant: str = "fp32",
                 fast_decode: bool = True, prefetch: int = 2,
                 buckets: Sequence[int] | None = None, cuda_graph: bool = False,
                 device_id: int = 0, cache_optimized: bool = False,
                 cache_dir: str | None = None, output: str = "embedding",
                 normalize_in_model: bool = True, stream_workers: int | None = None,
                 decode_processes: int | None = None, decode: str = "cpu"):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.decode = decode  # the name `decode` is reused below for the decode worker count
        self.model_dir, self.device, self.threads, self.decode_threads = (
            model_dir, device, threads, decode_threads)
        self.batch_size, self.variant, self.fast_decode = batch_size, variant, fast_decode
        self.prefetch, self.buckets, self.cuda_graph = max(0, prefetch), buckets, cuda_graph
        self.device_id, self.cache_optimized, self.cache_dir, self.output = (
            device_id, cache_optimized, cache_dir, output)

        self.model_path_ = resolve_model(model_dir, variant)
        cores = P.available_cores()
        # The description (image size) is needed for TensorRT profiles before the real session,
        # so read it from description.json when present; the ONNX metadata is checked after.
        probe_desc = _description_beside(self.model_path_)
        front = None
        if normalize_in_model:
            try:
                front = uint8_input_model(self.model_path_, probe_desc)
                probe_desc = front.description
            except PrefixError as e:
                log.info("%s: normalising in NumPy (%s)", self.model_path_, e)
        size = probe_desc.preprocessing.input_size if probe_desc else None
        bucket_list = sorted(set(buckets)) if buckets else bucket_sizes(batch_size)
        if bucket_list[-1] < batch_size:
            bucket_list.append(batch_size)
        wants_gpu = device != "cpu" and not (device == "auto" and P.cuda_device_count()[0] == 0)
        intra, decode = default_threads(cores, wants_gpu, threads, decode_threads)
        common_args = dict(device_id=device_id, fp16=variant == "fp16", int8=variant == "int8",
                           cache_dir=cache_dir,
                           cuda_graph=cuda_graph, input_chw=(3, size, size) if size else None,
                           batch_sizes=(1, batch_size, bucket_list[-1]),
                           cache_optimized=cache_optimized)
        front_args = dict(common_args, model=front.model, cache_tag="u8",
                          input_chw=(size, size, 3)) if front else common_args
        try:
            with warnings.catch_warnings(record=True) as fallback_warnings:
                warnings.simplefilter("always", P.ProviderFallbackWarning)
                info = P.create_session(self.model_path_, device, intra, **front_args)
            if (front is not None and wants_gpu and info.provider == P.CPU
                    and P.cuda_device_count()[0] > 0):
                # the GPU refused the graph with the front: keep the GPU, normalise in NumPy
                plain = P.create_session(self.model_path_, device, intra, **common_args)
                if plain.provider != P.CPU:
                    log.warning("%s: the uint8 front does not run on %s (%s); normalising "
                                "in NumPy", self.model_path_, plain.provider, info.reason)
                    front, front_args, info, fallback_warnings = None, common_args, plain, []
            for w in fallback_warnings:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        except ValueError as e:
            if front is None:
                raise
            log.info("%s: the uint8 front does not load (%s); normalising in NumPy",
                     self.model_path_, e)
            front, front_args = None, common_args
            info = P.create_session(self.model_path_, device, intra, **front_args)
        if info.provider == P.CPU and wants_gpu:  # fell back: use CPU thread counts instead
            intra, decode = default_threads(cores, False, threads, decode_threads)
            cpu_info = P.create_session(self.model_path_, "cpu", intra, **front_args)
            info.session, info.optimized_model = cpu_info.session, cpu_info.optimized_model
        self.session_ = info.session
        self.normalize_in_model_ = front is not None
        self._float_args = (intra, common_args)
        self._float_session = None if front else info.session
        self._float_runner = None
        self._float_lock = threading.Lock()
        self.provider_, self.fell_back_ = info.provider, info.fell_back
        self.fallback_reason_ = info.reason
        self.optimized_model_ = info.optimized_model
        self.threads_, self.decode_threads_ = intra, decode

        self.description_ = load_description(self.model_path_, self.session_)
        self.preprocessing_ = self.description_.preprocessing
        inputs = self.session_.get_inputs()
        self.input_name_ = inputs[0].name
        self.input_dtype_ = (np.float16 if front and front.float_type == "float16" else
                             _NUMPY_TYPES.get(inputs[0].type, np.float32))
        outputs = {o.name: o for o in self.session_.get_outputs()}
        if output not in outputs:
            raise ValueError(f"{self.model_path_}: no output {output!r}; outputs are "
                             f"{', '.join(outputs)}")
        shape = outputs[output].shape
        self.feature_dim_ = (shape[-1] if isinstance(shape[-1], int)
                             else self.description_.feature_dim)
        self.output_dtype_ = _NUMPY_TYPES.get(outputs[output].type, np.float32)
        s = self.preprocessing_.input_size
        self.input_shape_ = (3, s, s)
        self.batch_shape_ = (s, s, 3) if front else self.input_shape_
        self._batch_dtype = np.uint8 if front else np.float32

        self._runner = None
        self.cuda_graph_ = False
        if self.provider_ in P.GPU_PROVIDERS:
            # what the session really enabled (graphs are dropped when a node must run on CPU)
            opts = self.session_.get_provider_options().get(self.provider_, {})
            flag = opts.get("enable_cuda_graph", opts.get("trt_cuda_graph_enable", "0"))
            self.cuda_graph_ = cuda_graph and str(flag).lower() in ("1", "true")
            self._runner = _DeviceRunner(self.session_, self.input_name_, output,
                                         self.batch_shape_, self.feature_dim_, bucket_list,
                                         device_id, self.cuda_graph_,
                                         self._batch_dtype if front else self.input_dtype_,
                                         self.output_dtype_)
            if not front:
                self._float_runner = self._runner
        self.buckets_ = bucket_list if self._runner else None
        # Decode parallelism adapts only when not fixed by the caller: while the model thread
        # waits for decoded images the model's cores are idle, so decoding may borrow them.
        self._adaptive = decode_threads is None
        self._max_parts = max(decode, cores) if self._adaptive else decode
        self.decode_parallelism_ = decode
        self._gate = _Gate(decode)
        # interleaved CPU streams: workers decode a batch, then run it on their own threads
        if decode_processes is None:
            decode_processes = decode if self._runner is not None and decode >= 4 else 0
        self.decode_processes_ = max(0, decode_processes)
        self._procs = None
        if stream_workers is None:  # a decode pool asked for by size: the overlapped schedule
            stream_workers = 0 if decode_threads or self.decode_processes_ else min(4, intra)
        workers = stream_workers
        self.stream_workers_ = workers if self._runner is None and workers >= 2 else 0
        self.stream_threads_ = max(1, intra // workers) if self.stream_workers_ else 0
        self._stream_session = None
        if self.stream_workers_:
            self._stream_session = P.create_session(
                self.model_path_, "cpu", self.stream_threads_,
                **dict(front_args, cache_optimized=False)).session
            self._max_parts = max(self._max_parts, self.stream_workers_)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # decode="gpu": nvImageCodec + resize kernels feeding the session through IOBinding
        # (runtime.gpu, imported only when asked for); falls back here with a warning
        self.decode_backend_, self.decode_fallback_reason_, self._gpu = "cpu", "", None
        if self.decode != "cpu":
            from .gpu.adapter import attach, resolve_decode
            resolve_decode(self.decode)
            self._gpu = attach(self)
            self.decode_backend_ = "gpu" if self._gpu is not None else "cpu"
            if self._gpu is not None:  # no CPU decode workers to start
                self.decode_processes_ = 0

    # -- lifecycle -------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"FeaturePipeline({self.model_path_!r}, provider={self.provider_}, "
                f"dim={self.feature_dim_}, input={self.input_shape_}, threads={self.threads_}, "
                f"decode_threads={self.decode_threads_}, stream_workers={self.stream_workers_}"
                f"x{self.stream_threads_}, uint8_input={self.normalize_in_model_}, "
                f"batch_size={self.batch_size})")

    def close(self) -> None:
        """Stop the decode workers (the session is freed with the object)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._procs is not None:
            self._procs.close()
            self._procs = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        procs = getattr(self, "_procs", None)
        if procs is not None:
            procs.close(wait=False)

    def _processes(self) -> DecodeProcesses | None:
        """The decode processes, started; None (and threads from now on) when they cannot
        start."""
        with self._pool_lock:
            if self._procs is None and self.decode_processes_:
                procs = DecodeProcesses(self.preprocessing_, self.fast_decode,
                                        self.decode_processes_, self.batch_size,
                                        self.prefetch + 2, self.batch_shape_, self._batch_dtype)
                try:
                    procs.start()
                except (BrokenProcessPool, OSError, RuntimeError) as e:
                    procs.close(wait=False)
                    warnings.warn(f"decode worker processes could not start ({e}); decoding in "
                                  "threads instead", RuntimeWarning)
                    self.decode_processes_ = 0
                    return None
                self._procs = procs
            return self._procs

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._max_parts,
                                                thread_name_prefix="unirep-decode")
            return self._pool

    # -- model only --------------------------------------------------------------------------
    def embed_arrays(self, x: np.ndarray) -> np.ndarray:
        """Already preprocessed Nx3xSxS input -> (N, D) float32, in batches of batch_size."""
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape_:
            shape = ", ".join(map(str, self.input_shape_))
            raise ValueError(f"expected an array of shape (N, {shape}), got {x.shape}")
        out = [self._infer(x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        return np.concatenate(out) if out else np.empty((0, self.feature_dim_), np.float32)

    @property
    def float_session_(self):
        """The session on the float-input model (embed_arrays); the same as session_ unless the
        uint8 front is in use, then opened on first use with the same provider and threads."""
        with self._float_lock:
            if self._float_session is None:
                intra, args = self._float_args
                device = {P.TENSORRT: "tensorrt", P.CUDA: "cuda"}.get(self.provider_, "cpu")
                info = P.create_session(self.model_path_, device, intra, **args)
                self._float_session = info.session
                if self._runner is not None and info.provider in P.GPU_PROVIDERS:
                    r = self._runner
                    self._float_runner = _DeviceRunner(
                        info.session, self.input_name_, self.output, self.input_shape_,
                        self.feature_dim_, r.buckets, r.device_id, r.cuda_graph,
                        self.input_dtype_, self.output_dtype_)
            return self._float_session

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        """Nx3xSxS normalised floats -> embeddings, on the float-input model."""
        session = self.float_session_
        batch = np.ascontiguousarray(batch, dtype=self.input_dtype_)
        if self._float_runner is not None:
            y = self._float_runner.run(batch)
        else:
            y = session.run([self.output], {self.input_name_: batch})[0]
        return np.asarray(y, dtype=np.float32)

    def _infer_batch(self, batch: np.ndarray) -> np.ndarray:
        """A batch as `_new_batch` makes them (uint8 crops with the front) -> embeddings."""
        if not self.normalize_in_model_:
            return self._infer(batch)
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if self._runner is not None:
            y = self._runner.run(batch)
        else:
            y = self.session_.run([self.output], {self.input_name_: batch})[0]
        return np.asarray(y, dtype=np.float32)

    def warmup(self) -> None:
        """Run each batch shape once so the first real call is not the slow one (and start
        the decode processes, if any)."""
        if self.decode_processes_:
            self._processes()  # starts them, or falls back to threads
        sizes = self.buckets_ or [self.batch_size]
        for size in sizes:
            self._infer_batch(np.zeros((size,) + self.batch_shape_, self._batch_dtype))

    # -- preprocessing -------------------------------------------------------------------------
    def preprocess(self, items: Sequence[Any]) -> tuple[np.ndarray, dict[int, str]]:
        """Items -> (Nx3xSxS float32 for the good ones, {position: error}); for tests/benchmarks."""
        items = list(items)
        batch = self._new_batch(len(items))
        errors = self._decode_into(items, batch, 0, [f"#{i}" for i in range(len(items))])
        ok = [i for i in range(len(items)) if i not in errors]
        if self.normalize_in_model_:
            return normalize_batch(batch[ok], self.preprocessing_), errors
        return batch[ok], errors

    def _new_batch(self, n: int) -> np.ndarray:
        return np.empty((n,) + self.batch_shape_, self._batch_dtype)

    def _decode_into(self, items: list, batch: np.ndarray, start: int, ids: list[str]
                     ) -> dict[int, str]:
        """Decode items[k] into batch[start + k] (as uint8 crops for the model's front, else
        normalised here, in the worker that decoded it, so the model thread only runs the
        model); return {row: error} for the failures (their rows hold nothing meaningful)."""
        return self._decode_rows(list(range(start, start + len(items))), items, batch, ids)

    def _decode_rows(self, rows: list[int], items: list, batch: np.ndarray, ids: list[str]
                     ) -> dict[int, str]:
        """items[k] into batch[rows[k]], in this thread; {row: error} for the failures."""
        failed = decode_rows(rows, items, batch, self.preprocessing_, self.fast_decode)
        return _row_errors(rows, failed, ids)

    def _gated_decode(self, items, batch, start, ids):
        with self._gate:
            return self._decode_into(items, batch, start, ids)

    # -- streaming -----------------------------------------------------------------------------
    def _decode_and_run(self, ids: list[str], items: list):
        """One interleaved worker's task: decode a batch, then run the model on it here."""
        batch = self._new_batch(len(items))
        errors = self._decode_into(items, batch, 0, ids)
        dtype = np.uint8 if self.normalize_in_model_ else self.input_dtype_
        vectors = self._embed_rows(batch, errors, lambda x: self._stream_session.run(
            [self.output], {self.input_name_: np.ascontiguousarray(x, dtype=dtype)})[0])
        return ids, vectors, errors

    def _iter_interleaved(self, chunks: Iterator[list]):
        pending: deque = deque()
        window = max(self.stream_workers_, self.prefetch + 1)
        pool = self._executor()
        try:
            for chunk in chunks:
                pending.append(pool.submit(self._decode_and_run, [i for i, _ in chunk],
                                           [x for _, x in chunk]))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # consumer stopped early: drop queued work
            for f in pending:
                f.cancel()

    def _submit(self, chunk: list[tuple[str, Any]], inline: bool):
        ids = [i for i, _ in chunk]
        items = [x for _, x in chunk]
        if self.decode_processes_ and not inline:
            submitted = self._submit_processes(ids, items)
            if submitted is not None:
                return submitted
        batch = self._new_batch(len(items))
        if inline:
            done: Future = Future()
            done.set_result(self._decode_into(items, batch, 0, ids))
            return ids, batch, [done]
        parts = min(self.decode_parallelism_, len(items))
        bounds = [round(k * len(items) / parts) for k in range(parts + 1)]
        pool = self._executor()
        futures = [pool.submit(self._gated_decode, items[a:b], batch, a, ids)
                   for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return ids, batch, futures

    def _submit_processes(self, ids: list[str], items: list):
        """A batch in a shared-memory slot: paths and bytes in slices to the decode processes,
        anything else to a thread. None when no slot is free (or the pool broke): the caller
        decodes this batch in threads."""
        travelling = [k for k, x in enumerate(items) if travels(x)]
        others = [k for k, x in enumerate(items) if not travels(x)]
        if not travelling:  # nothing to decode from files or bytes: no processes needed
            return None
        procs = self._processes()
        taken = procs.take_slot() if procs is not None else None
        if taken is None:
            return None
        slot, view = taken
        batch = view[:len(items)]
        base = slot * procs.batch_size
        tasks = _SlotTasks(procs, slot)
        try:
            parts = min(procs.workers, len(travelling))
            bounds = [round(k * len(travelling) / parts) for k in range(parts + 1)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                if b > a:
                    rows = travelling[a:b]
                    slice_items = [items[k] for k in rows]
                    tasks.append((rows, procs.submit([base + k for k in rows], slice_items),
                                  slice_items))
        except BrokenProcessPool:  # a worker died since the last batch: threads this time
            for _, f, _ in tasks:
                f.cancel()
            self._drop_processes()
            return None
        if others:
            tasks.append(self._executor().submit(self._decode_rows, others,
                                                 [items[k] for k in others], batch, ids))
        return ids, batch, tasks

    def _drop_processes(self) -> None:
        with self._pool_lock:
            if self._procs is not None:
                self._procs.close(wait=False)
                self._procs = None

    def _collect(self, future, batch: np.ndarray, ids: list[str]) -> dict[int, str]:
        """{row: error} of one decode task (a thread's, or a process slice's)."""
        if not isinstance(future, tuple):
            return future.result()
        rows, future, slice_items = future
        try:
            failed = future.result()
        except CancelledError:  # never ran: its pool was shut down when another worker died
            return self._decode_rows(rows, slice_items, batch, ids)
        except BrokenProcessPool as e:  # a worker died (killed, out of memory): its slice fails
            self._drop_processes()  # and the next batch gets a fresh pool
            return {k: _message(ids[k], f"decode worker process died ({e})") for k in rows}
        return _row_errors(rows, failed, ids)

    @staticmethod
    def _release(futures, wait: bool = False) -> None:
        """Give a shared-memory batch's slot back, once no worker can still write into it."""
        if not isinstance(futures, _SlotTasks):
            return
        for f in futures:
            f = f[1] if isinstance(f, tuple) else f
            if not f.cancel() and wait:
                with contextlib.suppress(Exception):
                    f.result()
        futures.procs.give_slot(futures.slot)

    def _embed_rows(self, batch: np.ndarray, errors: dict[int, str], infer) -> np.ndarray:
        """Embeddings of a decoded batch: `infer` on the rows without errors, NaN on the rest."""
        vectors = np.full((len(batch), self.feature_dim_), np.nan, np.float32)
        if len(errors) < len(batch):
            ok = np.array([i not in errors for i in range(len(batch))], dtype=bool)
            vectors[ok] = infer(batch if not errors else batch[ok])
        return vectors

    def _complete(self, ids, batch, futures):
        start = time.perf_counter()
        errors: dict[int, str] = {}
        for f in futures:
            errors.update(self._collect(f, batch, ids))
        waited = time.perf_counter() - start
        vectors = self._embed_rows(batch, errors, self._infer_batch)
        self._release(futures)
        if self._adaptive:
            self._adapt(waited, time.perf_counter() - start)
        return ids, vectors, errors

    def _adapt(self, waited: float, cycle: float) -> None:
        """One more decode worker when the model thread mostly waits for images (decoding is
        the bottleneck and the model's cores idle); one fewer when it never waits."""
        if waited > 0.5 * cycle and self.decode_parallelism_ < self._max_parts:
            self.decode_parallelism_ += 1
        elif waited < 0.02 * cycle and self.decode_parallelism_ > self.decode_threads_:
            self.decode_parallelism_ -= 1
        else:
            return
        self._gate.set_limit(self.decode_parallelism_)

    def iter_batches(self, inputs: Any) -> Iterator[tuple[list[str], np.ndarray, dict[int, str]]]:
        """Stream (ids, vectors, errors) per batch; `errors` is keyed by position in the batch.

        Decoding of the next `prefetch` batches overlaps the model call on the current one; at
        most prefetch + 1 batches are held (interleaved CPU streams: max(stream_workers_,
        prefetch + 1)), whatever the length of the input stream."""
        if self._gpu is not None:
            yield from self._gpu.iter_batches(inputs)
            return
        inline = is_single_input(inputs) and not (
            isinstance(inputs, (str, os.PathLike)) and os.path.isdir(inputs))
        stream = iter_inputs(inputs)
        if self.stream_workers_ and not inline:
            first = list(islice(stream, self.batch_size))
            second = list(islice(stream, self.batch_size)) if first else []
            if second:  # a stream: interleaved workers
                rest = iter(lambda: list(islice(stream, self.batch_size)), [])
                yield from self._iter_interleaved(chain([first, second], rest))
                return
            if first:  # one batch: every thread on it, for latency
                yield self._complete(*self._submit(first, False))
            return
        pending: deque = deque()
        try:
            while True:
                chunk = list(islice(stream, self.batch_size))
                if not chunk:
                    break
                pending.append(self._submit(chunk, inline))
                if len(pending) > self.prefetch:
                    yield self._complete(*pending.popleft())
            while pending:
                yield self._complete(*pending.popleft())
        finally:  # consumer stopped early: drop queued decode work
            for _, _, futures in pending:
                for f in futures:
                    (f[1] if isinstance(f, tuple) else f).cancel()
                self._release(futures, wait=True)

    def embed(self, inputs: Any) -> EmbedResult:
        """Embed one item or an iterable of items; see the module docstring for input kinds."""
        ids: list[str] = []
        blocks: list[np.ndarray] = []
        errors: dict[int, str] = {}
        for batch_ids, vectors, batch_errors in self.iter_batches(inputs):
            errors.update({len(ids) + j: m for j, m in batch_errors.items()})
            ids += batch_ids
            blocks.append(vectors)
        vectors = (np.concatenate(blocks) if blocks
                   else np.empty((0, self.feature_dim_), np.float32))
        return EmbedResult(vectors, ids, errors)


class _SlotTasks(list):
    """The decode tasks of a batch that lives in a slot of the decode processes' ring."""

    def __init__(self, procs: DecodeProcesses, slot: int):
        super().__init__()
        self.procs, self.slot = procs, slot


def _row_errors(rows: list[int], failed: dict[int, str], ids: list[str]) -> dict[int, str]:
    """decode_rows' {k: message} as the pipeline's {row: '<id>: <cause>'}."""
    return {rows[k]: _message(ids[rows[k]], message) for k, message in failed.items()}


def _message(item_id: str, error: Any) -> str:
    """'<id>: <cause>', without repeating the id when the cause already starts with it."""
    text = str(error)
    return text if text.startswith(item_id) else f"{item_id}: {text}"


def _description_beside(model_path: str) -> ModelDescription | None:
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "description.json")
    try:
        return ModelDescription.load(path) if os.path.exists(path) else None
    except ValueError:
        return None
