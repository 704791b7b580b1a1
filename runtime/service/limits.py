"""What one client may cost the service, and the guards that hold it to that.

    limits = Limits(max_body=64 << 20, max_buffered=256 << 20)
    budget = BodyBudget(limits.max_buffered)      # bodies of all requests in flight, together
    protocol = guarded_protocol(limits)           # uvicorn's HTTP protocol with a header timeout

Small requests must not cost the server far more than they weigh, so every cost is bounded
where it arises: a body by --max-body-mb (413), its JSON part by --max-json-mb (413: big
tensors go as binary data, which is parsed in milliseconds), and all bodies being read or
parsed at once, over HTTP and gRPC together, by --max-buffered-mb (503 + Retry-After); a body
larger than `offload_bytes` is parsed in a worker thread, never on the event loop that answers
liveness (the JSON scanner itself still holds the interpreter lock: hence --max-json-mb); a
connection must send its request headers within `header_timeout_s` and each body chunk within
`body_timeout_s`, and at most `max_connections` are open at once (beyond, new ones are closed
at once). Decoded images are bounded in common.images (UNIREP_MAX_DECODED_MB); tensors are
checked against their data before anything is allocated from their shape
(protocol.check_shape, unpack_bytes).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Limits:
    max_body: int = 64 << 20          # one request body (bytes)
    max_buffered: int = 256 << 20     # all request bodies held at once (bytes)
    max_json: int = 16 << 20          # the JSON part of a body: Python's JSON scanner holds
                                      # the interpreter lock, ~0.13 s a MB on a loaded 2-core box
    offload_bytes: int = 64 << 10     # bodies above this are parsed in a worker thread
    header_timeout_s: float = 10.0    # from the first byte (or the connection) to the headers
    body_timeout_s: float = 30.0      # the longest wait for the next chunk of a body
    keep_alive_s: float = 5.0         # an idle keep-alive connection is closed after this
    max_connections: int = 1000       # open HTTP connections; beyond, new ones are closed
    max_header_bytes: int = 64 << 10  # request line + headers


class BodyBudget:
    """Bytes of request bodies held by the requests in flight, bounded by `limit`. Used from
    the event loop only (no lock needed)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def reserve(self, n: int) -> bool:
        """Take `n` bytes of the budget; False (nothing taken) when it would exceed it."""
        if n > 0 and self.used + n > self.limit:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)


# -- the HTTP protocol: header timeout, header size and connection cap ------------------------

def guarded_protocol(limits: Limits) -> type:
    """uvicorn's HTTP protocol class (httptools, else h11) that closes a connection whose
    request headers do not arrive within limits.header_timeout_s (slowloris), or grow past
    limits.max_header_bytes, and refuses connections past limits.max_connections."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard]
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class GuardedProtocol(Base):
        _header_timer: Any = None
        _header_bytes = 0
        _refused = False

        def connection_made(self, transport) -> None:
            if len(self.connections) >= limits.max_connections:
                self._refused = True
                self.transport = transport
                transport.close()  # no answer: a flood of sockets is not worth one
                return
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            if self._refused:
                return
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            waiting = not self._in_request()
            if waiting and self._header_timer is None:
                self._arm()
            super().data_received(data)
            if self._in_request():  # the headers are complete: the app's body timeout rules
                self._disarm()
                self._header_bytes = 0
            elif waiting:  # still no complete headers: count what they have taken so far
                self._header_bytes += len(data)
                if self._header_bytes > limits.max_header_bytes and \
                        not self.transport.is_closing():
                    self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._header_bytes = 0

        def _in_request(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is not None and not cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if not self._in_request() and not self.transport.is_closing():
                self.transport.close()

    return GuardedProtocol


# -- memory given back after big requests ------------------------------------------------------

_M_MMAP_THRESHOLD = -3
_libc: Any = None
_last_trim = 0.0


def _c_library() -> Any:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            _libc = lib if lib is not None and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc


def tune_allocator(mmap_threshold: int = 8 << 20) -> bool:
    """glibc only: serve allocations of `mmap_threshold` bytes and more from mmap, so they go
    back to the system when freed: Pillow holds a big image in 16 MB blocks, and by default
    glibc raises its threshold after the first such free (up to 32 MB), after which a 100 MB
    decoded image stayed in the heap for good. Smaller blocks stay in the heap, which
    return_memory trims after heavy batches. (The small model's server spends the same CPU
    per request with it: 0.83 ms against 0.80 ms, within the noise of a loaded machine.)
    False where the C library is not glibc (nothing changes)."""
    lib = _c_library()
    if not lib or not hasattr(lib, "mallopt"):
        return False
    return bool(lib.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))


def return_memory(min_interval_s: float = 1.0) -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim), at most every
    `min_interval_s` (it walks the heap)."""
    global _last_trim
    now = time.monotonic()
    if now - _last_trim < min_interval_s:
        return
    _last_trim = now
    lib = _c_library()
    if lib:
        lib.malloc_trim(0)
