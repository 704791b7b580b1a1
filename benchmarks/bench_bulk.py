#!/usr/bin/env python
"""Bulk jobs against the single-process job: what sharding and Ray cost, on the same JPEGs.

For each model it runs, one after the other in fresh processes and on the same files, the three
ways of embedding a corpus with `python cli.py embed`:

    npy      --out features.npy                       one pipeline, everything in memory
    parquet  --out DIR --shard-size S                  the same pipeline, resumable shards
    ray      --out DIR --engine ray --actors N         N actors on a local Ray instance

and prints images/s for each (the job's own timing, from its summary line: loading the model in
the driver and starting Ray are left out, and shown apart as the wall time of the whole
command; the Ray actors load their model inside the job's time), with the ratios against the
single-process job. Floor: sharding and Ray each keep at least 90% of it.
Saves the figures as JSON and a PNG chart.

    python -m benchmarks.bench_bulk                               # 5,120 JPEGs, ResNet-18 + CNN
    python -m benchmarks.bench_bulk --count 64 --archs small_cnn:32 --out /tmp/bb   # dry run

On 2 cores the Ray job gives each actor one CPU, a pipeline with one onnxruntime thread that
decodes a batch and then runs it, which is what the single-process job does with its two
interleaved workers; the driver (reading inputs, writing shards) shares those cores.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

from .harness import pyplot, save_figure, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLOOR = 0.90
SUMMARY = re.compile(r"(\d+)/(\d+) images.*? in ([\d.]+) s \(([\d.]+) img/s"
                     r"(?:, first rows after ([\d.]+) s)?\)")


def export_model(arch: str, size: int, out: str, corpus: str, py: str) -> str:
    """Random-weights `arch` at `size` px exported to ONNX (as scripts/bench_runtime.sh does)."""
    model = os.path.join(out, "models", f"{arch}-{size}")
    if os.path.exists(os.path.join(model, "model.onnx")):
        return model
    run = os.path.join(out, "runs", f"{arch}-{size}")
    subprocess.run([py, "-c", "from train.runs import untrained_run; "
                    f"untrained_run({arch!r}, {run!r}, input_size={size})"],
                   cwd=ROOT, check=True)
    subprocess.run([py, "cli.py", "export", run, "--out", model, "--check-data", corpus,
                    "--overwrite"], cwd=ROOT, check=True)
    return model


def run_mode(mode: str, model: str, corpus: str, work: str, args, py: str) -> dict:
    """One embed command in a fresh process; its own throughput and the command's wall time."""
    target = os.path.join(work, "features.npy" if mode == "npy" else f"out-{mode}")
    if os.path.isdir(target):
        shutil.rmtree(target)
    cmd = [py, "cli.py", "embed", model, corpus, "--out", target, "--device", "cpu",
           "--batch-size", str(args.batch_size)]
    if mode != "npy":
        cmd += ["--shard-size", str(args.shard_size)]
    if mode == "ray":
        cmd += ["--engine", "ray", "--actors", str(args.actors), "--cpus-per-actor",
                str(args.cpus_per_actor)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=args.timeout, env=dict(os.environ, TQDM_DISABLE="1"))
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    match = None
    for line in done.stderr.splitlines():
        match = SUMMARY.search(line) or match
    if match is None:
        raise SystemExit(f"{mode}: no summary line in its output:\n{done.stderr[-3000:]}")
    ok, images, seconds, _, first = match.groups()
    n, seconds = int(images), float(seconds)
    first_s = float(first) if first else 0.0
    # after start-up: from the first rows back to the end (the npy job prints no such mark;
    # its start-up is one batch, so its overall rate stands for both)
    first_batch = min(n, args.batch_size) if first else 0
    rest = seconds - first_s
    # too little after the first rows to tell (a dry run at a tiny size): the overall rate
    steady = (n - first_batch) / rest if rest > 0.1 * seconds else n / max(seconds, 1e-9)
    return {"mode": mode, "images": n, "ok": int(ok), "seconds": seconds,
            "images_per_s": n / max(seconds, 1e-9), "first_rows_s": first_s,
            "steady_images_per_s": steady, "wall_s": wall}


def plot(report: dict, path: str) -> None:
    plt = pyplot()
    models = list(report["models"])
    modes = ["npy", "parquet", "ray"]
    fig, axes = plt.subplots(1, len(models), figsize=(max(6.0, 4.5 * len(models)), 4.2),
                             squeeze=False)
    for ax, name in zip(axes[0], models):
        runs = report["models"][name]["runs"]
        values = [runs[m]["steady_images_per_s"] if m != "npy" else runs[m]["images_per_s"]
                  for m in modes]
        bars = ax.bar(modes, values, color=["#4c72b0", "#55a868", "#c44e52"])
        ax.axhline(FLOOR * values[0], color="grey", ls="--", lw=1,
                   label=f"floor: {FLOOR:.0%} of npy")
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:,.0f}", ha="center",
                    va="bottom", fontsize=8)
        ax.set_title(f"{name}, {report['count']} JPEGs")
        ax.set_ylabel("images/s (shards, Ray: after start-up)")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"bulk embedding on {report['machine']['cores']} cores\nnpy: one process; "
                 f"parquet: resumable shards; ray: {report['actors']} actors", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5120, help="JPEGs in the corpus")
    parser.add_argument("--images", default=None, help="a folder of images instead")
    parser.add_argument("--archs", default="resnet18:224,small_cnn:32",
                        help="comma-separated ARCH:SIZE")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--modes", default="npy,parquet,ray")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per command")
    parser.add_argument("--out", default="bench-out/bulk")
    args = parser.parse_args(argv)

    from common.files import iter_image_files
    from common.machine import load_average
    from runtime.providers import available_cores

    from .corpus import ensure_corpus

    py = sys.executable
    os.makedirs(args.out, exist_ok=True)
    corpus = args.images or ensure_corpus(count=args.count)
    count = sum(1 for _ in iter_image_files(corpus))
    modes = args.modes.split(",")
    report = {"count": count, "corpus": corpus, "batch_size": args.batch_size,
              "shard_size": args.shard_size, "actors": args.actors,
              "machine": {"cores": available_cores(), "load": load_average()},
              "floor": FLOOR, "models": {}}
    print(f"corpus    {count} images, {corpus}")
    print(f"machine   {available_cores()} usable cores; load average {load_average()}")
    print(f"jobs      batch {args.batch_size}, shards of {args.shard_size}, ray "
          f"{args.actors} actors x {args.cpus_per_actor:g} CPU")
    failed = False
    for spec in args.archs.split(","):
        arch, size = spec.split(":")
        model = export_model(arch, int(size), args.out, corpus, py)
        work = os.path.join(args.out, "work", f"{arch}-{size}")
        os.makedirs(work, exist_ok=True)
        runs = {}
        for mode in modes:
            runs[mode] = run_mode(mode, model, corpus, work, args, py)
        print(f"\n{arch} at {size} px")
        base = runs.get("npy")
        for mode, r in runs.items():
            ratio = (f"  {r['images_per_s'] / base['images_per_s']:.3f}x npy, after start-up "
                     f"{r['steady_images_per_s'] / base['images_per_s']:.3f}x" if base else "")
            print(f"   {mode:8s} {r['images_per_s']:9.1f} images/s, after start-up "
                  f"{r['steady_images_per_s']:9.1f}  ({r['seconds']:.1f} s job, first rows "
                  f"after {r['first_rows_s']:.1f} s, {r['wall_s']:.1f} s wall){ratio}")
        if base:
            for mode in ("parquet", "ray"):
                if mode not in runs:
                    continue
                for what, key in (("overall", "images_per_s"),
                                  ("after start-up", "steady_images_per_s")):
                    ratio = runs[mode][key] / base["images_per_s"]
                    passed = ratio >= FLOOR
                    if key == "steady_images_per_s":
                        failed |= not passed
                    print(f"   {'PASS' if passed else 'MISS'}  {mode} {what} >= {FLOOR:.0%} "
                          f"of npy: {ratio:.3f}")
        report["models"][f"{arch}-{size}"] = {"runs": runs}
    stem = os.path.join(args.out, "bench-bulk")
    write_json(stem + ".json", report)
    if set(modes) == {"npy", "parquet", "ray"}:
        plot(report, stem + ".png")
    print(f"\nwrote {stem}.json" + (" and .png" if os.path.exists(stem + ".png") else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
