"""The strong-backbones arm's stages, one model at a time: train the runs a model needs, export
it, evaluate it on every target, and keep a small record (JSON: its results, the per-image hits
the paired bootstrap needs, FLOPs, parameters, the options that made it). The records are the
arm's resumable state: a model whose record matches the plan is never trained, exported or
evaluated again, so records committed to git let a later session (or another machine) carry on
without the models; the page is computed from the records alone."""
from __future__ import annotations

import base64
import json
import os
import time

import numpy as np

from common.description import save_json_atomic

from . import stages
from .stages import log
from .strong import (
    ROWS,
    STRONG_SCALES,
    StrongRow,
    export_args,
    member_name,
    run_name,
    strong_steps,
    targets,
)


def _hits_to_text(hits: np.ndarray) -> dict:
    return {"n": int(len(hits)),
            "bits": base64.b64encode(np.packbits(hits.astype(bool)).tobytes()).decode()}


def hits_from_text(record: dict) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(record["bits"]), dtype=np.uint8)
    return np.unpackbits(raw)[: record["n"]].astype(bool)


def needed_steps(row: StrongRow, scale: str, seed: int, replicate: int) -> list:
    """The training runs one replicate of a row needs, dependencies first."""
    steps = strong_steps(scale, seed, replicate)
    ordered: list = []

    def visit(run_id: str) -> None:
        step = steps[run_id]
        for dep in step.after:
            dep_id = next(i for i, s in steps.items() if s.name == dep)
            visit(dep_id)
        if step not in ordered:
            ordered.append(step)

    for run_id in row.runs:
        visit(run_id)
    return ordered


def plan_key(row: StrongRow, scale: str, seed: int, replicate: int) -> dict:
    """What a record must match to be reused: the runs' options and the evaluation's settings."""
    s = STRONG_SCALES[scale]
    counted, shown = targets(scale)
    return {"runs": {st.name: st.record() for st in needed_steps(row, scale, seed, replicate)},
            "export": export_args(row, scale),
            "members": [run_name(r, replicate) for r in row.runs],
            "targets": counted + shown, "max_per_class": s["max_per_class"],
            "probe_params": s["probe_params"], "seed": seed}


def record_path(records: str, name: str) -> str:
    return os.path.join(records, "models", stages.slug(name) + ".json")


def load_record(records: str, name: str, key: dict) -> dict | None:
    """A model's record when it matches `key` (None when absent or made by another plan)."""
    path = record_path(records, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    return record if record.get("key") == key else None


def _evaluate_one(name: str, model_dir: str, target_dirs: list[str], scale: str,
                  threads: int, seed: int, device: str, work: str) -> tuple[dict, dict]:
    """(the model's report entry, its per-image hits by target) on every target."""
    from runtime.evaluation.plan import EvaluationPlan
    from runtime.evaluation.run import run_plan
    s = STRONG_SCALES[scale]
    hits: dict = {}
    plan = EvaluationPlan([model_dir], target_dirs, None, names=[name],
                          max_per_class=s["max_per_class"],
                          probe_params=s["probe_params"] or None, threads=threads, seed=seed,
                          device=device, cache_dir=os.path.join(work, "embeddings"))
    try:
        report = run_plan(plan, hits=hits).to_dict()
    except ValueError as e:   # EvaluationError, DataError: the message says what and why
        import click
        raise click.ClickException(f"evaluation of {name} failed: {e}") from e
    entry = report["models"][name]
    return ({**entry, "target_info": report["targets"], "versions": report.get("versions")},
            {t: _hits_to_text(h) for (_, t, _), h in hits.items()})


def _flops(model_dir: str) -> int | None:
    from .cost import model_flops
    try:
        return model_flops(model_dir)
    except ValueError as e:             # a graph whose shapes are not static
        log(f"FLOPs of {model_dir} not counted: {e}")
        return None


def _input_size(model_dir: str) -> int:
    from common.model_dir import DESCRIPTION_FILE
    with open(os.path.join(model_dir, DESCRIPTION_FILE)) as f:
        return int(json.load(f)["preprocessing"]["input_size"])


def model_path(work: str, row: StrongRow, replicate: int) -> str:
    return os.path.join(work, "models", stages.slug(member_name(row, replicate)))


def build_model(row: StrongRow, replicate: int, scale: str, seed: int, work: str,
                threads: int, device: str) -> tuple[str, dict[str, float]]:
    """Train the runs one model needs (finished runs are kept) and export it: (its folder,
    the seconds each stage took)."""
    times: dict[str, float] = {}
    for step in needed_steps(row, scale, seed, replicate):
        t0 = time.perf_counter()
        if stages.train_run(step, os.path.join(work, "runs", step.name), threads, device=device):
            times[f"train {step.name}"] = round(time.perf_counter() - t0, 1)
    run_dirs = [os.path.join(work, "runs", run_name(r, replicate)) for r in row.runs]
    t0 = time.perf_counter()
    model_dir = model_path(work, row, replicate)
    if row.tap_of is None:
        stages.export_model(run_dirs, model_dir)
    else:
        stages.export_architecture(export_args(row, scale), model_dir)
    times["export"] = round(time.perf_counter() - t0, 1)
    return model_dir, times


def run_member(row: StrongRow, replicate: int, scale: str, seed: int, work: str,
               records: str, threads: int, device: str) -> dict:
    """One model of the arm, from training to its record (a matching record is returned as it
    is). Long work: training runs in child processes, resumable from their checkpoints."""
    name = member_name(row, replicate)
    key = plan_key(row, scale, seed, replicate)
    record = load_record(records, name, key)
    if record is not None:
        return record
    model_dir, times = build_model(row, replicate, scale, seed, work, threads, device)
    from .cost import model_parameters
    counted, shown = targets(scale)
    target_dirs = [stages.resolve_target(t, work) for t in counted + shown]
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    log(f"evaluate {name} on {len(target_dirs)} targets")
    entry, hits = _evaluate_one(name, model_dir, target_dirs, scale, threads, seed, device, work)
    times["evaluate"] = round(time.perf_counter() - t0, 1)
    record = {"key": key, "row": row.label, "row_id": row.id, "replicate": replicate,
              "result": entry, "hits": hits, "flops": _flops(model_dir),
              "input_size": _input_size(model_dir),
              "params": model_parameters(model_dir), "seconds": times,
              "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "evaluated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    save_json_atomic(record_path(records, name), record)
    return record


# The order models are made in: the untrained ones first (no training: minutes each), then
# the cheaper source (Fashion-MNIST) before the emoji one, so a partial run says the most.
RUN_ORDER = ["s-lite0", "s-lite1", "s-lite2", "s-lite0-taps", "s-lite1-taps", "s-lite2-taps",
             "s-random-twin", "s-fsft-fashion",
             "s-plus-fashion", "s-fsft-emoji", "s-plus-emoji", "s-plus-both",
             "s-fsft-fashion-flat", "s-plus-fashion-flat"]


def members_in_order(seeds: int) -> list[tuple[StrongRow, int]]:
    """Every model of the arm: replicate 0 of every row first (a partial run then covers every
    row once), then the other replicates of the seeded rows; rows in RUN_ORDER, then any
    other."""
    rows = [ROWS[i] for i in RUN_ORDER if i in ROWS] + [
        r for i, r in ROWS.items() if i not in RUN_ORDER]
    out = [(row, 0) for row in rows]
    out += [(row, r) for r in range(1, seeds) for row in rows if row.seeded]
    return out


def run_strong(scale: str, seed: int, seeds: int, work: str, records: str, threads: int,
               device: str, after_each=None) -> dict[str, dict]:
    """Every model of the arm (finished ones reused from their records): {model name: record};
    `after_each()` is called after each model newly evaluated (the page is rewritten there)."""
    import click
    os.makedirs(os.path.join(records, "models"), exist_ok=True)
    done, failed = {}, []
    for row, r in members_in_order(seeds):
        name = member_name(row, r)
        fresh = load_record(records, name, plan_key(row, scale, seed, r)) is None
        try:
            done[name] = run_member(row, r, scale, seed, work, records, threads, device)
        except click.ClickException as e:
            # an unattended run carries on with the other models; running again retries it
            log(f"{name} failed, going on with the others: {e.message}")
            failed.append(name)
            continue
        if fresh and after_each is not None:
            after_each()
    measure_row_speeds(work, records, threads, device, scale=scale, seed=seed, seeds=seeds)
    if after_each is not None:
        after_each()
    if failed:
        raise click.ClickException(f"{len(failed)} model(s) failed ({', '.join(failed)}); their "
                                   "errors are above; run the same command again to retry them")
    return done


def measure_row_speeds(work: str, records: str, threads: int, device: str, *,
                       scale: str | None = None, seed: int = 0, seeds: int = 1) -> dict:
    """The speed stage (study.strong_speed) over one model of every row: the first replicate
    found under WORK/models (the replicates share one graph, so any times the row); with
    `scale`, a row with none gets replicate 0 rebuilt (its runs trained, then exported), so
    that every row is timed in the same interleaved session."""
    from .strong_speed import measure_speeds
    models = {}
    for row in ROWS.values():
        found = [model_path(work, row, r) for r in range(seeds if row.seeded else 1)]
        found = [d for d in found if os.path.exists(os.path.join(d, "model.onnx"))]
        if not found and scale is not None:
            log(f"speed: rebuilding {member_name(row, 0)} to time it")
            found = [build_model(row, 0, scale, seed, work, threads, device)[0]]
        if found:
            models[row.label] = found[0]
    log(f"speed: {len(models)} models, interleaved")
    return measure_speeds(models, records, threads, "cuda" if device == "cuda" else "cpu")


def load_speeds(records: str) -> dict:
    path = os.path.join(records, "speed.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def load_records(records: str) -> dict[str, dict]:
    """Every model record under `records`, by model name (in the arm's order). Records of another
    plan are loaded too: the caller rewrites a page from what exists."""
    folder = os.path.join(records, "models")
    out = {}
    for file in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if file.endswith(".json"):
            with open(os.path.join(folder, file)) as f:
                record = json.load(f)
            row = ROWS.get(record.get("row_id", ""))
            if row is not None:
                out[member_name(row, record["replicate"])] = record
    order = {member_name(row, r): i for i, (row, r) in enumerate(members_in_order(5))}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], 1 << 30)))
