"""Statistics over seeds: pure functions from runs (the shape in store.py) to small tables.

`aggregate` is the one grouping every table and plot shows: one row per configuration, the mean with its
95% Student t interval, the std (ddof=1) and n over its seeds, every run counted (flagged ones too, unless
asked otherwise). What happened to each run and how the conditions predicted it: outcomes.py. Intervals and
tests are in uncertainty.py; comparisons between groups and trends in comparisons.py; nothing here reads
MLflow or draws.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import pandas as pd

from stawm import schema
from stawm.config import field_types

from .store import varying_fields
from .uncertainty import CONFIDENCE, bootstrap_ci, finite, sem, t_interval

STAT_COLUMNS = ["n", "mean", "t_low", "t_high", "std", "sem", "min", "max", "flagged", "unfinished", "complete",
                "seeds_used", "values", "bootstrap_low", "bootstrap_high"]


def rate_fields() -> tuple[str, ...]:
    """The config fields of a memory-rate study: the rates (named as their metrics) and learnable_rates."""
    return (*schema.RATE_METRICS, "learnable_rates")


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of the finite values; std is NaN for n < 2."""
    v = finite(values)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def included(runs: pd.DataFrame, exclude_flagged: bool = False, include_unfinished: bool = False) -> pd.Series:
    """Which runs enter the statistics: by default every FINISHED run, flagged ones included (a flag is a
    prediction; leaving flagged runs out would hide what it predicted)."""
    keep = pd.Series(True, index=runs.index)
    if exclude_flagged:
        keep &= ~runs["flagged"].astype(bool)
    if not include_unfinished:
        keep &= runs["status"] == "FINISHED"
    return keep


def aggregate(runs: pd.DataFrame, by: Sequence[str] | None = None, metric: str | None = None,
              seeds_expected: int | None = None, exclude_flagged: bool = False,
              include_unfinished: bool = False, bootstrap: float | None = None) -> pd.DataFrame:
    """One row per configuration (the runs grouped by the `by` fields, i.e. without the seed).

    `by=None` groups by every varying config field; `metric` defaults to the test error. Columns:
    the `by` fields, then `n` (runs in the statistics with a finite metric), `mean`, `t_low`, `t_high`
    (its 95% Student t interval, uncertainty.t_interval; NaN for n=1), `std` (ddof=1, NaN for n=1),
    `sem`, `min`, `max`, `flagged` (flagged runs in the group, whether
    or not they are in the statistics), `unfinished` (runs not FINISHED, left out unless `include_unfinished`),
    `complete` (n >= seeds_expected; when `seeds_expected` is None, n equals the largest n of any
    group), `seeds_used` and `values` (the seeds and metric values used, by seed), and with `bootstrap`
    (a confidence, e.g. 0.95) `bootstrap_low`, `bootstrap_high`, a percentile bootstrap of the mean (for
    groups of many runs; not what the tables show). Flagged runs count in the statistics
    unless `exclude_flagged`. Settings are kept in `.attrs` (metric, by, seeds_expected,
    exclude_flagged) for the tables.
    """
    by = varying_fields(runs) if by is None else list(by)
    metric = metric or schema.TEST_ERROR
    if metric not in runs:
        raise KeyError(f"no run logged the metric {metric!r}")
    keep = included(runs, exclude_flagged, include_unfinished)
    groups = runs.groupby(by, dropna=False, sort=True) if by else [((), runs)]
    others = [f for f in field_types() if f in runs and f not in by and f != "seed"]
    rows, mixed = [], set()
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        # a field some runs did not record (added to the harness after they ran) is no difference: dropna
        mixed |= {f for f in others if group[f].nunique(dropna=True) > 1}
        used = group[keep.loc[group.index] & np.isfinite(group[metric].astype(float))].sort_values("seed")
        values = used[metric].to_numpy(dtype=float)
        mean, std = mean_std(values)
        row = dict(zip(by, key))
        t_low, t_high = t_interval(values, CONFIDENCE)
        row.update(n=len(values), mean=mean, t_low=t_low, t_high=t_high, std=std, sem=sem(values),
                   min=float(values.min()) if len(values) else math.nan,
                   max=float(values.max()) if len(values) else math.nan,
                   flagged=int(group["flagged"].sum()), unfinished=int((group["status"] != "FINISHED").sum()),
                   seeds_used=tuple(int(s) for s in used["seed"]), values=tuple(float(v) for v in values))
        if bootstrap is not None:
            row["bootstrap_low"], row["bootstrap_high"] = bootstrap_ci(values, confidence=bootstrap)
        rows.append(row)
    if mixed:
        warnings.warn(f"runs grouped together differ in {sorted(mixed)}: add them to `by` "
                      f"to keep those configurations apart", stacklevel=2)
    agg = pd.DataFrame(rows)
    target = seeds_expected if seeds_expected is not None else agg["n"].max()
    agg.insert(agg.columns.get_loc("unfinished") + 1, "complete", agg["n"] >= target)
    agg.attrs.update(metric=metric, by=by, seeds_expected=seeds_expected, exclude_flagged=exclude_flagged,
                     confidence=CONFIDENCE)
    return agg


def learnable(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that trained their memory rates (`learnable_rates`)."""
    return runs[runs["learnable_rates"].fillna(False).astype(bool)]
