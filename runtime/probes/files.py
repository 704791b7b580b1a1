"""The probe file format: probe.npz (the arrays each probe class declares; loaded with
allow_pickle=False) + probe.json (kind, params, classes, scalar state, metadata), never pickle.
The loader finds the class by kind in the registry and lets the class check its own arrays."""
from __future__ import annotations

import inspect
import json
import math
import os
import shutil
from typing import Any

import numpy as np

from .base import PROBES, Probe
from .errors import ProbeFileError

PROBE_FORMAT = "unirep.probe"
PROBE_FORMAT_VERSION = 1


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _named_classes(probe: Probe, class_names) -> np.ndarray:
    """The probe's classes, or `class_names[c]` for integer classes c (labels fitted as indices
    into a dataset's class list): what `serve` and `probe predict` print."""
    classes = np.asarray(probe.classes_)
    if class_names is None:
        return classes
    names = [str(n) for n in class_names]
    if classes.dtype.kind not in "iu":
        if set(map(str, classes)) - set(names):
            raise ValueError(f"class_names: the probe's classes {list(map(str, classes))[:5]} "
                             "are names already, and not all of them are in class_names")
        return classes
    if classes.min() < 0 or classes.max() >= len(names):
        raise ValueError(f"class_names has {len(names)} names but the probe's classes run "
                         f"{classes.min()}..{classes.max()}; pass the list its labels index")
    return np.array([names[c] for c in classes])


def save_probe(probe: Probe, path_dir: str, metadata: dict | None = None, *,
               class_names=None) -> None:
    """Write path_dir/probe.npz + path_dir/probe.json atomically (a temp folder renamed into
    place). An existing folder is replaced only if it holds a probe (probe.json).
    `class_names` names integer classes (see `_named_classes`). The public `save_probe`
    (runtime/probes/saving.py) also records the backbone; this one writes what it is given."""
    if not hasattr(probe, "classes_"):
        raise ValueError("cannot save an unfitted probe; call fit(X, y) first")
    classes = _named_classes(probe, class_names)
    path_dir = os.path.abspath(path_dir)
    if os.path.exists(path_dir) and (not os.path.isdir(path_dir) or (
            os.listdir(path_dir) and not os.path.exists(os.path.join(path_dir, "probe.json")))):
        raise FileExistsError(f"{path_dir} exists and is not a probe folder; choose another path")
    meta = dict(getattr(probe, "metadata_", {}) or {})
    meta.update(metadata or {})
    doc = {
        "format": PROBE_FORMAT, "format_version": PROBE_FORMAT_VERSION,
        "kind": probe.kind,
        "params": {k: _jsonable(v) for k, v in probe.get_params().items()},
        "classes": [str(c) if classes.dtype.kind == "U" else int(c) for c in classes],
        "classes_dtype": "str" if classes.dtype.kind == "U" else "int",
        "feature_dim": int(probe.n_features_in_),
        "state": {a: _jsonable(getattr(probe, a)) for a in probe._scalar_attrs},
        "metadata": {k: _jsonable(v) for k, v in meta.items()},
    }
    from common.atomic import make_temp_dir, replace_folder
    parent = os.path.dirname(path_dir)
    tmp = make_temp_dir(parent, tag="probe")
    try:
        with open(os.path.join(tmp, "probe.npz"), "wb") as f:
            # typed Any: numpy's stub reads a ** dict as possibly binding allow_pickle: bool
            arrays: dict[str, Any] = {a: np.asarray(getattr(probe, a)) for a in probe._array_attrs}
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(tmp, "probe.json"), "w") as f:
            json.dump(doc, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        replace_folder(tmp, path_dir, fsync=False)  # the two files are fsynced above
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)



def read_probe_json(path_dir: str) -> dict:
    path = os.path.join(path_dir, "probe.json")
    if os.path.isfile(path_dir):
        raise ProbeFileError(f"{path_dir}: is a file; give the probe folder (with probe.json "
                             "and probe.npz) written by `probe fit`")
    if not os.path.exists(path):
        raise ProbeFileError(f"{path_dir}: no probe.json here (fit one with `probe fit`)")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ProbeFileError(f"{path}: not valid JSON ({e}); refit the probe with `probe fit`"
                             ) from e
    if not isinstance(doc, dict) or doc.get("format") != PROBE_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ProbeFileError(f"{path}: not a unirep probe (format {found!r})")
    version = doc.get("format_version", 0)
    if not isinstance(version, int):
        raise ProbeFileError(f"{path}: format_version must be an integer, not {version!r}")
    if version > PROBE_FORMAT_VERSION:
        raise ProbeFileError(f"{path}: probe format {version} is newer than this toolkit "
                             f"understands ({PROBE_FORMAT_VERSION}); upgrade the toolkit")
    return doc


def _probe_from_doc(doc: dict, path: str) -> Probe:
    """The unfitted probe and its JSON state from probe.json, every field checked."""
    for key, kind in (("kind", str), ("params", dict), ("classes", list), ("state", dict),
                      ("feature_dim", int)):
        if not isinstance(doc.get(key), kind):
            raise ProbeFileError(f"{path}: '{key}' is missing or not a {kind.__name__}")
    if doc["kind"] not in PROBES:
        raise ProbeFileError(f"{path}: unknown probe kind {doc['kind']!r}; known: "
                             f"{sorted(PROBES)}")
    cls: type[Probe] = PROBES[doc["kind"]]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    params = {k: v for k, v in doc["params"].items() if k in accepted}
    try:
        if params.get("Cs") is not None:
            params["Cs"] = np.asarray(params["Cs"], dtype=np.float64)
        if params.get("ks") is not None:
            params["ks"] = tuple(params["ks"])
        probe = cls(**params)
    except (TypeError, ValueError) as e:
        raise ProbeFileError(f"{path}: bad params ({e})") from e
    unknown = sorted(set(doc["state"]) - set(cls._scalar_attrs))
    missing = sorted(set(cls._scalar_attrs) - set(doc["state"]))
    if unknown or missing:  # never setattr a name the file chose
        raise ProbeFileError(f"{path}: state keys {unknown or ''}{' unexpected' if unknown else ''}"
                             f"{'; ' if unknown and missing else ''}"
                             f"{missing or ''}{' missing' if missing else ''} for a "
                             f"{doc['kind']} probe (expected {list(cls._scalar_attrs)})")
    for name in cls._scalar_attrs:
        value = doc["state"][name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ProbeFileError(f"{path}: state '{name}' must be a finite number, not {value!r}")
        setattr(probe, name, value)
    if doc["state"]["n_features_in_"] != doc["feature_dim"] or doc["feature_dim"] <= 0:
        raise ProbeFileError(f"{path}: feature_dim {doc['feature_dim']} does not match state "
                             f"n_features_in_ {doc['state']['n_features_in_']}")
    dtype = str if doc.get("classes_dtype") == "str" else np.int64
    try:
        probe.classes_ = np.array(doc["classes"], dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ProbeFileError(f"{path}: classes are not all {doc.get('classes_dtype')} ({e})") from e
    if probe.classes_.ndim != 1 or len(probe.classes_) < 2:
        raise ProbeFileError(f"{path}: a probe needs a list of at least 2 classes")
    return probe


def _check_arrays(probe: Probe, path: str) -> None:
    """Shapes and values of the arrays against the classes and the feature dimension."""
    d, k = int(probe.n_features_in_), len(probe.classes_)
    shapes = {name: np.shape(getattr(probe, name)) for name in probe._array_attrs}
    problem = probe.check_loaded_arrays()
    if problem:
        raise ProbeFileError(f"{path}: {problem}")
    expected = probe.expected_array_shapes(shapes)
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise ProbeFileError(f"{path}: array '{name}' has shape {shapes[name]}, expected "
                                 f"{shape} for {k} classes and {d}-d features")
    for name in probe._array_attrs:
        arr = np.asarray(getattr(probe, name))
        if arr.dtype.kind not in "iuf":
            raise ProbeFileError(f"{path}: array '{name}' has dtype {arr.dtype}, expected numbers")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ProbeFileError(f"{path}: array '{name}' contains NaN or infinite values; "
                                 "refit the probe")


def load_probe(path_dir: str) -> Probe:
    """Load a probe saved by save_probe (numpy only; never unpickles). Every key, shape and
    value is checked against the probe's kind; ProbeFileError names the file and the problem."""
    doc = read_probe_json(path_dir)
    probe = _probe_from_doc(doc, os.path.join(path_dir, "probe.json"))
    npz = os.path.join(path_dir, "probe.npz")
    cls: type[Probe] = type(probe)
    try:
        with np.load(npz, allow_pickle=False) as arrays:
            unexpected = sorted(set(arrays.files) - set(cls._array_attrs))
            missing = sorted(set(cls._array_attrs) - set(arrays.files))
            if unexpected or missing:
                raise ProbeFileError(
                    f"{npz}: arrays {unexpected + missing} are "
                    f"{'unexpected' if unexpected else 'missing'} for a {cls.kind} probe "
                    f"(expected {list(cls._array_attrs)})")
            for name in cls._array_attrs:
                setattr(probe, name, arrays[name])
    except ProbeFileError:
        raise
    except FileNotFoundError as e:
        raise ProbeFileError(f"{npz}: missing; refit the probe with `probe fit`") from e
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError (pickled object arrays)...
        raise ProbeFileError(f"{npz}: unreadable ({type(e).__name__}: {e}); refit the probe "
                             "with `probe fit`") from e
    _check_arrays(probe, npz)
    metadata = doc.get("metadata", {})
    probe.metadata_ = metadata if isinstance(metadata, dict) else {}
    return probe

