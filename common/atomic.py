"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

Everything the project persists (checkpoints, models, features, probes, reports) goes through
`atomic_open`: write to a temporary file in the same folder, flush and fsync, then rename over
the destination (rename is atomic within a file system). On any error the temporary is removed.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO]:
    if mode not in ("w", "wb"):
        raise ValueError("atomic_open writes whole files: mode 'w' or 'wb'")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def build_folder_once(out: str, build, marker: str) -> str:
    """Return folder `out`, building it first if `out/marker` is missing.

    `build(tmp)` fills a temporary folder beside `out`, which is then renamed into place, so a
    reader never sees a half-built folder; when two processes race, the first rename wins."""
    import shutil
    if os.path.exists(os.path.join(out, marker)):
        return out
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}-", dir=parent)
    try:
        build(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first: keep theirs
            if not os.path.exists(os.path.join(out, marker)):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out
