"""Small numerics shared by the probes: softmax, L2 normalisation, NLL, temperature fitting,
BLAS thread limits and the checks of feature arrays."""
from __future__ import annotations

import math

import numpy as np

_EPS = 1e-12


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return x / np.maximum(norm, _EPS)


def _nll(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of integer labels under softmax(logits), stably."""
    z = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float((lse - z[np.arange(len(y)), y]).mean())


def _fit_temperature(scores: np.ndarray, y: np.ndarray) -> float:
    """Scale t > 0 minimising the NLL of softmax(t * scores) (1-D, on held-out data)."""
    from scipy.optimize import minimize_scalar
    res = minimize_scalar(lambda log_t: _nll(math.exp(log_t) * scores, y),
                          bounds=(math.log(1e-3), math.log(1e4)), method="bounded",
                          options={"xatol": 1e-3})
    return float(math.exp(res.x))


def _blas_threads(n: int | None):
    """Limit BLAS threads while fitting. The fits' matrix products are small (thousands x
    hundreds x classes) and run hundreds of times: thread hand-offs cost more than they save,
    about 8x on a busy 2-core machine. Needs threadpoolctl (optional; else a no-op)."""
    from contextlib import nullcontext
    if n is None:
        return nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    import scipy.optimize  # noqa: F401  (loads scipy's own BLAS first, so the limit covers it)
    return threadpool_limits(limits=n, user_api="blas")


def _as_features(X) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"features must be a 2-D array (samples, dims); got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"features must be numeric; got dtype {X.dtype}")
    if not np.isfinite(X).all():
        raise ValueError("features contain NaN or inf (failed items?); drop those rows first")
    return X


def _split_indices(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from common.data import stratified_split
    return stratified_split(y, fraction, seed)



def _apply_preprocessing(X: np.ndarray, prep: dict) -> np.ndarray:
    X = X.astype(np.float64)
    if prep.get("l2_normalize"):
        X = _l2_normalize(X)
    if prep.get("mean") is not None:
        X = (X - prep["mean"]) / prep["scale"]
    return X

