"""Real servers for tests: `cli.py serve` in a subprocess on free loopback ports, polled until
ready with a generous deadline (the machine may be loaded), always stopped.

    with serve_process([model_dir, "--name", "cnn"]) as server:
        httpx.get(server.url("/v2/health/live"))
        server.proc.send_signal(signal.SIGTERM)
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tests.conftest import ROOT

READY_TIMEOUT_S = 180.0  # a model loads and warms in seconds; under load it may take minutes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str,
               interval: float = 0.05) -> None:
    """Poll `condition` until it holds; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout:g} s")
        time.sleep(interval)


@dataclass
class Served:
    port: int
    grpc_port: int
    proc: subprocess.Popen
    log_path: str
    scheme: str = "http"

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


@contextlib.contextmanager
def serve_process(args: list[str], *, grpc: bool = True, scheme: str = "http",
                  verify=None, timeout: float = READY_TIMEOUT_S,
                  env: dict[str, str] | None = None) -> Iterator[Served]:
    """`cli.py serve ARGS --port P [--grpc-port G] --device cpu` until /v2/health/ready says
    200; yields a Served; the process is killed (if still running) and reaped on exit."""
    import httpx
    port = free_port()
    grpc_port = free_port() if grpc else 0
    log_path = os.path.join(ROOT, ".pytest_cache", f"serve-{port}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    extra = [] if "--device" in args else ["--device", "cpu"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "cli.py"), "serve", *args,
                                 "--port", str(port), "--grpc-port", str(grpc_port), *extra],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **(env or {})})
    served = Served(port, grpc_port, proc, log_path, scheme)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{served.log()}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(served.url("/v2/health/ready"), timeout=5,
                             verify=verify or True).status_code == 200
        return False

    try:
        wait_until(ready, timeout=timeout, what="server ready", interval=0.1)
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
