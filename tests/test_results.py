"""Shipped results (stawm.analysis.export) and the question they answer: do the Appendix A flags predict failure?"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stawm import schema
from stawm.analysis import source, stats

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# --- which runs failed, which were flagged: a hand-made set with known counts ------------------------------


def hand_runs() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Eight runs: their verdicts, errors and the epoch each condition first failed, chosen so that every
    cell of the tables below has a count worked out by hand."""
    runs = pd.DataFrame({
        "run_id": [f"r{i}" for i in range(8)],
        "test_error": [0.04, 0.05, 0.90, 0.30, 0.06, np.nan, 0.88, 0.95],
        "diverged": [False, False, False, False, False, True, False, False],
        "flagged": [False, False, False, True, True, True, True, False],
    })
    # decay: r3, r4, r6 at epoch 0 (static); finite: r5 at epoch 2 (runtime); bound never; r2, r7 fail unflagged
    stability = pd.DataFrame([
        dict(run_id=r, condition=c, kind=k, ok=e is None, first_failed_epoch=np.nan if e is None else e)
        for r, (decay, finite) in {"r0": (None, None), "r1": (None, None), "r2": (None, None), "r3": (0, None),
                                   "r4": (0, None), "r5": (None, 2), "r6": (0, None), "r7": (None, None)}.items()
        for c, k, e in (("decay", "static", decay), ("finite", "runtime", finite), ("bound", "runtime", None))
    ])
    return runs, stability


def test_failed_to_train_is_divergence_or_an_error_above_the_threshold():
    runs, _ = hand_runs()
    failed = stats.failed_to_train(runs, threshold=0.10)
    assert list(failed) == [False, False, True, True, False, True, True, True]  # r5: diverged (no error)


def test_contingency_of_flagged_against_failed_counts_by_hand():
    runs, _ = hand_runs()
    table = stats.contingency(runs["flagged"], stats.failed_to_train(runs, 0.10))
    # flagged r3 r4 r5 r6: failed r3 r5 r6, trained r4; not flagged r0 r1 r2 r7: failed r2 r7, trained r0 r1
    assert table.to_dict() == {"failed to train": {"flagged": 3, "not flagged": 2, "total": 5},
                               "trained": {"flagged": 1, "not flagged": 2, "total": 3},
                               "total": {"flagged": 4, "not flagged": 4, "total": 8}}


def test_condition_table_precision_and_recall_by_hand():
    runs, stability = hand_runs()
    first = stats.first_failed(stability)
    assert first.loc["r5", "finite"] == 2 and np.isnan(first.loc["r5", "decay"]) and first.loc["r3", "decay"] == 0
    failed = stats.failed_to_train(runs, 0.10).set_axis(runs["run_id"])
    table = stats.condition_table(first, failed, {"decay": "static", "finite": "runtime", "bound": "runtime"})
    rows = table.set_index("condition")
    # decay flags r3 r4 r6 before training; of them r3, r6 failed: precision 2/3; 5 failed runs, recall 2/5
    assert rows.loc["decay", ["flagged", "before_training", "during_training", "flagged_and_failed",
                              "failed_not_flagged"]].tolist() == [3, 3, 0, 2, 3]
    assert rows.loc["decay", "precision"] == pytest.approx(2 / 3)
    assert rows.loc["decay", "recall"] == pytest.approx(2 / 5)
    assert rows.loc["finite", ["flagged", "during_training", "flagged_and_failed"]].tolist() == [1, 1, 1]
    assert rows.loc["finite", "precision"] == 1.0 and rows.loc["finite", "recall"] == pytest.approx(1 / 5)
    assert rows.loc["bound", "flagged"] == 0 and np.isnan(rows.loc["bound", "precision"])


# --- exports round-trip: the same numbers without the MLflow store -----------------------------------------


@pytest.mark.slow
def test_an_export_gives_back_the_runs_histories_and_reports_of_the_store(quick_study, tmp_path):
    mlflow = source.open_study("t", quick_study["uri"], cache_dir=tmp_path / "cache", progress=False)
    folder = tmp_path / "results" / "t"
    done = subprocess.run([str(BIN / "stawm-export"), "--study", "t", "--tracking-uri", quick_study["uri"],
                           "--out", str(folder), "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in folder.iterdir()} == {"runs.csv", "history.csv.gz", "stability.csv", "study.json",
                                                  "README.md"}
    assert sum(p.stat().st_size for p in folder.iterdir()) < 2**20  # small enough to ship

    shipped = source.open_study(results=folder)
    pd.testing.assert_frame_equal(shipped.runs, mlflow.runs, check_dtype=False)
    by = ["glimpse_size"]
    a, b = stats.aggregate(mlflow.runs, by), stats.aggregate(shipped.runs, by)
    pd.testing.assert_frame_equal(a, b)
    assert list(b["n"]) == [2, 2]
    keys = ["run_id", "metric", "step"]
    metrics = [schema.TEST_ERROR, schema.TRAIN_LOSS, *schema.RATE_METRICS]
    pd.testing.assert_frame_equal(mlflow.history(metrics).sort_values(keys, ignore_index=True),
                                  shipped.history(metrics).sort_values(keys, ignore_index=True))
    assert len(shipped.history([schema.TEST_ERROR])) == 4 * 2  # 4 trials x 2 epochs
    pd.testing.assert_frame_equal(mlflow.stability(), shipped.stability())

    meta = json.loads((folder / "study.json").read_text())
    assert meta["study"] == "t" and meta["seeds"] == 2 and meta["swept"] == ["glimpse_size"]
    assert "studies/glimpse_size.py --quick" in meta["ran_with"] and len(meta["ran_at_commits"]) == 1
    assert "stawm-export --study t" in meta["exported_with"]

    # the report from the shipped files alone reads as the report from the store (in-process: the console
    # script itself is run in test_packaging)
    from stawm.analysis import report

    for args, out in ((["--study", "t", "--tracking-uri", quick_study["uri"], "--no-log"], "store"),
                      (["--from", str(folder)], "shipped")):
        assert report.main([*args, "--out", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache")]) == 0
    for name in ("table.md", "table.tex", "summary.csv"):
        assert (tmp_path / "store" / name).read_text() == (tmp_path / "shipped" / name).read_text(), name


def test_a_folder_without_an_export_is_one_line(tmp_path, capsys):
    from stawm.analysis.report import main

    assert main(["--from", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no exported study (missing runs.csv" in err and "stawm-export" in err


# --- what the repository ships: every study under analysis/results/ rebuilds from its files alone ----------

SHIPPED = sorted(p.parent for p in (REPO / "analysis" / "results").glob("*/study.json"))
NOTEBOOK_OF = {"memory_rates": "stability", "glimpse_count": "ablations"}  # one shipped study per notebook


def test_the_repository_ships_the_cpu_scale_studies():
    assert {p.name for p in SHIPPED} >= {"memory_rates", "memory_rates_learnable", "glimpse_count", "glimpse_size"}


@pytest.mark.slow
@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_results_rebuild_their_report_without_mlflow(folder, tmp_path, monkeypatch):
    from stawm.analysis import report

    monkeypatch.chdir(tmp_path)  # nothing beside the folder is read: no store, no cache
    assert report.main(["--from", str(folder), "--out", str(tmp_path / "report")]) == 0
    for name in ("table.md", "summary.csv"):  # what the README quotes, rebuilt to the byte
        assert (tmp_path / "report" / name).read_text() == (folder / "report" / name).read_text(), name
    assert "published" not in (tmp_path / "report" / "table.md").read_text()  # CPU scale: not Table 1's MNIST
    shipped_figures = {p.name for p in (folder / "report").glob("*.png")}
    assert shipped_figures and shipped_figures == {p.name for p in (tmp_path / "report").glob("*.png")}


@pytest.mark.slow
@pytest.mark.parametrize("study, notebook", NOTEBOOK_OF.items())
def test_the_notebooks_run_headless_on_shipped_results(study, notebook, tmp_path):
    from stawm.analysis.notebooks import run_notebook

    folder = REPO / "analysis" / "results" / study
    run_notebook(REPO / "analysis" / f"{notebook}.ipynb", {"results": str(folder), "out_dir": str(tmp_path / "nb")},
                 tmp_path / f"{notebook}.ipynb", cwd=tmp_path)
    if notebook == "stability":
        table = pd.read_csv(tmp_path / "nb" / "contingency.csv", index_col=0)
        # the counts the README quotes for the fixed-rate grid: flagged 72 (24 failed), not flagged 144 (49)
        assert table.loc["flagged", ["failed to train", "trained"]].tolist() == [24, 48]
        assert table.loc["not flagged", ["failed to train", "trained"]].tolist() == [49, 95]
        assert table.loc["total", "total"] == len(source.open_study(results=folder).runs) == 216
        assert (tmp_path / "nb" / "error_heatmaps.png").stat().st_size > 10_000
    else:
        assert (tmp_path / "nb").is_dir() and any((tmp_path / "nb").glob("*.png"))


# --- the harness figures BENCHMARKS.md records, on a hand-made study ---------------------------------------


class HandStudy:
    """Four runs of three trials: 00000 ran once; 00001 failed, then its retry finished; 00002 failed for good."""

    def __init__(self):
        start = pd.Timestamp("2026-12-02 10:00:00", tz="UTC")
        self.runs = pd.DataFrame({
            "run_id": ["a", "b", "c", "d"], "trial_id": ["e1_00000", "e1_00001", "e1_00001", "e1_00002"],
            "seed": [0, 1, 1, 0],
            "delta": [0.2, 0.2, 0.2, 0.5], "status": ["FINISHED", "FAILED", "FINISHED", "FAILED"],
            "start_time": [start] * 4,
            "end_time": [start + pd.Timedelta(seconds=s) for s in (40, 10, 50, 20)],
        })
        self.info = source.store.StudyInfo("hand", None, None, 2, ["delta"], {}, 1)

    def history(self, metrics):
        seconds = {"a": [15, 15], "b": [8], "c": [20, 25], "d": [18]}
        return pd.DataFrame([dict(run_id=r, metric="epoch_seconds", step=i + 1, value=v)
                             for r, vs in seconds.items() for i, v in enumerate(vs)])


def test_harness_figures_count_runs_trials_and_time_by_hand(tmp_path):
    sys.path.insert(0, str(REPO / "analysis" / "results"))
    try:
        import harness
    finally:
        sys.path.pop(0)
    for name in ("trainable_e1_00000_0_delta=0.2,seed=0", "trainable_e1_00003_3_delta=0.5,seed=1"):
        (tmp_path / "hand" / name).mkdir(parents=True)  # Tune's folders: 00000 logged its run, 00003 never did
    f = harness.harness_figures(HandStudy(), wall=70.0, concurrency=2, storage=tmp_path)
    # trials 0 1 2; configurations (0.2, 0), (0.2, 1), (0.5, 0); lost: 2 (no FINISHED run) and 3 (no run at all)
    assert (f["runs"], f["trials"], f["configurations"], f["runs_per_trial"], f["lost"]) == (4, 3, 3, "1-2", 2)
    assert f["statuses"] == "FAILED 2, FINISHED 2"
    assert f["run_wall_s"] == pytest.approx((40 + 10 + 50 + 20) / 4)
    assert f["outside_steps_s"] == pytest.approx(((40 - 30) + (10 - 8) + (50 - 45) + (20 - 18)) / 4)
    assert f["ray_s_per_trial"] == pytest.approx((2 * 70 - 120) / 4)
    assert f["runs_span_s"] == 50  # all four start together; the longest ends 50 s in
