"""Run an evaluation plan: check it, split the targets, embed (through the cache) and probe
every (model, target, seed), aggregate, compare, and write the report files."""
from __future__ import annotations

import os
import platform
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from common.data import DataError, load_dataset
from common.data import cache_dir as unirep_cache_dir

from .cache import _slug, cache_key, check_model_dir, embed_target, model_fingerprint
from .compare import _group_summary, compare_units
from .errors import EvaluationError
from .plan import EvaluationPlan, Rows
from .protocol import _merge_seeds, probe_target
from .results import EvaluationReport, ModelResult
from .statistics import aggregate_models
from .targets import TargetSplit, split_target

if TYPE_CHECKING:  # imported where used: the pipeline loads onnxruntime
    from runtime.pipeline import FeaturePipeline


def _versions() -> dict:
    import sklearn
    out = {"python": platform.python_version(), "numpy": np.__version__,
           "scikit-learn": sklearn.__version__, "machine": platform.machine(),
           "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import onnxruntime
        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out



def evaluate_models(model_dirs: list[str], targets: list[str], out_dir: str | None = None,
                    **settings: Any) -> dict:
    """Evaluate every model on every target; write report.json/.md/.png to `out_dir` (if given)
    and return the report as a dict (layout in runtime.evaluation.report). `settings` are the
    other fields of `EvaluationPlan` (reference, probe, seeds, groups, controls, ...), which
    documents them; raises EvaluationError for unusable inputs."""
    return run_plan(EvaluationPlan(list(model_dirs), list(targets), out_dir, **settings)).to_dict()


def run_plan(plan: EvaluationPlan, hits: dict | None = None) -> EvaluationReport:
    """The typed report of `plan` (its files written when `plan.out_dir` is set). `hits`, when
    given, receives the per-test-image hits {(model, target, seed): bool array} that the paired
    bootstrap uses (a caller that keeps per-model records compares them later)."""
    rows = plan.resolve()
    # Check everything before the long work (and before the cache), so a typo fails in a second.
    descriptions = {name: check_model_dir(d, plan.variant)
                    for name, d in zip(rows.model_names, rows.model_dirs)}
    splits = _split_targets(plan, rows)
    cache_dir = plan.cache_dir or os.path.join(unirep_cache_dir(), "embeddings")
    counters = {"hits": 0, "misses": 0}
    correct: dict[tuple[str, str, int], np.ndarray] = {} if hits is None else hits  # per image
    from tqdm import tqdm
    bar = tqdm(total=len(rows.model_names) * len(rows.target_names) * len(rows.seeds),
               desc="evaluate", unit="pair", disable=not plan.progress, leave=False)
    models = {name: _evaluate_model(plan, rows, name, model_dir, descriptions[name], splits,
                                    cache_dir, counters, correct, bar)
              for name, model_dir in zip(rows.model_names, rows.model_dirs)}
    bar.close()
    _aggregate(models, rows.reference)
    cells = {name: {"targets": m.targets} for name, m in models.items()}
    report = EvaluationReport(
        models=models,
        groups={g: _group_summary(cells, names, rows.target_names, plan.confidence)
                for g, names in rows.members.items()},
        comparisons=[compare_units(a, c, cells, rows.members, correct, rows.target_names,
                                   rows.seeds, plan.confidence, plan.seed) for a, c in rows.pairs],
        reference=rows.reference,
        targets={name: {**splits[name, rows.seeds[0]].info, "seeds": rows.seeds}
                 for name in rows.target_names},
        probe=plan.probe,
        probe_params={k: np.asarray(v).tolist() for k, v in (plan.probe_params or {}).items()},
        seed=plan.seed, seeds=rows.seeds, confidence=plan.confidence,
        settings={"test_fraction": plan.test_fraction, "max_per_class": plan.max_per_class,
                  "device": plan.device, "batch_size": plan.batch_size, "threads": plan.threads,
                  "variant": plan.variant, "fast_decode": plan.fast_decode},
        cache={"dir": cache_dir if plan.use_cache else None, **counters},
        versions=_versions(),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if plan.out_dir:
        from .report import write_report
        report.files = write_report(report.to_dict(), plan.out_dir)
    return report


def _split_targets(plan: EvaluationPlan, rows: Rows) -> dict[tuple[str, int], TargetSplit]:
    """Each target's sides for each evaluation seed, with errors that name the target."""
    datasets = {}
    for name, spec in zip(rows.target_names, plan.targets):
        try:
            datasets[name] = load_dataset(spec)
        except DataError as e:
            raise EvaluationError(f"target {spec!r}: {e}") from e
    splits: dict[tuple[str, int], TargetSplit] = {}
    for name, spec in zip(rows.target_names, plan.targets):
        for s in rows.seeds:
            split = split_target(datasets[name], plan.test_fraction, s, plan.max_per_class, name)
            split.spec = spec
            split.info["spec"] = spec
            splits[name, s] = split
    return splits


def _evaluate_model(plan: EvaluationPlan, rows: Rows, model_name: str, model_dir: str, desc,
                    splits: dict, cache_dir: str, counters: dict, correct: dict, bar
                    ) -> ModelResult:
    """One model on every target and seed; its pipeline is opened on the first cache miss and
    closed before the next model."""
    fingerprint = model_fingerprint(model_dir, plan.variant)
    entry = ModelResult(os.path.abspath(model_dir), int(desc.feature_dim), desc.architecture,
                        desc.method, fingerprint)
    pipeline: list[FeaturePipeline] = []

    def factory():
        if not pipeline:
            from runtime.pipeline import FeaturePipeline
            pipeline.append(FeaturePipeline(model_dir, device=plan.device, threads=plan.threads,
                                            batch_size=plan.batch_size, variant=plan.variant,
                                            fast_decode=plan.fast_decode,
                                            **(plan.pipeline_args or {})))
        return pipeline[0]

    try:
        for target_name in rows.target_names:
            per_seed = []
            for s in rows.seeds:
                bar.set_postfix_str(f"{model_name} on {target_name}, seed {s}")
                target = splits[target_name, s]
                cache_path = None
                if plan.use_cache:
                    key = cache_key(fingerprint, target, plan.fast_decode)
                    cache_path = os.path.join(
                        cache_dir, f"{fingerprint}-{_slug(target_name)}-{key}.npz")
                embedded = embed_target(factory, target, cache_path)
                counters["hits" if embedded.cached else "misses"] += 1
                entry.embedding_dim = int(embedded.train.shape[1])
                result = probe_target(embedded, target, plan.probe, s, plan.probe_params)
                correct[model_name, target_name, s] = result.pop("correct")
                per_seed.append({**result, "cache_file": cache_path})
                bar.update()
            entry.targets[target_name] = _merge_seeds(per_seed, rows.seeds, plan.confidence)
    finally:
        for p in pipeline:
            getattr(p, "close", lambda: None)()
    return entry


def _aggregate(models: dict[str, ModelResult], reference: str | None) -> None:
    """Mean, logit mean, mNRG/aNRG and images/s of every model, over its targets."""
    cells = {name: {"targets": m.targets} for name, m in models.items()}
    for name, agg in aggregate_models(cells, reference).items():
        m = models[name]
        m.mean, m.logit_mean, m.mnrg, m.anrg = (agg["mean"], agg["logit_mean"], agg["mnrg"],
                                                agg["anrg"])
        results = m.targets.values()
        # images over seconds across targets (as measured when embedded, cached or not)
        m.images_per_s = float(
            sum(r["n_train"] + r["n_test"] + sum(r["dropped"].values()) for r in results)
            / max(sum(r["embed_seconds"] for r in results), 1e-9))
