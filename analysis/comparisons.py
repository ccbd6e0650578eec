"""Comparisons between groups of runs, each with its test, and trends over a swept field, each with its interval.

- `difference`: two groups of runs: the difference of their means with its 95% Welch interval, Welch's t-test
  p-value, and both n's (uncertainty.welch);
- `trend`: the metric against a swept field over runs: Spearman's rho with a 95% interval by Fisher's z
  (Bonett and Wright's variance) and its p-value (uncertainty.spearman);
- `study_comparisons`: the ones that apply to a study, from its swept fields: N (a trend, and the best N
  against the paper's N = 8), S_g (the same, against the paper's S_g = 8), delta (a trend among theta > 0 runs,
  and delta > 1 against delta <= 0.2 among them), learnable against fixed rates;
- `format_comparisons`: their Markdown, the CSV being the frame itself.

Every run of a group counts, runs that stalled near chance too: a mean is over all of them. A run without a
final value (not FINISHED, or diverged before an evaluation) cannot enter a mean; each row says how many of its
group's runs were left out and why.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from stawm import schema
from stawm.config import Config

from .stats import included
from .tables import cell_text, is_percent
from .uncertainty import CONFIDENCE, spearman, welch

COLUMNS = ["comparison", "kind", "scope", "a", "b", "runs_a", "n_a", "mean_a", "runs_b", "n_b", "mean_b",
           "estimate", "low", "high", "p", "method", "left_out", "why"]
WELCH = "difference of means, 95% Welch t interval; Welch's t-test, two-sided"
SPEARMAN = "Spearman's rho over runs, 95% interval by Fisher's z (Bonett-Wright variance); spearmanr p, two-sided"
RATES_AS_FIELDS = tuple(schema.RATE_METRICS)  # the config fields of the rates, named as their metrics


def _usable(group: pd.DataFrame, metric: str, include_unfinished: bool) -> tuple[np.ndarray, pd.DataFrame, str]:
    """(the metric values that enter a statistic, the runs they come from, why the others were left out)."""
    keep = included(group, include_unfinished=include_unfinished)
    values = group[metric].astype(float)
    unfinished = group[~keep]
    no_value = group[keep & ~np.isfinite(values)]
    why = []
    if len(unfinished):
        states = ", ".join(f"{s}: {k}" for s, k in unfinished["status"].value_counts().sort_index().items())
        why.append(f"{len(unfinished)} not finished ({states})")
    if len(no_value):
        why.append(f"{len(no_value)} without a finite {metric} ({int(no_value['diverged'].astype(bool).sum())} "
                   f"diverged)")
    used = group[keep & np.isfinite(values)]
    return used[metric].to_numpy(dtype=float), used, "; ".join(why)


def difference(a: pd.DataFrame, b: pd.DataFrame, metric: str | None = None, *, comparison: str = "",
               scope: str = "", label_a: str = "A", label_b: str = "B", include_unfinished: bool = False) -> dict:
    """Two groups of runs: mean(a) - mean(b) (`estimate`) with its 95% Welch interval (`low`, `high`), Welch's
    two-sided p (`p`), the runs in each group (`runs_a`, `runs_b`), those in the statistic (`n_a`, `n_b`) and
    their means, and `left_out`, `why` for runs without a final value. One row of `study_comparisons`."""
    metric = metric or schema.TEST_ERROR
    va, _, why_a = _usable(a, metric, include_unfinished)
    vb, _, why_b = _usable(b, metric, include_unfinished)
    w = welch(va, vb, CONFIDENCE)
    why = "; ".join(f"{label}: {text}" for label, text in ((label_a, why_a), (label_b, why_b)) if text)
    return dict(comparison=comparison, kind="difference", scope=scope, a=label_a, b=label_b, runs_a=len(a),
                n_a=w["n_a"], mean_a=w["mean_a"], runs_b=len(b), n_b=w["n_b"], mean_b=w["mean_b"],
                estimate=w["diff"], low=w["low"], high=w["high"], p=w["p"], method=WELCH,
                left_out=len(a) + len(b) - w["n_a"] - w["n_b"], why=why)


def trend(runs: pd.DataFrame, x: str, metric: str | None = None, *, comparison: str = "", scope: str = "",
          include_unfinished: bool = False) -> dict:
    """The metric against field `x` over the runs (each run a point, ties ranked as averages): Spearman's rho
    (`estimate`), its 95% Fisher-z interval (`low`, `high`), p (`p`), runs (`runs_a`) and pairs used (`n_a`),
    `left_out` and `why`. One row of `study_comparisons`."""
    metric = metric or schema.TEST_ERROR
    values, used, why = _usable(runs, metric, include_unfinished)
    s = spearman(used[x].astype(float).to_numpy(), values, CONFIDENCE)
    return dict(comparison=comparison, kind="trend", scope=scope, a=f"{metric} against {x}", b="", runs_a=len(runs),
                n_a=s["n"], mean_a=math.nan, runs_b=0, n_b=0,
                mean_b=math.nan, estimate=s["rho"], low=s["low"], high=s["high"], p=s["p"], method=SPEARMAN,
                left_out=len(runs) - s["n"], why=why)


def _within(runs: pd.DataFrame, by: Sequence[str]):
    """(label, runs) for each configuration of the fields `by` ("" and all runs when there are none)."""
    by = [f for f in by if f in runs and runs[f].nunique(dropna=False) > 1]
    if not by:
        yield "", runs
        return
    for key, part in runs.groupby(by, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        yield ", ".join(f"{f}={cell_text(v)}" for f, v in zip(by, key)), part


def _glimpse_rows(runs, swept, field, symbol, metric, include_unfinished) -> list[dict]:
    """A trend over `field` and the best value against the paper's, within each configuration of the others."""
    rows, paper = [], getattr(Config(), field)
    for scope, part in _within(runs, [s for s in swept if s != field]):
        rows.append(trend(part, field, metric, comparison=f"trend of the error over {symbol}", scope=scope,
                          include_unfinished=include_unfinished))
        if field == "glimpses" and (part[field] == 1).any() and (part[field] > 1).nunique() > 1:
            rows += _one_glimpse_rows(part, metric, scope, include_unfinished)
        finished = part[included(part, include_unfinished=include_unfinished)]
        means = finished.groupby(field)[metric].mean().dropna()
        if means.empty:
            continue
        best = means.idxmin()
        comparison = f"best {symbol} (lowest mean, picked after seeing it) against the paper's {symbol} = {paper}"
        if paper not in set(part[field]) or best == paper:
            rows.append(dict(comparison=comparison, kind="difference", scope=scope, a=f"{field}={best}",
                             b=f"{field}={paper}", why=("the paper's value was not run" if paper not in
                                                       set(part[field]) else "the best is the paper's value")))
            continue
        rows.append(difference(part[part[field] == best], part[part[field] == paper], metric, comparison=comparison,
                               scope=scope, label_a=f"{field}={best}", label_b=f"{field}={paper}",
                               include_unfinished=include_unfinished))
    return rows


def _one_glimpse_rows(runs, metric, scope, include_unfinished) -> list[dict]:
    """N = 1 has no memory to integrate (one write, one read): it against every N > 1, and the trend among N > 1
    alone, so that N = 1's gap does not pass for a trend over N."""
    several = runs[runs["glimpses"] > 1]
    return [difference(runs[runs["glimpses"] == 1], several, metric, comparison="one glimpse against several",
                       scope=scope, label_a="glimpses=1", label_b="glimpses>1", include_unfinished=include_unfinished),
            trend(several, "glimpses", metric, comparison="trend of the error over N > 1", scope=scope,
                  include_unfinished=include_unfinished)]


def _delta_rows(runs, swept, metric, include_unfinished) -> list[dict]:
    """Among theta > 0 runs (theta = 0 writes nothing with ReLU6): a trend over delta, and delta > 1 against
    delta <= 0.2, eta (and theta > 0) pooled, within each configuration of the non-rate swept fields."""
    delta, _, theta = RATES_AS_FIELDS
    rows = []
    for scope, part in _within(runs, [s for s in swept if s not in RATES_AS_FIELDS]):
        learned = " (the configured start of learned rates)" if part["learnable_rates"].astype(bool).any() else ""
        writing = part[part[theta].astype(float) > 0]
        where = ", ".join(x for x in (scope, "theta > 0, eta and theta pooled") if x)
        rows.append(trend(writing, delta, metric, comparison=f"trend of the error over delta{learned}", scope=where,
                          include_unfinished=include_unfinished))
        high, low = writing[writing[delta] > 1], writing[writing[delta] <= 0.2]
        row = difference(high, low, metric, comparison=f"delta > 1 against delta <= 0.2{learned}", scope=where,
                         label_a="delta > 1", label_b="delta <= 0.2", include_unfinished=include_unfinished)
        if not (len(high) and len(low)):  # the means of the group that has runs, no difference
            row["why"] = "; ".join(x for x in (row["why"], "a group has no run") if x)
        rows.append(row)
    return rows


def _learnable_rows(runs, swept, metric, include_unfinished) -> list[dict]:
    """Learnable against fixed rates, within each configuration of the other swept fields (the same start)."""
    rows = []
    for scope, part in _within(runs, [s for s in swept if s != "learnable_rates"]):
        learn = part["learnable_rates"].astype(bool)
        rows.append(difference(part[learn], part[~learn], metric, comparison="learnable against fixed rates",
                               scope=scope, label_a="learnable", label_b="fixed",
                               include_unfinished=include_unfinished))
    return rows


def study_comparisons(runs: pd.DataFrame, swept: Sequence[str], metric: str | None = None,
                      include_unfinished: bool = False) -> pd.DataFrame:
    """Every comparison that applies to a study sweeping `swept`, one row each (COLUMNS; fractions as logged):
    glimpses and glimpse_size: a trend, and the best value against the paper's (Config's: 8 and 8); delta (with
    theta): a trend among theta > 0 runs and delta > 1 against delta <= 0.2 among them; learnable_rates:
    learnable against fixed. Empty when none applies. Every run of a group counts, flagged and stalled ones too."""
    metric = metric or schema.TEST_ERROR
    rows = []
    for field, symbol in (("glimpses", "N"), ("glimpse_size", "S_g")):
        if field in swept and runs[field].nunique() > 1:
            rows += _glimpse_rows(runs, swept, field, symbol, metric, include_unfinished)
    delta, _, theta = RATES_AS_FIELDS
    if delta in swept and theta in runs and runs[delta].nunique() > 1:
        rows += _delta_rows(runs, swept, metric, include_unfinished)
    if "learnable_rates" in swept and runs["learnable_rates"].nunique() > 1:
        rows += _learnable_rows(runs, swept, metric, include_unfinished)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs["metric"] = metric
    return table


def _value(v: float, percent: bool, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    text = f"{100 * v:.2f}" if percent else f"{v:.4f}"
    return ("+" + text) if signed and v > 0 else text


def _p(p: float) -> str:
    return "—" if p is None or math.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _count(row: dict, side: str) -> str:
    runs, n = row.get(f"runs_{side}"), row.get(f"n_{side}")
    if runs is None or (isinstance(runs, float) and math.isnan(runs)):
        return "—"
    return f"{int(n)} of {int(runs)}" if n == n and n is not None and int(n) != int(runs) else str(int(runs))


def format_comparisons(table: pd.DataFrame) -> str:
    """Markdown of `study_comparisons`: each difference as mean A - mean B [95% Welch interval] with Welch's p,
    each trend as rho [95% Fisher-z interval] with its p, both n's, and the runs left out with why."""
    metric = table.attrs.get("metric", schema.TEST_ERROR)
    percent = is_percent(metric)
    unit = "percentage points" if percent else "as logged"
    caption = (f"Table: comparisons of the final {metric}{' (%)' if percent else ''}, every run of a group counted "
               f"(flagged runs and runs that stalled near chance too). Difference: mean A − mean B in {unit} "
               f"[95% Welch t interval], p of Welch's two-sided t-test. Trend: Spearman's ρ over runs (ties at "
               f"average ranks) [95% interval by Fisher's z, variance (1 + ρ²/2)/(n − 3) after Bonett and Wright], "
               f"p of scipy's spearmanr (two-sided, t approximation). n: runs in the statistic, \"k of m\" when m "
               f"runs are in the group and some have no final value (left out: the last column says why). A "
               f"\"best\" value is picked after seeing the means: its p is not adjusted for that choice.")
    header = ["comparison", "scope", "A", "n A", f"mean A{' (%)' if percent else ''}", "B", "n B",
              f"mean B{' (%)' if percent else ''}", "estimate [95% interval]", "p", "left out"]
    lines = [caption, "", "| " + " | ".join(header) + " |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in table.to_dict("records"):
        trend_row = r["kind"] == "trend"
        if r["estimate"] != r["estimate"]:  # NaN: not computed
            estimate = "—"
        elif trend_row:
            estimate = f"ρ = {r['estimate']:.2f}" + (f" [{r['low']:.2f}, {r['high']:.2f}]" if r["low"] == r["low"]
                                                      else "")
        else:
            estimate = f"Δ = {_value(r['estimate'], percent, True)}" + (
                f" [{_value(r['low'], percent, True)}, {_value(r['high'], percent, True)}]" if r["low"] == r["low"]
                else "")
        left = r.get("left_out")
        left = "0" if not r.get("why") and left == 0 else (
            f"{int(left)}: {r['why']}" if left == left and left is not None else r.get("why") or "—")
        cells = [r["comparison"], r["scope"] or "all runs", r["a"],
                 f"{int(r['n_a'])} pairs of {int(r['runs_a'])} runs" if trend_row else _count(r, "a"),
                 _value(r["mean_a"], percent), r["b"] or "—", "—" if trend_row else _count(r, "b"),
                 "—" if trend_row else _value(r["mean_b"], percent), estimate, _p(r["p"]), left]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
