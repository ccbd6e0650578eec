"""How sure a mean over seeds is, and how sure a comparison is: t interval, Welch, Spearman, bootstrap.

Kept apart from the point estimates (stats.py), as rliable does: a table or plot says which of
these its interval shows. Every function takes sequences of per-run values and ignores the
non-finite ones (a diverged seed has no error to average); callers that must not lose a run say
how many they left out.

The headline interval of a mean is Student's t: mean ± t_{(1+c)/2, n-1} · s / sqrt(n), with s the
std (ddof=1). With 3 to 5 seeds it is the interval that keeps its coverage if the seeds' errors are
roughly normal; a percentile bootstrap of 3-5 values does not (it has no t factor: with n = 5 its
95% interval is about mean ± 1.96 · sqrt(4/5) · s/sqrt(n) = ± 1.75 · s/sqrt(n) instead of
± 2.78 · s/sqrt(n), and it has only 126 distinct resamples), so `bootstrap_ci` is kept for groups
of many runs, never for a table's cells.
"""

from __future__ import annotations

import math

import numpy as np

CONFIDENCE = 0.95  # the level of every interval the tables and figures show


def finite(values) -> np.ndarray:
    """The finite values, as a float array."""
    values = np.asarray(values, dtype=float)
    return values[np.isfinite(values)]


def sem(values) -> float:
    """Standard error of the mean, std (ddof=1) / sqrt(n); NaN for n < 2."""
    v = finite(values)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def t_quantile(confidence: float, df: float) -> float:
    """t_{(1+confidence)/2, df}: the two-sided critical value of Student's t."""
    import scipy.stats  # imported here: scipy's import is slow and most callers never ask for an interval

    return float(scipy.stats.t.ppf((1 + confidence) / 2, df))


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student's t interval of the mean: mean ± t_{(1+c)/2, n-1} · s/sqrt(n), s the std (ddof=1); (low, high),
    NaN for n < 2. For [1, 2, 3, 4, 5]: 3 ± 2.7764 · 1.5811/sqrt(5) = 3 ± 1.9632."""
    v = finite(values)
    if len(v) < 2:
        return math.nan, math.nan
    half = t_quantile(confidence, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def t_errorbar(values) -> tuple[float, float]:
    """`t_interval` at CONFIDENCE as seaborn's `errorbar=` callable (the same interval as the tables)."""
    return t_interval(values)


def bootstrap_ci(values, confidence: float = CONFIDENCE, resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (`scipy.stats.bootstrap`, method="percentile"): (low, high);
    NaN for n < 2. For a group of many runs (tens), not for 3-5 seeds: see the module's docstring.

    10,000 resamples keep the Monte Carlo error of a 95% bound small; `seed` makes the interval
    reproducible. Percentile, not scipy's default BCa: on few points, BCa's acceleration would be
    estimated by a jackknife over those few points.
    """
    v = finite(values)
    if len(v) < 2:
        return math.nan, math.nan
    import scipy.stats  # imported here: scipy's import is slow and most callers never ask for an interval

    # random_state, not rng: rng= arrived in scipy 1.15, and pyproject accepts scipy 1.11
    result = scipy.stats.bootstrap((v,), np.mean, confidence_level=confidence, n_resamples=resamples,
                                   method="percentile", random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def welch(a, b, confidence: float = CONFIDENCE) -> dict:
    """Two groups of runs compared: the difference of means `diff` = mean(a) - mean(b) with its Welch interval
    (`low`, `high`: diff ± t_{(1+c)/2, df} · se, se = sqrt(s_a²/n_a + s_b²/n_b), df by Welch-Satterthwaite),
    the two-sided p-value of Welch's t-test `p`, `t`, `df`, and `n_a`, `n_b`, `mean_a`, `mean_b`.
    Interval, t and p are NaN when a group has fewer than 2 values or both have no spread (se = 0)."""
    a, b = finite(a), finite(b)
    out = dict(n_a=len(a), n_b=len(b), mean_a=float(a.mean()) if len(a) else math.nan,
               mean_b=float(b.mean()) if len(b) else math.nan)
    out["diff"] = out["mean_a"] - out["mean_b"]
    out.update(low=math.nan, high=math.nan, t=math.nan, df=math.nan, p=math.nan)
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return out
    import scipy.stats

    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = out["diff"] / se
    half = t_quantile(confidence, df) * se
    out.update(low=out["diff"] - half, high=out["diff"] + half, t=float(t), df=float(df),
               p=float(2 * scipy.stats.t.sf(abs(t), df)))
    return out


def welch_p(a, b) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) between two samples; NaN if n < 2."""
    return welch(a, b)["p"]


def spearman(x, y, confidence: float = CONFIDENCE) -> dict:
    """A trend: Spearman's rank correlation `rho` of y against x over the pairs where both are finite (ties get
    average ranks), `n` pairs, the two-sided `p` of scipy's `spearmanr` (a t test on rho with n - 2 degrees of
    freedom), and a `low`, `high` interval by Fisher's z with Bonett and Wright's (2000) variance for Spearman's
    rho: tanh(atanh(rho) ± z_{(1+c)/2} · sqrt((1 + rho²/2) / (n - 3))). NaN below 4 pairs (no interval) or 3
    (no rho) or when either variable is constant; at |rho| = 1 the interval closes on rho itself."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out = dict(n=int(len(x)), rho=math.nan, low=math.nan, high=math.nan, p=math.nan)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    import scipy.stats

    result = scipy.stats.spearmanr(x, y)
    rho = float(result.statistic)
    out.update(rho=rho, p=float(result.pvalue))
    if len(x) > 3 and abs(rho) >= 1:  # atanh(±1) is infinite: the interval is the point
        out.update(low=rho, high=rho)
    elif len(x) > 3:
        z = math.atanh(rho)
        half = float(scipy.stats.norm.ppf((1 + confidence) / 2)) * math.sqrt((1 + rho ** 2 / 2) / (len(x) - 3))
        out.update(low=math.tanh(z - half), high=math.tanh(z + half))
    return out
