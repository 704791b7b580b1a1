"""The INPUT arguments of the commands (embed, probe predict, bulk jobs) as (id, path) pairs:
image files, folders, list files and built-in datasets, and `embed_items`, which runs such
pairs through a pipeline. A leaf module, so every command and the bulk engine can share it
without importing each other."""
from __future__ import annotations

import os
import sys

import click

from common.errors import renamed


def _list_file_items(path: str) -> list[tuple[str, str]]:
    """Paths listed one per line ('#' comments and blank lines skipped); relative entries are
    relative to the list file's folder."""
    base = os.path.dirname(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise click.UsageError(f"{path}: cannot read the list of images ({e})")
    from runtime.inputs import iter_folder
    items = []
    for line in lines:
        if line and not line.startswith("#"):
            full = line if os.path.isabs(line) else os.path.join(base, line)
            if os.path.isdir(full):  # expanded here so ids stay aligned with rows
                items += [(p, p) for p in iter_folder(full)]
            else:
                items.append((full, full))
    return items


def collect_items(inputs: tuple[str, ...]) -> list[tuple[str, str]]:
    """(id, path) for every image named by INPUT arguments, in order."""
    from common.data import BUILTINS, DataError, load_dataset, parse_spec
    from runtime.inputs import iter_folder

    items: list[tuple[str, str]] = []
    for arg in inputs:
        if arg.startswith("@"):
            items += _list_file_items(arg[1:])
        elif os.path.isdir(arg):
            found = [(p, p) for p in iter_folder(arg)]
            if not found:
                raise click.UsageError(f"{arg}: folder holds no image files")
            items += found
        elif os.path.isfile(arg) and arg.lower().endswith(".txt"):
            items += _list_file_items(arg)
        elif not os.path.exists(arg) and parse_spec(arg)[0] in BUILTINS:
            try:
                data = load_dataset(arg)
            except DataError as e:
                raise click.UsageError(str(e))
            for split in data.splits:
                items += [(os.path.relpath(p, data.root).replace(os.sep, "/"), p)
                          for p in data.paths(split)]
        else:  # an image file, or a missing one: reported as a failed item, rows stay aligned
            items.append((arg, arg))
    return items


def embed_items(pipe, items: list[tuple[str, str]], desc: str = "embed"):
    """(id, path) items -> ((N, D) float32 with NaN rows for failures, {row: '<id>: cause'}),
    with a progress bar on stderr."""
    import numpy as np
    from tqdm import tqdm

    vectors = np.full((len(items), pipe.feature_dim_), np.nan, np.float32)
    errors: dict[int, str] = {}
    row = 0
    with tqdm(total=len(items), unit="img", file=sys.stderr, desc=desc, dynamic_ncols=True,
              disable=None) as bar:
        for _, batch, batch_errors in pipe.iter_batches(p for _, p in items):
            vectors[row:row + len(batch)] = batch
            for j, message in batch_errors.items():
                errors[row + j] = renamed(message, items[row + j][1], items[row + j][0])
            row += len(batch)
            bar.update(len(batch))
    return vectors, errors
