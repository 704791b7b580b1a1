"""FeaturePipeline(..., decode="gpu"): decode on the GPU and feed the model through IOBinding.

`attach(pipe)` returns a GpuBatches that runs the pipeline's uint8-front session on batches
decoded by GpuDecoder, without the pixels ever visiting the host: the batch buffer (one per
batch-size bucket, fixed addresses so CUDA graphs can replay) is bound as the session's input
with `io_binding.bind_input(name, 'cuda', device, np.uint8, shape, pointer)`. When GPU decoding
cannot run (no CUDA device, no cupy / nvImageCodec, a session on the CPU, a model without the
uint8 front), `attach` warns once with the reason and returns None: the CPU decode path runs,
and `pipe.decode_backend_` says which one is in use.

File bytes are read one batch ahead in a thread, so reading overlaps the GPU work.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any

import numpy as np

from .. import providers as P

DECODE_MODES = ("cpu", "gpu")


class GpuDecodeFallbackWarning(RuntimeWarning):
    """GPU decoding was asked for but the CPU decodes (the message says why)."""


def resolve_decode(decode: str) -> str:
    """Check a `decode` option ('cpu' or 'gpu')."""
    if decode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {decode!r}; choose from {', '.join(DECODE_MODES)}")
    return decode


def attach(pipe) -> GpuBatches | None:
    """A GpuBatches for `pipe`, or None (with a GpuDecodeFallbackWarning saying why)."""
    why = ""
    if pipe.provider_ not in P.GPU_PROVIDERS:
        why = f"the model runs on {pipe.provider_}, not on a GPU"
    elif not pipe.normalize_in_model_:
        why = "the model has no uint8 input front (runtime.prefix), which GPU decoding feeds"
    if not why:
        from .decoder import GpuDecoder, GpuUnavailable
        try:
            decoder = GpuDecoder(pipe.preprocessing_, device_id=pipe.device_id)
        except GpuUnavailable as e:
            why = str(e)
        except Exception as e:  # a library that imports but does not start (driver, API)
            why = f"GPU decoder failed to start ({type(e).__name__}: {e})"
        else:
            return GpuBatches(pipe, decoder)
    warnings.warn(f"GPU decoding asked for but not available: {why}; decoding on the CPU",
                  GpuDecodeFallbackWarning, stacklevel=3)
    pipe.decode_fallback_reason_ = why
    return None


def _read_ahead(item: Any) -> Any:
    """A path's bytes (read in the prefetch thread), or the item itself; a path that cannot
    be read stays a path, so the decoder words its error."""
    if isinstance(item, (str, os.PathLike)) and os.path.isfile(item):
        try:
            with open(item, "rb") as f:
                return f.read()
        except OSError:
            return item
    return item


class GpuBatches:
    """Runs FeaturePipeline.iter_batches' loop with GPU decoding (see the module docstring)."""

    def __init__(self, pipe, decoder):
        self.pipe, self.decoder = pipe, decoder
        self.session = pipe.session_
        self.buckets = pipe.buckets_ or [pipe.batch_size]
        self.slots: dict[int, tuple] = {}

    def _slot(self, size: int):
        import onnxruntime as ort
        if size not in self.slots:
            pipe = self.pipe
            batch = self.decoder.new_batch(size)
            binding = self.session.io_binding()
            binding.bind_input(pipe.input_name_, "cuda", pipe.device_id, np.uint8,
                               list(batch.shape), int(batch.data.ptr))
            y = ort.OrtValue.ortvalue_from_shape_and_type(
                (size, pipe.feature_dim_), pipe.output_dtype_, "cuda", pipe.device_id)
            binding.bind_ortvalue_output(pipe.output, y)
            run_options = ort.RunOptions()
            if pipe.cuda_graph_:  # ids apart from the float runner's graphs (other buffers)
                run_options.add_run_config_entry("gpu_graph_id",
                                                 str(1000 + self.buckets.index(size)))
            self.slots[size] = (batch, binding, y, run_options)
        return self.slots[size]

    def run(self, ids: list[str], items: list) -> tuple[list[str], np.ndarray, dict[int, str]]:
        """One batch: decode on the GPU, run the model on the device buffer, NaN failed rows."""
        pipe = self.pipe
        vectors = np.full((len(items), pipe.feature_dim_), np.nan, np.float32)
        errors: dict[int, str] = {}
        for start in range(0, len(items), self.buckets[-1]):
            part = items[start:start + self.buckets[-1]]
            size = next(b for b in self.buckets if b >= len(part))
            batch, binding, y, run_options = self._slot(size)
            failed = self.decoder.decode(part, batch)
            for k, message in failed.items():
                item_id = ids[start + k]
                if message.startswith("<") and ": " in message:  # bytes read ahead of a path
                    message = message.split(": ", 1)[1]
                errors[start + k] = message if message.startswith(item_id) else (
                    f"{item_id}: {message}")
            if len(failed) < len(part):
                self.session.run_with_iobinding(binding, run_options)
                out = np.asarray(binding.copy_outputs_to_cpu()[0][:len(part)], np.float32)
                ok = [k for k in range(len(part)) if k not in failed]
                vectors[[start + k for k in ok]] = out[ok]
        return ids, vectors, errors

    def iter_batches(self, inputs: Any) -> Iterator[tuple[list[str], np.ndarray, dict[int, str]]]:
        from ..inputs import iter_inputs
        stream = iter_inputs(inputs)
        chunks = iter(lambda: list(islice(stream, self.pipe.batch_size)), [])
        with ThreadPoolExecutor(1, thread_name_prefix="unirep-read") as reader:
            def read(chunk):
                return [i for i, _ in chunk], [_read_ahead(x) for _, x in chunk]
            ahead = None
            for chunk in chunks:
                current = reader.submit(read, chunk)
                if ahead is not None:
                    yield self.run(*ahead.result())
                ahead = current
            if ahead is not None:
                yield self.run(*ahead.result())
