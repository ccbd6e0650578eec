"""Statistics over seeds: pure functions from runs (the shape in store.py) to small tables.

`aggregate` is the one grouping every table and plot shows: one row per configuration, mean and
std (ddof=1) over its seeds, with the runs it left out counted. The Appendix A outcome of each run
and how the failed conditions co-occur with divergence are here too. Intervals and tests are in
uncertainty.py; nothing here reads MLflow or draws.
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
from .uncertainty import bootstrap_ci, finite, sem

STAT_COLUMNS = ["n", "mean", "std", "sem", "min", "max", "flagged", "unfinished", "complete",
                "seeds_used", "values"]
OUTCOMES = ("passed", "flagged during training", "flagged before training", "diverged")


def rate_fields() -> tuple[str, ...]:
    """The config fields of a memory-rate study: the rates (named as their metrics) and learnable_rates."""
    return (*schema.RATE_METRICS, "learnable_rates")


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of the finite values; std is NaN for n < 2."""
    v = finite(values)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def included(runs: pd.DataFrame, include_flagged: bool = False, include_unfinished: bool = False) -> pd.Series:
    """Which runs enter the statistics: by default FINISHED and not flagged."""
    keep = pd.Series(True, index=runs.index)
    if not include_flagged:
        keep &= ~runs["flagged"].astype(bool)
    if not include_unfinished:
        keep &= runs["status"] == "FINISHED"
    return keep


def aggregate(runs: pd.DataFrame, by: Sequence[str] | None = None, metric: str | None = None,
              seeds_expected: int | None = None, include_flagged: bool = False,
              include_unfinished: bool = False, ci: float | None = None) -> pd.DataFrame:
    """One row per configuration (the runs grouped by the `by` fields, i.e. without the seed).

    `by=None` groups by every varying config field; `metric` defaults to the test error. Columns:
    the `by` fields, then `n` (runs in the statistics with a finite metric), `mean`, `std`
    (ddof=1, NaN for n=1), `sem`, `min`, `max`, `flagged` (flagged runs in the group, counted even
    when left out), `unfinished` (runs not FINISHED, left out unless `include_unfinished`),
    `complete` (n >= seeds_expected; when `seeds_expected` is None, n equals the largest n of any
    group), `seeds_used` and `values` (the seeds and metric values used, by seed), and with `ci` (e.g.
    0.95) `ci_low`, `ci_high` of a bootstrap of the mean. Flagged runs are left out of the
    statistics unless `include_flagged`. Settings are kept in `.attrs` (metric, by,
    seeds_expected, include_flagged) for the tables.
    """
    by = varying_fields(runs) if by is None else list(by)
    metric = metric or schema.TEST_ERROR
    if metric not in runs:
        raise KeyError(f"no run logged the metric {metric!r}")
    keep = included(runs, include_flagged, include_unfinished)
    groups = runs.groupby(by, dropna=False, sort=True) if by else [((), runs)]
    others = [f for f in field_types() if f in runs and f not in by and f != "seed"]
    rows, mixed = [], set()
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        mixed |= {f for f in others if group[f].nunique(dropna=False) > 1}
        used = group[keep.loc[group.index] & np.isfinite(group[metric].astype(float))].sort_values("seed")
        values = used[metric].to_numpy(dtype=float)
        mean, std = mean_std(values)
        row = dict(zip(by, key))
        row.update(n=len(values), mean=mean, std=std, sem=sem(values),
                   min=float(values.min()) if len(values) else math.nan,
                   max=float(values.max()) if len(values) else math.nan,
                   flagged=int(group["flagged"].sum()), unfinished=int((group["status"] != "FINISHED").sum()),
                   seeds_used=tuple(int(s) for s in used["seed"]), values=tuple(float(v) for v in values))
        if ci is not None:
            row["ci_low"], row["ci_high"] = bootstrap_ci(values, confidence=ci)
        rows.append(row)
    if mixed:
        warnings.warn(f"runs grouped together differ in {sorted(mixed)}: add them to `by` "
                      f"to keep those configurations apart", stacklevel=2)
    agg = pd.DataFrame(rows)
    target = seeds_expected if seeds_expected is not None else agg["n"].max()
    agg.insert(agg.columns.get_loc("unfinished") + 1, "complete", agg["n"] >= target)
    agg.attrs.update(metric=metric, by=by, seeds_expected=seeds_expected, include_flagged=include_flagged)
    return agg


# --- the Appendix A outcome of each run -----------------------------------------------------------


def outcome(runs: pd.DataFrame) -> pd.Series:
    """Each run's Appendix A outcome, one of OUTCOMES (divergence first, then the static verdict)."""
    return pd.Series(np.select(
        [runs["diverged"].astype(bool), ~runs["static_ok"].astype(bool), runs["flagged"].astype(bool)],
        ["diverged", "flagged before training", "flagged during training"], "passed"), index=runs.index)


def outcome_table(runs: pd.DataFrame, by: Sequence[str] | None = None) -> pd.DataFrame:
    """Number of runs of each outcome (columns OUTCOMES) per configuration of the `by` fields
    (default: the rate fields)."""
    by = list(rate_fields() if by is None else by)
    counts = runs.assign(outcome=pd.Categorical(outcome(runs), OUTCOMES)).groupby(
        by, dropna=False, observed=True)["outcome"].value_counts().unstack(fill_value=0)
    counts = counts.reindex(columns=list(OUTCOMES), fill_value=0).reset_index()
    counts.columns.name = None
    return counts


def flag_divergence(runs: pd.DataFrame) -> pd.DataFrame:
    """Which Appendix A conditions co-occur with divergence: one row per failed condition.

    Columns: flag, runs (runs that failed it), diverged (of those), diverged_fraction; a last
    row "(none)" counts runs without any failed condition.
    """
    flag_sets = runs["flags"].fillna("").map(lambda s: {f.strip() for f in s.split(",") if f.strip()})
    rows = []
    for flag in sorted(set().union(*flag_sets)) + ["(none)"]:
        has = flag_sets.map(lambda s: not s if flag == "(none)" else flag in s)
        n, d = int(has.sum()), int((has & runs["diverged"]).sum())
        rows.append(dict(flag=flag, runs=n, diverged=d, diverged_fraction=d / n if n else math.nan))
    return pd.DataFrame(rows)


def learnable(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that trained their memory rates (`learnable_rates`)."""
    return runs[runs["learnable_rates"].fillna(False).astype(bool)]


# --- do the Appendix A conditions predict which runs fail to train? ---------------------------------


def failed_to_train(runs: pd.DataFrame, threshold: float, metric: str | None = None) -> pd.Series:
    """True where a run diverged, or its final `metric` is above `threshold` (a fraction) or missing."""
    errors = runs[metric or schema.TEST_ERROR].astype(float)
    return runs["diverged"].astype(bool) | ~(errors <= threshold)  # NaN compares False: counted as failed


def first_failed(stability: pd.DataFrame) -> pd.DataFrame:
    """The long stability frame (source.py) as one row per run, one column per condition: the epoch it
    first failed (0: before training), NaN where it never did."""
    wide = stability.pivot(index="run_id", columns="condition", values="first_failed_epoch")
    wide.columns.name = None
    return wide


def contingency(flagged: pd.Series, failed: pd.Series) -> pd.DataFrame:
    """Counts of runs, flagged or not against failed to train or not, with totals (a 3 x 3 table)."""
    table = pd.crosstab(flagged.map({True: "flagged", False: "not flagged"}),
                        failed.map({True: "failed to train", False: "trained"}), margins=True, margins_name="total")
    order = [r for r in ("flagged", "not flagged", "total") if r in table.index]
    columns = [c for c in ("failed to train", "trained", "total") if c in table.columns]
    table = table.reindex(index=order, columns=columns, fill_value=0)
    table.index.name, table.columns.name = None, None
    return table


def condition_table(first: pd.DataFrame, failed: pd.Series, kinds: dict[str, str]) -> pd.DataFrame:
    """Per Appendix A condition: how many runs it flagged (before or during training), how many of those
    failed to train (precision), and how many failed runs it caught (recall).

    first: `first_failed` (index run_id); failed: by run_id; kinds: condition -> static/runtime/informational.
    """
    failed = failed.reindex(first.index).astype(bool)
    rows = []
    for condition in first.columns:
        epochs = first[condition]
        hit = epochs.notna()
        rows.append(dict(condition=condition, kind=kinds.get(condition, ""), flagged=int(hit.sum()),
                         before_training=int((epochs == 0).sum()), during_training=int((epochs > 0).sum()),
                         flagged_and_failed=int((hit & failed).sum()),
                         failed_not_flagged=int((~hit & failed).sum()),
                         precision=float((hit & failed).sum() / hit.sum()) if hit.any() else math.nan,
                         recall=float((hit & failed).sum() / failed.sum()) if failed.any() else math.nan))
    return pd.DataFrame(rows)
