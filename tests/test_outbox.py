"""Riding out a tracking server that stops answering (`stawm.study.outbox`), against the session's real MLflow
server behind a `Gate` (a TCP relay the test shuts and opens: connections refused, as from a killed server):

- a hand-made sequence: logging fails at epochs 3-5, the server answers again at 6; every epoch lands once, in
  order, with one line when it stops answering and one when it is back, and an epoch whose log landed though
  its answer was lost is not sent twice;
- past the outage budget, one line naming the server, the time it has been down and the epochs unlogged;
- an error the server answers (a run that does not exist) is raised, not ridden out;
- the study driver's own calls (`runner.finish_study`) wait for the server, or past the budget say so in
  one line and leave the runs for --resume;
- the flag and its environment variable.

The study-level checks (a server killed and restarted mid-study) are in test_tracking_outage.py.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import uuid

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import RestException
from ray.tune import Result

from stawm import schema
from stawm.study import outbox, runner, tracking

REPORT = {"ok": True, "failed": [], "static_ok": True, "diverged": False}


@pytest.fixture(autouse=True)
def short_client_retries(monkeypatch):
    """MLflow's client gives up at once on a refused connection (the outbox's own pace is under test)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def new_run(uri: str) -> str:
    client = MlflowClient(uri)
    experiment = client.create_experiment(f"outbox-{uuid.uuid4().hex[:8]}")
    return client.create_run(experiment).info.run_id


def steps_and_values(uri: str, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, schema.TRAIN_LOSS))


def test_epochs_queued_while_the_server_is_down_land_once_in_order(mlflow_server, gate, capsys):
    run_id = new_run(mlflow_server)
    server = outbox.Server(gate.uri, budget_s=60, who="trial t1", retry_s=0.0)
    box = outbox.Outbox(MlflowClient(gate.uri), server)
    box.track(run_id, logged=0)
    held = []  # the epochs the store holds after each epoch's flush
    for epoch in range(1, 9):
        if epoch == 3:
            gate.shut()
        if epoch == 6:
            gate.open()
        box.add(run_id, epoch, {schema.TRAIN_LOSS: epoch / 10, schema.TEST_ERROR: 1 - epoch / 10}, REPORT)
        box.flush()
        held.append([step for step, _ in steps_and_values(mlflow_server, run_id)])
        if epoch == 4:  # epoch 3's log_batch landed though its answer was lost: it must not be sent again
            tracking.log_epoch(MlflowClient(mlflow_server), run_id, 3, {schema.TRAIN_LOSS: 0.3}, REPORT)

    assert held == [[1], [1, 2], [1, 2], [1, 2], [1, 2, 3], [1, 2, 3, 4, 5, 6], [*range(1, 8)], [*range(1, 9)]]
    assert steps_and_values(mlflow_server, run_id) == [(e, pytest.approx(e / 10)) for e in range(1, 9)]
    errors = MlflowClient(mlflow_server).get_metric_history(run_id, schema.TEST_ERROR)
    assert sorted(m.step for m in errors) == [1, 2, 4, 5, 6, 7, 8]  # epoch 3 as it landed by hand (loss only)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(rf"tracking server {gate.uri} not answering since \d\d:\d\d:\d\d; trial t1 keeps "
                        r"training, 1 epoch queued \(outage budget 60 s\)", lines[0])
    assert re.fullmatch(rf"tracking server {gate.uri} back after \d+ s; trial t1: 4 epochs logged", lines[1])
    assert server.outages == 1 and box.count() == 0


def test_past_the_budget_one_line_names_the_server_the_time_and_what_is_unlogged(mlflow_server, gate):
    run_id = new_run(mlflow_server)
    server = outbox.Server(gate.uri, budget_s=0.2, who="trial t2", retry_s=0.0)
    box = outbox.Outbox(MlflowClient(gate.uri), server)
    box.track(run_id, logged=0)
    gate.shut()
    for epoch in (1, 2):
        box.add(run_id, epoch, {schema.TRAIN_LOSS: 1.0}, REPORT)
        box.flush()
        server.check_budget(box.describe())  # within the budget: nothing raised
    server.down_since -= 1.0  # the outage began a second ago: past the 0.2 s budget
    with pytest.raises(outbox.OutageBudgetExceeded) as failure:
        server.check_budget(box.describe())
    message = str(failure.value)
    assert "\n" not in message
    assert re.fullmatch(rf"tracking server {gate.uri} not answering since \d\d:\d\d:\d\d \(1 s, past the outage "
                        r"budget of 0 s, --tracking-outage-budget\); trial t2 stops: epochs 1-2 unlogged, kept in "
                        r"its checkpoint \(--resume logs them\)", message)
    assert box.unlogged(run_id) == [{"epoch": e, "metrics": {schema.TRAIN_LOSS: 1.0}, "report": REPORT} for e in (1, 2)]


def test_a_retried_attempt_takes_up_the_outage_its_checkpoint_saw_start(mlflow_server, gate, tmp_path, capsys):
    """Tune retries a trial that failed past the budget: the retry reads since when the server has been down from
    the checkpoint and fails at its first unanswered call, instead of granting itself the budget again (with
    --tracking-outage-budget 1800 and max_failures=2, 90 minutes in all)."""
    from stawm.study.tune_checkpoints import newest_state, save_state
    from stawm.train import CHECKPOINT

    first = outbox.Server(gate.uri, budget_s=5, who="trial t4", retry_s=0.0)
    gate.shut()
    assert not first.try_call(tracking.last_logged_epoch, MlflowClient(gate.uri), new_run(mlflow_server))[0]
    first.failed()
    first.down_since -= 6.0  # it has been down 6 s: past the 5 s budget
    folder = tmp_path / "checkpoint_000003"
    folder.mkdir()
    (folder / CHECKPOINT).write_bytes(b"weights")
    save_state(folder, 3, [{}], first.down_since)

    from ray import tune

    retry = outbox.Server(gate.uri, budget_s=5, who="trial t4", retry_s=0.0)
    retry.went_on(newest_state(tune.Checkpoint.from_directory(str(folder)))[1]["tracking_down_since"])
    assert retry.down_since == first.down_since and retry.outages == 1
    with pytest.raises(outbox.OutageBudgetExceeded, match=r"\(6 s, past the outage budget of 5 s"):
        retry.wait_call(tracking.last_logged_epoch, MlflowClient(gate.uri), "r", doing="waits to open its runs")
    assert capsys.readouterr().out == ""  # the first attempt said the outage began; the retry's line is the failure

    gate.open()  # a retry once the server answers again: one line, how long it was down in all
    back = outbox.Server(gate.uri, budget_s=60, who="trial t4", retry_s=0.0)
    back.went_on(first.down_since)
    run_id = new_run(mlflow_server)
    assert back.wait_call(tracking.last_logged_epoch, MlflowClient(gate.uri), run_id, doing="waits to resume") == 0
    assert re.fullmatch(rf"tracking server {gate.uri} back after [67] s; trial t4: going on\n", capsys.readouterr().out)
    assert back.down_since is None


def test_an_error_the_server_answers_is_raised_not_ridden_out(mlflow_server):
    server = outbox.Server(mlflow_server, budget_s=60, who="trial t3")
    with pytest.raises(RestException, match="RESOURCE_DOES_NOT_EXIST|not found"):
        server.try_call(tracking.log_epoch, MlflowClient(mlflow_server), uuid.uuid4().hex, 1, {"x": 1.0}, REPORT)
    assert server.down_since is None and server.outages == 0


def test_an_overloaded_server_is_waited_for_like_one_that_does_not_answer():
    # what `mlflow server` on SQLite answered 96 writers at once (stawm.study.tracking_load, 2026-12-03)
    busy = RestException({"error_code": "BAD_REQUEST", "message": "QueuePool limit of size 5 overflow 10 reached, "
                                                                  "connection timed out, timeout 30.00"})
    assert outbox.unanswered(busy)
    assert not outbox.unanswered(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad param"}))


def finished_study(uri: str, budget_s: float) -> tuple[runner.Study, list[Result], str]:
    """A study's parent run and one trial's run left RUNNING, as a killed trial leaves them, and its Result."""
    client = MlflowClient(uri)
    name = f"driver-{uuid.uuid4().hex[:8]}"
    experiment = tracking.experiment(client, name, uri)
    parent = tracking.create_study_run(client, experiment, name, {}, "studies/x.py", "abc", False)
    tags = {schema.PARENT_RUN_ID: parent, schema.TRIAL_ID: "t0", schema.ROLE: schema.ROLE_TRIAL}
    trial_run = client.create_run(experiment, tags=tags).info.run_id
    config = {"seed": 0}  # what the study swept; the rest is its context's
    result = Result(metrics={"trial_id": "t0", "tracking_outages": 1, "tracking_down_s": 12.0, "config": config},
                    checkpoint=None, error=None, path="/tmp/t0")
    context = runner.TrialContext(name, experiment, parent, uri, base_config={"preset": "tiny", "epochs": 2},
                                  outage_budget_s=budget_s)
    return runner.Study(context), [result], trial_run


def test_the_driver_waits_for_the_server_to_close_the_runs(mlflow_server, gate, capsys, monkeypatch):
    monkeypatch.setattr(outbox, "RETRY_EVERY_S", 0.5)  # the driver's Server takes the module's pace
    study, results, trial_run = finished_study(mlflow_server, budget_s=60)
    study.context = dataclasses.replace(study.context, tracking_uri=gate.uri)  # the driver goes through the gate
    gate.shut()
    threading.Timer(2.0, gate.open).start()
    assert runner.finish_study(study, results) == 0
    client = MlflowClient(mlflow_server)
    assert client.get_run(trial_run).info.status == "FINISHED"
    assert client.get_run(study.parent_run_id).info.status == "FINISHED"
    out = capsys.readouterr().out
    assert re.search(rf"tracking server {gate.uri} not answering since \d\d:\d\d:\d\d; the study driver waits to "
                     r"close the study's runs \(outage budget 60 s\)", out)
    assert re.search(rf"tracking server {gate.uri} back after \d+ s; the study driver: going on", out)
    assert re.search(rf"tracking server {gate.uri} stopped answering during the study: 1 of 1 trials rode it out, "
                     r"training on \(their lines above say how long\); the driver waited \d+ s to close the runs", out)


def test_past_its_budget_the_driver_says_so_and_leaves_the_runs_for_resume(mlflow_server, gate, capsys,
                                                                            monkeypatch):
    monkeypatch.setattr(outbox, "RETRY_EVERY_S", 0.5)
    study, results, trial_run = finished_study(mlflow_server, budget_s=1)
    study.context = dataclasses.replace(study.context, tracking_uri=gate.uri)  # the driver goes through the gate
    gate.shut()
    assert runner.finish_study(study, results) == 1
    client = MlflowClient(mlflow_server)
    assert client.get_run(trial_run).info.status == client.get_run(study.parent_run_id).info.status == "RUNNING"
    out = capsys.readouterr().out
    assert "Traceback" not in out
    assert re.search(rf"tracking server {gate.uri} not answering since \d\d:\d\d:\d\d \(\d+ s, past the outage "
                     r"budget of 1 s, --tracking-outage-budget\); the study driver stops: nothing unlogged; the "
                     r"study's runs stay RUNNING until the same command with --resume closes them", out)


def test_the_budget_flag_and_its_environment_variable(tmp_path, monkeypatch, capsys):
    argv = ["--quick", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "ray")]
    monkeypatch.delenv(outbox.BUDGET_ENV, raising=False)
    assert runner.parse_args("a study", preset="tiny", argv=argv).tracking_outage_budget == 1800
    monkeypatch.setenv(outbox.BUDGET_ENV, "90")
    assert runner.parse_args("a study", preset="tiny", argv=argv).tracking_outage_budget == 90
    assert runner.parse_args("a study", preset="tiny",
                             argv=[*argv, "--tracking-outage-budget", "45"]).tracking_outage_budget == 45
    monkeypatch.setenv(outbox.BUDGET_ENV, "soon")
    with pytest.raises(SystemExit) as stopped:
        runner.parse_args("a study", preset="tiny", argv=argv)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        f"error: ${outbox.BUDGET_ENV} must be a number of seconds > 0, got 'soon'")
