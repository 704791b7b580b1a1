"""Rows of a report compared: groups of networks trained alike (mean and interval over
members) and differences against the controls, with the most paired interval the design allows."""
from __future__ import annotations

import numpy as np


def _is_member(name: str, members: dict[str, list[str]]) -> bool:
    return any(name in m for m in members.values())


def _seed_values(models: dict, name: str, target: str | None) -> np.ndarray:
    """top-1 per evaluation seed of one model on a target (None: the mean over targets)."""
    targets = models[name]["targets"]
    rows = [targets[t].get("seeds", {}).get("top1", [targets[t]["top1"]])
            for t in (targets if target is None else [target])]
    return np.mean(np.asarray(rows, dtype=np.float64), axis=0)


def _group_summary(models: dict, member_names: list[str], target_names: list[str],
                   confidence: float) -> dict:
    """A group's mean and interval over its members (each member averaged over seeds)."""
    from .statistics import mean_interval
    out: dict = {"members": member_names, "targets": {}}
    for t in [*target_names, None]:
        values = [float(_seed_values(models, m, t).mean()) for m in member_names]
        stats = {**mean_interval(values, confidence, bounds=(0.0, 1.0)), "values": values}
        if t is None:
            out["mean"] = stats
        else:
            out["targets"][t] = stats
    return out


def compare_units(a: str, control: str, models: dict, members: dict[str, list[str]],
                  correct: dict, target_names: list[str], seed_list: list[int],
                  confidence: float, seed: int = 0) -> dict:
    """`a` minus `control` (models or groups) per target and on the mean over targets, with the
    most paired interval the design allows (see evaluate_models)."""
    from .statistics import bootstrap_difference, paired_difference, welch_difference

    def units(name):
        return members.get(name, [name])

    ua, uc = units(a), units(control)
    out: dict = {"model": a, "control": control, "targets": {}}
    for t in [*target_names, None]:
        if len(ua) == 1 and len(uc) == 1 and len(seed_list) == 1:
            ts = target_names if t is None else [t]
            d = bootstrap_difference([correct[ua[0], x, seed_list[0]] for x in ts],
                                     [correct[uc[0], x, seed_list[0]] for x in ts],
                                     confidence, seed=seed)
        elif len(ua) == 1 and len(uc) == 1:
            d = paired_difference(_seed_values(models, ua[0], t), _seed_values(models, uc[0], t),
                                  confidence)
            d["method"] = "paired t over seeds"
        else:
            va = np.array([_seed_values(models, m, t).mean() for m in ua])
            vc = np.array([_seed_values(models, m, t).mean() for m in uc])
            if len(ua) == len(uc):
                d = paired_difference(va, vc, confidence)
                d["method"] = "paired t over members"
            elif len(uc) == 1 or len(ua) == 1:
                # one side is a single network: the interval covers the group's seed noise
                d = paired_difference(va - vc.mean() if len(uc) == 1 else va.mean() - vc,
                                      np.zeros(max(len(ua), len(uc))), confidence)
                d["method"] = "t over members"
            else:
                d = welch_difference(va, vc, confidence)
        if t is None:
            out["mean"] = d
        else:
            out["targets"][t] = d
    return out

