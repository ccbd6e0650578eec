"""What computed a run (stawm.study.environment) and the configuration tag seeds are grouped by, on a real MLflow
store; a real study's runs are checked in test_studies (test_runs_read_as_mlflow_users_expect)."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path

from mlflow import MlflowClient

from stawm import schema
from stawm.study import environment, tracking
from stawm.study.tracking import config_label, run_name

REPO = Path(__file__).resolve().parents[1]


def test_the_configuration_tag_is_the_run_name_without_its_seed():
    swept = ["delta", "eta", "seed"]
    seed0 = {"delta": 0.5, "eta": 0.1, "theta": 0.0, "seed": 0, "preset": "tiny"}
    seed3, other = {**seed0, "seed": 3}, {**seed0, "eta": 0.2}
    assert config_label(seed0, swept) == config_label(seed3, swept) == "delta=0.5 eta=0.1"
    assert config_label(other, swept) == "delta=0.5 eta=0.2"
    assert run_name(seed3, swept) == "delta=0.5 eta=0.1 seed=3"
    assert config_label({**seed0, "delta": 1 / 3}, swept) == "delta=0.3333 eta=0.1"  # as the run name shows it
    assert config_label(seed0, ["seed"]) == "preset=tiny"  # nothing swept: one configuration, the preset's


def test_versions_and_lock_are_the_installed_ones():
    tags = environment.environment_tags("cpu")
    for package in ("torch", "torchvision", "numpy", "ray", "mlflow", "optuna"):
        assert tags[f"stawm.env.{package}"] == metadata.version(package)
    assert tags["stawm.env.python"] == platform.python_version()
    lock = hashlib.sha256((REPO / "requirements" / "lock.txt").read_bytes()).hexdigest()
    assert tags["stawm.env.lock_sha256"] == lock[:16]
    assert not {schema.ENV_DEVICE_NAME, schema.ENV_CUDA, schema.ENV_DRIVER} & set(tags)  # a CPU has none
    assert environment.nvidia_driver_version() == "unknown"  # no NVIDIA driver on this machine: said, not raised


def test_system_metrics_are_on_by_default_only_on_a_gpu():
    assert [environment.system_metrics_on(choice, device) for choice in ("auto", "on", "off")
            for device in ("cpu", "cuda")] == [False, True, True, True, False, False]


def test_system_metrics_land_on_the_runs_while_the_block_runs(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's own override of the 10 s
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"system-metrics-{time.time_ns()}")
    fused, plain = [client.create_run(experiment).info.run_id for _ in range(2)], client.create_run(experiment)
    with environment.system_metrics(fused, mlflow_server, resumed=False, on=True), \
            environment.system_metrics([plain.info.run_id], mlflow_server, resumed=False, on=False):
        time.sleep(0.7)
    for run_id in fused:  # a fused trial's two members: a sample each 0.2 s, logged at once, steps from 0
        cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
        assert len(cpu) >= 2 and [m.step for m in cpu] == list(range(len(cpu)))
        assert all(0 <= m.value <= 100 for m in cpu)
    assert client.get_run(plain.info.run_id).data.metrics == {}  # off: nothing


def test_the_experiment_offers_mlflows_ui_the_view_of_seeds_grouped_by_configuration(mlflow_server):
    client = MlflowClient(mlflow_server)
    old = client.create_experiment(f"made-before-the-view-{time.time_ns()}")  # as an older version of this left it
    new = tracking.experiment(client, f"new-{time.time_ns()}", mlflow_server)
    assert tracking.experiment(client, client.get_experiment(old).name, mlflow_server) == old
    for experiment_id in (old, new):
        tags = client.get_experiment(experiment_id).tags
        view = json.loads(tags["mlflow.sharedViewState.stawm-by-config"])  # MLflow's key for a shared UI view
        assert view["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "stawm.config"}]
        assert view["groupBy"]["aggregateFunction"] == "average"
        assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tracking.ui_page(new) == (f"#/experiments/{new}/runs?viewStateShareKey=stawm-by-config"
                                     "&workflowType=machine_learning")
