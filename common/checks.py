"""Option checks shared by the commands: every value is checked before any work starts.

`FiniteFloat` is click's FloatRange that also refuses nan and inf (a learning rate of nan trains
to NaN weights and exits 0). `writable_output` finds out that `--out` cannot be written *before*
an hour of training or embedding, not after. Imported only by the command modules (click is
light; nothing on the runtime's import path needs this file).
"""
from __future__ import annotations

import math
import os
import tempfile

import click

from .errors import UserError


class OutputError(UserError, ValueError):
    """An output path that cannot be written; the message names it and says why."""


class FiniteFloat(click.FloatRange):
    """A float within optional bounds that is neither nan nor infinite."""

    name = "finite float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def output_problem(path: str, kind: str = "folder") -> str | None:
    """Why `path` cannot be written as a `kind` ('folder' or 'file'), or None when it can.

    Checks what exists without creating anything that stays: the path itself (a file where a
    folder is wanted, or the reverse), then the nearest existing ancestor, which must be a
    folder we can create files in (tried with a temporary file: os.access says yes to root on
    a read-only mount)."""
    if kind == "file or folder":  # a name with a suffix is a file, anything else a folder
        kind = "file" if os.path.splitext(path.rstrip("/" + os.sep))[1] else "folder"
    if kind not in ("folder", "file"):
        raise ValueError(f"kind must be 'folder', 'file' or 'file or folder', not {kind!r}")
    path = os.path.abspath(path)
    if os.path.exists(path):
        if kind == "folder" and not os.path.isdir(path):
            return "exists and is a file, not a folder"
        if kind == "file" and os.path.isdir(path):
            return "is a folder; give a file name"
    ancestor = path if kind == "folder" and os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(ancestor):
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            break
        ancestor = parent
    if not os.path.isdir(ancestor):
        return f"{ancestor} is a file, so no folder can be made under it"
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        return f"cannot write in {ancestor} ({e.strerror or e})"
    return None


def check_output(path: str, kind: str = "folder") -> None:
    """Raise OutputError naming `path` when it cannot be written (see output_problem)."""
    problem = output_problem(path, kind)
    if problem:
        raise OutputError(f"{path}: {problem}; choose another output path")


def writable_output(kind: str = "folder"):
    """A click callback checking that an output option can be written, before any work."""
    def callback(ctx, param, value):
        if value is None:
            return value
        problem = output_problem(value, kind)
        if problem:
            raise click.BadParameter(f"{value}: {problem}; choose another output path",
                                     ctx, param)
        return value
    return callback


def data_spec(ctx, param, value):
    """A click callback checking a DATA option (folder or built-in spec) before any work:
    `mnist:per_class=abc` fails here, not after a model was built."""
    if value is None:
        return value
    from .data import spec_problem
    problem = spec_problem(value)
    if problem:
        raise click.BadParameter(f"{value}: {problem}", ctx, param)
    return value
