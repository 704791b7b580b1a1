"""Models and the embedding cache: model checks and fingerprints, cache keys, and the
embeddings of a target's two sides, from the cache (npz, no pickle) or through the pipeline."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np

from common.atomic import atomic_open
from common.description import ModelDescription

from .errors import EvaluationError
from .targets import TargetSplit

CACHE_FORMAT = 2        # bump when the cached arrays or the key change meaning (2: content)


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



def _provider(pipeline) -> str | None:
    for attr in ("provider_", "provider"):
        value = getattr(pipeline, attr, None)
        if value:
            return value if isinstance(value, str) else str(value[0])
    return None

