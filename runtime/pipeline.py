"""The feature pipeline: images in, float32 embeddings out, with onnxruntime and no torch.

    pipe = FeaturePipeline("models/spe")              # device="auto": TensorRT > CUDA > CPU
    result = pipe.embed(["a.jpg", "b.png", pil_image, jpeg_bytes])
    result = pipe.embed("photos/")                    # a folder alone: its images
    result.vectors            # (N, D) float32, NaN rows where result.errors says why
    for ids, vectors, errors in pipe.iter_batches(huge_generator): ...

A thin facade over the parts that do the work:
  runtime.inputs     inputs -> (id, item) work, one row per input; EmbedResult
  runtime.resolve    threads, decode workers, buckets and schedule from the cores and arguments
  runtime.engine     the session with its fallbacks, the uint8 front, the device runner: run()
  runtime.schedules  decode threads, decode processes, the interleaved CPU schedule, GPU decode

On the CPU, a stream of several batches is split between a few workers, each of which decodes
a whole batch and then runs the model on it with its share of the cores (2 cores: 2 workers
with one onnxruntime thread each), so every core runs one thread at a time. On a GPU (and with
stream_workers=0) decoding runs beside the model while the calling thread runs it: batch k+1
and k+2 are decoded while batch k is inferred, by decode worker processes writing into shared
memory (the GPU default with 4+ decode workers: threads would share one GIL) or by a thread
pool. Either way a bounded window of batches is in flight, so memory stays flat on any stream.
Inputs: paths, bytes, PIL images, HxW / HxWxC uint8 arrays, or any iterable of them; a folder
or a 4-D array given alone expands to its images, and in a list is one error row (rows always
line up with the inputs). A bad item becomes an error entry and a NaN row, and so does a row
the model turned into NaN or inf; the rest of its batch goes on.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Any

import numpy as np

from common.description import ONNX_METADATA_KEY, ModelDescription
from common.model_dir import VARIANT_FILES as VARIANTS
from common.model_dir import ModelDir

from . import providers as P
from .decode import normalize_batch
from .engine import Engine, _DeviceRunner
from .inputs import EmbedResult, is_folder, is_single_input, iter_folder, iter_inputs
from .procdecode import DecodeProcesses
from .resolve import PipelineConfig, bucket_sizes, check_decode, default_threads, resolve_pipeline_config
from .schedules import Batch, ProcessDecode, Schedule, open_schedule

__all__ = ["FeaturePipeline", "EmbedResult", "VARIANTS", "iter_inputs", "iter_folder",
           "is_single_input", "resolve_model", "load_description", "bucket_sizes",
           "default_threads", "_DeviceRunner"]


def resolve_model(model_dir: str, variant: str = "fp32") -> str:
    """Path of the ONNX file for `variant` inside MODEL_DIR (or `model_dir` itself if a file)."""
    return ModelDir(model_dir).model_path(variant)


def load_description(model_path: str, session: Any = None) -> ModelDescription:
    """The model description: from an open session's ONNX metadata when given, else from the
    model folder or ONNX file (description.json, else the metadata) through common.model_dir."""
    if session is not None:
        text = session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
        if text:
            return ModelDescription.from_json(text)
    return ModelDir(model_path).description


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
    kernels into the batch the model reads on the device (runtime.gpu; the schedule
    runtime.schedules.GpuDecode); other items take the CPU's exact transform; without a GPU,
    cupy or nvImageCodec a warning says why and the CPU decodes (decode_backend_,
    decode_fallback_reason_: config_.decode and config_.decode_reason).

    After construction: provider_ (really in use), fell_back_, fallback_reason_, description_,
    preprocessing_, feature_dim_, input_shape_ (the float model input, 3xSxS, as embed_arrays
    takes it), normalize_in_model_, batch_shape_ (one image as `embed` feeds the model: SxSx3
    uint8 with the front, else 3xSxS), threads_, decode_threads_, model_path_, session_ (the
    session `embed` runs), engine_ (the runtime.engine.Engine), schedule_ (the
    runtime.schedules.Schedule), config_ (the runtime.resolve.PipelineConfig),
    float_session_ (float input, for embed_arrays; opened on first use when it differs from
    session_), buckets_ (GPU only), cuda_graph_, optimized_model_, decode_parallelism_ (decode
    workers per batch now: starts at decode_threads_ and, unless decode_threads was given,
    grows up to the core count while the model waits for images, shrinks when it never does),
    stream_workers_ (0 when streams are not interleaved), stream_threads_ (onnxruntime threads
    of each interleaved worker), decode_processes_ (0: decoding in threads).
    """

    def __init__(self, model_dir: str, *, device: str = "auto", threads: int | None = None,
                 decode_threads: int | None = None, batch_size: int = 32, variant: str = "fp32",
                 fast_decode: bool = True, prefetch: int = 2,
                 buckets: Sequence[int] | None = None, cuda_graph: bool = False,
                 device_id: int = 0, cache_optimized: bool = False,
                 cache_dir: str | None = None, output: str = "embedding",
                 normalize_in_model: bool = True, stream_workers: int | None = None,
                 decode_processes: int | None = None, decode: str = "cpu"):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.decode = check_decode(decode)
        self.model_dir, self.device, self.threads, self.decode_threads = (
            model_dir, device, threads, decode_threads)
        self.batch_size, self.variant, self.fast_decode = batch_size, variant, fast_decode
        self.prefetch, self.buckets, self.cuda_graph = max(0, prefetch), buckets, cuda_graph
        self.device_id, self.cache_optimized, self.cache_dir, self.output = (
            device_id, cache_optimized, cache_dir, output)
        cores = P.available_cores()
        plan: dict[str, Any] = dict(cores=cores, batch_size=batch_size, prefetch=prefetch, threads=threads,
                    decode_threads=decode_threads, decode_processes=decode_processes,
                    stream_workers=stream_workers, buckets=buckets)
        wants_gpu = device != "cpu" and not (device == "auto" and P.cuda_device_count()[0] == 0)
        asked = resolve_pipeline_config(gpu=wants_gpu, **plan)
        self.engine_ = Engine.open(
            model_dir, device=device, threads=asked.threads,
            fallback_threads=resolve_pipeline_config(gpu=False, **plan).threads,
            variant=variant, batch_size=batch_size, buckets=asked.buckets,
            cuda_graph=cuda_graph, device_id=device_id, cache_optimized=cache_optimized,
            cache_dir=cache_dir, output=output, normalize_in_model=normalize_in_model)
        # the plan for where the session really landed (a GPU may have fallen back to the CPU)
        # and what it can take (decode="gpu": the uint8 front, the GPU decoder's libraries)
        engine = self.engine_

        def plan_for(gpu_decode_ready: tuple[bool, str]) -> PipelineConfig:
            return resolve_pipeline_config(gpu=engine.on_gpu, decode=decode,
                                           uint8_front=engine.normalize_in_model,
                                           gpu_decode_ready=gpu_decode_ready, **plan)
        self.config_: PipelineConfig
        self.schedule_: Schedule
        self.config_, self._pool, self.schedule_ = open_schedule(
            engine, plan_for, decode=decode, fast_decode=fast_decode)

    # -- what the engine and the plan really got -------------------------------------------------
    model_path_ = property(lambda self: self.engine_.model_path)
    session_ = property(lambda self: self.engine_.session)
    float_session_ = property(lambda self: self.engine_.float_session)
    provider_ = property(lambda self: self.engine_.provider)
    fell_back_ = property(lambda self: self.engine_.fell_back)
    fallback_reason_ = property(lambda self: self.engine_.fallback_reason)
    optimized_model_ = property(lambda self: self.engine_.optimized_model)
    description_ = property(lambda self: self.engine_.description)
    preprocessing_ = property(lambda self: self.engine_.preprocessing)
    normalize_in_model_ = property(lambda self: self.engine_.normalize_in_model)
    input_name_ = property(lambda self: self.engine_.input_name)
    input_dtype_ = property(lambda self: self.engine_.input_dtype)
    output_dtype_ = property(lambda self: self.engine_.output_dtype)
    feature_dim_ = property(lambda self: self.engine_.feature_dim)
    input_shape_ = property(lambda self: self.engine_.input_shape)
    batch_shape_ = property(lambda self: self.engine_.batch_shape)
    cuda_graph_ = property(lambda self: self.engine_.cuda_graph)
    buckets_ = property(lambda self: self.engine_.buckets)
    threads_ = property(lambda self: self.engine_.threads)
    decode_threads_ = property(lambda self: self.config_.decode_threads)
    stream_workers_ = property(lambda self: self.config_.stream_workers)
    stream_threads_ = property(lambda self: self.config_.stream_threads)
    decode_backend_ = property(lambda self: self.config_.decode)
    decode_fallback_reason_ = property(lambda self: self.config_.decode_reason)

    @property
    def _overlapped(self) -> Any:
        s = self.schedule_
        return getattr(s, "single", s)

    @property
    def decode_parallelism_(self) -> int:
        """Decode workers per batch now (adapts unless decode_threads was given)."""
        return self._overlapped.parallelism

    @property
    def decode_processes_(self) -> int:
        """Decode worker processes (0: threads; also once they could not start)."""
        s = self._overlapped
        return s.workers if isinstance(s, ProcessDecode) else 0

    # -- lifecycle -------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"FeaturePipeline({self.model_path_!r}, provider={self.provider_}, "
                f"dim={self.feature_dim_}, input={self.input_shape_}, threads={self.threads_}, "
                f"decode_threads={self.decode_threads_}, stream_workers={self.stream_workers_}"
                f"x{self.stream_threads_}, uint8_input={self.normalize_in_model_}, "
                f"batch_size={self.batch_size}, schedule={self.schedule_.name})")

    def close(self) -> None:
        """Stop the decode workers (the session is freed with the object)."""
        self._pool.close(wait=True)
        self.schedule_.close(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.close(wait=False)
        schedule = getattr(self, "schedule_", None)
        if schedule is not None:
            schedule.close(wait=False)

    def _processes(self) -> DecodeProcesses | None:
        """The decode processes, started (None when there are none or they cannot start)."""
        s = self._overlapped
        return s.processes() if isinstance(s, ProcessDecode) else None

    # -- model only --------------------------------------------------------------------------
    def embed_arrays(self, x: np.ndarray) -> np.ndarray:
        """Already preprocessed Nx3xSxS input -> (N, D) float32, in batches of batch_size."""
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape_:
            shape = ", ".join(map(str, self.input_shape_))
            raise ValueError(f"expected an array of shape (N, {shape}), got {x.shape}")
        out = [self.engine_.run_float(x[i:i + self.batch_size])
               for i in range(0, len(x), self.batch_size)]
        return np.concatenate(out) if out else np.empty((0, self.feature_dim_), np.float32)

    def warmup(self) -> None:
        """Run each batch shape once so the first real call is not the slow one (and start
        the decode processes, if any)."""
        self.schedule_.warmup()
        self.engine_.warmup(self.buckets_ or [self.batch_size])

    def preprocess(self, items: Sequence[Any]) -> tuple[np.ndarray, dict[int, str]]:
        """Items -> (Nx3xSxS float32 for the good ones, {position: error}); for tests/benchmarks."""
        items = list(items)
        batch = self.schedule_.new_batch(len(items))
        errors = self.schedule_.decode_into(items, batch, 0, [f"#{i}" for i in range(len(items))])
        ok = [i for i in range(len(items)) if i not in errors]
        if self.normalize_in_model_:
            return normalize_batch(batch[ok], self.preprocessing_), errors
        return batch[ok], errors

    # -- images -------------------------------------------------------------------------------
    def iter_batches(self, inputs: Any) -> Iterator[Batch]:
        """Stream (ids, vectors, errors) per batch; `errors` is keyed by position in the batch.

        Decoding of the next `prefetch` batches overlaps the model call on the current one; at
        most prefetch + 1 batches are held (interleaved CPU streams: max(stream_workers_,
        prefetch + 1)), whatever the length of the input stream."""
        inline = is_single_input(inputs) and not is_folder(inputs)
        stream = iter_inputs(inputs)
        chunks = iter(lambda: list(islice(stream, self.batch_size)), [])
        yield from self.schedule_.iter_batches(chunks, inline=inline)

    def embed(self, inputs: Any) -> EmbedResult:
        """Embed one item or an iterable of items; see the module docstring for input kinds.
        Rows line up with the inputs (a folder or 4-D array given alone: with its images)."""
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
