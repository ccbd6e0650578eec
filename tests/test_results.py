"""Shipped results (stawm.analysis.export): the same numbers without the MLflow store; the re-check of old ones."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stawm import schema
from stawm.analysis import source, stats

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# --- exports round-trip: the same numbers without the MLflow store -----------------------------------------


@pytest.mark.slow
def test_an_export_gives_back_the_runs_histories_and_reports_of_the_store(glimpse_size_study, tmp_path):
    mlflow = source.open_study("t", glimpse_size_study["uri"], cache_dir=tmp_path / "cache", progress=False)
    folder = tmp_path / "results" / "t"
    done = subprocess.run([str(BIN / "stawm-export"), "--study", "t", "--tracking-uri", glimpse_size_study["uri"],
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

    for args, out in ((["--study", "t", "--tracking-uri", glimpse_size_study["uri"], "--no-log"], "store"),
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
        table = pd.read_csv(tmp_path / "nb" / "predictions.csv").set_index(["condition", "outcome"])
        cells = ["flagged_and_outcome", "flagged_no_outcome", "outcome_not_flagged", "neither"]
        # the counts the README quotes for the fixed-rate grid (420 runs, 5 seeds), worked out from runs.csv by
        # hand: `writes` flags the 105 runs with theta = 0 (seeds 0-2's at 91.8% after epoch 12, seeds 3-4's
        # stopped after epoch 1 at 89.5% and 89.9%), all no_learning, and no other; one theta > 0 run (88.2%) is
        # no_learning unflagged; `decay` flags the 240 with delta > 1: 60 of them theta = 0 (degraded, as every
        # theta = 0 run) and 23 of the 180 with theta > 0 at or above 2 x 4.44% (the paper-rate mean), 83 of the
        # 142 degraded in all
        assert table.loc[("writes", "no_learning"), cells].tolist() == [105, 0, 1, 314]
        assert table.loc[("decay", "degraded"), cells].tolist() == [83, 157, 59, 121]
        assert table.loc[("decay", "degraded"), cells].sum() == len(source.open_study(results=folder).runs) == 420
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
