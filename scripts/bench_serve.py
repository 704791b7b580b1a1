#!/usr/bin/env python
"""Benchmark of `cli.py serve`: throughput and latency under concurrent clients, side by side
with a batch-1 server and with the offline pipeline, in one run.

For each model: the offline FeaturePipeline's end-to-end throughput (JPEG files -> embeddings,
batch --max-batch, no server running), then a server with dynamic batching (--max-batch,
--max-delay-ms) and a batch-1 server (--max-batch 1 --max-delay-ms 0), each under 1, 8 and 32
concurrent single-image clients (asyncio + httpx, the binary tensor protocol, JPEG bytes from
the benchmark corpus). Prints a table and writes OUT.json and OUT.png. Run it on a quiet
machine: the figures are timings. Models are exported like scripts/bench_runtime.sh does:

    python scripts/bench_serve.py --export resnet18:224 --export small_cnn:32 \
        --work bench-out/serve --requests 512 --out bench-out/serve/bench-serve
    python scripts/bench_serve.py --model models/spe --requests 32 --concurrency 1,4  # quick
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from itertools import islice

import click
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLOOR = 0.85  # at the most clients, batched server >= 85% of the offline throughput


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export_model(spec: str, work: str, corpus: str) -> str:
    """arch:size -> an exported random-weights model folder (as bench_runtime.sh makes them)."""
    arch, _, size = spec.partition(":")
    run, model = os.path.join(work, "runs", spec.replace(":", "-")), \
        os.path.join(work, "models", spec.replace(":", "-"))
    if os.path.exists(os.path.join(model, "model.onnx")):
        return model
    code = (f"from train.runs import untrained_run; untrained_run({arch!r}, {run!r}, "
            f"input_size={int(size or 224)})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    subprocess.run([sys.executable, "cli.py", "export", run, "--out", model, "--check-data",
                    corpus, "--overwrite"], check=True, cwd=ROOT)
    return model


def offline_throughput(model_dir: str, paths: list[str], batch_size: int, repeats: int) -> float:
    from runtime import FeaturePipeline
    with FeaturePipeline(model_dir, device="cpu", batch_size=batch_size) as pipe:
        pipe.embed(paths[:batch_size * 2])  # warm-up: sessions, pools
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = pipe.embed(paths)
            rates.append(len(result) / (time.perf_counter() - start))
    return float(np.median(rates))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, max_batch: int, max_delay_ms: float, workers: int,
                 log_path: str, timeout: float = 300) -> tuple[subprocess.Popen, int]:
    import httpx
    port = _free_port()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "cli.py"), "serve", model_dir, "--name", "m",
             "--port", str(port), "--device", "cpu", "--max-batch", str(max_batch),
             "--max-delay-ms", str(max_delay_ms), "--workers", str(workers),
             "--max-queue", "4096", "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise TimeoutError(f"server not ready after {timeout} s; see {log_path}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def request_body(jpeg: bytes) -> tuple[bytes, dict]:
    """One image as a binary-tensor infer request, output `embedding` in binary."""
    from runtime.service.protocol import HEADER_LENGTH, pack_bytes
    blob = pack_bytes([jpeg])
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "outputs": [{"name": "embedding",
                                      "parameters": {"binary_data": True}}]}).encode()
    return header + blob, {HEADER_LENGTH: str(len(header)),
                           "Content-Type": "application/octet-stream"}


async def _load(port: int, bodies: list, clients: int, requests: int) -> dict:
    import httpx
    url = f"http://127.0.0.1:{port}/v2/models/m/infer"
    latencies: list[float] = []
    failures = 0
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def one_client():
            nonlocal failures
            for k in counter:
                body, headers = bodies[k % len(bodies)]
                start = time.perf_counter()
                r = await client.post(url, content=body, headers=headers)
                latencies.append(time.perf_counter() - start)
                failures += r.status_code != 200
        for k in range(min(clients, len(bodies))):  # warm-up: connections, first batches
            body, headers = bodies[k]
            await client.post(url, content=body, headers=headers)
        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": requests, "failures": failures,
            "images_per_s": requests / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


def measure_server(model_dir: str, bodies: list, concurrency: list[int], requests: int,
                   max_batch: int, max_delay_ms: float, workers: int, log_path: str) -> list:
    proc, port = start_server(model_dir, max_batch, max_delay_ms, workers, log_path)
    try:
        rows = []
        for c in concurrency:
            row = asyncio.run(_load(port, bodies, c, requests))
            log(f"    {c:3d} clients: {row['images_per_s']:8.1f} img/s, p50 "
                f"{row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms"
                + (f", {row['failures']} failed" if row["failures"] else ""))
            rows.append(row)
        return rows
    finally:
        stop_server(proc)


def format_table(report: dict) -> str:
    lines = [f"{'model':16s} {'setting':28s} {'clients':>7s} {'img/s':>8s} {'p50 ms':>8s} "
             f"{'p99 ms':>8s} {'vs offline':>10s}"]
    for m in report["models"]:
        off = m["offline_images_per_s"]
        lines.append(f"{m['name']:16s} {'offline pipeline (files)':28s} {'-':>7s} {off:8.1f} "
                     f"{'-':>8s} {'-':>8s} {'100%':>10s}")
        for setting, rows in m["servers"].items():
            for r in rows:
                lines.append(f"{m['name']:16s} {setting:28s} {r['clients']:7d} "
                             f"{r['images_per_s']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
                             f"{r['images_per_s'] / off:10.0%}")
        floor = m["floor"]
        lines.append(f"{'':16s} floor: {floor['clients']} clients >= {FLOOR:.0%} of offline: "
                     f"{floor['ratio']:.0%} -> {'met' if floor['met'] else 'NOT met'}")
    return "\n".join(lines)


def write_chart(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.atomic import atomic_open
    models = report["models"]
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7), squeeze=False)
    for j, m in enumerate(models):
        top, bottom = axes[0][j], axes[1][j]
        for setting, rows in m["servers"].items():
            xs = [r["clients"] for r in rows]
            top.plot(xs, [r["images_per_s"] for r in rows], marker="o", label=setting)
            bottom.plot(xs, [r["p50_ms"] for r in rows], marker="o", label=f"{setting} p50")
            bottom.plot(xs, [r["p99_ms"] for r in rows], marker="x", linestyle="--",
                        label=f"{setting} p99")
        top.axhline(m["offline_images_per_s"], color="k", linestyle=":", label="offline")
        top.axhline(FLOOR * m["offline_images_per_s"], color="r", linestyle=":",
                    label=f"{FLOOR:.0%} floor")
        top.set_title(m["name"])
        top.set_ylabel("images/s")
        bottom.set_ylabel("latency (ms)")
        bottom.set_xlabel("concurrent single-image clients")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=7)
    fig.suptitle(f"cli.py serve on {report['machine']['cpu']} ({report['machine']['cores']} "
                 "cores)", fontsize=9)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


@click.command()
@click.option("--model", "models", multiple=True, metavar="MODEL_DIR",
              help="An exported model folder; repeat for several.")
@click.option("--export", "exports", multiple=True, metavar="ARCH:SIZE",
              help="Export a random-weights model first (needs torch), e.g. resnet18:224.")
@click.option("--work", default="bench-out/serve", show_default=True,
              help="Where --export writes runs and models.")
@click.option("--images", default=None, metavar="DIR",
              help="JPEG folder (default: the benchmark corpus, built once).")
@click.option("--limit", type=click.IntRange(1), default=512, show_default=True,
              help="Images used (offline pass and request bodies).")
@click.option("--requests", type=click.IntRange(1), default=512, show_default=True,
              help="Requests per concurrency level.")
@click.option("--concurrency", default="1,8,32", show_default=True,
              help="Comma-separated client counts.")
@click.option("--max-batch", type=click.IntRange(1), default=32, show_default=True)
@click.option("--max-delay-ms", type=float, default=2.0, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True,
              help="Server batch workers (--workers of serve).")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True,
              help="Offline passes (median).")
@click.option("--out", default="bench-out/serve/bench-serve", show_default=True,
              help="Prefix of OUT.json and OUT.png.")
def main(models, exports, work, images, limit, requests, concurrency, max_batch, max_delay_ms,
         workers, repeats, out):
    """Serve benchmark: batched server vs batch-1 server vs offline pipeline."""
    from benchmarks.corpus import ensure_corpus
    from common.description import save_json_atomic
    from common.files import iter_image_files
    from runtime.providers import available_cores

    levels = [int(c) for c in concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1:
        raise click.BadParameter("give positive client counts, e.g. 1,8,32",
                                 param_hint="--concurrency")
    if not models and not exports:
        raise click.UsageError("give --model MODEL_DIR and/or --export ARCH:SIZE")
    corpus = images or ensure_corpus()
    paths = list(islice(iter_image_files(corpus), limit))
    if not paths:
        raise click.UsageError(f"{corpus}: no images")
    model_dirs = list(models) + [export_model(s, work, corpus) for s in exports]
    bodies = []
    for p in paths:
        with open(p, "rb") as f:
            bodies.append(request_body(f.read()))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    report: dict = {"machine": {"cpu": _cpu(), "cores": available_cores(),
                                "load_average": list(os.getloadavg())},
                    "settings": {"images": len(paths), "requests": requests,
                                 "concurrency": levels, "max_batch": max_batch,
                                 "max_delay_ms": max_delay_ms, "workers": workers,
                                 "corpus": corpus},
                    "models": []}
    for model_dir in model_dirs:
        name = os.path.basename(os.path.normpath(model_dir))
        log(f"{name}: offline pipeline on {len(paths)} files ...")
        offline = offline_throughput(model_dir, paths, max_batch, repeats)
        log(f"    {offline:.1f} img/s")
        servers = {}
        for setting, mb, delay in ((f"server, batch <= {max_batch}", max_batch, max_delay_ms),
                                   ("server, batch 1", 1, 0.0)):
            log(f"{name}: {setting} ...")
            servers[setting] = measure_server(model_dir, bodies, levels, requests, mb, delay,
                                              workers, f"{out}-{name}-{mb}.log")
        top = servers[f"server, batch <= {max_batch}"][-1]
        ratio = top["images_per_s"] / offline
        report["models"].append({"name": name, "model_dir": model_dir,
                                 "offline_images_per_s": offline, "servers": servers,
                                 "floor": {"clients": top["clients"], "ratio": ratio,
                                           "met": ratio >= FLOOR}})
    save_json_atomic(f"{out}.json", report)
    write_chart(report, f"{out}.png")
    click.echo(format_table(report))
    log(f"wrote {out}.json and {out}.png")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
