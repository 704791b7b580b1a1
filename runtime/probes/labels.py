"""Where the true labels of saved embeddings or predicted images come from: a CSV of id,label,
or the folders the images sit in (ImageFolder style: the parent folder names the class; nested
classes such as `footwear/sandal` match the tail of the folder path)."""
from __future__ import annotations

import csv
import os

from .errors import ProbeError


class LabelError(ProbeError):
    """Labels that cannot be read or matched to the images; the message names the file."""


def read_label_csv(path: str) -> dict[str, str]:
    """{id: label} from a CSV with columns `id` and `label` (by those header names, else the
    first two columns, a header row then being optional)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LabelError(f"{path}: cannot read the labels ({e})") from e
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise LabelError(f"{path}: no rows; write one `id,label` line per image")
    header = [c.strip().lower() for c in rows[0]]
    has_header = "id" in header and "label" in header
    i, j = (header.index("id"), header.index("label")) if has_header else (0, 1)
    labels: dict[str, str] = {}
    for n, row in enumerate(rows[1:] if has_header else rows, 2 if has_header else 1):
        if len(row) <= max(i, j) or not row[j].strip():
            raise LabelError(f"{path}: row {n} has no label (write `id,label`)")
        item, label = row[i].strip(), row[j].strip()
        if item in labels and labels[item] != label:
            raise LabelError(f"{path}: id {item!r} is labelled both {labels[item]!r} and "
                             f"{label!r}")
        labels[item] = label
    return labels


def parent_folder(item_id: str) -> str:
    """The name of the folder an image id (a path) sits in."""
    return os.path.basename(os.path.dirname(item_id.replace("\\", "/").rstrip("/")))


def folder_class(item_id: str, classes: list[str]) -> str | None:
    """The class (of `classes`) that the image's folder path ends with, the longest match
    first (`test/footwear/sandal/x.png` -> `footwear/sandal`, or `sandal`); None if none."""
    folder = "/" + os.path.dirname(item_id.replace("\\", "/")).strip("/")
    for c in sorted(classes, key=len, reverse=True):
        if folder.endswith("/" + str(c).strip("/")):
            return str(c)
    return None


def id_keys(item_id: str) -> list[str]:
    """The spellings under which an id (a path) may be looked up: as written, normalised, and
    absolute."""
    keys = [item_id, os.path.normpath(item_id)]
    if not os.path.isabs(item_id):
        keys.append(os.path.abspath(item_id))
    return keys
