"""The run folder: what `train` leaves behind and `export` reads.

RUN_DIR/description.json   the model description (common.description.ModelDescription)
RUN_DIR/model.pt           the final `Network` state dict (load with weights_only=True)
RUN_DIR/checkpoint.pt      resumable training state, rewritten atomically every epoch
RUN_DIR/metrics.jsonl      one JSON object per epoch; RUN_DIR/curves.png at the end
"""
from __future__ import annotations

import os
import platform

import torch

from common.atomic import atomic_open
from common.description import Level, ModelDescription

from .models import Network, create_model, default_preprocessing


def versions() -> dict:
    import numpy
    import torchvision
    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def save_atomic(obj, path: str) -> None:
    """torch.save that never leaves a half-written checkpoint behind."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def save_run(model: Network, desc: ModelDescription, run_dir: str) -> None:
    os.makedirs(run_dir, exist_ok=True)
    save_atomic(model.state_dict(), os.path.join(run_dir, "model.pt"))
    desc.save(os.path.join(run_dir, "description.json"))


def untrained_run(arch: str, run_dir: str, heads: list[tuple[str, list[str]]] | None = None,
                  levels: list[Level] | None = None, input_size: int | None = None,
                  seed: int = 0, **arch_kwargs) -> ModelDescription:
    """Write a run with seeded random weights: the 'random features' control, and a quick
    model for benchmarks and tests of the later stages."""
    torch.manual_seed(seed)
    heads = heads or []
    model = create_model(arch, [len(c) for _, c in heads], **arch_kwargs).eval()
    desc = ModelDescription(
        architecture=arch, feature_dim=model.feature_dim,
        preprocessing=default_preprocessing(arch, input_size),
        levels=levels or [], heads=[{"name": n, "classes": list(c)} for n, c in heads],
        arch_kwargs=arch_kwargs, method="random", method_args={"seed": seed},
        versions=versions())
    save_run(model, desc, run_dir)
    return desc
