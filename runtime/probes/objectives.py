"""Loss kernels of the linear probes and the blocked, threaded objective of the fast sweep.

`logistic_loss_grad` / `squared_hinge_loss_grad` are the float64 objectives of the 'full'
sweep; `BlockedObjective` computes the same loss over float32 rows in cache-sized blocks, in
threads (see its docstring for why).
"""
from __future__ import annotations

import numpy as np


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

