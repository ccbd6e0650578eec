"""Studies in small mode (--quick), run as a user runs them: a subprocess, real Ray, real MLflow (SQLite).

Each end-to-end study starts its own local Ray (the path a user takes without RAY_ADDRESS); the
runs are capped at 3 steps an epoch (`--set max_steps=3`) to keep the suite short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from stawm.config import Config

REPO = Path(__file__).resolve().parents[1]
STEP_CAP = ["--set", "max_steps=3"]  # --quick trains whole epochs of the digit sample; 3 steps are enough here
FIELDS = set(Config.__dataclass_fields__)


def study_env(**extra) -> dict:
    """The user's environment without a cluster address or tracking URI of the caller's."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, **extra}


def run_study(script: str, tmp: Path, *flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, f"studies/{script}", "--quick", "--tracking-uri", f"sqlite:///{tmp}/mlflow.db",
               "--storage", str(tmp / "ray"), "--name", "t", *flags]
    done = subprocess.run(command, cwd=REPO, env=study_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{script} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def study_runs(uri: str, name: str):
    """(parent run, child runs) of study `name`, checking the parent/child wiring on the way."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name!r}"
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("stawm.role") == "study"]
    children = [r for r in runs if r.data.tags.get("stawm.role") == "trial"]
    assert len(parents) == 1 and len(parents) + len(children) == len(runs)
    parent = parents[0]
    assert parent.data.tags["stawm.study"] == name and parent.info.status == "FINISHED"
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    return client, parent, children


@pytest.mark.slow
def test_glimpse_size_quick_end_to_end(quick_study, tmp_path):
    # the shared session run: studies/glimpse_size.py --quick --epochs 2 --set max_steps=3 (see conftest)
    client, parent, children = study_runs(quick_study["uri"], "t")

    assert parent.data.params["seeds"] == "2" and parent.data.params["swept"] == "glimpse_size"
    assert parent.data.params["quick"] == "True" and parent.data.params["epochs"] == "2"
    assert sorted((c.data.params["glimpse_size"], c.data.params["seed"]) for c in children) == [
        ("6", "0"), ("6", "1"), ("8", "0"), ("8", "1")]
    assert len({c.data.tags["stawm.trial_id"] for c in children}) == 4
    for child in children:
        tags, params = child.data.tags, child.data.params
        assert child.info.status == "FINISHED"
        assert tags["stawm.study"] == "t" and tags["stawm.preset"] == "tiny" and tags["stawm.gpu"] == "cpu"
        assert tags["stawm.seed"] == params["seed"] and tags["stawm.git_commit"] and tags["stawm.host"]
        assert (tags["stability.ok"], tags["stability.flags"], tags["stability.static_ok"],
                tags["stability.diverged"]) == ("true", "", "true", "false")
        assert set(params) == FIELDS  # every config field, as Config.to_flat() gives them
        cfg = Config.from_flat(params)
        assert (cfg.dataset, cfg.epochs, cfg.max_steps) == ("mnist-sample", 2, 3)

        run_id = child.info.run_id
        for key in ("train_loss", "train_accuracy", "test_error", "delta", "eta", "theta", "max_w", "max_readout",
                    "epoch_seconds", "images_per_second", "lr", "peak_memory_mb", "best_test_error"):
            assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], key
        errors = [m.value for m in client.get_metric_history(run_id, "test_error")]
        best = [m.value for m in client.get_metric_history(run_id, "best_test_error")]
        assert all(0 <= e <= 1 for e in errors) and best == [errors[0], min(errors)]

        folder = Path(client.download_artifacts(run_id, "", str(tmp_path / run_id)))
        assert Config.from_flat(json.loads((folder / "config.json").read_text())) == cfg
        report = json.loads((folder / "stability.json").read_text())
        assert report["ok"] and not report["diverged"] and len(report["history"]) == 2

    lines = [line for line in quick_study["stdout"].splitlines() if "glimpse_size=" in line and "seed=" in line]
    assert len(lines) == 4 and all("stable" in line and "test_error=0." in line for line in lines)
    assert f"mlflow ui --backend-store-uri {quick_study['uri']}" in quick_study["stdout"]


@pytest.mark.slow
def test_memory_rates_quick_flags_unstable_trials_and_goes_on(tmp_path):
    run_study("memory_rates.py", tmp_path, "--seeds", "1", *STEP_CAP)
    client, parent, children = study_runs(f"sqlite:///{tmp_path}/mlflow.db", "t")
    assert parent.data.params["swept"] == "delta,eta,theta"
    by_rates = {(float(c.data.params["delta"]), float(c.data.params["eta"])): c for c in children}
    assert sorted(by_rates) == [(0.2, 0.4), (0.2, 1e38), (1.5, 0.4)]
    for child in children:  # flagged, never dropped: every run ends FINISHED with its epoch logged
        assert child.info.status == "FINISHED" and child.data.params["learnable_rates"] == "False"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")] == [1]

    stable = by_rates[(0.2, 0.4)].data.tags
    assert (stable["stability.ok"], stable["stability.flags"], stable["stability.diverged"]) == ("true", "", "false")

    oscillating = by_rates[(1.5, 0.4)]  # delta > 1: flagged before training, trained anyway
    tags = oscillating.data.tags
    assert tags["stability.static_ok"] == "false" and "decay" in tags["stability.flags"].split(",")
    assert tags["stability.ok"] == "false" and tags["stability.diverged"] == "false"
    assert "test_error" in oscillating.data.metrics

    diverged = by_rates[(0.2, 1e38)]  # overflows during its first epoch
    tags = diverged.data.tags
    assert tags["stability.diverged"] == "true" and "finite" in tags["stability.flags"].split(",")
    assert tags["stability.static_ok"] == "true" and tags["stability.ok"] == "false"
    folder = Path(client.download_artifacts(diverged.info.run_id, "", str(tmp_path / "diverged")))
    report = json.loads((folder / "stability.json").read_text())
    assert report["diverged"] and report["conditions"]["finite"]["first_failed_epoch"] == 1


# --- bad arguments: one line, exit status 2, before Ray starts --------------------------------------

BAD_ARGUMENTS = {  # through the script, as a user meets them: one argparse error, one preflight error
    "unknown preset": (["--preset", "nope"], ["--preset", "invalid choice", "mnist-class-8", "tiny"]),
    "unwritable storage": (["--storage", "{file}/ray"], ["storage path", "not writable"]),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """All the bad invocations at once (each is a Python start-up: in parallel they overlap)."""
    runs = {}
    for case, (flags, _) in BAD_ARGUMENTS.items():
        tmp = tmp_path_factory.mktemp("bad")
        (tmp / "a-file").write_text("not a folder")
        flags = [f.format(file=tmp / "a-file") for f in flags]
        command = [sys.executable, "studies/glimpse_size.py", "--quick", "--tracking-uri", f"sqlite:///{tmp}/mlflow.db",
                   "--storage", str(tmp / "ray"), *flags]
        env = study_env(RAY_TMPDIR=str(tmp / "raytmp"))  # where a Ray session would make its folder
        runs[case] = (tmp, subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True))
    results = {}
    for case, (tmp, process) in runs.items():
        stdout, stderr = process.communicate(timeout=180)
        results[case] = (tmp, process.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_fail_before_ray_starts(bad_runs, case):
    tmp, _, stdout, stderr = bad_runs[case]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glimpse_size.py: error: "), stderr
    for expected in BAD_ARGUMENTS[case][1]:
        assert expected in lines[0]
    assert not (tmp / "raytmp").exists(), "a Ray session was started"
    assert not (tmp / "ray" / "glimpse_size").exists()


def test_bad_arguments_exit_with_status_2(bad_runs):
    assert {case: run[1] for case, run in bad_runs.items()} == {case: 2 for case in BAD_ARGUMENTS}


BAD_SETTINGS = {  # the same validation in-process (no Python start-up each)
    "no seeds": (["--seeds", "0"], ["--seeds", "at least 1"]),
    "unreachable tracking": (["--tracking-uri", "http://127.0.0.1:{port}"], ["cannot reach MLflow tracking server"]),
    "unknown field": (["--set", "nope=1"], ["unknown config field", "nope"]),
    "not FIELD=VALUE": (["--set", "glimpses"], ["is not FIELD=VALUE"]),
    "bad value": (["--set", "glimpses=many"], ["glimpses='many' is not a valid int"]),
    "impossible glimpse": (["--set", "glimpse_size=4"], ["4x4", "glimpse_size"]),
    "bad epochs": (["--epochs", "0"], ["--epochs", "at least 1"]),
    "cuda without GPUs": (["--device", "cuda"], ["--gpus-per-trial"]),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_settings_are_one_line_errors_before_ray_starts(tmp_path, capsys, free_port, case):
    import ray

    from stawm import runner

    argv = ["--quick", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "ray"),
            *(flag.format(port=free_port) for flag in BAD_SETTINGS[case][0])]
    with pytest.raises(SystemExit) as exit:
        runner.parse_args("a study", preset="mnist-class-8", argv=argv)
    assert exit.value.code == 2 and not ray.is_initialized()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0]
    for expected in BAD_SETTINGS[case][1]:
        assert expected in lines[0]


def test_a_finished_study_is_not_overwritten_without_resume(tmp_path, capsys):
    from stawm import runner

    argv = ["--quick", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "ray"),
            "--name", "done"]
    args = runner.parse_args("a study", preset="mnist-class-8", argv=argv)
    assert args.config["dataset"] == "mnist-sample" and args.config["epochs"] == 1 and args.seeds == 2
    assert args.preset == "tiny" and args.device == "cpu" and args.storage == str(tmp_path / "ray")
    (tmp_path / "ray" / "done").mkdir(parents=True)
    (tmp_path / "ray" / "done" / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    with pytest.raises(SystemExit):
        runner.parse_args("a study", preset="mnist-class-8", argv=argv)
    assert "pass --resume" in capsys.readouterr().err
    assert runner.parse_args("a study", preset="mnist-class-8", argv=[*argv, "--resume"]).resume
