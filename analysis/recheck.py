"""The conditions re-checked on the rates a run recorded: its configured rates (epoch 0) and, when they learned,
the rates at the end of each epoch, as the run's own monitor checks them (`stawm.model.stability.StabilityMonitor`,
with `stawm.conditions`), with one difference: an epoch whose learned rates are not all finite is left out of
the conditions and counts as the outcome `diverged`.

Why: `stawm.conditions.check` fails every condition on the rates (`rates`, `writes`, `decay`) for a NaN or inf
rate, so a run whose rate went non-finite would be flagged by the very thing that happened to it, and the
conditions would "predict" divergence perfectly by restating it. A non-finite rate is what happened (an outcome);
the conditions are judged on the finite epochs before it.

For runs logged before the conditions were rewritten (their `stability.flags` name `bound`, `finite` and a
`decay` that was not labelled derived), so that shipped results are read with today's conditions without
training again. `diverged` stays what the run measured, or-ed with a non-finite recorded rate.
"""

from __future__ import annotations

import math

import pandas as pd

from stawm import schema
from stawm.conditions import CONDITIONS, failed, note_failures


def _finite(rates: dict) -> bool:
    return all(math.isfinite(float(rates[name])) for name in schema.RATE_METRICS)


def first_failed_epochs(activation: str, rates: list[tuple[int, dict]]) -> dict[str, int]:
    """condition -> the first epoch it failed, over `rates`: (epoch, {delta, eta, theta}) in epoch order. Epochs
    whose rates are not all finite are skipped (an outcome: see the module's docstring)."""
    first: dict[str, int] = {}
    for epoch, r in rates:
        if _finite(r):
            note_failures(first, epoch, activation, r["delta"], r["eta"], r["theta"])
    return first


def _rate_table(history: pd.DataFrame) -> pd.DataFrame:
    return history[history["metric"].isin(schema.RATE_METRICS)].pivot_table(
        index=["run_id", "step"], columns="metric", values="value", dropna=False)


def nonfinite_rates(history: pd.DataFrame) -> pd.Series:
    """run_id -> the first epoch at which a recorded rate was NaN or inf (only runs that had one)."""
    if not len(history):
        return pd.Series(dtype=int)
    rates = history[history["metric"].isin(schema.RATE_METRICS)]
    bad = rates[~rates["value"].astype(float).map(math.isfinite)]
    return bad.groupby("run_id")["step"].min().astype(int)


def with_rate_divergence(runs: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """runs with `diverged` also true where a learned rate was recorded non-finite (the outcome it is)."""
    return runs.assign(diverged=runs["diverged"].astype(bool) | runs["run_id"].isin(nonfinite_rates(history).index))


def recheck(runs: pd.DataFrame, history: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs with `stability_ok`, `flags`, `flagged`, `static_ok` recomputed and `diverged` or-ed with a
    non-finite recorded rate; the long stability frame in source.py's shape). history: the long metric
    histories, holding the rates for runs that learned them."""
    rate_history = _rate_table(history) if len(history) else pd.DataFrame(
        index=pd.MultiIndex.from_arrays([[], []], names=["run_id", "step"]))
    runs, rows = with_rate_divergence(runs.copy(), history), []
    for i, run in runs.iterrows():
        rates = [(0, {name: float(run[name]) for name in schema.RATE_METRICS})]
        if bool(run["learnable_rates"]) and run["run_id"] in rate_history.index.get_level_values(0):
            rates += [(int(step), dict(r)) for step, r in rate_history.loc[run["run_id"]].iterrows()]
        first = first_failed_epochs(run["activation"], rates)
        flags = failed({name: name not in first for name in CONDITIONS})
        static = failed({name: first.get(name) != 0 for name in CONDITIONS})
        runs.loc[i, ["stability_ok", "flags", "flagged", "static_ok"]] = [not flags, ",".join(flags), bool(flags),
                                                                         not static]
        rows += [{"run_id": run["run_id"], "condition": name, "source": c.source, "ok": name not in first,
                  "first_failed_epoch": first.get(name, math.nan)} for name, c in CONDITIONS.items()]
    return runs, pd.DataFrame(rows)


def condition_epochs(runs: pd.DataFrame, stability: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """`outcomes.first_failed` of every run: from its own stability report where it wrote one, else re-checked
    on its recorded rates (a run killed before its first report). A run whose recorded rates went non-finite is
    re-checked too, whatever its report says: its own monitor counted the non-finite epoch as a failure of
    `rates`, `writes` and `decay`, which the analysis counts as `diverged` instead. history: the rates' metric
    histories."""
    from .outcomes import first_failed

    first = first_failed(stability) if len(stability) else pd.DataFrame()
    again = runs["run_id"].isin(nonfinite_rates(history).index)
    first = first[~first.index.isin(runs.loc[again, "run_id"])] if len(first) else first
    missing = runs[~runs["run_id"].isin(first.index)]
    if len(missing):
        first = pd.concat([first, first_failed(recheck(missing, history)[1])])
    return first
