"""Ctrl-C on a study (`runner._catch_interrupts`): a real study subprocess gets SIGINT on its process group (as a
terminal sends it) while a trial runs and others wait; it stops without a traceback, exits 130, says in one line how
to resume, leaves its runs KILLED, and the same command with --resume finishes every trial in its one run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from stawm import schema

REPO = Path(__file__).resolve().parents[1]


def runs(uri: str) -> tuple[MlflowClient, list]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ctrlc")
    return client, (client.search_runs([experiment.experiment_id]) if experiment is not None else [])


def steps(client: MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, "train_loss")]


@pytest.mark.slow
def test_interrupted_study_exits_130_and_resumes_in_the_same_runs(tmp_path):
    epochs, uri = 6, f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "studies/glimpse_size.py", "--quick", "--epochs", str(epochs), "--set", "max_steps=20",
               "--max-concurrent", "1", "--tracking-uri", uri, "--storage", str(tmp_path / "ray"), "--name", "ctrlc",
               "--no-report"]  # one trial at a time: three wait while the first runs
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while True:  # until the first trial has logged an epoch
            assert driver.poll() is None, "ended before the interrupt:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial reported an epoch in time"
            try:
                client, found = runs(uri)
                if any(steps(client, r.info.run_id) for r in found):
                    break
            except Exception:  # the store being created
                pass
            time.sleep(0.3)
        os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C does
        assert driver.wait(timeout=120) == 130, log.read_text()[-3000:]
    first = log.read_text()
    assert "Traceback" not in first, first[-3000:]
    resume_lines = [line for line in first.splitlines() if "resume with" in line]
    assert len(resume_lines) == 1 and resume_lines[0].endswith("--name ctrlc --no-report --resume"), first[-3000:]
    _, found = runs(uri)
    (parent,) = [r for r in found if r.data.tags.get(schema.ROLE) == schema.ROLE_STUDY]
    assert parent.info.status == "KILLED"
    trials = [r for r in found if r.data.tags.get(schema.ROLE) == schema.ROLE_TRIAL]
    seen = [(r.info.run_name, r.info.status, r.data.tags.get(schema.STOPPED_EARLY)) for r in trials]
    assert trials and all(r.info.status == "KILLED" and schema.STOPPED_EARLY not in r.data.tags
                          for r in trials), seen

    resumed = subprocess.run([*command, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    client, found = runs(uri)
    (parent,) = [r for r in found if r.data.tags.get(schema.ROLE) == schema.ROLE_STUDY]
    trials = [r for r in found if r.data.tags.get(schema.ROLE) == schema.ROLE_TRIAL]
    assert parent.info.status == "FINISHED"
    assert len(trials) == 4 and len({r.data.tags[schema.TRIAL_ID] for r in trials}) == 4  # one run per trial
    for run in trials:
        assert run.info.status == "FINISHED" and schema.STOPPED_EARLY not in run.data.tags
        assert steps(client, run.info.run_id) == list(range(1, epochs + 1))  # every epoch once
