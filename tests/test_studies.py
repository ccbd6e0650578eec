"""Every study in small mode (--quick), run as a user runs them: a subprocess, real Ray, real MLflow (SQLite).

glimpse_size runs on its own local Ray, the path a user takes without RAY_ADDRESS (the session's
`glimpse_size_study`); the others are submitted in three lanes to one Ray cluster, one trial at a time each,
logging to one MLflow store (the session's `shared_ray_studies`, see conftest). Both start in the background when the
tests are collected. Every run is capped at 3 steps an epoch. The tests
check what lands in MLflow: one parent per experiment, its children nested under it, run counts per
stage, statuses, params and metrics. Bad arguments are checked in-process through a study's
`main(argv)`, and once through the script itself.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient

from processes import env_without
from stawm import schema
from stawm.config import Config
from stawm.train.checkpoints import member_weights
from stawm.train.data import load_data

REPO = Path(__file__).resolve().parents[1]
FIELDS = set(Config.__dataclass_fields__)
SEARCH_SPACE = ["delta", "eta", "theta", "glimpse_size", "glimpses"]


def study_main(script: str):
    """The `main` of studies/SCRIPT.py, imported as a user's `python studies/SCRIPT.py` would run it."""
    spec = importlib.util.spec_from_file_location(script, REPO / "studies" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def study_runs(uri: str, name: str):
    """(client, parent run, child runs) of study `name`, checking the parent/child wiring on the way:
    one parent, FINISHED, every other run of the experiment a trial nested under it."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name!r}"
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_STUDY]
    children = [r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_TRIAL]
    assert len(parents) == 1 and len(parents) + len(children) == len(runs)
    parent = parents[0]
    assert parent.data.tags[schema.STUDY] == name and parent.info.status == "FINISHED"
    for child in children:
        assert child.data.tags[schema.PARENT_RUN_ID] == parent.info.run_id
        assert child.data.tags[schema.STUDY] == name and child.info.status == "FINISHED"
    return client, parent, children


def epochs_logged(client: MlflowClient, run, key: str = schema.TRAIN_LOSS) -> list[int]:
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def trial_checkpoint(storage: Path, experiment: str, run) -> Path:
    """The engine's checkpoint of a one-epoch trial's run, in its Tune trial folder (named by the trial id)."""
    (folder,) = (storage / experiment).glob(f"trainable_{run.data.tags[schema.TRIAL_ID]}_*")
    return folder / "checkpoint_000000" / "checkpoint.pt"


# --- glimpse_size: a local Ray of its own ---------------------------------------------------------

@pytest.mark.slow
def test_glimpse_size_quick_end_to_end(glimpse_size_study, tmp_path):
    # the shared session run: studies/glimpse_size.py --quick --epochs 2 --set max_steps=3 (see conftest)
    client, parent, children = study_runs(glimpse_size_study["uri"], "t")

    assert parent.data.params[schema.SEEDS] == "2" and parent.data.params[schema.SWEPT] == "glimpse_size"
    assert parent.data.params["quick"] == "True" and parent.data.params["epochs"] == "2"
    assert sorted((c.data.params["glimpse_size"], c.data.params["seed"]) for c in children) == [
        ("6", "0"), ("6", "1"), ("8", "0"), ("8", "1")]
    assert len({c.data.tags[schema.TRIAL_ID] for c in children}) == 4
    for child in children:
        tags, params = child.data.tags, child.data.params
        assert tags[schema.PRESET] == "tiny" and tags[schema.GPU] == "cpu"
        assert tags[schema.SEED] == params["seed"] and tags[schema.GIT_COMMIT] and tags[schema.HOST]
        assert tuple(tags[t] for t in schema.STABILITY_TAGS) == ("true", "", "true", "false")
        assert set(params) == FIELDS  # every config field, as Config.to_flat() gives them
        cfg = Config.from_flat(params)
        assert (cfg.dataset, cfg.epochs, cfg.max_steps) == ("mnist-sample", 2, 3)

        run_id = child.info.run_id
        for key in (schema.TRAIN_LOSS, "train_accuracy", schema.TEST_ERROR, *schema.RATE_METRICS, "max_abs_w",
                    "max_readout", "readout_dead", "readout_saturated", "memory_bound_ratio", "epoch_seconds",
                    "images_per_second", "lr", "peak_memory_mb", schema.BEST_TEST_ERROR):
            assert epochs_logged(client, child, key) == [1, 2], key
        errors = [m.value for m in client.get_metric_history(run_id, schema.TEST_ERROR)]
        best = [m.value for m in client.get_metric_history(run_id, schema.BEST_TEST_ERROR)]
        assert all(0 <= e <= 1 for e in errors) and best == [errors[0], min(errors)]

        folder = Path(client.download_artifacts(run_id, "", str(tmp_path / run_id)))
        assert Config.from_flat(json.loads((folder / schema.CONFIG_ARTIFACT).read_text())) == cfg
        report = json.loads((folder / schema.STABILITY_ARTIFACT).read_text())
        assert report["ok"] and not report["diverged"] and len(report["history"]) == 2

    lines = [line for line in glimpse_size_study["stdout"].splitlines()  # the summary's, indented (not "ended  ...")
             if line.startswith("  ") and "glimpse_size=" in line and "seed=" in line]
    assert len(lines) == 4 and all("conditions met" in line and "test_error=0." in line for line in lines)
    assert f"mlflow ui --backend-store-uri {glimpse_size_study['uri']}" in glimpse_size_study["stdout"]


@pytest.mark.slow
def test_runs_read_as_mlflow_users_expect(glimpse_size_study):
    """Named runs, MLflow's own source tags, the dataset as an input, the weights linked, the experiment's kind."""
    client, parent, children = study_runs(glimpse_size_study["uri"], "t")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    experiment = client.get_experiment_by_name("t")
    assert experiment.tags[schema.EXPERIMENT_KIND] == schema.EXPERIMENT_KIND_TRAINING == "custom_model_development"
    assert parent.info.run_name == "t"
    note = parent.data.tags[schema.NOTE]  # the parent's description: the command, flags as given in conftest
    assert "studies/glimpse_size.py --quick --tracking-uri" in note and "--set max_steps=3" in note
    expected_data = load_data("mnist-sample")
    for run in (parent, *children):
        tags = run.data.tags
        assert (tags["mlflow.source.name"], tags["mlflow.source.type"]) == ("studies/glimpse_size.py", "LOCAL")
        assert tags["mlflow.source.git.commit"] == commit
    for child in children:
        params = child.data.params
        assert child.info.run_name == f"glimpse_size={params['glimpse_size']} seed={params['seed']}"
        (dataset,) = child.inputs.dataset_inputs
        assert (dataset.dataset.name, dataset.dataset.digest) == ("mnist-sample", expected_data.digest())
        assert [(t.key, t.value) for t in dataset.tags] == [("mlflow.data.context", "training")]
        weights = Path(child.data.tags[schema.CHECKPOINT])
        assert weights.name == "checkpoint.pt" and weights.is_file()
        state = torch.load(weights, weights_only=True)
        assert state["epoch"] == 2 and [Config.from_flat(c) for c in state["configs"]] == [Config.from_flat(params)]
    assert len({c.info.run_name for c in children}) == len(children) == 4
    # the configuration tag: one per glimpse size, both seeds under it (what MLflow's UI groups runs by)
    groups = {}
    for child in children:
        groups.setdefault(child.data.tags[schema.CONFIG], set()).add(child.data.params["seed"])
    assert groups == {"glimpse_size=6": {"0", "1"}, "glimpse_size=8": {"0", "1"}}
    # what computed each run: the versions installed here (the study ran in this environment), the lock's digest
    lock = hashlib.sha256((REPO / "requirements" / "lock.txt").read_bytes()).hexdigest()[:16]
    for run in (parent, *children):
        tags = run.data.tags
        assert {p: tags[f"stawm.env.{p}"] for p in ("torch", "ray", "mlflow", "optuna")} == {
            p: metadata.version(p) for p in ("torch", "ray", "mlflow", "optuna")}
        assert tags["stawm.env.python"] == platform.python_version() and tags["stawm.env.lock_sha256"] == lock
        assert schema.ENV_DEVICE_NAME not in tags  # trained on a CPU
        assert not [k for k in run.data.metrics if k.startswith("system/")]  # --system-metrics auto: off on a CPU


def test_a_trial_run_killed_before_its_dataset_was_logged_gets_it_once_on_retry(mlflow_server):
    from stawm.study import tracking

    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"dataset-once-{os.getpid()}")
    run_id = client.create_run(experiment).info.run_id  # what a first attempt killed while loading data leaves
    assert client.get_run(run_id).inputs.dataset_inputs == []
    data = load_data("mnist-sample")
    for _ in range(2):  # the retry, then a later one
        tracking.ensure_dataset(client, run_id, data)
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("mnist-sample", data.digest())]


def test_the_dataset_digest_follows_the_content_not_the_packing(tmp_path):
    import gzip

    # two folders with the same four files, one gzipped: one digest; a changed label: another
    sample = load_data("mnist-sample")
    images, labels = sample.train.images.numpy(), sample.train.labels.numpy()
    test_images, test_labels = sample.test.images.numpy(), sample.test.labels.numpy()
    digests = []
    for name, packed, flip in (("plain", False, False), ("gz", True, False), ("changed", False, True)):
        folder = tmp_path / name / "MNIST" / "raw"
        folder.mkdir(parents=True)
        train_labels = labels.copy()
        train_labels[0] = (train_labels[0] + 1) % 10 if flip else train_labels[0]
        for file, array in (("train-images-idx3-ubyte", images[:, 0]), ("train-labels-idx1-ubyte", train_labels),
                            ("t10k-images-idx3-ubyte", test_images[:, 0]), ("t10k-labels-idx1-ubyte", test_labels)):
            header = np.array([2051 if array.ndim == 3 else 2049, *array.shape], dtype=">u4").tobytes()
            content = header + array.astype(np.uint8).tobytes()
            (folder / (file + ".gz" if packed else file)).write_bytes(gzip.compress(content) if packed else content)
        digests.append(load_data("mnist", tmp_path / name, download=False).digest())
    assert digests[0] == digests[1] != digests[2]
    assert digests[0] == sample.digest()  # the same images and labels as the sample they were written from


# --- the other studies: one Ray cluster, one MLflow store -----------------------------------------

@pytest.mark.slow
def test_table1_quick_trains_each_selfsup_row_on_its_seeds_drawing_checkpoint(shared_ray_studies):
    assert "table1: 8 trials" in shared_ray_studies.stdout("table1")
    client, parent, children = study_runs(shared_ray_studies.uri, "table1")  # both stages under the one parent
    assert parent.data.params[schema.SWEPT] == "preset,task,glimpse_size,glimpses"
    by_task = {}
    for child in children:
        by_task.setdefault(child.data.params["task"], []).append(child)
    # stage 1: the two supervised rows and the drawing models, 2 seeds each; stage 2: one selfsup run per seed
    assert {task: len(runs) for task, runs in by_task.items()} == {"classify": 4, "draw": 2, "selfsup": 2}
    assert sorted(int(c.data.params["glimpse_size"]) for c in by_task["classify"]) == [8, 8, 28, 28]
    drawing = {c.data.params["seed"]: c for c in by_task["draw"]}
    assert sorted(drawing) == sorted(c.data.params["seed"] for c in by_task["selfsup"]) == ["0", "1"]

    weights = {seed: member_weights(trial_checkpoint(shared_ray_studies.storage, "table1", run))
               for seed, run in drawing.items()}
    for run in by_task["selfsup"]:
        seed, pretrained = run.data.params["seed"], Path(run.data.params["pretrained"])
        # its own seed's drawer
        assert pretrained == trial_checkpoint(shared_ray_studies.storage, "table1", drawing[seed])
        assert pretrained.is_file() and epochs_logged(client, run) == [1]
        assert schema.TEST_ERROR in run.data.metrics and schema.TEST_RECON_LOSS not in run.data.metrics
        # the frozen drawing model is that checkpoint's: every tensor but the classifier's and the rates unchanged
        trained = member_weights(trial_checkpoint(shared_ray_studies.storage, "table1-selfsup", run))
        frozen = [k for k in weights[seed] if not k.startswith(("classifier.", "memory."))]
        assert len(frozen) > 20 and all(torch.equal(trained[k], weights[seed][k]) for k in frozen)
        other = weights["1" if seed == "0" else "0"]
        assert not all(torch.equal(trained[k], other[k]) for k in frozen)


@pytest.mark.slow
def test_search_quick_repeats_each_suggestion_over_seeds_then_reruns_the_best_over_fresh_seeds(shared_ray_studies):
    shared_ray_studies.stdout("search")
    client, parent, children = study_runs(shared_ray_studies.uri, "search-search")  # stage 1: the search
    params = parent.data.params
    assert (params[schema.SWEPT], params[schema.SEEDS], params["samples"], params["top"]) == (
        ",".join(SEARCH_SPACE), "2", "2", "1")
    suggestions = {}
    for child in children:
        suggestions.setdefault(tuple(child.data.params[k] for k in SEARCH_SPACE), []).append(child)
    assert len(children) == 4 and len(suggestions) == 2
    for runs in suggestions.values():  # the Repeater's index is the seed: 0..k-1 for every suggestion
        assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
        assert all(r.data.params["validation_size"] == "500" and schema.VAL_ERROR in r.data.metrics for r in runs)
    means = {key: statistics.fmean(r.data.metrics[schema.VAL_ERROR] for r in runs) for key, runs in suggestions.items()}
    best = [key for key, mean in means.items() if mean == min(means.values())]

    # Optuna kept the search beside the MLflow store: one trial per suggestion, its value the mean over seeds
    storage = f"sqlite:///{Path(shared_ray_studies.uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    assert params["optuna_storage"] == storage
    for attempt in ("search", "search --resume"):
        shared_ray_studies.stdout(attempt)
        searched = optuna.load_study(study_name="search-search", storage=storage)
        assert [t.state for t in searched.trials] == [optuna.trial.TrialState.COMPLETE] * 2  # none added on resume
        for trial in searched.trials:
            key = tuple(str(trial.params[k]) for k in SEARCH_SPACE)
            assert trial.value == pytest.approx(means[key], abs=1e-9)
    assert len(study_runs(shared_ray_studies.uri, "search-search")[2]) == 4  # and no MLflow run doubled by the resume

    _, rerun_parent, rerun = study_runs(shared_ray_studies.uri, "search")  # stage 2: its own experiment and parent
    assert rerun_parent.info.run_id != parent.info.run_id
    assert sorted(r.data.params["seed"] for r in rerun) == ["100", "101"]  # fresh seeds, not the searched 0, 1
    for run in rerun:
        assert tuple(run.data.params[k] for k in SEARCH_SPACE) in best  # the lowest mean val_error over its seeds
        assert run.data.params["validation_size"] == "0"  # the whole training set, scored on the test set
        assert schema.TEST_ERROR in run.data.metrics and schema.VAL_ERROR not in run.data.metrics


def tune_reports(experiment: Path) -> dict[str, list[dict]]:
    """What Tune saw of each trial of a Ray experiment folder: its reports in order (the trial's result.json)."""
    reports = {}
    for path in experiment.glob("trainable_*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        reports[lines[0]["trial_id"]] = lines
    return reports


@pytest.mark.slow
def test_search_asha_stops_whole_configurations_on_their_seeds_mean(shared_ray_studies):
    # search.py --quick --asha --samples 3 --epochs 2 --asha-reduction-factor 2 (quick_studies.STUDIES)
    shared_ray_studies.stdout("search --asha")
    client, parent, children = study_runs(shared_ray_studies.uri, "search-asha-search")
    params = parent.data.params  # every number below comes from the flags the parent run recorded
    assert params["asha"] == "True"
    seeds, samples, epochs = int(params[schema.SEEDS]), int(params["samples"]), int(params["epochs"])
    grace, factor = int(params["asha_grace_period"]), float(params["asha_reduction_factor"])
    # ASHA's rungs (Ray's ASHAScheduler): epochs grace x factor^k, below max_t = epochs
    rungs = sorted({math.ceil(grace * factor**k) for k in range(epochs) if grace * factor**k < epochs})
    assert seeds > 1 and rungs, "the lane must give ASHA something to judge"

    trials = {}  # Tune trial id -> its MLflow runs, one per seed
    for child in children:
        trials.setdefault(child.data.tags[schema.TRIAL_ID], []).append(child)
    reports = tune_reports(shared_ray_studies.storage / "search-asha-search")
    assert len(trials) == samples and set(reports) == set(trials)  # one Tune trial per suggestion
    last_epoch, last_mean, mean_at = {}, {}, {}
    for trial_id, runs in trials.items():
        # every trial trained all the seeds: one run each, members 0..S-1, one configuration
        assert sorted(int(r.data.tags[schema.MEMBER]) for r in runs) == list(range(seeds))
        assert sorted(int(r.data.params["seed"]) for r in runs) == list(range(seeds))
        assert len({tuple(r.data.params[k] for k in SEARCH_SPACE) for r in runs}) == 1
        curves = [{m.step: m.value for m in client.get_metric_history(r.info.run_id, schema.VAL_ERROR)} for r in runs]
        last = max(curves[0])
        assert all(sorted(curve) == list(range(1, last + 1)) for curve in curves)  # all seeds to the same epoch
        # stopped early: every seed's run or none, only at a rung
        assert {r.data.tags.get(schema.STOPPED_EARLY) == schema.TRUE for r in runs} == {last < epochs}
        assert last == epochs or last in rungs
        # what Tune (and so ASHA) saw each epoch: the seeds' mean, one result for the whole configuration
        assert [r["training_iteration"] for r in reports[trial_id]] == list(range(1, last + 1))
        for report in reports[trial_id]:
            epoch = report["training_iteration"]
            assert report[schema.VAL_ERROR] == pytest.approx(statistics.fmean(c[epoch] for c in curves), abs=1e-9)
        mean_at[trial_id] = {r["training_iteration"]: r[schema.VAL_ERROR] for r in reports[trial_id]}
        last_epoch[trial_id], last_mean[trial_id] = last, mean_at[trial_id][last]

    # ASHA's decisions replayed on those means (--max-concurrent 1: trials reach a rung in the order they started):
    # at a rung a configuration stops if its mean is worse than the (1 - 1/factor) quantile of the ones before it
    order = sorted(trials, key=lambda t: min(r.info.start_time for r in trials[t]))
    recorded = {rung: [] for rung in rungs}
    for trial_id in order:
        reward = {r["training_iteration"]: -r[schema.VAL_ERROR] for r in reports[trial_id]}  # mode="min"
        expected = epochs
        for rung in rungs:
            before = list(recorded[rung])
            recorded[rung].append(reward[rung])
            if before and reward[rung] < np.nanpercentile(before, (1 - 1 / factor) * 100):
                expected = rung
                break
        assert last_epoch[trial_id] == expected, trial_id

    # Optuna: one trial per suggestion (not per seed), told the seeds' mean each epoch and at the end
    storage = f"sqlite:///{Path(shared_ray_studies.uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    searched = optuna.load_study(study_name="search-asha-search", storage=storage)
    assert len(searched.trials) == samples
    by_config = {tuple(trials[t][0].data.params[k] for k in SEARCH_SPACE): t for t in trials}
    for trial in searched.trials:
        trial_id = by_config[tuple(str(trial.params[k]) for k in SEARCH_SPACE)]
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.value == pytest.approx(last_mean[trial_id], abs=1e-9)
        for epoch, value in trial.intermediate_values.items():  # its epochs' means, as Tune passed them on
            assert epoch <= last_epoch[trial_id] and value == pytest.approx(mean_at[trial_id][epoch], abs=1e-9)

    # stage 2: the lowest last mean, rerun over fresh seeds
    best = min(last_mean, key=last_mean.get)
    _, _, rerun = study_runs(shared_ray_studies.uri, "search-asha")
    assert sorted(int(r.data.params["seed"]) for r in rerun) == list(range(100, 100 + seeds))
    for run in rerun:
        assert tuple(run.data.params[k] for k in SEARCH_SPACE) == tuple(trials[best][0].data.params[k]
                                                                         for k in SEARCH_SPACE)
        assert epochs_logged(client, run) == list(range(1, epochs + 1)) and schema.TEST_ERROR in run.data.metrics


@pytest.mark.slow
def test_glimpse_count_quick_then_a_second_seed_for_each_n(shared_ray_studies):
    """Launched with one seed, then resumed with --seeds 2: each N gains exactly its seed-1 run, in a Ray experiment of
    its own, under the same parent; the seed-0 runs are left as they were (never reopened)."""
    shared_ray_studies.stdout("glimpse_count")
    added = shared_ray_studies.stdout("glimpse_count --seeds 2 --resume")
    assert "adding seeds 1..1 to every configuration" in added
    client, parent, children = study_runs(shared_ray_studies.uri, "glimpse_count")
    assert parent.data.params[schema.SWEPT] == "glimpses" and parent.data.params[schema.SEEDS] == "1"  # as first run
    assert parent.data.tags[schema.SEEDS_NOW] == "2"
    assert parent.data.tags[schema.SEEDS_ADDED] == "1-1:glimpse_count-seeds1-1"
    assert sorted((int(c.data.params["glimpses"]), int(c.data.params["seed"])) for c in children) == [
        (2, 0), (2, 1), (4, 0), (4, 1)]
    first = [c for c in children if c.data.params["seed"] == "0"]
    second = [c for c in children if c.data.params["seed"] == "1"]
    assert max(c.info.end_time for c in first) < min(c.info.start_time for c in second)
    assert (shared_ray_studies.storage / "glimpse_count-seeds1-1").is_dir()
    for child in children:
        assert epochs_logged(client, child) == [1] and child.info.status == "FINISHED"
        assert child.data.tags[schema.STABILITY_OK] == "true" and 0 <= child.data.metrics[schema.TEST_ERROR] <= 1


@pytest.mark.slow
def test_learnable_rates_quick_learns_the_rates_only_when_asked(shared_ray_studies):
    shared_ray_studies.stdout("learnable_rates")
    client, parent, children = study_runs(shared_ray_studies.uri, "learnable_rates")
    assert parent.data.params[schema.SWEPT] == "learnable_rates,delta,eta,theta"
    by_mode = {child.data.params["learnable_rates"]: child for child in children}
    assert sorted(by_mode) == ["False", "True"] and len(children) == 2
    for learnable, child in by_mode.items():
        start = {name: float(child.data.params[name]) for name in schema.RATE_METRICS}
        assert start == {"delta": 0.2, "eta": 0.4, "theta": 0.5}  # the paper's initialisation
        end = {name: child.data.metrics[name] for name in schema.RATE_METRICS}  # the rates after the epoch
        as_stored = {name: float(np.float32(value)) for name, value in start.items()}  # a float32 buffer
        if learnable == "False":
            assert end == as_stored
        else:
            assert all(end[name] != as_stored[name] for name in end), end


@pytest.mark.slow
def test_memory_rates_quick_flags_unstable_trials_and_goes_on(shared_ray_studies, tmp_path):
    shared_ray_studies.stdout("memory_rates")
    client, parent, children = study_runs(shared_ray_studies.uri, "memory_rates")
    assert parent.data.params[schema.SWEPT] == "delta,eta,theta"
    by_rates = {(float(c.data.params["delta"]), float(c.data.params["eta"])): c for c in children}
    assert sorted(by_rates) == [(0.2, 0.4), (0.2, 1e38), (1.5, 0.4)]
    for child in children:  # flagged, never dropped: every run ends FINISHED with its epoch logged
        assert child.data.params["learnable_rates"] == "False" and epochs_logged(client, child) == [1]

    stable = by_rates[(0.2, 0.4)].data.tags
    assert (stable[schema.STABILITY_OK], stable[schema.STABILITY_FLAGS], stable[schema.STABILITY_DIVERGED]) == (
        "true", "", "false")

    oscillating = by_rates[(1.5, 0.4)]  # delta > 1: flagged before training, trained anyway
    tags = oscillating.data.tags
    assert tags[schema.STABILITY_STATIC_OK] == "false" and "decay" in tags[schema.STABILITY_FLAGS].split(",")
    assert tags[schema.STABILITY_OK] == "false" and tags[schema.STABILITY_DIVERGED] == "false"
    assert schema.TEST_ERROR in oscillating.data.metrics

    diverged = by_rates[(0.2, 1e38)]  # overflows during its first epoch
    tags = diverged.data.tags
    # an outcome, not a condition: its rates meet every condition, so it is not flagged
    assert tags[schema.STABILITY_DIVERGED] == "true" and tags[schema.STABILITY_FLAGS] == ""
    assert tags[schema.STABILITY_STATIC_OK] == "true" and tags[schema.STABILITY_OK] == "true"
    folder = Path(client.download_artifacts(diverged.info.run_id, "", str(tmp_path / "diverged")))
    report = json.loads((folder / schema.STABILITY_ARTIFACT).read_text())
    assert report["diverged"] and report["diverged_epoch"] == 1 and "finite" not in report["conditions"]


# --- bad arguments: one line, exit status 2, before Ray starts --------------------------------------

def test_a_bad_argument_through_the_script_is_one_line_before_ray_starts(tmp_path):
    # the one subprocess: the line names the script, and no Ray session folder appears
    command = [sys.executable, "studies/glimpse_size.py", "--quick", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
               "--storage", str(tmp_path / "ray"), "--preset", "nope"]
    env = {**env_without("RAY_ADDRESS", "MLFLOW_TRACKING_URI"),
           "RAY_TMPDIR": str(tmp_path / "raytmp")}  # where a Ray session would make its folder
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("glimpse_size.py: error: "), done.stderr
    for expected in ("--preset", "invalid choice", "mnist-class-8", "tiny"):
        assert expected in lines[0]
    assert not (tmp_path / "raytmp").exists(), "a Ray session was started"
    assert not (tmp_path / "ray" / "glimpse_size").exists()


BAD_SETTINGS = {  # through a study's main(argv), in-process (no Python start-up each)
    "unwritable storage": (["--storage", "{file}/ray"], ["storage path", "not writable"]),
    "no seeds": (["--seeds", "0"], ["--seeds", "at least 1"]),
    "unreachable tracking": (["--tracking-uri", "http://127.0.0.1:{port}"], ["cannot reach MLflow tracking server"]),
    "unknown field": (["--set", "nope=1"], ["unknown config field", "nope"]),
    "not FIELD=VALUE": (["--set", "glimpses"], ["is not FIELD=VALUE"]),
    "bad value": (["--set", "glimpses=many"], ["glimpses='many' is not a valid int"]),
    "impossible glimpse": (["--set", "glimpse_size=4"], ["4x4", "glimpse_size"]),
    "bad epochs": (["--epochs", "0"], ["--epochs", "at least 1"]),
    "negative retries": (["--max-failures", "-1"], ["--max-failures", "at least 0, got -1"]),
    "cuda without GPUs": (["--device", "cuda"], ["--gpus-per-trial"]),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_settings_are_one_line_errors_before_ray_starts(tmp_path, capsys, free_port, case):
    import ray

    (tmp_path / "a-file").write_text("not a folder")
    argv = ["--quick", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "ray"),
            "--name", "bad", *(flag.format(port=free_port, file=tmp_path / "a-file") for flag in BAD_SETTINGS[case][0])]
    with pytest.raises(SystemExit) as exit:
        study_main("glimpse_size")(argv)
    assert exit.value.code == 2 and not ray.is_initialized()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0]
    for expected in BAD_SETTINGS[case][1]:
        assert expected in lines[0]
    assert not (tmp_path / "ray" / "bad").exists()


def test_a_finished_study_is_not_overwritten_without_resume(tmp_path, capsys):
    from stawm.study import runner

    argv = ["--quick", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "ray"),
            "--name", "done"]
    args = runner.parse_args("a study", preset="mnist-class-8", argv=argv)
    assert args.config["dataset"] == "mnist-sample" and args.config["epochs"] == 1 and args.seeds == 2
    assert args.preset == "tiny" and args.device == "auto" and args.storage == str(tmp_path / "ray")
    (tmp_path / "ray" / "done").mkdir(parents=True)
    (tmp_path / "ray" / "done" / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    with pytest.raises(SystemExit):
        study_main("glimpse_size")(argv)
    assert "pass --resume" in capsys.readouterr().err
    assert runner.parse_args("a study", preset="mnist-class-8", argv=[*argv, "--resume"]).resume


def test_authors_code_flag_starts_every_configuration_from_the_authors_script(tmp_path):
    from stawm.study import runner

    argv = ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "ray"),
            "--set", "dataset=mnist-sample", "--preset", "mnist-class-28"]
    paper = runner.parse_args("a study", preset="mnist-class-8", argv=argv)
    theirs = runner.parse_args("a study", preset="mnist-class-8", argv=[*argv, "--authors-code"])
    assert (paper.config["glimpses"], paper.config["lr_schedule"], paper.config["authors_code"]) == (10, "paper", False)
    assert (theirs.config["glimpses"], theirs.config["lr_schedule"], theirs.config["authors_code"]) == (
        8, "exponential", True)
    # a row from another preset (table1's) gets that preset's script: the draw-8 decoder runs stride 1 first
    assert runner.variant(theirs, "mnist-draw-8")["decoder_order"] == "forward"
    assert "decoder_order" not in runner.variant(paper, "mnist-draw-8")
    explicit = runner.parse_args("a study", preset="mnist-class-8",
                                 argv=[*argv, "--authors-code", "--set", "glimpses=10"])
    assert explicit.config["glimpses"] == 10  # --set still has the last word


@pytest.mark.parametrize("case", ["exists", "bad url"])
def test_search_refuses_an_optuna_study_it_would_mix_into_in_one_line(tmp_path, capsys, case):
    import ray

    storage = f"sqlite:///{tmp_path}/optuna.db"
    if case == "exists":
        optuna.create_study(study_name="s-search", storage=storage)  # an earlier search of this name
    else:
        storage = "nosuchdb://nowhere/optuna"
    argv = ["--quick", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "ray"),
            "--name", "s", "--optuna-storage", storage]
    with pytest.raises(SystemExit) as stop:
        study_main("search")(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and not ray.is_initialized()
    if case == "exists":
        assert f"Optuna study 's-search' already exists in {storage}: pass --resume" in err
    else:
        assert ": error: --optuna-storage nosuchdb://nowhere/optuna: NoSuchModuleError" in err
