"""`save_probe`, the easy path: a probe saved with the backbone it was fitted on (its description
fingerprint, so `serve`, bulk jobs and `load_probe_for` refuse it on another model) and with
class names for integer labels (so predictions read `footwear/sandal`, not 7)."""
from __future__ import annotations

import os
import warnings
from typing import Any

from .base import Probe
from .compat import _description_dict, _model_description, description_fingerprint
from .files import save_probe as write_probe


def model_metadata(model: Any) -> dict[str, Any]:
    """What a saved probe records of its backbone (a FeaturePipeline, a model folder, a
    description or its dict): fingerprint, architecture, feature dimension, and the model
    folder when there is one."""
    description, _ = _model_description(model)
    d = _description_dict(description)
    meta: dict[str, Any] = {"model_fingerprint": description_fingerprint(d),
                            "architecture": d.get("architecture"),
                            "feature_dim": int(d["feature_dim"])}
    if isinstance(model, (str, os.PathLike)):
        meta["model_dir"] = os.path.abspath(os.fspath(model))
    elif getattr(model, "model_path_", None):
        meta["model_dir"] = os.path.dirname(os.path.abspath(model.model_path_))
    return meta


def save_probe(probe: Probe, path_dir: str, metadata: dict | None = None, *,
               model: Any = None, class_names=None) -> None:
    """Write the probe folder (probe.npz + probe.json, atomically; never pickle).

    model: the backbone the probe was fitted on (a FeaturePipeline, a model folder or a
    description): its fingerprint is recorded. class_names: the names of integer classes
    (labels fitted as indices, e.g. `dataset.labels("train")` with `dataset.leaf_classes`).
    Without `model` (and no fingerprint in `metadata`), a UserWarning says that nothing will
    tie the probe to its backbone."""
    meta = dict(metadata or {})
    if model is not None:
        meta = {**model_metadata(model), **meta}
    elif not meta.get("model_fingerprint") and not (
            getattr(probe, "metadata_", {}) or {}).get("model_fingerprint"):
        warnings.warn("save_probe without model=: the probe records no model fingerprint, so "
                      "nothing will stop it being applied to another backbone (pass "
                      "model=pipeline or model='models/NAME')", UserWarning, stacklevel=2)
    write_probe(probe, path_dir, meta, class_names=class_names)
