"""The walk of one bulk run: inputs sorted into kept / new / changed / duplicate, the ones to
embed streamed to the engine, their rows placed back into shards, and the progress bar.

Rows are placed by their position among the inputs embedded in this run (`seq`), so whatever
order an engine returns them in (Ray does not keep it) every input lands exactly once, in input
order. The bar's total is the number of inputs less the ones kept or skipped: known at once for
lists and Parquet tables, counted beside the work for folders and CSV tables (a walk that reads
no image), so the ETA is for this run's work only.
"""
from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from common.errors import UserError

from .sources import BadItem, stamp_of
from .writer import PendingShard, ShardWriter

if TYPE_CHECKING:
    from .job import _Run


class Walk:
    def __init__(self, run: _Run, base: int, writer: ShardWriter, *, progress: bool | None,
                 bar_file=None):
        from tqdm import tqdm
        self.run_, self.base, self.writer = run, base, writer
        self.lock = threading.Lock()
        self.shards: dict[int, PendingShard] = {}
        self.where: dict[int, tuple[PendingShard, int]] = {}  # seq -> (shard, row) at the engine
        self.unreadable = [0, 0]  # inputs that failed before the engine: read, shown on the bar
        self.to_embed = 0
        self.skipped = 0          # kept or duplicate: not this run's work
        self.counted: int | None = run.source.count()
        self.bar = tqdm(total=self.counted, unit="img", desc="embed",
                        file=bar_file or sys.stderr, dynamic_ncols=bar_file is None,
                        disable=(None if progress is None else not progress), smoothing=0.1)

    def next_index(self) -> int:
        """The first shard index after this run's new shards."""
        return self.base + math.ceil(self.to_embed / self.run_.shard_size)

    def _count(self) -> None:
        try:
            n = self.run_.source.estimate()
        except (OSError, UserError, ValueError):  # only the bar's total: never the job's end
            return
        with self.lock:
            if self.counted is None:
                self.counted = n
                self._retotal()

    def _retotal(self) -> None:
        """The bar's total: inputs counted less those skipped (under the lock)."""
        if self.counted is not None and not self.bar.disable:
            self.bar.total = max(self.counted - self.skipped, self.bar.n)

    def _skip(self) -> None:
        with self.lock:
            self.skipped += 1
            self._retotal()

    def _duplicate(self, item_id: str, pos: int) -> None:
        summary = self.run_.summary
        summary.duplicates += 1
        if summary.duplicates <= 10:
            self.run_.say(f"warning: duplicate id {item_id!r} (input {pos + 1}): only its first "
                          f"occurrence is embedded")
        self._skip()

    def classify(self, item_id: str, item: Any) -> str | None:
        """The input's stamp when it must be embedded (new or changed), None when kept."""
        run, summary = self.run_, self.run_.summary
        stamp = stamp_of(item)
        old = run.index.get(item_id)
        if old is not None and old[1] == stamp:
            summary.kept += 1
            return None
        if old is not None:
            summary.changed += 1
            run.drop.setdefault(old[0], set()).add(item_id)
        else:
            summary.added += 1
        return stamp

    def stream(self) -> Iterator[tuple[int, str, Any]]:
        """(seq, id, item) of every input to embed; bookkeeping as it goes."""
        run, size = self.run_, self.run_.shard_size
        seq = pos = -1
        for pos, (item_id, item) in enumerate(run.source):
            if item_id in run.seen:
                self._duplicate(item_id, pos)
                continue
            run.seen.add(item_id)
            stamp = self.classify(item_id, item)
            if stamp is None:
                self._skip()
                continue
            seq += 1
            index, row = divmod(seq, size)
            with self.lock:
                shard = self.shards.get(index + self.base)
                if shard is None:
                    shard = self.shards[index + self.base] = PendingShard(
                        index + self.base, np.full((size, run.dim), np.nan, np.float32))
                shard.ids.append(item_id)
                shard.stamps.append(stamp)
                shard.closed = row == size - 1
                if isinstance(item, BadItem):
                    shard.errors[row] = item.message
                    self.unreadable[0] += 1
                    continue
                shard.waiting += 1
                self.where[seq] = (shard, row)
            yield seq, item_id, item
        with self.lock:
            self.to_embed = seq + 1
            self.counted = pos + 1  # exact now
            self._retotal()
            for shard in self.shards.values():
                shard.closed = True

    def flush(self, *, everything: bool = False) -> None:
        """Hand every shard whose rows are all back to the writer, in index order."""
        while True:
            with self.lock:
                ready = [s for s in self.shards.values() if s.closed and s.waiting == 0]
                if not ready:
                    break
                shard = min(ready, key=lambda s: s.index)
                del self.shards[shard.index]
            self.writer.submit(shard)
        self.writer.drain(everything=everything)

    def place(self, seqs: list[int], vectors: np.ndarray, errors: dict[int, str]) -> int:
        """Put an engine batch's rows into their shards; returns how far the bar moves."""
        with self.lock:
            for j, seq in enumerate(seqs):
                got = self.where.pop(seq, None)
                if got is None:  # a retried task's second answer: already placed
                    continue
                shard, row = got
                shard.vectors[row] = vectors[j]
                if j in errors:
                    shard.errors[row] = errors[j]
                shard.waiting -= 1
            bad, self.unreadable[1] = self.unreadable[0] - self.unreadable[1], self.unreadable[0]
        return len(seqs) + bad

    def run(self) -> int:
        """Embed; returns how many rows the engine never gave back (0 when it kept them all)."""
        summary = self.run_.summary
        if self.counted is None:
            threading.Thread(target=self._count, name="bulk-count", daemon=True).start()
        import pyarrow.parquet  # noqa: F401  (imported before the clock starts: it takes a while)
        start = time.perf_counter()
        try:
            with self.bar:
                for seqs, vectors, errors in self.run_.engine(self.stream()):
                    if summary.first_rows_s is None:
                        summary.first_rows_s = time.perf_counter() - start
                    moved = self.place(seqs, vectors, errors)
                    self.flush()
                    self.bar.update(moved)
                self.flush(everything=True)
                self.bar.update(self.unreadable[0] - self.unreadable[1])
            return len(self.where)
        finally:
            summary.seconds = time.perf_counter() - start
