"""A bulk job: a Source's items -> embeddings (and probe outputs) in Parquet shards, resumable.

Shard k holds the items at positions [k*S, (k+1)*S) of the input stream, so a rerun walks the
stream, skips the items of complete shards without decoding them (checking that their first and
last ids are still the ones written) and embeds only the rest. Rows are placed by their position
in the stream, so whatever order an engine returns them in (Ray does not keep it) every input
lands exactly once, in input order.

The engines differ only in how a stream of (seq, item) becomes (seqs, vectors, errors):
`run_local` hands it to one FeaturePipeline, `runtime.bulk.ray_engine` to actors on Ray Data.
`embed_items` is the one place that calls the pipeline, for both.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import UserError, renamed

from .output import prepare, save_manifest, shard_table, write_shard
from .sources import BadItem, Source

# (seqs, vectors, {index in batch: message}) as an engine returns them
Batch = tuple[list[int], np.ndarray, dict[int, str]]
Engine = Callable[[Iterator[tuple[int, str, Any]]], Iterable[Batch]]


MAX_WRITES_QUEUED = 2


class JobError(UserError, RuntimeError):
    """The job cannot go on (inputs changed under a resumed job): one line."""


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
class _Shard:
    index: int
    ids: list[str]
    vectors: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    waiting: int = 0      # rows handed to the engine, not back yet
    closed: bool = False  # every row of the shard has been read from the source


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
    images: int = 0          # rows written in this run
    failed: int = 0
    seconds: float = 0.0
    shards_written: int = 0
    shards_skipped: int = 0
    images_skipped: int = 0
    total: int = 0           # rows in the whole output
    first_rows_s: float | None = None  # until the engine's first rows (its start-up)

    @property
    def rate(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def line(self, engine: str, out_dir: str) -> str:
        resumed = (f"; resumed: {self.shards_skipped} complete shards "
                   f"({self.images_skipped} images) skipped" if self.shards_skipped else "")
        startup = (f", first rows after {self.first_rows_s:.1f} s"
                   if self.first_rows_s is not None else "")
        return (f"{engine}: embedded {self.images - self.failed}/{self.images} images, "
                f"{self.failed} failed, in {self.seconds:.1f} s ({self.rate:.1f} img/s"
                f"{startup}); "
                f"{self.shards_written} shards written{resumed}; {self.total} rows in "
                f"{out_dir}")


def run_job(source: Source, out_dir: str, engine: Engine, *, dim: int, model: dict,
            shard_size: int = 10_000, probes: list[Probe] | None = None,
            overwrite: bool = False, progress: bool | None = None,
            echo: Callable[[str], None] | None = None,
            on_shard: Callable[[int], None] | None = None) -> Summary:
    """Embed `source` into `out_dir` with `engine`, skipping the shards a previous run of the
    same job completed. `model` identifies the model (fingerprint, variant, dim); `progress`
    None shows a bar only on a terminal; `on_shard(index)` is called after each shard."""
    from tqdm import tqdm

    say = echo or (lambda s: print(s, file=sys.stderr))
    probes = probes or []
    job = {"model": model, "inputs": source.signature(), "shard_size": shard_size,
           "probes": [{"name": p.name, "fingerprint": p.fingerprint} for p in probes]}
    manifest = prepare(out_dir, job, overwrite=overwrite)
    done = {int(k): v for k, v in manifest["shards"].items()}
    summary = Summary()
    lock = threading.Lock()
    shards: dict[int, _Shard] = {}
    where: dict[int, tuple[_Shard, int]] = {}  # seq -> (shard, row) for rows at the engine
    unreadable = [0, 0]  # items that failed before the engine: read so far, shown on the bar
    total = source.count()
    bar = tqdm(total=total, unit="img", desc="embed", file=sys.stderr, dynamic_ncols=True,
               disable=(None if progress is None else not progress), smoothing=0.1)

    def skip(index: int, first: str, last: str, n: int) -> None:
        info = done[index]
        if (first, last, n) != (info["first_id"], info["last_id"], info["rows"]):
            raise JobError(f"{out_dir}: shard {index} was written from other inputs (its ids "
                           f"{info['first_id']}..{info['last_id']} are now {first}..{last}); "
                           f"the inputs changed: rerun with --overwrite")
        summary.shards_skipped += 1
        summary.images_skipped += n
        if bar.total is not None:  # rate and ETA count only this run's work
            bar.total -= n
        bar.set_postfix_str(f"resumed, {summary.images_skipped} skipped", refresh=False)

    def stream() -> Iterator[tuple[int, str, Any]]:
        """(seq, id, item) of every item in a shard still to write; bookkeeping as it goes."""
        pos = -1
        skipping: list[str] = []  # ids of the complete shard being passed over
        for pos, (item_id, item) in enumerate(source):
            index, row = divmod(pos, shard_size)
            if index in done:
                skipping.append(item_id)
                if row == shard_size - 1:
                    skip(index, skipping[0], skipping[-1], len(skipping))
                    skipping = []
                continue
            with lock:
                shard = shards.get(index)
                if shard is None:
                    shard = shards[index] = _Shard(index, [], np.full(
                        (shard_size, dim), np.nan, np.float32))
                shard.ids.append(item_id)
                if row == shard_size - 1:
                    shard.closed = True
                if isinstance(item, BadItem):
                    shard.errors[row] = item.message
                    unreadable[0] += 1
                    continue
                shard.waiting += 1
                where[pos] = (shard, row)
            yield pos, item_id, item
        last_index = (pos // shard_size) if pos >= 0 else -1
        if skipping:  # the previous run's short last shard
            skip(last_index, skipping[0], skipping[-1], len(skipping))
        with lock:
            for shard in shards.values():
                shard.closed = True
        summary.total = pos + 1

    def persist(shard: _Shard) -> None:
        """Probe columns, the shard file, then the manifest (in the writer thread)."""
        n = len(shard.ids)
        vectors = shard.vectors[:n]
        extra: dict[str, list] = {}
        for probe in probes:
            extra.update(probe.columns(vectors))
        name = write_shard(out_dir, shard.index, shard_table(shard.ids, vectors, shard.errors,
                                                              extra))
        manifest["shards"][str(shard.index)] = {
            "file": name, "rows": n, "errors": len(shard.errors),
            "first_id": shard.ids[0], "last_id": shard.ids[-1]}
        save_manifest(out_dir, manifest)
        summary.shards_written += 1
        summary.images += n
        summary.failed += len(shard.errors)
        if on_shard:
            on_shard(shard.index)

    # One writer thread: shards are written (and fsynced) while the engine embeds the next
    # ones, in index order, with at most MAX_WRITES_QUEUED waiting, so memory stays bounded.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulk-writer")
    writes: deque = deque()

    def flush() -> None:
        """Hand every shard whose rows are all back to the writer, in index order."""
        while True:
            with lock:
                ready = [s for s in shards.values() if s.closed and s.waiting == 0]
                if not ready:
                    break
                shard = min(ready, key=lambda s: s.index)
                del shards[shard.index]
            writes.append(writer.submit(persist, shard))
        while writes and (writes[0].done() or len(writes) > MAX_WRITES_QUEUED):
            writes.popleft().result()  # raises a write error here, in the job's thread

    import pyarrow.parquet  # noqa: F401  (imported before the clock starts: it takes a while)
    start = time.perf_counter()
    try:
        with bar:
            for seqs, vectors, errors in engine(stream()):
                if summary.first_rows_s is None:
                    summary.first_rows_s = time.perf_counter() - start
                with lock:
                    for j, seq in enumerate(seqs):
                        got = where.pop(seq, None)
                        if got is None:  # a retried task's second answer: already placed
                            continue
                        shard, row = got
                        shard.vectors[row] = vectors[j]
                        if j in errors:
                            shard.errors[row] = errors[j]
                        shard.waiting -= 1
                    bad, unreadable[1] = unreadable[0] - unreadable[1], unreadable[0]
                flush()
                bar.update(len(seqs) + bad)
            flush()
            while writes:
                writes.popleft().result()
            bar.update(unreadable[0] - unreadable[1])
            if where:  # an engine that lost rows must not leave a silently short output
                raise JobError(f"{len(where)} images never came back from the engine; "
                               f"rerun the same command to resume")
    finally:
        writer.shutdown(wait=True)
        summary.seconds = time.perf_counter() - start
    manifest["finished"] = True
    manifest["rows"] = summary.total
    save_manifest(out_dir, manifest)
    if summary.shards_skipped:
        say(f"resumed {out_dir}: skipped {summary.shards_skipped} complete shards "
            f"({summary.images_skipped} images)")
    return summary

