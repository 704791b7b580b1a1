"""Fidelity of a decode path, measured against the exact CPU transform, not assumed.

`measure_fidelity(candidate, reference, items, labels)` embeds the same labelled images with
two pipelines (say decode="gpu", or a fast CPU decode, against decode="cpu" with
fast_decode=False), and reports the cosine between their embeddings (mean and min over the
images both decoded) and the change of linear-probe accuracy (the project's logistic-regression
probe at a fixed C, fitted on a seeded stratified half, scored on the other half, once per
path). The bound both GPU decoding and any fast CPU mode must meet: mean cosine >= 0.999 and
an accuracy change of at most 0.2 point.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from common.data import stratified_split

COSINE_BOUND = 0.999
ACCURACY_BOUND_POINTS = 0.2


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.where(norms == 0, 1.0, norms)


def probe_accuracy(features: np.ndarray, labels: np.ndarray, train: np.ndarray,
                   test: np.ndarray) -> float:
    """Test accuracy of LogisticRegressionProbe(C=1) fitted on `train` rows: the same probe for
    both paths, so the change reflects the features only."""
    from ..probes import LogisticRegressionProbe
    probe = LogisticRegressionProbe(C=1.0, max_iter=300).fit(features[train], labels[train])
    return float((np.asarray(probe.predict(features[test])) == labels[test]).mean())


def compare(candidate: np.ndarray, reference: np.ndarray, labels: np.ndarray,
            ok: np.ndarray | None = None, seed: int = 0) -> dict:
    """The fidelity report of two embeddings of the same labelled images (rows aligned)."""
    labels = np.asarray(labels)
    ok = np.ones(len(labels), bool) if ok is None else np.asarray(ok, bool)
    cos = cosine_rows(candidate[ok], reference[ok])
    train, test = stratified_split(labels[ok], 0.5, seed=seed)
    acc_ref = probe_accuracy(reference[ok], labels[ok], train, test)
    acc_cand = probe_accuracy(candidate[ok], labels[ok], train, test)
    change = 100.0 * (acc_cand - acc_ref)
    return {"images": int(ok.sum()), "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()), "accuracy_reference": acc_ref,
            "accuracy_candidate": acc_cand, "accuracy_change_points": change,
            "within_bound": bool(cos.mean() >= COSINE_BOUND
                                 and abs(change) <= ACCURACY_BOUND_POINTS)}


def measure_fidelity(candidate, reference, items: Sequence[Any], labels: Sequence[int],
                     seed: int = 0) -> dict:
    """Embed `items` with both pipelines and compare (see the module docstring); items that
    either pipeline failed on are left out and counted."""
    a = candidate.embed(list(items))
    b = reference.embed(list(items))
    ok = a.ok & b.ok
    report = compare(a.vectors, b.vectors, np.asarray(labels), ok, seed)
    report["failed_candidate"] = len(a.errors)
    report["failed_reference"] = len(b.errors)
    return report
