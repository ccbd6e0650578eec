"""Rules replayed on per-epoch histories (stawm.analysis.replay, prune_replay): hand-made export folders with
answers worked out by hand, and the stuck-run rule on the shipped memory_rates study."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stawm.analysis import prune_replay, replay, replay_command
from stawm.analysis.source import ExportedStudy

REPO = Path(__file__).resolve().parents[1]


def export_folder(folder: Path, runs: list[dict], curves: dict[tuple[str, str], list[float]],
                  swept: list[str]) -> Path:
    """An export folder in stawm-export's shape: runs.csv, history.csv.gz (from `curves`, (run_id, metric) ->
    a value per epoch from 1; NaN: not logged), an empty stability.csv and study.json."""
    folder.mkdir(parents=True)
    pd.DataFrame(runs).to_csv(folder / "runs.csv", index=False)
    history = [dict(run_id=run_id, metric=metric, step=epoch, value=value)
               for (run_id, metric), values in curves.items()
               for epoch, value in enumerate(values, start=1) if not math.isnan(value)]
    pd.DataFrame(history).to_csv(folder / "history.csv.gz", index=False)
    (folder / "stability.csv").write_text("run_id,condition,source,ok,first_failed_epoch\n")
    (folder / "study.json").write_text(json.dumps(dict(study=folder.name, seeds=3, swept=swept, params={},
                                                       parents=1)))
    return folder


def run(run_id: str, theta: float, test_error: float, seed: int = 0, **fields) -> dict:
    """A classifier's run of 10 classes (no_learning from 0.9 x 0.9 = 81% test error), ReLU6, delta 0.2, eta 0.4."""
    return dict(run_id=run_id, status="FINISHED", seed=seed, task="classify", activation="relu6", num_classes=10,
                delta=0.2, eta=0.4, theta=theta, test_error=test_error, diverged=False, **fields)


# --- the stuck-run rule ------------------------------------------------------------------------------------------

NAN = math.nan


def stuck_runs() -> tuple[list[dict], dict]:
    """Four runs of 4 epochs, all configured with theta = 0 (the rule's theta unless the history logs one):
    - stuck2: W > 0 in epoch 1, then 0: stopped after epoch 2, 2 epochs saved; it ended at 88.6% (no learning);
    - learned: W = 0 in epoch 1, but its learned theta (history) is 0.3 there and stays above 0: never stopped;
    - lucky: W = 0 in epoch 1: stopped after epoch 1, 3 saved; it ended at 20%: learned, so a FALSE stop;
    - unlogged: no max_abs_w at epoch 1, so epoch 1 cannot be judged: the run is not judged (ended at 90%)."""
    runs = [run("stuck2", 0.0, 0.886), run("learned", 0.0, 0.10), run("lucky", 0.0, 0.20), run("unlogged", 0.0, 0.90)]
    curves = {
        ("stuck2", "max_abs_w"): [0.2, 0.0, 0.0, 0.0], ("stuck2", "test_error"): [0.9, 0.89, 0.887, 0.886],
        ("learned", "max_abs_w"): [0.0, 0.1, 0.2, 0.3], ("learned", "theta"): [0.3, 0.2, 0.1, 0.05],
        ("learned", "test_error"): [0.5, 0.3, 0.2, 0.1],
        ("lucky", "max_abs_w"): [0.0, 0.0, 0.4, 0.5], ("lucky", "test_error"): [0.9, 0.9, 0.5, 0.2],
        ("unlogged", "max_abs_w"): [NAN, 0.0, 0.0, 0.0], ("unlogged", "test_error"): [0.9, 0.9, 0.9, 0.9],
    }
    return runs, curves


def test_stuck_rule_replayed_on_a_hand_made_history(tmp_path):
    runs, curves = stuck_runs()
    study = ExportedStudy(export_folder(tmp_path / "tiny", runs, curves, ["theta"]))
    per_run = replay.replay_stops(study).set_index("run_id")
    assert per_run["stop_epoch"].to_dict() == pytest.approx(
        {"stuck2": 2.0, "learned": NAN, "lucky": 1.0, "unlogged": NAN}, nan_ok=True)
    assert per_run["saved"].to_dict() == {"stuck2": 2, "learned": 0, "lucky": 3, "unlogged": 0}
    assert per_run["false_stop"].to_dict() == {"stuck2": False, "learned": False, "lucky": True, "unlogged": False}
    assert per_run.loc["unlogged", "why"] == "no max_abs_w at epoch 1"

    summary = replay.stop_summary("tiny", per_run.reset_index())
    assert summary == dict(study="tiny", runs=4, not_judged=1, stopped=2, stop_epochs="epoch 1: 1; epoch 2: 1",
                           epochs_run=16, epochs_saved=5, saved_pct=pytest.approx(100 * 5 / 16), false_stops=1,
                           why_not="")


def test_a_study_without_the_metric_is_reported_not_skipped(tmp_path):
    runs, curves = stuck_runs()
    without = {key: values for key, values in curves.items() if key[1] != "max_abs_w"}
    folders = [export_folder(tmp_path / "tiny", runs, curves, ["theta"]),
               export_folder(tmp_path / "old", runs, without, ["theta"])]
    table, per_run = replay.replay_studies(folders)
    assert list(table["study"]) == ["tiny", "old"]
    assert table.loc[1, "why_not"] == "its history has no max_abs_w"
    assert (per_run.loc[per_run["study"] == "old", "why"] == "not replayable: its history has no max_abs_w").all()
    text = replay.stops_markdown(table)
    assert "| old | 4 | not replayable: its history has no max_abs_w |" in text
    assert "| tiny | 4 (1 not judged) | 2 | epoch 1: 1; epoch 2: 1 | 16 | 5 (31.2%) | 1 |" in text


def test_stuck_rule_on_the_shipped_memory_rates_study():
    """The figures counted independently in issue #28 on seeds 0-2 (run to epoch 12 without the rule): 63 runs
    stuck after epoch 1, 693 of 3,024 epochs saved, no stop of a run that learned. Seeds 3 and 4 ran with the rule
    live: their 42 theta = 0 runs stopped after epoch 1 themselves, so the replay finds them stopped there with
    nothing after it to save (BENCHMARKS.md's row: 420 runs, 105 stopped, 693 of 4,578 epochs saved)."""
    study = ExportedStudy(REPO / "analysis/results/memory_rates")
    per_run = replay.replay_stops(study)
    summary = replay.stop_summary("memory_rates", per_run)
    assert (summary["runs"], summary["not_judged"], summary["stopped"]) == (420, 0, 105)
    assert summary["stop_epochs"] == "epoch 1: 105"
    assert (summary["epochs_saved"], summary["epochs_run"], summary["false_stops"]) == (693, 4578, 0)
    first = study.runs.loc[study.runs["seed"].astype(int) < 3, "run_id"]
    first = replay.stop_summary("memory_rates", per_run[per_run["run_id"].isin(first)])
    assert (first["runs"], first["stopped"], first["stop_epochs"]) == (252, 63, "epoch 1: 63")
    assert (first["epochs_saved"], first["epochs_run"], first["false_stops"]) == (693, 3024, 0)


def test_the_command_prints_the_table_and_writes_its_csvs(tmp_path, capsys):
    runs, curves = stuck_runs()
    folder = export_folder(tmp_path / "tiny", runs, curves, ["theta"])
    csvs = ["--csv", str(tmp_path / "t.csv"), "--runs-csv", str(tmp_path / "r.csv")]
    assert replay_command.main([str(folder), *csvs]) == 0
    assert "| tiny | 4 (1 not judged) |" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "t.csv")["epochs_saved"].tolist() == [5]
    assert len(pd.read_csv(tmp_path / "r.csv")) == 4


def test_the_installed_command_says_in_one_line_where_it_found_no_study(tmp_path):
    done = subprocess.run([str(Path(sys.executable).parent / "stawm-replay")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == ("error: no study folders under analysis/results here; run from the repository's root or "
                           "name the folders\n")


# --- pruning a search ------------------------------------------------------------------------------------------

# Three configurations (glimpses 4, 6, 8) x 3 seeds, 4 epochs of test error. A (4) is the true best (final
# 0.04, 0.05, 0.06: mean 0.05, std 0.01); its seed 2 starts unlucky. B (6) has one lucky seed (final 0.04, 0.10,
# 0.10: mean 0.08); C (8) ends at mean 0.10.
PRUNING_CURVES = {
    (4, 0): [0.30, 0.10, 0.07, 0.04], (4, 1): [0.31, 0.10, 0.07, 0.05], (4, 2): [0.60, 0.15, 0.08, 0.06],
    (6, 0): [0.20, 0.08, 0.05, 0.04], (6, 1): [0.55, 0.20, 0.12, 0.10], (6, 2): [0.55, 0.20, 0.12, 0.10],
    (8, 0): [0.25, 0.10, 0.08, 0.07], (8, 1): [0.55, 0.25, 0.15, 0.12], (8, 2): [0.55, 0.25, 0.15, 0.11],
}


def pruning_study(tmp_path) -> ExportedStudy:
    runs = [run(f"g{g}s{s}", 0.5, curve[-1], seed=s, glimpses=g) for (g, s), curve in PRUNING_CURVES.items()]
    curves = {(f"g{g}s{s}", "test_error"): curve for (g, s), curve in PRUNING_CURVES.items()}
    return ExportedStudy(export_folder(tmp_path / "search", runs, curves, ["glimpses"]))


def test_asha_milestones():
    assert prune_replay.Schedule(1, 3).milestones(12) == [1, 3, 9]
    assert prune_replay.Schedule(3, 3).milestones(12) == [3, 9]
    assert prune_replay.Schedule(1, 3).milestones(4) == [1, 3]


def test_one_seed_at_a_time_drops_the_best_configuration_and_its_mean_keeps_it(tmp_path):
    """Milestones 1 and 3 of 4 epochs, the best third going on (np.nanpercentile at 1/3, linear).

    One seed at a time, epoch 1: the 9 errors' cut is 0.30 + (2/3)(0.31 - 0.30) = 0.3067, so B0 (0.20), C0 (0.25)
    and A0 (0.30) go on; epoch 3: 0.05 + (2/3)(0.07 - 0.05) = 0.0633 keeps B0 (0.05) only. B is kept, on its lucky
    seed: its mean over 3 seeds, 0.08, is 3 pp above A's, outside A's 95% t interval (4.303 x 0.01 / sqrt 3 =
    2.48 pp). Epochs: B0 4, A0 and C0 3, six runs 1: 16 of 36.

    Seeds' mean, epoch 1: A 0.4033, B 0.4333, C 0.45; the cut 0.4033 + (2/3)(0.03) = 0.4233 keeps A alone, which
    runs on: A's 3 seeds x 4 + 6 x 1 = 18 of 36.

    Paired: at epoch 1 B and C each beat the leader A on seed 0, so both go on; at epoch 3 (means A 0.0733,
    B 0.0967, C 0.1267) C is worse than A on every seed and stops, B (0.05 < 0.07 on seed 0) goes on: 2 x 3 x 4 +
    3 x 3 = 33 of 36, A kept."""
    curves, run_ids = prune_replay.error_curves(pruning_study(tmp_path))
    table, ran = prune_replay.replay_pruning(curves, prune_replay.Schedule(1, 3))
    rows = table.set_index("pruning")
    assert rows["epochs_run"].to_dict() == {"all runs to the end": 36, "one seed at a time": 16, "seeds' mean": 18,
                                            "seeds' mean, paired": 33}
    assert rows["kept_best"].to_dict() == {"all runs to the end": "glimpses=4", "one seed at a time": "glimpses=6",
                                           "seeds' mean": "glimpses=4", "seeds' mean, paired": "glimpses=4"}
    assert rows["configs_finished"].to_dict() == {"all runs to the end": 3, "one seed at a time": 1,
                                                  "seeds' mean": 1, "seeds' mean, paired": 2}
    assert rows.loc["one seed at a time", "gap_pp"] == pytest.approx(3.0)
    assert rows.loc["one seed at a time", "verdict"] == "outside the best's 95% t interval"
    assert rows.loc["seeds' mean", "verdict"] == "the true best"
    assert ran["one seed at a time"].to_dict() == {
        ("glimpses=4", 0): 3, ("glimpses=4", 1): 1, ("glimpses=4", 2): 1, ("glimpses=6", 0): 4,
        ("glimpses=6", 1): 1, ("glimpses=6", 2): 1, ("glimpses=8", 0): 3, ("glimpses=8", 1): 1,
        ("glimpses=8", 2): 1}
    assert run_ids[("glimpses=6", 0)] == "g6s0"


def test_the_kept_configuration_within_the_best_seeds_spread(tmp_path):
    """B's seeds moved to 0.055 each (mean 0.055): 0.5 pp above A, within A's std of 1 pp; at 0.07 each, 2 pp:
    beyond one std, inside the 95% t interval's 2.48 pp."""
    curves, _ = prune_replay.error_curves(pruning_study(tmp_path))
    final = curves[4].copy()
    for level, expected in ((0.055, "within 1 std of the best"), (0.07, "within the best's 95% t interval")):
        final.loc["glimpses=6"] = level
        assert prune_replay.verdict("glimpses=6", "glimpses=4", final) == expected


def test_a_study_of_one_configuration_is_not_pruned(tmp_path):
    runs = [run(f"s{s}", 0.5, 0.05, seed=s, glimpses=4) for s in range(3)]
    study = ExportedStudy(export_folder(tmp_path / "one", runs, {(f"s{s}", "test_error"): [0.1, 0.05]
                                                                 for s in range(3)}, ["glimpses"]))
    with pytest.raises(replay.NotReplayable, match="a single configuration"):
        prune_replay.error_curves(study)
