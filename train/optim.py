"""Optimiser (parameter groups from the method) and the per-step learning-rate schedule."""
from __future__ import annotations

import math

import torch

from .config import TrainConfig
from .methods import Method
from .models import Network


def make_optimizer(cfg: TrainConfig, model: Network, method: Method) -> torch.optim.Optimizer:
    lr = cfg.lr if cfg.lr is not None else (0.05 if cfg.optimizer == "sgd" else 1e-3)
    wd = cfg.weight_decay
    if wd is None:
        wd = 5e-4 if cfg.optimizer == "sgd" else 0.05
    groups = method.param_groups(cfg, model, lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=wd)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    raise ValueError(f"optimizer must be sgd or adamw, not {cfg.optimizer!r}")


def make_schedule(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """Per-step LR factor: linear warm-up, then cosine to 0 or x0.1 at 50% and 75% of epochs."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "step":
            return 0.1 ** sum(progress >= m for m in (0.5, 0.75))
        raise ValueError(f"schedule must be cosine or step, not {cfg.schedule!r}")

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
