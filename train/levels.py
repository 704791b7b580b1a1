"""Where label levels come from when the folders do not give them, and FiNet's finer classes.

* `apply_mapping`: a CSV of `fine label, parent, grandparent, ...` adds coarser levels.
* `cluster_groups`: K-means on the class prototypes of a trained run groups the leaf classes
  (TPAMI 2020 builds a generic level this way when no hierarchy exists).
* `finer_labels`: FiNet (BMVC 2018) splits every leaf class into finer pseudo-classes by
  clustering its images' features, with a fixed K per class or an automatic split-then-merge.

Every function returns new objects; the input dataset is never modified.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from common.data import DataError, ImageDataset
from common.description import Level


def _replace_levels(dataset: ImageDataset, levels: list[Level], leaf_to_level: list[np.ndarray],
                    **manifest_extra) -> ImageDataset:
    manifest = dict(dataset.manifest)
    manifest.update(manifest_extra)
    return dataclasses.replace(
        dataset, levels=levels, leaf_to_level=leaf_to_level,
        splits={k: list(v) for k, v in dataset.splits.items()}, manifest=manifest)


def _leaf_level(dataset: ImageDataset) -> tuple[Level, np.ndarray]:
    leaf = dataset.levels[-1]
    return Level(leaf.name, list(leaf.classes)), np.arange(len(leaf.classes), dtype=np.int64)


def _few(items, n: int = 5) -> str:
    items = list(items)
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(repr(x) for x in items[:n]) + more


# ---------------------------------------------------------------------------------------------
# Mapping file

def _resolve_leaf(label: str, leaves: list[str], by_last: dict[str, list[str]]) -> str | None:
    if label in leaves:
        return label
    matches = by_last.get(label, [])
    if len(matches) > 1:
        raise DataError(f"mapping label {label!r} is ambiguous: it may be any of "
                        f"{_few(matches)}; write the full class path")
    return matches[0] if matches else None


def _read_mapping(csv_path: str) -> tuple[list[str] | None, list[tuple[int, list[str]]], int]:
    """(header names or None, [(line number, cells)], ancestors per row) of a mapping CSV;
    raises DataError when it holds no rows or rows of different depths."""
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    with open(csv_path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            if cells[0].startswith("#"):
                if header is None and not rows:
                    header = [cells[0].lstrip("#").strip()] + cells[1:]
                continue
            while cells and not cells[-1]:
                cells.pop()
            rows.append((line_no, cells))
    if not rows:
        raise DataError(f"{csv_path}: no mapping rows (expected `fine_label, parent, ...` lines)")

    depths = {len(cells) for _, cells in rows}
    if len(depths) > 1 or min(depths) < 2:
        by_depth: dict[int, list[int]] = {}
        for line_no, cells in rows:
            by_depth.setdefault(len(cells) - 1, []).append(line_no)
        detail = "; ".join(f"{d} ancestor(s) on line(s) {_few(ls, 4)}" for d, ls in sorted(by_depth.items()))
        raise DataError(f"{csv_path}: every row must give a fine label and the same number (>= 1) "
                        f"of ancestors; found {detail}")
    n_ancestors = depths.pop() - 1
    return header, rows, n_ancestors


def apply_mapping(dataset: ImageDataset, csv_path: str) -> ImageDataset:
    """Add coarser levels from a CSV whose rows are `fine_label, parent, grandparent, ...`.

    The fine label is a leaf class of the dataset, as its full path ('tops/shirt') or its last
    component ('shirt') when that is unambiguous. Ancestors go from nearest to farthest, and every
    row has the same number of them. Blank lines and lines starting with '#' are skipped; a first
    '#' line with one name per column names the levels (e.g. `# specific, generic`), otherwise
    they are called mapped0 (coarsest), mapped1, ...

    Returns a dataset whose levels are the mapped ones, coarsest first (level 0), then the leaf
    level, unchanged. Coarser class names are the names written in the file.
    Raises DataError for unknown labels, leaves left unmapped, rows of different depths, a label
    mapped twice differently, or a class with two parents.
    """
    if not os.path.exists(csv_path):
        raise DataError(f"{csv_path}: mapping file not found")
    leaves = dataset.leaf_classes
    by_last: dict[str, list[str]] = {}
    for leaf in leaves:
        by_last.setdefault(leaf.split("/")[-1], []).append(leaf)

    header, rows, n_ancestors = _read_mapping(csv_path)

    ancestors_of: dict[str, list[str]] = {}
    unknown: list[str] = []
    for line_no, cells in rows:
        leaf = _resolve_leaf(cells[0], leaves, by_last)
        if leaf is None:
            unknown.append(cells[0])
            continue
        if any(not c for c in cells):
            raise DataError(f"{csv_path}, line {line_no}: empty ancestor name")
        chain = cells[1:]
        if leaf in ancestors_of and ancestors_of[leaf] != chain:
            raise DataError(f"{csv_path}, line {line_no}: {leaf!r} is mapped twice, to "
                            f"{ancestors_of[leaf]} and to {chain}")
        ancestors_of[leaf] = chain
    if unknown:
        raise DataError(f"{csv_path}: {len(unknown)} label(s) are not classes of {dataset.name}: "
                        f"{_few(unknown)}. Its classes are {_few(leaves)}")
    unmapped = [leaf for leaf in leaves if leaf not in ancestors_of]
    if unmapped:
        raise DataError(f"{csv_path} leaves {len(unmapped)} of {len(leaves)} classes unmapped: "
                        f"{_few(unmapped)}. Add a row for each (fine label, then its ancestors)")

    # chain index j = distance from the leaf (0 = parent); level k (coarsest = 0) uses j = n-1-k.
    for j in range(n_ancestors - 1):
        parent_of: dict[str, str] = {}
        for leaf in leaves:
            child, parent = ancestors_of[leaf][j], ancestors_of[leaf][j + 1]
            if parent_of.setdefault(child, parent) != parent:
                raise DataError(f"{csv_path}: {child!r} has two parents, {parent_of[child]!r} and "
                                f"{parent!r}; a class must have exactly one parent")

    if header and len(header) == n_ancestors + 1 and all(header):
        names = list(reversed(header[1:]))
    else:
        names = [f"mapped{k}" for k in range(n_ancestors)]
    levels, leaf_to_level = [], []
    for k in range(n_ancestors):
        at_level = [ancestors_of[leaf][n_ancestors - 1 - k] for leaf in leaves]
        classes = sorted(set(at_level))
        index = {c: i for i, c in enumerate(classes)}
        levels.append(Level(names[k], classes))
        leaf_to_level.append(np.array([index[c] for c in at_level], dtype=np.int64))
    leaf_level, identity = _leaf_level(dataset)
    return _replace_levels(dataset, levels + [leaf_level], leaf_to_level + [identity],
                           mapping=os.path.abspath(csv_path))


# ---------------------------------------------------------------------------------------------
# Features of a run

def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def extract_features(run_dir: str, paths: list[str], batch_size: int = 64,
                     device: str | None = None, progress: bool = True) -> np.ndarray:
    """Penultimate features of RUN_DIR's network for each image: float32 (len(paths), D).

    Images go through the run's evaluation transform (`common.images.preprocess`). Rows stay
    aligned with `paths`: an image that cannot be decoded gets a row of NaN (and is counted in a
    message on stderr), so callers can mask it with `np.isnan(features).any(1)`.
    """
    import torch
    from tqdm import tqdm

    from common.images import ImageDecodeError, preprocess

    from .models import load_run

    device = device or _default_device()
    model, desc = load_run(run_dir, map_location=device)
    model.to(device).eval()
    pre = desc.preprocessing
    out = np.full((len(paths), model.feature_dim), np.nan, dtype=np.float32)
    bad: list[str] = []

    def load(path):
        try:
            return preprocess(path, pre)
        except ImageDecodeError:
            return None

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool, \
            torch.no_grad(), tqdm(total=len(paths), desc="features", unit="img",
                                  disable=not progress or not paths, file=sys.stderr) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start: start + batch_size]
            arrays = list(pool.map(load, chunk))
            ok = [i for i, a in enumerate(arrays) if a is not None]
            bad += [chunk[i] for i, a in enumerate(arrays) if a is None]
            if ok:
                x = torch.from_numpy(np.stack([arrays[i] for i in ok])).to(device)
                feats = model.forward_features(x).float().cpu().numpy()
                out[[start + i for i in ok]] = feats
            bar.update(len(chunk))
    if bad:
        print(f"extract_features: {len(bad)} unreadable image(s) skipped (NaN rows), e.g. "
              f"{_few(bad, 3)}", file=sys.stderr)
    return out


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _kmeans_once(x: np.ndarray, k: int, rng: np.random.Generator, max_iter: int
                 ) -> tuple[np.ndarray, float]:
    sq_norms = np.einsum("ij,ij->i", x, x)

    def sq_dist(centres):
        d = sq_norms[:, None] - 2.0 * x @ centres.T + np.einsum("ij,ij->i", centres, centres)
        return np.maximum(d, 0.0)

    # k-means++ seeding: each next centre drawn with probability proportional to D(x)^2.
    centres = [x[rng.integers(len(x))]]
    closest = sq_dist(np.array(centres))[:, 0]
    for _ in range(1, k):
        total = closest.sum()
        pick = rng.choice(len(x), p=closest / total) if total > 0 else rng.integers(len(x))
        centres.append(x[pick])
        closest = np.minimum(closest, sq_dist(x[pick][None])[:, 0])
    centres = np.array(centres)
    labels = None
    for _ in range(max_iter):
        d = sq_dist(centres)
        new_labels = d.argmin(axis=1)
        if labels is not None and (new_labels == labels).all():
            break
        labels = new_labels
        for j in range(k):
            members = labels == j
            if members.any():
                centres[j] = x[members].mean(axis=0)
            else:  # an emptied cluster restarts at the point worst served by its centre
                worst = d[np.arange(len(x)), labels].argmax()
                centres[j] = x[worst]
                labels[worst] = j
    d = sq_dist(centres)
    labels = d.argmin(axis=1)
    return labels, float(d[np.arange(len(x)), labels].sum())


def _kmeans(x: np.ndarray, k: int, seed: int, n_init: int = 10, max_iter: int = 100
            ) -> np.ndarray:
    """Lloyd's K-means with k-means++ seeding; the best of `n_init` seeded restarts (labels).

    Fewer than k distinct points give fewer non-empty clusters; callers check."""
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        labels, inertia = _kmeans_once(x, k, rng, max_iter)
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def _relabel_by_first_member(labels: np.ndarray) -> np.ndarray:
    """Renumber cluster ids 0..m-1 in order of their first member: deterministic names, no gaps."""
    order = {}
    for lab in labels:
        order.setdefault(int(lab), len(order))
    return np.array([order[int(lab)] for lab in labels], dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Grouping classes by clustering their prototypes

def class_prototypes(features: np.ndarray, leaf_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Mean of the L2-normalised features of each class (NaN rows ignored), L2-normalised."""
    valid = ~np.isnan(features).any(axis=1)
    feats = _l2_normalise(features[valid])
    labels = leaf_labels[valid]
    protos = np.zeros((n_classes, features.shape[1]), dtype=np.float64)
    counts = np.bincount(labels, minlength=n_classes)
    np.add.at(protos, labels, feats)
    if (counts == 0).any():
        raise DataError(f"no readable training image for class(es) {_few(np.flatnonzero(counts == 0))}")
    return _l2_normalise(protos / counts[:, None])


def cluster_groups(run_dir: str, dataset: ImageDataset, k: int, seed: int = 0,
                   batch_size: int = 64) -> ImageDataset:
    """Group the leaf classes into K clusters of their prototypes in RUN_DIR's feature space.

    A prototype is the mean L2-normalised penultimate feature of a class's training images
    (the 'train' split, else 'all'). Returns a dataset with levels
    [Level('cluster{k}', ['g0', ...]), leaf level]; groups are numbered in order of their first
    class. The groups found are recorded in the manifest under 'grouping'.
    """
    n_classes = len(dataset.leaf_classes)
    if not 2 <= k < n_classes:
        raise DataError(f"--k must be at least 2 and below the number of classes ({n_classes}) "
                        f"to make a coarser level; got {k}")
    split = "train" if "train" in dataset.splits else next(iter(dataset.splits))
    features = extract_features(run_dir, dataset.paths(split), batch_size=batch_size)
    protos = class_prototypes(features, dataset.labels(split), n_classes)
    groups = _relabel_by_first_member(_kmeans(protos, k, seed))
    found = int(groups.max()) + 1
    if found < k:
        raise DataError(f"the class prototypes of {run_dir} form only {found} distinct groups, "
                        f"fewer than k={k}: use a smaller k or a trained run")
    names = [f"g{i}" for i in range(k)]
    leaf_level, identity = _leaf_level(dataset)
    grouping = {"run": os.path.abspath(run_dir), "k": k, "seed": seed,
                "groups": {names[g]: [c for c, gc in zip(dataset.leaf_classes, groups) if gc == g]
                           for g in range(k)}}
    return _replace_levels(dataset, [Level(f"cluster{k}", names), leaf_level],
                           [groups, identity], grouping=grouping)


# ---------------------------------------------------------------------------------------------
# FiNet: finer classes inside each leaf class

def _merge_small(x: np.ndarray, labels: np.ndarray, min_size: int) -> np.ndarray:
    """Merge the smallest cluster under `min_size` into the nearest centroid, until none is left
    (or one cluster remains)."""
    labels = labels.copy()
    while True:
        ids, counts = np.unique(labels, return_counts=True)
        if len(ids) < 2 or counts.min() >= min_size:
            return labels
        small = ids[np.argmin(counts)]
        centroids = {i: x[labels == i].mean(axis=0) for i in ids}
        others = [i for i in ids if i != small]
        dist = [np.sum((centroids[small] - centroids[i]) ** 2) for i in others]
        labels[labels == small] = others[int(np.argmin(dist))]


def _bisect(x: np.ndarray, index: np.ndarray, min_size: int, seed: int) -> list[np.ndarray]:
    """Split phase: recursive 2-means while both halves keep >= min_size points."""
    pending, leaves = [index], []
    while pending:
        idx = pending.pop()
        if len(idx) >= 2 * min_size:
            halves = _kmeans(x[idx], 2, seed, n_init=3)
            sizes = np.bincount(halves, minlength=2)
            if sizes.min() >= min_size:
                pending += [idx[halves == 1], idx[halves == 0]]
                continue
        leaves.append(idx)
    return leaves


def _split_gain(n: np.ndarray, sse: np.ndarray, a: int, b: int, ward: float, dims: int) -> float:
    """BIC(two spherical Gaussians, shared variance) - BIC(one) on the points of a and b.

    Positive means the data justify keeping a and b apart (X-means, Pelleg & Moore 2000)."""
    na, nb = n[a], n[b]
    total = na + nb
    sse_apart = max(sse[a] + sse[b], 1e-12)
    sse_merged = sse_apart + ward
    log_lik_gain = 0.5 * total * dims * np.log(sse_merged / sse_apart) \
        + na * np.log(na / total) + nb * np.log(nb / total)
    return float(log_lik_gain - 0.5 * (dims + 1) * np.log(total))


def _merge_phase(x: np.ndarray, parts: list[np.ndarray]) -> list[np.ndarray]:
    """Merge phase: repeatedly take the pair whose union raises the squared error least (Ward)
    and merge it while the BIC test says the two are not distinct clusters."""
    members = [list(p) for p in parts]
    n = np.array([len(p) for p in parts], dtype=np.float64)
    centroids = np.stack([x[p].mean(axis=0) for p in parts])
    sse = np.array([np.sum((x[p] - x[p].mean(axis=0)) ** 2) for p in parts])
    dims = max(int((x.var(axis=0) > 1e-12).sum()), 1)  # dimensions the class actually uses
    alive = np.ones(len(parts), dtype=bool)

    def ward_row(i):
        d = np.sum((centroids - centroids[i]) ** 2, axis=1)
        return n * n[i] / (n + n[i]) * d

    ward = np.stack([ward_row(i) for i in range(len(parts))]) if parts else np.zeros((0, 0))
    np.fill_diagonal(ward, np.inf)
    while alive.sum() > 1:
        masked = np.where(alive[:, None] & alive[None, :], ward, np.inf)
        a, b = np.unravel_index(np.argmin(masked), masked.shape)
        if _split_gain(n, sse, a, b, masked[a, b], dims) > 0:
            break
        sse[a] = sse[a] + sse[b] + masked[a, b]
        centroids[a] = (n[a] * centroids[a] + n[b] * centroids[b]) / (n[a] + n[b])
        n[a] += n[b]
        members[a] += members[b]
        alive[b] = False
        ward[a] = ward[:, a] = ward_row(a)
        ward[a, a] = np.inf
    return [np.array(sorted(members[i])) for i in np.flatnonzero(alive)]


def _cluster_one_class(x: np.ndarray, mode: str, k: int, min_size: int, seed: int) -> np.ndarray:
    if mode == "kmeans":
        n_clusters = max(1, min(k, len(x) // max(min_size, 1)))
        if n_clusters == 1:
            return np.zeros(len(x), dtype=np.int64)
        labels = _merge_small(x, _kmeans(x, n_clusters, seed), min_size)
    else:
        parts = _merge_phase(x, _bisect(x, np.arange(len(x)), min_size, seed))
        labels = np.empty(len(x), dtype=np.int64)
        for j, p in enumerate(parts):
            labels[p] = j
    # Finer class 0 is the largest; ties in order of first member.
    ids, first, counts = np.unique(labels, return_index=True, return_counts=True)
    rank = {int(i): r for r, i in enumerate(ids[np.lexsort((first, -counts))])}
    return np.array([rank[int(lab)] for lab in labels], dtype=np.int64)


def finer_labels(run_dir: str, dataset: ImageDataset, split: str, mode: str = "kmeans",
                 k: int = 4, min_size: int = 20, seed: int = 0, batch_size: int = 64
                 ) -> tuple[np.ndarray, list[str]]:
    """FiNet: split each leaf class into finer pseudo-classes by clustering its images' features.

    Features are RUN_DIR's penultimate features of `dataset.splits[split]`, L2-normalised (so
    Euclidean K-means compares directions, as cosine similarity would).

    mode="kmeans": K-means with K = min(k, n_images // min_size) (at least 1) in each class; a
    cluster that still ends below `min_size` is merged into its nearest one.
    mode="auto": no K. Split: bisect with 2-means recursively while both halves keep
    >= min_size images. Merge: bottom-up, repeatedly take the pair of clusters whose union raises
    the within-cluster squared error least (Ward) and merge it unless the Bayesian information
    criterion prefers two spherical Gaussians (shared variance) over one for their images
    (X-means' test). No cluster is below min_size unless its class itself is smaller.

    Returns (per-image finer class index aligned with dataset.splits[split], finer class names
    '<leaf>#<j>', grouped by leaf class in leaf order, #0 the largest of its class). Unreadable
    images (NaN features) join the largest finer class of their leaf; training skips them anyway.
    Deterministic for a given seed.
    """
    if mode not in ("kmeans", "auto"):
        raise ValueError(f"finer mode must be 'kmeans' or 'auto', not {mode!r}")
    if split not in dataset.splits:
        raise DataError(f"{dataset.name} has no split {split!r}; it has {sorted(dataset.splits)}")
    if mode == "kmeans" and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    features = extract_features(run_dir, dataset.paths(split), batch_size=batch_size)
    leaf = dataset.labels(split)
    valid = ~np.isnan(features).any(axis=1)
    features = _l2_normalise(np.nan_to_num(features)).astype(np.float64)

    finer = np.zeros(len(leaf), dtype=np.int64)
    names: list[str] = []
    for c, class_name in enumerate(dataset.leaf_classes):
        idx = np.flatnonzero(leaf == c)
        if not len(idx):
            continue
        good, missing = idx[valid[idx]], idx[~valid[idx]]
        local = (_cluster_one_class(features[good], mode, k, min_size, seed + c)
                 if len(good) else np.zeros(0, dtype=np.int64))
        n_local = int(local.max()) + 1 if len(local) else 1
        finer[good] = len(names) + local
        finer[missing] = len(names)  # the largest finer class of this leaf
        names += [f"{class_name}#{j}" for j in range(n_local)]
    return finer, names


def finer_parents(names: list[str], dataset: ImageDataset) -> np.ndarray:
    """Leaf class index of each finer class name '<leaf>#<j>' (for a finer->leaf mapping)."""
    index = {c: i for i, c in enumerate(dataset.leaf_classes)}
    return np.array([index[n.rsplit("#", 1)[0]] for n in names], dtype=np.int64)
