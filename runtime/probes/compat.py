"""Whether a probe fits a backbone: feature dimension and the description fingerprint of the
model it was fitted on; `load_probe_for` loads a probe folder and checks both."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import TYPE_CHECKING, Any

from .base import Probe
from .errors import ProbeMismatchError
from .files import load_probe

if TYPE_CHECKING:
    from common.description import ModelDescription


def description_fingerprint(description) -> str:
    """Stable short hash of a model description (dict or ModelDescription): identifies the
    trained model a probe was fitted on, whatever file variant (fp32, fp16, int8) serves it,
    so `versions` and `extra` (where export notes the variant) are left out."""
    d = _description_dict(description)
    d = {k: v for k, v in d.items() if k not in ("versions", "extra")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _description_dict(description) -> dict:
    """Normalised dict of a ModelDescription or of its JSON dict (defaults filled in)."""
    from common.description import ModelDescription
    if isinstance(description, dict):
        description = ModelDescription.from_dict(description)
    return description.to_dict()


def model_mismatch(probe: Probe, description, where: str | None = None) -> str | None:
    """Why a probe cannot be applied to a model's features (None when it can). A probe that
    records no fingerprint passes with a warning (naming `where`, its folder), wherever it is
    checked: nothing proves it was fitted on this model."""
    d = _description_dict(description)
    meta = getattr(probe, "metadata_", {}) or {}
    if int(d["feature_dim"]) != int(probe.n_features_in_):
        return (f"the probe expects {probe.n_features_in_}-d features (fitted on "
                f"{meta.get('architecture', 'an unknown model')}) but the model "
                f"({d['architecture']}) gives {d['feature_dim']}-d features")
    expected = meta.get("model_fingerprint")
    if not expected:
        logging.getLogger("unirep.probes").warning(
            "%s: the probe records no model fingerprint (saved by an older version, or "
            "removed); it is used, but nothing proves it was fitted on %s: refit it with "
            "`probe fit` to record one", where or "probe", d["architecture"])
    elif expected != description_fingerprint(d):
        return (f"the probe was fitted on model {meta.get('architecture', '?')} with description "
                f"fingerprint {expected}, but this model ({d['architecture']}) has fingerprint "
                f"{description_fingerprint(d)}; refit the probe on this model's features")
    return None


def _model_description(model: Any) -> tuple[ModelDescription | dict, str]:
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


def load_probe_for(model: Any, probe_dir: str) -> Probe:
    """The probe of `probe_dir`, once checked to fit `model` (a ModelDescription or its dict, a
    FeaturePipeline, or a model folder): its feature dimension and, when the probe records one,
    the fingerprint of the model it was fitted on. Raises ProbeFileError for a folder that
    cannot be read and ProbeMismatchError for a probe fitted on another backbone."""
    probe = load_probe(probe_dir)
    description, name = _model_description(model)
    problem = model_mismatch(probe, description, where=probe_dir)
    if problem:
        raise ProbeMismatchError(probe_dir, name, problem)
    return probe
