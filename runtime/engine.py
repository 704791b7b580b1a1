"""The engine: one exported model opened on a device, behind one thread-safe `run(batch)`.

    engine = Engine.open("models/spe", device="auto", threads=4, batch_size=64)
    vectors = engine.run(uint8_crops)      # N x S x S x 3 uint8 (engine.batch_shape) -> (N, D)
    vectors = engine.run_float(images)     # N x 3 x S x S normalised floats -> (N, D)

It opens the session with its fallbacks (runtime.providers: TensorRT > CUDA > CPU), puts the
uint8 front on the graph when it can (runtime.prefix: the model normalises the crops itself),
and on a GPU runs through IOBinding with fixed buffers per batch-size bucket (_DeviceRunner),
its own or a GPU decoder's (`bound`).
Any number of threads may call `run` at once (a pipeline's workers, a service's batcher, a
cluster worker): onnxruntime sessions are thread-safe, and the device runner, whose bound
buffers are shared, serialises its calls.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from common.description import ModelDescription, Preprocessing
from common.model_dir import ModelDir, ModelError

from . import providers as P
from .prefix import PrefixError, uint8_input_model

log = logging.getLogger("unirep.runtime")

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(double)": np.float64}


class BoundInput:
    """An input buffer of one batch-size bucket, bound as the session's input and held by one
    caller (see _DeviceRunner.bound): write rows into `buffer`, then `run()`."""

    def __init__(self, runner: _DeviceRunner, slot: tuple, rows: int):
        self._runner, self._slot, self.rows = runner, slot, rows
        self.buffer = slot[1]
        self.size = len(self.buffer)

    def run(self) -> np.ndarray:
        """The model on the whole buffer; the first `rows` output rows, copied to the host."""
        binding, _, _, run_options = self._slot
        self._runner.session.run_with_iobinding(binding, run_options)
        return np.array(binding.copy_outputs_to_cpu()[0][:self.rows], copy=True)


def _buffer_pointer(buffer: Any) -> int:
    """The address of a device array (__cuda_array_interface__: cupy, nvImageCodec) or, on the
    CPU, of a NumPy array."""
    face = getattr(buffer, "__cuda_array_interface__", None) or buffer.__array_interface__
    return int(face["data"][0])


class _DeviceRunner:
    """CUDA/TensorRT inference through IOBinding: fixed device buffers per batch-size bucket,
    host->device copy in place, optional CUDA graph per bucket (a graph needs fixed addresses
    and shapes, hence the buckets). The buffers are shared by every caller, so one call runs at
    a time (the device runs one batch at a time anyway).

    Besides its own buffers it binds external ones (`bound`: a GPU decoder's batch, written on
    the device, never visiting the host), one per bucket, behind the same lock; every binding
    gets its own CUDA-graph id here, so graphs of different buffers never share one."""

    def __init__(self, session, input_name, output_name, chw, dim, buckets, device_id,
                 cuda_graph, in_dtype, out_dtype, device_type: str = "cuda"):
        self.session, self.input_name, self.output_name = session, input_name, output_name
        self.chw, self.dim, self.buckets = tuple(chw), dim, sorted(buckets)
        self.device_id, self.cuda_graph = device_id, cuda_graph
        self.in_dtype, self.out_dtype = in_dtype, out_dtype
        self.device_type = device_type  # "cpu" lets the tests run this exact code without a GPU
        self.slots: dict[int, tuple] = {}  # bucket -> (binding, input, output, run options)
        self.external: dict[int, tuple] = {}  # the same, over buffers bound from outside
        self.graph_ids: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def bucket(self, rows: int) -> int:
        """The smallest bucket that holds `rows` rows."""
        if rows > self.buckets[-1]:
            raise ValueError(f"{rows} rows do not fit the largest bucket ({self.buckets[-1]})")
        return next(b for b in self.buckets if b >= rows)

    def _run_options(self, kind: str, size: int):
        run_options = ort.RunOptions()
        if self.cuda_graph:  # one graph per binding: its addresses are baked into the graph
            graph_id = self.graph_ids.setdefault((kind, size), len(self.graph_ids))
            run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return run_options

    def _output(self, binding, size: int):
        y = ort.OrtValue.ortvalue_from_shape_and_type((size, self.dim), self.out_dtype,
                                                       self.device_type, self.device_id)
        binding.bind_ortvalue_output(self.output_name, y)
        return y

    def _slot(self, size: int):
        if size not in self.slots:
            x = ort.OrtValue.ortvalue_from_shape_and_type((size,) + self.chw, self.in_dtype,
                                                           self.device_type, self.device_id)
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(self.input_name, x)
            y = self._output(binding, size)
            self.slots[size] = (binding, x, y, self._run_options("own", size))
        return self.slots[size]

    def _external_slot(self, size: int, allocate: Callable[[int], Any]):
        if size not in self.external:
            buffer = allocate(size)
            shape, dtype = tuple(buffer.shape), np.dtype(buffer.dtype)
            if shape != (size,) + self.chw or dtype != np.dtype(self.in_dtype):
                raise ValueError(f"a bound buffer must be {(size,) + self.chw} "
                                 f"{np.dtype(self.in_dtype)}, got {shape} {dtype}")
            binding = self.session.io_binding()
            binding.bind_input(self.input_name, self.device_type, self.device_id,
                               self.in_dtype, list(shape), _buffer_pointer(buffer))
            y = self._output(binding, size)
            self.external[size] = (binding, buffer, y, self._run_options("bound", size))
        return self.external[size]

    @contextlib.contextmanager
    def bound(self, rows: int, allocate: Callable[[int], Any]) -> Iterator[BoundInput]:
        """Hold the runner with the external input buffer of the bucket for `rows` rows
        (made once per bucket by `allocate(size)`, an array of (size,) + chw on this device):
        the caller writes its rows and runs while no other caller can touch the buffer or the
        session's bindings."""
        size = self.bucket(rows)
        with self._lock:
            yield BoundInput(self, self._external_slot(size, allocate), rows)

    def run(self, batch: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(batch), self.buckets[-1]):
            part = batch[start:start + self.buckets[-1]]
            size = next(b for b in self.buckets if b >= len(part))
            if size > len(part):  # pad up to the bucket so the shape (and graph) repeats
                pad = np.zeros((size - len(part),) + part.shape[1:], dtype=part.dtype)
                part = np.concatenate([part, pad])
            part = np.ascontiguousarray(part, dtype=self.in_dtype)
            # copy in, run, copy out: all three on the shared buffers, so under the lock
            with self._lock:
                binding, x, _, run_options = self._slot(size)
                x.update_inplace(part)
                self.session.run_with_iobinding(binding, run_options)
                result = binding.copy_outputs_to_cpu()[0][:len(batch) - start]
            out.append(np.array(result, copy=True))
        return np.concatenate(out) if out else np.empty((0, self.dim), self.out_dtype)


class Engine:
    """A model opened on a device. Build it with `Engine.open`; then `run` (batches as
    `batch_shape` / `batch_dtype` say: uint8 crops with the front, else normalised floats)
    and `run_float` (normalised Nx3xSxS floats) from any number of threads.

    Attributes: model_path, description, preprocessing, provider, fell_back, fallback_reason,
    optimized_model, threads, session, input_name, input_dtype, output, output_dtype,
    feature_dim, input_shape (3xSxS), batch_shape, batch_dtype, normalize_in_model,
    on_gpu, cuda_graph (really enabled), buckets (GPU batch sizes, else None), input_size,
    device_id."""

    model_path: str
    variant: str
    description: ModelDescription
    preprocessing: Preprocessing
    provider: str
    fell_back: bool
    fallback_reason: str | None
    optimized_model: str | None
    threads: int
    session: Any
    input_name: str
    input_dtype: Any
    output: str
    output_dtype: Any
    feature_dim: int
    input_size: int
    input_shape: tuple[int, int, int]
    batch_shape: tuple[int, int, int]
    batch_dtype: Any
    normalize_in_model: bool
    on_gpu: bool
    cuda_graph: bool
    buckets: list[int] | None
    _front_args: dict[str, Any]
    _common_args: dict[str, Any]
    device_id: int

    def __init__(self) -> None:  # use Engine.open
        self._float_session: Any = None
        self._float_runner: _DeviceRunner | None = None
        self._runner: _DeviceRunner | None = None
        self._float_lock = threading.Lock()

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, model: str | ModelDir, *, device: str = "auto", threads: int = 1,
             fallback_threads: int | None = None, variant: str = "fp32", batch_size: int = 32,
             buckets: Sequence[int] | None = None, cuda_graph: bool = False,
             device_id: int = 0, cache_optimized: bool = False, cache_dir: str | None = None,
             output: str = "embedding", normalize_in_model: bool = True) -> Engine:
        """Open MODEL (a model folder, a .onnx file or a ModelDir) on `device` with `threads`
        onnxruntime threads (`fallback_threads` if a GPU was asked for and the session lands
        on the CPU). `buckets`: the batch sizes the GPU path pads to (powers of two up to
        batch_size when None). Raises ModelError for a missing, corrupt or inconsistent model.

        Long because it is the one opening sequence of the inference core (check the model,
        try the uint8 front, open the session, fall back, then read the facts off the session),
        kept in order in one place so that the fallback rules read top to bottom."""
        from .resolve import resolve_buckets

        if device not in P.DEVICES:
            raise ValueError(f"unknown device {device!r}; choose from {', '.join(P.DEVICES)}")
        md = model if isinstance(model, ModelDir) else ModelDir(model)
        self = cls()
        self.model_path = md.model_path(variant)
        self.description = md.model_description(variant)  # what the graph carries
        md.check_model(variant)  # parses, external data inside, matches the description
        self.preprocessing = self.description.preprocessing
        self.output, self.variant = output, variant
        size = self.preprocessing.input_size
        bucket_list = list(resolve_buckets(batch_size, buckets))
        front = None
        if normalize_in_model:
            try:
                front = uint8_input_model(self.model_path, self.description)
            except PrefixError as e:
                log.info("%s: normalising in NumPy (%s)", self.model_path, e)
        wants_gpu = device != "cpu" and not (device == "auto" and P.cuda_device_count()[0] == 0)
        common_args: dict[str, Any] = dict(
            device_id=device_id, fp16=variant == "fp16", int8=variant == "int8", cache_dir=cache_dir,
            cuda_graph=cuda_graph, input_chw=(3, size, size),
            batch_sizes=(1, batch_size, bucket_list[-1]), cache_optimized=cache_optimized)
        front_args = dict(common_args, model=front.model, cache_tag="u8",
                          input_chw=(size, size, 3)) if front else common_args
        try:
            with warnings.catch_warnings(record=True) as fallback_warnings:
                warnings.simplefilter("always", P.ProviderFallbackWarning)
                info = P.create_session(self.model_path, device, threads, **front_args)
            if (front is not None and wants_gpu and info.provider == P.CPU
                    and P.cuda_device_count()[0] > 0):
                # the GPU refused the graph with the front: keep the GPU, normalise in NumPy
                plain = P.create_session(self.model_path, device, threads, **common_args)
                if plain.provider != P.CPU:
                    log.warning("%s: the uint8 front does not run on %s (%s); normalising "
                                "in NumPy", self.model_path, plain.provider, info.reason)
                    front, front_args, info, fallback_warnings = None, common_args, plain, []
            for w in fallback_warnings:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        except ValueError as e:
            if front is None:
                raise _model_error(self.model_path, e) from e
            log.info("%s: the uint8 front does not load (%s); normalising in NumPy",
                     self.model_path, e)
            front, front_args = None, common_args
            info = _create(self.model_path, device, threads, front_args)
        except Exception as e:  # onnxruntime's own errors for a graph it cannot load
            raise _model_error(self.model_path, e) from e
        if info.provider == P.CPU and wants_gpu:  # fell back: use CPU thread counts instead
            threads = fallback_threads or threads
            cpu_info = _create(self.model_path, "cpu", threads, front_args)
            info.session, info.optimized_model = cpu_info.session, cpu_info.optimized_model
        self.session = info.session
        self.threads = threads
        self.normalize_in_model = front is not None
        self._front_args, self._common_args = front_args, common_args
        self._float_session = None if front else info.session
        self.provider, self.fell_back = info.provider, info.fell_back
        self.fallback_reason, self.optimized_model = info.reason, info.optimized_model
        self.on_gpu = info.provider in P.GPU_PROVIDERS

        inputs = self.session.get_inputs()
        self.input_name = inputs[0].name
        self.input_dtype = (np.float16 if front and front.float_type == "float16" else
                            _NUMPY_TYPES.get(inputs[0].type, np.float32))
        outputs = {o.name: o for o in self.session.get_outputs()}
        if output not in outputs:
            raise ModelError(f"{self.model_path}: no output {output!r}; outputs are "
                             f"{', '.join(outputs)}")
        shape = outputs[output].shape
        self.feature_dim = (shape[-1] if isinstance(shape[-1], int)
                            else self.description.feature_dim)
        self.output_dtype = _NUMPY_TYPES.get(outputs[output].type, np.float32)
        self.input_size = size
        self.input_shape = (3, size, size)
        self.batch_shape = (size, size, 3) if front else self.input_shape
        # decoded batches are float32 without the front (cast to the model's type on the run)
        self.batch_dtype = np.uint8 if front else np.float32

        self.cuda_graph = False
        self.buckets = None
        if self.on_gpu:
            # what the session really enabled (graphs are dropped when a node must run on CPU)
            opts = self.session.get_provider_options().get(self.provider, {})
            flag = opts.get("enable_cuda_graph", opts.get("trt_cuda_graph_enable", "0"))
            self.cuda_graph = cuda_graph and str(flag).lower() in ("1", "true")
            self._runner = _DeviceRunner(self.session, self.input_name, output,
                                         self.batch_shape, self.feature_dim, bucket_list,
                                         device_id, self.cuda_graph,
                                         np.uint8 if front else self.input_dtype,
                                         self.output_dtype)
            if not front:
                self._float_runner = self._runner
            self.buckets = bucket_list
        self.device_id = device_id
        return self

    def with_threads(self, threads: int) -> Engine:
        """The same model on the CPU with another thread count (for workers that each run
        batches with their share of the cores); shares nothing mutable with this engine."""
        twin = Engine()
        twin.__dict__.update({k: v for k, v in self.__dict__.items()
                              if k not in ("_float_lock", "_float_session", "_float_runner",
                                           "_runner")})
        twin.session = _create(self.model_path, "cpu", threads,
                               dict(self._front_args, cache_optimized=False)).session
        twin.threads, twin.on_gpu, twin.buckets = threads, False, None
        twin._float_session = None if self.normalize_in_model else twin.session
        return twin

    def __repr__(self) -> str:
        return (f"Engine({self.model_path!r}, provider={self.provider}, "
                f"dim={self.feature_dim}, batch={self.batch_shape}, threads={self.threads})")

    # -- running -------------------------------------------------------------------------------
    def run(self, batch: np.ndarray) -> np.ndarray:
        """A batch of `batch_shape` items (uint8 crops with the front, else normalised floats)
        -> (N, D) float32 embeddings. Thread-safe."""
        if not self.normalize_in_model:
            return self.run_float(batch)
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if self._runner is not None:
            y = self._runner.run(batch)
        else:
            y = self.session.run([self.output], {self.input_name: batch})[0]
        return np.asarray(y, dtype=np.float32)

    def run_float(self, batch: np.ndarray) -> np.ndarray:
        """Nx3xSxS normalised floats -> (N, D) float32, on the float-input model. Thread-safe."""
        session = self.float_session
        batch = np.ascontiguousarray(batch, dtype=self.input_dtype)
        if self._float_runner is not None:
            y = self._float_runner.run(batch)
        else:
            y = session.run([self.output], {self.input_name: batch})[0]
        return np.asarray(y, dtype=np.float32)

    @property
    def float_session(self):
        """The session on the float-input model; the same as `session` unless the uint8 front
        is in use, then opened on first use with the same provider and threads."""
        with self._float_lock:
            if self._float_session is None:
                device = {P.TENSORRT: "tensorrt", P.CUDA: "cuda"}.get(self.provider, "cpu")
                info = _create(self.model_path, device, self.threads, self._common_args)
                self._float_session = info.session
                if self._runner is not None and info.provider in P.GPU_PROVIDERS:
                    r = self._runner
                    self._float_runner = _DeviceRunner(
                        info.session, self.input_name, self.output, self.input_shape,
                        self.feature_dim, r.buckets, r.device_id, r.cuda_graph,
                        self.input_dtype, self.output_dtype)
            return self._float_session

    def bound(self, rows: int, allocate: Callable[[int], Any]
              ) -> contextlib.AbstractContextManager[BoundInput]:
        """Hold the device runner with its external input buffer for `rows` uint8 crops,
        made once per bucket by `allocate(size)` (a GPU decoder's device array, written there
        without a trip to the host): `with engine.bound(n, new) as b: fill b.buffer; b.run()`.
        Needs the model on a GPU with the uint8 front (runtime.prefix)."""
        if self._runner is None or not self.normalize_in_model:
            raise RuntimeError("bound input buffers need the model on a GPU with the uint8 "
                               f"front ({self.provider}, uint8 front: {self.normalize_in_model})")
        return self._runner.bound(rows, allocate)

    def warmup(self, sizes: Sequence[int]) -> None:
        """Run each batch size once so the first real call is not the slow one."""
        for size in sizes:
            self.run(np.zeros((size,) + self.batch_shape, self.batch_dtype))


def _create(model_path: str, device: str, threads: int, args: dict) -> P.SessionInfo:
    try:
        return P.create_session(model_path, device, threads, **args)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise _model_error(model_path, e) from e


def _model_error(model_path: str, e: BaseException) -> ModelError:
    if isinstance(e, ModelError):
        return e
    text = " ".join(str(e).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return ModelError(f"{model_path}: onnxruntime cannot load the model ({text}); "
                      "export it again")


__all__ = ["Engine"]
