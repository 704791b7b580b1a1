"""Run the HTTP (uvicorn) and gRPC (grpcio asyncio) transports of one data plane in one event
loop, so both reach the same batchers without crossing threads.

Order on SIGTERM: uvicorn stops accepting and answers its requests in flight; then the gRPC
server stops taking calls and gets the same grace for its own; then the batchers close.
"""
from __future__ import annotations

import asyncio
import logging

from .dataplane import DataPlane

log = logging.getLogger("unirep.serve")


def uvicorn_config(app, *, host: str, port: int, log_level: str, timeout_s: float,
                   tls: tuple[str, str] | None):
    """uvicorn's settings for the service (h24's connection and header limits go here)."""
    import uvicorn
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          proxy_headers=False,  # no proxy in front by default: one layer less
                          timeout_graceful_shutdown=int(timeout_s) + 5, access_log=False,
                          ssl_certfile=tls[0] if tls else None,
                          ssl_keyfile=tls[1] if tls else None)


def run_servers(plane: DataPlane, *, host: str, port: int, grpc_port: int, max_body_mb: float,
                timeout_s: float, log_level: str, tls: tuple[str, str] | None) -> str | None:
    """Serve until SIGTERM/Ctrl-C or a model that fails to load; its failure (or None)."""
    import uvicorn

    from .app import build_app

    config = uvicorn_config(build_app(plane, max_body_mb=max_body_mb, manage_plane=False),
                            host=host, port=port, log_level=log_level, timeout_s=timeout_s,
                            tls=tls)
    server = uvicorn.Server(config)

    def fatal(reason: str) -> None:
        server.should_exit = True
    plane.on_fatal = fatal

    async def main() -> None:
        grpc_server = None
        if grpc_port:
            from .grpc_server import build_grpc_server
            credentials = None
            if tls:
                with open(tls[1], "rb") as k, open(tls[0], "rb") as c:
                    credentials = (k.read(), c.read())
            grpc_server = build_grpc_server(plane, host=host, port=grpc_port,
                                            max_message_mb=max_body_mb, tls=credentials)
            await grpc_server.start()
        plane.start()
        try:
            await server.serve()
        finally:
            if grpc_server is not None:
                await grpc_server.stop(timeout_s + 5)
            await asyncio.get_running_loop().run_in_executor(None, plane.stop)

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(main())
    return plane.failure_
