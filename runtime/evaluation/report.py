"""Writers for an evaluation report: report.json, report.md and report.png, each written atomically.

report.json layout (accuracies are fractions in [0, 1]; mNRG/aNRG are x100):

    {"models": {NAME: {"model_dir", "embedding_dim", "architecture", "method", "fingerprint",
                       "targets": {TARGET: {"top1", "mean_per_class", "C", "n_train", "n_test",
                                            "split", "dropped", "errors", "chance",
                                            "images_per_s", "provider", "cached", ...}},
                       "mean", "logit_mean", "mnrg", "anrg", "images_per_s"}},
     "reference": NAME or null,
     "targets": {TARGET: {"spec", "split" ("given" | "stratified"), "test_fraction", "seed",
                          "max_per_class", "n_train", "n_test", "n_classes", "fingerprint", ...}},
     "groups": {GROUP: {"members": [NAME[i], ...], "targets": {TARGET: {"mean", "low", "high",
                         "n", "values"}}, "mean": {...}}},
     "comparisons": [{"model", "control", "targets": {TARGET: {"diff", "low", "high", "n",
                      "method", "significant"}}, "mean": {...}}],
     "probe", "probe_params", "seed", "seeds", "confidence", "metric", "settings", "cache",
     "versions", "created"}

With several seeds a target result also has "top1_interval" and "seeds" {"seed", "top1", ...}.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from common.atomic import write_bytes_atomic as _write_atomic
from common.description import save_json_atomic

_Column = tuple[str, Callable[[dict], float], str]


def _target_top1(target: str) -> Callable[[dict], float]:
    return lambda m: 100 * m["targets"][target]["top1"]


def _columns(report: dict) -> list[_Column]:
    """(header, value getter, format) for every column of the model table."""
    targets = list(report["targets"])
    cols: list[_Column] = [(t, _target_top1(t), "{:.1f}") for t in targets]
    cols.append(("mean", lambda m: 100 * m["mean"], "{:.1f}"))
    cols.append(("logit mean", lambda m: m["logit_mean"], "{:.2f}"))
    if report.get("reference"):
        cols.append(("mNRG", lambda m: m["mnrg"], "{:+.1f}"))
        cols.append(("aNRG", lambda m: m["anrg"], "{:+.1f}"))
    return cols


def render_table(report: dict) -> str:
    """Markdown table: models x targets (top-1 %), mean, logit mean, mNRG, aNRG; best in bold."""
    cols = _columns(report)
    models = report["models"]
    best = {h: max(get(m) for m in models.values()) for h, get, _ in cols}
    header = ["model", "dim"] + [h for h, _, _ in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in models.items():
        label = f"{name} (ref)" if name == report.get("reference") else name
        cells = [label, str(m["embedding_dim"])]
        for h, get, fmt in cols:
            value = get(m)
            text = fmt.format(value)
            cells.append(f"**{text}**" if len(models) > 1 and text == fmt.format(best[h]) else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_rigour(report: dict) -> list[str]:
    """Markdown sections on noise: intervals over evaluation seeds, groups of networks trained
    with different seeds, and the paired comparisons with the controls (empty when none)."""
    models, targets = report["models"], report["targets"]
    out: list[str] = []
    seeds = report.get("seeds") or [report["seed"]]
    if len(seeds) > 1:
        out += [f"Each cell is the mean over {len(seeds)} evaluation seeds ({seeds[0]}.."
                f"{seeds[-1]}: split, per-class cap, probe validation); intervals below.", "",
                "## Intervals over evaluation seeds (top-1 %, "
                f"{100 * report.get('confidence', 0.95):.0f}% t interval)", ""]
        out += _interval_table(
            {n: {t: (100 * r["top1"], *[100 * v for v in r["top1_interval"]])
                 for t, r in m["targets"].items()} for n, m in models.items()}, list(targets))
        out.append("")
    if report.get("groups"):
        out += [f"## Groups: networks trained with different seeds (top-1 %, mean over members, "
                f"{100 * report.get('confidence', 0.95):.0f}% t interval)", ""]
        out += _interval_table(
            {g: {**{t: (100 * v["mean"], 100 * v["low"], 100 * v["high"])
                    for t, v in info["targets"].items()},
                 "mean": (100 * info["mean"]["mean"], 100 * info["mean"]["low"],
                          100 * info["mean"]["high"])}
             for g, info in report["groups"].items()}, [*targets, "mean"],
            members={g: info["members"] for g, info in report["groups"].items()})
        out.append("")
    if report.get("comparisons"):
        out += ["## Paired comparisons with the controls (top-1 points)", "",
                "Difference and its interval; **\\*** marks a difference larger than the noise "
                "(interval excludes 0). Method per row: paired t over evaluation seeds or over "
                "members (member i with member i), t over a group's members against one "
                "network, Welch's t for groups of different sizes, or a paired bootstrap over "
                "test images (one model, one seed per side: test-set noise only).", ""]
        header = ["model - control", *targets, "mean", "method"]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for c in report["comparisons"]:
            cells = [f"{c['model']} - {c['control']}"]
            cells += [_fmt_diff(c["targets"][t]) for t in targets] + [_fmt_diff(c["mean"]),
                                                                       c["mean"]["method"]]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return out


def render_markdown(report: dict) -> str:
    models, targets = report["models"], report["targets"]
    out = ["# Universality evaluation", "",
           f"Probe: `{report['probe']}` (regularisation chosen on a validation split, refit on "
           f"train+val, test scored once); seed {report['seed']}. Cells: top-1 accuracy (%) "
           "on each target's test side; best per column in bold.", ""]
    if report.get("reference"):
        out += [f"mNRG / aNRG: x100 median / mean over targets of the normalised relative gain "
                f"(s - s_ref) / (100 - s_ref), relative to **{report['reference']}**.", ""]
    out += [render_table(report), ""]
    out += render_rigour(report)
    out += ["## Mean per-class accuracy (%)", ""]
    header = ["model"] + list(targets)
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in models.items():
        out.append("| " + " | ".join([name] + [f"{100 * m['targets'][t]['mean_per_class']:.1f}"
                                               for t in targets]) + " |")
    out += ["", "## Probe and embedding details", "",
            "| model | target | C or k | n_train | n_test | dropped | images/s | provider | cached |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        for t, r in m["targets"].items():
            dropped = r["dropped"]["train"] + r["dropped"]["test"]
            out.append(f"| {name} | {t} | {_fmt_param(r)} | {r['n_train']} | {r['n_test']} | "
                       f"{dropped} | {r['images_per_s']:.0f} | {r.get('provider') or '?'} | "
                       f"{'yes' if r['cached'] else 'no'} |")
    out += ["", "## Targets", "",
            "| target | spec | split | train | test | classes |", "|---|---|---|---|---|---|"]
    for t, info in targets.items():
        split = info["split"]
        if split == "stratified":
            split += f" ({100 * info['test_fraction']:.0f}% test, seed {info['seed']})"
        if info.get("max_per_class"):
            split += f", at most {info['max_per_class']}/class"
        out.append(f"| {t} | `{info['spec']}` | {split} | {info['n_train']} | {info['n_test']} | "
                   f"{info['n_classes']} |")
    v = report.get("versions", {})
    out += ["", f"Created {report.get('created', '')} with " +
            ", ".join(f"{k} {v[k]}" for k in ("python", "numpy", "onnxruntime", "scikit-learn")
                      if k in v) + f"; {v.get('platform', '')}, {v.get('cpus', '?')} CPUs.", ""]
    return "\n".join(out)


def plot_report(report: dict, path: str) -> None:
    """Grouped bars of top-1 per target for each model, plus mean accuracy and mNRG panels."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models, targets = report["models"], list(report["targets"])
    names = list(models)
    has_ref = bool(report.get("reference"))
    comparisons = report.get("comparisons") or []
    widths = ([max(3, 1.2 * len(targets)), 1.6] + ([1.6] if has_ref else [])
              + ([4.0] if comparisons else []))
    height = max(4.2, 0.28 * len(comparisons) + 1.5)     # one readable line per comparison
    fig, axes = plt.subplots(1, len(widths), figsize=(sum(widths) + 2, height),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    axes = axes[0]
    # distinct colours for up to 20 models (tab10 repeats after 10), evenly spread beyond
    colours = (plt.get_cmap("tab10")(np.arange(len(names))) if len(names) <= 10 else
               plt.get_cmap("tab20")(np.arange(len(names))) if len(names) <= 20 else
               plt.get_cmap("turbo")(np.linspace(0.05, 0.95, len(names))))
    bar = 0.8 / len(names)
    x = np.arange(len(targets))
    whiskers = bar_intervals(report)
    for i, name in enumerate(names):
        values, err = whiskers[name]
        bars = axes[0].bar(x + (i - (len(names) - 1) / 2) * bar, values[:-1], bar, label=name,
                           color=colours[i], yerr=err[:, :-1], capsize=2,
                           error_kw={"elinewidth": 0.8})
        axes[0].bar_label(bars, fmt="%.1f", fontsize=6, padding=2)
    axes[0].set_xticks(x, [t if len(t) <= 18 else t[:16] + ".." for t in targets],
                       rotation=20, ha="right")
    axes[0].set_ylabel("top-1 accuracy (%)")
    axes[0].set_ylim(0, 105)
    seeds = len(report.get("seeds") or [report.get("seed")])
    axes[0].set_title(f"per target ({report['probe']} probe)" + (
        f"; whiskers: {100 * report.get('confidence', 0.95):.0f}% interval over {seeds} seeds"
        if seeds > 1 else ""), fontsize=9)
    axes[0].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22),
                   ncol=min(4, len(names)), frameon=False)
    bars = axes[1].bar(np.arange(len(names)), [whiskers[n][0][-1] for n in names],
                       color=colours, yerr=np.hstack([whiskers[n][1][:, -1:] for n in names]),
                       capsize=3, error_kw={"elinewidth": 0.8})
    axes[1].bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    axes[1].set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    axes[1].set_ylim(0, 105)
    axes[1].set_title("mean accuracy (%)")
    if has_ref:
        bars = axes[2].bar(np.arange(len(names)), [models[n]["mnrg"] for n in names],
                           color=colours)
        axes[2].bar_label(bars, fmt="%+.1f", fontsize=7)
        axes[2].axhline(0, color="black", linewidth=0.8)
        axes[2].set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
        axes[2].set_title(f"mNRG vs {report['reference']}")
    if comparisons:
        ax = axes[-1]
        y = np.arange(len(comparisons))
        diffs = np.array([100 * c["mean"]["diff"] for c in comparisons])
        lows = np.array([100 * c["mean"]["low"] for c in comparisons])
        highs = np.array([100 * c["mean"]["high"] for c in comparisons])
        err = np.nan_to_num(np.vstack([diffs - lows, highs - diffs]))
        colour = ["tab:green" if c["mean"]["significant"] else "tab:gray" for c in comparisons]
        ax.errorbar(diffs, y, xerr=err, fmt="none", ecolor="black", capsize=3, lw=0.8)
        ax.scatter(diffs, y, color=colour, zorder=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, [f"{c['model']} - {c['control']}" for c in comparisons], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("mean top-1 difference (points)")
        ax.set_title(f"vs controls, {100 * report.get('confidence', 0.95):.0f}% interval "
                     "(green: beyond noise)", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    _write_atomic(path, buffer.getvalue())


def bar_intervals(report: dict) -> dict:
    """{model: (values, whiskers)} of the accuracy bars, in percent: values [T + 1] (each
    target, then the mean over targets), whiskers [2, T + 1] (below, above; 0 where a value
    has no interval: one seed). The mean's interval is the t interval of the mean over targets
    per seed, so it covers seed noise as the per-target ones do."""
    import numpy as np

    from .statistics import mean_interval

    targets, confidence = list(report["targets"]), report.get("confidence", 0.95)
    out = {}
    for name, m in report["models"].items():
        cells = [m["targets"][t] for t in targets]
        values = np.array([100 * c["top1"] for c in cells] + [100 * m["mean"]])
        lows, highs = values.copy(), values.copy()
        for j, c in enumerate(cells):
            if c.get("top1_interval"):
                lows[j], highs[j] = (100 * v for v in c["top1_interval"])
        per_seed = [c.get("seeds", {}).get("top1") for c in cells]
        if cells and all(p and len(p) > 1 for p in per_seed):
            stats = mean_interval(np.mean(np.asarray(per_seed, dtype=np.float64), axis=0),
                                  confidence, bounds=(0.0, 1.0))
            lows[-1], highs[-1] = 100 * stats["low"], 100 * stats["high"]
        whiskers = np.nan_to_num(np.vstack([values - lows, highs - values]))
        out[name] = (values, np.maximum(whiskers, 0.0))
    return out


def write_report(report: dict, out_dir: str) -> dict[str, str]:
    """Write report.json, report.md and report.png into `out_dir`; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {kind: os.path.join(out_dir, f"report.{kind}") for kind in ("json", "md", "png")}
    plot_report(report, paths["png"])
    _write_atomic(paths["md"], render_markdown(report).encode())
    save_json_atomic(paths["json"], {**report, "files": paths})
    return paths


def _fmt_interval(mean: float, low: float, high: float) -> str:
    if low != low:      # NaN: one value, no interval
        return f"{mean:.1f}"
    return f"{mean:.1f} [{low:.1f}, {high:.1f}]"


def _interval_table(rows: dict, columns: list[str], members: dict | None = None) -> list[str]:
    header = ["row", *columns] + (["members"] if members else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, cells in rows.items():
        row = [name] + [_fmt_interval(*cells[c]) for c in columns]
        if members:
            row.append(", ".join(members[name]))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _fmt_diff(d: dict) -> str:
    """A difference in points with its interval, starred when the interval excludes 0."""
    text = f"{100 * d['diff']:+.1f}"
    if d["low"] == d["low"]:
        text += f" [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
    return text + ("\\*" if d.get("significant") else "")


def _fmt_param(result: dict) -> str:
    """The probe's chosen hyper-parameter: C for logreg/svm, k for knn, '-' for ncm."""
    if result.get("C") is not None:
        return f"C={result['C']:.3g}"
    if result.get("k") is not None:
        return f"k={result['k']}"
    return "-"
