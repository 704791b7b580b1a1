"""Measure universality: frozen embeddings + linear probes on many targets, aggregated over them.

Library use (the reproduction study calls this):

    from runtime.evaluation import EvaluationPlan, run_plan, evaluate_models
    report = run_plan(EvaluationPlan(["models/spe", "models/mucale"],
                                     ["fashion-mnist", "digits", "my/folder"],
                                     out_dir="reports/cmp", reference="models/spe"))
    report.models["mucale"].mnrg
    evaluate_models([...], [...], "reports/cmp", reference="models/spe")["models"]  # as a dict

For each model and target: the target's `train`/`test` splits (else a seeded stratified split),
embeddings from the runtime pipeline (the model's deterministic evaluation transform, no
augmentation), cached per (model, target, split) as npz; a linear probe (`runtime.probes`; its
regularisation chosen on a validation split, then refit on train+val) scored once on test.
Accuracies in the report are fractions in [0, 1]; mNRG/aNRG are x100 (see `statistics`).

Modules: `targets` (splits), `cache` (model checks, fingerprints, the embedding cache),
`protocol` (one cell: fit, score, merge seeds), `statistics` (NRG, intervals, paired
differences), `compare` (groups and controls), `plan` (the settings), `results` (the typed
report), `run` (all of it), `report` (report.json/.md/.png). Never imports torch or click.
"""
from __future__ import annotations

from .cache import Embedded, cache_key, check_model_dir, embed_target, model_fingerprint
from .compare import compare_units
from .errors import EvaluationError, EvaluationParameterError
from .plan import DEVICES, PROBES, EvaluationPlan
from .protocol import probe_target
from .results import EvaluationReport, ModelResult
from .run import evaluate_models, run_plan
from .statistics import aggregate_models, anrg, mnrg
from .targets import DEFAULT_TEST_FRACTION, TargetSplit, content_digests, load_target, split_target

__all__ = [
    "DEFAULT_TEST_FRACTION", "DEVICES", "PROBES", "Embedded", "EvaluationError",
    "EvaluationParameterError", "EvaluationPlan", "EvaluationReport", "ModelResult",
    "TargetSplit", "aggregate_models", "anrg", "cache_key", "check_model_dir", "compare_units",
    "content_digests", "embed_target", "evaluate_models", "load_target", "mnrg",
    "model_fingerprint", "probe_target", "run_plan", "split_target",
]
