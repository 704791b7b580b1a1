"""A lean gRPC load generator for the serve benchmark, run in its own process.

The gRPC twin of benchmarks/loadgen.py: closed-loop clients, each on its own channel (HTTP/2
connection) with one ModelInfer call in flight. Requests are serialised once beforehand and
replies are not parsed (grpcio's generic unary call with no serialisers sends and returns
bytes), so the client's CPU per request is grpcio's own, not protobuf's; a reply that is not OK
raises, so a failing server cannot look fast.

    python -m benchmarks.grpc_loadgen --port 8001 --bodies requests.npz --clients 32 \
        --requests 512            # prints one JSON line

requests.npz: `body_K` uint8 arrays, each a serialised inference.ModelInferRequest (the
`header_length_K` entries of loadgen's format are ignored).
"""
from __future__ import annotations

import asyncio
import json
import sys
import time

import click

from benchmarks.loadgen import load_bodies, summarise

METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def run_load(host: str, port: int, bodies: list[bytes], clients: int, requests: int,
                   warmup: int = 1) -> dict:
    import grpc

    options = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]
    channels = [grpc.aio.insecure_channel(f"{host}:{port}", options=options)
                for _ in range(clients)]
    calls = [ch.unary_unary(METHOD) for ch in channels]  # no serialisers: bytes in and out
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(requests))

    async def warm(call, k):
        for j in range(warmup):
            await call(bodies[(k + j) % len(bodies)], timeout=600)

    async def one_client(call):
        for k in counter:
            start = time.perf_counter()
            try:
                await call(bodies[k % len(bodies)], timeout=600)
                status = 200
            except grpc.aio.AioRpcError as e:
                status = 1000 + e.code().value[0]  # not HTTP: counted as a failure
            latencies.append(time.perf_counter() - start)
            statuses[status] = statuses.get(status, 0) + 1

    try:
        await asyncio.gather(*(warm(c, k) for k, c in enumerate(calls)))
        cpu0, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in calls))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    finally:
        for ch in channels:
            await ch.close()
    return summarise(latencies, statuses, clients, requests, wall, cpu)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, required=True)
@click.option("--bodies", required=True, help="npz of serialised ModelInferRequests.")
@click.option("--clients", type=click.IntRange(1), required=True)
@click.option("--requests", type=click.IntRange(1), required=True)
def main(host, port, bodies, clients, requests):
    """Closed-loop gRPC load: CLIENTS channels, one call in flight each; one JSON line out."""
    built = [body for body, _ in load_bodies(bodies)]
    result = asyncio.run(run_load(host, port, built, clients, requests))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
