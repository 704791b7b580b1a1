"""Evaluation reports shaped for the page: one entry per page row (a group of replicates becomes
its mean), aggregates over the counted targets, and one arm's reports joined."""
from __future__ import annotations

import numpy as np


def aggregate_counted(models: dict, reference: str, counted: list[str] | None = None) -> dict:
    """runtime.universality.aggregate_models over the `counted` targets only (None: all)."""
    from runtime.universality import aggregate_models
    if counted is not None:
        models = {name: {**m, "targets": {t: m["targets"][t] for t in counted}}
                  for name, m in models.items()}
    return aggregate_models(models, reference)


def _group_mean(report: dict, name: str) -> dict:
    """A group's entry: its first member's, with accuracies and images/s averaged over members."""
    members = [report["models"][m] for m in report["groups"][name]["members"]]
    entry = {**members[0], "members": report["groups"][name]["members"], "targets": {}}
    for t, first in members[0]["targets"].items():
        entry["targets"][t] = {**first, **{k: float(np.mean([m["targets"][t][k]
                                                              for m in members]))
                                           for k in ("top1", "mean_per_class")}}
    entry["images_per_s"] = float(np.mean([m.get("images_per_s") or 0 for m in members]))
    return entry


def page_view(report: dict, rows: list[str], reference: str,
              counted: list[str] | None = None) -> dict:
    """The report with one `models` entry per page row: a group (one network per training
    seed) becomes its mean over members, so the tables, the heatmap and mNRG read as before;
    intervals and comparisons stay in report["groups"] and report["comparisons"]. Mean, logit
    mean, mNRG and aNRG are over the `counted` targets (None: all); every target keeps its
    cells."""
    models = {name: report["models"][name] if name in report["models"]
              else _group_mean(report, name) for name in rows}
    for name, agg in aggregate_counted(models, reference, counted).items():
        models[name] = {**models[name], **agg}
    return {**report, "models": models, "reference": reference}


def merge_target_reports(counted: dict, extra: dict | None, order: list[str]) -> dict:
    """`counted`'s report with `extra`'s targets added to every model, group and comparison
    (the same rows and pairs, evaluated on other targets), targets in `order`; the means stay
    `counted`'s, so they cover its targets only."""
    if extra is None:
        return counted

    def join(a: dict, b: dict) -> dict:
        return {t: a[t] if t in a else b[t] for t in order if t in a or t in b}

    models = {n: {**m, "targets": join(m["targets"], extra["models"][n]["targets"])}
              for n, m in counted["models"].items()}
    groups = {g: {**info, "targets": join(info["targets"], extra["groups"][g]["targets"])}
              for g, info in counted.get("groups", {}).items()}
    other = {(c["model"], c["control"]): c for c in extra.get("comparisons", [])}
    comparisons = [{**c, "targets": join(c["targets"], other[c["model"], c["control"]]["targets"])}
                   for c in counted.get("comparisons", [])]
    return {**counted, "models": models, "groups": groups, "comparisons": comparisons,
            "targets": join(counted["targets"], extra["targets"])}


def compare(models: dict, a: str, b: str) -> dict:
    """a minus b: mean accuracy difference (points) and targets where a beats b."""
    ta, tb = models[a]["targets"], models[b]["targets"]
    diffs = {t: 100 * (ta[t]["top1"] - tb[t]["top1"]) for t in ta}
    return {"mean": 100 * (models[a]["mean"] - models[b]["mean"]),
            "wins": sum(d > 0 for d in diffs.values()), "n": len(diffs), "diffs": diffs}


def paired(report: dict, model: str, control: str) -> dict:
    """A paired comparison's mean difference (points), interval and verdict, as numbers."""
    c = next(c for c in report["comparisons"] if (c["model"], c["control"]) == (model, control))
    d = c["mean"]
    return {"diff": 100 * d["diff"], "low": 100 * d["low"], "high": 100 * d["high"],
            "has_interval": bool(np.isfinite(d["low"])), "method": d["method"],
            "significant": d["significant"]}
