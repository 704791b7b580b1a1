#!/usr/bin/env python
"""Probe-fitting benchmark: the original full C sweep against the fast subsample sweep, side by
side in one run, on real embeddings (seconds, chosen C and test accuracy per target).

    python -m benchmarks.bench_probe                        # full size (~10 min on 2 cores)
    python -m benchmarks.bench_probe --fmnist-per-class 30 --max-per-class 30 --train-per-class 20
                                                            # dry run (a minute)

Features: a 768-d MuCaLe-style combination of three small CNNs (256-d each, 32 px), exported to
ONNX and embedded by the runtime pipeline: Net-S (specific) and Net-G (generic) trained on
Fashion-MNIST for `--epochs`, plus a random-weights twin. Targets: fashion-mnist (60,000 train
rows at full size: the case that took > 10 min), mnist (5k) and the Twitter-style emoji labelled
by category (never seen in training). Embeddings are cached under WORK, so a rerun times only
the probes. Writes WORK/bench-probe.json and .png; the floor checked is the issue's: the fast
sweep within 60 s on the largest target and within 0.2 point of the full sweep's accuracy.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import click
import numpy as np

from common.machine import cpu_name, load_average

from .harness import save_figure, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLOOR_SECONDS = 60.0
FLOOR_POINTS = 0.2


def log(msg: str) -> None:
    print(f"[bench-probe {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def train_runs(work: str, source: str, epochs: int, threads: int) -> list[str]:
    """Three 256-d small CNNs (specific, generic, random twin); reused when already there."""
    plan = [("specific", ["--method", "specific", "--epochs", str(epochs), "--seed", "0"]),
            ("generic", ["--method", "generic", "--level", "0", "--epochs", str(epochs),
                         "--seed", "1"]),
            ("random", ["--method", "specific", "--epochs", "0", "--seed", "2"])]
    runs = []
    for name, args in plan:
        run = os.path.join(work, "runs", name)
        runs.append(run)
        if os.path.exists(os.path.join(run, "model.pt")):
            continue
        log(f"train {name} on {source}")
        cmd = [sys.executable, os.path.join(ROOT, "cli.py"), "train", "--data", source,
               "--out", run, "--threads", str(threads), "--input-size", "32"] + args
        subprocess.run(cmd, cwd=ROOT, check=True, timeout=3600)
    return runs


def export_combination(runs: list[str], model_dir: str) -> str:
    if not os.path.exists(os.path.join(model_dir, "model.onnx")):
        from export.onnx_export import export_runs
        log(f"export {len(runs)} networks -> {model_dir}")
        export_runs(runs, model_dir, overwrite=True)
    return model_dir


def embeddings(model_dir: str, spec: str, name: str, max_per_class: int | None, work: str,
               threads: int):
    """(X_train, y_train, X_test, y_test) of a target, through the evaluation's cached path."""
    from runtime.evaluate import cache_key, embed_target, load_target, model_fingerprint
    target = load_target(spec, max_per_class=max_per_class, name=name)
    fp = model_fingerprint(model_dir)
    cache = os.path.join(work, "embeddings", f"{name}-{cache_key(fp, target)}.npz")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    pipes = []

    def factory():
        from runtime.pipeline import FeaturePipeline
        pipes.append(FeaturePipeline(model_dir, device="cpu", threads=threads, batch_size=64))
        return pipes[0]

    log(f"embed {name} ({len(target.train_paths)} train, {len(target.test_paths)} test)")
    try:
        e = embed_target(factory, target, cache)
    finally:
        for p in pipes:
            p.close()
    ok_tr, ok_te = np.isfinite(e.train).all(1), np.isfinite(e.test).all(1)
    return (e.train[ok_tr], target.train_labels[ok_tr], e.test[ok_te], target.test_labels[ok_te])


def time_probe(sweep: str, X, y, Xt, yt, n_jobs: int | None) -> dict:
    """One probe fit; `sweep` is 'full', 'subsample' or 'subsample@ROWS' (another sweep_rows)."""
    from runtime.probes import DEFAULT_SWEEP_ROWS, LogisticRegressionProbe
    kind, _, rows = sweep.partition("@")
    probe = LogisticRegressionProbe(sweep=kind, n_jobs=n_jobs,
                                    sweep_rows=int(rows) if rows else DEFAULT_SWEEP_ROWS)
    start = time.perf_counter()
    cpu0 = time.process_time()
    probe.fit(X, y)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "cpu_seconds": round(time.process_time() - cpu0, 2),
            "C": probe.C_, "accuracy": float(probe.score(Xt, yt)),
            "n_Cs": int(len(probe.Cs_tried_)), "final_iterations": int(probe.n_iter_)}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(result["targets"])
    sweeps = result["sweeps"]
    fig, (ax_t, ax_a) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(targets), 3.8))
    x = np.arange(len(targets))
    width = 0.8 / len(sweeps)
    for i, sweep in enumerate(sweeps):
        secs = [result["targets"][t][sweep]["seconds"] for t in targets]
        accs = [100 * result["targets"][t][sweep]["accuracy"] for t in targets]
        offset = (i - (len(sweeps) - 1) / 2) * width
        bars = ax_t.bar(x + offset, secs, width, label=f"{sweep} sweep")
        ax_t.bar_label(bars, fmt="%.0f s", fontsize=7)
        bars = ax_a.bar(x + offset, accs, width, label=f"{sweep} sweep")
        ax_a.bar_label(bars, fmt="%.1f", fontsize=7)
    labels = [f"{t}\n{result['targets'][t]['n_train']} x {result['dim']}" for t in targets]
    ax_t.set_xticks(x, labels, fontsize=8)
    ax_t.set_ylabel("probe fit seconds (wall)")
    ax_t.axhline(FLOOR_SECONDS, color="red", lw=0.8, ls="--", label=f"{FLOOR_SECONDS:.0f} s floor")
    ax_t.set_title("time to fit one logistic-regression probe", fontsize=9)
    ax_t.legend(fontsize=7)
    ax_a.set_xticks(x, labels, fontsize=8)
    ax_a.set_ylabel("test top-1 (%)")
    low = min(100 * result["targets"][t][s]["accuracy"] for t in targets for s in sweeps)
    ax_a.set_ylim(max(0, low - 10), 100)
    ax_a.set_title("same answers? test accuracy", fontsize=9)
    fig.suptitle(result["machine"], fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--work", default=os.path.join(ROOT, "bench-out", "probe"), show_default=True,
              help="Runs, model, embedding cache and the results.")
@click.option("--train-per-class", default=300, show_default=True,
              help="Fashion-MNIST images per class that the two trained networks learn from.")
@click.option("--epochs", default=1, show_default=True, help="Epochs of the trained networks.")
@click.option("--fmnist-per-class", type=int, default=None,
              help="fashion-mnist target: images per class and side [all: 6,000 train].")
@click.option("--max-per-class", type=int, default=None,
              help="Cap per class and side for the other targets [all].")
@click.option("--sweeps", default="full,subsample", show_default=True,
              help="Sweeps to time, in order: full, subsample (sweep_rows 10,000) or "
                   "subsample@ROWS.")
@click.option("--n-jobs", type=int, default=None, help="Threads of the fast sweep [cores, <= 4].")
@click.option("--threads", default=2, show_default=True, help="Threads for training/embedding.")
def main(work, train_per_class, epochs, fmnist_per_class, max_per_class, sweeps, n_jobs, threads):
    """Time the full and the fast C sweep on the same real embeddings; write JSON + PNG."""
    sweeps = [s.strip() for s in sweeps.split(",") if s.strip()]
    if not sweeps or any(s != "full" and not (s == "subsample" or (
            s.startswith("subsample@") and s.partition("@")[2].isdigit())) for s in sweeps):
        raise click.BadParameter("give full, subsample and/or subsample@ROWS (e.g. "
                                 "full,subsample,subsample@5000)", param_hint="--sweeps")
    work = os.path.abspath(work)
    os.makedirs(work, exist_ok=True)
    source = f"fashion-mnist:per_class={train_per_class}"
    runs = train_runs(work, source, epochs, threads)
    model = export_combination(runs, os.path.join(work, f"model-{train_per_class}-{epochs}"))
    fm = "fashion-mnist" + (f":per_class={fmnist_per_class}" if fmnist_per_class else "")
    targets = {"fashion-mnist": (fm, None), "mnist": ("mnist", max_per_class),
               "emoji-twitter-category": ("emoji:styles=twitter,label=category", max_per_class)}
    result = {"machine": f"{cpu_name()}, {os.cpu_count()} cores, load "
                         f"{(load_average() or [0.0])[0]:.1f}",
              "features": "MuCaLe-style concat of small_cnn specific + generic (trained on "
                          f"{source}, {epochs} epoch(s)) + random twin, 32 px, L-inf normalised",
              "model": model, "sweeps": sweeps, "targets": {}}
    for name, (spec, cap) in targets.items():
        X, y, Xt, yt = embeddings(model, spec, name, cap, work, threads)
        result["dim"] = int(X.shape[1])
        row = result["targets"][name] = {"n_train": int(len(y)), "n_test": int(len(yt)),
                                         "classes": int(len(np.unique(y)))}
        for sweep in sweeps:
            log(f"{name}: {sweep} sweep on {X.shape[0]} x {X.shape[1]}")
            row[sweep] = time_probe(sweep, X, y, Xt, yt, n_jobs)
            log(f"  {row[sweep]}")
    lines = [f"machine   {result['machine']}", f"features  {result['features']}", ""]
    lines.append(f"{'target':24s} {'rows x dim':>12s} " + " ".join(
        f"{s + ' s':>14s} {s + ' acc':>14s} {s + ' C':>12s}" for s in sweeps))
    for name, row in result["targets"].items():
        lines.append(f"{name:24s} {row['n_train']:>7d} x {result['dim']:<4d}" + " ".join(
            f"{row[s]['seconds']:>14.1f} {100 * row[s]['accuracy']:>14.2f} {row[s]['C']:>12.3g}"
            for s in sweeps))
    if {"full", "subsample"} <= set(sweeps):
        largest = max(result["targets"], key=lambda t: result["targets"][t]["n_train"])
        secs = result["targets"][largest]["subsample"]["seconds"]
        gaps = {t: 100 * (r["full"]["accuracy"] - r["subsample"]["accuracy"])
                for t, r in result["targets"].items()}
        for variant in [v for v in sweeps if v.startswith("subsample@")]:
            lost = max(100 * (r["full"]["accuracy"] - r[variant]["accuracy"])
                       for r in result["targets"].values())
            lines.append(f"{variant}: {result['targets'][largest][variant]['seconds']:.1f} s on "
                         f"{largest}, at most {lost:+.2f} points below the full sweep")
        result["floors"] = {"largest_target_seconds": secs, "accuracy_loss_points": gaps,
                            "pass_seconds": secs <= FLOOR_SECONDS,
                            "pass_accuracy": all(g <= FLOOR_POINTS for g in gaps.values())}
        lines += ["", f"floor: fast sweep on {largest} <= {FLOOR_SECONDS:.0f} s: "
                      f"{'PASS' if secs <= FLOOR_SECONDS else 'MISS'} ({secs:.1f} s)",
                  "floor: accuracy lost <= 0.2 point on every target: "
                  f"{'PASS' if result['floors']['pass_accuracy'] else 'MISS'} ("
                  + ", ".join(f"{t} {g:+.2f}" for t, g in gaps.items()) + ")"]
    click.echo("\n".join(lines))
    write_json(os.path.join(work, "bench-probe.json"), result)
    plot(result, os.path.join(work, "bench-probe.png"))
    click.echo(f"wrote {work}/bench-probe.json and {work}/bench-probe.png")


if __name__ == "__main__":
    main()
