"""What happened to each run, measured, and how well each Appendix A condition predicted it.

Conditions (`stawm.conditions`) are predictions made from the rates; the outcomes here are read off
what a run logged. They never share a column. Each outcome's rule is stated here and in every caption:

- `diverged`: the run's loss, gradients or W went non-finite (the run recorded it: `stability.diverged`);
- `no_learning`: its final test error is at least NO_LEARNING_SHARE of chance, 1 - 1/classes (81% for
  10 classes; a run predicting one class everywhere has about 90%); a run with no test error at all
  (diverged before its first evaluation) counts too;
- `degraded`: its final test error is at least `factor` times the mean of the study's own paper-rate
  configuration (delta, eta, theta = 0.2, 0.4, 0.5, Config's defaults), default DEGRADED_FACTOR; not
  measured (NaN) in a study without that configuration unless a reference is given. A run that learned
  nothing is degraded too: the outcomes nest, diverged aside.

`outcome` names each run's worst: diverged, then no learning, then degraded, else trained.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from stawm import schema
from stawm.conditions import CONDITIONS
from stawm.config import Config

NO_LEARNING_SHARE = 0.9
DEGRADED_FACTOR = 2.0
OUTCOMES = ("diverged", "no_learning", "degraded")  # the measured outcomes, each a yes/no per run
KINDS = ("diverged", "no learning", "degraded", "trained")  # `outcome`'s names, worst first
ANY_FLAG = "any flag"  # the row of the prediction table for `flagged`: some flagging condition failed


def paper_rates() -> dict[str, float]:
    """The paper's memory rates (Config's defaults): the reference configuration of `degraded`."""
    config = Config()
    return {name: getattr(config, name) for name in schema.RATE_METRICS}


def chance_error(runs: pd.DataFrame) -> pd.Series:
    """1 - 1/classes of each run: the error of guessing uniformly."""
    return 1 - 1 / runs["num_classes"].astype(float)


def no_learning(runs: pd.DataFrame, metric: str | None = None) -> pd.Series:
    """Final error at least NO_LEARNING_SHARE of chance, or no final error at all."""
    errors = runs[metric or schema.TEST_ERROR].astype(float)
    return ~(errors < NO_LEARNING_SHARE * chance_error(runs))  # NaN compares False: counted


def paper_reference(runs: pd.DataFrame, metric: str | None = None) -> float:
    """Mean final error of the runs at the paper's rates (fixed or as the start of learned ones: whichever
    the study ran); NaN when the study has none."""
    at_paper = np.ones(len(runs), dtype=bool)
    for name, value in paper_rates().items():
        at_paper &= np.isclose(runs[name].astype(float), value)
    errors = runs.loc[at_paper, metric or schema.TEST_ERROR].astype(float)
    return float(errors.mean()) if errors.notna().any() else math.nan


def degraded(runs: pd.DataFrame, factor: float = DEGRADED_FACTOR, reference: float | None = None,
             metric: str | None = None) -> pd.Series:
    """Final error at least `factor` x `reference` (default: `paper_reference`), or none at all; NaN
    (not measured) for every run when there is no reference."""
    reference = paper_reference(runs, metric) if reference is None else reference
    if not math.isfinite(reference):
        return pd.Series(np.nan, index=runs.index, dtype=object)
    errors = runs[metric or schema.TEST_ERROR].astype(float)
    return ~(errors < factor * reference)


def measure(runs: pd.DataFrame, factor: float = DEGRADED_FACTOR, reference: float | None = None,
            metric: str | None = None) -> pd.DataFrame:
    """One row per run (index run_id): the three outcomes as columns (bool; degraded may be NaN)."""
    return pd.DataFrame({"diverged": runs["diverged"].astype(bool).to_numpy(),
                         "no_learning": no_learning(runs, metric).to_numpy(),
                         "degraded": degraded(runs, factor, reference, metric).to_numpy()},
                        index=runs["run_id"].to_numpy())


def outcome(measured: pd.DataFrame) -> pd.Series:
    """Each run's worst outcome, one of KINDS."""
    return pd.Series(np.select([measured["diverged"], measured["no_learning"], measured["degraded"].fillna(False)
                                .astype(bool)], list(KINDS[:3]), KINDS[3]), index=measured.index)


def first_failed(stability: pd.DataFrame) -> pd.DataFrame:
    """The long stability frame (source.py) as one row per run, one column per condition: the epoch it
    first failed (0: before training), NaN where it never did."""
    wide = stability.pivot(index="run_id", columns="condition", values="first_failed_epoch")
    wide.columns.name = None
    return wide


def two_by_two(flagged: pd.Series, happened: pd.Series) -> dict:
    """The 2x2 counts of a prediction against an outcome (both bool, aligned), with precision
    (outcome among flagged) and recall (flagged among outcome); NaN where a denominator is 0."""
    tp, fp = int((flagged & happened).sum()), int((flagged & ~happened).sum())
    fn, tn = int((~flagged & happened).sum()), int((~flagged & ~happened).sum())
    return dict(flagged_and_outcome=tp, flagged_no_outcome=fp, outcome_not_flagged=fn, neither=tn,
                precision=tp / (tp + fp) if tp + fp else math.nan, recall=tp / (tp + fn) if tp + fn else math.nan)


def prediction_table(first: pd.DataFrame, measured: pd.DataFrame, flagged: pd.Series | None = None) -> pd.DataFrame:
    """For every condition (its source; informational ones too) and every outcome: the 2x2 counts,
    precision and recall. `first`: `first_failed` (index run_id); `measured`: `measure`; `flagged`
    (by run_id) adds the row ANY_FLAG. An outcome not measured (degraded without a reference) is left out;
    runs without a stability report are left out of every row."""
    runs = measured.index.intersection(first.index)
    conditions = {name: first.reindex(runs)[name].notna() if name in first else pd.Series(False, index=runs)
                  for name in CONDITIONS}
    if flagged is not None:
        conditions[ANY_FLAG] = flagged.reindex(runs).astype(bool)
    rows = []
    for name, hit in conditions.items():
        c = CONDITIONS.get(name)
        for kind in OUTCOMES:
            happened = measured.loc[runs, kind]
            if happened.isna().all():
                continue
            rows.append(dict(condition=name, source=c.source if c else "—",
                             informational=c.informational if c else False, outcome=kind,
                             **two_by_two(hit, happened.astype(bool))))
    return pd.DataFrame(rows)


def degraded_sweep(runs: pd.DataFrame, flagged: pd.Series, factors: Sequence[float], reference: float | None = None,
                   metric: str | None = None) -> pd.DataFrame:
    """`degraded` at each factor: how many runs, and the precision and recall of `flagged` (bool, aligned
    with runs) for it; the notebook plots it, so that no conclusion hangs on one threshold."""
    rows = []
    for factor in factors:
        happened = degraded(runs, factor, reference, metric)
        if happened.isna().all():
            continue
        rows.append(dict(factor=factor, degraded=int(happened.astype(bool).sum()),
                         **two_by_two(flagged.astype(bool).to_numpy(), happened.astype(bool).to_numpy())))
    return pd.DataFrame(rows)


def rules(runs: pd.DataFrame, factor: float = DEGRADED_FACTOR, reference: float | None = None) -> str:
    """The outcome rules with this study's numbers, for a caption."""
    chance = chance_error(runs)
    share = f"{100 * NO_LEARNING_SHARE * chance.iloc[0]:.1f}%" if chance.nunique() == 1 else \
        f"{NO_LEARNING_SHARE:g} x (1 - 1/classes)"
    reference = paper_reference(runs) if reference is None else reference
    degraded_rule = (f"degraded: final test error >= {factor:g} x {100 * reference:.2f}% (the mean of the study's "
                     f"paper-rate runs) = {100 * factor * reference:.2f}%" if math.isfinite(reference) else
                     "degraded: not measured (the study has no run at the paper's rates)")
    return (f"diverged: loss, gradients or W went non-finite; no_learning: final test error >= {share} "
            f"({NO_LEARNING_SHARE:g} of chance) or none; {degraded_rule}")
