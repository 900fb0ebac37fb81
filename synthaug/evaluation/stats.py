"""Statistics over seeds: spread per arm, and paired comparisons of two arms.

Each seed of a sweep trains every arm on the same split (same real images, same adapter, same
classifier initialisation), so arm A and arm B are compared *paired*, seed by seed: the
differences ``d_s = A_s - B_s`` carry the comparison, and the split-to-split variation that both
arms share cancels out.

* :func:`describe`: mean, sample standard deviation (ddof 1), min, max, n.
* :func:`paired_comparison`: the mean difference with a percentile bootstrap confidence interval
  (seeds resampled with replacement, ``n_boot`` times, seeded), a two-sided sign-flip permutation
  test (exact over all ``2**n`` sign patterns up to n = 16 seeds, Monte Carlo beyond), and the
  paired t-test for reference. With 5 seeds the smallest two-sided permutation p-value possible is
  2/32 = 0.0625: five seeds can show a consistent direction, not significance at 0.05. The
  report says so rather than hiding it.
"""

from __future__ import annotations

import itertools
import math
from typing import Dict, Sequence

import numpy as np

__all__ = ["describe", "paired_comparison", "sign_flip_pvalue", "bootstrap_ci"]

EXACT_PERMUTATION_MAX_N = 16


def describe(values: Sequence[float]) -> Dict[str, float]:
    """``{"mean", "std", "min", "max", "n"}`` of finite ``values`` (std with ddof 1; 0 for n = 1)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "min": float(x.min()),
        "max": float(x.max()),
        "n": int(x.size),
    }


def bootstrap_ci(diffs: Sequence[float], *, confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0):
    """Percentile bootstrap interval of the mean of ``diffs`` (resampled with replacement)."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return float("nan"), float("nan")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(int(n_boot), d.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def sign_flip_pvalue(diffs: Sequence[float], *, n_perm: int = 100_000, seed: int = 0) -> float:
    """Two-sided p-value of "the mean paired difference is 0" by flipping signs.

    Under the null each difference is as likely positive as negative; the p-value is the share of
    sign patterns whose |mean| is at least the observed one. Exact (all ``2**n`` patterns) for
    ``n <= 16``; otherwise ``n_perm`` random patterns (the observed one counted, so p > 0).
    """
    d = np.asarray(diffs, dtype=float)
    n = d.size
    if n == 0:
        return float("nan")
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if n <= EXACT_PERMUTATION_MAX_N:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        stats = np.abs(signs @ d) / n
        return float(np.mean(stats >= observed - tol))
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(int(n_perm), n))
    stats = np.abs(signs @ d) / n
    return float((np.sum(stats >= observed - tol) + 1) / (n_perm + 1))


def paired_comparison(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> Dict[str, float]:
    """Compare arm ``a`` to arm ``b`` over paired seeds (``a[i]`` and ``b[i]`` share seed i).

    Returns ``{"n", "mean_diff", "std_diff", "ci_low", "ci_high", "confidence", "p_sign_flip",
    "p_ttest", "wins", "losses", "ties"}``; ``p_ttest`` is NaN when it is undefined (n < 2 or
    all differences equal).

    Raises:
        ValueError: ``a`` and ``b`` differ in length.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two 1-D sequences of one length, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    low, high = bootstrap_ci(d, confidence=confidence, n_boot=n_boot, seed=seed)
    p_t = float("nan")
    if d.size >= 2 and np.ptp(d) > 0:
        from scipy.stats import ttest_rel

        p_t = float(ttest_rel(a[keep], b[keep]).pvalue)
    return {
        "n": int(d.size),
        "mean_diff": float(d.mean()) if d.size else float("nan"),
        "std_diff": float(d.std(ddof=1)) if d.size > 1 else (0.0 if d.size else float("nan")),
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
        "p_sign_flip": sign_flip_pvalue(d, seed=seed),
        "p_ttest": p_t,
        "wins": int(np.sum(d > 0)),
        "losses": int(np.sum(d < 0)),
        "ties": int(np.sum(d == 0)),
    }


def format_mean_std(stats: Dict[str, float], digits: int = 3) -> str:
    if not stats or stats.get("n", 0) == 0 or math.isnan(stats["mean"]):
        return "–"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
