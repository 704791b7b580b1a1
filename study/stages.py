"""The study's stages: training in child processes (`cli.py train`), export, evaluation, and the
facts the page reads back from run folders. Every stage is resumable: finished work is reused."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import click

from common.description import save_json_atomic
from common.model_dir import DESCRIPTION_FILE, MODEL_FILE

from .plan import SCALES, SOURCE, STYLE_TARGETS, TrainStep, finer_check_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "cli.py")


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Timings:
    """Wall seconds per stage, persisted in WORK/timings.json (a resumed stage says 'reused')."""

    def __init__(self, path: str):
        self.path = path
        self.stages: dict[str, dict] = {}
        if os.path.exists(path):
            with open(path) as f:
                self.stages = json.load(f).get("stages", {})

    def record(self, stage: str, seconds: float, reused: bool) -> None:
        old = self.stages.get(stage, {})
        # a reused stage keeps the time it took when it was actually run
        self.stages[stage] = ({"seconds": old.get("seconds", 0.0), "reused": True} if reused
                              else {"seconds": round(seconds, 1), "reused": False})
        save_json_atomic(self.path, {"stages": self.stages})


def _child_env() -> dict:
    """The environment of a child `cli.py`: this checkout's packages first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


def train_run(step: TrainStep, run_dir: str, threads: int, device: str | None = None) -> bool:
    """Train one run with the CLI in a child process; False if model.pt was already there.

    The options are kept in RUN_DIR/study_args.json, so a run made with other options (an
    older version of the plan) is not silently reused."""
    options = step.record()
    record = os.path.join(run_dir, "study_args.json")
    if os.path.exists(record):
        with open(record) as f:
            if json.load(f) != options:
                raise click.ClickException(
                    f"{run_dir} was trained with other options than this plan's ({step.args}); "
                    "delete it (and the models made from it under WORK/models) and run again")
    if os.path.exists(os.path.join(run_dir, "model.pt")):
        return False
    args = [sys.executable, CLI, "train", "--data", step.data,
            "--out", run_dir, "--threads", str(threads)] + step.args
    if device:
        args += ["--device", device]
    if step.after:
        args += ["--from", os.path.join(os.path.dirname(run_dir), step.after[0])]
    os.makedirs(run_dir, exist_ok=True)
    save_json_atomic(record, options)
    if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        args.append("--resume")
    log("train " + step.name + ": " + " ".join(args[2:]))
    if subprocess.run(args, cwd=ROOT, env=_child_env()).returncode != 0:
        raise click.ClickException(
            f"training {step.name} failed (its output is above). Fix the cause and run the same "
            f"command again: finished runs are reused and {run_dir} resumes from its checkpoint "
            "if it has one (delete that folder to start it afresh).")
    return True


def run_finer_check(scale: str, seed: int, run_dir: str, threads: int,
                    data: str = SOURCE) -> dict:
    """Train FiNet with the paper's settings on the starved source (`data`) and keep what
    training said about splitting (it must warn or refuse; either is recorded, neither stops
    the study)."""
    record = os.path.join(run_dir, "finer_check.json")
    if os.path.exists(record):
        with open(record) as f:
            return json.load(f)
    specific = os.path.join(os.path.dirname(run_dir), "specific")
    args = [sys.executable, CLI, "train", "--data", data,
            "--out", run_dir, "--threads", str(threads), "--from", specific,
            *finer_check_args(scale, seed)]
    log("finer check: " + " ".join(args[2:]))
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        done = subprocess.run(args, cwd=ROOT, env=_child_env(), capture_output=True, text=True,
                              timeout=3600)
        output, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired:
        output, rc = "timed out after 3600 s", -1
    said = [line.strip() for line in output.splitlines()
            if any(w in line.lower() for w in ("split", "finer", "pseudo"))
            and "it/s" not in line][-6:]
    result = {"command": "python cli.py train --data " + data + " " + " ".join(
        finer_check_args(scale, seed)) + " --from WORK/runs/specific", "exit_status": rc,
        "said": said}
    os.makedirs(run_dir, exist_ok=True)
    save_json_atomic(record, result)
    return result


def export_model(run_dirs: list[str], model_dir: str) -> bool:
    """Export one run or a combination to ONNX; False if an up-to-date model.onnx was there
    (one older than any of its runs' model.pt is exported again)."""
    onnx_path = os.path.join(model_dir, MODEL_FILE)
    if os.path.exists(onnx_path) and all(
            os.path.getmtime(os.path.join(d, "model.pt")) <= os.path.getmtime(onnx_path)
            for d in run_dirs):
        return False
    from export.onnx_export import export_runs
    log(f"export {os.path.basename(model_dir)} <- {[os.path.basename(d) for d in run_dirs]}")
    export_runs(run_dirs, model_dir, overwrite=True)
    return True


def export_architecture(args: list[str], model_dir: str) -> bool:
    """Export a model straight from an architecture's weights (`cli.py export --arch ...`, e.g.
    multi-depth taps) in a child process; False if model.onnx was already there."""
    if os.path.exists(os.path.join(model_dir, MODEL_FILE)):
        return False
    cmd = [sys.executable, CLI, "export", *args, "--out", model_dir, "--overwrite"]
    log("export " + " ".join(cmd[2:]))
    if subprocess.run(cmd, cwd=ROOT, env=_child_env()).returncode != 0:
        raise click.ClickException(f"export of {model_dir} failed (its output is above)")
    return True


def resolve_target(spec: str, work: str) -> str:
    """A target as evaluate takes it. A cross-style emoji target is the built-in dataset it
    names (STYLE_TARGETS), reached through WORK/targets/NAME so that the reports and the page
    call it NAME; a folder an older study built there is used as it is (the same images)."""
    if spec not in STYLE_TARGETS:
        return spec
    from common.data import materialise_builtin
    link = os.path.join(work, "targets", spec)
    if not os.path.isdir(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        tmp = f"{link}.tmp-{os.getpid()}"
        os.symlink(materialise_builtin(STYLE_TARGETS[spec]), tmp, target_is_directory=True)
        os.replace(tmp, link)
    return link


def evaluate_rows(member_dirs: dict[str, list[str]], targets: list[str], out_dir: str,
                  pairs: list[tuple[str, str]], scale: str, threads: int, seed: int,
                  cache_dir: str) -> dict:
    """Evaluate page rows (one model each, or a group of replicates) on targets with linear
    probes; the report goes to `out_dir`."""
    from runtime.evaluate import evaluate_models
    s = SCALES[scale]
    singles = {n: d[0] for n, d in member_dirs.items() if len(d) == 1}
    groups = {n: d for n, d in member_dirs.items() if len(d) > 1}
    log(f"evaluate {sum(map(len, member_dirs.values()))} models on {len(targets)} targets")
    try:
        return evaluate_models(
            list(singles.values()), targets, out_dir, names=list(singles), groups=groups,
            pairs=pairs, max_per_class=s["max_per_class"],
            probe_params=s["probe_params"] or None, threads=threads, seed=seed, device="cpu",
            cache_dir=cache_dir)
    except ValueError as e:   # EvaluationError, DataError: the message says what and why
        raise click.ClickException(f"evaluation failed: {e}")


def fully_cached(report: dict) -> bool:
    """Whether an evaluation found every embedding in the cache (an empty dict: nothing ran)."""
    cache = report.get("cache", {"hits": 1, "misses": 0})
    return cache["hits"] > 0 and cache["misses"] == 0


def _description(run_dir: str) -> dict:
    with open(os.path.join(run_dir, DESCRIPTION_FILE)) as f:
        return json.load(f)


def finer_split(run_dir: str) -> dict:
    """The split FiNet made, read from its finer head's class names '<leaf>#<j>' (what training
    logged as 'finer: A of B classes split, into C pseudo-classes'): the classes split, with
    their number of clusters."""
    head = next(h for h in _description(run_dir)["heads"] if h["name"].endswith("-finer"))
    clusters: dict[str, int] = {}
    for name in head["classes"]:
        leaf = name.rsplit("#", 1)[0]
        clusters[leaf] = clusters.get(leaf, 0) + 1
    split = {leaf: k for leaf, k in clusters.items() if k > 1}
    return {"run": os.path.basename(run_dir), "classes": len(clusters), "split": split,
            "pseudo_classes": sum(split.values()), "finer_classes": len(head["classes"])}


def final_accuracy(run_dir: str) -> dict | None:
    """The last epoch's training and source-test accuracy of a run's leaf head (None when it was
    not trained: epochs 0)."""
    metrics = _description(run_dir).get("extra", {}).get("final_metrics") or {}
    if not metrics.get("train_acc"):
        return None
    head = list(metrics["train_acc"])[-1]
    return {"run": os.path.basename(run_dir), "head": head, "train": metrics["train_acc"][head],
            "test": (metrics.get("eval_acc") or {}).get(head)}


def count_parameters(run_dirs: list[str]) -> int:
    """Backbone parameters (heads are not used for embeddings) summed over the runs."""
    import torch
    total = 0
    for d in run_dirs:
        state = torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True)
        total += sum(v.numel() for k, v in state.items() if k.startswith("backbone.")
                     and v.is_floating_point() and "running_" not in k)
    return total


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")
