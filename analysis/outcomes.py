"""What happened to each run, measured, and how well each condition predicted it.

Conditions (`stawm.conditions`: from Appendix A, from Section 3.1, or derived, each with its category) are
predictions made from the rates; the outcomes here are read off what a run logged. They never share a column.
Each outcome's rule is stated here and in every caption:

- `diverged`: the run's loss, gradients or W went non-finite (the run recorded it: `stability.diverged`), or a
  learned rate was recorded non-finite (recheck.py: an outcome, not a condition failure);
- `no_learning`: its final test error is at least NO_LEARNING_SHARE of chance, 1 - 1/classes (81% for
  10 classes; a run predicting one class everywhere has about 90%); a run with no test error at all
  (diverged before its first evaluation) counts too;
- `degraded`: its final test error is at least `factor` times the mean of the study's own runs at the paper's
  configuration (`paper_reference`: delta, eta, theta = 0.2, 0.4, 0.5, Config's defaults, and every other field
  the study varies at Config's default, e.g. N = 8 in a study of N), default DEGRADED_FACTOR, swept over
  DEGRADED_FACTORS by `degraded_sweep`; not measured (NaN) in a study without that configuration unless a
  reference is given. A run with no final error is degraded; a run that learned nothing is degraded at every
  factor whose threshold is below its error (at the factors swept here, every one): `degraded_sweep` counts
  them apart, and counts degraded among the runs that trained (neither no_learning nor diverged).

"At least" holds at equality up to float rounding (`at_least`): 2 x 0.045 is 0.09000000000000001 in floating
point, and a run at 9.00% is degraded at 2 x 4.50%, as the caption's ">= 9.00%" says.

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

from .store import varying_fields

NO_LEARNING_SHARE = 0.9
DEGRADED_FACTOR = 2.0
DEGRADED_FACTORS = (1.1, 1.25, 1.5, 2.0, 3.0, 5.0)  # the sweep: no conclusion hangs on one threshold
OUTCOMES = ("diverged", "no_learning", "degraded")  # the measured outcomes, each a yes/no per run
KINDS = ("diverged", "no learning", "degraded", "trained")  # `outcome`'s names, worst first
ANY_FLAG = "any flag"  # the row of the prediction table for `flagged`: some flagging condition failed
REL_TOL = 1e-9  # `at_least`'s tolerance, relative: far below a logged error's resolution (1 / test images)
# learnable_rates is not matched by `paper_reference`: the paper's rates are its configuration fixed or learned
# (Section 3.1: "for some of the experiments these are learnable")
NOT_MATCHED = ("seed", "learnable_rates")


def at_least(values: pd.Series, threshold: float) -> pd.Series:
    """values >= threshold, true at equality up to float rounding (relative REL_TOL) and for NaN (no value)."""
    v = values.astype(float)
    return (v >= threshold) | np.isclose(v, threshold, rtol=REL_TOL, atol=0.0) | v.isna()


def paper_rates() -> dict[str, float]:
    """The paper's memory rates (Config's defaults)."""
    config = Config()
    return {name: getattr(config, name) for name in schema.RATE_METRICS}


def paper_configuration(runs: pd.DataFrame) -> dict:
    """What a run must match to be at the paper's configuration in this study: the paper's rates, and every
    other config field the runs vary (but the seed and learnable_rates) at Config's default, e.g. glimpses = 8
    in a study of N. A field the study holds fixed is not matched: the study's preset chose it."""
    config = Config()
    match = paper_rates()
    match.update({f: getattr(config, f) for f in varying_fields(runs) if f not in match and f not in NOT_MATCHED})
    return match


def configuration_text(match: dict) -> str:
    """"delta=0.2, eta=0.4, theta=0.5, glimpses=8": a configuration for a caption."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in match.items())


def at_paper(runs: pd.DataFrame, match: dict | None = None) -> pd.Series:
    """Which runs are at the paper's configuration (`paper_configuration`, or `match`)."""
    match = paper_configuration(runs) if match is None else match
    keep = pd.Series(True, index=runs.index)
    for name, value in match.items():
        if name not in runs:
            return pd.Series(False, index=runs.index)
        if isinstance(value, float):
            keep &= np.isclose(runs[name].astype(float), value)
        else:
            keep &= runs[name] == value
    return keep


def paper_reference(runs: pd.DataFrame, metric: str | None = None, match: dict | None = None) -> float:
    """Mean final error of the study's runs at the paper's configuration (`paper_configuration`: its rates, fixed
    or as the start of learned ones, and every other varied field at the paper's value; or `match`); NaN when
    the study has none with an error."""
    errors = runs.loc[at_paper(runs, match), metric or schema.TEST_ERROR].astype(float)
    return float(errors.mean()) if errors.notna().any() else math.nan


def chance_error(runs: pd.DataFrame) -> pd.Series:
    """1 - 1/classes of each run: the error of guessing uniformly."""
    return 1 - 1 / runs["num_classes"].astype(float)


def no_learning(runs: pd.DataFrame, metric: str | None = None) -> pd.Series:
    """Final error at least NO_LEARNING_SHARE of chance (`at_least`), or no final error at all."""
    errors = runs[metric or schema.TEST_ERROR].astype(float)
    threshold = NO_LEARNING_SHARE * chance_error(runs)
    return (errors >= threshold) | np.isclose(errors, threshold, rtol=REL_TOL, atol=0.0) | errors.isna()


def degraded(runs: pd.DataFrame, factor: float = DEGRADED_FACTOR, reference: float | None = None,
             metric: str | None = None) -> pd.Series:
    """Final error at least `factor` x `reference` (default: `paper_reference`; `at_least`: equality counts),
    or none at all; NaN (not measured) for every run when there is no reference."""
    reference = paper_reference(runs, metric) if reference is None else reference
    if not math.isfinite(reference):
        return pd.Series(np.nan, index=runs.index, dtype=object)
    return at_least(runs[metric or schema.TEST_ERROR], factor * reference)


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


def _predictors(first: pd.DataFrame, runs: pd.Index, flagged: pd.Series | None) -> dict[str, pd.Series]:
    """Each condition (and ANY_FLAG with `flagged`) as a bool per run: failed at some epoch."""
    hits = {name: first.reindex(runs)[name].notna() if name in first else pd.Series(False, index=runs)
            for name in CONDITIONS}
    if flagged is not None:
        hits[ANY_FLAG] = flagged.reindex(runs).astype(bool)
    return hits


def _labels(name: str) -> dict:
    c = CONDITIONS.get(name)
    return dict(condition=name, category=c.category if c else "verdict", source=c.source if c else "—",
                informational=c.informational if c else False)


def prediction_table(first: pd.DataFrame, measured: pd.DataFrame, flagged: pd.Series | None = None) -> pd.DataFrame:
    """For every condition (its category and source; informational ones too) and every outcome: the 2x2 counts,
    precision and recall. `first`: `first_failed` (index run_id); `measured`: `measure`; `flagged`
    (by run_id) adds the row ANY_FLAG. An outcome not measured (degraded without a reference) is left out;
    runs without a stability report are left out of every row."""
    runs = measured.index.intersection(first.index)
    rows = []
    for name, hit in _predictors(first, runs, flagged).items():
        for kind in OUTCOMES:
            happened = measured.loc[runs, kind]
            if happened.isna().all():
                continue
            rows.append(dict(**_labels(name), outcome=kind, **two_by_two(hit, happened.astype(bool))))
    return pd.DataFrame(rows)


def degraded_sweep(runs: pd.DataFrame, first: pd.DataFrame, factors: Sequence[float] = DEGRADED_FACTORS,
                   flagged: pd.Series | None = None, reference: float | None = None,
                   metric: str | None = None) -> pd.DataFrame:
    """`degraded` at each factor, one row per (factor, condition), so that no conclusion hangs on one threshold.

    Per factor: `threshold` (factor x reference), `degraded` (runs at or above it, all of them: the outcomes
    nest), `no_learning_degraded` and `diverged_degraded` (how many of those are no_learning or diverged runs,
    counted degraded too), `trained_runs` (neither no_learning nor diverged) and `degraded_among_trained`. Per
    condition (its category and source; ANY_FLAG with `flagged`, by run_id): the 2x2 counts, `precision`, `recall`
    over all runs with a stability report, and `precision_trained`, `recall_trained` among those that trained.
    Empty when `degraded` is not measured (no reference)."""
    measured = measure(runs, reference=reference, metric=metric)
    reference = paper_reference(runs, metric) if reference is None else reference
    if not math.isfinite(reference):
        return pd.DataFrame()
    ids = runs["run_id"].to_numpy()
    trained = ~(measured["no_learning"] | measured["diverged"])
    checked = measured.index.intersection(first.index)
    hits = _predictors(first, checked, flagged)
    rows = []
    for factor in factors:
        happened = pd.Series(degraded(runs, factor, reference, metric).astype(bool).to_numpy(), index=ids)
        counts = dict(factor=factor, threshold=factor * reference, degraded=int(happened.sum()),
                      no_learning_degraded=int((happened & measured["no_learning"]).sum()),
                      diverged_degraded=int((happened & measured["diverged"]).sum()),
                      trained_runs=int(trained.sum()), degraded_among_trained=int((happened & trained).sum()))
        among = checked[trained.loc[checked].to_numpy()]
        for name, hit in hits.items():
            within = two_by_two(hit.loc[among], happened.loc[among])
            rows.append(dict(**counts, **_labels(name), **two_by_two(hit, happened.loc[checked]),
                             precision_trained=within["precision"], recall_trained=within["recall"]))
    return pd.DataFrame(rows)


def rules(runs: pd.DataFrame, factor: float = DEGRADED_FACTOR, reference: float | None = None) -> str:
    """The outcome rules with this study's numbers, for a caption."""
    chance = chance_error(runs)
    share = f"{100 * NO_LEARNING_SHARE * chance.iloc[0]:.1f}%" if chance.nunique() == 1 else \
        f"{NO_LEARNING_SHARE:g} x (1 - 1/classes)"
    where = configuration_text(paper_configuration(runs))
    reference = paper_reference(runs) if reference is None else reference
    degraded_rule = (f"degraded: final test error >= {factor:g} x {100 * reference:.2f}% (the mean of the study's "
                     f"runs at the paper's configuration, {where}) = {100 * factor * reference:.2f}%, equality "
                     f"included" if math.isfinite(reference) else
                     f"degraded: not measured (the study has no run at the paper's configuration, {where})")
    return (f"diverged: loss, gradients or W went non-finite; no_learning: final test error >= {share} "
            f"({NO_LEARNING_SHARE:g} of chance) or none; {degraded_rule}")
