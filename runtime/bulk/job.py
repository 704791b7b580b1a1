"""A bulk job: a Source's items -> embeddings (and probe outputs) in Parquet shards, updatable.

Every run on an output folder is an update of what it holds. The rows of the folder are keyed by
id, each with its input's stamp (size and mtime of a file, a hash of bytes; `stamp_of`). A run
first checks every shard the manifest lists (`verify_shards`: a damaged or missing one is
dropped and its inputs embedded again), then walks the inputs:

    id not in the folder            new: embedded into a new shard
    id there, stamp the same        kept: never decoded
    id there, stamp changed         changed: embedded again; its old row is removed
    id seen twice in the inputs     a duplicate: only its first occurrence is used (reported)
    id in the folder, not in inputs vanished: reported, and removed only with `prune`

New rows go to new shards (input order within the run). A shard that loses rows (changed,
pruned) is rewritten under a new index, the manifest switched to it, then the old file deleted,
so a run killed at any point leaves a folder whose manifest lists only complete shards, and the
next run picks up what is missing. (Killed between writing a changed row and dropping the old
one, the id is in two shards; the next run keeps the newer.)

The engines differ only in how a stream of (seq, id, item) becomes (seqs, vectors, errors):
`pipeline_engine` hands it to one FeaturePipeline, `runtime.bulk.ray_engine` to actors on Ray
Data. `embed_items` is the one place that calls the pipeline, for both.
"""
from __future__ import annotations

import errno
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import UserError, renamed

from .lock import OutputLock
from .manifest import prepare, remove_unlisted, save_manifest, verify_shards
from .output import OutputError, shard_metadata
from .sources import CORRUPT_SUFFIX, Source
from .walk import Walk
from .writer import ShardWriter, merge_groups

# (seqs, vectors, {index in batch: message}) as an engine returns them
Batch = tuple[list[int], np.ndarray, dict[int, str]]
Engine = Callable[[Iterator[tuple[int, str, Any]]], Iterable[Batch]]

MAX_NAMED = 10  # ids named one by one in a report (duplicates, vanished); then a count


class JobError(UserError, RuntimeError):
    """The job cannot go on (an engine lost rows, the disk is full): one line."""


def embed_items(pipe, ids: list[str], items: list[Any]) -> tuple[np.ndarray, dict[int, str]]:
    """One batch through FeaturePipeline's public API: (vectors, {row: '<id>: cause'})."""
    blocks, errors, row = [], {}, 0
    for batch_ids, vectors, batch_errors in pipe.iter_batches(items):
        for j, message in batch_errors.items():
            errors[row + j] = renamed(message, batch_ids[j], ids[row + j])
        blocks.append(vectors)
        row += len(vectors)
    return np.concatenate(blocks), errors


def pipeline_engine(pipe) -> Engine:
    """The local engine: the pipeline streams (it keeps order, and prefetches on its own)."""
    def run(stream: Iterator[tuple[int, str, Any]]) -> Iterator[Batch]:
        fed: list[tuple[int, str]] = []  # (seq, id) in the order the pipeline was given them
        lock = threading.Lock()

        def items():
            for seq, item_id, item in stream:
                with lock:
                    fed.append((seq, item_id))
                yield item

        done = 0
        for batch_ids, vectors, batch_errors in pipe.iter_batches(items()):
            with lock:
                mine = fed[done:done + len(vectors)]
            done += len(vectors)
            if done > 4096:  # forget what is written; keep the list short
                with lock:
                    del fed[:done]
                done = 0
            errors = {j: renamed(m, batch_ids[j], mine[j][1]) for j, m in batch_errors.items()}
            yield [s for s, _ in mine], vectors, errors
    return run


@dataclass
class Probe:
    """A fitted probe whose label and score become the columns `<name>_label`, `<name>_score`."""

    name: str
    estimator: Any
    fingerprint: str = ""

    def columns(self, vectors: np.ndarray) -> dict[str, list]:
        ok = np.isfinite(vectors).all(axis=1)
        labels: list[str | None] = [None] * len(vectors)
        scores: list[float | None] = [None] * len(vectors)
        if ok.any():
            p = self.estimator.predict_proba(vectors[ok])
            best = p.argmax(axis=1)
            for r, b, s in zip(np.flatnonzero(ok), best, p[np.arange(len(p)), best]):
                labels[r] = str(self.estimator.classes_[b])
                scores[r] = float(s)
        return {f"{self.name}_label": labels, f"{self.name}_score": scores}


@dataclass
class Summary:
    images: int = 0          # rows embedded in this run
    failed: int = 0
    seconds: float = 0.0
    shards_written: int = 0  # new shards, and shards rewritten without old rows
    added: int = 0           # ids not in the folder before (damaged shards' rows included)
    changed: int = 0         # ids whose input changed: embedded again
    kept: int = 0            # rows kept as they were (inputs unchanged)
    duplicates: int = 0      # inputs skipped: their id came earlier in the inputs
    vanished: int = 0        # rows whose input is gone
    pruned: int = 0          # of those, removed (prune)
    damaged: int = 0         # listed shards that failed their check and were redone
    merged: int = 0          # small shards (left by earlier updates) merged into bigger ones
    total: int = 0           # rows in the whole output
    first_rows_s: float | None = None  # until the engine's first rows (its start-up)
    interrupted: bool = field(default=False, repr=False)

    @property
    def rate(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def line(self, engine: str, out_dir: str) -> str:
        startup = (f", first rows after {self.first_rows_s:.1f} s"
                   if self.first_rows_s is not None else "")
        parts = [f"{engine}: embedded {self.images - self.failed}/{self.images} images "
                 f"({self.added} new, {self.changed} changed), {self.failed} failed, in "
                 f"{self.seconds:.1f} s ({self.rate:.1f} img/s{startup})",
                 f"kept {self.kept} unchanged rows"]
        if self.vanished:
            parts.append(f"{self.vanished} inputs gone: {self.pruned} rows removed" if
                         self.pruned else f"{self.vanished} rows of inputs gone kept "
                                          f"(--prune removes them)")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate ids skipped")
        if self.damaged:
            parts.append(f"{self.damaged} damaged shards redone")
        if self.merged:
            parts.append(f"{self.merged} small shards merged")
        parts.append(f"{self.shards_written} shards written; {self.total} rows in {out_dir}")
        return "; ".join(parts)


def _disk_error(e: OSError, out_dir: str) -> JobError | None:
    """A one-line JobError for a full disk, a quota or a read-only output, else None."""
    what = {errno.ENOSPC: ("the disk is full", "free some space"),
            errno.EDQUOT: ("the disk quota is exceeded", "free some space"),
            errno.EROFS: ("the file system is read-only", "make it writable")}.get(e.errno or 0)
    if what is None:
        return None
    return JobError(f"{out_dir}: cannot write ({what[0]}: {e.strerror}); the complete shards "
                    f"are kept: {what[1]} and run the same command again to resume")


def run_job(source: Source, out_dir: str, engine: Engine, *, dim: int, model: dict,
            description: dict | None = None, shard_size: int = 10_000,
            probes: list[Probe] | None = None, overwrite: bool = False, prune: bool = False,
            progress: bool | None = None, bar_file=None,
            echo: Callable[[str], None] | None = None,
            on_shard: Callable[[int], None] | None = None,
            model_dir: str | None = None) -> Summary:
    """Embed what `out_dir` lacks of `source` with `engine` (see the module doc), holding the
    folder's single-writer lock. `model` identifies the model (fingerprint, variant, dim) and,
    with `description`, goes into every shard's metadata; `prune` removes the rows of inputs
    that are gone; `progress` None shows a bar only on a terminal (`bar_file`: where, default
    stderr); `on_shard(index)` is called after each shard is written; `model_dir`, recorded in
    the manifest (not part of the job's identity), lets `search` embed queries with the model."""
    say = echo or (lambda s: print(s, file=sys.stderr))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create the output folder "
                          f"({e.strerror or e})") from e
    try:
        with OutputLock(out_dir):
            run = _Run(source, out_dir, engine, dim=dim, model=model, description=description,
                       shard_size=shard_size, probes=probes or [], prune=prune, say=say,
                       on_shard=on_shard, model_dir=model_dir)
            return run.run(overwrite=overwrite, progress=progress, bar_file=bar_file)
    except OSError as e:
        error = _disk_error(e, out_dir)
        if error is None:
            raise
        raise error from e


class _Run:
    """One run of a job: the index of what the folder holds, the walk, the writes."""

    def __init__(self, source: Source, out_dir: str, engine: Engine, *, dim: int, model: dict,
                 description: dict | None, shard_size: int, probes: list[Probe], prune: bool,
                 say: Callable[[str], None], on_shard: Callable[[int], None] | None,
                 model_dir: str | None = None):
        self.source, self.out_dir, self.engine = source, out_dir, engine
        self.model_dir = os.path.abspath(model_dir) if model_dir else None
        self.dim, self.model, self.shard_size, self.probes = dim, model, shard_size, probes
        self.prune, self.say, self.on_shard = prune, say, on_shard
        self.metadata = shard_metadata(model, description)
        self.summary = Summary()
        self.index: dict[str, tuple[int, str]] = {}  # id -> (shard index, input stamp)
        self.drop: dict[int, set[str]] = {}          # shard index -> ids whose row must go
        self.seen: set[str] = set()

    def open(self, overwrite: bool) -> dict:
        """The manifest to update, its shards checked, and the index of their rows."""
        job = {"model": self.model, "identity": self.source.identity(),
               "shard_size": self.shard_size,
               "probes": [{"name": p.name, "fingerprint": p.fingerprint} for p in self.probes]}
        if self.model_dir:
            job["model_dir"] = self.model_dir
        manifest = prepare(self.out_dir, job, overwrite=overwrite)
        good, dropped = verify_shards(self.out_dir, manifest)
        for line in dropped:
            self.say(f"warning: {self.out_dir}: {line}")
        self.summary.damaged = len(dropped)
        if dropped:
            remove_unlisted(self.out_dir, manifest)
            save_manifest(self.out_dir, manifest)
        for shard in good:  # in index order: a later shard's row of an id wins
            for item_id, stamp in zip(shard.ids, shard.stamps):
                old = self.index.get(item_id)
                if old is not None and old[0] != shard.index:
                    self.drop.setdefault(old[0], set()).add(item_id)
                self.index[item_id] = (shard.index, stamp)
        return manifest

    def run(self, *, overwrite: bool, progress: bool | None, bar_file) -> Summary:
        manifest = self.open(overwrite)
        base = 1 + max((int(k) for k in manifest["shards"]), default=-1)
        writer = ShardWriter(self.out_dir, manifest, self.probes, self.metadata,
                             self.summary, self.on_shard)
        walk = Walk(self, base, writer, progress=progress, bar_file=bar_file)
        try:
            lost = walk.run()
        finally:
            writer.close()
        if lost:  # an engine that lost rows must not leave a silently short output
            raise JobError(f"{lost} images never came back from the engine; run the same "
                           f"command again to resume")
        self.finish(manifest, writer, walk.next_index())
        return self.summary

    def finish(self, manifest: dict, writer: ShardWriter, next_index: int) -> None:
        """Vanished inputs, shards rewritten without their old rows, the final manifest."""
        gone = [i for i in self.index if i not in self.seen]
        for item_id in [i for i in gone if i.endswith(CORRUPT_SUFFIX)]:
            # a report that a tar stopped early, not an input: gone once the tar reads whole
            self.drop.setdefault(self.index[item_id][0], set()).add(item_id)
            gone.remove(item_id)
        self.summary.vanished = len(gone)
        if gone:
            named = ", ".join(gone[:MAX_NAMED]) + (f" and {len(gone) - MAX_NAMED} more"
                                                   if len(gone) > MAX_NAMED else "")
            self.say(f"{self.out_dir}: {len(gone)} rows have no input any more ({named}); "
                     + ("removed (--prune)" if self.prune else "kept; --prune removes them"))
        if self.prune:
            for item_id in gone:
                self.drop.setdefault(self.index[item_id][0], set()).add(item_id)
            self.summary.pruned = len(gone)
        for index in sorted(self.drop):
            if writer.rewrite(index, self.drop[index], next_index):
                next_index += 1
        rows = {int(k): int(info["rows"]) for k, info in manifest["shards"].items()}
        for group in merge_groups(rows, self.shard_size):
            writer.merge(group, next_index)
            next_index += 1
        manifest["finished"] = True
        manifest["rows"] = self.summary.total = sum(
            int(info["rows"]) for info in manifest["shards"].values())
        manifest["inputs"] = self.source.signature()
        manifest["last_run"] = {k: getattr(self.summary, k) for k in (
            "added", "changed", "kept", "duplicates", "vanished", "pruned", "damaged",
            "failed")}
        save_manifest(self.out_dir, manifest)
