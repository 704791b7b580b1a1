"""The protocol of one cell: fit the probe on a target's train side, score it once on its test
side (items that failed to embed are dropped and counted), and merge a cell over seeds."""
from __future__ import annotations

import time

import numpy as np

from .cache import Embedded
from .errors import EvaluationError
from .statistics import mean_per_class_accuracy, top1_accuracy
from .targets import TargetSplit


def _valid_rows(x: np.ndarray) -> np.ndarray:
    return np.isfinite(x).all(axis=1)


def probe_target(embedded: Embedded, target: TargetSplit, probe: str = "logreg", seed: int = 0,
                 probe_params: dict | None = None) -> dict:
    """Fit the probe on the train side, score it once on the test side; items that failed to
    embed are dropped from both X and y and counted. `probe_params` go to `make_probe`."""
    from runtime.probes import make_probe

    ok_train, ok_test = _valid_rows(embedded.train), _valid_rows(embedded.test)
    x_train, y_train = embedded.train[ok_train], target.train_labels[ok_train]
    x_test, y_test = embedded.test[ok_test], target.test_labels[ok_test]
    if len(np.unique(y_train)) < 2 or len(y_test) == 0:
        first = next(iter(embedded.errors.values()), "no message")
        raise EvaluationError(f"target {target.name!r}: too few images could be embedded "
                              f"({len(y_train)} train, {len(y_test)} test); first error: {first}")
    estimator = make_probe(probe, **{"seed": seed, **(probe_params or {})})
    start = time.perf_counter()
    estimator.fit(x_train, y_train)
    fit_seconds = time.perf_counter() - start
    y_pred = np.asarray(estimator.predict(x_test))
    # per test image (failed ones count as wrong), for paired comparisons; popped from the report
    correct = np.zeros(len(target.test_labels), dtype=bool)
    correct[np.flatnonzero(ok_test)] = y_pred == y_test
    chosen_C = getattr(estimator, "C_", None)  # linear probes only
    return {
        "correct": correct,
        "top1": top1_accuracy(y_test, y_pred),
        "mean_per_class": mean_per_class_accuracy(y_test, y_pred),
        # ncm / knn have no regularisation strength; their chosen k or temperature is recorded.
        "C": float(chosen_C) if chosen_C is not None else None,
        "k": getattr(estimator, "k_", None),
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
        "dropped": {"train": int((~ok_train).sum()), "test": int((~ok_test).sum())},
        "errors": dict(list(embedded.errors.items())[:5]),
        "split": target.info["split"],
        "chance": float(1.0 / max(target.info["n_classes_train"], 1)),
        "images_per_s": round(embedded.images_per_s, 2),
        "provider": embedded.provider,
        "embed_seconds": float(embedded.seconds),
        "probe_seconds": round(fit_seconds, 3),
        "cached": embedded.cached,
    }



def _merge_seeds(per_seed: list[dict], seed_list: list[int], confidence: float) -> dict:
    """One target's result over seeds: the first seed's details, accuracies averaged, and the
    per-seed values with their t interval."""
    if len(per_seed) == 1:
        return per_seed[0]
    from .statistics import mean_interval
    merged = dict(per_seed[0])
    for key in ("top1", "mean_per_class"):
        values = [r[key] for r in per_seed]
        merged[key] = float(np.mean(values))
        stats = mean_interval(values, confidence, bounds=(0.0, 1.0))
        merged[f"{key}_interval"] = [stats["low"], stats["high"]]
    merged["seeds"] = {"seed": seed_list, "top1": [r["top1"] for r in per_seed],
                       "mean_per_class": [r["mean_per_class"] for r in per_seed],
                       "C": [r["C"] for r in per_seed]}
    merged["embed_seconds"] = float(sum(r["embed_seconds"] for r in per_seed))
    merged["probe_seconds"] = round(sum(r["probe_seconds"] for r in per_seed), 3)
    merged["n_train"] = per_seed[0]["n_train"] * len(per_seed)   # for images/s over all seeds
    merged["n_test"] = per_seed[0]["n_test"] * len(per_seed)
    merged["dropped"] = {k: sum(r["dropped"][k] for r in per_seed) for k in ("train", "test")}
    merged["cached"] = all(r["cached"] for r in per_seed)
    return merged

