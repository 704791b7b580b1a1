"""Universality metrics: how much better a representation transfers than a reference, over targets.

Definitions follow `shared/reference/universality.md`:

- NRG (normalised relative gain, Tamaazousti et al., TPAMI 2020) of a model on target j, with
  scores in percent and a ceiling of 100:  (s_j - s_j^ref) / (100 - s_j^ref).
  A gain near the ceiling weighs more than the same gain far from it. The denominator is floored
  at `EPSILON` (in percent points) so that a reference at 100% gives a finite number: 0 for a
  model that ties it, a huge negative number for one below it (the median shrugs that off).
- mNRG = 100 x median over targets of NRG; aNRG = 100 x the mean.
- Kornblith et al. (2019) aggregate accuracies as the mean of logit(accuracy).

Scores may be given in percent (0..100) or as fractions (0..1): by default, when every score of a
call is within [0, 1] and `max_score` is left at 100, they are read as fractions and converted;
pass `fractions=True/False` to say which explicitly (a model scoring under 1% everywhere).
Pure NumPy: no torch.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

EPSILON = 1e-6          # floor of the NRG denominator, in percent points
LOGIT_CLIP = 1e-3       # accuracies are clipped to [LOGIT_CLIP, 1 - LOGIT_CLIP] before logit


def _aligned(scores, ref_scores) -> tuple[np.ndarray, np.ndarray]:
    """Two score collections -> aligned float arrays. Mappings are aligned by target name."""
    if isinstance(scores, Mapping) or isinstance(ref_scores, Mapping):
        if not (isinstance(scores, Mapping) and isinstance(ref_scores, Mapping)):
            raise TypeError("give both scores and ref_scores as mappings {target: score}, or both "
                            "as sequences in the same target order")
        if set(scores) != set(ref_scores):
            raise ValueError(f"scores and reference cover different targets: "
                             f"{sorted(scores)} vs {sorted(ref_scores)}")
        keys = list(scores)
        scores, ref_scores = [scores[k] for k in keys], [ref_scores[k] for k in keys]
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    r = np.asarray(ref_scores, dtype=np.float64).reshape(-1)
    if s.shape != r.shape:
        raise ValueError(f"{s.size} scores but {r.size} reference scores; one per target each")
    if s.size == 0:
        raise ValueError("no targets: NRG needs at least one score")
    if not (np.isfinite(s).all() and np.isfinite(r).all()):
        raise ValueError("scores must be finite numbers")
    return s, r


def nrg(scores, ref_scores, max_score: float = 100.0, fractions: bool | None = None
        ) -> np.ndarray:
    """Normalised relative gain per target (not x100): (s - ref) / max(max_score - ref, EPSILON).

    `scores` and `ref_scores` are sequences in the same target order or mappings {target: score}
    (then the result follows the key order of `scores`). `fractions`: True converts 0..1 scores to
    percent, False takes them as given, None (default) converts when every score is in [0, 1].
    """
    s, r = _aligned(scores, ref_scores)
    if fractions is None:
        fractions = (max_score == 100.0 and max(s.max(), r.max()) <= 1.0
                     and min(s.min(), r.min()) >= 0.0)
    if fractions:
        s, r = s * 100.0, r * 100.0     # fractions -> percent
    if (s > max_score).any() or (r > max_score).any():
        raise ValueError(f"a score exceeds max_score={max_score}; are they in percent?")
    epsilon = EPSILON * max_score / 100.0
    return (s - r) / np.maximum(max_score - r, epsilon)


def mnrg(scores, ref_scores, max_score: float = 100.0, fractions: bool | None = None) -> float:
    """100 x median over targets of NRG: the TPAMI universality score (0 = as good as the reference)."""
    return float(100.0 * np.median(nrg(scores, ref_scores, max_score, fractions)))


def anrg(scores, ref_scores, max_score: float = 100.0, fractions: bool | None = None) -> float:
    """100 x mean over targets of NRG (sensitive to a single outlier target, unlike mNRG)."""
    return float(100.0 * np.mean(nrg(scores, ref_scores, max_score, fractions)))


def _as_fractions(accuracies) -> np.ndarray:
    a = np.asarray(list(accuracies.values()) if isinstance(accuracies, Mapping) else accuracies,
                   dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError("no accuracies given")
    if a.max() > 1.0:
        a = a / 100.0   # percent -> fractions
    if a.min() < 0.0 or a.max() > 1.0:
        raise ValueError("accuracies must be fractions in [0, 1] or percents in [0, 100]")
    return a


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), LOGIT_CLIP, 1.0 - LOGIT_CLIP)
    return np.log(p) - np.log1p(-p)


def logit_mean(accuracies) -> float:
    """Kornblith et al.'s aggregate: mean over targets of logit(accuracy), accuracies clipped to
    [LOGIT_CLIP, 1 - LOGIT_CLIP] so a perfect score stays finite. Percents are converted."""
    return float(np.mean(logit(_as_fractions(accuracies))))


def sigmoid(x: float) -> float:
    """Inverse of logit: turns a logit mean back into an accuracy-like number in (0, 1)."""
    return float(1.0 / (1.0 + np.exp(-x)))


def mean_per_class_accuracy(y_true, y_pred) -> float:
    """Mean over the classes present in `y_true` of the fraction of their items predicted right
    (balanced accuracy): every class counts the same however many test items it has."""
    y_true, y_pred = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.size} true labels but {y_pred.size} predictions")
    if y_true.size == 0:
        raise ValueError("no test items")
    recalls = [np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]
    return float(np.mean(recalls))


def top1_accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"{y_true.size} true labels but {y_pred.size} predictions")
    return float(np.mean(y_true == y_pred))


def aggregate_models(models: Mapping[str, dict], reference: str | None = None,
                     metric: str = "top1") -> dict[str, dict]:
    """Per-model aggregates over targets from a report's `models` section.

    Each model entry needs `targets: {target: {metric: fraction}}`. Returns
    {name: {"mean", "logit_mean", "mnrg", "anrg"}} with mean as a fraction and mNRG/aNRG x100
    relative to `reference` (None when no reference). Every model must cover the same targets as
    the reference. The study can call this again with another reference without re-running.
    """
    if reference is not None and reference not in models:
        raise ValueError(f"reference {reference!r} is not among the models: {sorted(models)}")
    ref_scores = ({t: r[metric] for t, r in models[reference]["targets"].items()}
                  if reference is not None else None)
    out = {}
    for name, entry in models.items():
        scores = {t: r[metric] for t, r in entry["targets"].items()}
        accs = _as_fractions(scores)
        out[name] = {
            "mean": float(np.mean(accs)),
            "logit_mean": logit_mean(accs),
            "mnrg": mnrg(scores, ref_scores, fractions=True) if ref_scores else None,
            "anrg": anrg(scores, ref_scores, fractions=True) if ref_scores else None,
        }
    return out


# ---------------------------------------------------------------------------------------------
# Seed noise: intervals and paired comparisons (accuracies as fractions; differences likewise)

def t_quantile(confidence: float, df: int) -> float:
    """Two-sided Student t quantile, e.g. 4.30 for 95% with 2 degrees of freedom."""
    from scipy.stats import t
    return float(t.ppf(0.5 + confidence / 2.0, df))


def mean_interval(values, confidence: float = 0.95, bounds: tuple[float, float] | None = None
                  ) -> dict:
    """Mean and t interval of repeated measurements (seeds): {"mean", "low", "high", "n"}.
    With one value the interval is undefined (NaN): one seed says nothing about seed noise.
    `bounds` clips the interval to the values' range (accuracies: (0, 1)); with two seeds the
    t quantile is 12.7 and an unclipped interval easily passes 100%."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("no values to summarise")
    mean = float(v.mean())
    if v.size < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "n": 1}
    half = t_quantile(confidence, v.size - 1) * float(v.std(ddof=1)) / np.sqrt(v.size)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return {"mean": mean, "low": low, "high": high, "n": int(v.size)}


def _verdict(out: dict) -> dict:
    # "larger than seed noise": the interval of the difference excludes 0. A zero-width
    # interval (two seeds whose differences happen to be equal: accuracies are multiples of
    # 1/test size) estimates no noise at all, so it is no evidence either way.
    out["significant"] = bool(np.isfinite(out["low"]) and out["high"] > out["low"]
                              and (out["low"] > 0 or out["high"] < 0))
    return out


def paired_difference(a, b, confidence: float = 0.95) -> dict:
    """a - b over pairs that share everything but the factor compared (same seed index, same
    split): mean difference with a t interval over the pairs, and whether it excludes 0."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs as many values on each side ({a.size} vs "
                         f"{b.size})")
    s = mean_interval(a - b, confidence)
    return _verdict({"diff": s["mean"], "low": s["low"], "high": s["high"], "n": s["n"],
                     "method": "paired t"})


def welch_difference(a, b, confidence: float = 0.95) -> dict:
    """mean(a) - mean(b) for unpaired samples of different sizes (Welch's t interval)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    diff = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return _verdict({"diff": diff, "low": float("nan"), "high": float("nan"),
                         "n": int(min(a.size, b.size)), "method": "welch t"})
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = float(np.sqrt(va + vb))
    if se == 0.0:
        return _verdict({"diff": diff, "low": diff, "high": diff,
                         "n": int(min(a.size, b.size)), "method": "welch t"})
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    half = t_quantile(confidence, df) * se
    return _verdict({"diff": diff, "low": diff - half, "high": diff + half,
                     "n": int(min(a.size, b.size)), "method": "welch t"})


def bootstrap_difference(correct_a, correct_b, confidence: float = 0.95, n_boot: int = 2000,
                         seed: int = 0) -> dict:
    """Accuracy of a minus b on the same test images, with a paired bootstrap over the images
    (the fallback when there is one model and one seed per side: it covers the test-set noise,
    not the training-seed noise). Several targets may be given as lists of per-image arrays:
    each is resampled on its own and the difference is averaged over targets."""
    if isinstance(correct_a, np.ndarray) and correct_a.ndim == 1:
        correct_a, correct_b = [correct_a], [correct_b]
    rng = np.random.default_rng(seed)
    diffs = np.zeros(n_boot)
    point = 0.0
    for ca, cb in zip(correct_a, correct_b):
        d = np.asarray(ca, dtype=np.float64) - np.asarray(cb, dtype=np.float64)
        if d.size == 0:
            raise ValueError("no test images to bootstrap")
        point += d.mean()
        for i in range(n_boot):
            diffs[i] += d[rng.integers(0, d.size, d.size)].mean()
    k = len(correct_a)
    diffs /= k
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    return _verdict({"diff": float(point / k), "low": float(low), "high": float(high),
                     "n": int(sum(len(c) for c in correct_a)), "method": "paired bootstrap"})
