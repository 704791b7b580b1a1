"""Serving exported models with onnxruntime: the feature pipeline, probes, evaluation.

Never imports torch (not even indirectly): an application embedding this package needs only
onnxruntime(-gpu), numpy and pillow. Names are imported on first use, so the CLI's command
modules (`runtime.commands`, ...) load without pulling in onnxruntime.

    from runtime import FeaturePipeline, LogisticRegressionProbe
    features = FeaturePipeline("models/spe").embed(["a.jpg", "b.png"]).vectors  # or "photos/"
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "FeaturePipeline": "pipeline", "EmbedResult": "pipeline", "VARIANTS": "pipeline",
    "iter_inputs": "pipeline", "iter_folder": "pipeline", "load_description": "pipeline",
    "resolve_model": "pipeline", "Engine": "engine", "PipelineConfig": "resolve",
    "resolve_pipeline_config": "resolve",
    "load_crop": "decode", "normalize_batch": "decode", "preprocess": "decode",
    "ProviderFallbackWarning": "providers", "available_cores": "providers",
    "cuda_device_count": "providers", "create_session": "providers",
    "LogisticRegressionProbe": "probes", "LinearSVMProbe": "probes",
    "NearestClassMeanProbe": "probes", "KNNProbe": "probes", "make_probe": "probes",
    "save_probe": "probes", "load_probe": "probes", "fuse_probe": "probes",
    "load_probe_for": "probes",
    "evaluate_models": "evaluation", "EvaluationPlan": "evaluation", "mnrg": "evaluation",
    "anrg": "evaluation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
