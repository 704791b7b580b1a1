"""metrics.jsonl (one record per epoch), its console line and curves.png."""
from __future__ import annotations

import json
import os

from common.atomic import atomic_open

from .config import METRICS


def format_record(r: dict, epochs: int) -> str:
    accs = " ".join(f"{h} {a:.3f}" for h, a in r["train_acc"].items())
    line = f"epoch {r['epoch']}/{epochs}: train loss {r['train_loss']:.4f} acc [{accs}]"
    if "eval_acc" in r:
        line += (f" | eval loss {r['eval_loss']:.4f} acc ["
                 + " ".join(f"{h} {a:.3f}" for h, a in r["eval_acc"].items()) + "]")
    return line + f" | {r['images_per_s']:.0f} img/s, {r['seconds']:.1f}s"


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str, epochs_done: int) -> None:
    """Keep the metrics of the epochs the checkpoint contains (a crash may have left more)."""
    if os.path.exists(path):
        kept = [r for r in read_metrics(os.path.dirname(path)) if r["epoch"] <= epochs_done]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)


def plot_curves(metrics: list[dict], path: str) -> None:
    """Loss and per-head accuracy, train (solid) and eval (dashed), against epochs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [m["train_loss"] for m in metrics], "-o", label="train")
    if "eval_loss" in metrics[0]:
        ax_loss.plot(epochs, [m["eval_loss"] for m in metrics], "--o", label="eval")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    for head in metrics[0]["train_acc"]:
        line, = ax_acc.plot(epochs, [m["train_acc"][head] for m in metrics], "-o",
                            label=f"{head} train")
        if "eval_acc" in metrics[0]:
            ax_acc.plot(epochs, [m["eval_acc"][head] for m in metrics], "--o",
                        color=line.get_color(), label=f"{head} eval")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy per head", ylim=(0, 1))
    ax_acc.legend(fontsize="small")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
