"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

Everything the project persists (checkpoints, models, features, probes, reports) goes through
`atomic_open`: write to a temporary file in the same folder, flush and fsync, then rename over
the destination (rename is atomic within a file system). On any error the temporary is removed.
Whole folders (models, probes, caches) are built in a temporary sibling and swapped in with
`replace_folder`.

Temporaries are made private (mkstemp: 0600, mkdtemp: 0700) while they are written, then given
the mode an ordinary `open`/`mkdir` would have given them under the process's umask (0644 and
0755 under umask 022) before they are renamed into place, so a service account or a container
running as another user can read what the project writes.

A process killed with SIGKILL cannot remove its temporaries, so every temporary is named
`.tmp-PID-...` after the process that writes it, and the next write into the same folder removes
those whose process is gone (`clean_stale_temps`). (A folder shared by several machines would
need a host in the name too; we do not write into such folders concurrently.)
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO

TEMP_PREFIX = ".tmp-"
_TEMP_NAME = re.compile(r"^\.tmp-(\d+)-")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def clean_stale_temps(directory: str) -> list[str]:
    """Remove temporaries (files or folders named `.tmp-PID-...`) left in `directory` by
    processes that no longer run; returns the paths removed. Never raises."""
    removed: list[str] = []
    try:
        with os.scandir(directory) as it:
            entries = [e for e in it if _TEMP_NAME.match(e.name)]
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.path)
        except OSError:
            pass  # another process cleaned it first, or it is not ours to remove
    return removed


def temp_prefix(tag: str = "") -> str:
    """The name prefix of this process's temporaries: `.tmp-PID-` (+ `tag-`)."""
    return f"{TEMP_PREFIX}{os.getpid()}-" + (f"{tag}-" if tag else "")


def current_umask() -> int:
    """The process's umask, read without changing it where the kernel says it (Linux: the
    Umask line of /proc/self/status); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # a brief window: only where /proc does not say
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open(path, 'w')` gives a new file now: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode `os.mkdir` gives a new folder now: 0o777 less the umask."""
    return 0o777 & ~current_umask()


def make_temp_file(directory: str, suffix: str = "", tag: str = "") -> tuple[int, str]:
    """mkstemp in `directory` under this process's temp prefix, after cleaning stale ones; the
    file has the umask's mode (mkstemp's own 0600 would make every output private)."""
    os.makedirs(directory, exist_ok=True)
    clean_stale_temps(directory)
    fd, path = tempfile.mkstemp(prefix=temp_prefix(tag), suffix=suffix, dir=directory)
    try:
        os.fchmod(fd, file_mode())
    except OSError:  # a file system without modes: its own defaults hold
        pass
    return fd, path


def make_temp_dir(directory: str, tag: str = "") -> str:
    """mkdtemp in `directory` under this process's temp prefix, after cleaning stale ones; the
    folder has the umask's mode (mkdtemp's 0700 would hide it from other users)."""
    os.makedirs(directory, exist_ok=True)
    clean_stale_temps(directory)
    path = tempfile.mkdtemp(prefix=temp_prefix(tag), dir=directory)
    try:
        os.chmod(path, folder_mode())
    except OSError:
        pass
    return path


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO]:
    if mode not in ("w", "wb"):
        raise ValueError("atomic_open writes whole files: mode 'w' or 'wb'")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = make_temp_file(directory, suffix=os.path.splitext(path)[1])
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


def _fsync_tree(folder: str) -> None:
    """fsync every file under `folder`, then the folders themselves (their entries)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_folder(tmp: str, out: str, *, keep_existing: bool = False,
                   fsync: bool = True) -> bool:
    """Swap the finished folder `tmp` (a sibling of `out`, from `make_temp_dir`) in for `out`.

    Its files are fsynced first (`fsync=False` for caches that are rebuilt when lost); an old
    `out` is renamed aside, the new one renamed in, then the old one deleted, so a reader finds
    the old complete folder or the new one, never a mix. If the second rename fails, the old
    folder is put back. With `keep_existing`, a non-empty `out` (another process finished
    first) is kept and `tmp` deleted. Returns whether `tmp` went in; on an error `tmp` is left
    for the caller's cleanup."""
    if fsync:
        _fsync_tree(tmp)
    if os.path.isdir(out) and not os.path.islink(out) and not os.listdir(out):
        os.rmdir(out)
    parent, base = os.path.split(os.path.abspath(out))
    if not os.path.lexists(out):
        try:
            os.rename(tmp, out)
        except OSError:
            if not (keep_existing and os.path.lexists(out)):
                raise
        else:
            if fsync:
                _fsync_dir(parent)
            return True
    if keep_existing:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    old = tempfile.mkdtemp(prefix=temp_prefix(f"{base}.old"), dir=parent)
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if fsync:
        _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)
    return True


def build_folder_once(out: str, build, marker: str) -> str:
    """Return folder `out`, building it first if `out/marker` is missing.

    `build(tmp)` fills a temporary folder beside `out`, which is then renamed into place, so a
    reader never sees a half-built folder; when two processes race, the first rename wins."""
    if os.path.exists(os.path.join(out, marker)):
        return out
    parent = os.path.dirname(os.path.abspath(out))
    tmp = make_temp_dir(parent, tag=os.path.basename(out))
    try:
        build(tmp)
        # a cache: rebuilt when lost, so not worth an fsync per file (datasets hold thousands)
        replace_folder(tmp, out, keep_existing=True, fsync=False)
        if not os.path.exists(os.path.join(out, marker)):
            raise FileExistsError(f"{out} exists but is not a finished build (no {marker}); "
                                  "remove it to rebuild")
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out
