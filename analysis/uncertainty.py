"""How sure a mean over seeds is: standard error, bootstrap interval, Welch's t-test.

Kept apart from the point estimates (stats.py), as rliable does: a table or plot says which of
these its ± or bars show. Every function takes a sequence of per-seed values and ignores the
non-finite ones (a diverged seed has no error to average).
"""

from __future__ import annotations

import math

import numpy as np


def finite(values) -> np.ndarray:
    """The finite values, as a float array."""
    values = np.asarray(values, dtype=float)
    return values[np.isfinite(values)]


def sem(values) -> float:
    """Standard error of the mean, std (ddof=1) / sqrt(n); NaN for n < 2."""
    v = finite(values)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def bootstrap_ci(values, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (`scipy.stats.bootstrap`, method="percentile"): (low, high);
    NaN for n < 2.

    10,000 resamples keep the Monte Carlo error of a 95% bound well below the spread of 5 seeds;
    `seed` makes the interval reproducible. Percentile, not scipy's default BCa: with 5 seeds, BCa's
    acceleration would be estimated by a jackknife over 5 points.
    """
    v = finite(values)
    if len(v) < 2:
        return math.nan, math.nan
    import scipy.stats  # imported here: scipy's import is slow and most callers never ask for an interval

    # random_state, not rng: rng= arrived in scipy 1.15, and pyproject accepts scipy 1.11
    result = scipy.stats.bootstrap((v,), np.mean, confidence_level=confidence, n_resamples=resamples,
                                   method="percentile", random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def welch_p(a, b) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) between two samples; NaN if n < 2."""
    a, b = finite(a), finite(b)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    import scipy.stats  # imported here: scipy's import is slow and most callers never test

    return float(scipy.stats.ttest_ind(a, b, equal_var=False).pvalue)
