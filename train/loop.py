"""The training loop: one readable file from a config to a finished run folder.

    cfg = TrainConfig(data="fashion-mnist", out="runs/spe", method="specific", epochs=10)
    train(cfg)                 # = fit(prepare(cfg))

`prepare` does everything that can fail because of the user's input (data, levels, `--from`
runs, corrupt images) before any training starts; `fit` runs the epochs. The same code runs on
CPU, on one GPU (AMP, channels_last, torch.compile) and on many (torchrun + DDP).

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
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import nn

from common.atomic import atomic_open
from common.data import DataError, ImageDataset, load_dataset, stratified_split
from common.description import ModelDescription, Preprocessing, save_json_atomic
from common.images import ImageDecodeError, open_image, resize_and_crop

from . import augment
from .distributed import Dist, all_reduce_sum, barrier, cleanup, setup
from .models import ARCHITECTURES, Network, create_model, default_preprocessing
from .runs import save_atomic, save_run, versions

METHODS = ("specific", "generic", "multilevel", "finer", "fsft")
FINER_MODES = ("kmeans", "auto")
# The label-recipe arguments worth showing in the description for each method (the full recipe
# is kept under method_args["problem"], which fsft uses to rebuild the labels of its --from run).
_LEVEL_SOURCES = ("mapping", "group_by_clustering", "k")
METHOD_ARGS = {"specific": _LEVEL_SOURCES, "generic": ("level",) + _LEVEL_SOURCES,
               "multilevel": _LEVEL_SOURCES, "fsft": (),
               "finer": ("from", "finer_mode", "finer_k", "finer_min_size")}
CONFIG_FILE = "train_config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
# Options that may differ between an interrupted run and its --resume (they do not change results).
RESUME_MAY_DIFFER = {"resume", "device", "workers", "compile", "cache_gb"}


@dataclass
class TrainConfig:
    """Everything a run depends on. Saved to RUN_DIR/train_config.json and in the checkpoint."""

    data: str
    out: str
    method: str = "specific"
    level: str | None = None            # generic: level number (0 = coarsest) or name
    arch: str | None = None              # None: small_cnn, or the --from run's architecture
    arch_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    from_run: str | None = None          # finer, fsft
    mapping: str | None = None           # CSV: fine label, then its ancestors
    group_by_clustering: str | None = None  # a run whose class prototypes are clustered
    k: int = 10                          # number of groups for --group-by-clustering
    finer_mode: str = "kmeans"
    finer_k: int = 4
    finer_min_size: int = 20
    alpha: float = 0.1                   # fsft: lr factor of the kept layers
    reinit: int = 2                      # fsft: number of last blocks re-initialised
    epochs: int = 10
    batch_size: int = 64                 # per process (DDP: global batch = this x processes)
    lr: float | None = None              # None: 0.05 (sgd) or 1e-3 (adamw)
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float | None = None    # None: 5e-4 (sgd) or 0.05 (adamw)
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    loss_weights: list[float] | None = None  # multilevel: one per head, coarsest first
    seed: int = 0
    input_size: int | None = None        # None: the architecture's default
    hflip: bool = True
    augment: str = "standard"            # standard | strong (more crop, rotation, colour)
    val_fraction: float = 0.1            # hold-out when the data has no test split
    per_class: int | None = None         # at most this many images per leaf class and split
    workers: int = 0
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    resume: bool = False
    strict_images: bool = False
    cache_gb: float = 2.0                # decode images once into memory when under this size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


# =============================================================================================
# The problem: which images, which heads, which labels

@dataclass
class Problem:
    dataset: ImageDataset
    heads: list[dict]            # {"name", "classes", "level": index in dataset.levels or None}
    spec: dict                   # how the labels were made; enough to rebuild them (fsft)
    train_paths: list[str]
    train_targets: np.ndarray    # (N, heads) int64; -1 = no label for that head
    eval_paths: list[str]
    eval_targets: np.ndarray
    eval_name: str               # "test split", "hold-out 10%" or "none"
    eval_parents: list           # per head: leaf index of each class (finer heads) or None


def _log(dist: Dist | None, *msg) -> None:
    if dist is None or dist.is_main:
        print(*msg, file=sys.stderr, flush=True)


def resolve_level(dataset: ImageDataset, level) -> int:
    """Level number (0 = coarsest, negative from the leaf) or name -> index, as the description."""
    probe = ModelDescription(architecture="", feature_dim=0, preprocessing=Preprocessing(),
                             levels=dataset.levels)
    return probe.level_index(level)


def load_source_run(run_dir: str, what: str) -> ModelDescription:
    """The description of a `--from`/`--group-by-clustering` run, with a clear error if absent."""
    if not run_dir or not os.path.isdir(run_dir):
        raise ValueError(f"{what} {run_dir!r}: not a run folder (train one first with "
                         "`python cli.py train ... --out RUN_DIR`)")
    if not os.path.exists(os.path.join(run_dir, "model.pt")):
        raise ValueError(f"{what} {run_dir}: no model.pt; is that run finished?")
    return ModelDescription.load(run_dir)


def problem_spec(cfg: TrainConfig) -> dict:
    """The label recipe of a config (everything but the training hyper-parameters)."""
    return {"method": cfg.method, "level": cfg.level, "mapping": cfg.mapping,
            "group_by_clustering": cfg.group_by_clustering, "k": cfg.k,
            "from": cfg.from_run, "finer_mode": cfg.finer_mode, "finer_k": cfg.finer_k,
            "finer_min_size": cfg.finer_min_size, "seed": cfg.seed}


def _abs(path: str | None) -> str | None:
    return os.path.abspath(path) if path else path


def build_problem(dataset: ImageDataset, spec: dict, dist: Dist | None = None):
    """Apply a label recipe to a dataset: returns (dataset with its final levels, heads,
    targets(split, for_eval) -> (N, heads) array, the resolved recipe, per head the leaf class
    of each of its classes for finer heads, else None)."""
    spec = dict(spec)
    if spec.get("mapping"):
        from .levels import apply_mapping
        spec["mapping"] = _abs(spec["mapping"])
        dataset = apply_mapping(dataset, spec["mapping"])
    if spec.get("group_by_clustering"):
        from .levels import cluster_groups
        spec["group_by_clustering"] = _abs(spec["group_by_clustering"])
        load_source_run(spec["group_by_clustering"], "--group-by-clustering")
        _log(dist, f"clustering class prototypes of {spec['group_by_clustering']} into "
                   f"{spec['k']} groups")
        dataset = cluster_groups(spec["group_by_clustering"], dataset, int(spec["k"]),
                                 seed=int(spec.get("seed", 0)))
    levels = dataset.levels
    method = spec["method"]
    if method != "generic" and spec.get("level") is not None:
        raise ValueError(f"--level is for --method generic (got --method {method})")
    if method == "specific":
        head_levels = [len(levels) - 1]
    elif method == "generic":
        if spec.get("level") is not None:
            level = resolve_level(dataset, spec["level"])
        elif spec.get("group_by_clustering"):
            level = [lv.name for lv in levels].index(f"cluster{int(spec['k'])}")
        elif len(levels) >= 2:
            level = len(levels) - 2  # the parent of the leaf level
        else:
            raise ValueError(
                f"{dataset.name} has a single level ({levels[0].name}), so there is nothing "
                "more generic: nest the class folders, or give --mapping CSV, or "
                "--group-by-clustering RUN_DIR --k K")
        head_levels = [level]
        spec["level"] = level
    elif method == "multilevel":
        head_levels = list(range(len(levels)))
        if len(head_levels) < 2:
            raise ValueError(f"--method multilevel needs at least two levels; {dataset.name} "
                             f"has one ({levels[0].name}); see --mapping / --group-by-clustering")
    elif method == "finer":
        head_levels = []
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")

    heads = [{"name": levels[i].name, "classes": list(levels[i].classes), "level": i}
             for i in head_levels]
    finer_train: tuple[np.ndarray, list[str]] | None = None
    finer_split = "train" if "train" in dataset.splits else next(iter(dataset.splits))
    parents: list[np.ndarray | None] = [None] * len(heads)
    if method == "finer":
        from .levels import finer_labels, finer_parents
        spec["from"] = _abs(spec["from"])
        _log(dist, f"splitting classes into finer pseudo-classes with {spec['from']} "
                   f"({spec['finer_mode']})")
        # Pseudo-classes exist only where they were clustered (the training images); evaluation
        # scores the finer head on the leaf labels, summing its probabilities per leaf class.
        finer_train = finer_labels(
            spec["from"], dataset, finer_split, mode=spec["finer_mode"], k=int(spec["finer_k"]),
            min_size=int(spec["finer_min_size"]), seed=int(spec.get("seed", 0)))
        names = list(finer_train[1])
        heads = [{"name": f"{levels[-1].name}-finer", "classes": names, "level": None}]
        parents = [finer_parents(names, dataset)]

    for h in heads:
        if len(h["classes"]) < 2:
            raise ValueError(
                f"level {h['name']!r} has {len(h['classes'])} class ({', '.join(h['classes'])}); "
                "a classifier needs at least two: pick another level or add classes")

    def targets(split: str, for_eval: bool = False) -> np.ndarray:
        """(N, heads) labels of a split; a finer head's eval labels are leaf classes."""
        n = len(dataset.splits[split])
        cols = []
        for h in heads:
            if h["level"] is not None:
                cols.append(dataset.labels(split, h["level"]))
            elif for_eval or split != finer_split:
                cols.append(dataset.labels(split))
            else:
                cols.append(np.asarray(finer_train[0], dtype=np.int64))
        return np.stack(cols, axis=1).astype(np.int64) if cols else np.zeros((n, 0), np.int64)

    return dataset, heads, targets, spec, parents


def _limit_per_class(leaf_labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Indices keeping at most `per_class` items of each class (seeded, order preserved)."""
    idx = np.arange(len(leaf_labels))
    if not per_class:
        return idx
    rng = np.random.default_rng(seed)
    keep = [np.sort(rng.permutation(idx[leaf_labels == c])[:per_class])
            for c in np.unique(leaf_labels)]
    return np.sort(np.concatenate(keep)) if keep else idx


def load_problem(cfg: TrainConfig, dist: Dist | None = None) -> Problem:
    """Dataset + label recipe + train/eval split, with every input error raised here."""
    dataset = load_dataset(cfg.data)
    if dataset.empty_dirs:
        shown = ", ".join(dataset.empty_dirs[:5]) + (" ..." if len(dataset.empty_dirs) > 5 else "")
        raise DataError(f"{cfg.data}: {len(dataset.empty_dirs)} empty class folder(s): {shown}. "
                        "Put images in them or remove them")
    if cfg.method in ("finer", "fsft"):
        source = load_source_run(cfg.from_run, "--from")
        theirs = source.data.get("fingerprint")
        if theirs and theirs != dataset.fingerprint():
            raise ValueError(f"--from {cfg.from_run} was trained on other data "
                             f"({source.data.get('spec')}); {cfg.method} works on the data of "
                             "that run: pass its --data")
    if cfg.method == "fsft":
        spec = source.method_args.get("problem")
        if not spec:
            raise ValueError(f"--from {cfg.from_run}: that run (method {source.method!r}) was not "
                             "trained by `train`, so its source problem is unknown")
        spec = dict(spec, seed=spec.get("seed", cfg.seed))
    else:
        spec = problem_spec(cfg)
    dataset, heads, targets, spec, parents = build_problem(dataset, spec, dist)
    if cfg.method == "fsft":
        expected = [(h["name"], list(h["classes"])) for h in source.heads]
        if [(h["name"], h["classes"]) for h in heads] != expected:
            raise ValueError(f"--from {cfg.from_run}: rebuilding its labels on {cfg.data} gives "
                             "other heads/classes than the run has; use the run's data")

    if dataset.has_test_split:
        train_split, eval_split = "train", "test"
        tr_targets, ev_targets = targets("train"), targets("test", for_eval=True)
        tr_paths, ev_paths = dataset.paths("train"), dataset.paths("test")
        tr_leaf, ev_leaf = dataset.labels("train"), dataset.labels("test")
        eval_name = "test split"
    else:
        split = next(iter(dataset.splits))
        all_targets, all_paths, all_leaf = targets(split), dataset.paths(split), dataset.labels(split)
        all_eval_targets = targets(split, for_eval=True)
        if cfg.val_fraction > 0:
            tr, ev = stratified_split(all_leaf, cfg.val_fraction, seed=cfg.seed)
            eval_name = f"hold-out {cfg.val_fraction:.0%} (seed {cfg.seed})"
        else:
            tr, ev = np.arange(len(all_leaf)), np.arange(0)
            eval_name = "none"
        tr_targets, ev_targets = all_targets[tr], all_eval_targets[ev]
        tr_paths, ev_paths = [all_paths[i] for i in tr], [all_paths[i] for i in ev]
        tr_leaf, ev_leaf = all_leaf[tr], all_leaf[ev]
        if cfg.val_fraction > 0 and not len(ev):
            eval_name = "none (no class has two images to hold one out)"
    keep_tr = _limit_per_class(tr_leaf, cfg.per_class, cfg.seed)
    keep_ev = _limit_per_class(ev_leaf, cfg.per_class, cfg.seed + 1)
    return Problem(dataset, heads, spec, [tr_paths[i] for i in keep_tr], tr_targets[keep_tr],
                   [ev_paths[i] for i in keep_ev], ev_targets[keep_ev], eval_name, parents)


# =============================================================================================
# Images: decoded once into memory when they fit, else on the fly

def _decode(path: str, pre: Preprocessing) -> np.ndarray:
    return np.array(resize_and_crop(open_image(path, pre.background), pre), dtype=np.uint8)


def decode_all(paths: list[str], pre: Preprocessing, strict: bool, desc: str, dist: Dist | None
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every image once: (N', S, S, 3) uint8, indices kept, 'path: reason' of skipped."""
    from tqdm import tqdm
    s = pre.input_size
    pixels = np.empty((len(paths), s, s, 3), dtype=np.uint8)
    kept, skipped = [], []
    quiet = (dist is not None and not dist.is_main) or len(paths) < 2000
    for i, path in enumerate(tqdm(paths, desc=desc, unit="img", file=sys.stderr, leave=False,
                                  disable=quiet)):
        try:
            pixels[len(kept)] = _decode(path, pre)
        except ImageDecodeError as e:
            if strict:
                raise ImageDecodeError(f"{e} (--strict-images makes unreadable images fatal; "
                                       "drop the flag to skip them)") from e
            skipped.append(str(e))
            continue
        kept.append(i)
    return pixels[: len(kept)], np.array(kept, dtype=np.int64), skipped


class ImageSet(torch.utils.data.Dataset):
    """(image tensor, targets) pairs; pixels from memory, or decoded per access (None = bad).

    With `augment_seed` set (per epoch), the random augmentation of item i is a function of
    (augment_seed, i) alone: the same whatever the number of workers or processes.
    """

    def __init__(self, paths: list[str], targets: np.ndarray, pre: Preprocessing, transform,
                 pixels: np.ndarray | None = None, strict: bool = False):
        self.paths, self.targets, self.pre, self.transform = paths, targets, pre, transform
        self.pixels, self.strict = pixels, strict
        self.augment_seed: int | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if self.pixels is not None:
            hwc = self.pixels[i]
        else:
            try:
                hwc = _decode(self.paths[i], self.pre)
            except ImageDecodeError:
                if self.strict:
                    raise
                return None
        if self.augment_seed is not None:  # torchvision transforms draw from this generator
            torch.default_generator.manual_seed((self.augment_seed * 1_000_003 + i) % 2**63)
        x = self.transform(torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1))
        return x, torch.from_numpy(self.targets[i])


def collate_skipping(batch):
    """Default collation without the unreadable items; also returns how many were dropped."""
    good = [b for b in batch if b is not None]
    if not good:
        return None, None, len(batch)
    x, y = torch.utils.data.default_collate(good)
    return x, y, len(batch) - len(good)


def make_image_sets(cfg: TrainConfig, problem: Problem, pre: Preprocessing, dist: Dist | None
                    ) -> tuple[ImageSet, ImageSet, list[str]]:
    """Train set (augmented, stored as resize_size squares) and eval set (exact preprocess crop)."""
    train_pre = Preprocessing.from_dict(dict(vars(pre), input_size=max(pre.resize_size,
                                                                        pre.input_size)))
    nbytes = 3 * (len(problem.train_paths) * train_pre.input_size ** 2
                  + len(problem.eval_paths) * pre.input_size ** 2)
    train_tf = augment.train_transform(pre, hflip=cfg.hflip, strength=cfg.augment)
    eval_tf = augment.eval_transform(pre)
    if nbytes > cfg.cache_gb * 1e9:
        _log(dist, f"images decoded on the fly ({nbytes / 1e9:.1f} GB > --cache-gb {cfg.cache_gb}); "
                   "unreadable ones are skipped as met")
        return (ImageSet(problem.train_paths, problem.train_targets, train_pre, train_tf,
                         strict=cfg.strict_images),
                ImageSet(problem.eval_paths, problem.eval_targets, pre, eval_tf,
                         strict=cfg.strict_images), [])
    tr_pix, tr_keep, tr_bad = decode_all(problem.train_paths, train_pre, cfg.strict_images,
                                         "decoding train images", dist)
    ev_pix, ev_keep, ev_bad = decode_all(problem.eval_paths, pre, cfg.strict_images,
                                         "decoding eval images", dist)
    skipped = tr_bad + ev_bad
    if skipped:
        _log(dist, f"skipped {len(skipped)} unreadable image(s) (use --strict-images to stop "
                   "instead); first ones:\n  " + "\n  ".join(skipped[:5]))
    train_set = ImageSet([problem.train_paths[i] for i in tr_keep], problem.train_targets[tr_keep],
                         train_pre, train_tf, tr_pix)
    eval_set = ImageSet([problem.eval_paths[i] for i in ev_keep], problem.eval_targets[ev_keep],
                        pre, eval_tf, ev_pix)
    return train_set, eval_set, skipped


# =============================================================================================
# Model, optimiser, schedule

def check_source_arch(cfg: TrainConfig, arch: str) -> None:
    """`--from` must name a run of the same architecture and data."""
    if cfg.method not in ("finer", "fsft"):
        return
    source = load_source_run(cfg.from_run, "--from")
    if source.architecture != arch:
        raise ValueError(f"--from {cfg.from_run} is a {source.architecture} run but this run is "
                         f"{arch}; use --arch {source.architecture} (or leave --arch out)")


def build_model(cfg: TrainConfig, heads: list[dict], arch: str) -> tuple[Network, dict]:
    """Seeded model; fsft starts from the --from run's weights (its own arch kwargs)."""
    arch_kwargs = dict(cfg.arch_kwargs)
    if cfg.method in ("fsft", "finer"):  # finer: same width as --from unless overridden
        source = ModelDescription.load(cfg.from_run)
        arch_kwargs = dict(source.arch_kwargs, **arch_kwargs)
    torch.manual_seed(cfg.seed)
    model = create_model(arch, [len(h["classes"]) for h in heads], **arch_kwargs)
    if cfg.method == "fsft":
        weights = os.path.join(cfg.from_run, "model.pt")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    elif cfg.pretrained:
        from .pretrained import load_pretrained
        load_pretrained(model.backbone, arch)
    return model, arch_kwargs


def make_optimizer(cfg: TrainConfig, model: Network) -> torch.optim.Optimizer:
    lr = cfg.lr if cfg.lr is not None else (0.05 if cfg.optimizer == "sgd" else 1e-3)
    wd = cfg.weight_decay
    if wd is None:
        wd = 5e-4 if cfg.optimizer == "sgd" else 0.05
    if cfg.method == "fsft":
        from .fsft import fsft_param_groups
        groups = fsft_param_groups(model, cfg.reinit, cfg.alpha, lr, cfg.seed)
    else:  # no weight decay on biases and normalisation parameters
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2]},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
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


# =============================================================================================
# RNG state as plain tensors/lists (loadable with weights_only=True)

def rng_state() -> dict:
    key, mt, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"key": key, "state": torch.from_numpy(mt.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_epoch(seed: int, epoch: int) -> None:
    """Augmentation and dropout randomness as a function of (seed, epoch) only."""
    s = seed * 100_003 + epoch
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


# =============================================================================================
# Prepare and fit

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
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")
    if cfg.method in ("finer", "fsft") and not cfg.from_run:
        raise ValueError(f"--method {cfg.method} needs --from RUN_DIR (a finished run)")
    if cfg.finer_mode not in FINER_MODES:
        raise ValueError(f"--finer-mode must be one of {', '.join(FINER_MODES)}")
    if cfg.amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"--amp must be none, bf16 or fp16, not {cfg.amp!r}")
    if cfg.amp == "fp16" and dist.device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    if cfg.epochs < 0 or cfg.batch_size < 1:
        raise ValueError("--epochs must be >= 0 and --batch-size >= 1")
    run_dir = cfg.out
    started = os.path.exists(os.path.join(run_dir, CHECKPOINT)) or \
        os.path.exists(os.path.join(run_dir, "model.pt"))
    if started and not cfg.resume:
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or choose "
                         "another --out")
    if cfg.resume:
        _check_resumable(cfg)

    arch = cfg.arch
    if arch is None:
        arch = (ModelDescription.load(cfg.from_run).architecture
                if cfg.method in ("finer", "fsft") and cfg.from_run
                and os.path.exists(os.path.join(cfg.from_run, "description.json")) else "small_cnn")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    check_source_arch(cfg, arch)
    problem = load_problem(cfg, dist)
    if loss_weights := cfg.loss_weights:
        if len(loss_weights) != len(problem.heads):
            names = ", ".join(h["name"] for h in problem.heads)
            raise ValueError(f"--loss-weights has {len(loss_weights)} values for "
                             f"{len(problem.heads)} heads ({names})")

    pre = default_preprocessing(arch, cfg.input_size)
    if cfg.method == "fsft" or (cfg.method == "finer" and cfg.input_size is None):
        # Same input as the --from run unless asked otherwise, so that the two networks can be
        # combined at export (SpeFiNet, MulDiP+FSFT need one shared preprocessing).
        pre = ModelDescription.load(cfg.from_run).preprocessing
    model, arch_kwargs = build_model(cfg, problem.heads, arch)
    model.to(dist.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)  # fsft re-initialises its last blocks here
    train_set, eval_set, skipped = make_image_sets(cfg, problem, pre, dist)
    if len(train_set) == 0:
        raise DataError(f"{cfg.data}: no readable training images")

    method_args = {k: v for k, v in problem.spec.items()
                   if k in METHOD_ARGS[cfg.method] and v is not None}
    if not method_args.get("group_by_clustering"):
        method_args.pop("k", None)
    method_args.update(seed=cfg.seed, pretrained=cfg.pretrained, problem=problem.spec)
    if cfg.method == "fsft":
        method_args.update({"from": _abs(cfg.from_run), "alpha": cfg.alpha, "reinit": cfg.reinit})
    if cfg.method == "multilevel":
        method_args["loss_weights"] = cfg.loss_weights or [1.0] * len(problem.heads)
    ds = problem.dataset
    desc = ModelDescription(
        architecture=arch, feature_dim=model.feature_dim, preprocessing=pre, levels=ds.levels,
        heads=problem.heads, arch_kwargs=arch_kwargs, method=cfg.method, method_args=method_args,
        data={"spec": cfg.data, "name": ds.name, "fingerprint": ds.fingerprint(),
              "num_images": len(train_set), "num_eval_images": len(eval_set),
              "eval": problem.eval_name, "skipped": len(skipped), "skipped_examples": skipped[:5],
              "per_class": cfg.per_class},
        source_runs=[_abs(p) for p in (cfg.from_run, problem.spec.get("group_by_clustering")) if p],
        versions=versions(),
        extra={"train_config": cfg.to_dict(), "augmentation": augment.describe(pre, cfg.hflip, cfg.augment)})
    return Plan(cfg, dist, problem, train_set, eval_set, model, optimizer, desc, skipped)


# Options naming files or folders: `./run`, `run/` and `/abs/run` are the same run folder.
PATH_OPTIONS = {"out", "data", "from_run", "mapping", "group_by_clustering"}


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
        os.makedirs(run_dir, exist_ok=True)
        save_json_atomic(os.path.join(run_dir, CONFIG_FILE), cfg.to_dict())
        head_list = ", ".join(f"{h['name']} ({len(h['classes'])})" for h in plan.problem.heads)
        _log(dist, f"{plan.problem.dataset.summary()}\ntraining {plan.desc.architecture} "
                   f"({cfg.method}; heads {head_list}) "
                   f"on {len(plan.train_set)} images, evaluating on {len(plan.eval_set)} "
                   f"({plan.problem.eval_name}); device {dist.device}, {dist.world_size} process(es)")

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
    start_epoch = 0
    if cfg.resume:
        ckpt = torch.load(os.path.join(run_dir, CHECKPOINT), map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start_epoch = int(ckpt["epoch"])
        _log(dist, f"resuming after epoch {start_epoch}/{cfg.epochs}")
        if dist.is_main:
            _truncate_metrics(os.path.join(run_dir, METRICS), start_epoch)
    elif dist.is_main and os.path.exists(os.path.join(run_dir, METRICS)):
        os.unlink(os.path.join(run_dir, METRICS))

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
        loader = torch.utils.data.DataLoader(
            plan.train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
            pin_memory=dist.device.type == "cuda", drop_last=drop_last, collate_fn=collate_skipping,
            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
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
        record = {"epoch": epoch + 1, "lr": max(g["lr"] for g in optimizer.param_groups),
                  "train_loss": sums[0] / max(1.0, sums[1]),
                  "train_acc": {h: sums[2 + 2 * i] / max(1.0, sums[3 + 2 * i])
                                for i, h in enumerate(heads)},
                  "images_per_s": sums[1] / max(train_seconds, 1e-9), "skipped_images": int(sums[-1])}
        if len(plan.eval_set):
            eval_loss, eval_acc = evaluate(model, plan.eval_set, cfg, dist, weights,
                                           plan.problem.eval_parents,
                                           len(plan.problem.dataset.leaf_classes))
            record.update(eval_loss=eval_loss, eval_acc=dict(zip(heads, eval_acc)))
        record["seconds"] = time.perf_counter() - t0
        if dist.is_main:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "epoch": epoch + 1, "rng": rng_state(), "config": cfg.to_dict()},
                        os.path.join(run_dir, CHECKPOINT))
            with open(os.path.join(run_dir, METRICS), "a") as f:
                f.write(json.dumps(record) + "\n")
            _log(dist, _format_record(record, cfg.epochs))
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)

    if dist.is_main:
        metrics = read_metrics(run_dir)
        plan.desc.extra["final_metrics"] = metrics[-1] if metrics else {}
        plan.desc.extra["epochs_trained"] = cfg.epochs
        if plan.train_set.pixels is None and metrics:  # decoded on the fly: counted per epoch
            plan.desc.data["skipped"] = metrics[-1]["skipped_images"]
        save_run(model.cpu(), plan.desc, run_dir)
        if metrics:
            plot_curves(metrics, os.path.join(run_dir, "curves.png"))
        _log(dist, f"run written to {run_dir}")
    barrier(dist)
    return run_dir


def _format_record(r: dict, epochs: int) -> str:
    accs = " ".join(f"{h} {a:.3f}" for h, a in r["train_acc"].items())
    line = f"epoch {r['epoch']}/{epochs}: train loss {r['train_loss']:.4f} acc [{accs}]"
    if "eval_acc" in r:
        line += (f" | eval loss {r['eval_loss']:.4f} acc ["
                 + " ".join(f"{h} {a:.3f}" for h, a in r["eval_acc"].items()) + "]")
    return line + f" | {r['images_per_s']:.0f} img/s, {r['seconds']:.1f}s"


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(path: str, epochs_done: int) -> None:
    """Keep the metrics of the epochs the checkpoint contains (a crash may have left more)."""
    if os.path.exists(path):
        kept = [r for r in read_metrics(os.path.dirname(path)) if r["epoch"] <= epochs_done]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)


def plot_curves(metrics: list[dict], path: str) -> None:
    """Loss and per-head accuracy, train (solid) and eval (dashed), against epochs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [m["train_loss"] for m in metrics], "-o", label="train")
    if "eval_loss" in metrics[0]:
        ax_loss.plot(epochs, [m["eval_loss"] for m in metrics], "--o", label="eval")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    for head in metrics[0]["train_acc"]:
        line, = ax_acc.plot(epochs, [m["train_acc"][head] for m in metrics], "-o",
                            label=f"{head} train")
        if "eval_acc" in metrics[0]:
            ax_acc.plot(epochs, [m["eval_acc"][head] for m in metrics], "--o",
                        color=line.get_color(), label=f"{head} eval")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy per head", ylim=(0, 1))
    ax_acc.legend(fontsize="small")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
