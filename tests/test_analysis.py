"""The results library, the report command and the notebooks, on a real sqlite MLflow store.

The store is written through the MLflow API in the study runner's schema, with per-seed final
test errors chosen here, so every statistic below is checked against numbers worked by hand.

Study "table" (seeds=5, swept=preset):
  A  mnist-class-8  (S_g=8, N=8):   seeds 0-4 finished, 0.0040 0.0042 0.0038 0.0045 0.0041
  B  mnist-class-28 (S_g=28, N=10): seeds 0-2 finished, 0.0050 0.0054 0.0049;
                                    seed 3 finished but flagged ("bound"), 0.0300;
                                    seed 4 still RUNNING (0.0100 after epoch 1)
Study "rates" (seeds=2, swept=delta,learnable_rates, preset tiny): delta in {0.2, 1.5} x
  learnable_rates in {False, True} x seeds {0, 1}; delta=1.5 fails `decay` before training, and
  (delta=1.5, fixed, seed 1) diverges: FAILED, last test_error NaN.
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

from analysis import results as R
from stawm.config import preset

REPO = Path(__file__).resolve().parents[1]
A = [0.0040, 0.0042, 0.0038, 0.0045, 0.0041]
B = [0.0050, 0.0054, 0.0049]
B_FLAGGED = 0.0300
T0 = 1_700_000_000_000  # ms; runs start one second apart, in the order written


def _trial(client, exp_id, parent, study, cfg, finals, t, status="FINISHED", ok=True, flags="",
           static_ok=True, diverged=False, rates=None, epochs=3):
    """One child run in the runner's schema; `finals` is the test_error of each epoch."""
    tags = {"mlflow.parentRunId": parent, "stawm.role": "trial", "stawm.study": study,
            "stawm.preset": cfg.preset, "stawm.seed": str(cfg.seed), "stawm.trial_id": f"t{t:04d}",
            "stawm.git_commit": "0" * 40, "stawm.host": "test", "stawm.gpu": "none",
            "stability.ok": str(ok).lower(), "stability.flags": flags,
            "stability.static_ok": str(static_ok).lower(), "stability.diverged": str(diverged).lower()}
    run = client.create_run(exp_id, start_time=T0 + 1000 * t, tags=tags)
    metrics, best = [], math.inf
    for epoch, err in enumerate(finals, start=1):
        best = min(best, err) if not math.isnan(err) else best
        ts = T0 + 1000 * t + epoch
        values = {"test_error": err, "best_test_error": best, "train_loss": 2.0 / epoch,
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
    run = client.create_run(exp_id, start_time=T0, tags={"stawm.role": "study", "stawm.study": study})
    client.log_batch(run.info.run_id, params=[Param("seeds", str(seeds)), Param("swept", swept)])
    client.set_terminated(run.info.run_id, "FINISHED")
    return exp_id, run.info.run_id


def build_store(root: Path) -> dict:
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
                                 [3 * err, 1.5 * err, err], t, ok=not flagged, flags="bound" if flagged else "")
        t += 1
    ids["B4"] = _trial(client, exp, parent, "table", preset("mnist-class-28", seed=4), [0.0100], t, status="RUNNING")
    t += 1

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
                    ok=not bad, flags="decay,finite" if diverged else "decay" if bad else "",
                    static_ok=not bad, diverged=diverged,
                    rates=dict(delta=delta, eta=cfg.eta, theta=cfg.theta) if learn else None)
                t += 1
    exp, first = _parent(client, "relaunched", 1, "", root)  # launched twice under one name, not resumed
    _trial(client, exp, first, "relaunched", preset("tiny"), [0.5], t)
    second = client.create_run(exp, start_time=T0 + 1000 * (t + 1), tags={"stawm.role": "study"}).info.run_id
    ids["relaunched"] = _trial(client, exp, second, "relaunched", preset("tiny"), [0.1], t + 2)
    client.create_experiment("empty", artifact_location=(root / "artifacts" / "empty").as_uri())
    return dict(uri=uri, ids=ids, root=root)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="module")
def table_runs(store):
    return R.load_runs("table", store["uri"])


# --- loading ------------------------------------------------------------------------------------


def test_load_runs_one_row_per_trial_with_typed_config(table_runs, store):
    runs = table_runs
    assert len(runs) == 10 and store["ids"]["table"] not in set(runs["run_id"])  # children only
    assert list(runs["seed"]) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert runs["seed"].dtype == np.int64
    a = runs.iloc[0]
    assert runs["glimpse_size"].dtype == runs["glimpses"].dtype == np.int64 and a["glimpses"] == 8
    assert runs["delta"].dtype == np.float64 and a["delta"] == 0.2
    assert runs["learnable_rates"].dtype == runs["normalize"].dtype == bool
    assert not a["learnable_rates"] and a["normalize"]
    assert a["glimpse_channels"] == (64, 128) and a["context_channels"] == (64, 128, 256)
    assert a["lr_milestones"] == (50, 100, 150, 190, 195)
    assert a["preset"] == "mnist-class-8" and a["task"] == "classify"
    assert runs.iloc[5]["glimpse_size"] == 28 and runs.iloc[5]["glimpse_channels"] == (64, 128, 256)
    assert list(runs["test_error"].iloc[:5]) == A
    assert list(runs["status"]) == ["FINISHED"] * 9 + ["RUNNING"]
    assert list(runs["flagged"]) == [False] * 8 + [True, False]
    assert runs.iloc[8]["flags"] == "bound" and runs.iloc[8]["stability_ok"] == False  # noqa: E712
    assert runs.iloc[0]["best_test_error"] == 0.0040 and runs.iloc[0]["train_loss"] == pytest.approx(2 / 3)
    assert runs["parent_run_id"].eq(store["ids"]["table"]).all()


def test_rate_metrics_do_not_overwrite_the_configured_rates(store):
    runs = R.load_runs("rates", store["uri"])
    learned = runs[runs["learnable_rates"] & (runs["delta"] == 0.2)]
    assert list(learned["delta"]) == [0.2, 0.2]  # the configured starting rate
    assert learned["final_delta"].to_numpy() == pytest.approx([0.35, 0.35])  # 0.2 + 3 epochs x 0.05
    assert runs["diverged"].sum() == 1 and runs["flagged"].sum() == 4 and (~runs["static_ok"]).sum() == 4


def test_cast_param():
    assert R.cast_param("glimpse_channels", "[64, 128]", tuple) == (64, 128)
    assert R.cast_param("glimpse_channels", "(128,)", tuple) == (128,)
    assert R.cast_param("normalize", "False", bool) is False and R.cast_param("normalize", "true", bool) is True
    assert R.cast_param("glimpses", "8", int) == 8 and R.cast_param("lr", "0.001", float) == 0.001
    with pytest.raises(ValueError, match="glimpses='8.5' is not a valid int"):
        R.cast_param("glimpses", "8.5", int)


def test_study_info(store):
    info = R.study_info("table", store["uri"])
    assert info["seeds"] == 5 and info["swept"] == ["preset"] and info["parent_run_id"] == store["ids"]["table"]
    assert R.study_info("rates", store["uri"])["swept"] == ["delta", "learnable_rates"]


def test_a_study_launched_twice_loads_its_latest_launch(store):
    assert len(R.load_runs("relaunched", store["uri"])) == 2
    with pytest.warns(UserWarning, match="2 parent runs"):
        runs, info = R.load_study("relaunched", store["uri"])
    assert list(runs["run_id"]) == [store["ids"]["relaunched"]] and list(runs["test_error"]) == [0.1]
    assert info["parents"] == 2 and info["seeds"] is None and info["swept"] is None  # the latest logged none


def test_unknown_or_empty_study_raises(store, tmp_path):
    with pytest.raises(R.StudyNotFound, match="no study .* named 'nope'"):
        R.load_runs("nope", store["uri"])
    with pytest.raises(R.StudyNotFound, match="'empty' has no trial runs"):
        R.load_runs("empty", store["uri"])
    with pytest.raises(R.StudyNotFound, match="no MLflow store"):
        R.load_runs("table", f"sqlite:///{tmp_path}/missing.db")
    assert not (tmp_path / "missing.db").exists()  # not created as a side effect


def test_swept_fields_fall_back_to_varying_fields(table_runs):
    assert R.swept_fields(table_runs, {"swept": ["preset"]}) == ["preset"]
    varying = R.swept_fields(table_runs)
    assert varying[:3] == ["preset", "glimpse_size", "glimpses"] and "seed" not in varying
    assert "memory_size" in varying and "delta" not in varying


# --- statistics ---------------------------------------------------------------------------------

# By hand. A: mean 0.0206/5 = 0.00412; deviations -1.2, 0.8, -3.2, 3.8, -0.2 (x1e-4), squares sum
# 26.8e-8, / 4 = 6.7e-8, std = sqrt(6.7e-8) = 2.588435821e-4, sem = std / sqrt(5) = 1.157584e-4.
# B without the flagged run: mean 0.0153/3 = 0.0051; deviations -1, 3, -2 (x1e-4): 14e-8 / 2 = 7e-8,
# std = 2.645751311e-4. B with it: mean 0.0453/4 = 0.011325; squares 4.0005625e-5, 3.5105625e-5,
# 4.1280625e-5, 3.48755625e-4 sum 4.651475e-4, / 3 = 1.550491667e-4, std = 1.2451874022e-2.
A_MEAN, A_STD, A_SEM = 0.00412, 2.588435821e-4, 1.157584e-4
B_MEAN, B_STD = 0.0051, 2.645751311e-4
BF_MEAN, BF_STD = 0.011325, 1.2451874022e-2


def test_mean_std_sem_by_hand():
    mean, std = R.mean_std(A)
    assert mean == pytest.approx(A_MEAN, rel=1e-12) and std == pytest.approx(A_STD, rel=1e-9)
    assert R.sem(A) == pytest.approx(A_SEM, rel=1e-6)
    assert math.isnan(R.mean_std([0.004])[1]) and R.mean_std([0.004])[0] == 0.004
    assert math.isnan(R.sem([0.004])) and all(math.isnan(x) for x in R.mean_std([]))


def test_bootstrap_ci_brackets_the_mean_and_repeats():
    low, high = R.bootstrap_ci(A)
    assert low <= A_MEAN <= high and min(A) <= low and high <= max(A)
    assert (low, high) == R.bootstrap_ci(A)  # seeded
    narrow = R.bootstrap_ci(A, confidence=0.5)
    assert low <= narrow[0] <= narrow[1] <= high
    assert all(math.isnan(x) for x in R.bootstrap_ci([0.004]))


def test_aggregate_by_hand(table_runs):
    agg = R.aggregate(table_runs, ["glimpse_size", "glimpses"], seeds_expected=5)
    assert list(agg.columns[:2]) == ["glimpse_size", "glimpses"]
    a, b = agg.iloc[0], agg.iloc[1]
    assert (a["glimpse_size"], a["glimpses"], b["glimpse_size"], b["glimpses"]) == (8, 8, 28, 10)
    assert a["n"] == 5 and a["mean"] == pytest.approx(A_MEAN) and a["std"] == pytest.approx(A_STD, rel=1e-9)
    assert a["sem"] == pytest.approx(A_SEM, rel=1e-6) and (a["min"], a["max"]) == (0.0038, 0.0045)
    assert a["flagged"] == 0 and a["complete"] and a["seeds"] == (0, 1, 2, 3, 4)
    # B: the flagged seed 3 is left out but counted; the running seed 4 is left out: 3 of 5
    assert b["n"] == 3 and b["mean"] == pytest.approx(B_MEAN) and b["std"] == pytest.approx(B_STD, rel=1e-9)
    assert b["flagged"] == 1 and b["unfinished"] == 1 and not b["complete"] and b["seeds"] == (0, 1, 2)
    both = R.aggregate(table_runs, ["glimpse_size", "glimpses"], seeds_expected=5, include_flagged=True).iloc[1]
    assert both["n"] == 4 and both["mean"] == pytest.approx(BF_MEAN) and both["std"] == pytest.approx(BF_STD, rel=1e-9)
    assert both["flagged"] == 1 and not both["complete"]


def test_aggregate_single_seed_has_nan_std_and_ci_columns(table_runs):
    one = table_runs[table_runs["seed"] == 0]
    agg = R.aggregate(one, ["glimpses"], seeds_expected=5, ci=0.95)
    assert list(agg["n"]) == [1, 1] and agg["std"].isna().all() and not agg["complete"].any()
    agg = R.aggregate(table_runs, ["glimpses"], ci=0.95)
    assert (agg["ci_low"] <= agg["mean"]).all() and (agg["mean"] <= agg["ci_high"]).all()
    assert list(agg["complete"]) == [True, False]  # seeds_expected unknown: compared with the largest n


def test_aggregate_warns_when_a_group_mixes_configurations(store):
    runs = R.load_runs("rates", store["uri"])
    with pytest.warns(UserWarning, match=r"differ in \['learnable_rates'\]"):
        R.aggregate(runs, ["delta"])


def test_welch_p_matches_scipy():
    assert R.welch_p(A, B) == pytest.approx(scipy.stats.ttest_ind(A, B, equal_var=False).pvalue, rel=1e-12)
    assert math.isnan(R.welch_p(A, [0.005]))


# --- tables -------------------------------------------------------------------------------------

# Welch by hand: var/n 6.7e-8/5 + 7e-8/3 = 3.6733e-8, t = (0.00412 - 0.0051) / sqrt(3.6733e-8) = -5.113,
# df = 3.6733e-8^2 / ((1.34e-8)^2 / 4 + (2.3333e-8)^2 / 2) = 4.255, two-sided p = 0.0059.
P_AB = scipy.stats.ttest_ind(A, B, equal_var=False).pvalue


def test_format_table_markdown_and_latex_exactly(table_runs):
    agg = R.aggregate(table_runs, ["task", "glimpse_size", "glimpses"], seeds_expected=5)
    table = R.format_table(agg, ["glimpse_size", "glimpses"], published=R.PUBLISHED,
                           baseline={"glimpse_size": 8})
    assert f"{P_AB:.4f}" == "0.0059"
    caption = ("test_error in %: mean ± std (ddof=1) over 5 seeds; flagged runs (Appendix A) left out; "
               "rows short of 5 seeds are marked incomplete; unfinished runs (failed or still running) are left out; "
               "published: the paper's Table 1, "
               "Δ = reproduced − published in percentage points; p: Welch's t-test against "
               "glimpse_size=8, glimpses=8; S_g=28, N=10: best of 5 runs 0.31%.")
    assert table.markdown == (
        f"Table: {caption}\n\n"
        "| glimpse_size | glimpses | test error (%) | n | flagged | published | Δ (pp) | p (Welch) |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        "| 8 | 8 | **0.41% ± 0.03** | 5 | 0 | 0.41% ± 0.03 | +0.00 | baseline |\n"
        "| 28 | 10 | 0.51% ± 0.03 | 3/5 (incomplete, 1 unfinished) | 1 | 0.35% ± 0.02 | +0.16 | 0.006 |\n")
    assert table.latex == (
        "% requires \\usepackage{booktabs}\n"
        "\\begin{table}[t]\n"
        "\\centering\n"
        "\\caption{test\\_error in \\%: mean $\\pm$ std (ddof=1) over 5 seeds; flagged runs (Appendix A) left out; "
        "rows short of 5 seeds are marked incomplete; unfinished runs (failed or still running) are left out; "
        "published: the paper's Table 1, "
        "$\\Delta$ = reproduced $-$ published in percentage points; p: Welch's t-test against "
        "glimpse\\_size=8, glimpses=8; S\\_g=28, N=10: best of 5 runs 0.31\\%.}\n"
        "\\begin{tabular}{llrrrrrr}\n"
        "\\toprule\n"
        "glimpse\\_size & glimpses & test error (\\%) & n & flagged & published & $\\Delta$ (pp) & p (Welch) \\\\\n"
        "\\midrule\n"
        "8 & 8 & \\textbf{0.41\\% $\\pm$ 0.03} & 5 & 0 & 0.41\\% $\\pm$ 0.03 & +0.00 & baseline \\\\\n"
        "28 & 10 & 0.51\\% $\\pm$ 0.03 & 3/5 (incomplete, 1 unfinished) & 1 & 0.35\\% $\\pm$ 0.02 & +0.16 "
        "& 0.006 \\\\\n"
        "\\bottomrule\n"
        "\\end{tabular}\n"
        "\\end{table}\n")


def test_table1_quotes_baselines_and_unreproduced_rows(table_runs):
    tables = R.table1(table_runs, seeds_expected=5)
    a = tables["1a"].markdown.splitlines()
    assert a[2] == "| model | glimpse_size | glimpses | test error (%) | n | flagged | published | Δ (pp) |"
    ram = ((5, "1.55%"), (6, "1.29%"), (7, "1.47%"))
    assert a[4:7] == [f"| RAM | 8 | {n} | — | — | — | {e} | — |" for n, e in ram]
    assert a[7:] == [
        "| STAWM (reproduced) | 8 | 8 | **0.41% ± 0.03** | 5 | 0 | 0.41% ± 0.03 | +0.00 |",
        "| STAWM (reproduced) | 28 | 10 | 0.51% ± 0.03 | 3/5 (incomplete, 1 unfinished) | 1 | 0.35% ± 0.02 | +0.16 |"]
    b = tables["1b"].markdown.splitlines()
    assert [r.split(" | ")[0] for r in b[4:]] == [
        "| DBM", "| Adversarial", "| Virtual Adversarial", "| Ladder", "| STAWM (self-supervised)"]
    assert b[-1] == "| STAWM (self-supervised) | 6 | 12 | — | — | — | 0.77% | — |"
    assert "\\begin{tabular}{lllrrrrr}" in tables["1b"].latex


def test_published_constants():
    assert R.PUBLISHED[("classify", 8, 8)].error_pct == 0.41 and R.PUBLISHED[("classify", 8, 8)].std_pct == 0.03
    assert R.PUBLISHED[("classify", 28, 10)].std_pct == 0.02 and "0.31%" in R.PUBLISHED[("classify", 28, 10)].note
    assert R.PUBLISHED[("selfsup", 6, 12)].error_pct == 0.77
    assert [p.error_pct for p in R.BASELINES["1a"]] == [1.55, 1.29, 1.47]
    assert {p.model: p.error_pct for p in R.BASELINES["1b"]} == {
        "DBM": 0.79, "Adversarial": 0.78, "Virtual Adversarial": 0.64, "Ladder": 0.57}


def test_flag_divergence(store):
    flags = R.load_runs("rates", store["uri"]).pipe(R.flag_divergence)
    assert flags.to_dict("list") == {"flag": ["decay", "finite", "(none)"], "runs": [4, 1, 4],
                                     "diverged": [1, 1, 0], "diverged_fraction": [0.25, 1.0, 0.0]}


# --- histories ----------------------------------------------------------------------------------


def test_metric_history_is_cached_for_finished_runs(store, table_runs, tmp_path):
    copy = tmp_path / "copy.db"
    shutil.copy(store["root"] / "mlflow.db", copy)
    uri = f"sqlite:///{copy}"
    finished = table_runs[table_runs["status"] == "FINISHED"]
    first = R.metric_history(finished, "test_error", uri, tmp_path / "cache")
    assert list(first.columns) == ["run_id", "metric", "step", "value"]
    a0 = first[first["run_id"] == store["ids"]["A0"]]
    assert list(a0["step"]) == [1, 2, 3] and a0["value"].to_numpy() == pytest.approx([0.012, 0.006, 0.004])
    copy.unlink()  # the store is gone: the second call must come from the cache
    again = R.metric_history(finished, "test_error", uri, tmp_path / "cache")
    pd.testing.assert_frame_equal(first, again)
    with pytest.raises(R.StudyNotFound):  # a running run is never cached, so it must be re-read
        R.metric_history(table_runs, "test_error", uri, tmp_path / "cache")
    running = R.metric_history(table_runs, "test_error", store["uri"], tmp_path / "cache")
    assert len(running) == len(first) + 1
    assert not (tmp_path / "cache" / "test_error" / f"{store['ids']['B4']}.parquet").exists()


# --- plots --------------------------------------------------------------------------------------


def test_plots_return_figures(store, table_runs, tmp_path):
    rates = R.load_runs("rates", store["uri"])
    swept = ["delta", "learnable_rates"]
    figs = R.ablation_figures(rates, swept, seeds_expected=2, swept=swept)  # hue: the other field
    figs["glimpses"] = R.plot_ablation(table_runs, "glimpses", seeds_expected=5)
    figs["curves"] = R.plot_curves(R.metric_history(table_runs, "test_error", store["uri"], tmp_path), "preset",
                                   table_runs)
    figs["map"] = R.plot_stability_map(rates)
    history = R.metric_histories(R.learnable(rates), R.RATES, store["uri"], tmp_path)
    figs["rates"] = R.plot_rate_trajectories(history, rates)
    for name, fig in figs.items():
        paths = R.save_figure(fig, tmp_path / "figs", name, formats=("png",))  # svg: the report test
        assert all(p.stat().st_size > 1000 for p in paths), name
    # the ablation draws 5 + 3 seeds, the flagged B seed as a cross, and two means
    ax = figs["glimpses"].axes[0]
    assert sum(len(c.get_offsets()) for c in ax.collections if c.get_gid() == "seeds") == 8
    assert [len(c.get_offsets()) for c in ax.collections if c.get_gid() == "flagged (left out)"] == [1]
    legend = [t.get_text() for t in figs["ablation_delta"].axes[0].get_legend().get_texts()]
    assert legend == ["flagged (left out)", "learnable_rates=False", "learnable_rates=True"]
    counts = R.outcome_table(rates)
    assert counts[list(R.OUTCOMES)].to_numpy().sum() == 8 and counts["diverged"].sum() == 1


# --- the report command and the notebooks -------------------------------------------------------


def _report(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "analysis.report", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_report_end_to_end(store, tmp_path):
    out = tmp_path / "report"
    done = _report("--study", "rates", "--tracking-uri", store["uri"], "--out", str(out),
                   "--cache-dir", str(tmp_path / "cache"), "--baseline", "delta=0.2,learnable_rates=False")
    assert done.returncode == 0, done.stderr
    expected = {"table.md", "table.tex", "summary.csv", "runs.csv"} | {
        f"{n}.{e}" for n in ("ablation_delta", "ablation_learnable_rates", "curves_test_error",
                             "stability_map", "rate_trajectories") for e in ("png", "svg")}
    assert {p.name for p in out.iterdir()} == expected
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == ["delta", "learnable_rates", "n", "test_error_mean", "test_error_std",
                                     "flagged", "complete"]
    assert list(summary["n"]) == [2, 2, 0, 0] and list(summary["flagged"]) == [0, 0, 2, 2]
    assert summary["test_error_mean"].iloc[0] == pytest.approx(0.205)  # (0.20 + 0.21) / 2
    assert summary["test_error_std"].iloc[0] == pytest.approx(0.01 / math.sqrt(2))
    assert "| 0.2 | False | **20.50% ± 0.71** | 2 | 0 | baseline |" in (out / "table.md").read_text()
    logged = {f.path for f in MlflowClient(store["uri"]).list_artifacts(store["ids"]["rates"], "report")}
    assert logged == {f"report/{name}" for name in expected}


def test_report_table_study_compares_with_the_paper(store, tmp_path):
    from analysis.report import main  # in-process: the subprocess path is checked above

    assert main(["--study", "table", "--tracking-uri", store["uri"], "--out", str(tmp_path), "--no-curves",
                 "--no-log"]) == 0
    md = (tmp_path / "table.md").read_text()
    assert "| mnist-class-28 | 0.51% ± 0.03 | 3/5 (incomplete, 1 unfinished) | 1 | 0.35% ± 0.02 | +0.16 |" in md
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary.to_dict("list") == {
        "preset": ["mnist-class-28", "mnist-class-8"], "n": [3, 5],
        "test_error_mean": pytest.approx([B_MEAN, A_MEAN]), "test_error_std": pytest.approx([B_STD, A_STD]),
        "flagged": [1, 0], "complete": [False, True]}


def test_report_unknown_study_exits_2_with_one_line(store, tmp_path, capsys):
    from analysis.report import main  # in-process; `python -m analysis.report` is sys.exit(main())

    assert main(["--study", "nope", "--tracking-uri", store["uri"], "--out", str(tmp_path / "x")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: no study (MLflow experiment) named 'nope' at {store['uri']}\n"
    assert captured.out == ""
    assert main(["--study", "empty", "--tracking-uri", store["uri"], "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: study 'empty' has no trial runs") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_report_help_documents_the_flags():
    done = _report("--help")
    assert done.returncode == 0
    for flag in ("--study", "--tracking-uri", "--out", "--seeds", "--include-flagged", "--baseline", "--cache-dir"):
        assert flag in done.stdout


def test_inject_parameters_follows_papermill():
    import nbformat

    from analysis.notebooks import inject_parameters

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


def test_notebook_kernel_is_this_interpreter(tmp_path):
    import nbformat

    from analysis.notebooks import run_notebook

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import sys, analysis\nprint(sys.executable, x)")])
    nbformat.write(nb, tmp_path / "probe.ipynb")
    done = run_notebook(tmp_path / "probe.ipynb", {"x": 7}, tmp_path / "out.ipynb")
    assert done.cells[1].metadata["tags"] == ["injected-parameters"]
    assert done.cells[2].outputs[0]["text"].strip() == f"{sys.executable} 7"


NOTEBOOKS = {  # notebook: (study, files it must write)
    "table1": ("table", {"table1a.md", "table1a.tex", "table1b.md", "table1b.tex"}),
    "ablations": ("rates", {"ablation_delta.png", "ablation_delta.svg", "ablation_learnable_rates.png",
                            "curves_test_error.png"}),
    "stability": ("rates", {"stability_map.png", "stability_map.svg", "rate_trajectories.png",
                            "flag_divergence.csv"}),
}


@pytest.mark.slow
def test_notebooks_run_headless(store, tmp_path):
    """All three notebooks, top to bottom, on their own kernels at once (each waits mostly on imports)."""
    from concurrent.futures import ThreadPoolExecutor

    from analysis.notebooks import run_notebook

    def run(name):
        study, _ = NOTEBOOKS[name]
        params = {"tracking_uri": store["uri"], "study": study, "out_dir": str(tmp_path / name)}
        if name != "table1":
            params["cache_dir"] = str(tmp_path / "cache" / name)
        return run_notebook(REPO / "analysis" / f"{name}.ipynb", params, tmp_path / f"{name}.ipynb")

    with ThreadPoolExecutor(len(NOTEBOOKS)) as pool:
        done = dict(zip(NOTEBOOKS, pool.map(run, NOTEBOOKS)))
    for name, (study, files) in NOTEBOOKS.items():
        assert files <= {p.name for p in (tmp_path / name).iterdir()}, name
        outputs = [o for c in done[name].cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"], name
        assert any("image/png" in o.get("data", {}) for o in outputs) or name == "table1", name
    tables = {name: (tmp_path / "table1" / f"table{name}.md").read_text() for name in ("1a", "1b")}
    assert tables == {name: t.markdown for name, t in R.table1(R.load_runs("table", store["uri"]), 5).items()}


@pytest.mark.slow
def test_notebooks_and_report_on_a_real_quick_study(quick_study, tmp_path):
    """What a user does after the README's main job: the report and the notebooks on its store."""
    from concurrent.futures import ThreadPoolExecutor

    from analysis.notebooks import run_notebook

    uri = quick_study["uri"]
    runs = R.load_runs("t", uri)
    assert len(runs) == 4 and sorted(runs["glimpse_size"]) == [6, 6, 8, 8]
    done = _report("--study", "t", "--tracking-uri", uri, "--out", str(tmp_path / "report"), "--no-log")
    assert done.returncode == 0, done.stderr
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert list(summary["glimpse_size"]) == [6, 8] and list(summary["n"]) == [2, 2]
    for size, row in summary.set_index("glimpse_size").iterrows():
        errors = runs.loc[runs["glimpse_size"] == size, "test_error"]
        assert row["test_error_mean"] == pytest.approx(errors.mean())
        assert row["test_error_std"] == pytest.approx(errors.std(ddof=1))
    assert {"table.md", "table.tex", "ablation_glimpse_size.png", "ablation_glimpse_size.svg"} <= {
        p.name for p in (tmp_path / "report").iterdir()}

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
