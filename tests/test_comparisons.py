"""Comparisons between groups of runs (Welch) and trends (Spearman) that the report writes, on hand-made runs,
with every number worked out here from the formulas, for 3 and for 5 seeds."""

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from stawm.analysis import comparisons



def runs_frame(rows: list[dict]) -> pd.DataFrame:
    """Runs in the analysis' shape, with only the columns the comparisons read; defaults: finished, unflagged,
    not diverged, at the paper's rates, fixed."""
    base = dict(status="FINISHED", flagged=False, diverged=False, delta=0.2, eta=0.4, theta=0.5,
                learnable_rates=False, glimpses=6, glimpse_size=8)
    frame = pd.DataFrame([{**base, **r} for r in rows])
    frame.insert(0, "run_id", [f"r{i}" for i in range(len(frame))])
    return frame


def glimpse_runs(seeds: int) -> pd.DataFrame:
    """N in {2, 4, 8, 12}; at N the error is 0.10 - 0.005 N plus a spread of -2..+2 thousandths by seed (seeds 0 to
    4; with 3 seeds, -1, 0, +1), so the error falls with N everywhere."""
    spread = {3: (-0.001, 0.0, 0.001), 5: (-0.002, -0.001, 0.0, 0.001, 0.002)}[seeds]
    return runs_frame([dict(glimpses=n, seed=s, test_error=0.10 - 0.005 * n + d)
                       for n in (2, 4, 8, 12) for s, d in enumerate(spread)])


@pytest.mark.parametrize("seeds", [3, 5])
def test_glimpse_study_trend_and_best_against_the_paper_n(seeds):
    runs = glimpse_runs(seeds)
    table = comparisons.study_comparisons(runs, ["glimpses"])
    assert list(table["kind"]) == ["trend", "difference"]
    trend, best = table.iloc[0], table.iloc[1]
    # the trend: 4 N's x seeds points, the error strictly falling with N across the groups (the groups do not
    # overlap), so Spearman's rho is that of N against -N with ties: computed on ranks by hand below
    x = runs["glimpses"].to_numpy(float)
    rank_x, rank_y = scipy.stats.rankdata(x), scipy.stats.rankdata(runs["test_error"])
    rho = np.corrcoef(rank_x, rank_y)[0, 1]  # Spearman = Pearson on the ranks
    assert trend["estimate"] == pytest.approx(rho) and rho < -0.9
    n = 4 * seeds
    half = 1.959964 * math.sqrt((1 + rho ** 2 / 2) / (n - 3))
    assert (trend["low"], trend["high"]) == pytest.approx((math.tanh(math.atanh(rho) - half),
                                                           math.tanh(math.atanh(rho) + half)), rel=1e-6)
    assert trend["n_a"] == n and trend["left_out"] == 0 and trend["p"] < 0.01
    # best N (12, lowest mean 0.04) against the paper's N = 8 (0.06): equal spreads s in both, so se = s sqrt(2/n),
    # df = 2 (n - 1) exactly, and the interval -0.02 ± t_{0.975, 2(n-1)} se
    s = np.std({3: (-0.001, 0.0, 0.001), 5: (-0.002, -0.001, 0.0, 0.001, 0.002)}[seeds], ddof=1)
    se = s * math.sqrt(2 / seeds)
    assert (best["a"], best["b"], best["n_a"], best["n_b"]) == ("glimpses=12", "glimpses=8", seeds, seeds)
    assert best["estimate"] == pytest.approx(-0.02)
    df = 2 * (seeds - 1)
    half = scipy.stats.t.ppf(0.975, df) * se
    assert (best["low"], best["high"]) == pytest.approx((-0.02 - half, -0.02 + half), rel=1e-9)
    assert best["p"] == pytest.approx(2 * scipy.stats.t.sf(0.02 / se, df), rel=1e-9)
    # the same on the Markdown, in percentage points
    md = comparisons.format_comparisons(table)
    assert f"Δ = -2.00 [{100 * (-0.02 - half):+.2f}, {100 * (-0.02 + half):+.2f}]" in md
    assert "Welch" in md and "Spearman" in md and "Fisher's z" in md and "picked after seeing" in md


def test_best_is_not_compared_with_itself_nor_with_a_paper_value_never_run():
    runs = glimpse_runs(3)
    runs.loc[runs["glimpses"] == 8, "test_error"] -= 0.05  # N = 8, the paper's, is now the best
    row = comparisons.study_comparisons(runs, ["glimpses"]).iloc[1]
    assert row["why"] == "the best is the paper's value" and math.isnan(row["estimate"])
    row = comparisons.study_comparisons(runs[runs["glimpses"] != 8], ["glimpses"]).iloc[1]
    assert row["why"] == "the paper's value was not run"


def test_rate_study_counts_every_run_of_a_group_and_says_which_it_left_out():
    """theta > 0 only: delta = 0.2 (three runs 0.04, 0.05, 0.06) against delta = 2 (0.06, 0.07 and one that stalled
    at 0.66, which counts), plus a delta = 2 run still RUNNING and one FINISHED without an error (diverged): both left
    out and said. theta = 0 runs (0.918) are in neither group."""
    rows = [dict(delta=0.2, seed=s, test_error=e) for s, e in enumerate((0.04, 0.05, 0.06))]
    rows += [dict(delta=2.0, seed=s, test_error=e, flagged=True) for s, e in enumerate((0.06, 0.07, 0.66))]
    rows += [dict(delta=2.0, seed=3, test_error=0.08, status="RUNNING"),
             dict(delta=2.0, seed=4, test_error=np.nan, diverged=True),
             dict(delta=0.2, theta=0.0, seed=0, test_error=0.918), dict(delta=2.0, theta=0.0, seed=0, test_error=0.918)]
    runs = runs_frame(rows)
    table = comparisons.study_comparisons(runs, ["delta", "eta", "theta"]).set_index("comparison")
    diff = table.loc["delta > 1 against delta <= 0.2"]
    assert (diff["runs_a"], diff["n_a"], diff["runs_b"], diff["n_b"], diff["left_out"]) == (5, 3, 3, 3, 2)
    assert diff["mean_a"] == pytest.approx((0.06 + 0.07 + 0.66) / 3)  # the stalled run is in the mean
    assert diff["why"] == ("delta > 1: 1 not finished (RUNNING: 1); 1 without a finite test_error (1 diverged)")
    a, b = np.array([0.06, 0.07, 0.66]), np.array([0.04, 0.05, 0.06])
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 3
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    assert diff["estimate"] == pytest.approx(a.mean() - b.mean())
    assert diff["p"] == pytest.approx(2 * scipy.stats.t.sf((a.mean() - b.mean()) / math.sqrt(va + vb), df))
    assert diff["scope"] == "theta > 0, eta and theta pooled"
    trend = table.loc["trend of the error over delta"]
    assert trend["runs_a"] == 8 and trend["n_a"] == 6 and trend["left_out"] == 2  # theta = 0 runs not in it


def test_learnable_against_fixed_at_each_start():
    """Two starts (delta 0.2, 1.5), 3 seeds each, learnable and fixed: one Welch row per start, n 3 and 3."""
    rows = [dict(delta=d, learnable_rates=learn, seed=s, test_error=base + 0.01 * s + (0.0 if learn else 0.02))
            for d, base in ((0.2, 0.04), (1.5, 0.08)) for learn in (True, False) for s in range(3)]
    table = comparisons.study_comparisons(runs_frame(rows), ["delta", "learnable_rates"])
    learn = table[table["comparison"] == "learnable against fixed rates"]
    assert list(learn["scope"]) == ["delta=0.2", "delta=1.5"]
    assert list(learn["estimate"]) == pytest.approx([-0.02, -0.02])
    assert list(learn["n_a"]) == [3, 3] and list(learn["n_b"]) == [3, 3]
    # equal spreads (s = 0.01): se = 0.01 sqrt(2/3), df = 4
    se = 0.01 * math.sqrt(2 / 3)
    assert learn["high"].iloc[0] == pytest.approx(-0.02 + scipy.stats.t.ppf(0.975, 4) * se)


def test_nothing_applies_to_a_study_of_other_fields():
    runs = runs_frame([dict(seed=s, test_error=0.05) for s in range(3)])
    assert comparisons.study_comparisons(runs, []).empty
    assert comparisons.study_comparisons(runs, ["lr"]).empty
