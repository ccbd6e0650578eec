"""Outcomes measured by hand-made rules, and how well each condition predicts them: counts worked out by hand."""

import math

import numpy as np
import pandas as pd
import pytest

from stawm import preset
from stawm.analysis import outcomes
from stawm.analysis.recheck import condition_epochs, recheck
from stawm.conditions import DERIVED, PAPER
from stawm.model.stability import StabilityMonitor

PAPER_RATES = (0.2, 0.4, 0.5)


def hand_runs() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Eight runs of 10 classes. r0, r1 at the paper's rates (errors 0.04, 0.06: reference 0.05, degraded from
    0.10); r2 theta = 0 (0.90: no learning); r3, r4 delta = 1.5 (0.30 degraded, 0.06 trained); r5 diverged
    before any evaluation (no error) after its learned delta went below 0 at epoch 2; r6 delta = 2, theta = 0
    (0.88: no learning); r7 delta = 0.05 (0.095: trained at 2 x, degraded at 1.5 x)."""
    rates = [PAPER_RATES, PAPER_RATES, (0.2, 0.4, 0.0), (1.5, 0.4, 0.5), (1.5, 0.4, 0.5), PAPER_RATES,
             (2.0, 0.4, 0.0), (0.05, 0.4, 0.5)]
    runs = pd.DataFrame({
        "run_id": [f"r{i}" for i in range(8)],
        "delta": [r[0] for r in rates], "eta": [r[1] for r in rates], "theta": [r[2] for r in rates],
        "num_classes": 10, "activation": "relu6", "learnable_rates": [False] * 5 + [True] + [False] * 2,
        "test_error": [0.04, 0.06, 0.90, 0.30, 0.06, np.nan, 0.88, 0.095],
        "diverged": [False] * 5 + [True] + [False] * 2,
        "flagged": [False, False, True, True, True, True, True, False],
    })
    # r5's rates, learned: delta 0.1 after epoch 1, -0.1 after epoch 2 (its flag: `rates` and `decay` at 2)
    history = pd.DataFrame([dict(run_id="r5", metric=m, step=step, value=v)
                            for step, d in ((1, 0.1), (2, -0.1)) for m, v in (("delta", d), ("eta", 0.4),
                                                                              ("theta", 0.5))])
    return runs, history


def test_each_outcome_by_its_stated_rule():
    runs, _ = hand_runs()
    assert outcomes.paper_reference(runs) == pytest.approx(0.05)  # r0, r1 (r5 started there but has no error)
    measured = outcomes.measure(runs)
    assert list(measured.index[measured["diverged"]]) == ["r5"]
    assert list(measured.index[measured["no_learning"]]) == ["r2", "r5", "r6"]  # >= 0.9 x 0.9 = 0.81, or none
    assert list(measured.index[measured["degraded"].astype(bool)]) == ["r2", "r3", "r5", "r6"]  # >= 0.10
    assert list(outcomes.outcome(measured)) == ["trained", "trained", "no learning", "degraded", "trained",
                                                "diverged", "no learning", "trained"]
    assert list(outcomes.degraded(runs, factor=1.5)) == [False, False, True, True, False, True, True, True]
    without = runs[runs["delta"] != 0.2]  # no paper-rate runs left: degraded is not measured
    assert outcomes.degraded(without).isna().all()
    assert list(outcomes.degraded(without, reference=0.05)) == [True, False, True, False]  # r3 r4 r6 r7
    assert "81.0%" in outcomes.rules(runs) and ">= 2 x 5.00% (the mean of the study's paper-rate runs) = 10.00%" in (
        outcomes.rules(runs))


def test_conditions_recheck_as_the_monitor_does():
    runs, history = hand_runs()
    checked, stability = recheck(runs, history)
    assert list(checked["flags"]) == ["", "", "writes", "decay", "decay", "rates,decay", "writes,decay", ""]
    assert list(checked["flagged"]) == list(runs["flagged"])
    assert list(checked["static_ok"]) == [True, True, False, False, False, True, False, True]
    first = outcomes.first_failed(stability)
    assert first.loc["r5", "rates"] == 2 and first.loc["r5", "decay"] == 2 and first.loc["r6", "writes"] == 0
    # the run's own monitor, fed the same rates, says the same
    monitor = StabilityMonitor(preset("tiny", delta=0.2, eta=0.4, theta=0.5, learnable_rates=True))
    for epoch, delta in ((1, 0.1), (2, -0.1)):
        monitor.observe(epoch, rates={"delta": delta, "eta": 0.4, "theta": 0.5}, diverged=False, memory={})
    report = monitor.report()
    assert report["failed"] == ["rates", "decay"]
    assert {n: c["first_failed_epoch"] for n, c in report["conditions"].items()} == {
        n: (None if math.isnan(e) else int(e)) for n, e in first.loc["r5"].items()}
    # a run's own report wins; a run without one is re-checked
    mixed = condition_epochs(runs, stability[stability["run_id"] != "r3"], history)
    assert sorted(mixed.index) == sorted(runs["run_id"]) and mixed.loc["r3", "decay"] == 0


def test_two_by_two_and_precision_recall_by_hand():
    runs, history = hand_runs()
    first = outcomes.first_failed(recheck(runs, history)[1])
    table = outcomes.prediction_table(first, outcomes.measure(runs), runs.set_index("run_id")["flagged"])
    rows = table.set_index(["condition", "outcome"])
    cells = ["flagged_and_outcome", "flagged_no_outcome", "outcome_not_flagged", "neither"]
    # writes (r2, r6) against no learning (r2, r5, r6): 2, 0, 1 (r5), 5; precision 1, recall 2/3
    assert rows.loc[("writes", "no_learning"), cells].tolist() == [2, 0, 1, 5]
    assert rows.loc[("writes", "no_learning"), "recall"] == pytest.approx(2 / 3)
    assert rows.loc[("writes", "no_learning"), "source"] == PAPER
    # decay (r3, r4, r5, r6) against degraded (r2, r3, r5, r6): 3, 1 (r4), 1 (r2), 3; precision 3/4, recall 3/4
    assert rows.loc[("decay", "degraded"), cells].tolist() == [3, 1, 1, 3]
    assert rows.loc[("decay", "degraded"), ["precision", "recall"]].tolist() == [0.75, 0.75]
    assert rows.loc[("decay", "degraded"), "source"] == DERIVED
    # rates (r5) against diverged (r5): 1, 0, 0, 7
    assert rows.loc[("rates", "diverged"), cells].tolist() == [1, 0, 0, 7]
    # any flag (r2-r6) against degraded: 4, 1 (r4), 0, 3: precision 4/5, recall 1
    assert rows.loc[(outcomes.ANY_FLAG, "degraded"), ["precision", "recall"]].tolist() == [0.8, 1.0]
    # activation never fails: nothing flagged, precision undefined
    assert math.isnan(rows.loc[("activation", "diverged"), "precision"])
    assert rows.loc[("stationary_input", "diverged"), "informational"]


def test_the_degraded_threshold_sweep_by_hand():
    runs, _ = hand_runs()
    sweep = outcomes.degraded_sweep(runs, runs["flagged"], [1.5, 2.0]).set_index("factor")
    # 1.5 x 0.05 = 0.075 adds r7 (0.095): 5 degraded, flagged 4 of them (r4 flagged, trained)
    assert sweep["degraded"].tolist() == [5, 4]
    assert sweep.loc[1.5, ["precision", "recall"]].tolist() == [0.8, 0.8]
    assert sweep.loc[2.0, ["precision", "recall"]].tolist() == [0.8, 1.0]
    assert outcomes.degraded_sweep(runs[runs["delta"] != 0.2], runs["flagged"], [2.0]).empty
