"""A quick study whose tracking server goes down mid-study, with MLflow's client retry window shortened below
the outage (MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1):

- within the outage budget: its own `mlflow server`, killed (SIGKILL) and restarted at once; the study exits
  0, no trial fails, every epoch lands exactly once in one run per trial, and the output has the outage and
  recovery lines and the study's summary line;
- with the budget below the outage: the session's server behind a `Gate` that stays shut until the study
  ends (as its clients see a dead server: connections refused); each trial fails with the one-line reason, the
  driver says in one line that the runs stay open, and `--resume` with the server back completes every run
  with no epoch logged twice.

Both studies run in the background from collection on (`start_early`, see conftest): most of their time is
waiting for Ray, the drivers and the outage. They are drivers of the session's Ray cluster (`SESSION_RAY`),
as a user submits studies to a running cluster, beside the other quick studies. The queue on a hand-made
sequence and the driver's own calls are checked in test_outbox.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow import MlflowClient

from background import early_result, make_temp_dir
from processes import free_port, stop_group
from ray_cluster import SESSION_RAY
from tracking_server import SESSION_SERVER, Gate, start_mlflow_server
from stawm import schema

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4  # the server goes down after epoch 2: epochs queue, or wait at the trial's end, either way
SHORT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
STUDY_S = 600  # a net: on a loaded machine a study waits for CPU


@dataclass
class KilledServer:
    """A study's own `mlflow server`, killed mid-study as a crashed head node is (no shutdown handler)."""

    root: Path
    port: int = field(default_factory=free_port)
    server: subprocess.Popen | None = None
    runs: dict[str, subprocess.CompletedProcess] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def come_back(self) -> None:
        self.server = start_mlflow_server(self.root, self.port)

    def go_down(self) -> None:
        os.killpg(self.server.pid, signal.SIGKILL)
        self.server.wait(timeout=30)

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            stop_group(self.server)

    def client(self) -> MlflowClient:  # its database, read once the server is stopped
        return MlflowClient(f"sqlite:///{self.root / 'server.db'}")


@dataclass
class ShutGate:
    """The session's `mlflow server` behind a `Gate`, shut mid-study: its clients' connections are cut and new
    ones refused, as from a server that is gone, without starting one more server."""

    root: Path
    gate: Gate = field(default_factory=lambda: Gate(SESSION_SERVER.uri()))
    runs: dict[str, subprocess.CompletedProcess] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return self.gate.uri

    def come_back(self) -> None:
        self.gate.open()

    def go_down(self) -> None:
        self.gate.shut()

    def stop(self) -> None:
        if self.gate.is_open:
            self.gate.shut()

    def client(self) -> MlflowClient:
        return MlflowClient(SESSION_SERVER.uri())


def study_command(outage, name: str, *flags: str) -> list[str]:
    # its two trials one after the other, in one worker process (as the other quick studies, quick_studies.STUDIES)
    return [sys.executable, "studies/glimpse_size.py", "--quick", "--seeds", "1", "--epochs", str(EPOCHS),
            "--set", "max_steps=4", "--max-concurrent", "1", "--tracking-uri", outage.uri,
            "--storage", str(outage.root / "ray"), "--name", name, "--no-report", *flags]


def run_with_outage(outage, command: list[str], env: dict, back_at_once: bool) -> subprocess.CompletedProcess:
    """Run the study; take its server down once a trial has reported its second epoch, and bring it back at
    once, or else once the study has ended."""
    log = outage.root / f"study-{time.time():.0f}.log"
    with open(log, "w") as out:
        study = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            deadline = time.monotonic() + STUDY_S
            while not list((outage.root / "ray").glob("*/trainable_*/checkpoint_000001")):  # epoch 2 reported
                assert study.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            outage.go_down()
            if back_at_once:
                outage.come_back()
            study.wait(timeout=STUDY_S)
        finally:
            stop_group(study, grace_s=5)  # a study that overran: not left running past the test
    if not back_at_once:
        outage.come_back()
    return subprocess.CompletedProcess(command, study.returncode, log.read_text(), "")


def start_early() -> dict:
    """Both studies at once: within the budget (its own server, killed), and past it (then --resume)."""
    outages = {"within": KilledServer(make_temp_dir("outage-within-")), "past": ShutGate(make_temp_dir("outage-past-"))}

    def within(outage: KilledServer, env: dict) -> None:
        outage.runs["study"] = run_with_outage(outage, study_command(outage, "outage-within"), env, back_at_once=True)

    def past(outage: ShutGate, env: dict) -> None:
        command = study_command(outage, "outage-past", "--tracking-outage-budget", "2", "--max-failures", "0")
        outage.runs["study"] = run_with_outage(outage, command, env, back_at_once=False)
        outage.runs["resume"] = subprocess.run([*command, "--resume"], cwd=REPO, env=env, capture_output=True,
                                               text=True, timeout=STUDY_S)

    try:
        outages["within"].come_back()
        with SESSION_RAY.held() as env, ThreadPoolExecutor(2) as pool:
            env = {**env, **SHORT_RETRIES}
            for done in [pool.submit(within, outages["within"], env), pool.submit(past, outages["past"], env)]:
                done.result()
    finally:
        for outage in outages.values():
            outage.stop()
    return outages


@pytest.fixture(scope="module")
def outages() -> dict:
    return early_result(__name__, start_early)


def trial_runs(outage, name: str) -> tuple[MlflowClient, list]:
    """The study's trial runs, as its server stored them."""
    client = outage.client()
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], schema.tag_filter({schema.ROLE: schema.ROLE_TRIAL}))
    return client, runs


def assert_every_epoch_once(client: MlflowClient, runs: list) -> None:
    assert len(runs) == 2 and len({r.data.tags[schema.TRIAL_ID] for r in runs}) == 2  # one run per trial
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in (schema.TRAIN_LOSS, schema.TEST_ERROR, schema.BEST_TEST_ERROR):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(1, EPOCHS + 1))


@pytest.mark.slow
def test_an_outage_within_the_budget_fails_no_trial_and_says_so(outages):
    outage = outages["within"]
    done = outage.runs["study"]
    out = done.stdout
    assert done.returncode == 0, out[-5000:]
    assert "ERROR" not in out and "Traceback" not in out and "Max retries exceeded" not in out
    assert "not answering since" in out and "back after" in out  # Ray folds the same line from several trials
    summary = [line for line in out.splitlines() if "stopped answering during the study" in line]
    # the trial training when the server went down rode it out; the second, after it, may have found it back
    assert len(summary) == 1 and re.search(r"[12] of 2 trials rode it out", summary[0]), out[-3000:]
    assert_every_epoch_once(*trial_runs(outage, "outage-within"))


@pytest.mark.slow
def test_past_the_budget_trials_fail_in_one_line_and_resume_logs_what_they_kept(outages):
    outage = outages["past"]
    first, resumed = outage.runs["study"], outage.runs["resume"]
    assert first.returncode == 1, first.stdout[-5000:]
    assert "past the outage budget of 2 s, --tracking-outage-budget" in first.stdout
    assert "the study's runs stay RUNNING until the same command with --resume closes them" in first.stdout
    # --max-failures 0: each trial failed, not retried (a retry takes up the outage where the trial's checkpoint
    # left it, the budget being the trial's: test_outbox.py)
    stopped = re.findall(r"past the outage budget of 2 s, --tracking-outage-budget\); trial (\S+) stops", first.stdout)
    assert len(set(stopped)) == 2, first.stdout[-5000:]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming the Ray experiment" in resumed.stdout
    assert_every_epoch_once(*trial_runs(outage, "outage-past"))
