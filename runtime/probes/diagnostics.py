"""How a probe does on labelled images: accuracy, a per-class report (precision, recall, F1,
support) and the confusion matrix, as JSON and as a PNG a plant engineer can read.

    report = classification_report(true_labels, predicted_labels, classes)
    write_report(report, "preds.report")   # report.json, confusion.json, confusion.png

Rows of the confusion matrix are the true classes, columns the predicted ones, in `classes`
order; a true label that is not one of the probe's classes gets its own row (it can never be
predicted), so nothing is silently dropped. NumPy only; matplotlib for the PNG (skipped with a
note when it is not installed: the lean runtime install has none).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def confusion_matrix(y_true: list[str], y_pred: list[str], classes: list[str]
                     ) -> tuple[np.ndarray, list[str]]:
    """(counts [true, predicted], row names): rows are `classes` and then any true label that
    is not a class; columns are `classes`."""
    extra = sorted({t for t in y_true if t not in set(classes)})
    rows = list(classes) + extra
    row_of = {c: i for i, c in enumerate(rows)}
    col_of = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(rows), len(classes)), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        matrix[row_of[t], col_of[p]] += 1
    return matrix, rows


def classification_report(y_true: list[str], y_pred: list[str], classes: list[str]
                          ) -> dict[str, Any]:
    """Accuracy, per-class precision / recall / F1 / support, macro averages and the confusion
    matrix (with its most frequent confusions), as one JSON-ready dict."""
    y_true, y_pred = [str(t) for t in y_true], [str(p) for p in y_pred]
    classes = [str(c) for c in classes]
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    matrix, rows = confusion_matrix(y_true, y_pred, classes)
    n = int(matrix.sum())
    correct = int(sum(matrix[i, i] for i in range(len(classes))))
    per_class = {}
    for i, c in enumerate(classes):
        tp, predicted, support = int(matrix[i, i]), int(matrix[:, i].sum()), int(matrix[i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[c] = {"precision": round(precision, 6), "recall": round(recall, 6),
                        "f1": round(f1, 6), "support": support}
    present = [c for c in classes if per_class[c]["support"]]
    cells = sorted(((int(matrix[i, j]), rows[i], classes[j]) for i in range(len(rows))
                    for j in range(len(classes)) if (i >= len(classes) or i != j)
                    and matrix[i, j]), key=lambda c: (-c[0], c[1], c[2]))
    confusions = [{"true": t, "predicted": p, "count": n} for n, t, p in cells]
    return {
        "images": n, "correct": correct, "accuracy": correct / n if n else None,
        "macro": {k: (round(float(np.mean([per_class[c][k] for c in present])), 6)
                      if present else None) for k in ("precision", "recall", "f1")},
        "per_class": per_class,
        "unknown_true_labels": rows[len(classes):],
        "confusion": {"rows_true": rows, "columns_predicted": classes,
                      "matrix": matrix.tolist()},
        "top_confusions": confusions[:20],
    }


def save_confusion_png(report: dict, path: str, *, title: str = "") -> bool:
    """The confusion matrix as a heat map with the counts written in; row-normalised colours
    (each true class's share), so small classes read as well as large ones. False when
    matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    conf = report["confusion"]
    matrix = np.asarray(conf["matrix"], dtype=np.float64)
    rows, cols = conf["rows_true"], conf["columns_predicted"]
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * max(len(rows), len(cols)) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    if len(rows) * len(cols) <= 900:  # beyond 30 x 30 the numbers would not fit
        for i in range(len(rows)):
            for j in range(len(cols)):
                if matrix[i, j]:
                    ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy = report.get("accuracy")
    ax.set_title((title + "  " if title else "") +
                 (f"accuracy {accuracy:.3f} on {report['images']} images" if accuracy is not None
                  else ""), fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04, label="share of the true class")
    fig.tight_layout()
    from common.atomic import atomic_open
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return True


def write_report(report: dict, folder: str, *, title: str = "") -> list[str]:
    """report.json (everything), confusion.json (the matrix alone) and confusion.png into
    `folder`; returns the files written."""
    from common.atomic import atomic_open
    os.makedirs(folder, exist_ok=True)
    written = []
    for name, doc in (("report.json", report), ("confusion.json", report["confusion"])):
        path = os.path.join(folder, name)
        with atomic_open(path, "w") as f:
            json.dump(doc, f, indent=1)
        written.append(path)
    png = os.path.join(folder, "confusion.png")
    if save_confusion_png(report, png, title=title):
        written.append(png)
    return written
