#!/usr/bin/env python
"""The one-command demo (`make demo`): train -> export -> runtime -> probes, on real data.

1. trains the default small CNN on Fashion-MNIST (`python cli.py train`),
2. exports it, and the same architecture with random weights, to ONNX (`python cli.py export`),
3. embeds MNIST and digits with the onnxruntime pipeline and fits logistic-regression probes,
4. prints (and writes to OUT/demo.md and OUT/demo.png) probe accuracy on the trained features,
   on random features and on raw pixels.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(*args: str) -> None:
    cmd = [sys.executable, os.path.join(ROOT, "cli.py"), *args]
    print("\n$ python cli.py " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def probe_accuracy(features_train, y_train, features_test, y_test, seed=0) -> float:
    from runtime.probes import LogisticRegressionProbe
    probe = LogisticRegressionProbe(seed=seed).fit(features_train, y_train)
    return float((probe.predict(features_test) == y_test).mean())


def embed_split(pipe, ds, split):
    res = pipe.embed(ds.paths(split))
    keep = res.ok
    return res.vectors[keep], ds.labels(split)[keep]


def raw_pixels(ds, split, size=28):
    import numpy as np

    from common.description import Preprocessing
    from common.images import preprocess
    pre = Preprocessing(input_size=size, resize_size=size, mean=[0, 0, 0], std=[1, 1, 1])
    x = np.stack([preprocess(p, pre)[0].ravel() for p in ds.paths(split)])
    return x, ds.labels(split)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "demo"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-per-class", type=int, default=2000)
    args = ap.parse_args()
    t0 = time.time()
    out = args.out
    runs, models = os.path.join(out, "runs"), os.path.join(out, "models")
    source = f"fashion-mnist:per_class={args.train_per_class}"

    for name, epochs in (("fmnist", args.epochs), ("random", 0)):
        run_dir = os.path.join(runs, name)
        if os.path.exists(os.path.join(run_dir, "model.pt")):
            print(f"[demo] {run_dir} is complete; skipping training")
            continue
        resume = ["--resume"] if os.path.exists(os.path.join(run_dir, "checkpoint.pt")) else []
        run("train", "--data", source, "--method", "specific", "--epochs", str(epochs),
            "--out", run_dir, *resume)
    for name in ("fmnist", "random"):
        run("export", os.path.join(runs, name), "--out", os.path.join(models, name), "--overwrite")

    from common.data import load_dataset
    from runtime.pipeline import FeaturePipeline
    rows = []
    targets = ["mnist", "digits"]
    for target in targets:
        ds = load_dataset(target)
        row = {"target": target}
        for name in ("fmnist", "random"):
            pipe = FeaturePipeline(os.path.join(models, name))
            xtr, ytr = embed_split(pipe, ds, "train")
            xte, yte = embed_split(pipe, ds, "test")
            row[name] = probe_accuracy(xtr, ytr, xte, yte)
        xtr, ytr = raw_pixels(ds, "train")
        xte, yte = raw_pixels(ds, "test")
        row["pixels"] = probe_accuracy(xtr, ytr, xte, yte)
        rows.append(row)
        print(f"[demo] {target}: {row}", flush=True)

    header = "| target | trained on Fashion-MNIST | same CNN, random weights | raw pixels |\n|---|---|---|---|\n"
    table = header + "".join(
        f"| {r['target']} | {100 * r['fmnist']:.1f} | {100 * r['random']:.1f} | {100 * r['pixels']:.1f} |\n"
        for r in rows)
    elapsed = time.time() - t0
    text = (f"Linear-probe test accuracy (%), logistic regression on frozen features\n\n{table}\n"
            f"demo time: {elapsed / 60:.1f} min\n")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "demo.md"), "w") as f:
        f.write(text)
    _plot(rows, os.path.join(out, "demo.png"))
    print("\n" + text)
    print(f"[demo] wrote {out}/demo.md and {out}/demo.png")


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(6, 3.5))
    keys = [("fmnist", "trained (Fashion-MNIST)"), ("random", "random weights"), ("pixels", "raw pixels")]
    x = np.arange(len(rows))
    for i, (k, label) in enumerate(keys):
        ax.bar(x + (i - 1) * 0.27, [100 * r[k] for r in rows], 0.27, label=label)
    ax.set_xticks(x, [r["target"] for r in rows])
    ax.set_ylabel("probe accuracy (%)")
    ax.set_ylim(50, 100)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Transfer of frozen features (linear probe)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
