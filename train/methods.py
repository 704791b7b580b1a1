"""Training methods by name, as `train.models` registers architectures.

A method decides what a run learns and where it starts: which heads (label levels, or finer
pseudo-classes), the label recipe, the input and width it inherits from a `--from` run, the initial
weights, the optimiser's parameter groups and what the model description records about it.

    method = get_method("fsft")
    source = load_source(cfg) if method.needs_source else None   # the --from run, read once

The loop calls these hooks and never branches on the method's name.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from common.data import ImageDataset
from common.description import ModelDescription, Preprocessing

from .config import TrainConfig
from .distributed import Dist
from .models import Network, default_preprocessing

METHODS: dict[str, Method] = {}

# The label-recipe arguments worth showing in the description (the full recipe is kept under
# method_args["problem"], which fsft uses to rebuild the labels of its --from run).
LEVEL_SOURCES = ("mapping", "group_by_clustering", "k")


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def log(dist: Dist | None, *msg) -> None:
    if dist is None or dist.is_main:
        print(*msg, file=sys.stderr, flush=True)


def absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else path


# =============================================================================================
# The --from run

@dataclass(frozen=True)
class SourceRun:
    """A finished run a method starts from, read once: its folder and its description."""
    run_dir: str
    desc: ModelDescription

    @property
    def weights(self) -> str:
        return os.path.join(self.run_dir, "model.pt")


def load_source_run(run_dir: str | None, what: str) -> ModelDescription:
    """The description of a `--from`/`--group-by-clustering` run, with a clear error if absent."""
    if not run_dir or not os.path.isdir(run_dir):
        raise ValueError(f"{what} {run_dir!r}: not a run folder (train one first with "
                         "`python cli.py train ... --out RUN_DIR`)")
    if not os.path.exists(os.path.join(run_dir, "model.pt")):
        raise ValueError(f"{what} {run_dir}: no model.pt; is that run finished?")
    return ModelDescription.load(run_dir)


def load_source(cfg: TrainConfig) -> SourceRun:
    if not cfg.from_run:
        raise ValueError(f"--method {cfg.method} needs --from RUN_DIR (a finished run)")
    return SourceRun(cfg.from_run, load_source_run(cfg.from_run, "--from"))


# =============================================================================================
# Heads

@dataclass
class Heads:
    """What a method trains: one dict per head {"name", "classes", "level": index or None}."""
    heads: list[dict]
    parents: list[np.ndarray | None]       # per head: leaf class of each class (finer heads)
    finer_train: np.ndarray | None = None  # finer: per training image its pseudo-class
    finer_split: str | None = None         # the split finer_train is aligned with


def level_heads(dataset: ImageDataset, levels: list[int]) -> Heads:
    heads = [{"name": dataset.levels[i].name, "classes": list(dataset.levels[i].classes), "level": i}
             for i in levels]
    return Heads(heads, [None] * len(heads))


def resolve_level(dataset: ImageDataset, level) -> int:
    """Level number (0 = coarsest, negative from the leaf) or name -> index, as the description."""
    probe = ModelDescription(architecture="", feature_dim=0, preprocessing=Preprocessing(),
                             levels=dataset.levels)
    return probe.level_index(level)


def problem_spec(cfg: TrainConfig) -> dict:
    """The label recipe of a config (everything but the training hyper-parameters)."""
    return {"method": cfg.method, "level": cfg.level, "mapping": cfg.mapping,
            "group_by_clustering": cfg.group_by_clustering, "k": cfg.k,
            "from": cfg.from_run, "finer_mode": cfg.finer_mode, "finer_k": cfg.finer_k,
            "finer_min_size": cfg.finer_min_size, "seed": cfg.seed}


# =============================================================================================
# The methods

class Method:
    """The default behaviour; a method overrides what it changes."""

    name = ""
    needs_source = False                   # needs --from RUN_DIR
    takes_level = False                    # accepts --level
    description_keys: tuple[str, ...] = LEVEL_SOURCES

    def check_source(self, cfg: TrainConfig, source: SourceRun | None, dataset: ImageDataset
                     ) -> None:
        """--from must be a run of the same data."""
        if source is None:
            return
        theirs = source.desc.data.get("fingerprint")
        if theirs and theirs != dataset.fingerprint():
            raise ValueError(f"--from {cfg.from_run} was trained on other data "
                             f"({source.desc.data.get('spec')}); {cfg.method} works on the data "
                             "of that run: pass its --data")

    def label_spec(self, cfg: TrainConfig, source: SourceRun | None) -> dict:
        return problem_spec(cfg)

    def make_heads(self, dataset: ImageDataset, spec: dict, cfg: TrainConfig, dist: Dist | None
                   ) -> Heads:
        """Heads on the final levels of `dataset`; may resolve entries of `spec` in place."""
        raise NotImplementedError

    def check_heads(self, cfg: TrainConfig, source: SourceRun | None, heads: list[dict]) -> None:
        pass

    def arch_kwargs(self, cfg: TrainConfig, source: SourceRun | None) -> dict:
        return dict(cfg.arch_kwargs)

    def preprocessing(self, cfg: TrainConfig, arch: str, source: SourceRun | None
                      ) -> Preprocessing:
        return default_preprocessing(arch, cfg.input_size)

    def init_weights(self, cfg: TrainConfig, model: Network, arch: str,
                     source: SourceRun | None) -> None:
        from .pretrained import load_starting_weights
        load_starting_weights(model.backbone, arch, pretrained=cfg.pretrained,
                              weights_file=cfg.weights)

    def param_groups(self, cfg: TrainConfig, model: Network, lr: float) -> list[dict]:
        """No weight decay on biases and normalisation parameters."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.ndim >= 2]},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]

    def description_args(self, cfg: TrainConfig, spec: dict, heads: list[dict]) -> dict:
        args = {k: v for k, v in spec.items() if k in self.description_keys and v is not None}
        if not args.get("group_by_clustering"):
            args.pop("k", None)
        args.update(seed=cfg.seed, pretrained=cfg.pretrained, problem=spec)
        if cfg.weights:
            args["weights"] = absolute(cfg.weights)
        return args


@register_method
class Specific(Method):
    """One head on the leaf classes."""
    name = "specific"

    def make_heads(self, dataset, spec, cfg, dist):
        return level_heads(dataset, [len(dataset.levels) - 1])


@register_method
class Generic(Method):
    """One head on a coarser level (--level; default the leaf's parent)."""
    name = "generic"
    takes_level = True
    description_keys = ("level",) + LEVEL_SOURCES

    def make_heads(self, dataset, spec, cfg, dist):
        levels = dataset.levels
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
        spec["level"] = level
        return level_heads(dataset, [level])


@register_method
class Multilevel(Method):
    """One head per level, losses weighted by --loss-weights (MuCaLe-Net)."""
    name = "multilevel"

    def make_heads(self, dataset, spec, cfg, dist):
        if len(dataset.levels) < 2:
            raise ValueError(f"--method multilevel needs at least two levels; {dataset.name} "
                             f"has one ({dataset.levels[0].name}); see --mapping / "
                             "--group-by-clustering")
        return level_heads(dataset, list(range(len(dataset.levels))))

    def description_args(self, cfg, spec, heads):
        return dict(super().description_args(cfg, spec, heads),
                    loss_weights=cfg.loss_weights or [1.0] * len(heads))


class _FromRun(Method):
    """Starts from a finished run: its architecture width and (unless asked) its input."""
    needs_source = True

    def arch_kwargs(self, cfg, source):
        return dict(source.desc.arch_kwargs, **cfg.arch_kwargs)


@register_method
class Finer(_FromRun):
    """Leaf classes split into pseudo-classes by clustering the --from run's features (FiNet)."""
    name = "finer"
    description_keys = ("from", "finer_mode", "finer_k", "finer_min_size")

    def preprocessing(self, cfg, arch, source):
        # Same input as the --from run unless asked otherwise, so that the two networks can be
        # combined at export (SpeFiNet needs one shared preprocessing).
        if cfg.input_size is None:
            return source.desc.preprocessing
        return super().preprocessing(cfg, arch, source)

    def make_heads(self, dataset, spec, cfg, dist):
        from .levels import finer_labels, finer_parents
        spec["from"] = absolute(spec["from"])
        split = "train" if "train" in dataset.splits else next(iter(dataset.splits))
        log(dist, f"splitting classes into finer pseudo-classes with {spec['from']} "
                  f"({spec['finer_mode']})")
        # Pseudo-classes exist only where they were clustered (the training images); evaluation
        # scores the finer head on the leaf labels, summing its probabilities per leaf class.
        labels, names = finer_labels(
            spec["from"], dataset, split, mode=spec["finer_mode"], k=int(spec["finer_k"]),
            min_size=int(spec["finer_min_size"]), seed=int(spec.get("seed", 0)))
        names = list(names)
        report_split(dataset, split, names, spec, cfg, dist)
        heads = [{"name": f"{dataset.levels[-1].name}-finer", "classes": names, "level": None}]
        return Heads(heads, [finer_parents(names, dataset)], np.asarray(labels, np.int64), split)


def report_split(dataset: ImageDataset, split: str, names: list[str], spec: dict,
                 cfg: TrainConfig, dist: Dist | None) -> None:
    """Say how many classes were split; refuse when none was (the network would equal the
    specific one) unless --allow-unsplit."""
    per_leaf: dict[str, int] = {}
    for name in names:
        leaf = name.rsplit("#", 1)[0]
        per_leaf[leaf] = per_leaf.get(leaf, 0) + 1
    split_leaves = [n for n in per_leaf.values() if n > 1]
    log(dist, f"finer: {len(split_leaves)} of {len(per_leaf)} classes split, into "
              f"{sum(split_leaves)} pseudo-classes ({len(names)} classes in all)")
    if split_leaves or cfg.allow_unsplit:
        return
    min_size, k, mode = int(spec["finer_min_size"]), int(spec["finer_k"]), spec["finer_mode"]
    largest = int(np.bincount(dataset.labels(split)).max()) if len(dataset.splits[split]) else 0
    if largest < 2 * min_size:
        reason = (f"its largest class has {largest} training images, fewer than 2 x "
                  f"--finer-min-size {min_size}")
        fix = f"lower --finer-min-size (at most {max(1, largest // 2)})"
    elif mode == "kmeans" and k < 2:
        reason, fix = f"--finer-k {k} asks for one cluster per class", "use --finer-k 2 or more"
    else:
        reason = f"the {mode} clustering kept every class whole"
        fix = "try --finer-mode kmeans --finer-k 2"
    raise ValueError(f"--method finer: no class of {dataset.name} was split ({reason}), so the "
                     f"network would be the specific one; {fix}, use a source with more images "
                     "per class, or pass --allow-unsplit to train it anyway")


@register_method
class FSFT(_FromRun):
    """Self fine-tuning: the --from run's weights and labels, its last blocks re-initialised and
    the kept layers trained at --alpha x the learning rate."""
    name = "fsft"
    description_keys = ()

    def label_spec(self, cfg, source):
        spec = source.desc.method_args.get("problem")
        if not spec:
            raise ValueError(f"--from {cfg.from_run}: that run (method {source.desc.method!r}) "
                             "was not trained by `train`, so its source problem is unknown")
        return dict(spec, seed=spec.get("seed", cfg.seed))

    def check_heads(self, cfg, source, heads):
        expected = [(h["name"], list(h["classes"])) for h in source.desc.heads]
        if [(h["name"], h["classes"]) for h in heads] != expected:
            raise ValueError(f"--from {cfg.from_run}: rebuilding its labels on {cfg.data} gives "
                             "other heads/classes than the run has; use the run's data")

    def preprocessing(self, cfg, arch, source):
        return source.desc.preprocessing  # so that it combines with its --from run (MulDiP+FSFT)

    def init_weights(self, cfg, model, arch, source):
        model.load_state_dict(torch.load(source.weights, map_location="cpu", weights_only=True))

    def param_groups(self, cfg, model, lr):
        from .fsft import fsft_param_groups
        return fsft_param_groups(model, cfg.reinit, cfg.alpha, lr, cfg.seed)  # re-initialises

    def description_args(self, cfg, spec, heads):
        return dict(super().description_args(cfg, spec, heads), **{
            "from": absolute(cfg.from_run), "alpha": cfg.alpha, "reinit": cfg.reinit})
