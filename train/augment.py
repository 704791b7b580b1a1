"""Training augmentation and the evaluation transform, on uint8 CHW tensors.

Images reach these transforms already decoded by `common.images` (RGB, alpha over the
background) and resized by `common.images.resize_and_crop`:

- training images are stored as a `resize_size` square (shorter side resized, centre crop), so a
  random crop of `input_size` has some room to move;
- evaluation images are stored exactly as `common.images.preprocess` crops them, so evaluation
  here and in the runtime see the same pixels; only normalisation is left to do.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from common.description import Preprocessing

# Up to this input size an image is "small" (digits, Fashion-MNIST, emoji at 32-64 px): random
# resized crops would destroy too much of it, so we shift it by a few pixels instead.
SMALL_IMAGE_SIZE = 64


AUGMENT_STRENGTHS = ("standard", "strong")


def train_transform(pre: Preprocessing, hflip: bool = True, color_jitter: float = 0.2,
                    strength: str = "standard") -> v2.Compose:
    """Augmentation suited to the image size, ending with the description's normalisation.

    Small images (<= 64 px): pad-and-crop (shift by up to 1/8 of the size) + horizontal flip.
    Larger images: RandomResizedCrop (25-100% of the area) + flip + light colour jitter.
    `strong` (for starved classes with a handful of images each, e.g. emoji): at any size a
    random resized crop (50-100%, aspect 3/4-4/3), rotation up to 15 degrees, colour jitter
    0.4 and 20% greyscale, so each image yields many plausible views.
    """
    if strength not in AUGMENT_STRENGTHS:
        raise ValueError(f"unknown augmentation {strength!r}; choose from {AUGMENT_STRENGTHS}")
    size = pre.input_size
    steps: list = []
    fill = tuple(int(c) for c in pre.background)
    if strength == "strong":
        steps += [v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
                  v2.RandomRotation(15, fill=fill)]
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        steps += [v2.ColorJitter(0.4, 0.4, 0.4, 0.05), v2.RandomGrayscale(0.2),
                  v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]
        return v2.Compose(steps)
    if size <= SMALL_IMAGE_SIZE:
        # pad with the background, like preprocess
        steps.append(v2.RandomCrop(size, padding=max(1, size // 8), fill=fill))
    else:
        steps.append(v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if size > SMALL_IMAGE_SIZE and color_jitter > 0:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]
    return v2.Compose(steps)


def eval_transform(pre: Preprocessing) -> v2.Compose:
    """uint8 CHW already cropped by `resize_and_crop` -> normalised float, as `preprocess` does."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)])


def describe(pre: Preprocessing, hflip: bool = True, strength: str = "standard") -> str:
    """One line for the logs and the description: which augmentation was used."""
    kind = ("pad-crop" if pre.input_size <= SMALL_IMAGE_SIZE else "random-resized-crop+jitter")
    if strength == "strong":
        kind = "strong:resized-crop+rotate+jitter+grey"
    return kind + ("+hflip" if hflip else "")
