"""How batches are decoded and run: interchangeable schedules over one Engine.

Every schedule takes chunks of (id, item) work (one chunk per batch) and yields
(ids, vectors, errors) per batch, in order, with a bounded window of batches in flight:

  DecodeThreads  a decode thread pool beside the calling thread, which runs the model: batch
                 k+1 and k+2 are decoded while batch k is inferred (GPUs; CPUs when asked);
                 the number of decode workers per batch adapts to whether the model waits
  ProcessDecode  the same, with paths and bytes decoded by worker processes into a
                 shared-memory ring of batches (runtime.procdecode), for machines where the
                 GIL, not the cores, limits decoding
  Interleaved    CPU streams: a few workers each decode a batch and then run the model on it
                 with their share of the cores, so every core runs one thread at a time
  GpuDecode      decode="gpu": the thread pool reads files ahead, then the GPU decoder writes
                 each batch into the engine's bound device buffer, which the model reads

A new schedule (a service's batcher) is one more subclass of Schedule; the plan that picks one
is runtime.resolve, and `open_schedule` opens it. A decode task of every schedule is a
DecodeTask; every schedule finishes its rows with `finish_rows` (NaN rows for failures, rows
the model made non-finite refused with NON_FINITE), so rows, errors and their wording agree.
"""
from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from common.images import ImageDecodeError

from .decode import _name, _read_bytes
from .engine import Engine
from .inputs import RejectedInput
from .procdecode import DecodeProcesses, decode_rows, travels
from .resolve import PipelineConfig

Chunk = list[tuple[str, Any]]
Batch = tuple[list[str], np.ndarray, dict[int, str]]
NON_FINITE = "model produced non-finite values (NaN or inf)"


@dataclass
class ProcessSlice:
    """Rows of a batch being decoded by one worker process."""

    rows: list[int]
    future: Future
    items: list


@dataclass
class DecodeTask:
    """One batch being decoded: its ids, the array its rows are decoded into (for GpuDecode:
    the items read ahead, with `items` the inputs as given), the parts that decode it (thread
    futures giving {row: error}, or process slices) and, for a batch in the decode processes'
    ring, the slot to give back."""

    ids: list[str]
    batch: np.ndarray
    parts: list = field(default_factory=list)
    slot: tuple[DecodeProcesses, int] | None = None
    items: list = field(default_factory=list)

    def cancel(self) -> None:
        for part in self.parts:
            (part.future if isinstance(part, ProcessSlice) else part).cancel()

    def release(self, wait: bool = False) -> None:
        """Give a shared-memory batch's slot back, once no worker can still write into it."""
        if self.slot is None:
            return
        for part in self.parts:
            f = part.future if isinstance(part, ProcessSlice) else part
            if not f.cancel() and wait:
                with contextlib.suppress(Exception):
                    f.result()
        procs, slot = self.slot
        procs.give_slot(slot)
        self.slot = None


class ThreadPool:
    """The decode threads of one pipeline, started on first use and shared by its schedules."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def get(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="unirep-decode")
            return self._pool

    def close(self, wait: bool = True) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=wait, cancel_futures=True)
                self._pool = None


class Schedule:
    """Decode chunks into batches and run the engine on them. Subclasses define
    `iter_batches`; decoding rows and turning a decoded batch into embeddings is shared."""

    name = "base"

    def __init__(self, engine: Engine, config: PipelineConfig, *, fast_decode: bool,
                 pool: ThreadPool):
        self.engine, self.config, self.fast_decode, self.pool = engine, config, fast_decode, pool

    def iter_batches(self, chunks: Iterator[Chunk], inline: bool = False) -> Iterator[Batch]:
        raise NotImplementedError

    def warmup(self) -> None:
        """Start what the first batch would otherwise wait for."""

    def close(self, wait: bool = True) -> None:
        """Stop this schedule's own workers (the shared thread pool is the owner's)."""

    # -- shared by the schedules -----------------------------------------------------------------
    def new_batch(self, n: int) -> np.ndarray:
        return np.empty((n,) + self.engine.batch_shape, self.engine.batch_dtype)

    def decode_rows(self, rows: list[int], items: list, batch: np.ndarray, ids: list[str]
                    ) -> dict[int, str]:
        """items[k] into batch[rows[k]] (uint8 crops for the model's front, else normalised
        floats), in this thread; {row: '<id>: <cause>'} for the failures."""
        failed = decode_rows(rows, items, batch, self.engine.preprocessing, self.fast_decode)
        return row_errors(rows, failed, ids)

    def decode_into(self, items: list, batch: np.ndarray, start: int, ids: list[str]
                    ) -> dict[int, str]:
        return self.decode_rows(list(range(start, start + len(items))), items, batch, ids)

    def embed_rows(self, batch: np.ndarray, errors: dict[int, str], ids: list[str],
                   infer: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Embeddings of a decoded batch: `infer` on the rows without errors, finished by
        `finish_rows` (NaN rows for the errors, non-finite rows refused)."""
        vectors = np.full((len(batch), self.engine.feature_dim), np.nan, np.float32)
        if len(errors) < len(batch):
            ok = np.array([i not in errors for i in range(len(batch))], dtype=bool)
            vectors[ok] = infer(batch if not errors else batch[ok])
        return finish_rows(vectors, errors, ids)


class _Gate:
    """A semaphore whose limit can change: at most `limit` decode tasks run at once, so the pool
    may hold a worker per core while only the workers the model leaves room for are busy."""

    def __init__(self, limit: int):
        self.limit, self.active = limit, 0
        self.cond = threading.Condition()

    def set_limit(self, limit: int) -> None:
        with self.cond:
            self.limit = limit
            self.cond.notify_all()

    def __enter__(self):
        with self.cond:
            while self.active >= self.limit:
                self.cond.wait()
            self.active += 1

    def __exit__(self, *exc):
        with self.cond:
            self.active -= 1
            self.cond.notify()


class DecodeThreads(Schedule):
    """Decode threads beside the calling thread, which runs the model (the overlapped
    schedule). Decoding of the next `prefetch` batches overlaps the model call on the current
    one; at most prefetch + 1 batches are held."""

    name = "threads"

    def __init__(self, engine: Engine, config: PipelineConfig, *, fast_decode: bool,
                 pool: ThreadPool):
        super().__init__(engine, config, fast_decode=fast_decode, pool=pool)
        self.parallelism = config.decode_threads  # decode workers per batch, now
        self._gate = _Gate(config.decode_threads)

    def iter_batches(self, chunks: Iterator[Chunk], inline: bool = False) -> Iterator[Batch]:
        pending: deque[DecodeTask] = deque()
        try:
            for chunk in chunks:
                pending.append(self.submit(chunk, inline))
                if len(pending) > self.config.prefetch:
                    yield self.complete(pending.popleft())
            while pending:
                yield self.complete(pending.popleft())
        finally:  # consumer stopped early: drop queued decode work
            for task in pending:
                task.cancel()
                task.release(wait=True)

    def submit(self, chunk: Chunk, inline: bool = False) -> DecodeTask:
        ids = [i for i, _ in chunk]
        items = [x for _, x in chunk]
        task = self.new_task(ids, items)
        if inline:
            done: Future = Future()
            done.set_result(self.prepare(items, task.batch, 0, ids))
            task.parts.append(done)
            return task
        parts = min(self.parallelism, len(items))
        bounds = [round(k * len(items) / parts) for k in range(parts + 1)]
        pool = self.pool.get()
        task.parts += [pool.submit(self._gated_prepare, items[a:b], task.batch, a, ids)
                       for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return task

    def new_task(self, ids: list[str], items: list) -> DecodeTask:
        return DecodeTask(ids, self.new_batch(len(items)))

    def prepare(self, items: list, batch: np.ndarray, start: int, ids: list[str]
                ) -> dict[int, str]:
        """What the pool does for a slice of a batch ahead of the model: decode it here."""
        return self.decode_into(items, batch, start, ids)

    def _gated_prepare(self, items, batch, start, ids):
        with self._gate:
            return self.prepare(items, batch, start, ids)

    def collect(self, part: Any, task: DecodeTask) -> dict[int, str]:
        """{row: error} of one decode part."""
        return part.result()

    def complete(self, task: DecodeTask) -> Batch:
        start = time.perf_counter()
        errors: dict[int, str] = {}
        for part in task.parts:
            errors.update(self.collect(part, task))
        waited = time.perf_counter() - start
        vectors = self.embed_rows(task.batch, errors, task.ids, self.engine.run)
        task.release()
        if self.config.adaptive:
            self._adapt(waited, time.perf_counter() - start)
        return task.ids, vectors, errors

    def _adapt(self, waited: float, cycle: float) -> None:
        """One more decode worker when the model thread mostly waits for images (decoding is
        the bottleneck and the model's cores idle); one fewer when it never waits."""
        if waited > 0.5 * cycle and self.parallelism < self.config.max_decode:
            self.parallelism += 1
        elif waited < 0.02 * cycle and self.parallelism > self.config.decode_threads:
            self.parallelism -= 1
        else:
            return
        self._gate.set_limit(self.parallelism)


class ProcessDecode(DecodeThreads):
    """DecodeThreads whose paths and bytes are decoded by worker processes into a shared-memory
    ring of batches (threads would share one GIL). PIL images and arrays, batches that find no
    free slot, and everything after the processes failed to start, go to the threads."""

    name = "processes"

    def __init__(self, engine: Engine, config: PipelineConfig, *, fast_decode: bool,
                 pool: ThreadPool):
        super().__init__(engine, config, fast_decode=fast_decode, pool=pool)
        self.workers = config.decode_processes  # 0 once they could not start
        self._procs: DecodeProcesses | None = None
        self._lock = threading.Lock()

    def processes(self) -> DecodeProcesses | None:
        """The decode processes, started; None (and threads from now on) when they cannot
        start."""
        with self._lock:
            if self._procs is None and self.workers:
                procs = DecodeProcesses(self.engine.preprocessing, self.fast_decode,
                                        self.workers, self.config.batch_size,
                                        self.config.prefetch + 2, self.engine.batch_shape,
                                        self.engine.batch_dtype)
                try:
                    procs.start()
                except (BrokenProcessPool, OSError, RuntimeError) as e:
                    procs.close(wait=False)
                    warnings.warn(f"decode worker processes could not start ({e}); decoding in "
                                  "threads instead", RuntimeWarning, stacklevel=2)
                    self.workers = 0
                    return None
                self._procs = procs
            return self._procs

    def warmup(self) -> None:
        self.processes()  # starts them, or falls back to threads

    def close(self, wait: bool = True) -> None:
        with self._lock:
            if self._procs is not None:
                self._procs.close(wait=wait)
                self._procs = None

    def submit(self, chunk: Chunk, inline: bool = False) -> DecodeTask:
        if self.workers and not inline:
            task = self._submit_processes(chunk)
            if task is not None:
                return task
        return super().submit(chunk, inline)

    def _submit_processes(self, chunk: Chunk) -> DecodeTask | None:
        """A batch in a shared-memory slot: paths and bytes in slices to the decode processes,
        anything else to a thread. None when no slot is free (or the pool broke): the caller
        decodes this batch in threads."""
        ids = [i for i, _ in chunk]
        items = [x for _, x in chunk]
        travelling = [k for k, x in enumerate(items) if travels(x)]
        others = [k for k, x in enumerate(items) if not travels(x)]
        if not travelling:  # nothing to decode from files or bytes: no processes needed
            return None
        procs = self.processes()
        taken = procs.take_slot() if procs is not None else None
        if procs is None or taken is None:
            return None
        slot, view = taken
        task = DecodeTask(ids, view[:len(items)], slot=(procs, slot))
        base = slot * procs.batch_size
        try:
            parts = min(procs.workers, len(travelling))
            bounds = [round(k * len(travelling) / parts) for k in range(parts + 1)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                if b > a:
                    rows = travelling[a:b]
                    slice_items = [items[k] for k in rows]
                    task.parts.append(ProcessSlice(
                        rows, procs.submit([base + k for k in rows], slice_items), slice_items))
        except BrokenProcessPool:  # a worker died since the last batch: threads this time
            task.cancel()
            task.slot = None
            self._drop()
            return None
        if others:
            task.parts.append(self.pool.get().submit(
                self.decode_rows, others, [items[k] for k in others], task.batch, ids))
        return task

    def _drop(self) -> None:
        with self._lock:
            if self._procs is not None:
                self._procs.close(wait=False)
                self._procs = None

    def collect(self, part: Any, task: DecodeTask) -> dict[int, str]:
        if not isinstance(part, ProcessSlice):
            return part.result()
        try:
            failed = part.future.result()
        except CancelledError:  # never ran: its pool was shut down when another worker died
            return self.decode_rows(part.rows, part.items, task.batch, task.ids)
        except BrokenProcessPool as e:  # a worker died (killed, out of memory): its slice fails
            self._drop()  # and the next batch gets a fresh pool
            return {k: message(task.ids[k], f"decode worker process died ({e})")
                    for k in part.rows}
        return row_errors(part.rows, failed, task.ids)


class Interleaved(Schedule):
    """CPU streams: workers that each decode a batch and then run the model on it with
    threads // stream_workers onnxruntime threads (a second session, the model's memory once
    more), so every core runs one thread at a time: a decode pool beside a model using every
    core oversubscribes them, and the model's threads lose about as much time to that as
    decoding costs (ResNet-18 on 2 cores, same run: 79 images/s overlapped, 83 interleaved,
    the model alone 90). A single batch (one image, a short list) goes to `single`, which runs
    it on the main session with every thread, for latency."""

    name = "interleaved"

    def __init__(self, engine: Engine, config: PipelineConfig, *, fast_decode: bool,
                 pool: ThreadPool, single: DecodeThreads):
        super().__init__(engine, config, fast_decode=fast_decode, pool=pool)
        self.single = single
        self.worker_engine = engine.with_threads(config.stream_threads)

    def iter_batches(self, chunks: Iterator[Chunk], inline: bool = False) -> Iterator[Batch]:
        if inline:
            yield from self.single.iter_batches(chunks, inline=True)
            return
        first = next(chunks, None)
        second = next(chunks, None) if first else None
        if first is None or second is None:  # one batch: every thread on it, for latency
            if first:
                yield from self.single.iter_batches(iter([first]))
            return
        pending: deque[Future] = deque()
        window = max(self.config.stream_workers, self.config.prefetch + 1)
        pool = self.pool.get()
        try:
            for chunk in chain([first, second], chunks):
                pending.append(pool.submit(self._decode_and_run, [i for i, _ in chunk],
                                           [x for _, x in chunk]))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # consumer stopped early: drop queued work
            for f in pending:
                f.cancel()

    def _decode_and_run(self, ids: list[str], items: list) -> Batch:
        """One worker's task: decode a batch, then run the model on it here."""
        batch = self.new_batch(len(items))
        errors = self.decode_into(items, batch, 0, ids)
        vectors = self.embed_rows(batch, errors, ids, self.worker_engine.run)
        return ids, vectors, errors

    def warmup(self) -> None:
        self.single.warmup()

    def close(self, wait: bool = True) -> None:
        self.single.close(wait)


class GpuDecode(DecodeThreads):
    """decode="gpu": the thread pool reads the files of the next `prefetch` batches ahead
    (where DecodeThreads would decode them); then, in the calling thread, the decoder writes the
    batch's crops into the engine's bound device buffer of its bucket (Engine.bound: the
    runner's lock, buffers and CUDA-graph ids) and the model runs on it, the pixels never
    visiting the host. Items that cannot be read, and those the decoder fails on, keep their
    rows with the CPU schedules' wording; rows are finished by `finish_rows` like theirs.

    Decoding and the model run one after the other under the runner's lock (the decoder is not
    thread-safe, and the buffer must not change while the model reads it); `seconds` adds up
    where the time goes (waiting for reads, decoding, the model), which is the arithmetic of
    what limits this schedule on a given machine.

    `decoder`: `new_batch(size)` -> a uint8 (size, S, S, 3) array on the engine's device, and
    `decode(items, out)` -> {k: '<item>: <cause>'} writing item k's crop into out[k]
    (runtime.gpu.decoder.GpuDecoder; the tests give one that writes host arrays)."""

    name = "gpu"

    def __init__(self, engine: Engine, config: PipelineConfig, *, fast_decode: bool,
                 pool: ThreadPool, decoder: Any):
        super().__init__(engine, config, fast_decode=fast_decode, pool=pool)
        self.decoder = decoder
        self.seconds = {"reads_waited": 0.0, "decoding": 0.0, "model": 0.0, "batches": 0}
        self._seconds_lock = threading.Lock()

    def new_task(self, ids: list[str], items: list) -> DecodeTask:
        return DecodeTask(ids, np.empty(len(items), object), items=items)

    def prepare(self, items: list, held: np.ndarray, start: int, ids: list[str]
                ) -> dict[int, str]:
        """Read a slice's files into held[start:]: the bytes of paths, other items as they
        are; {row: error} for what cannot be read (worded as the CPU decode words it)."""
        errors: dict[int, str] = {}
        for k, item in enumerate(items):
            row = start + k
            if isinstance(item, RejectedInput):
                errors[row] = message(ids[row], item.reason)
                continue
            try:
                data = _read_bytes(item)
            except ImageDecodeError as e:
                errors[row] = message(ids[row], e)
                continue
            held[row] = item if data is None else data
        return errors

    def complete(self, task: DecodeTask) -> Batch:
        start = time.perf_counter()
        errors: dict[int, str] = {}
        for part in task.parts:
            errors.update(part.result())
        waited = time.perf_counter() - start
        self._count(reads_waited=waited, batches=1)
        vectors = np.full((len(task.ids), self.engine.feature_dim), np.nan, np.float32)
        rows = [k for k in range(len(task.ids)) if k not in errors]
        if rows:
            out, failed = self._decode_and_run([task.batch[k] for k in rows])
            for j, text in failed.items():
                k = rows[j]
                errors[k] = message(task.ids[k], named(text, task.batch[k], task.items[k]))
            good = [j for j in range(len(rows)) if j not in failed]
            if good and out is not None:
                vectors[[rows[j] for j in good]] = out[good]
        vectors = finish_rows(vectors, errors, task.ids)
        if self.config.adaptive:
            self._adapt(waited, time.perf_counter() - start)
        return task.ids, vectors, dict(sorted(errors.items()))

    def _decode_and_run(self, items: list) -> tuple[np.ndarray | None, dict[int, str]]:
        """Decode into the bound buffer and run the model on it, holding the runner."""
        with self.engine.bound(len(items), self.decoder.new_batch) as slot:
            t0 = time.perf_counter()
            failed = self.decoder.decode(items, slot.buffer)
            t1 = time.perf_counter()
            out = slot.run() if len(failed) < len(items) else None
            self._count(decoding=t1 - t0, model=time.perf_counter() - t1)
        return (None if out is None else np.asarray(out, np.float32)), failed

    def _count(self, **seconds: float) -> None:
        with self._seconds_lock:
            for key, value in seconds.items():
                self.seconds[key] += value

    def warmup(self) -> None:
        """Bind and run every bucket's device buffer once (CUDA graphs are captured then)."""
        for size in self.config.buckets:
            with self.engine.bound(size, self.decoder.new_batch) as slot:
                slot.run()


def open_schedule(engine: Engine, plan: Callable[[tuple[bool, str]], PipelineConfig], *,
                  decode: str, fast_decode: bool
                  ) -> tuple[PipelineConfig, ThreadPool, Schedule]:
    """The plan, the thread pool and the schedule for `engine`. `plan(gpu_decode_ready)` is
    runtime.resolve.resolve_pipeline_config with this pipeline's arguments. decode="gpu": the
    GPU decoder is opened where the plan grants it (runtime.gpu, imported only then); when it is
    refused or will not start, a GpuDecodeFallbackWarning says why and the CPU decodes."""
    ready, decoder = (False, ""), None
    if decode == "gpu":
        from .gpu.decoder import gpu_decode_available
        ready = gpu_decode_available()
    config = plan(ready)
    if config.schedule == "gpu":
        from .gpu.decoder import open_decoder
        decoder, why = open_decoder(engine.preprocessing, device_id=engine.device_id)
        if decoder is None:
            config = plan((False, why))
    if config.decode_reason:
        from .gpu.decoder import GpuDecodeFallbackWarning
        warnings.warn(f"GPU decoding asked for but not available: {config.decode_reason}; "
                      "decoding on the CPU", GpuDecodeFallbackWarning, stacklevel=3)
    pool = ThreadPool(config.max_decode)
    return config, pool, make_schedule(engine, config, fast_decode=fast_decode, pool=pool,
                                       decoder=decoder)


def make_schedule(engine: Engine, config: PipelineConfig, *, fast_decode: bool,
                  pool: ThreadPool, decoder: Any = None) -> Schedule:
    """The schedule `config.schedule` names, over `engine` (GpuDecode needs `decoder`)."""
    if config.schedule == "gpu":
        if decoder is None:
            raise ValueError("the gpu schedule needs a decoder (runtime.gpu.decoder)")
        return GpuDecode(engine, config, fast_decode=fast_decode, pool=pool, decoder=decoder)
    cls = ProcessDecode if config.decode_processes else DecodeThreads
    overlapped = cls(engine, config, fast_decode=fast_decode, pool=pool)
    if config.schedule == "interleaved":
        return Interleaved(engine, config, fast_decode=fast_decode, pool=pool,
                           single=overlapped)
    return overlapped


def finish_rows(vectors: np.ndarray, errors: dict[int, str], ids: list[str]) -> np.ndarray:
    """The last step of every schedule: rows with errors are NaN, and rows the model turned
    into NaN or inf become errors too (added to `errors`, worded NON_FINITE), so a result's
    `ok` is honest."""
    ok = np.array([i not in errors for i in range(len(vectors))], dtype=bool)
    vectors[~ok] = np.nan
    bad = np.flatnonzero(ok & ~np.isfinite(vectors).all(axis=1))
    for i in bad:
        errors[int(i)] = message(ids[i], NON_FINITE)
    vectors[bad] = np.nan
    return vectors


def named(text: str, data: Any, item: Any) -> str:
    """A decoder's message about bytes read ahead of a path, naming the path instead (the
    CPU decode reads the path itself and names it): '<N bytes>: cause' -> 'a.jpg: cause'."""
    if data is item or not isinstance(data, bytes):
        return text
    prefix = _name(data)
    return _name(item) + text[len(prefix):] if text.startswith(prefix) else text


def row_errors(rows: list[int], failed: dict[int, str], ids: list[str]) -> dict[int, str]:
    """decode_rows' {k: message} as the pipeline's {row: '<id>: <cause>'}."""
    return {rows[k]: message(ids[rows[k]], text) for k, text in failed.items()}


def message(item_id: str, error: Any) -> str:
    """'<id>: <cause>', without repeating the id when the cause already starts with it."""
    text = str(error)
    return text if text.startswith(item_id) else f"{item_id}: {text}"
