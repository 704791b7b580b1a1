"""Training and evaluation images: decoded once into memory when they fit, else on the fly."""
from __future__ import annotations

import sys

import numpy as np
import torch

from common.description import Preprocessing
from common.images import ImageDecodeError, open_image, resize_and_crop

from . import augment
from .config import TrainConfig
from .distributed import Dist
from .methods import log
from .problem import Problem


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
        log(dist, f"images decoded on the fly ({nbytes / 1e9:.1f} GB > --cache-gb {cfg.cache_gb}); "
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
        log(dist, f"skipped {len(skipped)} unreadable image(s) (use --strict-images to stop "
                   "instead); first ones:\n  " + "\n  ".join(skipped[:5]))
    train_set = ImageSet([problem.train_paths[i] for i in tr_keep], problem.train_targets[tr_keep],
                         train_pre, train_tf, tr_pix)
    eval_set = ImageSet([problem.eval_paths[i] for i in ev_keep], problem.eval_targets[ev_keep],
                        pre, eval_tf, ev_pix)
    return train_set, eval_set, skipped
