"""The one place the service calls the feature pipeline (so it can be re-pointed to the engine).

The service runs `workers` batches at once, each decoded and then inferred in its own batch
thread with cores // workers onnxruntime threads: while one batch runs the model, the next one
is decoded, which is the CPU pipeline's interleaved schedule with the batcher as the stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import ItemError


@dataclass
class Embedded:
    vectors: np.ndarray          # (N, D) float32, NaN rows for failed items
    errors: dict[int, str]       # position -> "item: cause"


class EmbedAdapter:
    """Opens the pipeline for a service; `embed(items)` is safe to call from several threads."""

    def __init__(self, model_dir: str, *, device: str = "auto", workers: int = 2,
                 batch_size: int = 32, threads: int | None = None, variant: str = "fp32"):
        from runtime.pipeline import FeaturePipeline
        from runtime.providers import available_cores

        cores = available_cores()
        self.workers = max(1, workers)
        per_worker = threads or max(1, cores // self.workers)
        # decode_threads given: a fixed decode pool (no adaptive resizing shared by two callers)
        # and no interleaved stream inside the pipeline (the batcher interleaves already).
        self.pipeline_ = FeaturePipeline(model_dir, device=device, threads=per_worker,
                                         decode_threads=self.workers, batch_size=batch_size,
                                         variant=variant)
        self.description_ = self.pipeline_.description_
        self.feature_dim_ = int(self.pipeline_.feature_dim_)
        self.provider_ = self.pipeline_.provider_
        self.threads_ = self.pipeline_.threads_
        # No lock of our own: the engine's device runner serialises its shared IOBinding
        # buffers itself, so batch threads still decode side by side on a GPU.

    def warmup(self) -> None:
        self.pipeline_.warmup()
        one = np.zeros((self.description_.preprocessing.input_size,) * 2 + (3,), np.uint8)
        self.embed([one])  # the decode pool and the single-item path too

    def embed(self, items: list[Any]) -> Embedded:
        result = self.pipeline_.embed(items)
        # the pipeline names an in-memory item by its place in this batch ('#7: cause'), which
        # means nothing to the client whose request was one part of the batch: keep the cause
        errors = {i: ItemError.from_message(message, f"#{i}").reason
                  for i, message in result.errors.items()}
        return Embedded(result.vectors, errors)

    def close(self) -> None:
        self.pipeline_.close()
