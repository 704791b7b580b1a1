"""The writing side of a bulk job: shards persisted in a background thread, in index order, and
shards rewritten without rows that must go (changed or pruned inputs).

Each persist writes the shard (atomically, fsynced), then the manifest that lists it; a rewrite
writes the shortened shard under a new index, switches the manifest to it, then deletes the old
file. So at every moment the manifest lists only complete shards.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .manifest import save_manifest
from .output import shard_table, write_shard

if TYPE_CHECKING:
    from .job import Probe, Summary

MAX_WRITES_QUEUED = 2  # shards waiting for the writer: memory stays bounded


@dataclass
class PendingShard:
    """A shard being filled: its rows as they come back from the engine."""

    index: int
    vectors: np.ndarray
    ids: list[str] = field(default_factory=list)
    stamps: list[str] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)
    waiting: int = 0      # rows handed to the engine, not back yet
    closed: bool = False  # every row of the shard has been read from the source


class ShardWriter:
    """One writer thread: shards are written (and fsynced) while the engine embeds the next."""

    def __init__(self, out_dir: str, manifest: dict, probes: list[Probe],
                 metadata: dict[bytes, bytes], summary: Summary,
                 on_shard: Callable[[int], None] | None):
        self.out_dir, self.manifest, self.probes = out_dir, manifest, probes
        self.metadata, self.summary, self.on_shard = metadata, summary, on_shard
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulk-writer")
        self.writes: deque[Future] = deque()

    def submit(self, shard: PendingShard) -> None:
        self.writes.append(self.pool.submit(self.persist, shard))

    def drain(self, *, everything: bool = False) -> None:
        """Collect finished writes (all of them with `everything`); a write error is raised
        here, in the job's thread."""
        while self.writes and (everything or self.writes[0].done()
                               or len(self.writes) > MAX_WRITES_QUEUED):
            self.writes.popleft().result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def persist(self, shard: PendingShard) -> None:
        """Probe columns, the shard file, then the manifest (in the writer thread)."""
        n = len(shard.ids)
        vectors = shard.vectors[:n]
        extra: dict[str, list] = {}
        for probe in self.probes:
            extra.update(probe.columns(vectors))
        table = shard_table(shard.ids, vectors, shard.errors, shard.stamps, extra,
                            self.metadata)
        self.manifest["shards"][str(shard.index)] = write_shard(self.out_dir, shard.index,
                                                                table)
        save_manifest(self.out_dir, self.manifest)
        self.summary.shards_written += 1
        self.summary.images += n
        self.summary.failed += len(shard.errors)
        if self.on_shard:
            self.on_shard(shard.index)

    def rewrite(self, index: int, drop: set[str], new_index: int) -> bool:
        """Shard `index` without the rows whose id is in `drop`, as shard `new_index` (none if
        no row is left). Returns whether `new_index` was used. In the job's thread, after every
        new shard is written."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
        info = self.manifest["shards"].get(str(index))
        if info is None:
            return False
        path = os.path.join(self.out_dir, info["file"])  # checked by verify_shards
        table = pq.read_table(path)
        kept = table.filter(pc.invert(pc.is_in(table.column("id"),
                                               value_set=pa.array(sorted(drop), pa.string()))))
        if kept.num_rows:
            self.manifest["shards"][str(new_index)] = write_shard(self.out_dir, new_index, kept)
            self.summary.shards_written += 1
        del self.manifest["shards"][str(index)]
        save_manifest(self.out_dir, self.manifest)
        os.unlink(path)
        return kept.num_rows > 0

    def merge(self, indices: list[int], new_index: int) -> None:
        """Shards `indices` (small ones, left by updates) as one shard `new_index`: the new one
        is written and listed before the old ones are unlisted and deleted."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        paths = [os.path.join(self.out_dir, self.manifest["shards"][str(i)]["file"])
                 for i in indices]
        tables = [pq.read_table(p) for p in paths]
        merged = pa.concat_tables(tables).replace_schema_metadata(tables[-1].schema.metadata)
        self.manifest["shards"][str(new_index)] = write_shard(self.out_dir, new_index, merged)
        for i in indices:
            del self.manifest["shards"][str(i)]
        save_manifest(self.out_dir, self.manifest)
        for p in paths:
            os.unlink(p)
        self.summary.shards_written += 1
        self.summary.merged += len(indices)


def merge_groups(rows: dict[int, int], shard_size: int) -> list[list[int]]:
    """Groups of two or more shards under half the shard size ({index: rows}), each group
    holding at most `shard_size` rows, so that nightly updates do not pile up tiny files."""
    groups: list[list[int]] = []
    group: list[int] = []
    total = 0
    for index in sorted(i for i, n in rows.items() if n < shard_size / 2):
        if group and total + rows[index] > shard_size:
            groups.append(group)
            group, total = [], 0
        group.append(index)
        total += rows[index]
    groups.append(group)
    return [g for g in groups if len(g) >= 2]
