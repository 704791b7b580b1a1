"""Which backbone a probe belongs to: the description fingerprint, and the model metadata a
saved probe records (from a description, its dict, a FeaturePipeline or a model folder). A leaf
of the probes package, so the file format and the compatibility check can both use it."""
from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.description import ModelDescription


def _description_dict(description) -> dict:
    """Normalised dict of a ModelDescription or of its JSON dict (defaults filled in)."""
    from common.description import ModelDescription
    if isinstance(description, dict):
        description = ModelDescription.from_dict(description)
    return description.to_dict()


def description_fingerprint(description) -> str:
    """Stable short hash of a model description (dict or ModelDescription): identifies the
    trained model a probe was fitted on, whatever file variant (fp32, fp16, int8) serves it,
    so `versions` and `extra` (where export notes the variant) are left out."""
    d = _description_dict(description)
    d = {k: v for k, v in d.items() if k not in ("versions", "extra")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_description(model: Any) -> tuple[ModelDescription | dict, str]:
    """(description, how to name the model in messages) of a description, a dict, anything with
    `description_` (a FeaturePipeline) or a model folder / .onnx path."""
    if isinstance(model, (str, os.PathLike)):
        from runtime.pipeline import load_description, resolve_model
        return load_description(resolve_model(os.fspath(model))), os.fspath(model)
    if hasattr(model, "description_"):
        return model.description_, str(getattr(model, "model_path_", None)
                                       or model.description_.architecture)
    if isinstance(model, dict):
        return model, str(model.get("architecture", "the model"))
    return model, str(getattr(model, "architecture", "the model"))


def model_metadata(model: Any) -> dict[str, Any]:
    """What a saved probe records of its backbone: fingerprint, architecture, feature
    dimension, and the model folder when `model` is a folder or a pipeline."""
    description, _ = model_description(model)
    d = _description_dict(description)
    meta: dict[str, Any] = {"model_fingerprint": description_fingerprint(d),
                            "architecture": d.get("architecture"),
                            "feature_dim": int(d["feature_dim"])}
    if isinstance(model, (str, os.PathLike)):
        meta["model_dir"] = os.path.abspath(os.fspath(model))
    elif getattr(model, "model_path_", None):
        meta["model_dir"] = os.path.dirname(os.path.abspath(model.model_path_))
    return meta
