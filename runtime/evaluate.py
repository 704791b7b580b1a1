"""Measure universality: frozen embeddings + linear probes on many targets, aggregated over them.

Library use (the reproduction study calls this):

    from runtime.evaluate import evaluate_models
    report = evaluate_models(["models/spe", "models/mucale"], ["fashion-mnist", "digits", "my/folder"],
                             out_dir="reports/cmp", reference="models/spe")
    report["models"]["mucale"]["mnrg"]

For each model and target: the target's `train`/`test` splits (else a seeded stratified split),
embeddings from the runtime pipeline (the model's deterministic evaluation transform, no
augmentation), cached per (model, target, split) as npz; a linear probe (`runtime.probes`; its
regularisation chosen on a validation split, then refit on train+val) scored once on test.
Accuracies in the report are fractions in [0, 1]; mNRG/aNRG are x100 (see runtime.universality).
Never imports torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import click
import numpy as np

from common.atomic import atomic_open
from common.data import DataError, ImageDataset, load_dataset, stratified_split
from common.data import cache_dir as unirep_cache_dir
from common.description import ModelDescription
from common.errors import UserError
from runtime.cli.options import PipelineOptions, pipeline_options

from .universality import aggregate_models, mean_per_class_accuracy, top1_accuracy

if TYPE_CHECKING:  # imported where used: the pipeline loads onnxruntime
    from .pipeline import FeaturePipeline

PROBES = ("logreg", "svm")
DEFAULT_TEST_FRACTION = 0.3
CACHE_FORMAT = 2        # bump when the cached arrays or the key change meaning (2: content)


class EvaluationError(UserError, ValueError):
    """Evaluation cannot run as asked; the message says what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------
# Targets and their splits

@dataclass
class TargetSplit:
    """The images and leaf-class labels of a target's train and test sides, and how they were made."""

    name: str
    spec: str
    classes: list[str]
    train_paths: list[str]
    train_labels: np.ndarray
    test_paths: list[str]
    test_labels: np.ndarray
    info: dict = field(default_factory=dict)
    _hashes: dict = field(default_factory=dict, repr=False, compare=False)

    def selection_hash(self, root: str) -> str:
        """`_selection_hash`, computed once per target (every model's cache key needs it)."""
        if root not in self._hashes:
            self._hashes[root] = self._selection_hash(root)
        return self._hashes[root]

    def _selection_hash(self, root: str) -> str:
        """Hash of exactly which files sit on which side with which label, and of their bytes:
        a file replaced by another of the same name and size (even with its old mtime) changes
        it, so cached embeddings are never stale."""
        h = hashlib.sha256()
        for side, paths, labels in (("train", self.train_paths, self.train_labels),
                                    ("test", self.test_paths, self.test_labels)):
            for p, y, digest in zip(paths, labels, content_digests(paths)):
                h.update(f"{side}\0{os.path.relpath(p, root)}\0{int(y)}\0{digest}\n".encode())
        return h.hexdigest()[:16]


def _file_digest(path: str) -> str:
    """SHA-256 of a file's bytes, or a marker naming why it cannot be read (the pipeline then
    reports that image as failed; the marker keeps the key stable until the file is fixed)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        return f"unreadable:{type(e).__name__}"
    return h.hexdigest()


def content_digests(paths: list[str], threads: int = 4) -> list[str]:
    """Content hashes of many files, in input order. Reading dominates and hashlib releases the
    GIL, so a few threads overlap the reads (a 60,000-image target takes seconds, far less than
    embedding it)."""
    if len(paths) < 64:
        return [_file_digest(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(_file_digest, paths, chunksize=256))


def _cap_per_class(indices: np.ndarray, labels: np.ndarray, max_per_class: int | None,
                   rng: np.random.Generator) -> np.ndarray:
    if not max_per_class:
        return indices
    keep = [rng.permutation(indices[labels[indices] == c])[:max_per_class]
            for c in np.unique(labels[indices])]
    return np.sort(np.concatenate(keep)) if keep else indices


def split_target(dataset: ImageDataset, test_fraction: float = DEFAULT_TEST_FRACTION,
                 seed: int = 0, max_per_class: int | None = None, name: str | None = None
                 ) -> TargetSplit:
    """Train/test sides of a target at its leaf level.

    The dataset's own `train/` and `test/` splits are used when present ("given"); otherwise a
    seeded stratified split keeps `test_fraction` of every class for test ("stratified"; a class
    with 2 or more images has one on each side). `max_per_class` then keeps at most that many
    images per class on each side, chosen with `seed`.
    """
    if not 0.0 < test_fraction < 1.0:
        raise EvaluationError(f"test fraction must be between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(seed)
    if dataset.has_test_split and "train" in dataset.splits:
        kind = "given"
        sides = {}
        for side in ("train", "test"):
            labels = dataset.labels(side)
            idx = _cap_per_class(np.arange(len(labels)), labels, max_per_class, rng)
            paths = dataset.paths(side)
            sides[side] = ([paths[i] for i in idx], labels[idx])
    else:
        kind = "stratified"
        split = next(iter(dataset.splits))
        labels, paths = dataset.labels(split), dataset.paths(split)
        train_idx, test_idx = stratified_split(labels, test_fraction, seed)
        sides = {}
        for side, idx in (("train", train_idx), ("test", test_idx)):
            idx = _cap_per_class(idx, labels, max_per_class, rng)
            sides[side] = ([paths[i] for i in idx], labels[idx])
    (train_paths, train_labels), (test_paths, test_labels) = sides["train"], sides["test"]
    name = name or dataset.name
    if len(np.unique(train_labels)) < 2:
        raise EvaluationError(f"target {name!r}: the train side has fewer than 2 classes; a probe "
                              "needs at least 2 (give a folder with 2+ class folders)")
    if len(test_labels) == 0:
        raise EvaluationError(f"target {name!r}: the test side is empty; give more images per "
                              "class or a larger --test-fraction")
    info = {
        "split": kind,
        "test_fraction": test_fraction if kind == "stratified" else None,
        "seed": seed,
        "max_per_class": max_per_class,
        "n_train": len(train_paths),
        "n_test": len(test_paths),
        "n_classes": len(dataset.leaf_classes),
        "n_classes_train": int(len(np.unique(train_labels))),
        "n_classes_test": int(len(np.unique(test_labels))),
        "level": dataset.levels[-1].name,
        "fingerprint": dataset.fingerprint(),
        "root": dataset.root,
    }
    return TargetSplit(name, name, list(dataset.leaf_classes), train_paths, train_labels,
                       test_paths, test_labels, info)


def load_target(spec: str, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0,
                max_per_class: int | None = None, name: str | None = None) -> TargetSplit:
    """A built-in spec or ImageFolder path -> TargetSplit, with errors that name the target."""
    try:
        dataset = load_dataset(spec)
    except DataError as e:
        raise EvaluationError(f"target {spec!r}: {e}") from e
    target = split_target(dataset, test_fraction, seed, max_per_class, name or spec)
    target.spec = spec
    target.info["spec"] = spec
    return target


def _target_name(spec: str) -> str:
    return os.path.basename(os.path.normpath(spec)) if os.path.isdir(spec) else spec


def _dedupe(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


# ---------------------------------------------------------------------------------------------
# Models and the embedding cache

def model_file(model_dir: str, variant: str = "fp32") -> str:
    from common.model_dir import ModelError, variant_file
    try:
        return os.path.join(model_dir, variant_file(variant))
    except ModelError as e:
        raise EvaluationError(str(e)) from e


def check_model_dir(model_dir: str, variant: str = "fp32") -> ModelDescription:
    """The description of MODEL_DIR, once its variant's ONNX file has been checked (parses,
    matches the description); an EvaluationError naming the file otherwise."""
    from common.model_dir import ModelDir, ModelError
    try:
        md = ModelDir(model_dir)
        if md.model_file_ is not None:
            raise ModelError(f"{model_dir}: is a file, not a model folder; give the folder "
                             "written by `python cli.py export`")
        md.check_model(variant)
        return md.description
    except ModelError as e:
        raise EvaluationError(str(e)) from e


def model_fingerprint(model_dir: str, variant: str = "fp32") -> str:
    """Content hash of the ONNX graph and the description (which fixes the preprocessing)."""
    from common.model_dir import DESCRIPTION_FILE
    h = hashlib.sha256()
    for path in (model_file(model_dir, variant), os.path.join(model_dir, DESCRIPTION_FILE)):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def cache_key(model_fp: str, target: TargetSplit, fast_decode: bool = False) -> str:
    settings = {k: target.info[k] for k in ("split", "test_fraction", "seed", "max_per_class")}
    settings["fast_decode"] = bool(fast_decode)
    payload = json.dumps({"format": CACHE_FORMAT, "model": model_fp,
                          "target": target.info["fingerprint"], "settings": settings,
                          "selection": target.selection_hash(target.info["root"])},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-")[:40] or "x"


@dataclass
class Embedded:
    train: np.ndarray          # (n_train, D), NaN rows where embedding failed
    test: np.ndarray
    errors: dict[str, str]     # path -> message
    images_per_s: float
    seconds: float
    cached: bool
    provider: str | None = None   # execution provider that computed them


def _save_npz_atomic(path: str, **arrays) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def _load_cached(path: str, target: TargetSplit) -> Embedded | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            train, test = z["train"], z["test"]
            errors = json.loads(str(z["errors"]))
            speed, seconds = float(z["images_per_s"]), float(z["seconds"])
            provider = str(z["provider"]) or None
    except (OSError, KeyError, ValueError):
        return None     # unreadable or from an older layout: embed again
    if len(train) != len(target.train_paths) or len(test) != len(target.test_paths):
        return None
    return Embedded(train, test, errors, speed, seconds, cached=True, provider=provider)


def embed_target(pipeline_factory, target: TargetSplit, cache_path: str | None) -> Embedded:
    """Embeddings of both sides of a target, from the cache when there, else through the pipeline."""
    if cache_path and os.path.exists(cache_path):
        hit = _load_cached(cache_path, target)
        if hit is not None:
            return hit
    pipeline = pipeline_factory()
    paths = target.train_paths + target.test_paths
    start = time.perf_counter()
    result = pipeline.embed(paths)
    seconds = time.perf_counter() - start
    vectors = np.asarray(result.vectors, dtype=np.float32)
    if len(vectors) != len(paths):
        raise EvaluationError(f"the pipeline returned {len(vectors)} vectors for {len(paths)} images")
    errors = {paths[int(i)]: str(msg) for i, msg in (result.errors or {}).items()}
    n_train = len(target.train_paths)
    embedded = Embedded(vectors[:n_train], vectors[n_train:], errors,
                        len(paths) / max(seconds, 1e-9), seconds, cached=False,
                        provider=_provider(pipeline))
    if cache_path:
        _save_npz_atomic(cache_path, train=embedded.train, test=embedded.test,
                         errors=np.array(json.dumps(errors)),
                         images_per_s=np.array(embedded.images_per_s),
                         seconds=np.array(seconds), provider=np.array(embedded.provider or ""))
    return embedded


# ---------------------------------------------------------------------------------------------
# Probing

def _valid_rows(x: np.ndarray) -> np.ndarray:
    return np.isfinite(x).all(axis=1)


def probe_target(embedded: Embedded, target: TargetSplit, probe: str = "logreg", seed: int = 0,
                 probe_params: dict | None = None) -> dict:
    """Fit the probe on the train side, score it once on the test side; items that failed to
    embed are dropped from both X and y and counted. `probe_params` go to `make_probe`."""
    from .probes import make_probe

    ok_train, ok_test = _valid_rows(embedded.train), _valid_rows(embedded.test)
    x_train, y_train = embedded.train[ok_train], target.train_labels[ok_train]
    x_test, y_test = embedded.test[ok_test], target.test_labels[ok_test]
    if len(np.unique(y_train)) < 2 or len(y_test) == 0:
        first = next(iter(embedded.errors.values()), "no message")
        raise EvaluationError(f"target {target.name!r}: too few images could be embedded "
                              f"({len(y_train)} train, {len(y_test)} test); first error: {first}")
    estimator = make_probe(probe, **{"seed": seed, **(probe_params or {})})
    start = time.perf_counter()
    estimator.fit(x_train, y_train)
    fit_seconds = time.perf_counter() - start
    y_pred = np.asarray(estimator.predict(x_test))
    # per test image (failed ones count as wrong), for paired comparisons; popped from the report
    correct = np.zeros(len(target.test_labels), dtype=bool)
    correct[np.flatnonzero(ok_test)] = y_pred == y_test
    chosen_C = getattr(estimator, "C_", None)  # linear probes only
    return {
        "correct": correct,
        "top1": top1_accuracy(y_test, y_pred),
        "mean_per_class": mean_per_class_accuracy(y_test, y_pred),
        # ncm / knn have no regularisation strength; their chosen k or temperature is recorded.
        "C": float(chosen_C) if chosen_C is not None else None,
        "k": getattr(estimator, "k_", None),
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
        "dropped": {"train": int((~ok_train).sum()), "test": int((~ok_test).sum())},
        "errors": dict(list(embedded.errors.items())[:5]),
        "split": target.info["split"],
        "chance": float(1.0 / max(target.info["n_classes_train"], 1)),
        "images_per_s": round(embedded.images_per_s, 2),
        "provider": embedded.provider,
        "embed_seconds": float(embedded.seconds),
        "probe_seconds": round(fit_seconds, 3),
        "cached": embedded.cached,
    }


# ---------------------------------------------------------------------------------------------
# The whole evaluation

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


def evaluate_models(model_dirs: list[str], targets: list[str], out_dir: str | None,
                    reference: str | None = None, probe: str = "logreg", seed: int = 0,
                    cache_dir: str | None = None, device: str = "auto", batch_size: int = 32,
                    threads: int | None = None, names: list[str] | None = None,
                    test_fraction: float = DEFAULT_TEST_FRACTION,
                    max_per_class: int | None = None, use_cache: bool = True,
                    probe_params: dict | None = None, variant: str = "fp32",
                    fast_decode: bool = False, progress: bool = True, seeds: int = 1,
                    groups: dict[str, list[str]] | None = None,
                    controls: list[str] | None = None, confidence: float = 0.95,
                    pairs: list[tuple[str, str]] | None = None,
                    pipeline_args: dict | None = None) -> dict:
    """Evaluate every model on every target; write report.json/.md/.png to `out_dir` (if given)
    and return the report dict (layout in runtime.report).

    `reference` is a model dir (in `model_dirs` or not; it is evaluated too) that mNRG/aNRG are
    relative to. `cache_dir` defaults to $UNIREP_CACHE/embeddings; `use_cache=False` embeds
    afresh without reading or writing it. `probe_params` go to `runtime.probes.make_probe` (e.g.
    a shorter `Cs` sweep for a pilot; the default is the full protocol). Raises EvaluationError
    for unusable inputs. `variant` picks model.onnx / model.fp16.onnx / model.int8.onnx;
    `fast_decode=False` (default) decodes exactly as training evaluated, which the protocol asks.

    Rigour: `seeds=N` repeats every (model, target) with evaluation seeds seed..seed+N-1 (the
    split of targets without their own, the per-class cap and the probe's validation split), and
    reports the mean with a `confidence` t interval. `groups` {NAME: [MODEL_DIR, ...]} are
    networks trained alike with different seeds: each member is evaluated (as NAME[i]) and the
    group reports its mean and interval over members. `controls` (names of models or groups;
    default: the reference) are compared with every other model and group, per target and on
    the mean: paired t intervals over seeds or over members (member i with member i), Welch's
    interval for groups of different sizes, and a paired bootstrap over test images when each
    side is one model with one seed. A difference is "larger than seed noise" when its interval
    excludes 0. `pairs` [(model or group, control), ...] replaces the all-against-controls
    list when only some comparisons matter.
    """
    from tqdm import tqdm

    if probe not in PROBES:
        raise EvaluationError(f"unknown probe {probe!r}; choose from {', '.join(PROBES)}")
    groups = {str(k): [os.path.normpath(d) for d in v] for k, v in (groups or {}).items()}
    if not model_dirs and not groups:
        raise EvaluationError("give at least one model dir")
    if not targets:
        raise EvaluationError("give at least one target (--target DATA)")
    if names and len(names) != len(model_dirs):
        raise EvaluationError(f"{len(names)} names for {len(model_dirs)} model dirs; give one "
                              "--name per model dir, in the same order")
    check_options(probe=probe, probe_params=probe_params, seeds=seeds, batch_size=batch_size,
                  threads=threads, device=device, max_per_class=max_per_class,
                  confidence=confidence, groups=groups)
    model_dirs = [os.path.normpath(d) for d in model_dirs]
    model_names = list(names) if names else [os.path.basename(os.path.abspath(d)) for d in model_dirs]
    reference_name = None
    if reference is not None:
        reference = os.path.normpath(reference)
        same = [i for i, d in enumerate(model_dirs)
                if os.path.exists(d) and os.path.exists(reference)
                and os.path.samefile(d, reference)]
        if same:
            reference_name = _dedupe(model_names)[same[0]]
        else:
            model_dirs.append(reference)
            model_names.append(os.path.basename(os.path.abspath(reference)))
    model_names = _dedupe(model_names)
    if reference is not None and reference_name is None:
        reference_name = model_names[-1]
    clash = sorted(set(groups) & set(model_names))
    if clash:
        raise EvaluationError(f"group name(s) {clash} are also model names; rename the group")
    members = {g: [f"{g}[{i}]" for i in range(len(dirs))] for g, dirs in groups.items()}
    for g, dirs in groups.items():
        model_names += members[g]
        model_dirs += dirs
    controls = list(controls) if controls else ([reference_name] if reference_name else [])
    unknown = [c for c in [*controls, *(x for pair in pairs or [] for x in pair)]
               if c not in model_names and c not in groups]
    if unknown:
        raise EvaluationError(f"control(s) {unknown} are neither a model name nor a group; "
                              f"choose from {sorted(set(model_names) | set(groups))}")

    # Check everything before the long work (and before the cache), so a typo fails in a second.
    descriptions = {name: check_model_dir(d, variant) for name, d in zip(model_names, model_dirs)}
    target_names = _dedupe([_target_name(t) for t in targets])
    seed_list = list(range(seed, seed + int(seeds)))
    datasets = {}
    for name, spec in zip(target_names, targets):
        try:
            datasets[name] = load_dataset(spec)
        except DataError as e:
            raise EvaluationError(f"target {spec!r}: {e}") from e
    splits: dict[tuple[str, int], TargetSplit] = {}
    for (name, spec), s in ((ns, s) for ns in zip(target_names, targets) for s in seed_list):
        split = split_target(datasets[name], test_fraction, s, max_per_class, name)
        split.spec = spec
        split.info["spec"] = spec
        splits[name, s] = split

    cache_dir = cache_dir or os.path.join(unirep_cache_dir(), "embeddings")
    counters = {"hits": 0, "misses": 0}
    models: dict[str, dict] = {}
    correct: dict[tuple[str, str, int], np.ndarray] = {}   # per-image hits, for the bootstrap
    bar = tqdm(total=len(model_names) * len(target_names) * len(seed_list), desc="evaluate",
               unit="pair", disable=not progress, leave=False)
    for model_name, model_dir in zip(model_names, model_dirs):
        desc = descriptions[model_name]
        fingerprint = model_fingerprint(model_dir, variant)
        entry = models[model_name] = {
            "model_dir": os.path.abspath(model_dir), "embedding_dim": int(desc.feature_dim),
            "architecture": desc.architecture, "method": desc.method,
            "fingerprint": fingerprint, "targets": {}}
        pipeline: list[FeaturePipeline] = []   # made on the first cache miss, closed before the next model

        def factory(model_dir=model_dir, pipeline=pipeline):
            if not pipeline:
                from .pipeline import FeaturePipeline
                pipeline.append(FeaturePipeline(model_dir, device=device, threads=threads,
                                                batch_size=batch_size, variant=variant,
                                                fast_decode=fast_decode,
                                                **(pipeline_args or {})))
            return pipeline[0]

        try:
            for target_name in target_names:
                per_seed = []
                for s in seed_list:
                    bar.set_postfix_str(f"{model_name} on {target_name}, seed {s}")
                    target = splits[target_name, s]
                    cache_path = None
                    if use_cache:
                        key = cache_key(fingerprint, target, fast_decode)
                        cache_path = os.path.join(
                            cache_dir, f"{fingerprint}-{_slug(target_name)}-{key}.npz")
                    embedded = embed_target(factory, target, cache_path)
                    counters["hits" if embedded.cached else "misses"] += 1
                    entry["embedding_dim"] = int(embedded.train.shape[1])
                    result = probe_target(embedded, target, probe, s, probe_params)
                    correct[model_name, target_name, s] = result.pop("correct")
                    per_seed.append({**result, "cache_file": cache_path})
                    bar.update()
                entry["targets"][target_name] = _merge_seeds(per_seed, seed_list, confidence)
        finally:
            for p in pipeline:
                getattr(p, "close", lambda: None)()
    bar.close()

    for name, agg in aggregate_models(models, reference_name).items():
        results = models[name]["targets"].values()
        models[name].update(agg)
        # images over seconds across targets (as measured when embedded, cached or not)
        models[name]["images_per_s"] = float(
            sum(r["n_train"] + r["n_test"] + sum(r["dropped"].values()) for r in results)
            / max(sum(r["embed_seconds"] for r in results), 1e-9))
    group_report = {g: _group_summary(models, names_, target_names, confidence)
                    for g, names_ in members.items()}
    if pairs is None:
        pairs = [(a, c) for c in controls
                 for a in [n for n in model_names if not _is_member(n, members)] + list(groups)
                 if a != c]
    comparisons = [compare_units(a, c, models, members, correct, target_names, seed_list,
                                 confidence, seed) for a, c in pairs]
    report = {
        "models": models,
        "groups": group_report,
        "comparisons": comparisons,
        "reference": reference_name,
        "targets": {name: {**splits[name, seed_list[0]].info, "seeds": seed_list}
                    for name in target_names},
        "probe": probe,
        "probe_params": {k: np.asarray(v).tolist() for k, v in (probe_params or {}).items()},
        "seed": seed,
        "seeds": seed_list,
        "confidence": confidence,
        "metric": "top1",
        "settings": {"test_fraction": test_fraction, "max_per_class": max_per_class,
                     "device": device, "batch_size": batch_size, "threads": threads,
                     "variant": variant, "fast_decode": fast_decode},
        "cache": {"dir": cache_dir if use_cache else None, **counters},
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if out_dir:
        from .report import write_report
        report["files"] = write_report(report, out_dir)
    return report


DEVICES = ("auto", "cpu", "cuda", "tensorrt")


def check_options(*, probe: str, probe_params: dict | None, seeds: int, batch_size: int,
                  threads: int | None, device: str, max_per_class: int | None,
                  confidence: float, groups: dict[str, list[str]]) -> None:
    """Refuse unusable options before anything is read, embedded or taken from the cache (a
    fully cached evaluation would otherwise never reach the code that rejects them)."""
    from .probes import make_probe

    if int(seeds) < 1:
        raise EvaluationError(f"seeds must be 1 or more, not {seeds}")
    if int(batch_size) < 1:
        raise EvaluationError(f"batch size must be 1 or more, not {batch_size}")
    if threads is not None and not 1 <= int(threads) <= 4 * (os.cpu_count() or 1):
        raise EvaluationError(f"threads must be between 1 and {4 * (os.cpu_count() or 1)} "
                              f"(4 x the cores), not {threads}")
    if device.split(":")[0] not in DEVICES:
        raise EvaluationError(f"unknown device {device!r}; choose from {', '.join(DEVICES)} "
                              "(cuda:N for a given GPU)")
    if max_per_class is not None and int(max_per_class) < 1:
        raise EvaluationError(f"max per class must be 1 or more, not {max_per_class}")
    if not 0.5 <= confidence < 1.0:
        raise EvaluationError(f"confidence must be in [0.5, 1), not {confidence}")
    for g, dirs in groups.items():
        if len(dirs) < 2:
            raise EvaluationError(f"group {g!r} has {len(dirs)} model; a group needs 2 or more "
                                  "(networks trained alike with different seeds)")
    try:
        estimator = make_probe(probe, **(probe_params or {}))
    except (TypeError, ValueError) as e:
        raise EvaluationError(f"probe parameters {probe_params}: {e}") from e
    from .probes import SWEEPS
    sweep = getattr(estimator, "sweep", SWEEPS[0])
    if sweep not in SWEEPS:
        raise EvaluationError(f"probe sweep must be one of {', '.join(SWEEPS)}, not {sweep!r}")


def _merge_seeds(per_seed: list[dict], seed_list: list[int], confidence: float) -> dict:
    """One target's result over seeds: the first seed's details, accuracies averaged, and the
    per-seed values with their t interval."""
    if len(per_seed) == 1:
        return per_seed[0]
    from .universality import mean_interval
    merged = dict(per_seed[0])
    for key in ("top1", "mean_per_class"):
        values = [r[key] for r in per_seed]
        merged[key] = float(np.mean(values))
        stats = mean_interval(values, confidence, bounds=(0.0, 1.0))
        merged[f"{key}_interval"] = [stats["low"], stats["high"]]
    merged["seeds"] = {"seed": seed_list, "top1": [r["top1"] for r in per_seed],
                       "mean_per_class": [r["mean_per_class"] for r in per_seed],
                       "C": [r["C"] for r in per_seed]}
    merged["embed_seconds"] = float(sum(r["embed_seconds"] for r in per_seed))
    merged["probe_seconds"] = round(sum(r["probe_seconds"] for r in per_seed), 3)
    merged["n_train"] = per_seed[0]["n_train"] * len(per_seed)   # for images/s over all seeds
    merged["n_test"] = per_seed[0]["n_test"] * len(per_seed)
    merged["dropped"] = {k: sum(r["dropped"][k] for r in per_seed) for k in ("train", "test")}
    merged["cached"] = all(r["cached"] for r in per_seed)
    return merged


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
    from .universality import mean_interval
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
    from .universality import bootstrap_difference, paired_difference, welch_difference

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


def _provider(pipeline) -> str | None:
    for attr in ("provider_", "provider"):
        value = getattr(pipeline, attr, None)
        if value:
            return value if isinstance(value, str) else str(value[0])
    return None


# ---------------------------------------------------------------------------------------------
# CLI

@click.command("evaluate")
@click.argument("model_dirs", nargs=-1, metavar="[MODEL_DIR ...]")
@click.option("--target", "-t", "targets", multiple=True, required=True, metavar="DATA",
              help="A target: a built-in (fashion-mnist, mnist, digits, emoji:...) or an "
                   "ImageFolder (leaf folder = class). Repeat for several.")
@click.option("--reference", "-r", metavar="MODEL_DIR",
              help="Model the mNRG/aNRG are relative to (typically the specific-only network); "
                   "evaluated too if not listed.")
@click.option("--probe", type=click.Choice(PROBES), default="logreg", show_default=True,
              help="logreg: multinomial logistic regression (Kornblith/CLIP); svm: one-vs-rest "
                   "linear SVM (the TPAMI paper).")
@click.option("--name", "names", multiple=True, metavar="NAME",
              help="Display name per MODEL_DIR, in order (default: folder names).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Report folder: report.json, report.md, report.png.")
@click.option("--test-fraction", default=DEFAULT_TEST_FRACTION, show_default=True, type=float,
              help="Test share of the seeded stratified split, for targets without train/ and test/.")
@click.option("--max-per-class", type=int, default=None,
              help="Keep at most N images per class on each side (seeded), for quick runs.")
@click.option("--seed", default=0, show_default=True, help="Seed of splits, subsampling and probes.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Embedding cache folder [default: $UNIREP_CACHE/embeddings].")
@click.option("--no-cache", is_flag=True, help="Embed afresh; neither read nor write the cache.")
@pipeline_options(decode="exact")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(min=1),
              help="Repeat each (model, target) with N evaluation seeds (split, per-class cap, "
                   "probe validation): mean and a 95% t interval per cell.")
@click.option("--group", "group_specs", multiple=True, metavar="NAME=DIR1,DIR2[,...]",
              help="Networks trained alike with different seeds, reported as one row (mean and "
                   "interval over members). Repeat for several groups.")
@click.option("--control", "controls", multiple=True, metavar="NAME",
              help="Model or group every other row is compared with (paired differences per "
                   "target, marked * when larger than seed noise) [default: the reference].")
@click.option("--sweep", type=click.Choice(["subsample", "full"]), default="subsample",
              show_default=True,
              help="Probe C sweep: on a stratified subsample then one fit on all rows (fast), "
                   "or every C on every row (the original protocol; slow on large targets).")
def evaluate(model_dirs, targets, reference, probe, names, out_dir, test_fraction, max_per_class,
             seed, cache_dir, no_cache, pipeline: PipelineOptions, seeds, group_specs, controls, sweep):
    """Measure universality: a linear probe per (model, target) on frozen embeddings.

    Each target uses its train/ and test/ splits, else a seeded stratified split (reported).
    The probe's regularisation is chosen on a validation split and refit on train+val; test is
    scored once. Per model: top-1 and mean per-class accuracy per target, their mean, Kornblith's
    mean logit and, with --reference, mNRG and aNRG (x100; 0 = as good as the reference).

    With --seeds N and --group NAME=DIR1,DIR2,... (networks trained with different seeds),
    each cell gets a 95% interval, and --control rows are compared with every other row:
    paired differences per target with a t interval (over seeds, or member i against member
    i), or a paired bootstrap over test images when both sides are one model and one seed.

    \b
    Examples:
      python cli.py evaluate models/spe models/mucale -t fashion-mnist -t digits \\
          -t ~/photos/flowers --reference models/spe --out reports/cmp
      python cli.py evaluate -t mnist -t digits --seeds 3 \\
          --group mucale=models/mucale-s0,models/mucale-s1,models/mucale-s2 \\
          --group twoseeds=models/spe2-s0,models/spe2-s1,models/spe2-s2 \\
          --control twoseeds --out reports/rigour
    """
    groups = {}
    for spec in group_specs:
        name, sep, dirs = spec.partition("=")
        members = [d for d in dirs.split(",") if d]
        if not sep or not name or len(members) < 2:
            raise click.BadParameter(f"{spec!r}: write NAME=DIR1,DIR2[,...] (2 or more model "
                                     "dirs trained alike with different seeds)",
                                     param_hint="--group")
        if name in groups:
            raise click.BadParameter(f"group {name!r} given twice", param_hint="--group")
        groups[name] = members
    try:
        report = evaluate_models(list(model_dirs), list(targets), out_dir, reference=reference,
                                 probe=probe, seed=seed, cache_dir=cache_dir,
                                 device=pipeline.device, batch_size=pipeline.batch_size,
                                 threads=pipeline.threads, names=list(names) or None,
                                 test_fraction=test_fraction, max_per_class=max_per_class,
                                 use_cache=not no_cache, variant=pipeline.variant,
                                 fast_decode=pipeline.fast_decode, seeds=seeds, groups=groups,
                                 controls=list(controls) or None,
                                 probe_params={"sweep": sweep},
                                 pipeline_args=dict(device_id=pipeline.device_id,
                                                    decode_threads=pipeline.decode_threads,
                                                    decode_processes=pipeline.decode_processes))
    except (EvaluationError, DataError) as e:
        raise click.UsageError(str(e)) from e
    from .report import render_table
    click.echo(render_table(report))
    for c in report["comparisons"]:
        m = c["mean"]
        interval = (f" [{100 * m['low']:+.1f}, {100 * m['high']:+.1f}]" if m["low"] == m["low"]
                    else "")
        click.echo(f"{c['model']} - {c['control']}: {100 * m['diff']:+.1f} points of mean "
                   f"top-1{interval} ({m['method']})"
                   + ("; larger than the noise" if m["significant"] else "; within the noise"))
    cache = report["cache"]
    click.echo(f"\nembeddings: {cache['hits']} from cache, {cache['misses']} computed")
    for path in report.get("files", {}).values():
        click.echo(f"wrote {path}")
