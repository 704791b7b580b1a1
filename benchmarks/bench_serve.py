#!/usr/bin/env python
"""Benchmark of `cli.py serve`: throughput and latency under concurrent clients, side by side
with a batch-1 server and with the offline pipeline, in one run.

For each model: the offline FeaturePipeline's end-to-end throughput (JPEG files -> embeddings,
batch --max-batch, no server running), then a server with dynamic batching (--max-batch,
--max-delay-ms) and a batch-1 server (--max-batch 1 --max-delay-ms 0), each under 1, 8 and 32
concurrent single-image clients (the binary tensor protocol, JPEG bytes from the benchmark
corpus), over HTTP and (batched server) over gRPC. The clients are benchmarks/loadgen.py and
benchmarks/grpc_loadgen.py in a process of their own: lean closed-loop load generators, because
on a 2-core machine the client's CPU is taken from the server it measures; one more row repeats
the most clients with a Python httpx client (about 1-2 CPU ms a request) to show that cost.
`--baseline DIR` adds the batched server of another checkout (e.g. `git archive` of the commit
before a change) under the same HTTP load, so a change's before/after is in one run. Each row
also gives the server's and the client's CPU time per request (Linux /proc), which is what sets
the ceiling here. Prints a table and writes OUT.json and OUT.png. Run it on a quiet machine:
the figures are timings. Models are exported like scripts/bench_runtime.sh does:

    python -m benchmarks.bench_serve --export resnet18:224 --export small_cnn:32 \
        --work bench-out/serve --requests 512 --out bench-out/serve/bench-serve
    python -m benchmarks.bench_serve --model models/spe --requests 32 --concurrency 1,4  # quick
    git archive HEAD~1 | tar -x -C /tmp/before && python -m benchmarks.bench_serve ... \
        --baseline /tmp/before          # one more setting: the server as it was
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

FLOOR = 0.85  # at the most clients, batched server >= 85% of the offline throughput (HTTP)
GRPC_FLOOR = 0.90  # the same over gRPC (and, on a small model, above HTTP)


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


def offline_passes(model_dir: str, paths: list[str], batch_size: int,
                   repeats: int) -> list[dict]:
    """`repeats` timed passes of the offline pipeline: images/s and CPU ms per image each."""
    from runtime import FeaturePipeline
    with FeaturePipeline(model_dir, device="cpu", batch_size=batch_size) as pipe:
        pipe.embed(paths[:batch_size * 2])  # warm-up: sessions, pools
        passes = []
        for _ in range(repeats):
            cpu0, start = time.process_time(), time.perf_counter()
            result = pipe.embed(paths)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
            passes.append({"images_per_s": len(result) / wall,
                           "cpu_ms_per_image": 1000 * cpu / len(result)})
    return passes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, max_batch: int, max_delay_ms: float, workers: int,
                 log_path: str, timeout: float = 300, root: str = ROOT,
                 grpc: bool = True) -> tuple[subprocess.Popen, int, int]:
    """A server from the checkout at `root` (ROOT: this one); (process, HTTP port, gRPC port
    or 0). Another checkout gets no gRPC option (it may predate it)."""
    import httpx
    port = _free_port()
    grpc_port = _free_port() if grpc and root == ROOT else 0
    extra = ["--grpc-port", str(grpc_port)] if root == ROOT else []
    env = dict(os.environ, PYTHONPATH=root)
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(root, "cli.py"), "serve", model_dir, "--name", "m",
             "--port", str(port), "--device", "cpu", "--max-batch", str(max_batch),
             "--max-delay-ms", str(max_delay_ms), "--workers", str(workers),
             "--max-queue", "4096", "--log-level", "warning", *extra],
            stdout=out, stderr=subprocess.STDOUT, cwd=root, env=env)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                return proc, port, grpc_port
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


def request_body(jpegs: list[bytes]) -> tuple[bytes, dict]:
    """Images as one binary-tensor infer request, output `embedding` in binary."""
    from runtime.service.protocol import HEADER_LENGTH, pack_bytes
    blob = pack_bytes(jpegs)
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(jpegs)],
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "outputs": [{"name": "embedding",
                                      "parameters": {"binary_data": True}}]}).encode()
    return header + blob, {HEADER_LENGTH: str(len(header)),
                           "Content-Type": "application/octet-stream"}


def grpc_request(jpegs: list[bytes]) -> bytes:
    """Images as one serialised ModelInferRequest (raw BYTES input), output `embedding`."""
    from tritonclient.grpc import service_pb2 as pb

    from runtime.service.protocol import pack_bytes
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="image", datatype="BYTES", shape=[len(jpegs)])
    request.outputs.add(name="embedding")
    request.raw_input_contents.append(pack_bytes(jpegs))
    return request.SerializeToString()


async def _httpx_load(port: int, bodies: list, clients: int, requests: int) -> dict:
    """The same closed loop with httpx.AsyncClient in this process (a typical Python client)."""
    import httpx

    from benchmarks.loadgen import summarise
    url = f"http://127.0.0.1:{port}/v2/models/m/infer"
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def one_client():
            for k in counter:
                body, headers = bodies[k % len(bodies)]
                start = time.perf_counter()
                r = await client.post(url, content=body, headers=headers)
                latencies.append(time.perf_counter() - start)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        for k in range(min(clients, len(bodies))):  # warm-up: connections, first batches
            body, headers = bodies[k]
            await client.post(url, content=body, headers=headers)
        cpu0, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return summarise(latencies, statuses, clients, requests, wall, cpu)


def _loadgen(port: int, bodies_npz: str, clients: int, requests: int,
             grpc: bool = False) -> dict:
    """benchmarks/loadgen.py (or grpc_loadgen.py) in its own process; its JSON line back."""
    args = (["-m", "benchmarks.grpc_loadgen"] if grpc else
            ["-m", "benchmarks.loadgen", "--path", "/v2/models/m/infer"])
    done = subprocess.run([sys.executable, *args, "--port", str(port), "--bodies", bodies_npz,
                           "--clients", str(clients), "--requests", str(requests)],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def _process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def measure_server(model_dir: str, bodies: list, bodies_npz: str, concurrency: list[int],
                   requests: int, max_batch: int, max_delay_ms: float, workers: int,
                   log_path: str, httpx_at: int | None = None,
                   multi: tuple[int, str] | None = None, grpc_npz: str | None = None,
                   root: str = ROOT) -> list:
    """Rows for each client count (load generator), one httpx row at `httpx_at` clients,
    with multi=(K, npz of K-image bodies) one row of K-image requests at the most clients, and
    with grpc_npz a gRPC row for each client count."""
    proc, port, grpc_port = start_server(model_dir, max_batch, max_delay_ms, workers, log_path,
                                         root=root, grpc=grpc_npz is not None)
    try:
        rows = []
        plan = [(c, "loadgen", 1) for c in concurrency]
        plan += [(c, "grpc", 1) for c in concurrency] if grpc_npz else []
        plan += [(httpx_at, "httpx", 1)] if httpx_at else []
        plan += [(max(concurrency), "loadgen", multi[0])] if multi else []
        for c, client, per_request in plan:
            n = max(1, requests // per_request)
            before = _process_cpu_s(proc.pid)
            if client == "httpx":
                row = asyncio.run(_httpx_load(port, bodies, c, n))
            elif client == "grpc":
                assert grpc_npz is not None
                row = _loadgen(grpc_port, grpc_npz, c, n, grpc=True)
            else:
                npz = bodies_npz if per_request == 1 or multi is None else multi[1]
                row = _loadgen(port, npz, c, n)
            after = _process_cpu_s(proc.pid)
            images = n * per_request
            row["images_per_request"] = per_request
            row["images_per_s"] *= per_request
            # warm-up requests are counted too (one per client): they ran on the server as well
            row["server_cpu_ms_per_image"] = (None if before is None or after is None else
                                              1000 * (after - before) / (images + c * per_request))
            row["client_cpu_ms_per_image"] = row.pop("client_cpu_ms_per_request") / per_request
            row["client"] = client
            log(f"    {c:3d} clients x {per_request} image(s) ({client}): "
                f"{row['images_per_s']:8.1f} img/s, p50 {row['p50_ms']:.1f} ms, p99 "
                f"{row['p99_ms']:.1f} ms, CPU ms an image: server "
                f"{_fmt(row['server_cpu_ms_per_image'])} client "
                f"{_fmt(row['client_cpu_ms_per_image'])}"
                + (f", {row['failures']} failed" if row["failures"] else ""))
            rows.append(row)
        return rows
    finally:
        stop_server(proc)


def _top(rows: list, client: str) -> dict:
    """The row of single-image requests at the most clients for `client`."""
    return [r for r in rows if r["client"] == client and r["images_per_request"] == 1][-1]


def _fmt(value: float | None, spec: str = "{:.2f}") -> str:
    return "-" if value is None else spec.format(value)


def format_table(report: dict) -> str:
    lines = [f"{'model':14s} {'setting':25s} {'client':>7s} {'clients':>7s} {'img/req':>7s} "
             f"{'img/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'vs offline':>10s} "
             f"{'CPU ms/img: server':>18s} {'client':>6s}"]
    for m in report["models"]:
        off = m["offline_images_per_s"]
        lines.append(f"{m['name']:14s} {'offline pipeline (files)':25s} {'-':>7s} {'-':>7s} "
                     f"{'-':>7s} {off:8.1f} {'-':>8s} {'-':>8s} {'100%':>10s} "
                     f"{m['offline_cpu_ms_per_image']:18.2f} {'-':>6s}")
        for setting, rows in m["servers"].items():
            for r in rows:
                lines.append(f"{m['name']:14s} {setting:25s} {r['client']:>7s} "
                             f"{r['clients']:7d} {r['images_per_request']:7d} "
                             f"{r['images_per_s']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
                             f"{r['images_per_s'] / off:10.0%} "
                             f"{_fmt(r['server_cpu_ms_per_image']):>18s} "
                             f"{_fmt(r['client_cpu_ms_per_image']):>6s}")
        floor = m["floor"]
        lines.append(f"{'':14s} floor: {floor['clients']} single-image clients >= {FLOOR:.0%} of "
                     f"offline: {floor['ratio']:.0%} -> {'met' if floor['met'] else 'NOT met'}; "
                     f"CPU ceiling (offline CPU / (server + client CPU) an image): "
                     f"{_fmt(floor['cpu_ceiling'], '{:.0%}')}; offline passes "
                     + ", ".join(f"{p['images_per_s']:.0f}" for p in m["offline_passes"])
                     + " img/s")
        if "grpc_floor" in m:
            g = m["grpc_floor"]
            lines.append(f"{'':14s} gRPC floor: {g['clients']} single-image clients >= "
                         f"{GRPC_FLOOR:.0%} of offline: {g['ratio']:.0%} -> "
                         f"{'met' if g['met'] else 'NOT met'}; gRPC / HTTP {g['vs_http']:.2f}; "
                         f"CPU ceiling {_fmt(g['cpu_ceiling'], '{:.0%}')}")
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
        for setting, all_rows in m["servers"].items():
            for client in ("loadgen", "grpc"):
                rows = [r for r in all_rows if r.get("client", "loadgen") == client
                        and r.get("images_per_request", 1) == 1]
                if not rows:
                    continue
                label = setting + (" (gRPC)" if client == "grpc" else "")
                xs = [r["clients"] for r in rows]
                top.plot(xs, [r["images_per_s"] for r in rows], marker="o", label=label)
                bottom.plot(xs, [r["p50_ms"] for r in rows], marker="o", label=f"{label} p50")
                bottom.plot(xs, [r["p99_ms"] for r in rows], marker="x", linestyle="--",
                            label=f"{label} p99")
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
@click.option("--images-per-request", type=click.IntRange(1), default=8, show_default=True,
              help="One more row: the most clients sending this many images a request "
                   "(1: none).")
@click.option("--grpc/--no-grpc", "use_grpc", default=True, show_default=True,
              help="gRPC rows (benchmarks/grpc_loadgen.py) beside HTTP for the batched server.")
@click.option("--baseline", metavar="DIR", default=None,
              help="Another checkout (cli.py at its root): its batched server as one more "
                   "setting under the same HTTP load (before/after a change in one run).")
@click.option("--out", default="bench-out/serve/bench-serve", show_default=True,
              help="Prefix of OUT.json and OUT.png.")
def main(models, exports, work, images, limit, requests, concurrency, max_batch, max_delay_ms,
         workers, repeats, images_per_request, use_grpc, baseline, out):
    """Serve benchmark: batched server (HTTP, gRPC) vs batch-1 server vs offline pipeline.

    Long because it reads as the run's plan, one step per block (models, offline rows, server rows
    per transport and setting, the baseline server, the table and files); each step's work is in
    the functions above."""
    from benchmarks.corpus import ensure_corpus
    from common.description import save_json_atomic
    from common.files import iter_image_files
    from common.machine import cpu_name
    from runtime.providers import available_cores
    from runtime.service.protocol import HEADER_LENGTH

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
    jpegs = []
    for p in paths:
        with open(p, "rb") as f:
            jpegs.append(f.read())
    bodies = [request_body([j]) for j in jpegs]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    from benchmarks.loadgen import save_bodies
    bodies_npz = f"{out}-bodies.npz"
    save_bodies(bodies_npz, [(b, int(h[HEADER_LENGTH])) for b, h in bodies])
    grpc_npz = None
    if use_grpc:
        grpc_npz = f"{out}-grpc-requests.npz"
        save_bodies(grpc_npz, [(grpc_request([j]), 0) for j in jpegs])
    if baseline and not os.path.isfile(os.path.join(baseline, "cli.py")):
        raise click.BadParameter(f"{baseline}: no cli.py there", param_hint="--baseline")
    multi = None
    if images_per_request > 1:
        groups = [jpegs[i:i + images_per_request]
                  for i in range(0, len(jpegs) - images_per_request + 1, images_per_request)]
        multi = (images_per_request, f"{out}-bodies-{images_per_request}.npz")
        save_bodies(multi[1], [(b, int(h[HEADER_LENGTH]))
                               for b, h in map(request_body, groups or [jpegs])])
    report: dict = {"machine": {"cpu": cpu_name(), "cores": available_cores(),
                                "load_average": list(os.getloadavg())},
                    "settings": {"images": len(paths), "requests": requests,
                                 "concurrency": levels, "max_batch": max_batch,
                                 "max_delay_ms": max_delay_ms, "workers": workers,
                                 "corpus": corpus, "client": "benchmarks/loadgen.py",
                                 "grpc_client": "benchmarks/grpc_loadgen.py" if use_grpc
                                 else None, "baseline": baseline,
                                 "images_per_request": images_per_request},
                    "models": []}
    for model_dir in model_dirs:
        name = os.path.basename(os.path.normpath(model_dir))
        # offline passes before and after the servers: the ratio is to their median, so a
        # machine whose speed drifts during the run does not bias it either way
        log(f"{name}: offline pipeline on {len(paths)} files ...")
        passes = offline_passes(model_dir, paths, max_batch, (repeats + 1) // 2)
        servers = {}
        plan = [(f"server, batch <= {max_batch}", max_batch, max_delay_ms, ROOT),
                ("server, batch 1", 1, 0.0, ROOT)]
        if baseline:
            plan.append((f"baseline, batch <= {max_batch}", max_batch, max_delay_ms, baseline))
        for setting, mb, delay, root in plan:
            log(f"{name}: {setting} ...")
            here = root == ROOT and mb > 1
            servers[setting] = measure_server(
                model_dir, bodies, bodies_npz, levels, requests, mb, delay, workers,
                f"{out}-{name}-{mb}{'' if root == ROOT else '-baseline'}.log",
                httpx_at=max(levels) if here else None, multi=multi if here else None,
                grpc_npz=grpc_npz if here else None, root=root)
        passes += offline_passes(model_dir, paths, max_batch, repeats // 2 or 1)
        offline = float(np.median([p["images_per_s"] for p in passes]))
        offline_cpu = float(np.median([p["cpu_ms_per_image"] for p in passes]))
        log(f"    offline {offline:.1f} img/s ({offline_cpu:.2f} CPU ms an image)")
        batched = servers[f"server, batch <= {max_batch}"]
        top = _top(batched, "loadgen")
        ratio = top["images_per_s"] / offline
        spent = (top["server_cpu_ms_per_image"] or 0) + top["client_cpu_ms_per_image"]
        entry = {
            "name": name, "model_dir": model_dir, "offline_images_per_s": offline,
            "offline_cpu_ms_per_image": offline_cpu, "offline_passes": passes,
            "servers": servers,
            "floor": {"clients": top["clients"], "ratio": ratio, "met": ratio >= FLOOR,
                      "cpu_ceiling": offline_cpu / spent if spent else None}}
        if use_grpc:
            g = _top(batched, "grpc")
            g_spent = (g["server_cpu_ms_per_image"] or 0) + g["client_cpu_ms_per_image"]
            entry["grpc_floor"] = {
                "clients": g["clients"], "ratio": g["images_per_s"] / offline,
                "met": g["images_per_s"] / offline >= GRPC_FLOOR,
                "vs_http": g["images_per_s"] / top["images_per_s"],
                "cpu_ceiling": offline_cpu / g_spent if g_spent else None}
        report["models"].append(entry)
    save_json_atomic(f"{out}.json", report)
    write_chart(report, f"{out}.png")
    click.echo(format_table(report))
    log(f"wrote {out}.json and {out}.png")


if __name__ == "__main__":
    main()
