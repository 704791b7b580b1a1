"""Dynamic batching: requests from many clients run together, up to a size or a delay.

    batcher = Batcher(run_batch, max_batch=32, max_delay_s=0.002, max_queue=256, workers=2)
    future = batcher.submit(items)      # concurrent.futures.Future of the items' results
    batcher.close()                     # finishes what is queued, then stops the workers

`run_batch(items) -> results` (aligned with items) runs in the batcher's worker threads, never
in the caller's (the web server's event loop). One worker at a time gathers a batch: it waits
for the oldest request's `max_delay_s` to pass or for `max_batch` items, takes whole requests
(a request larger than max_batch runs alone), then runs the batch while the next worker gathers
the next one. When other workers are idle, the waiting requests are shared out between them
rather than taken by the first: on a CPU each worker runs the model with cores / workers
threads, so one big batch alone would leave the other cores idle (8 clients that resend at
once used to run as one batch of 8 on one core). A request whose future was cancelled before
its batch started (a client that timed out), or whose `deadline` has passed, is dropped
without running. `submit` raises QueueFull when `max_queue` requests already wait. `close(t)`
finishes the queued requests for up to t seconds, then refuses the rest (Closed).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future


class QueueFull(RuntimeError):
    """The queue holds max_queue requests; the caller should retry later (HTTP 503)."""


class Closed(RuntimeError):
    """The batcher is shutting down and takes no new requests."""


class Expired(RuntimeError):
    """The request's deadline passed while it waited in the queue: it was never run."""


class _Request:
    __slots__ = ("items", "future", "arrived", "deadline")

    def __init__(self, items: list, future: Future, arrived: float, deadline: float | None):
        self.items, self.future, self.arrived, self.deadline = items, future, arrived, deadline


class Batcher:
    def __init__(self, run_batch: Callable[[list], list], *, max_batch: int = 32,
                 max_delay_s: float = 0.002, max_queue: int = 256, workers: int = 2,
                 on_batch: Callable[[int, float], None] | None = None):
        if max_batch < 1 or max_queue < 1 or workers < 1 or max_delay_s < 0:
            raise ValueError("max_batch, max_queue and workers must be >= 1, max_delay_s >= 0")
        self.run_batch, self.max_batch, self.max_delay_s = run_batch, max_batch, max_delay_s
        self.max_queue, self.on_batch, self.workers = max_queue, on_batch, workers
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._gather = threading.Lock()  # one worker gathers at a time
        self._closed = False
        self._pending = 0  # items in the queue
        self.busy_ = 0
        self._threads = [threading.Thread(target=self._work, name=f"unirep-batch-{i}",
                                          daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    @property
    def depth_(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    def submit(self, items: list, deadline: float | None = None) -> Future:
        """Queue `items` (one request); `deadline` (time.monotonic()) after which it is
        dropped unrun if it still waits (its future then fails with Expired)."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (--max-queue "
                                f"{self.max_queue})")
            request = _Request(list(items), future, time.monotonic(), deadline)
            self._queue.append(request)
            self._pending += len(request.items)
            # wake the gathering worker only when it has something to decide: a first request
            # (it waits for one) or a full batch; otherwise it sleeps until the delay is over
            # (a wake-up per arrival cost a thread switch and the GIL for nothing)
            if len(self._queue) == 1 or self._pending >= self.max_batch:
                self._cond.notify_all()
        return future

    def close(self, timeout: float | None = None) -> bool:
        """Stop taking requests, finish the queued ones within `timeout` seconds (None: all of
        them), then fail those still queued with Closed. False when a batch was still running
        at the deadline (its worker is a daemon thread: it cannot hold up the process exit)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if not any(t.is_alive() for t in self._threads):
            return True
        with self._cond:
            while self._queue:
                request = self._queue.popleft()
                if request.future.set_running_or_notify_cancel():
                    request.future.set_exception(Closed("the server stopped before this "
                                                        "request ran; retry"))
            self._pending = 0
            self._cond.notify_all()
        return False

    # -- workers -----------------------------------------------------------------------------
    def _take(self) -> list[_Request] | None:
        """Wait for a batch's worth of requests (or the delay); None when closed and empty."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._queue[0].arrived + self.max_delay_s
            while not self._closed:
                left = deadline - time.monotonic()
                if self._pending >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            # this worker and the others waiting to gather share what is queued now
            idle = max(1, self.workers - self.busy_)
            limit = min(self.max_batch, -(-self._pending // idle))
            taken: list[_Request] = []
            count = 0
            now = time.monotonic()
            while self._queue:
                n = len(self._queue[0].items)
                if taken and count + n > limit:
                    break
                request = self._queue.popleft()
                self._pending -= n
                if not request.future.set_running_or_notify_cancel():
                    continue  # its client gave up before the batch started
                if request.deadline is not None and now > request.deadline:
                    request.future.set_exception(Expired("the request waited past its "
                                                         "deadline"))
                    continue
                taken.append(request)
                count += n
            if taken:
                self.busy_ += 1  # before the next worker gathers, so it sees this one busy
            return taken

    def _work(self) -> None:
        while True:
            with self._gather:
                taken = self._take()
            if taken is None:
                return
            if not taken:
                continue
            items = [x for r in taken for x in r.items]
            start = time.perf_counter()
            try:
                results = self.run_batch(items)
                if len(results) != len(items):
                    raise RuntimeError(f"run_batch returned {len(results)} results for "
                                       f"{len(items)} items")
            except BaseException as e:  # the batch fails, never the worker (nor the server)
                for r in taken:
                    r.future.set_exception(e)
                continue
            finally:
                with self._cond:
                    self.busy_ -= 1
            if self.on_batch is not None:
                self.on_batch(len(items), time.perf_counter() - start)
            offset = 0
            for r in taken:
                r.future.set_result(results[offset:offset + len(r.items)])
                offset += len(r.items)
