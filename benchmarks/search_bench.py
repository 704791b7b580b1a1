#!/usr/bin/env python
"""Similarity search benchmark (runtime/search, faiss): build time, queries/s and recall@10 of
the exact scan and the approximate indexes (IVF, HNSW) on the same vectors, side by side.

    python -m benchmarks.search_bench                      # 100k x 512-d + Fashion-MNIST 70k
    python -m benchmarks.search_bench --count 20000 --no-fmnist      # a dry run (seconds)

Vector sets: (1) `--count` 512-d embedding-like vectors (default 100,000): 1,000 overlapping
clusters in a 32-d latent space mapped into 512-d plus noise (see `clustered`), queries 1,000
more from the same distribution; (2) the real Fashion-MNIST images as 784-d
pixel vectors, 60,000 train indexed, 1,000 test images as queries. Queries/s: the 1,000
queries in one call (batch) and one at a time (as a service request sees it); the median of
`--repeats`. Recall@10: the share of each query's 10 exact neighbours found. Also the exact
scan's queries/s at growing sizes (where "auto" switches to IVF). Writes
bench-out/search/search-bench.json.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import click
import numpy as np

from .harness import machine_info, versions, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg: str) -> None:
    print(f"[search-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def clustered(count: int, queries: int, dim: int = 512, centres: int = 1000, latent: int = 32,
              seed: int = 0):
    """Embedding-like vectors: a mixture of `centres` clusters in a `latent`-d space (spread
    half the centres'), mapped linearly into `dim` dimensions, plus a little isotropic noise
    (embeddings fill a low-dimensional part of their space, not all of it)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, latent)).astype(np.float32)
    labels = rng.integers(0, centres, count + queries)
    z = c[labels] + 0.5 * rng.normal(size=(count + queries, latent)).astype(np.float32)
    projection = rng.normal(size=(latent, dim)).astype(np.float32) / np.sqrt(latent)
    x = z @ projection + 0.1 * rng.normal(size=(count + queries, dim)).astype(np.float32)
    return x[:count], x[count:]


def fashion_mnist(queries: int = 1000):
    from common.data import _find_fashion_mnist, _read_idx
    src = _find_fashion_mnist()
    train = _read_idx(os.path.join(src, "train-images-idx3-ubyte.gz"))
    test = _read_idx(os.path.join(src, "t10k-images-idx3-ubyte.gz"))[:queries]
    return (train.reshape(len(train), -1).astype(np.float32),
            test.reshape(len(test), -1).astype(np.float32))


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(database: np.ndarray, queries: np.ndarray, kinds, repeats: int,
            single: int = 200) -> dict:
    """{kind: build s, tune s, queries/s (batch, single), recall@10} on one vector set."""
    from runtime.search import build_index, recall_at_k
    ids = [str(i) for i in range(len(database))]
    out: dict[str, dict] = {}
    exact_rows = None
    for kind in kinds:
        t0 = time.perf_counter()
        index = build_index(database, ids, kind=kind)
        total = time.perf_counter() - t0
        batch = _median_seconds(lambda ix=index: ix.search(queries, 10), repeats)
        one = _median_seconds(lambda ix=index: [ix.search(q[None], 10) for q in queries[:single]],
                              repeats)
        _, rows = index.search(queries, 10)
        if kind == "exact":
            exact_rows = rows
        recall = recall_at_k(exact_rows, rows, 10) if exact_rows is not None else None
        out[kind] = {"build_s": round(index.info["build_seconds"], 2),
                     "tune_s": round(index.info["tune_seconds"], 2),
                     "build_total_s": round(total, 2),
                     "params": index.info["params"],
                     "queries_per_s_batch": round(len(queries) / batch, 1),
                     "queries_per_s_single": round(single / one, 1),
                     "recall_at_10": None if recall is None else round(recall, 4),
                     "recall_at_10_measured_at_build": index.info["recall_at_10"]}
        log(f"{kind:6s} n={len(database)}: {out[kind]}")
    return out


def exact_by_size(sizes, dim: int, repeats: int) -> dict:
    from runtime.search import build_index
    out = {}
    for n in sizes:
        database, queries = clustered(n, 1000, dim)
        index = build_index(database, [str(i) for i in range(n)], kind="exact")
        batch = _median_seconds(lambda ix=index, q=queries: ix.search(q, 10), repeats)
        out[str(n)] = round(len(queries) / batch, 1)
        log(f"exact n={n}: {out[str(n)]} queries/s (batch of 1,000)")
    return out


@click.command()
@click.option("--count", type=click.IntRange(1000), default=100_000, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True)
@click.option("--fmnist/--no-fmnist", default=True, show_default=True)
@click.option("--out", default=os.path.join(ROOT, "bench-out", "search"), show_default=True)
def main(count, repeats, fmnist, out):
    """Time exact and approximate search on the same vectors; print and save the figures."""
    report = {"machine": machine_info(), "versions": versions(("faiss-cpu", "numpy")),
              "count": count, "repeats": repeats}
    database, queries = clustered(count, 1000)
    report["clustered_512d"] = measure(database, queries, ("exact", "ivf", "hnsw"), repeats)
    if fmnist:
        database, queries = fashion_mnist()
        report["fashion_mnist_784d"] = measure(database, queries, ("exact", "ivf", "hnsw"),
                                               repeats)
    sizes = [n for n in (10_000, 25_000, 50_000, 100_000, 200_000) if n <= 2 * count]
    report["exact_queries_per_s_by_size_512d"] = exact_by_size(sizes, 512, repeats)
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "search-bench.json"), report)
    for name in ("clustered_512d", "fashion_mnist_784d"):
        for kind, r in report.get(name, {}).items():
            print(f"{name:20s} {kind:6s} build {r['build_s']:6.2f} s (+ tune {r['tune_s']:5.2f} s)"
                  f"  {r['queries_per_s_batch']:9.1f} q/s batch  {r['queries_per_s_single']:8.1f}"
                  f" q/s single  recall@10 {r['recall_at_10']}  {r['params']}")
    print("exact queries/s by size (512-d, batch):", report["exact_queries_per_s_by_size_512d"])
    log(f"wrote {out}/search-bench.json")


if __name__ == "__main__":
    main()
