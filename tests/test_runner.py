"""The runner on a two-node Ray cluster (one machine, 1 CPU per node) logging to a real MLflow server.

- a study whose driver is killed mid-way (SIGKILL to its process group) finishes after `--resume`
  with exactly one FINISHED MLflow run per trial, each epoch logged once;
- a trial that crashes once (at its second report, epoch 2 already logged) is retried by Tune from its
  checkpoint and finishes in the same MLflow run, each epoch logged once;
- a resumed trial picks its newest whole checkpoint, whichever one Tune's saved state names.

One cluster serves the whole module. The storage is a local folder: on one machine every node sees
it, which is what STAWM_SHARED_STORAGE=1 tells the preflight check.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient
from ray import tune
from ray.cluster_utils import Cluster

from stawm import schema
from stawm.study import runner

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, 1 CPU each: two trials at once means one on each node."""
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    try:
        yield nodes.address
    finally:
        nodes.shutdown()


@pytest.fixture
def on_cluster(cluster, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", cluster)
    monkeypatch.setenv("STAWM_SHARED_STORAGE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return cluster


def trial_runs(uri: str, name: str) -> tuple[MlflowClient, list]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client, []
    runs = client.search_runs([experiment.experiment_id])
    return client, runs


def children(runs) -> list:
    return [r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_TRIAL]


def steps(client: MlflowClient, run_id: str, key: str = "train_loss") -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow
def test_killed_study_resumes_on_two_nodes_with_one_run_per_trial(on_cluster, mlflow_server, tmp_path):
    epochs = 8
    command = [sys.executable, "studies/glimpse_size.py", "--quick", "--seeds", "1", "--epochs", str(epochs),
               "--set", "max_steps=5", "--tracking-uri", mlflow_server, "--storage", str(tmp_path / "ray"),
               "--name", "killed", "--no-report"]  # the report at the end: test_parent_report
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while True:  # until a trial has reported an epoch, while the study is still going
        assert driver.poll() is None, "ended before the kill:\n" + (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial reported an epoch in time"
        client, runs = trial_runs(mlflow_server, "killed")
        trials = children(runs)
        if any(steps(client, r.info.run_id) for r in trials) and any(
                r.info.status == "RUNNING" for r in trials):
            break
        time.sleep(0.3)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    log.close()
    _, runs = trial_runs(mlflow_server, "killed")
    assert any(r.info.status == "RUNNING" for r in children(runs)), "the kill interrupted nothing"

    resumed = subprocess.run([*command, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "resuming the Ray experiment" in resumed.stdout

    client, runs = trial_runs(mlflow_server, "killed")
    parents = [r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_STUDY]
    trials = children(runs)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 2 and len({r.data.tags[schema.TRIAL_ID] for r in trials}) == 2
    assert sorted(r.data.params["glimpse_size"] for r in trials) == ["6", "8"]
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.tags[schema.PARENT_RUN_ID] == parents[0].info.run_id
        assert steps(client, run.info.run_id) == list(range(1, epochs + 1))  # each epoch once, none lost
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert artifacts == {schema.CONFIG_ARTIFACT, schema.STABILITY_ARTIFACT}
        # read back through the server: named after its values, one dataset input (not one per attempt)
        assert run.info.run_name == f"glimpse_size={run.data.params['glimpse_size']} seed=0"
        assert [d.dataset.name for d in client.get_run(run.info.run_id).inputs.dataset_inputs] == ["mnist-sample"]
        assert Path(run.data.tags[schema.CHECKPOINT]).is_file()  # the newest checkpoint, after the resume
    note = parents[0].data.tags[schema.NOTE]
    assert note.count("studies/glimpse_size.py --quick") == 2 and "Resumed with" in note and "--resume" in note
    assert client.get_experiment_by_name("killed").tags[schema.EXPERIMENT_KIND] == schema.EXPERIMENT_KIND_TRAINING


@pytest.mark.slow
def test_trial_that_raises_once_is_retried_from_its_checkpoint(on_cluster, mlflow_server, tmp_path):
    argv = ["--quick", "--seeds", "1", "--epochs", "3", "--set", "max_steps=3", "--tracking-uri", mlflow_server,
            "--storage", str(tmp_path / "ray"), "--name", "fail-once"]
    args = runner.parse_args("fault injection", preset="tiny", argv=argv)

    def crashes_once(config: dict, context) -> None:
        """runner.trainable, whose first attempt dies at its second report: epoch 2 is in MLflow, not in Tune.
        (Defined here, so that Ray pickles it by value: the workers cannot import this test module.)"""
        if tune.get_checkpoint() is not None:
            return runner.trainable(config, context)
        report, reports = tune.report, []

        def crashing(*args, **kwargs):
            reports.append(1)
            if len(reports) == 2:
                raise RuntimeError("fault injected at epoch 2")
            return report(*args, **kwargs)

        tune.report = crashing  # the module the trainable calls; this worker's only, and put back
        try:
            runner.trainable(config, context)
        finally:
            tune.report = report

    study = runner.start_study(args, swept=[])
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(crashes_once, context=study.context), runner.resources(args)),
            param_space={"seed": 0},
            run_config=runner.run_config(args),
        )
        results = tuner.fit()
        assert runner.finish_study(study, results) == 0
    finally:
        ray.shutdown()

    (result,) = list(results)
    assert result.error is None and result.metrics["training_iteration"] == 3
    assert result.config == {"seed": 0}  # the search space holds what is swept; the rest came as its TrialContext
    error_file = Path(result.path) / "error.txt"  # Tune's record of the failed first attempt
    assert error_file.exists() and "fault injected at epoch 2" in error_file.read_text()

    client, runs = trial_runs(mlflow_server, "fail-once")
    (run,) = children(runs)
    assert run.info.status == "FINISHED"
    assert run.data.tags[schema.TRIAL_ID] == result.metrics["trial_id"]
    assert steps(client, run.info.run_id) == [1, 2, 3]  # epoch 1 once (restored, not redone), then 2 and 3
    assert steps(client, run.info.run_id, "best_test_error") == [1, 2, 3]


def test_resume_takes_the_newest_whole_checkpoint_and_empties_the_others(tmp_path):
    import json

    from stawm.train import CHECKPOINT
    from stawm.study.tune_checkpoints import RUNNER_STATE, restore_newest

    def folder(index: int, epoch: int | None, payload: bytes, claimed: int | None = None) -> Path:
        path = tmp_path / "trial" / f"checkpoint_{index:06d}"
        path.mkdir(parents=True)
        if epoch is not None:
            (path / CHECKPOINT).write_bytes(payload)
            state = {"epoch": epoch, "checkpoint_bytes": len(payload) if claimed is None else claimed}
            (path / RUNNER_STATE).write_text(json.dumps(state))
        return path

    named = folder(0, None, b"")  # emptied already, but still what Tune's stale state names
    older = folder(1, 2, b"epoch two")
    newest = folder(2, 3, b"epoch three")
    cut_short = folder(3, 4, b"epoch fo", claimed=len(b"epoch four"))  # a copy the kill interrupted
    work = tmp_path / "work"
    work.mkdir()

    checkpoint, state = restore_newest(tune.Checkpoint.from_directory(str(named)), work)

    assert Path(checkpoint.path) == newest and state["epoch"] == 3
    assert (work / CHECKPOINT).read_bytes() == b"epoch three"
    for emptied in (named, older, cut_short):  # folders stay (Tune's state may name them), payloads go
        assert emptied.is_dir() and not any(emptied.iterdir())
    assert sorted(p.name for p in newest.iterdir()) == sorted([CHECKPOINT, RUNNER_STATE])
