"""A labelled real target as JPEG files, for fidelity checks of JPEG decode paths.

The built-in datasets are PNGs, which GPU JPEG decoding never sees; `labelled_jpegs` writes
a seeded, class-balanced subset of one (default Fashion-MNIST, 40 images a class from the
20 + 20 a class the tests materialise) as JPEGs, upscaled
to `size` px with Pillow's bicubic filter so the resize to the model's input really
downsamples, as it does for photos. Grey images stay grey JPEGs (that decode path is exercised
too). Built once under $UNIREP_CACHE/jpeg-targets and reused.

    paths, labels = labelled_jpegs("fashion-mnist:per_class=20", per_class=40, size=160)
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from common.atomic import build_folder_once
from common.data import cache_dir, load_dataset

MANIFEST = "target.json"


def _build(tmp: str, spec: str, split: str, per_class: int, size: int, quality: int) -> None:
    data = load_dataset(spec)
    splits = list(data.splits) if split == "all" else [split]
    paths = [p for s in splits for p in data.paths(s)]
    labels = np.concatenate([data.labels(s) for s in splits])
    rng = np.random.default_rng(0)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        chosen += sorted(rng.permutation(idx)[:per_class].tolist())
    rows = []
    for n, i in enumerate(chosen):
        img = Image.open(paths[i])
        img = img.convert("L" if img.mode in ("L", "1", "I;16") else "RGB")
        if size:
            img = img.resize((size, size), Image.BICUBIC)
        name = f"{int(labels[i]):03d}-{n:05d}.jpg"
        img.save(os.path.join(tmp, name), "JPEG", quality=quality)
        rows.append([name, int(labels[i])])
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump({"spec": spec, "split": split, "items": rows}, f)


def labelled_jpegs(spec: str = "fashion-mnist:per_class=20", *, split: str = "all",
                   per_class: int = 40,
                   size: int = 160, quality: int = 90) -> tuple[list[str], np.ndarray]:
    """(JPEG paths, integer labels) of the target, built on first use."""
    key = f"{spec.replace(':', '_').replace('=', '-')}-{split}-n{per_class}-s{size}-q{quality}"
    folder = build_folder_once(os.path.join(cache_dir(), "jpeg-targets", key),
                               lambda tmp: _build(tmp, spec, split, per_class, size, quality),
                               MANIFEST)
    with open(os.path.join(folder, MANIFEST)) as f:
        rows = json.load(f)["items"]
    names = [r[0] for r in rows]
    if any(os.path.basename(n) != n for n in names):  # names from a file never leave the folder
        raise ValueError(f"{folder}/{MANIFEST}: item names must be plain file names")
    return [os.path.join(folder, n) for n in names], np.array([r[1] for r in rows])
