"""Walking image folders: streamed, sorted, and safe against symbolic-link loops.

Every folder listing in the project goes through `iter_image_files`, so a folder of millions of
files is never listed in one go (one directory at a time, sorted), a link that points back up the
tree cannot yield the same image twice, and a sub-folder that cannot be read is reported instead of
being skipped without a word.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

from .images import is_image_file

log = logging.getLogger("unirep.files")

OnError = Callable[[str, str], None]


def _warn(path: str, message: str) -> None:
    log.warning("%s: %s", path, message)


def _report_hidden(entry: os.DirEntry, report: OnError) -> None:
    """Report a hidden folder that holds image files (one listing of that folder only)."""
    try:
        if not entry.is_dir(follow_symlinks=True):
            return
        with os.scandir(entry.path) as it:
            n = sum(1 for e in it if not e.name.startswith(".") and is_image_file(e.name))
    except OSError:
        return
    if n:
        report(entry.path, f"hidden folder (its name starts with '.') holding {n} image(s); "
                           "skipped: rename it without the leading '.' to use them")


def iter_image_files(root: str, *, on_error: OnError | None = None,
                     follow_links: bool = True,
                     on_folder: Callable[[str, int, int], None] | None = None) -> Iterator[str]:
    """Image files under `root`, depth first, each directory's entries in sorted order.

    Hidden entries (a leading '.') are skipped; a hidden folder that holds image files itself
    (a class folder named '.cats', unlike '.git') is reported with their count, never dropped
    without a word. Links to folders are followed once: a folder
    reached again through a link (same device and inode as one already on the walk) is skipped
    and reported, so a link loop ends and no file is yielded twice through it. `on_error(path,
    message)` hears about unreadable folders and skipped loops (default: a logged warning);
    `on_folder(folder, n_images, n_subfolders)`, when given, hears about every folder listed
    (e.g. to report empty class folders without listing anything twice)."""
    report = on_error or _warn
    seen: set[tuple[int, int]] = set()

    def key(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError as e:
            report(path, f"cannot be read ({e.strerror or e}); skipped")
            return None
        return st.st_dev, st.st_ino

    def walk(folder: str) -> Iterator[str]:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            report(folder, f"folder cannot be read ({e.strerror or e}); its images are skipped")
            return
        for entry in entries:
            if entry.name.startswith("."):
                _report_hidden(entry, report)
        entries = [e for e in entries if not e.name.startswith(".")]
        kinds = []
        for entry in entries:
            try:
                kinds.append(entry.is_dir(follow_symlinks=follow_links))
            except OSError:
                kinds.append(False)
        if on_folder is not None:
            on_folder(folder, sum(not d and is_image_file(e.name) for e, d in zip(entries, kinds)),
                      sum(kinds))
        for entry, is_dir in zip(entries, kinds):
            if is_dir:
                k = key(entry.path)
                if k is None:
                    continue
                if k in seen:
                    report(entry.path, "links back to a folder already walked; skipped")
                    continue
                seen.add(k)
                yield from walk(entry.path)
            elif is_image_file(entry.name):
                yield entry.path

    root_key = key(root)
    if root_key is None:
        return
    seen.add(root_key)
    yield from walk(root)
