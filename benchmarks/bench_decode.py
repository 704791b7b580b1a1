#!/usr/bin/env python
"""Decoding throughput alone: the pipeline's decode threads against decode processes.

Decodes the same JPEG files to uint8 crops (the pipeline's fast path) with N threads and with
N worker processes (writing into shared memory), slices of a batch at a time as the pipeline
does, and prints images/s
(median of --repeats, round robin) and the ratio. On few cores the two should be close; the
gap grows with the number of workers, because threads share one GIL.

    python -m benchmarks.bench_decode                    # workers = usable cores
    python -m benchmarks.bench_decode --workers 1,2 --images 512
    python -m benchmarks.bench_decode --model bench-out/models/resnet18-224   # + end to end

With --model it also times the whole pipeline on the same files, on the CPU: its default
schedule, decode threads beside the model, and decode processes beside the model.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from common.description import Preprocessing
from runtime.pipeline import iter_folder
from runtime.procdecode import DecodeProcesses, decode_rows
from runtime.providers import available_cores

from .corpus import ensure_corpus


def slices(items: list, batch: int, parts: int):
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        bounds = [round(k * len(chunk) / parts) for k in range(parts + 1)]
        yield [chunk[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def with_threads(pool, files, pre, batch, parts) -> int:
    out = np.zeros((batch, pre.input_size, pre.input_size, 3), np.uint8)

    for group in slices(files, batch, parts):
        starts = np.cumsum([0] + [len(g) for g in group])
        for f in [pool.submit(decode_rows, list(range(a, a + len(items))), items, out, pre, True)
                  for a, items in zip(starts, group)]:
            f.result()
    return len(files)


def with_processes(procs, files, batch, parts) -> int:
    for group in slices(files, batch, parts):
        slot, _ = procs.take_slot()
        rows = slot * batch + np.cumsum([0] + [len(g) for g in group])
        for f in [procs.submit(list(range(a, a + len(items))), items)
                  for a, items in zip(rows, group)]:
            f.result()
        procs.give_slot(slot)
    return len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", default=None, help="comma-separated counts (usable cores)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="also time the pipeline end to end")
    args = parser.parse_args()
    files = list(iter_folder(ensure_corpus(count=args.images)))
    pre = Preprocessing(input_size=224, resize_size=256)
    counts = [int(w) for w in args.workers.split(",")] if args.workers else [available_cores()]
    print(f"decode only: {len(files)} JPEGs -> 224 px crops, batch {args.batch_size}, "
          f"median of {args.repeats}")
    for n in counts:
        threads = ThreadPoolExecutor(n)
        procs = DecodeProcesses(pre, True, n, args.batch_size, 2, (224, 224, 3))
        procs.start()
        rates = {"threads": [], "processes": []}
        for _ in range(args.repeats):
            # default arguments bind this iteration's pools and worker count
            for key, run in (("threads", lambda t=threads, n=n: with_threads(t, files, pre,
                                                                             args.batch_size, n)),
                             ("processes", lambda p=procs, n=n: with_processes(p, files,
                                                                               args.batch_size, n))):
                t0 = time.perf_counter()
                count = run()
                rates[key].append(count / (time.perf_counter() - t0))
        t, p = (float(np.median(rates[k])) for k in ("threads", "processes"))
        print(f"  {n:>2} workers: threads {t:8.1f} images/s   processes {p:8.1f} images/s   "
              f"processes/threads {p / t:.2f}x")
        threads.shutdown()
        procs.close()
    if args.model:
        end_to_end(args.model, files, args.batch_size, args.repeats)


def end_to_end(model: str, files: list[str], batch: int, repeats: int) -> None:
    from runtime.pipeline import FeaturePipeline
    n = available_cores()
    configs = {"pipeline default": {},
               f"{n} decode threads beside the model": dict(decode_threads=n, stream_workers=0),
               f"{n} decode processes beside the model": dict(decode_processes=n)}
    pipes = {k: FeaturePipeline(model, device="cpu", batch_size=batch, **v)
             for k, v in configs.items()}
    for p in pipes.values():
        p.warmup()
        p.embed(files[:2 * batch])
    rates = {k: [] for k in pipes}
    for _ in range(repeats):
        for k, p in pipes.items():
            t0 = time.perf_counter()
            result = p.embed(files)
            rates[k].append(len(files) / (time.perf_counter() - t0))
            if result.errors:
                raise SystemExit(f"{len(result.errors)} images failed")
    print(f"end to end, {model}, batch {batch}, CPU:")
    for k in pipes:
        print(f"  {k:<40} {np.median(rates[k]):8.1f} images/s")
        pipes[k].close()


if __name__ == "__main__":
    main()
