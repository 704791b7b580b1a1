"""The probe base class (scikit-learn style: keyword hyper-parameters, learned state with a
trailing underscore, `fit` returns self) and the registry of probe kinds."""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from common.params import validate_params

from .errors import ProbeParameterError
from .numerics import _apply_preprocessing, _as_features, _softmax, _split_indices


class Probe:
    """Shared estimator plumbing: label encoding, predict/score, params, persistence hooks."""

    kind = ""
    # learned attributes saved as arrays (npz) and as JSON scalars; set by subclasses
    _array_attrs: tuple[str, ...] = ()
    _scalar_attrs: tuple[str, ...] = ()
    # what each hyper-parameter may be (common.params); checked by fit, as scikit-learn does
    _parameter_constraints: ClassVar[dict[str, list]] = {}
    # every kind defines fit(X, y, X_val=None, y_val=None) -> self, and takes these two
    # parameters for its seeded validation split
    fit: Callable[..., Probe]
    val_fraction: float
    seed: int

    def get_params(self) -> dict:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: getattr(self, n) for n in names}

    def _validate_params(self) -> None:
        """ProbeParameterError (one line) for the first hyper-parameter out of its constraints."""
        validate_params(self.get_params(), self._parameter_constraints, type(self).__name__,
                        error=ProbeParameterError)

    def expected_array_shapes(self, shapes: dict[str, tuple]) -> dict[str, tuple]:
        """The shape each saved array must have, given the classes, `n_features_in_` and the
        shapes found (for sizes only the file knows, such as a kNN probe's row count); the
        loader compares them. Each kind declares its own."""
        return {}

    def check_loaded_arrays(self) -> str | None:
        """Why the loaded arrays' values cannot be right (None when they can); for checks
        beyond shapes and finiteness."""
        return None

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={_short(v)}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    # -- labels ------------------------------------------------------------------------------
    def _encode(self, y) -> np.ndarray:
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError(f"labels must be 1-D; got shape {y.shape}")
        if y.dtype.kind not in "iuU":
            y = y.astype(str) if y.dtype.kind in "OS" else y.astype(np.int64)
        self.classes_, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
        if len(self.classes_) < 2:
            raise ValueError("need at least 2 classes to fit a probe; got "
                             f"{self.classes_.tolist()}")
        single = [str(c) for c, n in zip(self.classes_, counts) if n == 1]
        if single:  # it fits, but nothing is learnt about the class beyond one point
            logging.getLogger("unirep.probes").warning(
                "%s: %d of %d classes have a single image to fit on (%s); the probe will "
                "generalise poorly: give each class several images", type(self).__name__,
                len(single), len(self.classes_), ", ".join(single[:5])
                + (", ..." if len(single) > 5 else ""))
        return codes.astype(np.int64)

    def _check_fit_inputs(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        X = _as_features(X)
        y = np.asarray(y)
        if len(X) != len(y):
            raise ValueError(f"{len(X)} feature rows but {len(y)} labels")
        self.n_features_in_ = X.shape[1]
        self.metadata_ = getattr(self, "metadata_", {}) or {}
        return X, y

    def _check_predict_inputs(self, X) -> np.ndarray:
        if not hasattr(self, "classes_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(X, y) first")
        X = _as_features(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"features have {X.shape[1]} dims; the probe was fitted on "
                             f"{self.n_features_in_}")
        return X

    # -- prediction --------------------------------------------------------------------------
    def predict_proba(self, X) -> np.ndarray:
        W, b, prep = self.linear_form_(dtype=np.float64)
        return _softmax(_apply_preprocessing(self._check_predict_inputs(X), prep) @ W + b)

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(axis=1)]

    def score(self, X, y) -> float:
        """Top-1 accuracy."""
        return float(np.mean(self.predict(X) == np.asarray(y)))

    def linear_form_(self, dtype=np.float32):
        raise NotImplementedError

    # -- validation helper -------------------------------------------------------------------
    def _validation_split(self, X, codes, X_val, y_val):
        """(train X, train codes, val X, val codes) from an explicit val set or a seeded split."""
        if X_val is not None:
            X_val = _as_features(X_val)
            y_val = np.asarray(y_val).astype(str if self.classes_.dtype.kind == "U" else np.int64)
            index = {c: i for i, c in enumerate(self.classes_.tolist())}
            unknown = sorted(set(y_val.tolist()) - set(index))
            if unknown:
                raise ValueError(f"validation labels {unknown[:5]} are absent from the "
                                 "training labels")
            val_codes = np.array([index[c] for c in y_val.tolist()], dtype=np.int64)
            return X, codes, X_val, val_codes
        train, val = _split_indices(codes, self.val_fraction, self.seed)
        if len(val) == 0:
            return X, codes, None, None
        return X[train], codes[train], X[val], codes[val]

    @staticmethod
    def _with_given_val(X, codes, Xv, cv, X_val):
        """The final fit uses train+val: an explicit validation set joins the training data
        (a seeded hold-out already is part of X)."""
        if X_val is None or Xv is None:
            return X, codes
        return np.concatenate([X, Xv.astype(X.dtype)]), np.concatenate([codes, cv])


def _short(v):
    if isinstance(v, np.ndarray):
        return f"array({len(v)} values, {v.min():.3g}..{v.max():.3g})" if v.size else "array([])"
    return repr(v)



# Every probe kind, by name: `register_probe` fills it, `make_probe` and the loader read it.
PROBES: dict[str, type[Probe]] = {}


def register_probe(cls: type[Probe]) -> type[Probe]:
    """Class decorator: add a probe class to PROBES under its `kind`."""
    if not cls.kind or cls.kind in PROBES:
        raise ValueError(f"probe kind {cls.kind!r} is empty or taken")
    PROBES[cls.kind] = cls
    return cls


def make_probe(kind: str, **params) -> Probe:
    """A new probe by kind ('logreg', 'svm', 'ncm', 'knn'); params go to its constructor."""
    if kind not in PROBES:
        raise ProbeParameterError(f"unknown probe kind {kind!r}; choose from {', '.join(PROBES)}")
    return PROBES[kind](**params)
