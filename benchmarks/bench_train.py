#!/usr/bin/env python
"""Training throughput (images/s) per architecture, on real images.

Times full training steps (forward, backward, SGD update) on a batch of real images from a
dataset, decoded and resized by the reference transform to each architecture's input size.
On CUDA it also compares, in the same run, ResNet-50 at 224 px in fp32 against bf16 autocast
with channels_last.

    python -m benchmarks.bench_train                               # small_cnn + resnet18 on CPU
    python -m benchmarks.bench_train --archs small_cnn,mobilenet_v3_small --steps 3
    python -m benchmarks.bench_train --archs all --device cuda --batch-size 128 --steps 20
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from torch import nn

from common.data import load_dataset
from common.images import preprocess
from train.models import ARCHITECTURES, create_model, default_preprocessing


def real_batch(paths: list[str], arch: str, batch_size: int, input_size: int | None) -> torch.Tensor:
    """`batch_size` real images (cycled if fewer), preprocessed as the architecture expects."""
    pre = default_preprocessing(arch, input_size)
    images = [preprocess(paths[i % len(paths)], pre) for i in range(batch_size)]
    return torch.from_numpy(np.stack(images))


def images_per_second(arch: str, x: torch.Tensor, device: torch.device, steps: int, warmup: int,
                      amp: str = "none", channels_last: bool = False) -> float:
    """Mean training throughput over `steps` timed steps after `warmup` untimed ones."""
    torch.manual_seed(0)
    model = create_model(arch, [10]).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(device)
    y = torch.arange(len(x), device=device) % 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    criterion = nn.CrossEntropyLoss()

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = criterion(model(x)[0].float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * len(x) / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="small_cnn,resnet18",
                        help="comma-separated names, or 'all' (%(default)s)")
    parser.add_argument("--data", default="fashion-mnist:per_class=20",
                        help="source of real images (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per architecture")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--input-size", type=int, default=None,
                        help="override every architecture's input size")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (1 avoids OpenMP contention on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        import train.efficientnet  # noqa: F401  registers efficientnet_lite0 when present
    except ImportError:
        pass
    archs = list(ARCHITECTURES) if args.archs == "all" else args.archs.split(",")
    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        parser.error(f"unknown architecture(s) {unknown}; choose from {', '.join(ARCHITECTURES)}")
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dataset = load_dataset(args.data)
    paths = dataset.paths(next(iter(dataset.splits)))
    where = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"training throughput on {where}; batch {args.batch_size}, {args.steps} timed steps, "
          f"real images from {args.data}")

    rows = []
    for arch in archs:
        x = real_batch(paths, arch, args.batch_size, args.input_size)
        rate = images_per_second(arch, x, device, args.steps, args.warmup)
        rows.append((arch, x.shape[-1], "fp32", rate))
        print(f"  {arch}: {rate:.1f} img/s", file=sys.stderr, flush=True)
    if device.type == "cuda":  # mixed precision + channels_last against fp32, same run
        x = real_batch(paths, "resnet50", args.batch_size, 224)
        for amp, cl, label in (("none", False, "fp32"), ("bf16", True, "bf16+channels_last"),
                               ("fp16", True, "fp16+channels_last")):
            rows.append(("resnet50", 224, label,
                         images_per_second("resnet50", x, device, args.steps, args.warmup, amp, cl)))

    print(f"\n{'architecture':<22}{'px':>5}  {'precision':<20}{'images/s':>10}")
    for arch, px, precision, rate in rows:
        print(f"{arch:<22}{px:>5}  {precision:<20}{rate:>10.1f}")


if __name__ == "__main__":
    main()
