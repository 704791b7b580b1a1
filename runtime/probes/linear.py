"""Linear probes fitted with L-BFGS: multinomial logistic regression and a one-vs-rest squared
hinge SVM, with C chosen on a validation split (the Kornblith et al. / CLIP protocol)."""
from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np

from common.params import Interval, StrOptions

from .base import Probe, register_probe
from .numerics import _blas_threads, _fit_temperature, _nll, _split_indices
from .objectives import (
    _BlockedObjective,
    _logistic_block,
    _logistic_loss_grad,
    _squared_hinge_block,
    _squared_hinge_loss_grad,
)

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
    _parameter_constraints = {
        "C": [Interval(float, 0, None, closed="neither"), None],
        "refine": [Interval(int, 0, None, closed="left")],
        "patience": [Interval(int, 1, None, closed="left"), None],
        "val_fraction": [Interval(float, 0, 1, closed="left")],
        "seed": [Interval(int, 0, None, closed="left")],
        "max_iter": [Interval(int, 1, None, closed="left")],
        "tol": [Interval(float, 0, None, closed="neither"), None],
        "sweep_tol": [Interval(float, 0, None, closed="neither"), None],
        "standardize": [bool],
        "blas_threads": [Interval(int, 1, None, closed="left"), None],
        "sweep": [StrOptions(SWEEPS)],
        "sweep_rows": [Interval(int, 2, None, closed="left"), None],
        "n_jobs": [Interval(int, 1, None, closed="left"), None],
    }

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

    def expected_array_shapes(self, shapes: dict[str, tuple]) -> dict[str, tuple]:
        d, k = int(self.n_features_in_), len(self.classes_)
        rows = shapes["coef_"][0] if shapes.get("coef_") else -1
        if rows not in (k, 1):
            rows = k
        return {"coef_": (rows, d), "intercept_": (rows,), "mean_": (d,), "scale_": (d,)}

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
        self._validate_params()
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


@register_probe
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


@register_probe
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

