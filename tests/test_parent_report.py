"""The study's report on its parent run (stawm.study.parent_report): a study ends with stawm-report's files logged
under report/ of its parent run, the files the command writes from the same store; a report that cannot be made
(no trial runs, too slow, a store that refuses the files) is one line with the command to make it by hand, never an
exception, and --no-report skips it (a flag a resume may change)."""

from __future__ import annotations

import csv
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from stawm import schema
from stawm.study import parent_report, resume, tracking

TEXT_FILES = (".md", ".tex", ".csv")  # the figures' bytes carry their render's ids and dates: compared by name


def parent_of(client: MlflowClient, study: str):
    experiment = client.get_experiment_by_name(study)
    (parent,) = client.search_runs([experiment.experiment_id], schema.tag_filter({schema.ROLE: schema.ROLE_STUDY}))
    return parent


# --- the session's quick study: its report on its parent run ------------------------------------------------

@pytest.mark.slow
def test_the_quick_study_ends_with_its_report_on_its_parent_run(glimpse_size_study, tmp_path):
    # the shared session run: studies/glimpse_size.py --quick --epochs 2 --set max_steps=3 (see conftest)
    from stawm.analysis import report

    uri, client = glimpse_size_study["uri"], MlflowClient(glimpse_size_study["uri"])
    parent = parent_of(client, "t")
    assert parent.info.status == "FINISHED" and parent.data.params["no_report"] == "False"
    logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, schema.REPORT_ARTIFACT_DIR)}

    # the report the command writes from the same store (in-process: the console script is run in test_packaging)
    by_hand = tmp_path / "by-hand"
    assert report.main(["--study", "t", "--tracking-uri", uri, "--out", str(by_hand), "--no-log",
                        "--cache-dir", str(tmp_path / "cache")]) == 0
    written = {p.name for p in by_hand.iterdir()}
    assert {"table.md", "table.tex", "summary.csv", "runs.csv", "ablation_glimpse_size.png",
            "ablation_glimpse_size.svg", "curves_test_error.png"} <= written
    assert logged == written
    folder = Path(client.download_artifacts(parent.info.run_id, schema.REPORT_ARTIFACT_DIR, str(tmp_path / "logged")))
    for name in sorted(n for n in written if n.endswith(TEXT_FILES)):
        assert (folder / name).read_text() == (by_hand / name).read_text(), name

    lines = glimpse_size_study["stdout"].splitlines()
    start = lines.index(f"writing the report on the parent run {parent.info.run_id} (stawm-report, at most "
                        f"{parent_report.REPORT_TIMEOUT_S:g} s) ...")
    assert lines[start + 1].startswith(f"report: {len(written)} files on the parent run under report/ (")
    assert lines[-1].startswith(f"MLflow experiment 't', parent run {parent.info.run_id}: ")  # the link stays last


@pytest.mark.slow
def test_a_study_given_more_seeds_writes_its_report_again_over_all_its_runs(shared_ray_studies, tmp_path):
    # glimpse_count launched with one seed and --no-report, then --seeds 2 --resume with the report (quick_studies.py)
    first = shared_ray_studies.stdout("glimpse_count")
    added = shared_ray_studies.stdout("glimpse_count --seeds 2 --resume")
    assert "writing the report" not in first and "the report did not come" not in first
    client = MlflowClient(shared_ray_studies.uri)
    parent = parent_of(client, "glimpse_count")
    assert parent.data.params["no_report"] == "True"  # as first launched: a resume may change it
    assert f"writing the report on the parent run {parent.info.run_id} (" in added
    folder = Path(client.download_artifacts(parent.info.run_id, schema.REPORT_ARTIFACT_DIR, str(tmp_path)))
    rows = list(csv.DictReader((folder / "summary.csv").open()))
    assert [(row["glimpses"], row["n"]) for row in rows] == [("2", "2"), ("4", "2")]  # both seeds of each N


# --- a report that does not come: one line, the command by hand ---------------------------------------------

def test_a_report_past_its_time_is_stopped_and_said_in_one_line(tmp_path, capsys):
    # no store needed: the report is stopped before it reads one
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert parent_report.write_report("t", uri, "0" * 32, timeout_s=0.01) is False
    out = capsys.readouterr().out.splitlines()
    assert out == [f"writing the report on the parent run {'0' * 32} (stawm-report, at most 0.01 s) ...",
                   f"the report did not come (it took more than 0.01 s and was stopped); make it by hand: "
                   f"stawm-report --study t --tracking-uri {uri} --out reports/t"]


def test_a_study_whose_runs_stayed_open_says_why_it_has_no_report(capsys):
    why = "the tracking server did not answer: the study's runs stay RUNNING; --resume writes it"
    assert parent_report.write_report("t", "http://u:hunter2@h:5000", "r", skip=why) is False
    (line,) = capsys.readouterr().out.splitlines()
    assert line == (f"the report did not come ({why}); make it by hand: "
                    "stawm-report --study t --tracking-uri 'http://u:***@h:5000' --out reports/t")


def test_a_store_that_does_not_take_the_files_is_one_reason_not_an_exception(tmp_path, free_port, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # nothing answers there: no need to wait for it
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "table.md").write_text("| |\n")
    why = parent_report.log_report(f"http://127.0.0.1:{free_port}", uuid.uuid4().hex, tmp_path / "report")
    assert why.startswith("logging it on the parent run failed: MlflowException: ") and "\n" not in why


@pytest.mark.slow
def test_a_study_without_trial_runs_ends_with_one_line_and_no_report(tmp_path, capsys):
    """The report run for real on a study whose parent run holds no trial: its own one-line error, passed on."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    parent = tracking.create_study_run(client, tracking.experiment(client, "empty", uri), "empty", {schema.SEEDS: 1},
                                       "studies/x.py", "abc", False)
    client.set_terminated(parent, "FINISHED")
    assert parent_report.write_report("empty", uri, parent) is False
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith(f"writing the report on the parent run {parent} ")
    assert out[1].startswith("the report did not come (exit status 2: error: study 'empty' has no trial runs")
    assert out[1].endswith(f"); make it by hand: stawm-report --study empty --tracking-uri {uri} --out reports/empty")
    assert client.list_artifacts(parent, schema.REPORT_ARTIFACT_DIR) == []


# --- --no-report -----------------------------------------------------------------------------------------------

def test_no_report_is_a_flag_a_resume_may_change():
    assert "no_report" in resume.MAY_CHANGE
    assert resume.changed_flags({"no_report": "False", "epochs": "2"}, {"no_report": True, "epochs": 2}) == []
