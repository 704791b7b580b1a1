"""Run the HTTP (uvicorn) and gRPC (grpcio asyncio) transports of one data plane in one event
loop, so both reach the same batchers without crossing threads.

On SIGTERM (or Ctrl-C) the whole stop takes at most the graceful limit, --timeout-s + 5 s,
counted from the signal: uvicorn stops accepting and answers its requests in flight while the
gRPC server, at the same time, stops taking calls and finishes its own; whatever is left of
the limit then goes to the batchers, which refuse what is still queued once it is over. A batch
still running then (onnxruntime cannot be interrupted) runs in a daemon thread and dies with the
process, which uvicorn ends by re-raising the signal, as process managers expect.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from .dataplane import DataPlane
from .limits import BodyBudget, Limits, guarded_protocol, tune_allocator

log = logging.getLogger("unirep.serve")

GRACE_EXTRA_S = 5.0  # the graceful limit is --timeout-s plus this


def graceful_limit(timeout_s: float) -> float:
    """Seconds from SIGTERM to exit: the longest request may finish, and a little more."""
    return timeout_s + GRACE_EXTRA_S


def uvicorn_config(app, *, host: str, port: int, log_level: str, timeout_s: float,
                   tls: tuple[str, str] | None, limits: Limits | None = None):
    """uvicorn's settings for the service: the guarded HTTP protocol (header timeout, header
    size, connection cap), the keep-alive timeout and the graceful limit."""
    import uvicorn
    limits = limits or Limits()
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          proxy_headers=False,  # no proxy in front by default: one layer less
                          http=guarded_protocol(limits),
                          timeout_keep_alive=max(1, math.ceil(limits.keep_alive_s)),
                          h11_max_incomplete_event_size=limits.max_header_bytes,
                          timeout_graceful_shutdown=math.ceil(graceful_limit(timeout_s)),
                          access_log=False,
                          ssl_certfile=tls[0] if tls else None,
                          ssl_keyfile=tls[1] if tls else None)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server that also stops gRPC and the data plane inside its own shutdown,
        within the graceful limit counted from the signal."""

        def __init__(self, config, plane: DataPlane, grace_s: float):
            super().__init__(config)
            self.plane, self.grace_s = plane, grace_s
            self.grpc_server: Any = None
            self.stop_asked_at: float | None = None
            self.plane_stopped = False

        def handle_exit(self, sig, frame) -> None:
            if self.stop_asked_at is None:
                self.stop_asked_at = time.monotonic()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            if self.stop_asked_at is None:  # a model failed to load, or serve() was stopped
                self.stop_asked_at = time.monotonic()
            deadline = self.stop_asked_at + self.grace_s
            steps = [super().shutdown(sockets)]
            if self.grpc_server is not None:
                steps.append(self.grpc_server.stop(max(0.0, deadline - time.monotonic())))
            await asyncio.gather(*steps)
            await self.stop_plane(deadline)

        async def stop_plane(self, deadline: float) -> None:
            if self.plane_stopped:
                return
            self.plane_stopped = True
            left = max(0.0, deadline - time.monotonic())
            done = await asyncio.get_running_loop().run_in_executor(None, self.plane.stop, left)
            if not done:
                log.warning("the graceful limit (%.0f s) is over with a batch still running; "
                            "it is abandoned", self.grace_s)

    return Server


def run_servers(plane: DataPlane, *, host: str, port: int, grpc_port: int, max_body_mb: float,
                timeout_s: float, log_level: str, tls: tuple[str, str] | None,
                limits: Limits | None = None) -> str | None:
    """Serve until SIGTERM/Ctrl-C or a model that fails to load; its failure (or None)."""
    from .app import build_app

    limits = limits or Limits(max_body=int(max_body_mb * 2**20))
    tune_allocator()  # big decoded images go back to the system once freed
    budget = BodyBudget(limits.max_buffered)  # request bytes held, HTTP and gRPC together
    config = uvicorn_config(build_app(plane, max_body_mb=max_body_mb, manage_plane=False,
                                      limits=limits, budget=budget),
                            host=host, port=port, log_level=log_level, timeout_s=timeout_s,
                            tls=tls, limits=limits)
    server = _server_class()(config, plane, graceful_limit(timeout_s))

    def fatal(reason: str) -> None:
        server.should_exit = True
    plane.on_fatal = fatal

    async def main() -> None:
        if grpc_port:
            from .grpc_server import build_grpc_server
            credentials = None
            if tls:
                with open(tls[1], "rb") as k, open(tls[0], "rb") as c:
                    credentials = (k.read(), c.read())
            server.grpc_server = build_grpc_server(
                plane, host=host, port=grpc_port, max_message_mb=max_body_mb,
                tls=credentials, offload_bytes=limits.offload_bytes, budget=budget)
            await server.grpc_server.start()
        plane.start()
        try:
            await server.serve()
        finally:  # serve() failed before its shutdown (a port in use): stop what started
            if not server.plane_stopped:
                if server.grpc_server is not None:
                    await server.grpc_server.stop(0)
                await server.stop_plane(time.monotonic() + graceful_limit(timeout_s))

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(main())
    return plane.failure_
