"""Serving exported models with onnxruntime: the feature pipeline, probes, evaluation.

Never imports torch (not even indirectly): an application embedding this package needs only
onnxruntime(-gpu), numpy and pillow.
"""
from .decode import load_crop, normalize_batch, preprocess
from .pipeline import (VARIANTS, EmbedResult, FeaturePipeline, iter_inputs, load_description,
                       resolve_model)
from .providers import ProviderFallbackWarning, available_cores, cuda_device_count

__all__ = ["FeaturePipeline", "EmbedResult", "ProviderFallbackWarning", "VARIANTS",
           "iter_inputs", "load_description", "resolve_model", "load_crop", "normalize_batch",
           "preprocess", "available_cores", "cuda_device_count"]
