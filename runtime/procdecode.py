"""Decoding in worker processes, for machines where the GIL, not the cores, limits decoding.

libjpeg-turbo and PIL's resampling release the GIL, but the Python around them (reading the
file, walking the JPEG header, wrapping buffers) does not. With a handful of decode threads
that hardly matters; with 15 of them feeding a GPU it caps decoding at about one core's worth
(measured on a 16-core H200 machine: 1,355 images/s end to end against 6,488 for the model
alone). Worker processes share no GIL.

The batches live in shared memory: a ring of `slots` batches that the workers write straight
into (uint8 crops for a model with the uint8 front, else normalised floats), so no pixels are
pickled or piped and the parent does no per-image work. A slot is taken for a batch and given
back once the model has run on it; when none is free the caller decodes that batch in threads.

Only paths and bytes travel to the workers; PIL images and arrays stay with threads (they are
already decoded, and pickling them would cost more than it saves).

Workers start with 'forkserver' where the platform has it, else 'spawn' (never 'fork': the
parent runs onnxruntime and CUDA threads). They need nothing from the caller's script, so the
script is hidden from multiprocessing while they start: it is not run again in each worker,
and no `if __name__ == "__main__":` guard is needed. No torch here, ever.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import os
import sys
import threading
import time
import types
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from common.description import Preprocessing
from common.images import ImageDecodeError

from .decode import load_crop, normalize_batch
from .inputs import RejectedInput

# set in each worker by _init_worker
_PRE: Preprocessing | None = None
_FAST = True
_RING: np.ndarray | None = None
_SHM: shared_memory.SharedMemory | None = None


def travels(item: Any) -> bool:
    """Whether an item is decoded in a worker process (paths and encoded bytes)."""
    return isinstance(item, (str, os.PathLike, bytes, bytearray))


def _init_worker(pre: Preprocessing, fast: bool, name: str, shape: tuple, dtype: str) -> None:
    global _PRE, _FAST, _RING, _SHM
    _PRE, _FAST = pre, fast
    _SHM = shm = shared_memory.SharedMemory(name=name)
    assert shm.buf is not None  # None only once closed
    _RING = np.frombuffer(shm.buf, np.dtype(dtype), count=int(np.prod(shape))).reshape(shape)


def _ready(hold: float) -> int:
    time.sleep(hold)  # keeps this worker busy so the next task goes to another one
    return os.getpid()


def decode_rows(rows: list[int], items: list, ring: np.ndarray | None = None,
                pre: Preprocessing | None = None, fast: bool | None = None) -> dict[int, str]:
    """Decode items[k] into ring[rows[k]] (an SxSx3 uint8 crop, or the normalised 3xSxS float
    image when the ring holds floats); return {k: message} for the failures (their rows hold
    nothing meaningful). `ring`, `pre` and `fast` default to the worker's; given, this is the
    pipeline's decoding in any thread, into any batch."""
    ring = _RING if ring is None else ring
    pre = pre or _PRE
    fast = _FAST if fast is None else fast
    assert ring is not None and pre is not None, "outside a worker, pass ring and pre"
    in_place = ring.dtype == np.uint8
    # None exactly when in_place: the crops then go straight into the ring's rows
    crops = None if in_place else np.zeros((len(items),) + (pre.input_size,) * 2 + (3,), np.uint8)
    errors: dict[int, str] = {}
    for k, item in enumerate(items):
        if isinstance(item, RejectedInput):  # keeps its row; never reaches the decoder
            errors[k] = item.reason
            continue
        try:
            load_crop(item, pre, fast, out=ring[rows[k]] if crops is None else crops[k])
        except ImageDecodeError as e:
            errors[k] = str(e)
        except Exception as e:
            errors[k] = f"{type(e).__name__}: {e}"
    if crops is not None:  # one vectorised normalisation for the whole slice
        ring[rows] = normalize_batch(crops, pre)
    return errors


class _Segment(shared_memory.SharedMemory):
    """Shared memory that stays mapped while any array over it lives: the ring is made with
    np.frombuffer, which holds the mapping, so close() cannot unmap it under a batch still in
    use (it raises BufferError, suppressed here and in __del__); the last array frees it."""

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            super().close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


@contextlib.contextmanager
def _script_hidden():
    """multiprocessing runs the parent's __main__ again in every new worker (so that functions
    defined there can be unpickled); ours live in this module, so show it a bare __main__."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main
        else:  # there was none to hide (an embedded interpreter): leave none
            del sys.modules["__main__"]


class DecodeProcesses:
    """`workers` decode processes writing into a shared ring of `slots` batches, each
    `batch_size` rows of `row_shape` (`dtype`)."""

    def __init__(self, pre: Preprocessing, fast: bool, workers: int, batch_size: int,
                 slots: int, row_shape: tuple, dtype=np.uint8):
        self.workers, self.batch_size = workers, batch_size
        dtype = np.dtype(dtype)
        shape = (slots * batch_size,) + tuple(row_shape)
        count = int(np.prod(shape))
        self._shm = _Segment(create=True, size=max(1, count * dtype.itemsize))
        assert self._shm.buf is not None  # None only once closed
        # None once closed, so that the last batch in use, not close(), unmaps the segment
        self.ring: np.ndarray | None = np.frombuffer(self._shm.buf, dtype, count=count).reshape(shape)
        self._free = list(range(slots))[::-1]
        self._lock = threading.Lock()
        context: multiprocessing.context.BaseContext
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            # the server imports numpy, PIL and libjpeg-turbo once; workers fork from it
            context.set_forkserver_preload([__name__])
        else:
            context = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                         initargs=(pre, fast, self._shm.name, shape, dtype.str))

    def start(self, timeout: float = 60.0) -> list[int]:
        """Start every worker now (each imports numpy, PIL and libjpeg-turbo once), so the
        first batch is not the slow one; returns their process ids."""
        pids: set[int] = set()
        deadline = time.monotonic() + timeout
        with _script_hidden():  # every worker is created in here (the pool makes no more)
            while len(pids) < self.workers and time.monotonic() < deadline:
                pids |= {f.result() for f in [self._pool.submit(_ready, 0.05)
                                              for _ in range(self.workers)]}
        return sorted(pids)

    def take_slot(self) -> tuple[int, np.ndarray] | None:
        """(slot, its batch_size rows of the ring), or None when every slot is in use."""
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop()
        assert self.ring is not None, "DecodeProcesses used after close()"
        base = slot * self.batch_size
        return slot, self.ring[base:base + self.batch_size]

    def give_slot(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def submit(self, rows: list[int], items: list) -> Future:
        """Decode items[k] into ring row rows[k] in a worker; the future gives decode_rows'
        errors."""
        return self._pool.submit(decode_rows, rows, items)

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)
        with contextlib.suppress(FileNotFoundError):
            self._shm.unlink()
        self.ring = None
        self._shm.close()  # unmapped now, or by the last batch still using it
