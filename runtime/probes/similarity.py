"""Similarity probes: nearest class mean and k nearest neighbours, both by cosine similarity."""
from __future__ import annotations

import numpy as np

from common.params import Interval, StrOptions

from .base import Probe, register_probe
from .numerics import _EPS, _fit_temperature, _l2_normalize


@register_probe
class NearestClassMeanProbe(Probe):
    """Nearest class mean, cosine: class means of L2-normalised features, renormalised.

    `predict_proba` is softmax(temperature_ * cosine). temperature=None fits it on a seeded
    stratified validation split by NLL (means from the rest), falling back to 10 when no split is
    possible; then the means are recomputed on all data.
    """

    kind = "ncm"
    _array_attrs = ("means_",)
    _scalar_attrs = ("temperature_", "n_features_in_")
    _parameter_constraints = {
        "temperature": [Interval(float, 0, None, closed="neither"), None],
        "val_fraction": [Interval(float, 0, 1, closed="left")],
        "seed": [Interval(int, 0, None, closed="left")],
    }

    def __init__(self, temperature=None, val_fraction=0.2, seed=0):
        self.temperature = temperature
        self.val_fraction = val_fraction
        self.seed = seed

    def expected_array_shapes(self, shapes: dict[str, tuple]) -> dict[str, tuple]:
        return {"means_": (len(self.classes_), int(self.n_features_in_))}

    def _means(self, X, codes):
        X = _l2_normalize(X)
        sums = np.zeros((len(self.classes_), X.shape[1]))
        np.add.at(sums, codes, X)
        return _l2_normalize(sums)

    def fit(self, X, y, X_val=None, y_val=None):
        X, y = self._check_fit_inputs(X, y)
        codes = self._encode(y)
        X = X.astype(np.float64)
        Xt, ct, Xv, cv = self._validation_split(X, codes, X_val, y_val)
        if self.temperature is not None:
            self.temperature_ = float(self.temperature)
        else:
            self.temperature_ = 10.0 if Xv is None else _fit_temperature(
                _l2_normalize(Xv.astype(np.float64)) @ self._means(Xt, ct).T, cv)
        X, codes = self._with_given_val(X, codes, Xv, cv, X_val)
        self.means_ = self._means(X, codes)
        return self

    def decision_function(self, X) -> np.ndarray:
        """Cosine similarity to each class mean."""
        return _l2_normalize(self._check_predict_inputs(X).astype(np.float64)) @ self.means_.T

    def linear_form_(self, dtype=np.float32):
        W = (self.temperature_ * self.means_.T).astype(dtype)
        return W, np.zeros(len(self.classes_), dtype), {"l2_normalize": True, "mean": None,
                                                        "scale": None}


@register_probe
class KNNProbe(Probe):
    """k nearest neighbours by cosine similarity; probabilities are (weighted) vote fractions.

    k=None chooses k on a seeded stratified validation split from `ks`. weights: 'uniform' (one
    vote each) or 'similarity' (votes weighted by cosine similarity, clipped at 0). Ties go to
    the class listed first in classes_.
    """

    kind = "knn"
    _array_attrs = ("features_", "labels_")
    _scalar_attrs = ("k_", "n_features_in_")
    _parameter_constraints = {
        "k": [Interval(int, 1, None, closed="left"), None],
        "weights": [StrOptions({"uniform", "similarity"})],
        "val_fraction": [Interval(float, 0, 1, closed="left")],
        "seed": [Interval(int, 0, None, closed="left")],
        "chunk_size": [Interval(int, 1, None, closed="left")],
    }

    def __init__(self, k=None, ks=(1, 3, 5, 7, 11, 15, 21, 31, 51), weights="uniform",
                 val_fraction=0.2, seed=0, chunk_size=1024):
        self.k = k
        self.ks = ks
        self.weights = weights
        self.val_fraction = val_fraction
        self.seed = seed
        self.chunk_size = chunk_size

    def fit(self, X, y, X_val=None, y_val=None):
        self._validate_params()
        X, y = self._check_fit_inputs(X, y)
        codes = self._encode(y)
        X = X.astype(np.float32)
        Xt, ct, Xv, cv = self._validation_split(X, codes, X_val, y_val)
        if self.k is not None:
            self.k_ = int(self.k)
        else:
            if Xv is None:
                self.k_ = 1
            else:
                candidates = [k for k in self.ks if k <= len(Xt)] or [1]
                accs = [np.mean(self._votes(_l2_normalize(Xv), _l2_normalize(Xt), ct, k)
                                .argmax(axis=1) == cv) for k in candidates]
                self.k_ = int(candidates[int(np.argmax(accs))])  # first best = smallest k
        X, codes = self._with_given_val(X, codes, Xv, cv, X_val)
        self.features_ = _l2_normalize(X).astype(np.float32)
        self.labels_ = codes
        return self

    def expected_array_shapes(self, shapes: dict[str, tuple]) -> dict[str, tuple]:
        n = shapes["labels_"][0] if shapes.get("labels_") else -1
        return {"features_": (n, int(self.n_features_in_)), "labels_": (n,)}

    def check_loaded_arrays(self) -> str | None:
        labels, k = np.asarray(self.labels_), len(self.classes_)
        if labels.dtype.kind not in "iu" or (labels.size and not (
                labels.min() >= 0 and labels.max() < k)):
            return f"labels_ must be class indices in 0..{k - 1}"
        return None

    def _votes(self, queries, features, labels, k):
        k = min(k, len(features))
        out = np.zeros((len(queries), len(self.classes_)))
        for start in range(0, len(queries), self.chunk_size):
            sims = queries[start: start + self.chunk_size] @ features.T
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            weight = (np.ones_like(top, dtype=np.float64) if self.weights == "uniform" else
                      np.maximum(np.take_along_axis(sims, top, axis=1), 0.0) + _EPS)
            rows = np.repeat(np.arange(len(top)), k) + start
            np.add.at(out, (rows, labels[top].ravel()), weight.ravel())
        return out / out.sum(axis=1, keepdims=True)

    def predict_proba(self, X) -> np.ndarray:
        X = _l2_normalize(self._check_predict_inputs(X).astype(np.float32))
        return self._votes(X, self.features_, self.labels_, self.k_)

    def decision_function(self, X) -> np.ndarray:
        return self.predict_proba(X)

    def linear_form_(self, dtype=np.float32):
        raise NotImplementedError(
            "a kNN probe has no linear form (runtime.probes.fuse writes it with TopK and OneHot)")

