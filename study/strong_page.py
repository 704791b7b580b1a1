"""The strong-backbones section of the results page, from the arm's records alone: rows (a
group of trained replicates becomes its mean with a 95% interval), paired comparisons against
both size controls, cost columns, a figure (held-out accuracy against GFLOPs) and a reading
generated from the intervals. The section sits between markers in docs/results.md, so the rest
of the page (the reproduction arms) stays as its own run wrote it."""
from __future__ import annotations

import os

import numpy as np

from common.atomic import atomic_open

from . import strong_prose as prose
from .strong import (
    BIG,
    COMBINED_RECIPES,
    LEVELS_CONTROLS,
    PAIR_IDS,
    PLAIN,
    ROWS,
    TWIN,
    member_name,
)
from .strong_stages import hits_from_text

CONFIDENCE = 0.95


def _target_names(records: dict[str, dict], n_counted: int) -> tuple[list[str], list[str]]:
    first = next(iter(records.values()))["result"]["targets"]
    names = list(first)
    return names[:n_counted], names[n_counted:]


def _row_members(records: dict, seeds: int) -> dict[str, list[str]]:
    """Each row's evaluated members (by model name), for the rows with at least one."""
    out = {}
    for row in ROWS.values():
        names = [member_name(row, r) for r in range(seeds if row.seeded else 1)]
        present = [n for n in names if n in records]
        if present:
            out[row.label] = present
    return out


def _row_entry(records: dict, members: list[str], counted: list[str], shown: list[str],
               planned: int) -> dict:
    from runtime.evaluation.statistics import mean_interval
    results = [records[m]["result"] for m in members]
    per_target = {t: float(np.mean([r["targets"][t]["top1"] for r in results]))
                  for t in counted + shown}
    member_means = [float(np.mean([r["targets"][t]["top1"] for t in counted])) for r in results]
    # mean per-class accuracy: the icon themes are unbalanced (actions and status dominate)
    per_class = float(np.mean([r["targets"][t]["mean_per_class"] for r in results
                               for t in counted]))
    interval = (mean_interval(member_means, CONFIDENCE, bounds=(0.0, 1.0))
                if len(members) > 1 else None)
    first = records[members[0]]
    return {"members": members, "planned": planned, "targets": per_target,
            "mean_per_class": per_class,
            "mean": float(np.mean(member_means)), "interval": interval,
            "dim": first["result"]["embedding_dim"], "params": first["params"],
            "input_size": first.get("input_size"),
            "gflops": first["flops"] / 1e9 if first.get("flops") else float("nan"),
            "images_per_s": float(np.mean([r.get("images_per_s") or 0 for r in results]))}


def _comparisons(records: dict, members: dict[str, list[str]], rows: dict, counted: list[str],
                 seed: int) -> list[dict]:
    """Every planned pair whose sides are complete (all planned members evaluated): a group of
    replicates is compared member by member, a one-model row as that model."""
    from runtime.evaluation.compare import compare_units
    # counted targets only: the mean over a cell's targets is the held-out mean
    cells = {n: {"targets": {t: r["result"]["targets"][t] for t in counted}}
             for n, r in records.items()}
    correct = {(n, t, seed): hits_from_text(h) for n, r in records.items()
               for t, h in r["hits"].items()}
    groups = {label: names for label, names in members.items() if len(names) > 1}
    for label, names in members.items():
        if len(names) == 1:
            cells[label] = cells[names[0]]
            for t in counted:
                correct[label, t, seed] = correct[names[0], t, seed]
    out = []
    for a, c in PAIR_IDS:
        la, lc = ROWS[a].label, ROWS[c].label
        if la not in rows or lc not in rows:
            continue
        c_ = compare_units(la, lc, cells, groups, correct, counted, [seed], CONFIDENCE, seed)
        complete = all(len(rows[x]["members"]) == rows[x]["planned"] for x in (la, lc))
        out.append({"model": la, "control": lc, **c_["mean"], "complete": complete,
                    "replicates": f"{len(rows[la]['members'])}/{rows[la]['planned']} vs "
                                  f"{len(rows[lc]['members'])}/{rows[lc]['planned']}"})
    return out


def arm_view(records: dict[str, dict], seeds: int, seed: int, n_counted: int,
             speeds: dict | None = None) -> dict:
    """Rows, comparisons and targets of the arm from its records; `speeds` (the speed stage's
    figures by row) replace the throughput measured while evaluating where given."""
    counted, shown = _target_names(records, n_counted)
    members = _row_members(records, seeds)
    rows = {}
    for row in ROWS.values():
        if row.label in members:
            planned = seeds if row.seeded else 1
            rows[row.label] = {**_row_entry(records, members[row.label], counted, shown,
                                            planned), "id": row.id, "kind": row.kind}
            speed = (speeds or {}).get(row.label)
            rows[row.label]["speed_stage"] = speed is not None
            if speed is not None:
                rows[row.label]["images_per_s"] = speed["images_per_s"]
    from runtime.universality import aggregate_models
    plain = ROWS[PLAIN].label
    if plain in rows:
        agg = aggregate_models({n: {"targets": {t: {"top1": r["targets"][t]}
                                                for t in counted}} for n, r in rows.items()},
                               reference=plain)
        for n in rows:
            rows[n]["mnrg"] = agg[n]["mnrg"]
    return {"rows": rows, "counted": counted, "shown": shown,
            "comparisons": _comparisons(records, members, rows, counted, seed),
            "total": sum(seeds if r.seeded else 1 for r in ROWS.values()),
            "done": len(records)}


def _pct(v: float | None) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.1f}"


def short_name(target: str) -> str:
    """A target's column header: 'icons:theme=gnome,label=context' -> 'icons gnome',
    'mnist:per_class=40' -> 'mnist'."""
    name, _, options = target.partition(":")
    theme = dict(o.split("=", 1) for o in options.split(",") if "=" in o).get("theme")
    return f"{name} {theme}" if theme else name


def table(view: dict) -> list[str]:
    counted, shown = view["counted"], view["shown"]
    cols = (["network", "replicates", "px", "dim", "params", "GFLOPs", "images/s"]
            + [short_name(t) for t in counted] + ["held-out mean [95%]", "per-class mean",
                                                  "mNRG vs Lite0"]
            + [f"{short_name(t)} (shown)" for t in shown])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, r in view["rows"].items():
        iv = r["interval"]
        mean = _pct(r["mean"]) + (f" [{_pct(iv['low'])}, {_pct(iv['high'])}]" if iv else "")
        mnrg = r.get("mnrg")
        cells = [name, f"{len(r['members'])}/{r['planned']}", str(r["input_size"]),
                 str(r["dim"]),
                 f"{r['params'] / 1e6:.2f}M", f"{r['gflops']:.2f}",
                 f"{r['images_per_s']:.0f}" + ("" if r.get("speed_stage") else "*")]
        cells += [_pct(r["targets"][t]) for t in counted] + [mean, _pct(r["mean_per_class"])]
        cells += ["n/a" if mnrg is None else f"{mnrg:+.1f}"]
        cells += [_pct(r["targets"][t]) for t in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _interval(c: dict) -> str:
    return (f"[{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]" if np.isfinite(c["low"])
            else "n/a")


def pairs_table(view: dict) -> list[str]:
    lines = [prose.PAIRS_TITLE, "", prose.PAIRS_NOTE, "",
             "| model | control | replicates | difference | 95% interval | method | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in view["comparisons"]:
        verdict = prose.VERDICT[bool(c["significant"])]
        lines.append(prose.PAIR_LINE.format(
            model=c["model"], control=c["control"], replicates=c["replicates"],
            diff=100 * c["diff"], interval=_interval(c), method=c["method"],
            verdict=verdict if c["complete"] else prose.PROVISIONAL.format(verdict=verdict)))
    return lines


def _find(view: dict, a: str, c: str) -> dict | None:
    return next((x for x in view["comparisons"]
                 if (x["model"], x["control"]) == (ROWS[a].label, ROWS[c].label)), None)


def _said(c: dict | None) -> str:
    if c is None:
        return prose.NO_COMPARISON
    return f"{100 * c['diff']:+.1f} {_interval(c)} points ({c['method']})"


def reading(view: dict) -> list[str]:
    """Sentences that follow from the intervals: each combined recipe against both size
    controls, the floor of the issue, each tuned network alone, what a bigger backbone buys."""
    out, met, pending, why = [], [], False, []
    for rid in COMBINED_RECIPES:
        label = ROWS[rid].label
        vs_big, vs_twin = _find(view, rid, BIG), _find(view, rid, TWIN)
        if label not in view["rows"] or vs_big is None or vs_twin is None:
            pending = True
            continue
        if not (vs_big["complete"] and vs_twin["complete"]):
            pending = True
            out.append(prose.RECIPE_PROVISIONAL.format(
                label=label, gflops=view["rows"][label]["gflops"], vs_big=_said(vs_big),
                vs_twin=_said(vs_twin), replicates=vs_big["replicates"].split(" vs ")[0]))
            continue
        up_big = bool(vs_big["significant"]) and vs_big["diff"] > 0
        up_twin = bool(vs_twin["significant"]) and vs_twin["diff"] > 0
        verdict = "both" if up_big and up_twin else "big" if up_big else (
            "twin" if up_twin else "none")
        if verdict == "both":
            met.append(label)
        else:
            why.append(f"{label}: {_said(vs_big)} vs Lite2, {_said(vs_twin)} vs the twin")
        out.append(prose.RECIPE.format(label=label, gflops=view["rows"][label]["gflops"],
                                       vs_big=_said(vs_big), vs_twin=_said(vs_twin),
                                       verdict=prose.RECIPE_VERDICT[verdict]))
    outcome = (prose.FLOOR_MET.format(rows=", ".join(met)) if met else prose.FLOOR_PENDING
               if pending else prose.FLOOR_NOT_MET.format(why="; ".join(why)))
    if met and pending:
        outcome += " " + prose.FLOOR_PENDING
    out.insert(0, prose.FLOOR.format(outcome=outcome))
    for rid in ("s-fsft-emoji", "s-fsft-fashion"):
        c = _find(view, rid, PLAIN)
        if c is not None:
            kind = ("same" if not c["significant"] else "up" if c["diff"] > 0 else "down")
            verdict = prose.ALONE_VERDICT[kind]
            if not c["complete"]:
                verdict = prose.PROVISIONAL.format(verdict=verdict)
            out.append(prose.ALONE.format(label=ROWS[rid].label, diff=_said(c),
                                          verdict=verdict))
    out += _levels_lines(view)
    base = view["rows"].get(ROWS[PLAIN].label)
    for rid in ("s-lite1", "s-lite2", TWIN):
        c = _find(view, rid, PLAIN)
        if c is not None and base is not None:
            out.append(prose.BIGGER.format(label=ROWS[rid].label, diff=_said(c),
                                           gflops=view["rows"][ROWS[rid].label]["gflops"],
                                           base=base["gflops"],
                                           note="" if c["complete"] else ", provisional"))
    return out


def _levels_lines(view: dict) -> list[str]:
    """Each levels recipe against the same tuning on the leaf labels alone."""
    out = []
    for rid, flat in LEVELS_CONTROLS:
        c = _find(view, rid, flat)
        if c is None:
            continue
        kind = "same" if not c["significant"] else "up" if c["diff"] > 0 else "down"
        verdict = prose.LEVELS_VERDICT[kind]
        if not c["complete"]:
            verdict = prose.PROVISIONAL.format(verdict=verdict)
        out.append(prose.LEVELS.format(label=ROWS[rid].label, control=ROWS[flat].label,
                                       diff=_said(c), verdict=verdict))
    return out


def plot(view: dict, path: str) -> None:
    """Held-out mean accuracy (with its interval over replicates) against GFLOPs per image."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {"plain": "tab:blue", "recipe": "tab:green", "control": "tab:gray"}
    fig, ax = plt.subplots(figsize=(9, 5.6))
    # rows of one cost sit side by side (a small x offset) with labels alternating left and
    # right, so that equal-cost rows stay readable
    seen_at: dict[float, int] = {}
    for name, r in view["rows"].items():
        k = seen_at[round(r["gflops"], 2)] = seen_at.get(round(r["gflops"], 2), -1) + 1
        x, y = r["gflops"] + 0.012 * k, 100 * r["mean"]
        iv = r["interval"]
        err = ([[100 * (r["mean"] - iv["low"])], [100 * (iv["high"] - r["mean"])]]
               if iv else None)
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, color=colours[r["kind"]])
        left = k % 2 == 1
        ax.annotate(name.replace("S: ", "").replace("S control: ", "control: "), (x, y),
                    fontsize=7, xytext=(-5 if left else 5, 2), textcoords="offset points",
                    ha="right" if left else "left")
    costs = [r["gflops"] for r in view["rows"].values() if np.isfinite(r["gflops"])]
    if costs:
        ax.set_xlim(min(costs) - 0.4, max(costs) + 0.5)  # room for the labels at both ends
    ax.set_xlabel("GFLOPs per image (2 per multiply-add; a combination runs every member)")
    ax.set_ylabel("held-out mean top-1 (%)")
    ax.set_title("Strong backbones: accuracy on held-out targets against cost", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def _speed_how(speeds: dict) -> str:
    if not speeds:
        return prose.SPEED_EVAL
    first = next(iter(speeds.values()))
    loads = [x for v in speeds.values() for x in v["load_average"]]
    return prose.SPEED_STAGE.format(n_images=first["n_images"], rounds=len(first["rounds"]),
                                    low=min(loads), high=max(loads))


def section(view: dict, meta: dict, png_name: str, hand_reading: str | None) -> str:
    """The whole section, between its markers."""
    lines = [prose.BEGIN, prose.TITLE, ""]
    if view["done"] < view["total"]:
        lines += [prose.PARTIAL.format(done=view["done"], total=view["total"],
                                       missing=f"{view['total'] - view['done']} to go",
                                       records=meta["records"]), ""]
    so_far = " so far" if view["done"] < view["total"] else ""
    lines += [prose.GENERATED.format(**meta, so_far=so_far), "",
              *[s.format(**meta) for s in prose.SETUP], "",
              prose.FIGURE.format(png=png_name), "", *table(view), "",
              prose.COST.format(threads=meta.get("threads", "?"),
                                speed_how=_speed_how(meta.get("speeds") or {})),
              prose.TABLE_NOTE, "", *pairs_table(view), ""]
    if hand_reading:
        lines += [hand_reading.rstrip(), ""]
    lines += [prose.READING_TITLE, "", *[f"- {s}" for s in reading(view)], "", prose.END]
    return "\n".join(lines)


def insert_section(page: str, text: str) -> None:
    """Put the section into the page between its markers (appended the first time)."""
    old = ""
    if os.path.exists(page):
        with open(page) as f:
            old = f.read()
    if prose.BEGIN in old and prose.END in old:
        head, rest = old.split(prose.BEGIN, 1)
        new = head + text + rest.split(prose.END, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + text + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(page)), exist_ok=True)
    with atomic_open(page, "w") as f:
        f.write(new)
