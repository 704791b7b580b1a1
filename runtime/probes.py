"""Probes on frozen embeddings, in the style of scikit-learn estimators (our own code).

    probe = make_probe("logreg").fit(X_train, y_train)     # C chosen on a validation split
    probe.predict(X); probe.predict_proba(X); probe.score(X, y)
    save_probe(probe, "probes/mnist"); probe = load_probe("probes/mnist")

Kinds:
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
`probabilities = softmax(prep(x) @ W + b)`, which `runtime.fuse` writes as ONNX ops (a kNN probe
raises NotImplementedError there; fuse writes its vote with TopK instead). Saved as `probe.npz`
(arrays; loaded with allow_pickle=False) + `probe.json` (kind, params, classes, metadata), never
pickle.

Only numpy is needed to load and apply a probe; scipy is imported when fitting.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np

from common.errors import UserError

PROBE_FORMAT = "unirep.probe"
PROBE_FORMAT_VERSION = 1
# The linear-probe protocol's sweep (Kornblith et al.): 45 log-spaced values, 1e-6..1e5 (four per
# decade). Warm starts along the path make the whole sweep cost about two cold fits.
DEFAULT_CS = np.logspace(-6, 5, 45)
# The fast sweep ("subsample") chooses C on at most this many stratified training rows, then
# fits the chosen C once on everything: the validation accuracy curve over C has the same peak
# from about ten thousand rows on, while the cost of the sweep grows with the rows.
DEFAULT_SWEEP_ROWS = 10_000
SWEEPS = ("subsample", "full")
# Gradient tolerances when tol / sweep_tol are None. The full sweep fits every C to 1e-4 and the
# final one to 1e-5. The fast sweep stops its fits at 1e-3 (a sixth of the steps; on 20,000
# fashion-mnist pixel rows it chose the same C as at 3e-4, test accuracy within 0.1 point of
# 1e-4) and its final fit at 3e-4 (1e-5 took ~1000 steps on 60,000 x 768; on 60,000 pixel
# rows 3e-4 took 250 steps to 1e-4's 410, test accuracy 84.79% against 84.78%).
FULL_SWEEP_TOL = 1e-4
FULL_FINAL_TOL = 1e-5
FAST_SWEEP_TOL = 1e-3
FAST_FINAL_TOL = 3e-4
_EPS = 1e-12


# ---------------------------------------------------------------------------------------------
# Small numerics

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


# ---------------------------------------------------------------------------------------------
# Base class

class Probe:
    """Shared estimator plumbing: label encoding, predict/score, params, persistence hooks."""

    kind = ""
    # learned attributes saved as arrays (npz) and as JSON scalars; set by subclasses
    _array_attrs: tuple[str, ...] = ()
    _scalar_attrs: tuple[str, ...] = ()
    # every kind defines fit(X, y, X_val=None, y_val=None) -> self, and takes these two
    # parameters for its seeded validation split
    fit: Callable[..., Probe]
    val_fraction: float
    seed: int

    def get_params(self) -> dict:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: getattr(self, n) for n in names}

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
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError("need at least 2 classes to fit a probe; got "
                             f"{self.classes_.tolist()}")
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


def _apply_preprocessing(X: np.ndarray, prep: dict) -> np.ndarray:
    X = X.astype(np.float64)
    if prep.get("l2_normalize"):
        X = _l2_normalize(X)
    if prep.get("mean") is not None:
        X = (X - prep["mean"]) / prep["scale"]
    return X


# ---------------------------------------------------------------------------------------------
# Linear models fitted with L-BFGS (logistic regression, squared-hinge SVM)

def _product(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """A @ B in A's precision, returned in float64: with float32 features (the fast sweep) the
    two large products of each step cost half, while the softmax, the loss and the optimiser's
    state stay in float64."""
    if A.dtype == np.float64:
        return A @ B
    return (A @ B.astype(A.dtype)).astype(np.float64)


def _logistic_loss_grad(params, X, y, onehot, l2):
    n, d = X.shape
    k = onehot.shape[1]
    W = params[: d * k].reshape(d, k)
    b = params[d * k:]
    z = _product(X, W) + b
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    loss = (np.log(s[:, 0]) - z[np.arange(n), y]).mean() + 0.5 * l2 * np.vdot(W, W)
    dz = (e / s - onehot) / n
    grad = np.concatenate([(_product(X.T, dz) + l2 * W).ravel(), dz.sum(axis=0)])
    return loss, grad


def _squared_hinge_loss_grad(params, X, y, signs, l2):
    n, d = X.shape
    k = signs.shape[1]
    W = params[: d * k].reshape(d, k)
    b = params[d * k:]
    slack = np.maximum(0.0, 1.0 - signs * (_product(X, W) + b))
    loss = (slack * slack).sum() / n + 0.5 * l2 * np.vdot(W, W)
    dz = -2.0 * signs * slack / n
    grad = np.concatenate([(_product(X.T, dz) + l2 * W).ravel(), dz.sum(axis=0)])
    return loss, grad


# The fast path's objective. One step's cost is reading X twice (X @ W, then X.T @ dz) from
# memory: with k = 10 columns both products are bound by memory bandwidth, not arithmetic. Done
# in blocks of rows that stay in cache, X is read once per step; row ranges go to threads (NumPy
# releases the GIL in BLAS calls and ufuncs) so both cores stream at once without BLAS's own
# thread hand-offs for every small product. All in float32, the sums in float64.
_BLOCK_ROWS = 1024
_ROWS_PER_THREAD = 4096  # fewer rows per thread: the hand-off costs more than it saves


def _logistic_block(z, y, onehot):
    """(summed NLL, d loss / d logits) of one block of logits; z is overwritten."""
    z -= z.max(axis=1, keepdims=True)
    at_label = z[np.arange(len(y)), y].sum(dtype=np.float64)
    e = np.exp(z, out=z)
    s = e.sum(axis=1)
    loss = float(np.log(s).sum(dtype=np.float64) - at_label)
    e /= s[:, None]
    e -= onehot
    return loss, e


def _squared_hinge_block(z, y, signs):
    slack = np.maximum(0.0, 1.0 - signs * z)
    return float((slack * slack).sum(dtype=np.float64)), -2.0 * signs * slack


class _BlockedObjective:
    """loss, gradient of mean block loss + l2/2 ||W||^2 over float32 X, blocked and threaded.

    Matches `_logistic_loss_grad` / `_squared_hinge_loss_grad` to float32 rounding; used by the
    fast sweep (the 'full' sweep keeps the float64 functions, unchanged)."""

    def __init__(self, block, X, y, targets, l2, jobs=1):
        self.block, self.X, self.y, self.l2 = block, X, y, l2
        self.targets = targets.astype(np.float32)
        n = len(X)
        jobs = max(1, min(int(jobs), n // _ROWS_PER_THREAD))
        self.ranges = [(int(a), int(b)) for a, b in
                       zip(np.linspace(0, n, jobs + 1)[:-1], np.linspace(0, n, jobs + 1)[1:])]
        self.pool = None
        if jobs > 1:
            from concurrent.futures import ThreadPoolExecutor
            self.pool = ThreadPoolExecutor(jobs, thread_name_prefix="probe-objective")

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()

    def _rows(self, W, b, lo, hi):
        G = np.zeros(W.shape)
        gb = np.zeros(W.shape[1])
        loss = 0.0
        for i in range(lo, hi, _BLOCK_ROWS):
            j = min(i + _BLOCK_ROWS, hi)
            Xb = self.X[i:j]
            z = Xb @ W
            z += b
            block_loss, dz = self.block(z, self.y[i:j], self.targets[i:j])
            loss += block_loss
            G += Xb.T @ dz
            gb += dz.sum(axis=0, dtype=np.float64)
        return loss, G, gb

    def __call__(self, params):
        n, d = self.X.shape
        k = self.targets.shape[1]
        W = params[: d * k].reshape(d, k)
        W32, b32 = W.astype(np.float32), params[d * k:].astype(np.float32)
        if self.pool is None:
            parts = [self._rows(W32, b32, *self.ranges[0])]
        else:
            parts = list(self.pool.map(lambda r: self._rows(W32, b32, *r), self.ranges))
        loss = sum(p[0] for p in parts) / n + 0.5 * self.l2 * float(np.vdot(W, W))
        G = sum(p[1] for p in parts) / n + self.l2 * W
        gb = sum(p[2] for p in parts) / n
        return loss, np.concatenate([G.ravel(), gb])


class _LinearLBFGSProbe(Probe):
    """Shared fit: standardise, sweep C on validation with warm starts, refit on everything.

    The objective is mean loss + ||W||^2 / (2 C n) (scikit-learn's C, divided by n so tolerances
    do not depend on the data size); the intercept is not penalised.
    """

    # (params, X, y, targets, l2) -> (loss, gradient); set by each kind
    _loss_grad: Callable[..., tuple[float, np.ndarray]] | None = None
    # (logits block, labels, targets) -> (summed loss, d loss / d logits); see _BlockedObjective
    _block: Callable[..., tuple[float, np.ndarray]] | None = None
    _array_attrs = ("coef_", "intercept_", "mean_", "scale_", "Cs_tried_", "val_accuracies_")
    _scalar_attrs = ("C_", "temperature_", "n_features_in_", "n_iter_")

    def __init__(self, C=None, Cs=None, refine=1, patience=None, val_fraction=0.2, seed=0,
                 max_iter=1000, tol=None, sweep_tol=None, standardize=True, blas_threads=1,
                 sweep="subsample", sweep_rows=DEFAULT_SWEEP_ROWS, n_jobs=None):
        self.C = C
        self.Cs = Cs
        self.refine = refine
        self.patience = patience
        self.sweep_tol = sweep_tol
        self.blas_threads = blas_threads
        self.sweep = sweep
        self.sweep_rows = sweep_rows
        self.n_jobs = n_jobs
        self.val_fraction = val_fraction
        self.seed = seed
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize

    def _cold_intercept(self, codes: np.ndarray, k: int) -> np.ndarray:
        """The fast sweep's starting intercept (W = 0)."""
        return np.zeros(k)

    # the per-kind targets of the loss: one-hot rows or +-1 signs
    def _targets(self, codes: np.ndarray, k: int) -> np.ndarray:
        raise NotImplementedError

    def _solve(self, X, codes, C, start=None, tol=None, jobs=1):
        """L-BFGS from `start` (zeros if None). float32 X (the fast sweep) gets the blocked
        objective in `jobs` threads; float64 X (the full sweep) the original one."""
        from scipy.optimize import minimize
        n, d = X.shape
        k = len(self.classes_)
        if start is None:
            start = np.zeros((d + 1) * k)
            if X.dtype == np.float32:
                start[d * k:] = self._cold_intercept(codes, k)
        tol = tol or self._final_tol()
        options = {"maxiter": self.max_iter, "gtol": tol, "ftol": tol * 1e-3, "maxcor": 20}
        targets = self._targets(codes, k)
        if X.dtype != np.float32:
            res = minimize(type(self)._loss_grad, start, args=(X, codes, targets, 1.0 / (C * n)),
                           jac=True, method="L-BFGS-B", options=options)
            return res.x, int(res.nit)
        objective = _BlockedObjective(type(self)._block, X, codes, targets, 1.0 / (C * n), jobs)
        try:
            # one BLAS thread per objective thread: BLAS's own threads would only contend
            with _blas_threads(1 if objective.pool is not None else None):
                res = minimize(objective, start, jac=True, method="L-BFGS-B", options=options)
        finally:
            objective.close()
        return res.x, int(res.nit)

    @staticmethod
    def _decision(params, X, k):
        d = X.shape[1]
        return X @ params[: d * k].reshape(d, k) + params[d * k:]

    def fit(self, X, y, X_val=None, y_val=None):
        """Fit on (X, y). With C=None, choose C on (X_val, y_val) if given, else on a seeded
        stratified hold-out of `val_fraction`; then refit on train+val with the chosen C."""
        if self.sweep not in SWEEPS:
            raise ValueError(f"sweep must be one of {', '.join(SWEEPS)}, not {self.sweep!r}")
        if self.sweep_rows is not None and int(self.sweep_rows) < 2:
            raise ValueError(f"sweep_rows must be at least 2 (or None for all rows), "
                             f"not {self.sweep_rows}")
        if self.n_jobs is not None and int(self.n_jobs) < 1:
            raise ValueError(f"n_jobs must be at least 1 (or None for the cores), not {self.n_jobs}")
        with _blas_threads(self.blas_threads):
            return self._fit(X, y, X_val, y_val)

    def _jobs(self) -> int:
        """Threads for the sweep (and for the final fit's row blocks); the full sweep keeps the
        original one-thread path so that its answers stay exactly reproducible."""
        if self.sweep == "full":
            return 1
        return int(self.n_jobs) if self.n_jobs is not None else max(1, min(os.cpu_count() or 1, 4))

    def _work_dtype(self):
        """Precision of the features in the fits' large products: float32 for the fast sweep
        (twice the speed; accuracies agree, see scripts/bench_probe.py), float64 for 'full'."""
        return np.float64 if self.sweep == "full" else np.float32

    def _sweep_tol(self) -> float:
        if self.sweep_tol is not None:
            return max(self._final_tol(), float(self.sweep_tol))
        return max(self._final_tol(),
                   FULL_SWEEP_TOL if self.sweep == "full" else FAST_SWEEP_TOL)

    def _final_tol(self) -> float:
        if self.tol is not None:
            return float(self.tol)
        return FULL_FINAL_TOL if self.sweep == "full" else FAST_FINAL_TOL

    def _sweep_subset(self, X, codes):
        """The rows the sweep fits on: all of them ('full'), else a seeded stratified subsample
        of at most `sweep_rows` (every class keeps at least one row)."""
        if self.sweep == "full" or self.sweep_rows is None or len(codes) <= int(self.sweep_rows):
            return X, codes
        _, keep = _split_indices(codes, int(self.sweep_rows) / len(codes), self.seed + 1)
        return X[keep], codes[keep]

    def _fit(self, X, y, X_val, y_val):
        X, y = self._check_fit_inputs(X, y)
        codes = self._encode(y)
        k = len(self.classes_)
        X = X.astype(np.float64)
        Xt, ct, Xv, cv = self._validation_split(X, codes, X_val, y_val)
        X, codes = self._with_given_val(X, codes, Xv, cv, X_val)

        self.Cs_tried_, self.val_accuracies_ = np.zeros(0), np.zeros(0)
        params_at: dict[float, np.ndarray] = {}
        sweep_rows = len(Xt)
        # a fixed C needs no validation, except to fit the SVM's probability temperature
        if Xv is not None and (self.C is None or self.kind != "logreg"):
            # standardisation statistics come from the training part only while validating
            Xt, ct = self._sweep_subset(Xt, ct)
            sweep_rows = len(Xt)
            mean, scale = self._standardizer(Xt)
            Xt_s, Xv_s = (Xt - mean) / scale, (Xv.astype(np.float64) - mean) / scale
            Xt_s = Xt_s.astype(self._work_dtype())
            Cs = [float(self.C)] if self.C is not None else sorted(
                float(c) for c in (DEFAULT_CS if self.Cs is None else self.Cs))
            results = self._sweep_jobs(Xt_s, ct, Xv_s, cv, Cs, params_at)
            if self.C is None:
                for _ in range(int(self.refine)):
                    best = self._best_C(results)
                    tried = sorted(results)
                    i = tried.index(best)
                    # halve the log-interval on each side of the best C (CLIP's refinement)
                    mids = [math.sqrt(best * tried[j]) for j in (i - 1, i + 1)
                            if 0 <= j < len(tried)]
                    self._sweep_jobs(Xt_s, ct, Xv_s, cv, mids, params_at, results)
            self.C_ = float(self.C) if self.C is not None else self._best_C(results)
            self.Cs_tried_ = np.array(sorted(results))
            self.val_accuracies_ = np.array([results[c][0] for c in self.Cs_tried_])
            self.temperature_ = (1.0 if self.kind == "logreg" else
                                 _fit_temperature(self._decision(params_at[self.C_], Xv_s, k), cv))
        else:
            self.C_ = float(self.C) if self.C is not None else 1.0
            self.temperature_ = 1.0

        self.mean_, self.scale_ = self._standardizer(X)
        start = self._final_start(params_at, sweep_rows, len(X))
        # the fast sweep's final fit: one large problem, its rows split over the cores (see
        # _BlockedObjective), warm-started from the sweep's solution at the same penalty
        tol = self._final_tol()
        params, self.n_iter_ = self._solve(
            ((X - self.mean_) / self.scale_).astype(self._work_dtype()), codes, self.C_, start,
            tol=tol, jobs=self._jobs())
        d = X.shape[1]
        self.coef_ = params[: d * k].reshape(d, k).T.copy()
        self.intercept_ = params[d * k:].copy()
        return self

    def _final_start(self, params_at: dict, sweep_rows: int, final_rows: int):
        """The final fit's warm start. The full sweep starts from its solution at the chosen C.
        The fast one from the fitted C closest to C_ * final_rows / sweep_rows: the penalty is
        ||W||^2 / (2 C n), so that C gave the subsample the penalty the final fit has, and its
        solution is the nearest (60,000 fashion-mnist pixel rows: 178 steps, 250 from zeros)."""
        if self.sweep == "full" or not params_at:
            return params_at.get(self.C_)
        matched = math.log(self.C_ * final_rows / max(sweep_rows, 1))
        return params_at[min(params_at, key=lambda c: abs(math.log(c) - matched))]

    def _standardizer(self, X):
        if not self.standardize:
            return np.zeros(X.shape[1]), np.ones(X.shape[1])
        mean, std = X.mean(axis=0), X.std(axis=0)
        return mean, np.where(std > 1e-12, std, 1.0)

    def _sweep_jobs(self, Xt, ct, Xv, cv, Cs, params_at, results=None):
        """The sweep over Cs, in one thread (with `patience`) or in `_jobs()` threads that each
        walk a contiguous stretch of the C path with warm starts (NumPy's products release the
        GIL). A stretch starts from the largest C already fitted below it, if any."""
        results = {} if results is None else results
        todo = [c for c in sorted(Cs) if c not in results]
        # small problems: a thread's cold start along the path costs more than it saves
        jobs = min(self._jobs(), len(todo)) if Xt.size >= 2_000_000 else 1
        if jobs <= 1:
            return self._sweep(Xt, ct, Xv, cv, todo, params_at, results, patience=self.patience)
        from concurrent.futures import ThreadPoolExecutor

        def walk(stretch):
            local = {c: p for c, p in params_at.items() if c < stretch[0]}
            found = self._sweep(Xt, ct, Xv, cv, stretch, local, {})
            return {c: local[c] for c in found}, found

        stretches = [[float(c) for c in a] for a in np.array_split(np.array(todo), jobs) if len(a)]
        with ThreadPoolExecutor(len(stretches)) as pool:
            for fitted, found in pool.map(walk, stretches):
                params_at.update(fitted)
                results.update(found)
        return results

    def _sweep(self, Xt, ct, Xv, cv, Cs, params_at, results=None, patience=None, jobs=1):
        """Fit each C in increasing order, warm-starting from the nearest smaller C fitted
        (to the looser `sweep_tol`: the choice needs accuracies, not exact optima). With
        `patience`, stop once that many consecutive Cs fail to beat the best accuracy: past
        its peak the validation accuracy of a linear probe only falls or plateaus."""
        results = {} if results is None else results
        k = len(self.classes_)
        best, worse = -1.0, 0
        for C in sorted(Cs):
            if C in results:
                continue
            smaller = [c for c in params_at if c < C]
            start = params_at[max(smaller)] if smaller else None
            params, _ = self._solve(Xt, ct, C, start, tol=self._sweep_tol(),
                                    jobs=jobs)
            params_at[C] = params
            scores = self._decision(params, Xv, k)
            acc = float(np.mean(scores.argmax(axis=1) == cv))
            results[C] = (acc, _nll(scores, cv))
            best, worse = (acc, 0) if acc > best else (best, worse + 1)
            if patience and worse >= patience:
                break
        return results

    @staticmethod
    def _best_C(results: dict) -> float:
        # highest validation accuracy; ties broken by lower validation loss, then smaller C
        return min(results, key=lambda c: (-results[c][0], results[c][1], c))

    @property
    def val_scores_(self) -> dict:
        """Validation accuracy per C tried (empty when no validation split was possible)."""
        return {float(c): float(a) for c, a in zip(self.Cs_tried_, self.val_accuracies_)}

    def decision_function(self, X) -> np.ndarray:
        X = self._check_predict_inputs(X).astype(np.float64)
        return ((X - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_

    def linear_form_(self, dtype=np.float32):
        t = self.temperature_
        prep = {"l2_normalize": False, "mean": self.mean_.astype(dtype),
                "scale": self.scale_.astype(dtype)}
        return (t * self.coef_.T).astype(dtype), (t * self.intercept_).astype(dtype), prep


class LogisticRegressionProbe(_LinearLBFGSProbe):
    """Multinomial logistic regression, L2, L-BFGS (float64, stable log-softmax).

    Params: C (inverse regularisation, scikit-learn's meaning; None = choose on validation),
    Cs (the sweep; default 45 log-spaced values 1e-6..1e5), refine (rounds of halving the
    log-interval around the best C, as CLIP does), patience (stop the sweep after that many Cs
    without a better validation accuracy; None sweeps all), val_fraction, seed, max_iter, tol
    (gradient tolerance of the final fit; None: 1e-5 for 'full', 3e-4 for 'subsample'),
    sweep_tol (looser, for the sweep's fits; None: 1e-4 for 'full', 1e-3 for 'subsample'),
    standardize,
    blas_threads (BLAS threads while fitting; None leaves the library's setting),
    sweep ('subsample', the default: choose C on a seeded stratified subsample of at most
    sweep_rows training rows, in n_jobs threads, then fit the chosen C once on all rows, its
    blocks of rows in n_jobs threads; both in float32; 'full': the original protocol, every C
    on every training row in one thread, float64), sweep_rows, n_jobs (None: the cores, at most 4).
    Learned: classes_, coef_ (K, D), intercept_ (K,), C_, val_scores_ {C: accuracy},
    mean_/scale_ (identity when standardize=False), n_iter_ (of the final fit).
    """

    kind = "logreg"
    _loss_grad = staticmethod(_logistic_loss_grad)
    _block = staticmethod(_logistic_block)

    def _targets(self, codes, k):
        return np.eye(k)[codes]

    def _cold_intercept(self, codes, k):
        # log class priors: the optimum for W = 0, so a strongly regularised C is solved from
        # the start (with the fast sweep's loose tolerance, a zero intercept stopped early, far
        # from it, and scored that C's validation accuracy wrong)
        counts = np.bincount(codes, minlength=k).astype(np.float64)
        return np.log(np.maximum(counts, 1.0) / len(codes))


class LinearSVMProbe(_LinearLBFGSProbe):
    """One-vs-rest linear SVM: squared hinge + L2, all K binary problems in one L-BFGS run.

    Same params and C selection as LogisticRegressionProbe. `predict_proba` is
    softmax(temperature_ * decision_function), with temperature_ fitted on the validation split
    by NLL (SVM scores are not probabilities; the ranking is what matters).
    """

    kind = "svm"
    _loss_grad = staticmethod(_squared_hinge_loss_grad)
    _block = staticmethod(_squared_hinge_block)

    def _targets(self, codes, k):
        return np.where(np.eye(k, dtype=bool)[codes], 1.0, -1.0)


# ---------------------------------------------------------------------------------------------
# Similarity probes

class NearestClassMeanProbe(Probe):
    """Nearest class mean, cosine: class means of L2-normalised features, renormalised.

    `predict_proba` is softmax(temperature_ * cosine). temperature=None fits it on a seeded
    stratified validation split by NLL (means from the rest), falling back to 10 when no split is
    possible; then the means are recomputed on all data.
    """

    kind = "ncm"
    _array_attrs = ("means_",)
    _scalar_attrs = ("temperature_", "n_features_in_")

    def __init__(self, temperature=None, val_fraction=0.2, seed=0):
        self.temperature = temperature
        self.val_fraction = val_fraction
        self.seed = seed

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


class KNNProbe(Probe):
    """k nearest neighbours by cosine similarity; probabilities are (weighted) vote fractions.

    k=None chooses k on a seeded stratified validation split from `ks`. weights: 'uniform' (one
    vote each) or 'similarity' (votes weighted by cosine similarity, clipped at 0). Ties go to
    the class listed first in classes_.
    """

    kind = "knn"
    _array_attrs = ("features_", "labels_")
    _scalar_attrs = ("k_", "n_features_in_")

    def __init__(self, k=None, ks=(1, 3, 5, 7, 11, 15, 21, 31, 51), weights="uniform",
                 val_fraction=0.2, seed=0, chunk_size=1024):
        self.k = k
        self.ks = ks
        self.weights = weights
        self.val_fraction = val_fraction
        self.seed = seed
        self.chunk_size = chunk_size

    def fit(self, X, y, X_val=None, y_val=None):
        if self.weights not in ("uniform", "similarity"):
            raise ValueError(f"weights must be 'uniform' or 'similarity', not {self.weights!r}")
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
            "a kNN probe has no linear form (runtime.fuse writes it with TopK and OneHot)")


# ---------------------------------------------------------------------------------------------
# Registry and persistence

PROBES = {
    "logreg": LogisticRegressionProbe,
    "svm": LinearSVMProbe,
    "ncm": NearestClassMeanProbe,
    "knn": KNNProbe,
}


def make_probe(kind: str, **params) -> Probe:
    """A new probe by kind ('logreg', 'svm', 'ncm', 'knn'); params go to its constructor."""
    if kind not in PROBES:
        raise ValueError(f"unknown probe kind {kind!r}; choose from {', '.join(PROBES)}")
    return PROBES[kind](**params)


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


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def save_probe(probe: Probe, path_dir: str, metadata: dict | None = None) -> None:
    """Write path_dir/probe.npz + path_dir/probe.json atomically (a temp folder renamed into
    place). An existing folder is replaced only if it holds a probe (probe.json)."""
    if not hasattr(probe, "classes_"):
        raise ValueError("cannot save an unfitted probe; call fit(X, y) first")
    path_dir = os.path.abspath(path_dir)
    if os.path.exists(path_dir) and (not os.path.isdir(path_dir) or (
            os.listdir(path_dir) and not os.path.exists(os.path.join(path_dir, "probe.json")))):
        raise FileExistsError(f"{path_dir} exists and is not a probe folder; choose another path")
    meta = dict(getattr(probe, "metadata_", {}) or {})
    meta.update(metadata or {})
    classes = probe.classes_
    doc = {
        "format": PROBE_FORMAT, "format_version": PROBE_FORMAT_VERSION,
        "kind": probe.kind,
        "params": {k: _jsonable(v) for k, v in probe.get_params().items()},
        "classes": [str(c) if classes.dtype.kind == "U" else int(c) for c in classes],
        "classes_dtype": "str" if classes.dtype.kind == "U" else "int",
        "feature_dim": int(probe.n_features_in_),
        "state": {a: _jsonable(getattr(probe, a)) for a in probe._scalar_attrs},
        "metadata": {k: _jsonable(v) for k, v in meta.items()},
    }
    from common.atomic import make_temp_dir, replace_folder
    parent = os.path.dirname(path_dir)
    tmp = make_temp_dir(parent, tag="probe")
    try:
        with open(os.path.join(tmp, "probe.npz"), "wb") as f:
            # typed Any: numpy's stub reads a ** dict as possibly binding allow_pickle: bool
            arrays: dict[str, Any] = {a: np.asarray(getattr(probe, a)) for a in probe._array_attrs}
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(tmp, "probe.json"), "w") as f:
            json.dump(doc, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        replace_folder(tmp, path_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


class ProbeFileError(UserError, ValueError):
    """A probe folder that cannot be loaded; the message names the file and the problem."""


def read_probe_json(path_dir: str) -> dict:
    path = os.path.join(path_dir, "probe.json")
    if os.path.isfile(path_dir):
        raise ProbeFileError(f"{path_dir}: is a file; give the probe folder (with probe.json "
                             "and probe.npz) written by `probe fit`")
    if not os.path.exists(path):
        raise ProbeFileError(f"{path_dir}: no probe.json here (fit one with `probe fit`)")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ProbeFileError(f"{path}: not valid JSON ({e}); refit the probe with `probe fit`"
                             ) from e
    if not isinstance(doc, dict) or doc.get("format") != PROBE_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ProbeFileError(f"{path}: not a unirep probe (format {found!r})")
    version = doc.get("format_version", 0)
    if not isinstance(version, int):
        raise ProbeFileError(f"{path}: format_version must be an integer, not {version!r}")
    if version > PROBE_FORMAT_VERSION:
        raise ProbeFileError(f"{path}: probe format {version} is newer than this toolkit "
                             f"understands ({PROBE_FORMAT_VERSION}); upgrade the toolkit")
    return doc


def _probe_from_doc(doc: dict, path: str) -> Probe:
    """The unfitted probe and its JSON state from probe.json, every field checked."""
    for key, kind in (("kind", str), ("params", dict), ("classes", list), ("state", dict),
                      ("feature_dim", int)):
        if not isinstance(doc.get(key), kind):
            raise ProbeFileError(f"{path}: '{key}' is missing or not a {kind.__name__}")
    if doc["kind"] not in PROBES:
        raise ProbeFileError(f"{path}: unknown probe kind {doc['kind']!r}; known: "
                             f"{sorted(PROBES)}")
    cls: type[Probe] = PROBES[doc["kind"]]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    params = {k: v for k, v in doc["params"].items() if k in accepted}
    try:
        if params.get("Cs") is not None:
            params["Cs"] = np.asarray(params["Cs"], dtype=np.float64)
        if params.get("ks") is not None:
            params["ks"] = tuple(params["ks"])
        probe = cls(**params)
    except (TypeError, ValueError) as e:
        raise ProbeFileError(f"{path}: bad params ({e})") from e
    unknown = sorted(set(doc["state"]) - set(cls._scalar_attrs))
    missing = sorted(set(cls._scalar_attrs) - set(doc["state"]))
    if unknown or missing:  # never setattr a name the file chose
        raise ProbeFileError(f"{path}: state keys {unknown or ''}{' unexpected' if unknown else ''}"
                             f"{'; ' if unknown and missing else ''}"
                             f"{missing or ''}{' missing' if missing else ''} for a "
                             f"{doc['kind']} probe (expected {list(cls._scalar_attrs)})")
    for name in cls._scalar_attrs:
        value = doc["state"][name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ProbeFileError(f"{path}: state '{name}' must be a finite number, not {value!r}")
        setattr(probe, name, value)
    if doc["state"]["n_features_in_"] != doc["feature_dim"] or doc["feature_dim"] <= 0:
        raise ProbeFileError(f"{path}: feature_dim {doc['feature_dim']} does not match state "
                             f"n_features_in_ {doc['state']['n_features_in_']}")
    dtype = str if doc.get("classes_dtype") == "str" else np.int64
    try:
        probe.classes_ = np.array(doc["classes"], dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ProbeFileError(f"{path}: classes are not all {doc.get('classes_dtype')} ({e})") from e
    if probe.classes_.ndim != 1 or len(probe.classes_) < 2:
        raise ProbeFileError(f"{path}: a probe needs a list of at least 2 classes")
    return probe


def _check_arrays(probe: Probe, path: str) -> None:
    """Shapes and values of the arrays against the classes and the feature dimension."""
    d, k = int(probe.n_features_in_), len(probe.classes_)
    shapes = {name: np.shape(getattr(probe, name)) for name in probe._array_attrs}
    expected: dict[str, tuple] = {}
    if isinstance(probe, _LinearLBFGSProbe):
        rows = shapes["coef_"][0] if shapes["coef_"] else -1
        if rows not in (k, 1):
            rows = k
        expected = {"coef_": (rows, d), "intercept_": (rows,), "mean_": (d,), "scale_": (d,)}
    elif isinstance(probe, NearestClassMeanProbe):
        expected = {"means_": (k, d)}
    elif isinstance(probe, KNNProbe):
        n = shapes["labels_"][0] if shapes["labels_"] else -1
        expected = {"features_": (n, d), "labels_": (n,)}
        labels = np.asarray(probe.labels_)
        if labels.dtype.kind not in "iu" or (labels.size and not (
                labels.min() >= 0 and labels.max() < k)):
            raise ProbeFileError(f"{path}: labels_ must be class indices in 0..{k - 1}")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise ProbeFileError(f"{path}: array '{name}' has shape {shapes[name]}, expected "
                                 f"{shape} for {k} classes and {d}-d features")
    for name in probe._array_attrs:
        arr = np.asarray(getattr(probe, name))
        if arr.dtype.kind not in "iuf":
            raise ProbeFileError(f"{path}: array '{name}' has dtype {arr.dtype}, expected numbers")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ProbeFileError(f"{path}: array '{name}' contains NaN or infinite values; "
                                 "refit the probe")


def load_probe(path_dir: str) -> Probe:
    """Load a probe saved by save_probe (numpy only; never unpickles). Every key, shape and
    value is checked against the probe's kind; ProbeFileError names the file and the problem."""
    doc = read_probe_json(path_dir)
    probe = _probe_from_doc(doc, os.path.join(path_dir, "probe.json"))
    npz = os.path.join(path_dir, "probe.npz")
    cls: type[Probe] = type(probe)
    try:
        with np.load(npz, allow_pickle=False) as arrays:
            unexpected = sorted(set(arrays.files) - set(cls._array_attrs))
            missing = sorted(set(cls._array_attrs) - set(arrays.files))
            if unexpected or missing:
                raise ProbeFileError(
                    f"{npz}: arrays {unexpected + missing} are "
                    f"{'unexpected' if unexpected else 'missing'} for a {cls.kind} probe "
                    f"(expected {list(cls._array_attrs)})")
            for name in cls._array_attrs:
                setattr(probe, name, arrays[name])
    except ProbeFileError:
        raise
    except FileNotFoundError as e:
        raise ProbeFileError(f"{npz}: missing; refit the probe with `probe fit`") from e
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError (pickled object arrays)...
        raise ProbeFileError(f"{npz}: unreadable ({type(e).__name__}: {e}); refit the probe "
                             "with `probe fit`") from e
    _check_arrays(probe, npz)
    metadata = doc.get("metadata", {})
    probe.metadata_ = metadata if isinstance(metadata, dict) else {}
    return probe


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
