"""Probes on frozen embeddings, in the style of scikit-learn estimators (our own code).

    probe = make_probe("logreg").fit(X_train, y_train)     # C chosen on a validation split
    probe.predict(X); probe.predict_proba(X); probe.score(X, y)
    save_probe(probe, "probes/mnist", model=pipe, class_names=names)  # fingerprint, names
    probe = load_probe("probes/mnist")
    probe = load_probe_for(pipeline, "probes/mnist")          # and check it fits the model

Kinds (`PROBES`, filled by `register_probe`):
- `logreg`  L2-regularised multinomial logistic regression, L-BFGS (the linear-probe protocol of
            Kornblith et al. 2019 and CLIP): C swept on a seeded stratified validation split,
            warm-started along the path, then refit on train+val. By default the sweep fits
            on a stratified subsample of the training side (`sweep_rows`) in several threads,
            and only the chosen C on everything; `sweep="full"` keeps the original sweep.
- `svm`     one-vs-rest linear SVM (squared hinge, L2), all classes in one L-BFGS problem; C
            chosen the same way. Probabilities: softmax of temperature-scaled decision values.
- `ncm`     nearest class mean with cosine similarity on L2-normalised features.
- `knn`     k nearest neighbours (cosine); probabilities are vote fractions.

Every probe but kNN exposes `linear_form_()` -> (W, b, preprocessing) with
`probabilities = softmax(prep(x) @ W + b)`, which `fuse_probe` writes as ONNX ops (a kNN probe
raises NotImplementedError there; fuse writes its vote with TopK instead). Saved as `probe.npz`
(arrays; loaded with allow_pickle=False) + `probe.json` (kind, params, classes, metadata), never
pickle.

Modules: `numerics` and `objectives` (loss kernels, the threaded objective), `base` (the
estimator base class and the registry), `linear` and `similarity` (the kinds), `files` (the
file format), `compat` (fit to a backbone), `saving` (save_probe with the backbone and
class names), `fuse`
(into the ONNX model), `labels` (true labels from a CSV or folders), `diagnostics` (accuracy,
per-class report, confusion matrix), `errors`.
Only numpy is needed to load and apply a probe; scipy is imported when fitting, onnx when fusing.
"""
from __future__ import annotations

from .base import PROBES, Probe, make_probe, register_probe
from .compat import description_fingerprint, load_probe_for, model_mismatch
from .errors import FuseError, ProbeError, ProbeFileError, ProbeMismatchError, ProbeParameterError
from .files import PROBE_FORMAT, PROBE_FORMAT_VERSION, load_probe, read_probe_json
from .fuse import fuse_probe, read_fused_classes
from .linear import (
    DEFAULT_CS,
    DEFAULT_SWEEP_ROWS,
    SWEEPS,
    LinearSVMProbe,
    LogisticRegressionProbe,
)
from .saving import save_probe
from .similarity import KNNProbe, NearestClassMeanProbe

__all__ = [
    "DEFAULT_CS", "DEFAULT_SWEEP_ROWS", "PROBES", "PROBE_FORMAT", "PROBE_FORMAT_VERSION", "SWEEPS",
    "FuseError", "KNNProbe", "LinearSVMProbe", "LogisticRegressionProbe", "NearestClassMeanProbe",
    "Probe", "ProbeError", "ProbeFileError", "ProbeMismatchError", "ProbeParameterError",
    "description_fingerprint", "fuse_probe", "load_probe", "load_probe_for", "make_probe",
    "model_mismatch", "read_fused_classes", "read_probe_json", "register_probe", "save_probe",
]
