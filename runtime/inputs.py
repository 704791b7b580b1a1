"""What `embed` accepts, turned into (id, item) work, and what it returns (EmbedResult).

One input or a collection of inputs:
- given ALONE, a folder expands to its image files (recursive, sorted) and a 4-D array
  (N x H x W [x C]) to its N images;
- in a list (or any iterable), every element is exactly one item and one output row, so rows
  always line up with the inputs: a folder or a 4-D array there becomes an error row
  (pass it on its own, or expand a folder with `runtime.iter_folder`).
Items are paths, bytes, PIL images, HxW / HxWxC arrays; anything else is a bad item, which
the decoder reports as an error row.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from common.files import iter_image_files

log = logging.getLogger("unirep.runtime")

_SINGLE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)


@dataclass
class EmbedResult:
    """Embeddings aligned with the inputs (a folder or 4-D array given alone: its images).

    `vectors[i]` belongs to `ids[i]` (a path, or '#i' for in-memory items); failed items have a
    NaN row and `errors[i]` names the item and the cause. `ok` marks the good rows."""

    vectors: np.ndarray
    ids: list[str]
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> np.ndarray:
        mask = np.ones(len(self.ids), dtype=bool)
        mask[list(self.errors)] = False
        return mask

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class RejectedInput:
    """An input that cannot be one item: it keeps its row and becomes an error entry."""

    reason: str


def is_single_input(x: Any) -> bool:
    """A single item (possibly a folder) rather than a collection of items."""
    return isinstance(x, _SINGLE_TYPES) or (isinstance(x, np.ndarray) and x.ndim in (2, 3))


def is_folder(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike)) and os.path.isdir(x)


def iter_folder(folder: str | os.PathLike) -> Iterator[str]:
    """Image files under `folder`, recursively, in sorted order; hidden entries skipped; link
    loops and unreadable sub-folders reported (common.files.iter_image_files)."""
    yield from iter_image_files(os.fspath(folder))


def iter_inputs(inputs: Any) -> Iterator[tuple[str, Any]]:
    """(id, item) per output row, lazily (see the module docstring for the rules)."""
    if is_folder(inputs):
        found = False
        for path in iter_folder(inputs):
            found = True
            yield path, path
        if not found:
            log.warning("%s: folder holds no image files", inputs)
        return
    if is_single_input(inputs) or not _iterable(inputs):
        items: Iterable = (inputs,)
    else:
        items = inputs
    for index, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            if os.path.isdir(path):
                item = RejectedInput(f"{path}: is a folder: pass it on its own or expand it "
                                     "with runtime.iter_folder")
            yield path, item
        elif isinstance(item, np.ndarray) and item.ndim == 4:
            yield f"#{index}", RejectedInput(
                f"#{index}: is a batch of {len(item)} images (a 4-D array): pass it on its "
                "own or as a list of images")
        else:
            yield f"#{index}", item


def _iterable(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return x.ndim == 4
    try:
        iter(x)
    except TypeError:
        return False
    return True
