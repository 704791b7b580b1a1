"""The results page (docs/results.md) from the study's records: the claims it checks are data
(rows by id, see plan.ROWS), its sentences are templates (prose.py), and this module only puts
the numbers into them. `build_page(records)` is the whole page; the study writes the records
(evaluation reports, parameters, timings, meta) and calls it."""
from __future__ import annotations

import json

import numpy as np

from . import prose
from .plan import (
    BY_LABEL,
    FASHION_REFERENCE,
    FASHION_TWO_SEEDS,
    REFERENCE,
    SOURCE,
    TARGET_STYLE,
    TWO_SEEDS,
    is_fashion_source_domain,
    label,
)
from .views import aggregate_counted, compare, merge_target_reports, page_view, paired

# The papers' figures the page sets ours beside: (what, paper figure, row id, measure); '-' marks
# a figure the papers do not give.
PAPER_CLAIMS = [
    ("MuCaLe-Net mNRG vs Net-S (TPAMI)", "+7.7", "mucale-sub", "mnrg"),
    ("FSFT mNRG vs Net-S (TPAMI)", "+4.0", "fsft", "mnrg"),
    ("MulDiP+FSFT mNRG vs Net-S (TPAMI)", "+9.8", "muldip-fsft", "mnrg"),
    ("SpeNet mean accuracy (BMVC)", "45.7", "specific", "mean"),
    ("FiNet mean accuracy (BMVC)", "49.2", "finer", "mean"),
    ("SpeFiNet mean accuracy (BMVC)", "52.1", "spefinet", "mean"),
    ("two-seed control mNRG vs Net-S (not in the papers)", "-", "two-seeds", "mnrg"),
    ("random weights mNRG vs Net-S (not in the papers)", "-", "random", "mnrg"),
]
# Gains the discussion checks against Net-S and a same-size control: (row, control, as named).
SIZE_CLAIMS = [("mucale-sub", "two-seeds", "MuCaLe-Net (specific + subcategory)"),
               ("mucale-cat", "two-seeds", "MuCaLe-Net (specific + category)"),
               ("muldip", "three-seeds", "MulDiP-Net (three levels)"),
               ("spefinet", "two-seeds", "SpeFiNet")]
ALONE = [("fsft", "FSFT alone"), ("finer", "FiNet alone"),
         ("generic-subcategory", "Net-G subcategory alone"),
         ("generic-category", "Net-G category alone")]
SEED_CONTROLS = ["specific-seed1", "specific-seed2"]
F_ALONE = [("fashion-generic", "Net-G generic alone"), ("fashion-multilevel", "Multilevel joint")]


def _fmt(v, spec="{:.1f}"):
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else spec.format(v)


def _mnrg(model: dict) -> str:
    return _fmt(model["mnrg"], "{:+.1f}")


def discussion(models: dict, vs_control: dict) -> list[str]:
    """Templated sentences comparing methods with the reference and the controls."""
    out = []
    ref = label(REFERENCE)
    seeds = [compare(models, label(s), ref) for s in SEED_CONTROLS]
    noise = max(abs(c["mean"]) for c in seeds)
    out.append(prose.NOISE.format(
        diffs=" and ".join(f"{c['mean']:+.1f}" for c in seeds), noise=noise,
        largest=max(abs(d) for c in seeds for d in c["diffs"].values())))
    for row, control, name in SIZE_CLAIMS:
        row, control = label(row), label(control)
        c_ref, c_ctl = compare(models, row, ref), compare(models, row, control)
        verdict = ("none" if c_ref["mean"] <= noise else "levels"
                   if c_ctl["mean"] > noise and c_ctl["wins"] > c_ctl["n"] / 2 else "size")
        out.append(prose.CLAIM.format(
            label=name, ref_mean=c_ref["mean"], ref_wins=c_ref["wins"], ref_n=c_ref["n"],
            mnrg=_mnrg(models[row]), ctl_mean=c_ctl["mean"], control=control,
            ctl_wins=c_ctl["wins"], ctl_n=c_ctl["n"],
            mnrg_control=_mnrg(vs_control[row]), verdict=prose.VERDICT[verdict]))
    for row, name in ALONE:
        c = compare(models, label(row), ref)
        out.append(prose.ALONE.format(label=name, mean=c["mean"], wins=c["wins"], n=c["n"],
                                      mnrg=_mnrg(models[label(row)])))
    joint, combo = label("multilevel"), label("mucale-sub")
    out.append(prose.MULTILEVEL.format(
        ref=compare(models, joint, ref)["mean"], combo=compare(models, joint, combo)["mean"],
        combo_label=combo, dim=models[joint]["embedding_dim"],
        combo_dim=models[combo]["embedding_dim"]))
    rnd = compare(models, label("random"), ref)
    out.append(prose.RANDOM.format(mean=rnd["mean"], wins=rnd["wins"], n=rnd["n"]))
    lite0 = label("efficientnet-lite0")
    out.append(prose.LITE0.format(
        mean=compare(models, lite0, ref)["mean"],
        speed=_fmt(models[lite0].get("images_per_s"), "{:.0f}"),
        ref_speed=_fmt(models[ref].get("images_per_s"), "{:.0f}")))
    return out


def _paired(report: dict, model: str, control: str) -> str:
    """A paired comparison's mean difference, its interval and whether it exceeds the noise."""
    p = paired(report, model, control)
    interval = (prose.PAIRED_INTERVAL.format(**p) if p["has_interval"]
                else prose.PAIRED_NO_INTERVAL)
    return prose.PAIRED.format(diff=p["diff"], interval=interval, method=p["method"],
                               verdict=prose.PAIRED_VERDICT[bool(p["significant"])])


def _mean_of(accuracies: list, key: str) -> str:
    values = [a[key] for a in accuracies if a and a.get(key) is not None]
    return f"{100 * np.mean(values):.0f}%" if values else "n/a"


def _finer_splits(splits: list[dict]) -> str:
    return "; ".join(prose.F_SPLIT.format(
        run=s["run"], n_split=len(s["split"]), classes=s["classes"], pseudo=s["pseudo_classes"],
        all=s["finer_classes"],
        which=(": " + ", ".join(f"{leaf.split('/')[-1]} {k}" for leaf, k in s["split"].items())
               if s["split"] else "")) for s in splits)


def fashion_discussion(view: dict, counted: list[str], meta: dict) -> list[str]:
    """Templated sentences on the F arm: does Net-S learn, FiNet and its split, the other
    networks, the combinations against the 2-seed control."""
    f = meta["fashion"]
    models = {n: {**m, "targets": {t: m["targets"][t] for t in counted}}
              for n, m in view["models"].items()}
    ref, two = label(FASHION_REFERENCE), label(FASHION_TWO_SEEDS)
    rnd_label, finer = label("fashion-random"), label("fashion-finer")
    rnd = compare(models, ref, rnd_label)
    out = [prose.F_LEARN.format(
        train=_mean_of(f["specific_accuracy"], "train"),
        test=_mean_of(f["specific_accuracy"], "test"),
        emoji_train=_mean_of(f["emoji_specific_accuracy"], "train"), mean=rnd["mean"],
        wins=rnd["wins"], n=rnd["n"], paired=_paired(view, ref, rnd_label))]
    fin = compare(models, finer, ref)
    unsplit = not any(s["split"] for s in f["splits"])
    out.append(prose.F_FINET.format(
        min_size=f["finer_min_size"], splits=_finer_splits(f["splits"]),
        unsplit=prose.F_UNSPLIT if unsplit else "", mean=fin["mean"], wins=fin["wins"],
        n=fin["n"], mnrg=_mnrg(models[finer]), paired=_paired(view, finer, ref)))
    for row, name in F_ALONE:
        c = compare(models, label(row), ref)
        out.append(prose.F_ALONE.format(label=name, mean=c["mean"], wins=c["wins"], n=c["n"],
                                        mnrg=_mnrg(models[label(row)]),
                                        paired=_paired(view, label(row), ref)))
    combos = [n for n in view["models"]
              if n in BY_LABEL and not BY_LABEL[n].single and n != two]
    out.append(prose.F_COMBINATIONS.format(
        control=two, control_mean=100 * models[two]["mean"],
        items="; ".join(prose.F_COMBINATION.format(
            label=n, mean=compare(models, n, ref)["mean"], paired=_paired(view, n, two))
            for n in combos)))
    return out


def results_table(models: dict, targets: list[str], counted: list[str], vs_control: dict,
                  params: dict) -> list[str]:
    """One arm's table: top-1 per target (a target not in `counted` is shown and marked),
    then the aggregates the rows carry (over the counted targets), mNRG against the arm's
    2-seed control (`vs_control`), size and speed."""
    def header(t):
        return t if t in counted else f"{t} (source domain, not counted)"

    columns = ["network", "dim", "params"] + [header(t) for t in targets] + [
        "mean", "logit mean", "mNRG", "aNRG", "mNRG vs 2 seeds", "images/s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, m in models.items():
        cells = [name, str(m["embedding_dim"]), f"{params.get(name, 0) / 1e6:.2f}M"]
        cells += [f"{100 * m['targets'][t]['top1']:.1f}" for t in targets]
        cells += [f"{100 * m['mean']:.1f}", f"{m['logit_mean']:.2f}", _fmt(m["mnrg"], "{:+.1f}"),
                  _fmt(m["anrg"], "{:+.1f}"), _fmt(vs_control[name]["mnrg"], "{:+.1f}"),
                  _fmt(m.get("images_per_s"), "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def setup_section(report: dict, meta: dict, png_name: str) -> list[str]:
    """The title, how the page was made, the setup bullets and the figure."""
    targets = "; ".join(prose.TARGET.format(name=t, **i) for t, i in report["targets"].items())
    fields = dict(source=SOURCE, width=meta["width"], input_size=meta["input_size"],
                  epochs=meta["epochs"], lite0_size=meta["lite0"]["input_size"],
                  lite0_epochs=meta["lite0"]["epochs"], lite0_per_class=meta["lite0"]["per_class"],
                  seeds=meta["seeds"], style=TARGET_STYLE, targets=targets,
                  probe=report["probe"], max_per_class=report["settings"]["max_per_class"],
                  probe_params=report["probe_params"] or "default")
    return [prose.TITLE, "", prose.GENERATED.format(**meta), "", "## Setup",
            *[line.format(**fields) for line in prose.SETUP], "",
            prose.RESULTS, "", prose.FIGURE.format(png=png_name), ""]


def claims_table(models: dict) -> list[str]:
    lines = [prose.CLAIMS_TITLE, "", "| claim | paper | measured here |", "|---|---|---|"]
    for what, paper, row, key in PAPER_CLAIMS:
        v = models[label(row)][key]
        lines.append(f"| {what} | {paper} | "
                     + (_fmt(v, "{:+.1f}") if key == "mnrg" else _fmt(100 * v)) + " |")
    return lines + ["", prose.CLAIMS_NOTE, ""]


def times_section(timings: dict, report: dict) -> list[str]:
    totals = {kind: sum(t["seconds"] for k, t in timings.items() if k.startswith(kind))
              for kind in ("train", "export", "evaluate")}
    lines = ["", prose.TIMES_TITLE, "",
             prose.TIMES.format(totals=", ".join(f"{k} {v / 60:.1f} min"
                                                 for k, v in totals.items())), "",
             "| stage | seconds | |", "|---|---|---|"]
    for stage, t in timings.items():
        lines.append(f"| {stage} | {t['seconds']:.0f} | {'reused' if t['reused'] else ''} |")
    return lines + ["", prose.VERSIONS.format(versions=json.dumps(report.get("versions", {}))),
                    ""]


def results_page(report: dict, vs_control: dict, params: dict, timings: dict, meta: dict,
                 png_name: str, fashion: tuple[dict, dict] | None = None) -> str:
    """The page: the emoji arm (setup, table, noise, claims, discussion), then the Fashion-MNIST
    arm (`fashion`: its page view and its mNRG against its 2-seed control), then the times."""
    models, targets = report["models"], list(report["targets"])
    lines = setup_section(report, meta, png_name)
    lines += results_table(models, targets, targets, vs_control, params)
    lines += ["", prose.COST, "", *seed_section(report, meta), *claims_table(models),
              prose.DISCUSSION_TITLE, ""]
    lines += [f"- {s}" for s in discussion(models, vs_control)]
    if fashion is not None:
        lines += [""] + fashion_section(*fashion, params, meta)
    return "\n".join(lines + times_section(timings, report))


def seed_section(report: dict, meta: dict) -> list[str]:
    """Seed noise (intervals over replicates), paired comparisons with the controls, and what
    training said in the finer-class warning case."""
    from runtime.report import render_rigour
    out = [prose.SEEDS_TITLE, ""]
    if meta["seeds"] < 2:
        out += [prose.ONE_SEED, ""]
    out += render_rigour(report)
    check = meta.get("finer_check") or {}
    out += [prose.FINER_CHECK_TITLE, "",
            prose.FINER_CHECK.format(command=check.get("command", "?"),
                                     exit_status=check.get("exit_status", "?")), ""]
    out += [f"    {line}" for line in check.get("said") or [prose.FINER_CHECK_SILENT]]
    return out + [""]


def fashion_section(view: dict, vs_control: dict, params: dict, meta: dict) -> list[str]:
    """The Fashion-MNIST arm: setup, its table (fashion-mnist shown, not counted), a generated
    reading and its seed noise and paired comparisons."""
    from runtime.report import render_rigour
    f, models, targets = meta["fashion"], view["models"], list(view["targets"])
    counted = [t for t in targets if not is_fashion_source_domain(t)]
    shown = [t for t in targets if t not in counted]
    fields = dict(**f, width=meta["width"], input_size=meta["input_size"],
                  reference=label(FASHION_REFERENCE), control=label(FASHION_TWO_SEEDS),
                  counted=", ".join(f"`{t}`" for t in counted),
                  shown=prose.F_SHOWN.format(shown=", ".join(f"`{t}`" for t in shown))
                  if shown else ".")
    lines = [prose.F_TITLE, "", *[line.format(**fields) for line in prose.F_SETUP], ""]
    lines += results_table(models, targets, counted, vs_control, params)
    lines += ["", prose.F_READING_TITLE, ""]
    lines += [f"- {s}" for s in fashion_discussion(view, counted, meta)]
    rigour = render_rigour(view)
    if rigour:
        lines += ["", prose.F_SEEDS_TITLE, "",
                  prose.F_SEEDS_NOTE.format(
                      not_counted=f" (not {', '.join(shown)})." if shown else "."), ""]
        lines += [line.replace("## ", "#### ", 1) if line.startswith("## ") else line
                  for line in rigour]
    while lines[-1] == "":          # the page adds the blank line before the next section
        lines.pop()
    return lines


def arm_views(records: dict, rows: dict[str, list[str]]) -> dict:
    """The page views of both arms from the evaluation records: `report` (the emoji arm),
    `fashion_counted` / `fashion_source` (the F arm without and on its source domain); `rows`
    the page rows of each arm ("emoji", "fashion"), by display name, in page order."""
    from runtime.universality import aggregate_models
    counted = list(records["fashion_counted"]["targets"])
    merged = merge_target_reports(records["fashion_counted"], records.get("fashion_source"),
                                  list(records["report"]["targets"]))
    fashion_view = page_view(merged, rows["fashion"], label(FASHION_REFERENCE), counted=counted)
    report = page_view(records["report"], rows["emoji"], label(REFERENCE))
    return {"report": report,
            "vs_control": aggregate_models(report["models"], reference=label(TWO_SEEDS)),
            "fashion_view": fashion_view,
            "fashion_vs_control": aggregate_counted(fashion_view["models"],
                                                    label(FASHION_TWO_SEEDS), counted)}


def build_page(records: dict, rows: dict[str, list[str]], png_name: str,
               reading: str | None = None) -> tuple[str, dict]:
    """(page text, the arms' views) from the records (`report`, `fashion_counted`,
    `fashion_source`, `params`, `timings`, `meta`); a hand-written `reading` goes before the
    generated discussion."""
    views = arm_views(records, rows)
    text = results_page(views["report"], views["vs_control"], records["params"],
                        records["timings"], records["meta"], png_name,
                        fashion=(views["fashion_view"], views["fashion_vs_control"]))
    if reading is not None:
        text = text.replace(prose.READING_BEFORE, reading.rstrip() + "\n\n"
                            + prose.READING_BEFORE, 1)
    return text, views
