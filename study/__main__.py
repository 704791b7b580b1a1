"""`python -m study`: run the whole reproduction study and write the results page (see the
package docstring); `make study` runs it at `small`."""
from __future__ import annotations

import json
import os
import sys
import time

import click

from common.atomic import atomic_open
from common.description import save_json_atomic
from common.machine import machine_summary

from . import stages
from .page import build_page
from .plan import (
    PAIRS,
    ROWS,
    SCALES,
    SEEDLESS,
    SOURCE,
    fashion_data,
    in_fashion_arm,
    is_fashion_source_domain,
    replicate_name,
    study_plan,
    training_plan,
)
from .plots import plot_results
from .stages import ROOT, Timings, log
from .strong import STRONG_SCALES, strong_plan


def train_all(scale: str, seed: int, seeds: int, work: str, threads: int,
              timings: Timings) -> dict[str, str]:
    """Every training run of every replicate (finished ones reused): {run name: folder}."""
    runs = {}
    for replicate in range(seeds):
        for step in training_plan(scale, seed, replicate):
            t0 = time.perf_counter()
            runs[step.name] = os.path.join(work, "runs", step.name)
            did = stages.train_run(step, runs[step.name], threads)
            timings.record(f"train {step.name}", time.perf_counter() - t0, not did)
    return runs


def export_all(runs: dict[str, str], seeds: int, work: str,
               timings: Timings) -> dict[str, list[str]]:
    """Every page row exported, one model per replicate (up-to-date ones reused): {row label:
    model folders}; a seed-independent row is one model."""
    member_dirs: dict[str, list[str]] = {}
    for row in ROWS.values():
        member_dirs[row.label] = []
        for r in range(seeds):
            run_dirs = [runs[replicate_name(p, r)] for p in row.runs]
            if r and member_dirs[row.label] and all(p in SEEDLESS for p in row.runs):
                continue                     # the same seed-independent network again
            t0 = time.perf_counter()
            name = row.label if r == 0 else f"{row.label} r{r}"
            model_dir = os.path.join(work, "models", stages.slug(name))
            try:
                did = stages.export_model(run_dirs, model_dir)
            except ValueError as e:   # ExportError: the message says what and why
                raise click.ClickException(f"export of {name} failed: {e}")
            timings.record(f"export {name}", time.perf_counter() - t0, not did)
            member_dirs[row.label].append(model_dir)
    return member_dirs


def evaluate_arms(member_dirs: dict[str, list[str]], scale: str, work: str, threads: int,
                  seed: int, timings: Timings) -> dict:
    """The emoji arm on every target; the F arm on the targets it counts, and apart on its
    source domain (fashion-mnist: shown, never counted). Returns the three reports."""
    specs = SCALES[scale]["targets"]
    t0 = time.perf_counter()
    targets = [stages.resolve_target(t, work) for t in specs]
    timings.record("targets", time.perf_counter() - t0, False)

    def evaluate(arm_dirs: dict, arm_targets: list[str], out: str) -> dict:
        pairs = [p for p in PAIRS if p[0] in arm_dirs]
        return stages.evaluate_rows(arm_dirs, arm_targets, os.path.join(work, out), pairs,
                                    scale, threads, seed, os.path.join(work, "embeddings"))

    emoji_dirs = {n: d for n, d in member_dirs.items() if not in_fashion_arm(n)}
    fashion_dirs = {n: d for n, d in member_dirs.items() if in_fashion_arm(n)}
    t0 = time.perf_counter()
    report = evaluate(emoji_dirs, targets, "report")
    timings.record("evaluate", time.perf_counter() - t0, stages.fully_cached(report))
    t0 = time.perf_counter()
    source_domain = [t for spec, t in zip(specs, targets) if is_fashion_source_domain(spec)]
    counted = [t for t in targets if t not in source_domain]
    fashion_counted = evaluate(fashion_dirs, counted, "report-fashion")
    fashion_source = (evaluate(fashion_dirs, source_domain, "report-fashion-source-domain")
                      if source_domain else None)
    timings.record("evaluate fashion", time.perf_counter() - t0,
                   stages.fully_cached(fashion_counted)
                   and stages.fully_cached(fashion_source or {}))
    return {"report": report, "fashion_counted": fashion_counted,
            "fashion_source": fashion_source}


def fashion_meta(scale: str, seeds: int, runs: dict[str, str]) -> dict:
    """What the page says about the F arm's runs: FiNet's split, Net-S's training accuracy."""
    replicates = range(seeds)

    def run(name: str, r: int) -> str:
        return runs[replicate_name(name, r)]

    return {**SCALES[scale]["fashion"], "data": fashion_data(scale),
            "splits": [stages.finer_split(run("fashion-finer", r)) for r in replicates],
            "specific_accuracy": [stages.final_accuracy(run("fashion-specific", r))
                                  for r in replicates],
            "emoji_specific_accuracy": [stages.final_accuracy(run("specific", r))
                                        for r in replicates]}


def write_page(records: dict, page: str, member_dirs: dict[str, list[str]]) -> str:
    """The page and its figure (a hand-written reading kept beside the page, PAGE-reading.md,
    goes into it); returns the figure's path."""
    rows = {"emoji": [n for n in member_dirs if not in_fashion_arm(n)],
            "fashion": [n for n in member_dirs if in_fashion_arm(n)]}
    png = os.path.splitext(page)[0] + ".png"
    reading_path = os.path.splitext(page)[0] + "-reading.md"
    reading = None
    if os.path.exists(reading_path):
        with open(reading_path) as f:
            reading = f.read()
    text, views = build_page(records, rows, os.path.basename(png), reading)
    os.makedirs(os.path.dirname(page), exist_ok=True)
    plot_results(views["report"], png)
    with atomic_open(page, "w") as f:
        f.write(text)
    records["views"] = views
    return png


def run_study(scale: str, work: str, page: str, threads: int, seed: int, seeds: int) -> None:
    """Every stage in order, each resumable; the records, then the page."""
    started = time.perf_counter()
    command = "python -m study " + " ".join(sys.argv[1:])
    os.makedirs(work, exist_ok=True)
    timings = Timings(os.path.join(work, "timings.json"))
    runs = train_all(scale, seed, seeds, work, threads, timings)
    finer_check = stages.run_finer_check(scale, seed, os.path.join(work, "runs", "finer-check"),
                                         threads)
    import torch
    torch.set_num_threads(threads)
    member_dirs = export_all(runs, seeds, work, timings)
    records = evaluate_arms(member_dirs, scale, work, threads, seed, timings)
    # parameters of each row's first replicate (replicates have the same architecture)
    records["params"] = {r.label: stages.count_parameters([runs[p] for p in r.runs])
                         for r in ROWS.values()}
    records["timings"] = timings.stages
    s = SCALES[scale]
    total_min = (time.perf_counter() - started) / 60
    records["meta"] = {
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_summary() + f", --threads {threads}", "scale": scale,
        "seeds": seeds, "finer_check": finer_check, "fashion": fashion_meta(scale, seeds, runs),
        "total_min": total_min,
        "stages_min": sum(t["seconds"] for t in timings.stages.values()) / 60,
        **{k: s[k] for k in ("epochs", "input_size", "width", "lite0")}}
    png = write_page(records, page, member_dirs)
    views = records.pop("views")
    save_json_atomic(os.path.join(work, "study.json"),
                     {"meta": records["meta"], "plan": study_plan(scale, seed, seeds),
                      "params": records["params"], "vs_two_seeds": views["vs_control"],
                      "fashion_vs_two_seeds": views["fashion_vs_control"],
                      "timings": timings.stages})
    log(f"wrote {page} and {png} ({total_min:.1f} min)")


def _strong_meta(scale: str, seeds: int, records: dict, records_dir: str) -> dict:
    """What the strong section says about how it was made (from the records' own timings)."""
    s = STRONG_SCALES[scale]
    seconds = [r.get("seconds", {}) for r in records.values()]

    def total(kind: str) -> float:
        return sum(v for t in seconds for k, v in t.items() if k.startswith(kind)) / 60

    loads = [x for r in records.values() for x in r.get("load_average", [])] or [0.0]
    from .strong import FASHION
    return {"command": "python -m study " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine_summary(), "scale": scale, "seeds": seeds,
            "records": os.path.relpath(records_dir, ROOT), "minutes": sum(
                total(k) for k in ("train", "export", "evaluate")), "train": total("train"),
            "export": total("export"), "evaluate": total("evaluate"),
            "load_low": min(loads), "load_high": max(loads), "cores": os.cpu_count(),
            "sizes": ", ".join(f"{k} {v} px" for k, v in s["sizes"].items()),
            "reinit": s["reinit"], "alpha": s["alpha"], "epochs": s["epochs"],
            "emoji": SOURCE, "emoji_per_class": s["emoji_per_class"],
            "fashion": FASHION.format(s["fashion_per_class"]),
            "counted": ", ".join(f"`{t}`" for t in s["counted"]),
            "shown": ", ".join(f"`{t}`" for t in s["source_domain"]),
            "max_per_class": s["max_per_class"]}


def write_strong_page(scale: str, seed: int, seeds: int, records_dir: str, page: str,
                      threads: int) -> None:
    """The strong section of `page` (and its figure) from the records found so far."""
    from .strong_page import arm_view, insert_section, plot, section
    from .strong_stages import load_records, load_speeds
    records = load_records(records_dir)
    speeds = load_speeds(records_dir)
    if not records:
        log(f"no records under {records_dir} yet: page left as it is")
        return
    view = arm_view(records, seeds, seed, len(STRONG_SCALES[scale]["counted"]), speeds)
    base = os.path.splitext(page)[0]
    png = base + "-strong.png"
    reading = None
    if os.path.exists(base + "-strong-reading.md"):
        with open(base + "-strong-reading.md") as f:
            reading = f.read()
    plot(view, png)
    meta = {**_strong_meta(scale, seeds, records, records_dir), "speeds": speeds,
            "threads": threads}
    insert_section(page, section(view, meta, os.path.basename(png), reading))
    log(f"wrote the strong section of {page} ({view['done']}/{view['total']} models)")


def run_strong_arm(scale: str, work: str, page: str, records_dir: str, threads: int, seed: int,
                   seeds: int, device: str, page_only: bool, speed_only: bool = False) -> None:
    """Every model of the strong arm, each resumable from its record; the page section is
    rewritten after each model, so a partial run always has a page."""
    from .strong_stages import run_strong
    if not (page_only or speed_only):
        run_strong(scale, seed, seeds, work, records_dir, threads, device,
                   after_each=lambda: write_strong_page(scale, seed, seeds, records_dir, page,
                                                        threads))
    elif speed_only:
        from .strong_stages import measure_row_speeds
        measure_row_speeds(work, records_dir, threads, device, scale=scale, seed=seed,
                           seeds=seeds)
    write_strong_page(scale, seed, seeds, records_dir, page, threads)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--scale", type=click.Choice(list(SCALES)), default="small", show_default=True,
              help="smoke (a dry run, minutes), pilot (~10 min), small (~60 min on 2 cores), "
                   "full (~2 h); per seed.")
@click.option("--work", default=None, help="Runs, models, reports [runs/study-SCALE].")
@click.option("--page", default=None, help="Results page [docs/results.md; pilot: WORK/results.md].")
@click.option("--threads", default=2, show_default=True, help="CPU threads for training and "
              "embedding.")
@click.option("--seed", default=0, show_default=True)
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(1, 5),
              help="Train every network (and control) with N seeds; the page then gives 95% "
                   "intervals over them and paired comparisons member by member (2-3 are "
                   "enough to see seed noise; time grows N-fold).")
@click.option("--plan-only", is_flag=True, help="Print the plan as JSON and stop.")
@click.option("--arm", type=click.Choice(["reproduction", "strong"]), default="reproduction",
              show_default=True, help="reproduction: the papers' recipes on small networks (the "
              "page's main part); strong: ImageNet Lite0/1/2, their tuning and the size "
              "controls (issue 21; its own section of the page).")
@click.option("--records", default=None, help="strong: the per-model records, the arm's "
              "resumable state (commit them) [docs/study-records/strong-SCALE; smoke/pilot: "
              "WORK/records].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="strong: where training and embedding run (a GPU machine: --device cuda "
                   "--scale full).")
@click.option("--page-only", is_flag=True, help="strong: write the page section from the "
              "records found, run nothing.")
@click.option("--speed-only", is_flag=True, help="strong: measure the throughput of the models "
              "found under WORK/models (interleaved), then write the page section.")
def main(scale, work, page, threads, seed, seeds, plan_only, arm, records, device, page_only,
         speed_only):
    """Run the whole reproduction study and write the results page.

    \b
    Examples:
      python -m study --scale small --seeds 2     # docs/results.md (~100 min on 2 cores)
      python -m study --scale smoke               # a dry run of every stage (minutes)
      python -m study --scale full --plan-only    # print the plan, run nothing
      python -m study --arm strong --scale small --seeds 3 --work /work/study-work/strong
                                                  # issue 21's arm (resumable from its records)
      python -m study --arm strong --scale full --seeds 3 --device cuda   # the same, on a GPU
    """
    if plan_only:
        plan = strong_plan(scale, seed, seeds) if arm == "strong" else study_plan(scale, seed,
                                                                                  seeds)
        click.echo(json.dumps(plan, indent=1))
        return
    dry = scale in ("smoke", "pilot")
    work = os.path.abspath(work or os.path.join(
        ROOT, "runs", f"study-{scale}" if arm == "reproduction" else f"study-strong-{scale}"))
    page = os.path.abspath(page or (os.path.join(work, "results.md") if dry
                                    else os.path.join(ROOT, "docs", "results.md")))
    if arm == "strong":
        records = os.path.abspath(records or (os.path.join(work, "records") if dry else
                                              os.path.join(ROOT, "docs", "study-records",
                                                           f"strong-{scale}")))
        run_strong_arm(scale, work, page, records, threads, seed, seeds, device, page_only,
                       speed_only)
        return
    run_study(scale, work, page, threads, seed, seeds)

if __name__ == "__main__":
    main(prog_name="python -m study")
