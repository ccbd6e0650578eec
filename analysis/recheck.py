"""The Appendix A conditions re-checked on the rates a run recorded: its configured rates (epoch 0) and,
when they learned, the rates at the end of each epoch, exactly as the run's own monitor checks them
(`stawm.model.stability.StabilityMonitor`, with `stawm.conditions`).

For runs logged before the conditions were rewritten (their `stability.flags` name `bound`, `finite` and a
`decay` that was not labelled derived), so that shipped results are read with today's conditions without
training again. Outcomes are not touched: `diverged` is what the run measured.
"""

from __future__ import annotations

import math

import pandas as pd

from stawm import schema
from stawm.conditions import CONDITIONS, failed, note_failures


def first_failed_epochs(activation: str, rates: list[tuple[int, dict]]) -> dict[str, int]:
    """condition -> the first epoch it failed, over `rates`: (epoch, {delta, eta, theta}) in epoch order."""
    first: dict[str, int] = {}
    for epoch, r in rates:
        note_failures(first, epoch, activation, r["delta"], r["eta"], r["theta"])
    return first


def recheck(runs: pd.DataFrame, history: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs with `stability_ok`, `flags`, `flagged`, `static_ok` recomputed; the long stability frame in
    source.py's shape). history: the long metric histories, holding the rates for runs that learned them."""
    rate_history = history[history["metric"].isin(schema.RATE_METRICS)].pivot_table(
        index=["run_id", "step"], columns="metric", values="value")
    runs, rows = runs.copy(), []
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
    on its recorded rates (a run killed before its first report). history: the rates' metric histories."""
    from .outcomes import first_failed

    first = first_failed(stability) if len(stability) else pd.DataFrame()
    missing = runs[~runs["run_id"].isin(first.index)]
    if len(missing):
        first = pd.concat([first, first_failed(recheck(missing, history)[1])])
    return first
