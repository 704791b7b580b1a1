"""Saved embeddings, read back: an `embed` output (FEATURES.npy + FEATURES.ids.json, or a folder
of Parquet shards) -> ids, vectors and what is known of the model that made them.

Rows that failed (an error, or a vector that is not finite) are left out and counted, so an
index or a probe sees only real embeddings.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from common.errors import UserError


class SavedEmbeddingsError(UserError, ValueError):
    """A path that is not a readable `embed` output; the message says what to pass."""


@dataclass
class SavedEmbeddings:
    ids: list[str]
    vectors: np.ndarray             # float32 [N, D], finite rows only
    model: dict = field(default_factory=dict)  # fingerprint, architecture, variant, dim, model_dir
    source: str = ""                # the path read
    dropped: int = 0                # failed or non-finite rows left out


def is_npy_output(path: str) -> bool:
    return path.endswith(".npy") and os.path.isfile(path)


def npy_sidecars(features_path: str) -> tuple[str, str, str]:
    """FEATURES.npy -> (FEATURES.ids.json, FEATURES.errors.json, FEATURES.model.json)."""
    stem = features_path[:-4] if features_path.endswith(".npy") else features_path
    return stem + ".ids.json", stem + ".errors.json", stem + ".model.json"


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SavedEmbeddingsError(f"{path}: cannot read the {what} ({e})") from e


def _from_npy(path: str) -> SavedEmbeddings:
    ids_path, _, model_path = npy_sidecars(path)
    if not os.path.exists(ids_path):
        raise SavedEmbeddingsError(f"{path}: no {os.path.basename(ids_path)} beside it; "
                                   "pass the output of `cli.py embed ... --out FEATURES.npy`")
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SavedEmbeddingsError(f"{path}: not a NumPy array file ({e})") from e
    ids = _read_json(ids_path, "ids")
    if vectors.ndim != 2 or not isinstance(ids, list) or len(ids) != len(vectors):
        raise SavedEmbeddingsError(f"{path}: {getattr(vectors, 'shape', '?')} rows and "
                                   f"{len(ids) if isinstance(ids, list) else '?'} ids in "
                                   f"{ids_path} do not line up")
    model = _read_json(model_path, "model record") if os.path.exists(model_path) else {}
    return _finite(SavedEmbeddings([str(i) for i in ids], vectors, model
                                   if isinstance(model, dict) else {}, path))


def _bulk_manifest(path: str) -> dict:
    """The bulk folder's manifest, wherever this version of runtime.bulk keeps its reader
    (runtime/bulk/manifest.py, or output.py before it)."""
    import importlib
    for module in ("runtime.bulk.manifest", "runtime.bulk.output"):
        try:
            load = importlib.import_module(module).load_manifest
        except (ImportError, AttributeError):
            continue
        return load(path) or {}
    return {}


def _from_parquet_folder(path: str) -> SavedEmbeddings:
    from runtime.bulk.output import read_output
    try:
        manifest = _bulk_manifest(path)
        ids, vectors, errors, _ = read_output(path)
    except ImportError as e:
        raise SavedEmbeddingsError(f"{path}: reading Parquet needs pyarrow: "
                                   "pip install 'unirep[bulk]'") from e
    model = dict(manifest.get("model") or {})
    if manifest.get("model_dir") and "model_dir" not in model:
        model["model_dir"] = manifest["model_dir"]
    ok = np.array([i not in errors for i in range(len(ids))], dtype=bool)
    saved = SavedEmbeddings([ids[i] for i in np.flatnonzero(ok)], vectors[ok], model, path,
                            int((~ok).sum()))
    return _finite(saved)


def _finite(saved: SavedEmbeddings) -> SavedEmbeddings:
    vectors = np.asarray(saved.vectors, dtype=np.float32)
    ok = np.isfinite(vectors).all(axis=1) if vectors.size else np.ones(len(vectors), bool)
    saved.dropped += int((~ok).sum())
    saved.vectors = np.ascontiguousarray(vectors[ok])
    saved.ids = [saved.ids[i] for i in np.flatnonzero(ok)]
    return saved


def load_saved_embeddings(path: str) -> SavedEmbeddings:
    """The finite rows of an `embed` output: FEATURES.npy (with its ids sidecar) or a folder
    of Parquet shards (a bulk job's output)."""
    if is_npy_output(path):
        return _from_npy(path)
    if os.path.isdir(path):
        return _from_parquet_folder(path)
    raise SavedEmbeddingsError(f"{path}: not an embed output; pass FEATURES.npy (with "
                               "FEATURES.ids.json beside it) or a folder of Parquet shards "
                               "written by `cli.py embed ... --out FOLDER`")
