"""The training loop: one readable file from a config to a finished run folder.

    cfg = TrainConfig(data="fashion-mnist", out="runs/spe", method="specific", epochs=10)
    train(cfg)                 # = fit(prepare(cfg))

`prepare` does everything that can fail because of the user's input (data, levels, `--from`
runs, corrupt images) before any training starts; `fit` runs the epochs. The same code runs on
CPU, on one GPU (AMP, channels_last, torch.compile) and on many (torchrun + DDP). What differs
between methods (heads, labels, initial weights, parameter groups) is in `train.methods`; the
parts the loop uses are `config`, `problem` (labels and splits), `imagesets`, `optim`,
`reproducible` (RNG state) and `metrics`.

Reproducibility: the data order is a function of (seed, epoch) (DistributedSampler), each
image's augmentation a function of (seed, epoch, index) whatever the number of workers, and the
other RNGs are reseeded from (seed, epoch) at the start of every epoch, so a run interrupted
after epoch k and resumed from its checkpoint ends with the same weights as one that was never
interrupted (on CPU; cuDNN autotuning makes GPU runs only approximately repeatable).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from common.data import DataError
from common.description import ModelDescription, save_json_atomic

from . import augment
from .config import CHECKPOINT, CONFIG_FILE, FINER_MODES, METRICS, RESUME_MAY_DIFFER, TrainConfig
from .distributed import Dist, all_reduce_sum, barrier, cleanup, setup
from .imagesets import ImageSet, collate_skipping, make_image_sets
from .methods import absolute, get_method, load_source, log
from .metrics import format_record, plot_curves, read_metrics, truncate_metrics
from .models import Network, check_arch, create_model
from .optim import make_optimizer, make_schedule
from .problem import Problem, load_problem
from .reproducible import rng_state, seed_epoch, set_rng_state
from .runs import save_atomic, save_run, versions

__all__ = ["TrainConfig", "CHECKPOINT", "prepare", "fit", "train"]


@dataclass
class Plan:
    """A validated, ready-to-train run: config, data, model and its description."""
    cfg: TrainConfig
    dist: Dist
    problem: Problem
    train_set: ImageSet
    eval_set: ImageSet
    model: Network
    optimizer: torch.optim.Optimizer
    desc: ModelDescription
    skipped: list[str]


def prepare(cfg: TrainConfig, dist: Dist | None = None) -> Plan:
    """Validate everything and load the data; raises ValueError (DataError, ImageDecodeError),
    FileNotFoundError or ImportError with a message for the user before any training."""
    dist = dist or setup(cfg.device)
    method = get_method(cfg.method)
    if cfg.finer_mode not in FINER_MODES:
        raise ValueError(f"--finer-mode must be one of {', '.join(FINER_MODES)}")
    if cfg.amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"--amp must be none, bf16 or fp16, not {cfg.amp!r}")
    if cfg.amp == "fp16" and dist.device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    if cfg.epochs < 0 or cfg.batch_size < 1:
        raise ValueError("--epochs must be >= 0 and --batch-size >= 1")
    started = os.path.exists(os.path.join(cfg.out, CHECKPOINT)) or \
        os.path.exists(os.path.join(cfg.out, "model.pt"))
    if started and not cfg.resume:
        raise ValueError(f"{cfg.out} already holds a run; pass --resume to continue it or choose "
                         "another --out")
    if cfg.resume:
        _check_resumable(cfg)

    source = load_source(cfg) if method.needs_source else None  # the --from run, read once here
    arch = cfg.arch or (source.desc.architecture if source else "small_cnn")
    check_arch(arch)
    if source and source.desc.architecture != arch:
        raise ValueError(f"--from {cfg.from_run} is a {source.desc.architecture} run but this run "
                         f"is {arch}; use --arch {source.desc.architecture} (or leave --arch out)")
    problem = load_problem(cfg, method, source, dist)
    if cfg.loss_weights and len(cfg.loss_weights) != len(problem.heads):
        names = ", ".join(h["name"] for h in problem.heads)
        raise ValueError(f"--loss-weights has {len(cfg.loss_weights)} values for "
                         f"{len(problem.heads)} heads ({names})")

    pre = method.preprocessing(cfg, arch, source)
    arch_kwargs = method.arch_kwargs(cfg, source)
    torch.manual_seed(cfg.seed)
    model = create_model(arch, [len(h["classes"]) for h in problem.heads], **arch_kwargs)
    method.init_weights(cfg, model, arch, source)
    model.to(dist.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model, method)  # fsft re-initialises its last blocks here
    train_set, eval_set, skipped = make_image_sets(cfg, problem, pre, dist)
    if len(train_set) == 0:
        raise DataError(f"{cfg.data}: no readable training images")

    ds = problem.dataset
    desc = ModelDescription(
        architecture=arch, feature_dim=model.feature_dim, preprocessing=pre, levels=ds.levels,
        heads=problem.heads, arch_kwargs=arch_kwargs, method=cfg.method,
        method_args=method.description_args(cfg, problem.spec, problem.heads),
        data={"spec": cfg.data, "name": ds.name, "fingerprint": ds.fingerprint(),
              "num_images": len(train_set), "num_eval_images": len(eval_set),
              "eval": problem.eval_name, "skipped": len(skipped), "skipped_examples": skipped[:5],
              "per_class": cfg.per_class},
        source_runs=[absolute(p) for p in (cfg.from_run, problem.spec.get("group_by_clustering"))
                     if p],
        versions=versions(),
        extra={"train_config": cfg.to_dict(), "augmentation": augment.describe(pre, cfg.hflip, cfg.augment)})
    return Plan(cfg, dist, problem, train_set, eval_set, model, optimizer, desc, skipped)


# Options naming files or folders: `./run`, `run/` and `/abs/run` are the same run folder.
PATH_OPTIONS = {"out", "data", "from_run", "mapping", "group_by_clustering", "weights"}


def _same_option(key: str, saved, now) -> bool:
    if saved == now:
        return True
    if key in PATH_OPTIONS and isinstance(saved, str) and isinstance(now, str) \
            and os.path.exists(now):
        return os.path.realpath(saved) == os.path.realpath(now)
    return False


def _check_resumable(cfg: TrainConfig) -> None:
    path = os.path.join(cfg.out, CONFIG_FILE)
    if not os.path.exists(os.path.join(cfg.out, CHECKPOINT)) or not os.path.exists(path):
        raise ValueError(f"--resume: {cfg.out} has no {CHECKPOINT} to resume from")
    with open(path) as f:
        saved = json.load(f)
    now = cfg.to_dict()
    differ = [k for k in now if k not in RESUME_MAY_DIFFER
              and not _same_option(k, saved.get(k), now[k])]
    if differ:
        raise ValueError("--resume with other options than the interrupted run: " + ", ".join(
            f"{k}={now[k]!r} (was {saved.get(k)!r})" for k in differ))


def train(cfg: TrainConfig, on_epoch_end: Callable[[int, dict], None] | None = None) -> str:
    """Prepare and fit; returns the run folder."""
    dist = setup(cfg.device)
    try:
        return fit(prepare(cfg, dist), on_epoch_end)
    finally:
        cleanup(dist)


def _loss_and_stats(logits: list[torch.Tensor], y: torch.Tensor, weights: list[float],
                    criterion: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of the heads' mean CE (labels -1 ignored), and on the same device, without a
    host sync: [loss * n, n, then (correct, labelled) per head]."""
    loss = torch.zeros((), device=y.device)
    stats = [torch.tensor(float(len(y)), device=y.device)]
    for h, (out, w) in enumerate(zip(logits, weights)):
        target = y[:, h]
        labelled = (target >= 0).sum()
        loss = loss + w * criterion(out.float(), target) / labelled.clamp(min=1)
        stats += [((out.argmax(1) == target) & (target >= 0)).sum().float(), labelled.float()]
    stats = torch.stack([loss.detach() * len(y)] + stats).double()
    return loss, stats


def sum_per_parent(logits: torch.Tensor, parents: torch.Tensor, n_parents: int) -> torch.Tensor:
    """Logits over finer classes -> logits over their parent classes (probabilities summed)."""
    top = logits.max(dim=1, keepdim=True).values
    summed = torch.zeros(len(logits), n_parents, device=logits.device, dtype=torch.float32)
    summed.index_add_(1, parents, (logits.float() - top).exp())
    return summed.clamp_min(1e-30).log() + top


@torch.no_grad()
def evaluate(model: Network, eval_set: ImageSet, cfg: TrainConfig, dist: Dist,
             weights: list[float], parents: list | None = None, n_parents: int = 0
             ) -> tuple[float, list[float]]:
    """Loss and accuracy per head on this process's shard of the eval set, summed over processes.
    A head with `parents` (finer pseudo-classes) is scored on the parent (leaf) labels."""
    model.eval()
    parents = [None if p is None else torch.as_tensor(p, device=dist.device)
               for p in (parents or [None] * len(weights))]
    idx = list(range(dist.rank, len(eval_set), dist.world_size))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(eval_set, idx),
                                         batch_size=cfg.batch_size * 2, num_workers=cfg.workers,
                                         pin_memory=dist.device.type == "cuda",
                                         collate_fn=collate_skipping)
    criterion = nn.CrossEntropyLoss(ignore_index=-1, reduction="sum")
    sums = torch.zeros(2 + 2 * len(weights), dtype=torch.float64, device=dist.device)
    for x, y, _ in loader:
        if x is None:
            continue
        x, y = _to_device(x, y, cfg, dist)
        with _autocast(cfg, dist):
            logits = model(x)
        logits = [out if p is None else sum_per_parent(out, p, n_parents)
                  for out, p in zip(logits, parents)]
        sums += _loss_and_stats(logits, y, weights, criterion)[1]
    sums = all_reduce_sum(sums.tolist(), dist)
    accs = [sums[2 + 2 * h] / max(1.0, sums[3 + 2 * h]) for h in range(len(weights))]
    return sums[0] / max(1.0, sums[1]), accs


def _to_device(x, y, cfg: TrainConfig, dist: Dist):
    x = x.to(dist.device, non_blocking=True)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(dist.device, non_blocking=True)


def _autocast(cfg: TrainConfig, dist: Dist):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    return torch.autocast(dist.device.type, dtype=dtype, enabled=dtype is not None)


def fit(plan: Plan, on_epoch_end: Callable[[int, dict], None] | None = None) -> str:
    """Run the epochs of a prepared plan; write checkpoints, metrics, model and curves."""
    from tqdm import tqdm

    cfg, dist, model, run_dir = plan.cfg, plan.dist, plan.model, plan.cfg.out
    heads = [h["name"] for h in plan.problem.heads]
    weights = list(cfg.loss_weights or [1.0] * len(heads))
    if dist.is_main:
        _start_run(plan)

    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sampler = torch.utils.data.DistributedSampler(plan.train_set, num_replicas=dist.world_size,
                                                  rank=dist.rank, shuffle=True, seed=cfg.seed)
    per_process = math.ceil(len(plan.train_set) / dist.world_size)
    drop_last = per_process > cfg.batch_size  # a last batch of 1 would break batch norm
    steps_per_epoch = per_process // cfg.batch_size if drop_last else 1
    optimizer = plan.optimizer
    scheduler = make_schedule(cfg, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.amp == "fp16")
    start_epoch = _resume(plan, optimizer, scheduler, scaler)

    step_model = torch.compile(model) if cfg.compile else model
    if dist.enabled:
        step_model = nn.parallel.DistributedDataParallel(
            step_model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, ignore_index=-1,
                                    reduction="sum")  # divided by the labelled count per head

    for epoch in range(start_epoch, cfg.epochs):
        seed_epoch(cfg.seed, epoch)
        sampler.set_epoch(epoch)
        plan.train_set.augment_seed = cfg.seed * 100_003 + epoch
        loader = _epoch_loader(plan, sampler, epoch, drop_last)
        model.train()
        sums = torch.zeros(2 + 2 * len(heads), dtype=torch.float64, device=dist.device)
        skipped = 0
        t0 = time.perf_counter()
        bar = tqdm(total=len(loader) * cfg.batch_size * dist.world_size, unit="img",
                   unit_scale=True, desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr,
                   disable=not dist.is_main, leave=False, dynamic_ncols=True)
        for step, (x, y, n_skipped) in enumerate(loader):
            skipped += n_skipped
            if x is None:
                continue
            x, y = _to_device(x, y, cfg, dist)
            with _autocast(cfg, dist):
                logits = step_model(x)
            loss, stats = _loss_and_stats(logits, y, weights, criterion)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            sums += stats
            bar.update(len(x) * dist.world_size)
            if step % 20 == 0:  # reading the loss waits for the GPU: not at every step
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        train_seconds = time.perf_counter() - t0
        sums = all_reduce_sum(sums.tolist() + [skipped], dist)
        record = _train_record(epoch, optimizer, sums, heads, train_seconds)
        if len(plan.eval_set):
            eval_loss, eval_acc = evaluate(model, plan.eval_set, cfg, dist, weights,
                                           plan.problem.eval_parents,
                                           len(plan.problem.dataset.leaf_classes))
            record.update(eval_loss=eval_loss, eval_acc=dict(zip(heads, eval_acc)))
        record["seconds"] = time.perf_counter() - t0
        if dist.is_main:
            _save_epoch(plan, record, optimizer, scheduler, scaler)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)

    if dist.is_main:
        _finish_run(plan)
    barrier(dist)
    return run_dir


def _epoch_loader(plan: Plan, sampler, epoch: int, drop_last: bool):
    """This epoch's batches, shuffled by the sampler and augmented from a seed per epoch."""
    cfg, dist = plan.cfg, plan.dist
    return torch.utils.data.DataLoader(
        plan.train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
        pin_memory=dist.device.type == "cuda", drop_last=drop_last, collate_fn=collate_skipping,
        generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))


def _train_record(epoch: int, optimizer, sums: list, heads: list[str],
                  train_seconds: float) -> dict:
    """The epoch's training figures from the summed statistics: [loss sum, images, then per head
    correct and labelled, ..., skipped images]."""
    return {"epoch": epoch + 1, "lr": max(g["lr"] for g in optimizer.param_groups),
            "train_loss": sums[0] / max(1.0, sums[1]),
            "train_acc": {h: sums[2 + 2 * i] / max(1.0, sums[3 + 2 * i])
                          for i, h in enumerate(heads)},
            "images_per_s": sums[1] / max(train_seconds, 1e-9), "skipped_images": int(sums[-1])}


def _start_run(plan: Plan) -> None:
    """The run folder and its config, and one line saying what is about to be trained."""
    cfg, dist = plan.cfg, plan.dist
    os.makedirs(cfg.out, exist_ok=True)
    save_json_atomic(os.path.join(cfg.out, CONFIG_FILE), cfg.to_dict())
    head_list = ", ".join(f"{h['name']} ({len(h['classes'])})" for h in plan.problem.heads)
    log(dist, f"{plan.problem.dataset.summary()}\ntraining {plan.desc.architecture} "
               f"({cfg.method}; heads {head_list}) "
               f"on {len(plan.train_set)} images, evaluating on {len(plan.eval_set)} "
               f"({plan.problem.eval_name}); device {dist.device}, {dist.world_size} process(es)")


def _resume(plan: Plan, optimizer, scheduler, scaler) -> int:
    """The epoch to start from: 0, or the checkpoint's with --resume (model, optimizer,
    schedule, scaler and random state restored, later metrics lines dropped)."""
    cfg, dist, run_dir = plan.cfg, plan.dist, plan.cfg.out
    if not cfg.resume:
        if dist.is_main and os.path.exists(os.path.join(run_dir, METRICS)):
            os.unlink(os.path.join(run_dir, METRICS))
        return 0
    ckpt = torch.load(os.path.join(run_dir, CHECKPOINT), map_location="cpu", weights_only=True)
    plan.model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    start_epoch = int(ckpt["epoch"])
    log(dist, f"resuming after epoch {start_epoch}/{cfg.epochs}")
    if dist.is_main:
        truncate_metrics(os.path.join(run_dir, METRICS), start_epoch)
    return start_epoch


def _save_epoch(plan: Plan, record: dict, optimizer, scheduler, scaler) -> None:
    """The checkpoint to resume from after this epoch, and its line of metrics."""
    cfg, run_dir = plan.cfg, plan.cfg.out
    save_atomic({"model": plan.model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                 "epoch": record["epoch"], "rng": rng_state(), "config": cfg.to_dict()},
                os.path.join(run_dir, CHECKPOINT))
    with open(os.path.join(run_dir, METRICS), "a") as f:
        f.write(json.dumps(record) + "\n")
    log(plan.dist, format_record(record, cfg.epochs))


def _finish_run(plan: Plan) -> None:
    """The trained run: model and description (with the final metrics) and the curves."""
    run_dir = plan.cfg.out
    metrics = read_metrics(run_dir)
    plan.desc.extra["final_metrics"] = metrics[-1] if metrics else {}
    plan.desc.extra["epochs_trained"] = plan.cfg.epochs
    if plan.train_set.pixels is None and metrics:  # decoded on the fly: counted per epoch
        plan.desc.data["skipped"] = metrics[-1]["skipped_images"]
    save_run(plan.model.cpu(), plan.desc, run_dir)
    if metrics:
        plot_curves(metrics, os.path.join(run_dir, "curves.png"))
    log(plan.dist, f"run written to {run_dir}")
