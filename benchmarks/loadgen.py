"""A lean HTTP load generator for the serve benchmark, run in its own process.

Why not httpx or tritonclient: a Python HTTP client spends about 1-2 CPU ms per request, which
on this 2-core machine is taken from the server it measures (the client and the server share
the cores). Load generators of serving peers (Triton's perf_analyzer, wrk) are lean native
programs for that reason. This one sends pre-built HTTP/1.1 requests over keep-alive
connections with asyncio streams and reads just the status line, Content-Length and body: a few
tens of microseconds per request. It checks every response's status, so a failing server cannot
look fast.

    python -m benchmarks.loadgen --port 8000 --path /v2/models/m/infer --bodies bodies.npz \
        --clients 32 --requests 512          # prints one JSON line

bodies.npz (no pickle): `body_K` uint8 arrays and `header_length_K` (0: JSON request).
"""
from __future__ import annotations

import asyncio
import json
import sys
import time

import click
import numpy as np


def http_request(host: str, port: int, path: str, body: bytes, header_length: int) -> bytes:
    """One complete POST with keep-alive, as bytes on the wire."""
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: keep-alive",
            f"Content-Length: {len(body)}"]
    if header_length:
        head += ["Content-Type: application/octet-stream",
                 f"Inference-Header-Content-Length: {header_length}"]
    else:
        head.append("Content-Type: application/json")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Status code of one response; its body is read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
            break
    else:
        raise RuntimeError("response without Content-Length (chunked replies are not read)")
    await reader.readexactly(length)
    return status


async def run_load(host: str, port: int, requests_bytes: list[bytes], clients: int,
                   requests: int, warmup: int = 1) -> dict:
    """`clients` connections, each sending its next request when the last one is answered,
    until `requests` answers (after `warmup` per connection, not timed)."""
    connections = [await asyncio.open_connection(host, port) for _ in range(clients)]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(requests))

    async def warm(reader, writer, k):
        for j in range(warmup):
            writer.write(requests_bytes[(k + j) % len(requests_bytes)])
            await _read_response(reader)

    async def one_client(reader, writer):
        for k in counter:
            writer.write(requests_bytes[k % len(requests_bytes)])
            start = time.perf_counter()
            status = await _read_response(reader)
            latencies.append(time.perf_counter() - start)
            statuses[status] = statuses.get(status, 0) + 1

    try:
        await asyncio.gather(*(warm(r, w, k) for k, (r, w) in enumerate(connections)))
        cpu0, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one_client(r, w) for r, w in connections))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    finally:
        for _, writer in connections:
            writer.close()
    return summarise(latencies, statuses, clients, requests, wall, cpu)


def summarise(latencies: list[float], statuses: dict[int, int], clients: int, requests: int,
              wall: float, cpu: float) -> dict:
    """One closed-loop run as the benchmark's row (any client that timed its requests)."""
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": requests, "wall_s": wall,
            "failures": sum(n for s, n in statuses.items() if s != 200),
            "statuses": {str(s): n for s, n in statuses.items()},
            "images_per_s": requests / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "client_cpu_ms_per_request": 1000 * cpu / requests}


def load_bodies(path: str) -> list[tuple[bytes, int]]:
    with np.load(path, allow_pickle=False) as z:
        count = sum(1 for k in z.files if k.startswith("body_"))
        return [(z[f"body_{k}"].tobytes(), int(z[f"header_length_{k}"])) for k in range(count)]


def save_bodies(path: str, bodies: list[tuple[bytes, int]]) -> None:
    arrays = {}
    for k, (body, header_length) in enumerate(bodies):
        arrays[f"body_{k}"] = np.frombuffer(body, np.uint8)
        arrays[f"header_length_{k}"] = np.array(header_length, np.int64)
    np.savez(path, **arrays)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, required=True)
@click.option("--path", "url_path", required=True, help="e.g. /v2/models/m/infer")
@click.option("--bodies", required=True, help="npz written by save_bodies().")
@click.option("--clients", type=click.IntRange(1), required=True)
@click.option("--requests", type=click.IntRange(1), required=True)
def main(host, port, url_path, bodies, clients, requests):
    """Closed-loop load: CLIENTS connections, one request in flight each; one JSON line out."""
    built = [http_request(host, port, url_path, body, hl) for body, hl in load_bodies(bodies)]
    try:
        import uvloop  # the server's event loop too; plain asyncio works the same, slower
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(run_load(host, port, built, clients, requests))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
