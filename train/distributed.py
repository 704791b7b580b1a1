"""One process or many (torchrun): the few facts the training loop needs about its place.

`torchrun --nproc-per-node N cli.py train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; a plain
`python cli.py train ...` runs as rank 0 of 1. NCCL on CUDA, gloo on CPU (so the multi-process
path is testable without a GPU).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def setup(device_choice: str = "auto") -> Dist:
    """Join the process group when launched by torchrun; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                 rank=rank, world_size=world_size)
    return Dist(rank, world_size, local_rank, device)


def all_reduce_sum(values: list[float], dist: Dist) -> list[float]:
    """Sum a few numbers over all processes (identity when alone)."""
    if not dist.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64,
                     device=dist.device if dist.device.type == "cuda" else "cpu")
    tdist.all_reduce(t)
    return t.tolist()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        tdist.barrier()


def cleanup(dist: Dist) -> None:
    """Leave the process group (no barrier: after an error the other ranks may never arrive)."""
    if dist.enabled and tdist.is_initialized():
        tdist.destroy_process_group()
