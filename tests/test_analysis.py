"""The analysis library (stawm.analysis), the report command and the notebooks, on a real sqlite MLflow store.

The store is written through the MLflow API with the names of `stawm.schema` (read when it is
built, so a renamed constant renames what is written), with per-seed final test errors chosen
here, so every statistic below is checked against numbers worked by hand.

Study "table" (seeds=5, swept=preset):
  A  mnist-class-8  (S_g=8, N=8):   seeds 0-4 finished, 0.0040 0.0042 0.0038 0.0045 0.0041
  B  mnist-class-28 (S_g=28, N=10): seeds 0-2 finished, 0.0050 0.0054 0.0049;
                                    seed 3 finished but flagged ("rates"), 0.0300;
                                    seed 4 still RUNNING (0.0100 after epoch 1)
Study "rates" (seeds=2, swept=delta,learnable_rates, preset tiny): delta in {0.2, 1.5} x
  learnable_rates in {False, True} x seeds {0, 1}; delta=1.5 fails `decay` before training, and
  (delta=1.5, fixed, seed 1) diverges (an outcome, no flag of its own): FAILED, last test_error NaN.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from stawm import schema
from stawm.analysis import files, outcomes, plots, stability_plots, stats, store, tables, uncertainty
from stawm.config import preset

REPO = Path(__file__).resolve().parents[1]
A = [0.0040, 0.0042, 0.0038, 0.0045, 0.0041]
B = [0.0050, 0.0054, 0.0049]
B_FLAGGED = 0.0300
T0 = 1_700_000_000_000  # ms; runs start one second apart, in the order written


def _trial(client, exp_id, parent, study, cfg, finals, t, status="FINISHED", ok=True, flags="",
           static_ok=True, diverged=False, rates=None):
    """One child run in the runner's schema; `finals` is the test_error of each epoch."""
    S = schema
    tags = {S.PARENT_RUN_ID: parent, S.ROLE: S.ROLE_TRIAL, S.STUDY: study, S.PRESET: cfg.preset,
            S.SEED: str(cfg.seed), S.TRIAL_ID: f"t{t:04d}", S.GIT_COMMIT: "0" * 40, S.HOST: "test", S.GPU: "none",
            S.STABILITY_OK: S.tag_bool(ok), S.STABILITY_FLAGS: flags,
            S.STABILITY_STATIC_OK: S.tag_bool(static_ok), S.STABILITY_DIVERGED: S.tag_bool(diverged)}
    run = client.create_run(exp_id, start_time=T0 + 1000 * t, tags=tags)
    metrics, best = [], math.inf
    for epoch, err in enumerate(finals, start=1):
        best = min(best, err) if not math.isnan(err) else best
        ts = T0 + 1000 * t + epoch
        values = {S.TEST_ERROR: err, S.BEST_TEST_ERROR: best, S.TRAIN_LOSS: 2.0 / epoch,
                  "train_accuracy": 1 - err, "epoch_seconds": 1.5, "images_per_second": 1000.0}
        for name, start in (rates or {}).items():  # learnable rates drift by 0.05 per epoch
            values[name] = start + 0.05 * epoch
        metrics += [Metric(k, v, ts, epoch) for k, v in values.items()]
    params = [Param(k, str(v)) for k, v in cfg.to_flat().items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=params)
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status, end_time=T0 + 1000 * t + 999)
    return run.info.run_id


def _parent(client, study, seeds, swept, root):
    exp_id = client.create_experiment(study, artifact_location=(root / "artifacts" / study).as_uri())
    run = client.create_run(exp_id, start_time=T0, tags={schema.ROLE: schema.ROLE_STUDY, schema.STUDY: study})
    client.log_batch(run.info.run_id, params=[Param(schema.SEEDS, str(seeds)), Param(schema.SWEPT, swept)])
    client.set_terminated(run.info.run_id, "FINISHED")
    return exp_id, run.info.run_id


def build_store(root: Path, table_only: bool = False) -> dict:
    """The store the docstring above describes; `table_only`: only the study "table" (quicker)."""
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    ids, t = {}, 1
    exp, parent = _parent(client, "table", 5, "preset", root)
    ids["table"] = parent
    for seed, err in enumerate(A):
        ids[f"A{seed}"] = _trial(client, exp, parent, "table", preset("mnist-class-8", seed=seed),
                                 [3 * err, 1.5 * err, err], t)
        t += 1
    for seed, err in enumerate(B + [B_FLAGGED]):
        flagged = seed == 3
        ids[f"B{seed}"] = _trial(client, exp, parent, "table", preset("mnist-class-28", seed=seed),
                                 [3 * err, 1.5 * err, err], t, ok=not flagged, flags="rates" if flagged else "")
        t += 1
    ids["B4"] = _trial(client, exp, parent, "table", preset("mnist-class-28", seed=4), [0.0100], t, status="RUNNING")
    t += 1
    if table_only:
        return dict(uri=uri, ids=ids, root=root)

    exp, parent = _parent(client, "rates", 2, "delta,learnable_rates", root)
    ids["rates"] = parent
    for delta in (0.2, 1.5):
        for learn in (False, True):
            for seed in (0, 1):
                cfg = preset("tiny", delta=delta, learnable_rates=learn, seed=seed)
                bad, diverged = delta > 1, delta > 1 and not learn and seed == 1
                finals = [0.5, math.nan] if diverged else [0.4, 0.3, 0.2 + 0.01 * seed + (0.1 if bad else 0)]
                ids[f"r{delta}-{learn}-{seed}"] = _trial(
                    client, exp, parent, "rates", cfg, finals, t, status="FAILED" if diverged else "FINISHED",
                    ok=not bad, flags="decay" if bad else "",
                    static_ok=not bad, diverged=diverged,
                    rates=dict(zip(schema.RATE_METRICS, (delta, cfg.eta, cfg.theta))) if learn else None)
                t += 1
    exp, first = _parent(client, "relaunched", 1, "", root)  # launched twice under one name, not resumed
    _trial(client, exp, first, "relaunched", preset("tiny"), [0.5], t)
    second = client.create_run(exp, start_time=T0 + 1000 * (t + 1),
                               tags={schema.ROLE: schema.ROLE_STUDY}).info.run_id
    ids["relaunched"] = _trial(client, exp, second, "relaunched", preset("tiny"), [0.1], t + 2)
    client.create_experiment("empty", artifact_location=(root / "artifacts" / "empty").as_uri())
    return dict(uri=uri, ids=ids, root=root)


@pytest.fixture(scope="module")
def hand_store(tmp_path_factory):
    """The hand-built store above: {uri, ids (run ids by name), root}."""
    return build_store(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="module")
def table_runs(hand_store):
    return store.load_runs("table", hand_store["uri"])


# --- loading (store.py) -------------------------------------------------------------------------


def test_load_runs_one_row_per_trial_with_typed_config(table_runs, hand_store):
    runs = table_runs
    assert len(runs) == 10 and hand_store["ids"]["table"] not in set(runs["run_id"])  # children only
    assert list(runs["seed"]) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert runs["seed"].dtype == np.int64
    a = runs.iloc[0]
    assert runs["glimpse_size"].dtype == runs["glimpses"].dtype == np.int64 and a["glimpses"] == 8
    assert runs["delta"].dtype == np.float64 and a["delta"] == 0.2
    assert runs["learnable_rates"].dtype == runs["normalize"].dtype == bool
    assert a["learnable_rates"] and a["normalize"]  # the paper presets learn their rates
    assert a["glimpse_channels"] == (64, 128) and a["context_channels"] == (64, 128, 256)
    assert a["lr_milestones"] == (50, 100, 150, 190, 195)
    assert a["preset"] == "mnist-class-8" and a["task"] == "classify"
    assert runs.iloc[5]["glimpse_size"] == 28 and runs.iloc[5]["glimpse_channels"] == (64, 128, 256)
    assert list(runs[schema.TEST_ERROR].iloc[:5]) == A
    assert list(runs["status"]) == ["FINISHED"] * 9 + ["RUNNING"]
    assert list(runs["flagged"]) == [False] * 8 + [True, False]
    assert runs.iloc[8]["flags"] == "rates" and runs.iloc[8]["stability_ok"] == False  # noqa: E712
    assert runs.iloc[0][schema.BEST_TEST_ERROR] == 0.0040
    assert runs.iloc[0][schema.TRAIN_LOSS] == pytest.approx(2 / 3)
    assert runs["parent_run_id"].eq(hand_store["ids"]["table"]).all()


def test_rate_metrics_do_not_overwrite_the_configured_rates(hand_store):
    runs = store.load_runs("rates", hand_store["uri"])
    learned = runs[runs["learnable_rates"] & (runs["delta"] == 0.2)]
    assert list(learned["delta"]) == [0.2, 0.2]  # the configured starting rate
    assert learned["final_delta"].to_numpy() == pytest.approx([0.35, 0.35])  # 0.2 + 3 epochs x 0.05
    assert runs["diverged"].sum() == 1 and runs["flagged"].sum() == 4 and (~runs["static_ok"]).sum() == 4


def test_params_are_parsed_by_the_schema():
    """The one coercer of MLflow's param strings (it replaced results.cast_param)."""
    assert schema.parse_value("glimpse_channels", "[64, 128]", tuple) == (64, 128)
    assert schema.parse_value("glimpse_channels", "(128,)", tuple) == (128,)
    assert schema.parse_value("normalize", "False", bool) is False
    assert schema.parse_value("normalize", "true", bool) is True
    assert schema.parse_value("glimpses", "8", int) == 8 and schema.parse_value("lr", "0.001", float) == 0.001
    with pytest.raises(ValueError, match="glimpses='8.5' is not a valid int"):
        schema.parse_value("glimpses", "8.5", int)


def test_study_info(hand_store):
    info = store.study_info("table", hand_store["uri"])
    assert info.seeds == 5 and info.swept == ["preset"] and info.parent_run_id == hand_store["ids"]["table"]
    assert store.study_info("rates", hand_store["uri"]).swept == ["delta", "learnable_rates"]


def test_a_study_launched_twice_loads_its_latest_launch(hand_store):
    assert len(store.load_runs("relaunched", hand_store["uri"])) == 2
    with pytest.warns(UserWarning, match="2 parent runs"):
        runs, info = store.load_study("relaunched", hand_store["uri"])
    assert list(runs["run_id"]) == [hand_store["ids"]["relaunched"]] and list(runs[schema.TEST_ERROR]) == [0.1]
    assert info.parents == 2 and info.seeds is None and info.swept is None  # the latest logged none


def test_unknown_or_empty_study_raises(hand_store, tmp_path):
    with pytest.raises(store.StudyNotFound, match="no study .* named 'nope'"):
        store.load_runs("nope", hand_store["uri"])
    with pytest.raises(store.StudyNotFound, match="'empty' has no trial runs"):
        store.load_runs("empty", hand_store["uri"])
    with pytest.raises(store.StudyNotFound, match="no MLflow store"):
        store.load_runs("table", f"sqlite:///{tmp_path}/missing.db")
    assert not (tmp_path / "missing.db").exists()  # not created as a side effect


def test_swept_fields_fall_back_to_varying_fields(table_runs):
    assert store.swept_fields(table_runs, store.StudyInfo("table", swept=["preset"])) == ["preset"]
    varying = store.swept_fields(table_runs)
    assert varying[:3] == ["preset", "glimpse_size", "glimpses"] and "seed" not in varying
    assert "memory_size" in varying and "delta" not in varying


def test_a_renamed_schema_name_is_renamed_on_both_sides(hand_store, tmp_path, monkeypatch):
    """Rename a tag and a metric in the schema: the store written with the new names reads back, and
    the one written with the old names (hand_store) no longer does. Neither side may spell a name by hand."""
    monkeypatch.setattr(schema, "ROLE", "stawm.kind")
    monkeypatch.setattr(schema, "STABILITY_OK", "stability.passed")
    monkeypatch.setattr(schema, "TEST_ERROR", "test_err")
    runs = store.load_runs("table", build_store(tmp_path, table_only=True)["uri"])
    assert list(runs["test_err"].iloc[:5]) == A and list(runs["flagged"]) == [False] * 8 + [True, False]
    assert stats.aggregate(runs, ["glimpses"], seeds_expected=5).iloc[0]["mean"] == pytest.approx(0.00412)
    with pytest.raises(store.StudyNotFound, match="no trial runs"):
        store.load_runs("table", hand_store["uri"])


# --- statistics (stats.py, uncertainty.py) --------------------------------------------------------

# By hand. A: mean 0.0206/5 = 0.00412; deviations -1.2, 0.8, -3.2, 3.8, -0.2 (x1e-4), squares sum
# 26.8e-8, / 4 = 6.7e-8, std = sqrt(6.7e-8) = 2.588435821e-4, sem = std / sqrt(5) = 1.157584e-4.
# B without the flagged run: mean 0.0153/3 = 0.0051; deviations -1, 3, -2 (x1e-4): 14e-8 / 2 = 7e-8,
# std = 2.645751311e-4. B with it: mean 0.0453/4 = 0.011325; squares 4.0005625e-5, 3.5105625e-5,
# 4.1280625e-5, 3.48755625e-4 sum 4.651475e-4, / 3 = 1.550491667e-4, std = 1.2451874022e-2.
A_MEAN, A_STD, A_SEM = 0.00412, 2.588435821e-4, 1.157584e-4
B_MEAN, B_STD = 0.0051, 2.645751311e-4
BF_MEAN, BF_STD = 0.011325, 1.2451874022e-2
# 95% t intervals, mean ± t_{0.975, n-1} · sem, with t from a printed table: t_{0.975, 4} = 2.7764451,
# t_{0.975, 3} = 3.1824463, t_{0.975, 2} = 4.3026527. A: 0.00412 ± 2.7764451 · 1.157584e-4 = 0.00412 ± 3.21398e-4;
# B: 0.0051 ± 4.3026527 · 2.645751311e-4 / sqrt(3) = 0.0051 ± 6.57241e-4; B with the flagged run:
# 0.011325 ± 3.1824463 · 1.2451874022e-2 / 2 = 0.011325 ± 1.981371e-2.
A_HALF, B_HALF, BF_HALF = 2.7764451 * A_SEM, 4.3026527 * B_STD / math.sqrt(3), 3.1824463 * BF_STD / 2


def test_mean_std_sem_by_hand():
    mean, std = stats.mean_std(A)
    assert mean == pytest.approx(A_MEAN, rel=1e-12) and std == pytest.approx(A_STD, rel=1e-9)
    assert uncertainty.sem(A) == pytest.approx(A_SEM, rel=1e-6)
    assert math.isnan(stats.mean_std([0.004])[1]) and stats.mean_std([0.004])[0] == 0.004
    assert math.isnan(uncertainty.sem([0.004])) and all(math.isnan(x) for x in stats.mean_std([]))


def test_t_interval_by_hand():
    """[1, 2, 3, 4, 5]: mean 3, s = sqrt(10/4) = 1.5811388, t_{0.975, 4} = 2.7764451 (a printed table), half-width
    2.7764451 · 1.5811388 / sqrt(5) = 1.9632432; the same values at 90%: t_{0.95, 4} = 2.1318468, 1.5074433."""
    assert uncertainty.t_interval([1, 2, 3, 4, 5]) == pytest.approx((3 - 1.9632432, 3 + 1.9632432), rel=1e-7)
    assert uncertainty.t_interval([1, 2, 3, 4, 5], 0.90) == pytest.approx((3 - 1.5074433, 3 + 1.5074433), rel=1e-7)
    assert uncertainty.t_interval(A) == pytest.approx((A_MEAN - A_HALF, A_MEAN + A_HALF), rel=1e-6)
    assert uncertainty.t_interval([1, 2, np.nan, 3, 4, 5]) == uncertainty.t_interval([1, 2, 3, 4, 5])  # NaN ignored
    assert all(math.isnan(x) for x in uncertainty.t_interval([0.004]))
    # n = 3 to 5 (the shipped studies today and once extended): each interval holds its mean, and widens as n falls
    for n in (3, 5):
        low, high = uncertainty.t_interval(A[:n])
        assert low < np.mean(A[:n]) < high


def test_welch_by_formula():
    """Two hand-made groups: a = [1, 2, 3, 4] (mean 2.5, var 5/3), b = [2, 4, 6, 8, 10] (mean 6, var 10).
    se² = (5/3)/4 + 10/5 = 2.4166667, t = -3.5 / 1.5545632 = -2.2514363, df = 2.4166667² / ((5/12)²/3 + 2²/4)
    = 5.5207877; t_{0.975, 5.5207877} and the p-value from scipy's t distribution at that df."""
    w = uncertainty.welch([1, 2, 3, 4], [2, 4, 6, 8, 10])
    se2 = (5 / 3) / 4 + 10 / 5
    df = se2 ** 2 / (((5 / 3) / 4) ** 2 / 3 + (10 / 5) ** 2 / 4)
    assert (w["n_a"], w["n_b"], w["mean_a"], w["mean_b"], w["diff"]) == (4, 5, 2.5, 6.0, -3.5)
    assert w["t"] == pytest.approx(-3.5 / math.sqrt(se2), rel=1e-12) and w["df"] == pytest.approx(df, rel=1e-12)
    assert df == pytest.approx(5.5207877, rel=1e-7)
    half = scipy.stats.t.ppf(0.975, df) * math.sqrt(se2)
    assert (w["low"], w["high"]) == pytest.approx((-3.5 - half, -3.5 + half), rel=1e-12)
    assert w["p"] == pytest.approx(2 * scipy.stats.t.sf(3.5 / math.sqrt(se2), df), rel=1e-12)
    assert w["p"] == pytest.approx(scipy.stats.ttest_ind([1, 2, 3, 4], [2, 4, 6, 8, 10], equal_var=False).pvalue)
    assert w["low"] < 0 < w["high"] and w["p"] > 0.05  # the interval holds 0 exactly when p > 0.05
    one = uncertainty.welch([1.0], [2, 4, 6])
    assert one["diff"] == -3.0 and all(math.isnan(one[k]) for k in ("low", "high", "p"))
    flat = uncertainty.welch([1, 1, 1], [2, 2, 2])  # no spread anywhere: no test
    assert flat["diff"] == -1.0 and math.isnan(flat["p"])


def test_spearman_on_known_sequences():
    """A monotone sequence has rho = 1 (its interval closes on 1); x = 1..5, y = [1, 3, 2, 5, 4]: rank differences
    0, -1, 1, -1, 1, rho = 1 - 6 · 4 / (5 · 24) = 0.8; its Fisher-z interval: tanh(atanh(0.8) ± 1.959964 ·
    sqrt((1 + 0.32) / 2)) = (-0.4571244, 0.9908429)."""
    up = uncertainty.spearman([1, 2, 3, 4, 5, 6], [0.1, 0.2, 0.5, 0.9, 2.0, 7.0])
    assert up["rho"] == pytest.approx(1.0) and up["n"] == 6 and up["low"] == pytest.approx(1.0) and up["p"] < 0.01
    down = uncertainty.spearman([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1])
    assert down["rho"] == pytest.approx(-1.0)
    s = uncertainty.spearman([1, 2, 3, 4, 5], [1, 3, 2, 5, 4])
    assert s["rho"] == pytest.approx(0.8)
    z, half = math.atanh(0.8), 1.959964 * math.sqrt((1 + 0.8 ** 2 / 2) / 2)
    assert (s["low"], s["high"]) == pytest.approx((math.tanh(z - half), math.tanh(z + half)), rel=1e-6)
    assert (s["low"], s["high"]) == pytest.approx((-0.4571244, 0.9908429), rel=1e-6)
    assert s["p"] == pytest.approx(scipy.stats.spearmanr([1, 2, 3, 4, 5], [1, 3, 2, 5, 4]).pvalue)
    # ties at average ranks, non-finite pairs dropped; 3 pairs: rho but no interval; constant y: nothing
    tied = uncertainty.spearman([1, 1, 2, 2, np.nan], [1, 2, 3, 4, 5])
    assert tied["n"] == 4 and tied["rho"] == pytest.approx(scipy.stats.spearmanr([1, 1, 2, 2], [1, 2, 3, 4])[0])
    assert math.isnan(uncertainty.spearman([1, 2, 3], [3, 1, 2])["low"])
    assert math.isnan(uncertainty.spearman([1, 2, 3, 4], [5, 5, 5, 5])["rho"])


def test_bootstrap_ci_brackets_the_mean_and_repeats():
    low, high = uncertainty.bootstrap_ci(A)
    assert low <= A_MEAN <= high and min(A) <= low and high <= max(A)
    assert (low, high) == uncertainty.bootstrap_ci(A)  # seeded
    narrow = uncertainty.bootstrap_ci(A, confidence=0.5)
    assert low <= narrow[0] <= narrow[1] <= high
    assert all(math.isnan(x) for x in uncertainty.bootstrap_ci([0.004]))


def test_aggregate_by_hand(table_runs):
    agg = stats.aggregate(table_runs, ["glimpse_size", "glimpses"], seeds_expected=5)
    assert list(agg.columns[:2]) == ["glimpse_size", "glimpses"]
    a, b = agg.iloc[0], agg.iloc[1]
    assert (a["glimpse_size"], a["glimpses"], b["glimpse_size"], b["glimpses"]) == (8, 8, 28, 10)
    assert a["n"] == 5 and a["mean"] == pytest.approx(A_MEAN) and a["std"] == pytest.approx(A_STD, rel=1e-9)
    assert (a["t_low"], a["t_high"]) == pytest.approx((A_MEAN - A_HALF, A_MEAN + A_HALF), rel=1e-6)
    assert a["sem"] == pytest.approx(A_SEM, rel=1e-6) and (a["min"], a["max"]) == (0.0038, 0.0045)
    assert a["flagged"] == 0 and a["complete"] and a["seeds_used"] == (0, 1, 2, 3, 4)
    # B: every finished seed counts, the flagged seed 3 too; the running seed 4 is left out: 4 of 5
    assert b["n"] == 4 and b["mean"] == pytest.approx(BF_MEAN) and b["std"] == pytest.approx(BF_STD, rel=1e-9)
    assert (b["t_low"], b["t_high"]) == pytest.approx((BF_MEAN - BF_HALF, BF_MEAN + BF_HALF), rel=1e-6)
    assert b["flagged"] == 1 and b["unfinished"] == 1 and not b["complete"] and b["seeds_used"] == (0, 1, 2, 3)
    # asked to, the flagged seed is left out of the statistics but still counted in `flagged`: 3 of 5
    only = stats.aggregate(table_runs, ["glimpse_size", "glimpses"], seeds_expected=5, exclude_flagged=True).iloc[1]
    assert only["n"] == 3 and only["mean"] == pytest.approx(B_MEAN) and only["std"] == pytest.approx(B_STD, rel=1e-9)
    assert only["flagged"] == 1 and only["seeds_used"] == (0, 1, 2)


def test_aggregate_single_seed_has_nan_std_and_interval_columns(table_runs):
    one = table_runs[table_runs["seed"] == 0]
    agg = stats.aggregate(one, ["glimpses"], seeds_expected=5, bootstrap=0.95)
    assert list(agg["n"]) == [1, 1] and agg["std"].isna().all() and not agg["complete"].any()
    assert agg[["t_low", "t_high", "bootstrap_low", "bootstrap_high"]].isna().all().all()
    agg = stats.aggregate(table_runs, ["glimpses"], bootstrap=0.95)
    assert (agg["bootstrap_low"] <= agg["mean"]).all() and (agg["mean"] <= agg["bootstrap_high"]).all()
    assert (agg["t_low"] <= agg["mean"]).all() and (agg["mean"] <= agg["t_high"]).all()
    # with 5 seeds the percentile bootstrap is narrower than the t interval (it has no t factor): why the
    # tables show the t interval
    a = agg.iloc[0]
    assert a["bootstrap_high"] - a["bootstrap_low"] < a["t_high"] - a["t_low"]
    assert list(agg["complete"]) == [True, False]  # seeds_expected unknown: compared with the largest n


def test_aggregate_warns_when_a_group_mixes_configurations(hand_store):
    runs = store.load_runs("rates", hand_store["uri"])
    with pytest.warns(UserWarning, match=r"differ in \['learnable_rates'\]"):
        stats.aggregate(runs, ["delta"])


def test_welch_p_matches_scipy():
    assert uncertainty.welch_p(A, B) == pytest.approx(scipy.stats.ttest_ind(A, B, equal_var=False).pvalue, rel=1e-12)
    assert math.isnan(uncertainty.welch_p(A, [0.005]))


def test_outcomes_of_the_hand_store(hand_store):
    """delta = 0.2 (0.20, 0.21 at the last epoch) is the paper's rate with theta = 0.5: the reference, mean
    0.205 over its 4 runs; degraded at 2 x: 0.41. delta = 1.5 ends at 0.30, 0.31 (not degraded) and one
    diverged (NaN: no learning, degraded). Chance for 10 classes: 90%, no learning from 81%."""
    from stawm.analysis import outcomes

    runs = store.load_runs("rates", hand_store["uri"])
    assert outcomes.paper_reference(runs) == pytest.approx(0.205)
    measured = outcomes.measure(runs)
    kinds = outcomes.outcome(measured).reindex(runs["run_id"]).tolist()
    assert kinds.count("diverged") == 1 and kinds.count("trained") == 7
    assert measured["no_learning"].sum() == 1 and measured["degraded"].sum() == 1  # the diverged run only
    assert outcomes.degraded(runs, factor=1.45).sum() == 4  # 0.30, 0.31 >= 1.45 x 0.205 = 0.297; and NaN


# --- tables (tables.py) -------------------------------------------------------------------------

# Welch by hand: var/n 6.7e-8/5 + 7e-8/3 = 3.6733e-8, t = (0.00412 - 0.0051) / sqrt(3.6733e-8) = -5.113,
# df = 3.6733e-8^2 / ((1.34e-8)^2 / 4 + (2.3333e-8)^2 / 2) = 4.255, two-sided p = 0.0059.
P_AB = scipy.stats.ttest_ind(A, B, equal_var=False).pvalue


def test_format_table_markdown_and_latex_exactly(table_runs):
    agg = stats.aggregate(table_runs, ["task", "glimpse_size", "glimpses"], seeds_expected=5, exclude_flagged=True)
    table = tables.format_table(agg, ["glimpse_size", "glimpses"], published=tables.PUBLISHED,
                                baseline={"glimpse_size": 8})
    assert f"{P_AB:.4f}" == "0.0059"
    # A: 0.412% [0.412 ∓ 0.0321] = [0.38, 0.44]; B (flagged run left out): 0.51% ∓ 0.0657 = [0.44, 0.58]
    assert (100 * (A_MEAN - A_HALF), 100 * (A_MEAN + A_HALF)) == pytest.approx((0.37986, 0.44414), abs=1e-5)
    assert (100 * (B_MEAN - B_HALF), 100 * (B_MEAN + B_HALF)) == pytest.approx((0.44428, 0.57572), abs=1e-5)
    left_out = "flagged runs (a flagging condition failed) left out of the statistics, counted in `flagged`"
    interval = "mean [95% t interval: mean ± t_{0.975, n−1} · s/√n, s the std (ddof=1)] over 5 seeds"
    caption = (f"test_error in %: {interval}; std (ddof=1) in percentage points; {left_out}; "
               "rows short of 5 seeds are marked incomplete; unfinished runs (failed or still running) are left out; "
               "published: the paper's Table 1 (mean ± std), "
               "Δ = reproduced − published mean in percentage points; p: Welch's t-test against "
               "glimpse_size=8, glimpses=8; S_g=28, N=10: best of 5 runs 0.31%.")
    assert table.markdown == (
        f"Table: {caption}\n\n"
        "| glimpse_size | glimpses | test error (%): mean [95% t interval] | std (pp) | n | flagged | published "
        "| Δ (pp) | p (Welch) |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        "| 8 | 8 | **0.41% [0.38, 0.44]** | 0.03 | 5 | 0 | 0.41% ± 0.03 | +0.00 | baseline |\n"
        "| 28 | 10 | 0.51% [0.44, 0.58] | 0.03 | 3/5 (incomplete, 1 unfinished) | 1 | 0.35% ± 0.02 | +0.16 "
        "| 0.006 |\n")
    assert table.latex == (
        "% requires \\usepackage{booktabs}\n"
        "\\begin{table}[t]\n"
        "\\centering\n"
        "\\caption{test\\_error in \\%: mean [95\\% t interval: mean $\\pm$ t\\_\\{0.975, n$-$1\\} · s/√n, s the "
        "std (ddof=1)] over 5 seeds; std (ddof=1) in percentage points; flagged runs (a flagging condition failed) "
        "left out of the statistics, counted in `flagged`; "
        "rows short of 5 seeds are marked incomplete; unfinished runs (failed or still running) are left out; "
        "published: the paper's Table 1 (mean $\\pm$ std), "
        "$\\Delta$ = reproduced $-$ published mean in percentage points; p: Welch's t-test against "
        "glimpse\\_size=8, glimpses=8; S\\_g=28, N=10: best of 5 runs 0.31\\%.}\n"
        "\\begin{tabular}{llrrrrrrr}\n"
        "\\toprule\n"
        "glimpse\\_size & glimpses & test error (\\%): mean [95\\% t interval] & std (pp) & n & flagged & published & "
        "$\\Delta$ (pp) & p (Welch) \\\\\n"
        "\\midrule\n"
        "8 & 8 & \\textbf{0.41\\% [0.38, 0.44]} & 0.03 & 5 & 0 & 0.41\\% $\\pm$ 0.03 & +0.00 & baseline \\\\\n"
        "28 & 10 & 0.51\\% [0.44, 0.58] & 0.03 & 3/5 (incomplete, 1 unfinished) & 1 & 0.35\\% $\\pm$ 0.02 & +0.16 "
        "& 0.006 \\\\\n"
        "\\bottomrule\n"
        "\\end{tabular}\n"
        "\\end{table}\n")
    # by default every finished run counts, flagged ones too, and the caption says so
    counted = tables.format_table(stats.aggregate(table_runs, ["glimpse_size", "glimpses"], seeds_expected=5))
    assert "flagged runs (a flagging condition failed) included in the statistics" in counted.markdown
    # B with its flagged run: 1.1325% ∓ 1.981371 = [-0.85, 3.11]: a lower end below 0, shown as computed and said
    assert counted.markdown.splitlines()[-1] == ("| 28 | 10 | 1.13% [-0.85, 3.11] | 1.25 | 4/5 (incomplete, 1 "
                                                 "unfinished) | 1 |")
    assert "lower end below 0 (few seeds, a wide spread) is shown as computed" in counted.markdown


def test_format_table_baseline_must_match_one_row(table_runs):
    agg = stats.aggregate(table_runs, ["glimpse_size", "glimpses"], seeds_expected=5)
    with pytest.raises(tables.BaselineError, match=r"matches 0 rows of the table, not one"):
        tables.format_table(agg, baseline={"glimpse_size": 6})
    with pytest.raises(tables.BaselineError, match="'delta' is not a column"):
        tables.format_table(agg, baseline={"delta": 0.2})


def test_table1_quotes_baselines_and_unreproduced_rows(table_runs):
    table1 = tables.table1(table_runs, seeds_expected=5, exclude_flagged=True)
    a = table1["1a"].markdown.splitlines()
    assert a[2] == ("| model | glimpse_size | glimpses | test error (%): mean [95% t interval] | std (pp) | n "
                    "| flagged | published | Δ (pp) |")
    ram = ((5, "1.55%"), (6, "1.29%"), (7, "1.47%"))
    assert a[4:7] == [f"| RAM | 8 | {n} | — | — | — | — | {e} | — |" for n, e in ram]
    assert a[7:] == [
        "| STAWM (reproduced) | 8 | 8 | **0.41% [0.38, 0.44]** | 0.03 | 5 | 0 | 0.41% ± 0.03 | +0.00 |",
        "| STAWM (reproduced) | 28 | 10 | 0.51% [0.44, 0.58] | 0.03 | 3/5 (incomplete, 1 unfinished) | 1 "
        "| 0.35% ± 0.02 | +0.16 |"]
    b = table1["1b"].markdown.splitlines()
    assert [r.split(" | ")[0] for r in b[4:]] == [
        "| DBM", "| Adversarial", "| Virtual Adversarial", "| Ladder", "| STAWM (self-supervised)"]
    assert b[-1] == "| STAWM (self-supervised) | 6 | 12 | — | — | — | — | 0.77% | — |"
    assert "\\begin{tabular}{lllrrrrrr}" in table1["1b"].latex


def test_published_constants():
    P = tables.PUBLISHED
    assert P[("classify", 8, 8)].error_pct == 0.41 and P[("classify", 8, 8)].std_pct == 0.03
    assert P[("classify", 28, 10)].std_pct == 0.02 and "0.31%" in P[("classify", 28, 10)].note
    assert P[("selfsup", 6, 12)].error_pct == 0.77
    assert [p.error_pct for p in tables.BASELINES["1a"]] == [1.55, 1.29, 1.47]
    assert {p.model: p.error_pct for p in tables.BASELINES["1b"]} == {
        "DBM": 0.79, "Adversarial": 0.78, "Virtual Adversarial": 0.64, "Ladder": 0.57}


def test_summary_is_the_csv_form(table_runs):
    out = tables.summary(stats.aggregate(table_runs, ["glimpse_channels"], seeds_expected=5))
    assert list(out.columns) == ["glimpse_channels", "n", "test_error_mean", "test_error_t95_low",
                                 "test_error_t95_high", "test_error_std", "flagged", "complete",
                                 "flagged_in_statistics"]
    assert out[["test_error_t95_low", "test_error_t95_high"]].iloc[0].tolist() == pytest.approx(
        [A_MEAN - A_HALF, A_MEAN + A_HALF], rel=1e-6)
    assert list(out["glimpse_channels"]) == ["[64, 128]", "[64, 128, 256]"] and list(out["n"]) == [5, 4]
    assert out["test_error_mean"].tolist() == pytest.approx([A_MEAN, BF_MEAN]) and out["flagged_in_statistics"].all()
    out = tables.summary(stats.aggregate(table_runs, ["glimpse_channels"], seeds_expected=5, exclude_flagged=True))
    assert list(out["n"]) == [5, 3] and out["test_error_mean"].tolist() == pytest.approx([A_MEAN, B_MEAN])
    assert not out["flagged_in_statistics"].any()


# --- histories (store.py) -----------------------------------------------------------------------


def test_metric_history_is_cached_for_finished_runs(hand_store, table_runs, tmp_path):
    copy = tmp_path / "copy.db"
    shutil.copy(hand_store["root"] / "mlflow.db", copy)
    uri = f"sqlite:///{copy}"
    finished = table_runs[table_runs["status"] == "FINISHED"]
    first = store.metric_history(finished, schema.TEST_ERROR, uri, tmp_path / "cache")
    assert list(first.columns) == ["run_id", "metric", "step", "value"]
    a0 = first[first["run_id"] == hand_store["ids"]["A0"]]
    assert list(a0["step"]) == [1, 2, 3] and a0["value"].to_numpy() == pytest.approx([0.012, 0.006, 0.004])
    copy.unlink()  # the store is gone: the second call must come from the cache
    again = store.metric_history(finished, schema.TEST_ERROR, uri, tmp_path / "cache")
    pd.testing.assert_frame_equal(first, again)
    with pytest.raises(store.StudyNotFound):  # a running run is never cached, so it must be re-read
        store.metric_history(table_runs, schema.TEST_ERROR, uri, tmp_path / "cache")
    running = store.metric_history(table_runs, schema.TEST_ERROR, hand_store["uri"], tmp_path / "cache")
    assert len(running) == len(first) + 1
    assert not (tmp_path / "cache" / schema.TEST_ERROR / f"{hand_store['ids']['B4']}.parquet").exists()
    assert not list((tmp_path / "cache").rglob(".*tmp*"))  # written whole: no temporary file left


def test_write_whole_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "table.md"
    target.write_text("old")

    def half(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.write_whole(target, half)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["table.md"]
    files.write_whole(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"


# --- plots (plots.py) ---------------------------------------------------------------------------


def _ticks(ax) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels()]


def test_plots_return_figures(hand_store, table_runs, tmp_path):
    rates = store.load_runs("rates", hand_store["uri"])
    swept = ["delta", "learnable_rates"]
    figs = plots.ablation_figures(rates, swept, seeds_expected=2, swept=swept)  # hue: the other field
    figs["glimpses"] = plots.plot_ablation(table_runs, "glimpses", seeds_expected=5)
    history = store.metric_history(table_runs, schema.TEST_ERROR, hand_store["uri"], tmp_path)
    figs["curves"] = plots.plot_curves(history, "preset", table_runs)
    measured = outcomes.measure(rates)
    figs["conditions"] = stability_plots.plot_condition_map(rates)
    figs["outcomes"] = stability_plots.plot_outcome_map(rates, measured)
    figs["heatmaps"] = stability_plots.plot_error_heatmaps(rates, threshold=0.25)
    figs["by_rate"] = stability_plots.plot_error_by_rate(rates)
    history = store.metric_histories(stats.learnable(rates), schema.RATE_METRICS, hand_store["uri"], tmp_path)
    figs["rates"] = stability_plots.plot_rate_trajectories(history, rates, measured)
    for name, fig in figs.items():
        paths = plots.save_figure(fig, tmp_path / "figs", name, formats=("png",))  # svg: the report test
        assert all(p.stat().st_size > 1000 for p in paths), name
    # the ablation draws 5 + 4 seeds (the flagged B seed counted like the others) and two means
    ax = figs["glimpses"].axes[0]
    assert sum(len(c.get_offsets()) for c in ax.collections if c.get_gid() == "seed") == 9
    assert not [c for c in ax.collections if c.get_gid() == "flagged (left out)"]
    assert "1 of 10 runs flagged, all counted" in " ".join(ax.get_title().split())
    legend = [t.get_text() for t in figs["ablation_delta"].axes[0].get_legend().get_texts()]
    assert legend == ["learnable_rates=False", "learnable_rates=True"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["each seed", "mean [95% t interval]"]
    # the heat map outlines the cells at or above the threshold: delta = 1.5 (its finished runs 0.30, 0.30, 0.31)
    outlined = [p for a in figs["heatmaps"].axes for p in a.patches if p.get_edgecolor()[:3] == (1.0, 0.0, 0.0)]
    assert len(outlined) == 1


def test_ablation_ticks_are_the_swept_values_and_bars_the_table(hand_store, table_runs):
    """One tick per value run (not 6.25, 6.5, ...); the bars are the 95% t interval of `aggregate`."""
    ax = plots.plot_ablation(table_runs, "glimpse_size", seeds_expected=5).axes[0]
    assert _ticks(ax) == ["8", "28"] and list(ax.get_xticks()) == [0, 1]
    bars = [line.get_ydata() for line in ax.lines if line.get_gid() == "interval"]
    assert [(np.nanmin(y), np.nanmax(y)) for y in bars] == [
        pytest.approx((100 * (A_MEAN - A_HALF), 100 * (A_MEAN + A_HALF))),
        pytest.approx((100 * (BF_MEAN - BF_HALF), 100 * (BF_MEAN + BF_HALF)))]
    title = " ".join(ax.get_title().split())
    assert "mean [95% t interval] over 5 seeds" in title and "n=k/N where fewer" in title
    assert "categorical axis" in title
    assert "n=4/5" in [t.get_text() for t in ax.texts]
    rates = store.load_runs("rates", hand_store["uri"])
    ax = plots.plot_ablation(rates, "delta", seeds_expected=2, hue="learnable_rates", exclude_flagged=True).axes[0]
    assert _ticks(ax) == ["0.2", "1.5"]
    # delta=1.5: every run flagged and left out when asked, so n=0 for both series, labelled side by side at the foot
    foot = [t for t in ax.texts if t.get_text() == "n=0/2"]
    assert len(foot) == 2 and foot[0].xy[0] == pytest.approx(0.8) and foot[1].xy[0] == pytest.approx(1.2)


def test_ablations_draw_into_the_axes_given(table_runs):
    """Two ablations side by side in the caller's figure: each panel's means and 95% t interval bars are those
    of its runs (worked out here from the frame), and no figure of their own is made."""
    import matplotlib.pyplot as plt

    finished = table_runs[table_runs["status"] == "FINISHED"]  # B's seed 4 is still running
    by_size = {"without flagged": finished[~finished["flagged"]], "with flagged": finished}
    expected = {k: [100 * runs.loc[runs["glimpse_size"] == size, schema.TEST_ERROR] for size in (8, 28)]
                for k, runs in by_size.items()}
    assert [e.mean() / 100 for e in expected["without flagged"]] == pytest.approx([A_MEAN, B_MEAN])
    assert [e.mean() / 100 for e in expected["with flagged"]] == pytest.approx([A_MEAN, BF_MEAN])
    fig, axes = plt.subplots(1, 2)
    try:
        figures = plt.get_fignums()
        drawn = [plots.plot_ablation(table_runs, "glimpse_size", seeds_expected=5, exclude_flagged=True, ax=axes[0]),
                 plots.plot_ablation(table_runs, "glimpse_size", ax=axes[1])]
        assert plt.get_fignums() == figures and drawn == [fig, fig] and list(fig.axes) == list(axes)
        for ax, (key, errors) in zip(axes, expected.items()):
            assert _ticks(ax) == ["8", "28"], key
            (means,) = [line.get_ydata() for line in ax.lines if line.get_gid() == "mean"]
            assert list(means) == pytest.approx([e.mean() for e in errors]), key
            bars = [line.get_ydata() for line in ax.lines if line.get_gid() == "interval"]
            half = [scipy.stats.t.ppf(0.975, len(e) - 1) * e.std(ddof=1) / math.sqrt(len(e)) for e in errors]
            assert [(np.nanmin(y), np.nanmax(y)) for y in bars] == [
                pytest.approx((e.mean() - h, e.mean() + h)) for e, h in zip(errors, half)], key
            seeds = sum(len(c.get_offsets()) for c in ax.collections if c.get_gid() == "seed")
            assert seeds == sum(len(e) for e in errors), key
        crosses = [[len(c.get_offsets()) for c in ax.collections if c.get_gid() == "flagged (left out)"]
                   for ax in axes]
        assert crosses == [[1], []]  # the flagged B seed: a cross on the left, a seed on the right
        titles = [" ".join(ax.get_title().split()) for ax in axes]  # wrapped to each panel's width
        assert "over 5 seeds (n=k/N where fewer)" in titles[0] and "over up to 5 seeds" in titles[1]
        assert [[t.get_text() for t in ax.texts] for ax in axes] == [["n=3/5"], ["n=4/5"]]  # B: 3, then 4 seeds
    finally:
        plt.close(fig)


def test_single_epoch_curves_show_a_point(hand_store, table_runs):
    """A run of one epoch draws a marker (a line through one point is invisible) and error bars."""
    one = pd.DataFrame({"run_id": table_runs["run_id"].iloc[:5], "metric": schema.TEST_ERROR,
                        "step": 1, "value": A})
    ax = plots.plot_curves(one, (), table_runs).axes[0]
    drawn = [line for line in ax.lines if len(line.get_xdata()) == 1]
    assert drawn and drawn[0].get_marker() == "o" and drawn[0].get_ydata()[0] == pytest.approx(100 * A_MEAN)
    assert ax.get_xlim()[0] < 1 < ax.get_xlim()[1]
    assert "mean [95% t interval] over 5 seeds per line" in ax.get_title()


def test_condition_map_ticks_are_the_rates_run(hand_store):
    rates = store.load_runs("rates", hand_store["uri"])
    fixed = rates[~rates["learnable_rates"]]
    fig = stability_plots.plot_condition_map(fixed)
    (ax,) = [a for a in fig.axes if a.get_title()]
    assert list(ax.get_xticks()) == [0.2, 1.5] and list(ax.get_yticks()) == [rates["eta"].iloc[0]]
    assert ax.get_title() == f"θ = {rates['theta'].iloc[0]:g}" and "4 runs" in fig._suptitle.get_text()


def test_maps_place_learned_runs_at_their_final_rates(hand_store):
    """The hand store's learnable runs drift by 0.05 per epoch over 3 epochs: each stands at its start + 0.15 (where
    its conditions were last checked), with an arrow from its start; fixed runs stay at their configured rates."""
    rates = store.load_runs("rates", hand_store["uri"])
    placed = stability_plots.placed_rates(rates)
    learns = rates["learnable_rates"].astype(bool)
    finished = learns & (rates["status"] == "FINISHED")
    assert placed.loc[finished, "x"].tolist() == pytest.approx((rates.loc[finished, "delta"] + 0.15).tolist())
    assert placed.loc[finished, "y"].tolist() == pytest.approx((rates.loc[finished, "eta"] + 0.15).tolist())
    assert placed.loc[finished, "learned"].all() and not placed.loc[~learns, "learned"].any()
    assert placed.loc[~learns, "x"].tolist() == rates.loc[~learns, "delta"].tolist()
    fig = stability_plots.plot_outcome_map(rates, outcomes.measure(rates))
    (ax,) = [a for a in fig.axes if a.get_title()]
    arrows = [t for t in ax.texts if getattr(t, "arrow_patch", None) is not None]
    assert len(arrows) == 2  # two starts (delta 0.2, 1.5), each seed's drift the same: one arrow per start
    assert "stand at their final δ, η" in " ".join(fig._suptitle.get_text().split())


# --- the report command and the notebooks -------------------------------------------------------


def _report(*args, cwd=REPO):
    # the console script the package installs, from the interpreter's own environment
    return subprocess.run([str(Path(sys.executable).parent / "stawm-report"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_report_end_to_end(hand_store, tmp_path):
    out = tmp_path / "report"
    done = _report("--study", "rates", "--tracking-uri", hand_store["uri"], "--out", str(out),
                   "--cache-dir", str(tmp_path / "cache"), "--baseline", "delta=0.2,learnable_rates=False")
    assert done.returncode == 0, done.stderr
    expected = {"table.md", "table.tex", "summary.csv", "runs.csv", "predictions.md", "predictions.csv",
                "comparisons.md", "comparisons.csv", "degraded_sweep.csv"} | {
        f"{n}.{e}" for n in ("ablation_delta", "ablation_learnable_rates", "curves_test_error", "condition_map",
                             "outcome_map", "error_heatmaps", "error_by_rate", "rate_trajectories", "degraded_sweep")
        for e in ("png", "svg")}
    assert {p.name for p in out.iterdir()} == expected
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == ["delta", "learnable_rates", "n", "test_error_mean", "test_error_t95_low",
                                     "test_error_t95_high", "test_error_std", "flagged", "complete",
                                     "flagged_in_statistics"]
    # delta = 1.5 is flagged (decay) and counted; its diverged run FAILED: unfinished, left out
    assert list(summary["n"]) == [2, 2, 1, 2] and list(summary["flagged"]) == [0, 0, 2, 2]
    # no stability artifacts in this store: the conditions re-checked on the rates; decay flags delta = 1.5,
    # which diverged once and was degraded (>= 2 x 0.205) only there
    predictions = pd.read_csv(out / "predictions.csv").set_index(["condition", "outcome"])
    decay = predictions.loc[("decay", "diverged")]
    assert (decay["flagged_and_outcome"], decay["flagged_no_outcome"], decay["outcome_not_flagged"],
            decay["neither"]) == (1, 3, 0, 4) and decay["precision"] == 0.25 and decay["recall"] == 1.0
    assert summary["test_error_mean"].iloc[0] == pytest.approx(0.205)  # (0.20 + 0.21) / 2
    assert summary["test_error_std"].iloc[0] == pytest.approx(0.01 / math.sqrt(2))
    # two seeds: 0.205 ± t_{0.975, 1} · 0.005 = 0.205 ± 12.7062047 · 0.005 = [0.14147, 0.26853]
    assert "| 0.2 | False | **20.50% [14.15, 26.85]** | 0.71 | 2 | 0 | baseline |" in (out / "table.md").read_text()
    # the comparisons that apply: per learnable_rates, delta > 1 against delta <= 0.2 (theta = 0.5 > 0), and
    # learnable against fixed at each delta; the diverged run has no final error: left out, and said
    compared = pd.read_csv(out / "comparisons.csv")
    row = compared[(compared["comparison"] == "delta > 1 against delta <= 0.2")
                   & compared["scope"].str.startswith("learnable_rates=False")].iloc[0]
    assert compared["comparison"].str.endswith("(the configured start of learned rates)").sum() == 2  # learnable
    assert (row["runs_a"], row["n_a"], row["runs_b"], row["n_b"], row["left_out"]) == (2, 1, 2, 2, 1)
    assert "1 not finished (FAILED: 1)" in row["why"]
    assert len(compared[compared["comparison"] == "learnable against fixed rates"]) == 2
    sweep = pd.read_csv(out / "degraded_sweep.csv")
    assert sorted(set(sweep["factor"])) == [1.1, 1.25, 1.5, 2.0, 3.0, 5.0]
    logged = {f.path for f in MlflowClient(hand_store["uri"]).list_artifacts(hand_store["ids"]["rates"], "report")}
    assert logged == {f"report/{name}" for name in expected}


def test_report_table_study_compares_with_the_paper(hand_store, tmp_path):
    from stawm.analysis.report import main  # in-process: the subprocess path is checked above

    assert main(["--study", "table", "--tracking-uri", hand_store["uri"], "--out", str(tmp_path), "--no-curves",
                 "--no-log"]) == 0
    md = (tmp_path / "table.md").read_text()
    assert ("| mnist-class-28 | 1.13% [-0.85, 3.11] | 1.25 | 4/5 (incomplete, 1 unfinished) | 1 | 0.35% ± 0.02 "
            "| +0.78 |") in md
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary.to_dict("list") == {
        "preset": ["mnist-class-28", "mnist-class-8"], "n": [4, 5], "test_error_mean": pytest.approx([BF_MEAN, A_MEAN]),
        "test_error_t95_low": pytest.approx([BF_MEAN - BF_HALF, A_MEAN - A_HALF], rel=1e-6),
        "test_error_t95_high": pytest.approx([BF_MEAN + BF_HALF, A_MEAN + A_HALF], rel=1e-6),
        "test_error_std": pytest.approx([BF_STD, A_STD]),
        "flagged": [1, 0], "complete": [False, True], "flagged_in_statistics": [True, True]}
    assert main(["--study", "table", "--tracking-uri", hand_store["uri"], "--out", str(tmp_path), "--no-curves",
                 "--no-log", "--exclude-flagged"]) == 0
    assert ("| mnist-class-28 | 0.51% [0.44, 0.58] | 0.03 | 3/5 (incomplete, 1 unfinished) | 1 | 0.35% ± 0.02 "
            "| +0.16 |") in (tmp_path / "table.md").read_text()
    assert list(pd.read_csv(tmp_path / "summary.csv")["flagged_in_statistics"]) == [False, False]


def test_report_unknown_study_exits_2_with_one_line(hand_store, tmp_path, capsys):
    from stawm.analysis.report import main  # in-process; `python -m stawm.analysis.report` is sys.exit(main())

    assert main(["--study", "nope", "--tracking-uri", hand_store["uri"], "--out", str(tmp_path / "x")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: no study (MLflow experiment) named 'nope' at {hand_store['uri']}\n"
    assert captured.out == ""
    assert main(["--study", "empty", "--tracking-uri", hand_store["uri"], "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: study 'empty' has no trial runs") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


BAD_REPORT_INPUT = {  # extra flags: the one line on stderr
    "out is under a file": (["--out", "{tmp}/file.txt/report"],
                            "error: --out {tmp}/file.txt/report: {tmp}/file.txt is a file, not a folder; "
                            "pass --out a folder path\n"),
    "cache is under a file": (["--cache-dir", "{tmp}/file.txt/cache"],
                              "error: --cache-dir {tmp}/file.txt/cache: {tmp}/file.txt is a file, not a folder; "
                              "pass --cache-dir a folder path\n"),
    "baseline without =": (["--baseline", "delta"],
                           "error: --baseline 'delta' is not FIELD=VALUE; e.g. --baseline learnable_rates=False\n"),
    "baseline names no field": (["--baseline", "dleta=0.2"],
                                "error: --baseline names 'dleta', not a config field; "
                                "e.g. --baseline learnable_rates=False\n"),
    "baseline of the wrong type": (["--baseline", "delta=small"],
                                   "error: --baseline delta='small' is not a valid float; "
                                   "e.g. --baseline learnable_rates=False\n"),
    "baseline matches no row": (["--baseline", "delta=0.3"],
                                "error: --baseline: baseline {'delta': 0.3} matches 0 rows of the table, not one; "
                                "name values of the swept fields ['delta', 'learnable_rates']\n"),
    "metric no run logged": (["--metric", "test_eror"], None),
    "degraded factor not above 0": (["--degraded-factor", "-1"],
                                    "error: --degraded-factor -1: give a factor above 0, e.g. 2 (twice the paper-rate "
                                    "runs' error)\n"),
}


@pytest.mark.parametrize("case", list(BAD_REPORT_INPUT))
def test_report_bad_input_exits_2_with_one_line_and_writes_nothing(case, hand_store, tmp_path, capsys):
    from stawm.analysis.report import main

    (tmp_path / "file.txt").write_text("a file")
    extra, line = BAD_REPORT_INPUT[case]
    argv = ["--study", "rates", "--tracking-uri", hand_store["uri"], "--out", str(tmp_path / "report"),
            "--cache-dir", str(tmp_path / "cache"), "--no-log"]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in extra]  # a later --out or --cache-dir wins
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines(keepends=True)[-1]  # after the one progress line, if computed
    if line is None:
        assert err.startswith("error: --metric test_eror: no run of study 'rates' logged it; pass one of [")
        assert "'test_error'" in err and err.count("\n") == 1
    else:
        assert err == line.replace("{tmp}", str(tmp_path))
    assert not (tmp_path / "report").exists()  # checked or computed before anything was written


def test_report_help_documents_the_flags():
    done = _report("--help")
    assert done.returncode == 0 and "usage: stawm-report" in done.stdout
    for flag in ("--study", "--tracking-uri", "--out", "--seeds", "--exclude-flagged", "--degraded-factor",
                 "--baseline", "--cache-dir"):
        assert flag in done.stdout


def test_parse_baseline_keeps_a_tuple_value_whole():
    from stawm.analysis.report import parse_baseline

    assert parse_baseline("glimpse_channels=64,128, delta=0.2") == {"glimpse_channels": (64, 128), "delta": 0.2}
    assert parse_baseline("learnable_rates=False") == {"learnable_rates": False} and parse_baseline(None) is None


def test_inject_parameters_follows_papermill():
    import nbformat

    from stawm.analysis.notebooks import inject_parameters

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# title"),
        nbformat.v4.new_code_cell("study = 'x'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print(study)")])
    once = inject_parameters(nb, {"study": "table", "seeds": 5})
    twice = inject_parameters(once, {"study": "rates"})  # a re-run replaces the injected cell
    assert [c.source for c in twice.cells] == ["# title", "study = 'x'", "# Parameters\nstudy = 'rates'\n",
                                               "print(study)"]
    assert len(nb.cells) == 3 and once.cells[2].source == "# Parameters\nstudy = 'table'\nseeds = 5\n"
    with pytest.raises(ValueError, match="no cell tagged 'parameters'"):
        inject_parameters(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), {})


def test_notebooks_bad_input_exits_2_with_one_line(tmp_path, capsys):
    import nbformat

    from stawm.analysis.notebooks import main

    notebook = REPO / "analysis" / "table1.ipynb"
    untagged = tmp_path / "untagged.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), untagged)
    (tmp_path / "file.txt").write_text("a file")
    cases = {
        ("-p", "study"): "error: -p 'study' is not FIELD=VALUE; write -p NAME=VALUE, e.g. -p study=table1\n",
        ("-p", "=x"): "error: -p '=x' is not FIELD=VALUE; write -p NAME=VALUE, e.g. -p study=table1\n",
    }
    for (flag, value), line in cases.items():
        assert main([str(notebook), "--out", str(tmp_path / "o.ipynb"), flag, value]) == 2
        assert capsys.readouterr().err == line
    assert main([str(tmp_path / "nope.ipynb"), "--out", str(tmp_path / "o.ipynb")]) == 2
    assert capsys.readouterr().err == (f"error: no notebook at {tmp_path / 'nope.ipynb'}; "
                                       f"pass the path of an .ipynb file\n")
    assert main([str(untagged), "--out", str(tmp_path / "o.ipynb")]) == 2
    assert capsys.readouterr().err == (f"error: {untagged}: the notebook has no cell tagged 'parameters'; "
                                       f"tag its cell of defaults `parameters`\n")
    assert main([str(notebook), "--out", str(tmp_path / "file.txt" / "o.ipynb")]) == 2
    assert capsys.readouterr().err == (f"error: --out {tmp_path / 'file.txt'}: {tmp_path / 'file.txt'} is a file, "
                                       f"not a folder; pass --out a folder path\n")
    assert not (tmp_path / "o.ipynb").exists()


def test_notebook_kernel_is_this_interpreter(tmp_path):
    import nbformat

    from stawm.analysis.notebooks import run_notebook

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import sys, stawm.analysis\nprint(sys.executable, x)")])
    nbformat.write(nb, tmp_path / "probe.ipynb")
    done = run_notebook(tmp_path / "probe.ipynb", {"x": 7}, tmp_path / "out.ipynb", cwd=tmp_path)
    assert done.cells[1].metadata["tags"] == ["injected-parameters"]
    assert done.cells[2].outputs[0]["text"].strip() == f"{sys.executable} 7"


NOTEBOOKS = {  # notebook: (study, files it must write)
    "table1": ("table", {"table1a.md", "table1a.tex", "table1b.md", "table1b.tex"}),
    "ablations": ("rates", {"ablation_delta.png", "ablation_delta.svg", "ablation_learnable_rates.png",
                            "curves_test_error.png", "comparisons.csv"}),
    "stability": ("rates", {"condition_map.png", "outcome_map.svg", "error_heatmaps.png", "error_by_rate.png",
                            "predictions.csv", "degraded_sweep.csv", "degraded_sweep.png", "comparisons.csv",
                            "rate_trajectories.png"}),
}


@pytest.mark.slow
def test_notebooks_run_headless(hand_store, tmp_path):
    """All three notebooks, top to bottom, on their own kernels at once (each waits mostly on imports)."""
    from concurrent.futures import ThreadPoolExecutor

    from stawm.analysis.notebooks import run_notebook

    def run(name):
        study, _ = NOTEBOOKS[name]
        params = {"tracking_uri": hand_store["uri"], "study": study, "out_dir": str(tmp_path / name)}
        if name != "table1":
            params["cache_dir"] = str(tmp_path / "cache" / name)
        return run_notebook(REPO / "analysis" / f"{name}.ipynb", params, tmp_path / f"{name}.ipynb")

    with ThreadPoolExecutor(len(NOTEBOOKS)) as pool:
        done = dict(zip(NOTEBOOKS, pool.map(run, NOTEBOOKS)))
    for name, (study, expected) in NOTEBOOKS.items():
        assert expected <= {p.name for p in (tmp_path / name).iterdir()}, name
        outputs = [o for c in done[name].cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"], name
        assert any("image/png" in o.get("data", {}) for o in outputs) or name == "table1", name
    written = {name: (tmp_path / "table1" / f"table{name}.md").read_text() for name in ("1a", "1b")}
    assert written == {name: t.markdown for name, t in tables.table1(store.load_runs("table", hand_store["uri"]),
                                                                    5).items()}


@pytest.mark.slow
def test_notebooks_and_report_on_a_real_quick_study(glimpse_size_study, tmp_path):
    """What a user does after the README's main job: the report and the notebooks on its store."""
    from concurrent.futures import ThreadPoolExecutor

    from stawm.analysis.notebooks import run_notebook

    uri = glimpse_size_study["uri"]
    runs = store.load_runs("t", uri)
    assert len(runs) == 4 and sorted(runs["glimpse_size"]) == [6, 6, 8, 8]
    done = _report("--study", "t", "--tracking-uri", uri, "--out", str(tmp_path / "report"), "--no-log",
                   "--cache-dir", str(tmp_path / "cache" / "report"))
    assert done.returncode == 0, done.stderr
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert list(summary["glimpse_size"]) == [6, 8] and list(summary["n"]) == [2, 2]
    for size, row in summary.set_index("glimpse_size").iterrows():
        errors = runs.loc[runs["glimpse_size"] == size, schema.TEST_ERROR]
        assert row["test_error_mean"] == pytest.approx(errors.mean())
        assert row["test_error_std"] == pytest.approx(errors.std(ddof=1))
    assert {"table.md", "table.tex", "ablation_glimpse_size.png", "ablation_glimpse_size.svg"} <= {
        p.name for p in (tmp_path / "report").iterdir()}
    assert _ticks(plots.plot_ablation(runs, "glimpse_size").axes[0]) == ["6", "8"]  # not 6.25, 6.5, ...

    def run(name):
        params = {"tracking_uri": uri, "study": "t", "out_dir": str(tmp_path / name)}
        if name != "table1":
            params["cache_dir"] = str(tmp_path / "cache" / name)
        return run_notebook(REPO / "analysis" / f"{name}.ipynb", params, tmp_path / f"{name}.ipynb")

    with ThreadPoolExecutor(3) as pool:
        executed = dict(zip(NOTEBOOKS, pool.map(run, NOTEBOOKS)))
    for name, notebook in executed.items():
        outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"], name
        assert any((tmp_path / name).iterdir()), f"{name} wrote no figure or table"
    assert (tmp_path / "ablations" / "ablation_glimpse_size.png").exists()


# --- the package's modules ----------------------------------------------------------------------


def _analysis_imports() -> dict[str, set[str]]:
    """Each analysis/*.py module's imports of its siblings (`from . import x`, `from .x import y`, or
    through `stawm.analysis`), at module level and inside functions alike: {module: {sibling, ...}}."""
    import ast

    folder = REPO / "analysis"
    modules = {p.stem for p in folder.glob("*.py")}
    graph = {}
    for name in sorted(modules):
        found = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):  # import stawm.analysis.x
                found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("stawm.analysis.")}
                continue
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 1:  # from . import x; from .x import y
                module = node.module
            elif node.level == 0 and f"{node.module}.".startswith("stawm.analysis."):
                module = node.module[len("stawm.analysis."):]
            else:
                continue
            found |= {module.split(".")[0]} if module else {a.name for a in node.names}
        graph[name] = found & modules - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk meets, each as the path that closes it (first module repeated)."""
    cycles, done, path = [], set(), []

    def walk(node):
        if node in path:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        path.append(node)
        for child in sorted(graph[node]):
            walk(child)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        walk(node)
    return cycles


def test_cycles_finds_a_closed_path():
    """The cycle check itself, on graphs drawn by hand: a chain has none, a loop through three is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_analysis_modules_import_no_cycle():
    """No analysis module imports one that imports it back, directly or round a longer circle,
    not even inside a function (where a circle works until someone moves the import up)."""
    graph = _analysis_imports()
    assert {"style", "files", "stats", "tables"} <= graph["plots"]  # module level: `from . import`, `from .x`
    assert {"plots", "source", "store"} <= graph["report"]  # inside its functions only
    assert _cycles(graph) == []
