"""A folder of real JPEG photos for benchmarks, built once from photos that ship in packages.

No network and no data package is needed: matplotlib ships `grace_hopper.jpg`, scikit-learn
ships `china.jpg` and `flower.jpg`. Seeded random crops of them (random scale and position,
random mirror, resized to about 500x375 and saved at JPEG quality 90, about 40 KB a file, like
ImageNet's validation photos) are written as an ImageFolder, one class folder per source photo,
so that torchvision's ImageFolder reads the very same files as our pipeline.

    root = ensure_corpus()            # $UNIREP_CACHE/bench-corpus/n512-500x375-q90-s0
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from common.atomic import build_folder_once
from common.data import cache_dir
from common.description import save_json_atomic

DEFAULT_COUNT = 512
DEFAULT_SIZE = (500, 375)
DEFAULT_QUALITY = 90
MANIFEST = "corpus.json"


def source_photos() -> dict[str, str]:
    """{class name: path} of the real photos installed with matplotlib and scikit-learn."""
    found = {}
    try:
        import matplotlib
        found["grace_hopper"] = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data",
                                             "sample_data", "grace_hopper.jpg")
    except ImportError:
        pass
    try:
        import sklearn
        images = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
        found["china"] = os.path.join(images, "china.jpg")
        found["flower"] = os.path.join(images, "flower.jpg")
    except ImportError:
        pass
    found = {name: path for name, path in found.items() if os.path.isfile(path)}
    if not found:
        raise FileNotFoundError(
            "no sample photos found (matplotlib's sample_data/grace_hopper.jpg, scikit-learn's "
            "datasets/images/*.jpg); install matplotlib or scikit-learn, or pass --images DIR")
    return found


def random_crop(photo: Image.Image, size: tuple[int, int], rng: np.random.Generator
                ) -> Image.Image:
    """A crop of `photo` with the aspect of `size`, covering 45-100% of the largest such box,
    at a random place, maybe mirrored, resized to `size`."""
    width, height = photo.size
    aspect = size[0] / size[1]
    box_w = min(width, height * aspect)
    scale = np.sqrt(rng.uniform(0.45, 1.0))
    crop_w = max(16, int(box_w * scale))
    crop_h = max(16, int(crop_w / aspect))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    crop = photo.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return crop


def corpus_key(count: int, size: tuple[int, int], quality: int, seed: int) -> str:
    return f"n{count}-{size[0]}x{size[1]}-q{quality}-s{seed}"


def build_corpus(out_dir: str, count: int = DEFAULT_COUNT, size: tuple[int, int] = DEFAULT_SIZE,
                 quality: int = DEFAULT_QUALITY, seed: int = 0) -> dict:
    """Write `count` JPEG crops into out_dir/<photo name>/NNNNN.jpg; return the manifest."""
    photos = {name: Image.open(path).convert("RGB") for name, path in source_photos().items()}
    names = sorted(photos)
    rng = np.random.default_rng(seed)
    total_bytes = 0
    for i in range(count):
        name = names[i % len(names)]  # round robin: balanced classes
        folder = os.path.join(out_dir, name)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{i:05d}.jpg")
        random_crop(photos[name], size, rng).save(path, "JPEG", quality=quality)
        total_bytes += os.path.getsize(path)
    manifest = {"count": count, "size": list(size), "quality": quality, "seed": seed,
                "classes": names, "sources": source_photos(),
                "mean_kb": round(total_bytes / max(1, count) / 1024, 1)}
    save_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def ensure_corpus(count: int = DEFAULT_COUNT, size: tuple[int, int] = DEFAULT_SIZE,
                  quality: int = DEFAULT_QUALITY, seed: int = 0, root: str | None = None) -> str:
    """The cached corpus folder, built on first use (atomically: a temp folder, then renamed)."""
    root = root or os.path.join(cache_dir(), "bench-corpus")
    return build_folder_once(os.path.join(root, corpus_key(count, size, quality, seed)),
                             lambda tmp: build_corpus(tmp, count, size, quality, seed), MANIFEST)


def corpus_info(folder: str) -> dict:
    """The manifest of a corpus folder, or {} for a folder given with --images."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
