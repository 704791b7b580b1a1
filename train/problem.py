"""The problem a run learns: which images, which heads, which labels, and the evaluation split."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.data import DataError, ImageDataset, load_dataset, stratified_split

from .config import TrainConfig
from .distributed import Dist
from .methods import Method, SourceRun, absolute, get_method, load_source_run, log


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


def build_problem(dataset: ImageDataset, spec: dict, cfg: TrainConfig, dist: Dist | None = None):
    """Apply a label recipe to a dataset: returns (dataset with its final levels, Heads,
    targets(split, for_eval) -> (N, heads) array, the resolved recipe)."""
    spec = dict(spec)
    if spec.get("mapping"):
        from .levels import apply_mapping
        spec["mapping"] = absolute(spec["mapping"])
        dataset = apply_mapping(dataset, spec["mapping"])
    if spec.get("group_by_clustering"):
        from .levels import cluster_groups
        spec["group_by_clustering"] = absolute(spec["group_by_clustering"])
        load_source_run(spec["group_by_clustering"], "--group-by-clustering")
        log(dist, f"clustering class prototypes of {spec['group_by_clustering']} into "
                  f"{spec['k']} groups")
        dataset = cluster_groups(spec["group_by_clustering"], dataset, int(spec["k"]),
                                 seed=int(spec.get("seed", 0)))
    method = get_method(spec["method"])  # fsft: the method its --from run was trained with
    if not method.takes_level and spec.get("level") is not None:
        raise ValueError(f"--level is for --method generic (got --method {spec['method']})")
    made = method.make_heads(dataset, spec, cfg, dist)
    for h in made.heads:
        if len(h["classes"]) < 2:
            raise ValueError(
                f"level {h['name']!r} has {len(h['classes'])} class ({', '.join(h['classes'])}); "
                "a classifier needs at least two: pick another level or add classes")

    def targets(split: str, for_eval: bool = False) -> np.ndarray:
        """(N, heads) labels of a split; a finer head's eval labels are leaf classes."""
        n = len(dataset.splits[split])
        cols = []
        for h in made.heads:
            if h["level"] is not None:
                cols.append(dataset.labels(split, h["level"]))
            elif for_eval or split != made.finer_split:
                cols.append(dataset.labels(split))
            else:
                cols.append(made.finer_train)
        return np.stack(cols, axis=1).astype(np.int64) if cols else np.zeros((n, 0), np.int64)

    return dataset, made, targets, spec


def _limit_per_class(leaf_labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Indices keeping at most `per_class` items of each class (seeded, order preserved)."""
    idx = np.arange(len(leaf_labels))
    if not per_class:
        return idx
    rng = np.random.default_rng(seed)
    keep = [np.sort(rng.permutation(idx[leaf_labels == c])[:per_class])
            for c in np.unique(leaf_labels)]
    return np.sort(np.concatenate(keep)) if keep else idx


def load_problem(cfg: TrainConfig, method: Method, source: SourceRun | None,
                 dist: Dist | None = None) -> Problem:
    """Dataset + label recipe + train/eval split, with every input error raised here."""
    dataset = load_dataset(cfg.data)
    if dataset.empty_dirs:
        shown = ", ".join(dataset.empty_dirs[:5]) + (" ..." if len(dataset.empty_dirs) > 5 else "")
        raise DataError(f"{cfg.data}: {len(dataset.empty_dirs)} empty class folder(s): {shown}. "
                        "Put images in them or remove them")
    method.check_source(cfg, source, dataset)
    dataset, made, targets, spec = build_problem(dataset, method.label_spec(cfg, source), cfg, dist)
    heads = made.heads
    method.check_heads(cfg, source, heads)

    if dataset.has_test_split:
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
                   [ev_paths[i] for i in keep_ev], ev_targets[keep_ev], eval_name, made.parents)
