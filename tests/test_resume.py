"""--resume: the flags it may change, the seeds it adds, and the studies it refuses before Ray starts; and
stawm-import, which rebuilds a shipped study in a store so that it can be resumed with more seeds.

The end-to-end extension (a finished quick study given one more seed, on the session's Ray cluster) is checked in
test_studies.py::test_glimpse_count_quick, on the runs the suite's quick studies already make."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import ray
from mlflow import MlflowClient

from stawm import schema
from stawm.analysis import export, import_study
from stawm.analysis.source import ExportedStudy, MlflowStudy
from stawm.study import resume, tracking
from stawm.study.flags import parse_args

REPO = Path(__file__).resolve().parents[1]


# --- what a resume may change -------------------------------------------------------------------------------


def test_changed_flags_names_each_difference_and_skips_where_trials_run():
    recorded = {"epochs": "12", "set": "", "delta": "[0.2, 1.5]", "storage": "/old", "seeds": "3",
                "probe_peak_mb": "812.0"}
    now = {"epochs": 3, "set": "grad_clip_mode=none", "delta": [0.2, 1.5], "storage": "/new", "seeds": 5,
           "probe_peak_mb": 640.0, "no_early_stop": True}  # no_early_stop: not recorded then, not compared
    assert resume.changed_flags(recorded, now) == ["epochs: '12' -> '3'", "set: '' -> 'grad_clip_mode=none'"]
    assert resume.changed_flags(recorded, {**now, "epochs": 12, "set": ""}) == []


def args_for(seeds: int, tmp_path: Path):
    return parse_args("", preset="tiny", argv=["--seeds", str(seeds), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                                             "--storage", str(tmp_path / "ray"), "--name", "s"])


def test_more_seeds_train_only_the_added_ones_in_a_ray_experiment_of_their_own(tmp_path):
    args = args_for(5, tmp_path)
    tags = resume.plan_seeds(args, "s", {}, {schema.SEEDS: "3"})
    assert (args.first_seed, args.tune_name) == (3, "s-seeds3-4")
    assert tags == {schema.SEEDS_NOW: "5", schema.SEEDS_ADDED: "3-4:s-seeds3-4"}
    from stawm.study.flags import seeds
    assert seeds(args) == [3, 4]

    again = args_for(5, tmp_path)  # the same command after an interruption: continues that extension
    assert resume.plan_seeds(again, "s", tags, {schema.SEEDS: "3"}) == {}
    assert (again.first_seed, again.tune_name) == (3, "s-seeds3-4")

    more = args_for(7, tmp_path)  # a second extension is recorded after the first
    added = resume.plan_seeds(more, "s", tags, {schema.SEEDS: "3"})[schema.SEEDS_ADDED]
    assert added == "3-4:s-seeds3-4,5-6:s-seeds5-6"
    assert seeds(more) == [5, 6]

    plain = args_for(3, tmp_path)  # the same seeds, never extended: the study's own Ray experiment
    assert resume.plan_seeds(plain, "s", {}, {schema.SEEDS: "3"}) == {}
    assert (plain.first_seed, plain.tune_name) == (0, "")

    with pytest.raises(resume.ResumeRefused, match="already holds 5 seeds"):
        resume.plan_seeds(args_for(4, tmp_path), "s", tags, {schema.SEEDS: "3"})


# --- refused before Ray starts --------------------------------------------------------------------------------


def glimpse_size_main():
    spec = importlib.util.spec_from_file_location("glimpse_size", REPO / "studies" / "glimpse_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def ours(stderr: str) -> list[str]:
    """stderr's lines but MLflow's own notes on opening a new sqlite store (its logger's INFO lines)."""
    return [line for line in stderr.strip().splitlines() if "INFO mlflow." not in line]


@pytest.mark.slow  # seconds of a real run: the full suite's (the fast one stays under its budget)
def test_a_resume_that_changes_the_study_or_names_none_is_one_line_and_starts_nothing(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    flags = ["--quick", "--tracking-uri", uri, "--storage", str(tmp_path / "ray"), "--name", "g"]
    args = parse_args("", preset="tiny", argv=flags)  # the study as first launched, recorded as its parent run
    client = MlflowClient(uri)
    experiment = client.create_experiment("g")
    tracking.create_study_run(client, experiment, "g", tracking.study_params(args, ["glimpse_size"]), "x", "c", False)
    main = glimpse_size_main()
    refusals = ((["--epochs", "3"], "epochs: '1' -> '3'"), (["--set", "max_steps=3"], "set: '' -> 'max_steps=3'"),
                (["--seeds", "1"], "already holds 2 seeds"))
    for extra, says in refusals:
        with pytest.raises(SystemExit) as exit_:
            main([*flags, "--resume", *extra])
        err = ours(capsys.readouterr().err)
        assert exit_.value.code == 2 and len(err) == 1 and says in err[0], err
    with pytest.raises(SystemExit):
        main([*flags[:-1], "gg", "--resume"])  # a misspelt --name
    err = ours(capsys.readouterr().err)
    assert len(err) == 1 and "no study named 'gg'" in err[0], err
    assert client.get_experiment_by_name("gg") is None  # nothing left behind
    assert not ray.is_initialized() and not (tmp_path / "ray" / "g").exists()  # no Ray, no Tune experiment


# --- a shipped study back in a store ----------------------------------------------------------------------------


@pytest.mark.slow
def test_import_then_export_gives_back_the_shipped_study(tmp_path):
    """stawm-import is stawm-export's inverse: every runs.csv cell (but the new run ids), every epoch's metric and
    every condition's verdict come back; runs are matched by (trial id, seed), which the import keeps."""
    shipped = REPO / "analysis" / "results" / "glimpse_size"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert import_study.main([str(shipped), "--tracking-uri", uri]) == 0
    assert import_study.main([str(shipped), "--tracking-uri", uri]) == 2  # the study is there already
    back = tmp_path / "back"
    export.export_study(MlflowStudy("glimpse_size", uri, tmp_path / "cache", progress=False), back, "test")
    a, b = ExportedStudy(shipped), ExportedStudy(back)
    key = lambda runs: runs["trial_id"] + "/" + runs["seed"].astype(str)
    ids = {**dict(zip(a.runs["run_id"], key(a.runs))), **dict(zip(b.runs["run_id"], key(b.runs)))}

    def by_key(frame: pd.DataFrame, order: list[str]) -> pd.DataFrame:
        frame = frame.assign(run_id=frame["run_id"].map(ids))
        return frame.sort_values(order).reset_index(drop=True)

    runs_a = pd.read_csv(shipped / "runs.csv", dtype=str, keep_default_na=False)
    runs_b = pd.read_csv(back / "runs.csv", dtype=str, keep_default_na=False)
    common = [c for c in runs_a.columns if c in runs_b.columns and c != "parent_run_id"]
    assert set(runs_a.columns) - set(common) == {"parent_run_id"}  # every shipped column comes back
    assert by_key(runs_a[common], ["run_id"]).equals(by_key(runs_b[common], ["run_id"]))
    order = ["run_id", "metric", "step"]
    assert by_key(a.history(a._history["metric"].unique()), order).equals(
        by_key(b.history(a._history["metric"].unique()), order))
    assert by_key(a.stability(), ["run_id", "condition"]).equals(by_key(b.stability(), ["run_id", "condition"]))
    meta, shipped_meta = (json.loads((folder / "study.json").read_text()) for folder in (back, shipped))
    assert meta["params"] == shipped_meta["params"] and meta["trials"] == shipped_meta["trials"] == len(runs_a)
    assert meta["seeds_by_commit"] == shipped_meta["seeds_by_commit"]
    assert "Imported with" in meta["ran_with"]
