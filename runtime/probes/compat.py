"""Whether a probe fits a backbone: feature dimension and the description fingerprint of the
model it was fitted on; `load_probe_for` loads a probe folder and checks both."""
from __future__ import annotations

from typing import Any

from .base import Probe
from .errors import ProbeMismatchError
from .files import load_probe
from .identity import _description_dict, description_fingerprint
from .identity import model_description as _model_description

__all__ = ["description_fingerprint", "load_probe_for", "model_mismatch"]


def model_mismatch(probe: Probe, description) -> str | None:
    """Why a probe cannot be applied to a model's features (None when it can)."""
    d = _description_dict(description)
    meta = getattr(probe, "metadata_", {}) or {}
    if int(d["feature_dim"]) != int(probe.n_features_in_):
        return (f"the probe expects {probe.n_features_in_}-d features (fitted on "
                f"{meta.get('architecture', 'an unknown model')}) but the model "
                f"({d['architecture']}) gives {d['feature_dim']}-d features")
    expected = meta.get("model_fingerprint")
    if expected and expected != description_fingerprint(d):
        return (f"the probe was fitted on model {meta.get('architecture', '?')} with description "
                f"fingerprint {expected}, but this model ({d['architecture']}) has fingerprint "
                f"{description_fingerprint(d)}; refit the probe on this model's features")
    return None


def load_probe_for(model: Any, probe_dir: str) -> Probe:
    """The probe of `probe_dir`, once checked to fit `model` (a ModelDescription or its dict, a
    FeaturePipeline, or a model folder): its feature dimension and, when the probe records one,
    the fingerprint of the model it was fitted on. Raises ProbeFileError for a folder that
    cannot be read and ProbeMismatchError for a probe fitted on another backbone."""
    probe = load_probe(probe_dir)
    description, name = _model_description(model)
    problem = model_mismatch(probe, description)
    if problem:
        raise ProbeMismatchError(probe_dir, name, problem)
    return probe
