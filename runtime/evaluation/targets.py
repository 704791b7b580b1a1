"""Targets of an evaluation: a dataset's train and test sides (its own, or a seeded stratified
split), capped per class, with a content hash of exactly which files sit where."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from common.data import DataError, ImageDataset, load_dataset, stratified_split

from .errors import EvaluationError

DEFAULT_TEST_FRACTION = 0.3


@dataclass
class TargetSplit:
    """The images and leaf-class labels of a target's train and test sides, and how they were made."""

    name: str
    spec: str
    classes: list[str]
    train_paths: list[str]
    train_labels: np.ndarray
    test_paths: list[str]
    test_labels: np.ndarray
    info: dict = field(default_factory=dict)
    _hashes: dict = field(default_factory=dict, repr=False, compare=False)

    def selection_hash(self, root: str) -> str:
        """`_selection_hash`, computed once per target (every model's cache key needs it)."""
        if root not in self._hashes:
            self._hashes[root] = self._selection_hash(root)
        return self._hashes[root]

    def _selection_hash(self, root: str) -> str:
        """Hash of exactly which files sit on which side with which label, and of their bytes:
        a file replaced by another of the same name and size (even with its old mtime) changes
        it, so cached embeddings are never stale."""
        h = hashlib.sha256()
        for side, paths, labels in (("train", self.train_paths, self.train_labels),
                                    ("test", self.test_paths, self.test_labels)):
            for p, y, digest in zip(paths, labels, content_digests(paths)):
                h.update(f"{side}\0{os.path.relpath(p, root)}\0{int(y)}\0{digest}\n".encode())
        return h.hexdigest()[:16]


def _file_digest(path: str) -> str:
    """SHA-256 of a file's bytes, or a marker naming why it cannot be read (the pipeline then
    reports that image as failed; the marker keeps the key stable until the file is fixed)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        return f"unreadable:{type(e).__name__}"
    return h.hexdigest()


def content_digests(paths: list[str], threads: int = 4) -> list[str]:
    """Content hashes of many files, in input order. Reading dominates and hashlib releases the
    GIL, so a few threads overlap the reads (a 60,000-image target takes seconds, far less than
    embedding it)."""
    if len(paths) < 64:
        return [_file_digest(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(_file_digest, paths, chunksize=256))


def _cap_per_class(indices: np.ndarray, labels: np.ndarray, max_per_class: int | None,
                   rng: np.random.Generator) -> np.ndarray:
    if not max_per_class:
        return indices
    keep = [rng.permutation(indices[labels[indices] == c])[:max_per_class]
            for c in np.unique(labels[indices])]
    return np.sort(np.concatenate(keep)) if keep else indices


def split_target(dataset: ImageDataset, test_fraction: float = DEFAULT_TEST_FRACTION,
                 seed: int = 0, max_per_class: int | None = None, name: str | None = None
                 ) -> TargetSplit:
    """Train/test sides of a target at its leaf level.

    The dataset's own `train/` and `test/` splits are used when present ("given"); otherwise a
    seeded stratified split keeps `test_fraction` of every class for test ("stratified"; a class
    with 2 or more images has one on each side). `max_per_class` then keeps at most that many
    images per class on each side, chosen with `seed`.
    """
    if not 0.0 < test_fraction < 1.0:
        raise EvaluationError(f"test fraction must be between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(seed)
    if dataset.has_test_split and "train" in dataset.splits:
        kind = "given"
        sides = {}
        for side in ("train", "test"):
            labels = dataset.labels(side)
            idx = _cap_per_class(np.arange(len(labels)), labels, max_per_class, rng)
            paths = dataset.paths(side)
            sides[side] = ([paths[i] for i in idx], labels[idx])
    else:
        kind = "stratified"
        split = next(iter(dataset.splits))
        labels, paths = dataset.labels(split), dataset.paths(split)
        train_idx, test_idx = stratified_split(labels, test_fraction, seed)
        sides = {}
        for side, idx in (("train", train_idx), ("test", test_idx)):
            idx = _cap_per_class(idx, labels, max_per_class, rng)
            sides[side] = ([paths[i] for i in idx], labels[idx])
    (train_paths, train_labels), (test_paths, test_labels) = sides["train"], sides["test"]
    name = name or dataset.name
    if len(np.unique(train_labels)) < 2:
        raise EvaluationError(f"target {name!r}: the train side has fewer than 2 classes; a probe "
                              "needs at least 2 (give a folder with 2+ class folders)")
    if len(test_labels) == 0:
        raise EvaluationError(f"target {name!r}: the test side is empty; give more images per "
                              "class or a larger --test-fraction")
    info = {
        "split": kind,
        "test_fraction": test_fraction if kind == "stratified" else None,
        "seed": seed,
        "max_per_class": max_per_class,
        "n_train": len(train_paths),
        "n_test": len(test_paths),
        "n_classes": len(dataset.leaf_classes),
        "n_classes_train": int(len(np.unique(train_labels))),
        "n_classes_test": int(len(np.unique(test_labels))),
        "level": dataset.levels[-1].name,
        "fingerprint": dataset.fingerprint(),
        "root": dataset.root,
    }
    return TargetSplit(name, name, list(dataset.leaf_classes), train_paths, train_labels,
                       test_paths, test_labels, info)


def load_target(spec: str, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0,
                max_per_class: int | None = None, name: str | None = None) -> TargetSplit:
    """A built-in spec or ImageFolder path -> TargetSplit, with errors that name the target."""
    try:
        dataset = load_dataset(spec)
    except DataError as e:
        raise EvaluationError(f"target {spec!r}: {e}") from e
    target = split_target(dataset, test_fraction, seed, max_per_class, name or spec)
    target.spec = spec
    target.info["spec"] = spec
    return target


def _target_name(spec: str) -> str:
    return os.path.basename(os.path.normpath(spec)) if os.path.isdir(spec) else spec


def _dedupe(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out

