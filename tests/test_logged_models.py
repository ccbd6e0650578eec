"""Each member's weights as MLflow LoggedModels (stawm.study.models): its final epoch's and, when another epoch's
test error was lower, its best one's, linked to its run and to that epoch's metrics.

- the best weights, on files alone: kept only when a member's test error improves, read back for the right
  member, and a copy cut short is told;
- a trial through `RunRecorder` on the session's `mlflow server` (REST), hand-built records over real STAWM
  weights: a member that stops stuck logs its final model as it stops, a diverged one only its best and says why,
  a retried call logs nothing twice, and a model that cannot be logged leaves one line and a FINISHED run;
- two fused members trained for real, the trial restarted in a fresh recorder from a copy of its checkpoint
  folder (as Tune restores it), the server shut while the models are logged: each member gets its own models,
  the best weights survive the restart, the runs' histories hold every epoch once;
- the session's quick glimpse_size study (SQLite store, through Ray): one final model per run, the best ones where
  an earlier epoch did better, ranked by test error as the runs' own histories rank them, and loading one back
  predicts as the weights in its trial's checkpoint.
Every expected number comes from the runs' metric histories or the checkpoints, never from the code under test.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
import uuid
from pathlib import Path

import mlflow.pytorch
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from ray import tune

from stawm import preset, schema
from stawm.config import Config
from stawm.model import STAWM
from stawm.study import models, tracking
from stawm.study.context import TrialContext
from stawm.study.recorder import RunRecorder
from stawm.study.tune_checkpoints import BEST_WEIGHTS, restore_newest, save_state
from stawm.train import CHECKPOINT, train
from stawm.train.checkpoints import member_weights, save_checkpoint
from stawm.train.data import DataBundle, load_data

REPORT = {"ok": True, "failed": [], "static_ok": True, "diverged": False}


def base(**changes) -> Config:
    return preset("tiny", **{**dict(epochs=3, max_steps=1, dropout=0.0, query_dropout=0.0, augment="none"),
                             **changes})


def stacked(*members: dict) -> dict:
    """Members' state dicts as a checkpoint's weights: a leading member axis."""
    return {name: torch.stack([m[name] for m in members]) for name in members[0]}


def write_checkpoint(folder: Path, epoch: int, weights: dict) -> None:
    save_checkpoint(folder / CHECKPOINT, {"epoch": epoch, "members": {"weights": weights}})


def outputs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return model(images).log_probs


def net(cfg: Config, weights: dict) -> STAWM:
    model = STAWM(cfg)
    model.load_state_dict(weights)
    return model.eval()


IMAGES = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))  # the fixed batch predicted on


# --- the best weights, on files alone ----------------------------------------------------------------------

def test_best_weights_are_kept_only_when_a_members_test_error_improves(tmp_path):
    def epoch(n: int, errors: list[float | None], value: float) -> list[dict]:
        write_checkpoint(tmp_path, n, {"w": torch.full((2, 3), value) + torch.arange(2.0)[:, None]})
        records = [{"epoch": n, **({} if e is None else {schema.TEST_ERROR: e})} for e in errors]
        models.keep_best(tmp_path, records)
        return records

    epoch(1, [0.5, None], 10.0)  # member 1 measured nothing (a diverged epoch has no evaluation)
    best = models.read_best(tmp_path)
    assert list(best) == [0] and best[0]["epoch"] == 1 and best[0]["weights"]["w"].tolist() == [10.0] * 3
    assert best[0]["weights"]["w"].untyped_storage().nbytes() == 3 * 4  # its own row, not the whole stack
    epoch(2, [0.6, 0.4], 20.0)
    best = models.read_best(tmp_path)
    assert (best[0]["epoch"], best[1]["epoch"]) == (1, 2)
    assert best[1]["weights"]["w"].tolist() == [21.0] * 3  # member 1's row of epoch 2
    written = (tmp_path / BEST_WEIGHTS).stat().st_mtime_ns
    epoch(3, [0.5, 0.4], 30.0)  # ties: the earlier epoch stays, nothing is written
    assert (tmp_path / BEST_WEIGHTS).stat().st_mtime_ns == written

    chosen, skipped = models.member_models(tmp_path, 0, final_epoch=3, diverged=False)
    assert [(kind, epoch) for kind, epoch, _ in chosen] == [(schema.MODEL_FINAL, 3), (schema.MODEL_BEST, 1)]
    assert chosen[0][2]["w"].tolist() == [30.0] * 3 and not skipped
    chosen, _ = models.member_models(tmp_path, 1, final_epoch=2, diverged=False)  # its best is its last epoch
    assert [(kind, epoch) for kind, epoch, _ in chosen] == [(schema.MODEL_FINAL, 2)]
    chosen, skipped = models.member_models(tmp_path, 1, final_epoch=3, diverged=True)
    assert [(kind, epoch) for kind, epoch, _ in chosen] == [(schema.MODEL_BEST, 2)]
    assert skipped == ["final: diverged at epoch 3 (not evaluated)"]
    assert models.model_name("lr=0.001 seed=1", schema.MODEL_BEST) == "lr=0_001 seed=1 best"


def test_a_checkpoint_whose_best_weights_were_cut_short_is_not_resumed_from(tmp_path):
    trial = tmp_path / "trial"
    for index, epoch in enumerate((1, 2)):
        folder = trial / f"checkpoint_{index:06d}"
        folder.mkdir(parents=True)
        write_checkpoint(folder, epoch, {"w": torch.zeros(1, 3)})
        models.keep_best(folder, [{"epoch": epoch, schema.TEST_ERROR: 1.0 / epoch}])
        save_state(folder, epoch, [{}])
    newest = trial / "checkpoint_000001" / BEST_WEIGHTS
    newest.write_bytes(newest.read_bytes()[:-10])  # a copy the kill interrupted
    work = tmp_path / "work"
    work.mkdir()
    checkpoint, state = restore_newest(tune.Checkpoint.from_directory(str(trial / "checkpoint_000000")), work)
    assert state["epoch"] == 1 and models.read_best(work)[0]["epoch"] == 1
    assert not (trial / "checkpoint_000001" / BEST_WEIGHTS).exists()  # emptied, with the rest of that folder


# --- a trial through the recorder, on the session's tracking server ------------------------------------------

def study_on(uri: str, swept: tuple[str, ...] = ()) -> tuple[MlflowClient, TrialContext]:
    """A fresh experiment and parent run on the server (its store is the session's: one name per test)."""
    client, name = MlflowClient(uri), f"models-{uuid.uuid4().hex[:8]}"
    experiment_id = tracking.experiment(client, name, uri)
    parent = tracking.create_study_run(client, experiment_id, name, {schema.SEEDS: 2}, "studies/x.py", "abc", False)
    return client, TrialContext(study=name, experiment_id=experiment_id, parent_run_id=parent, tracking_uri=uri,
                                swept=swept)


def record(epoch: int, error: float | None, stop: str | None = None) -> dict:
    """A member's record as the loop yields it: error None is a diverged epoch (no evaluation)."""
    measured = {} if error is None else {schema.TEST_ERROR: error}
    diverged = error is None
    return {"epoch": epoch, schema.TRAIN_LOSS: math.nan if diverged else 2.3, **measured, "max_abs_w": 0.5,
            "theta": 0.5, "diverged": diverged, "stop_reason": "diverged" if diverged else stop,
            "stability": {**REPORT, "diverged": diverged}}


def member_runs(client: MlflowClient, context: TrialContext) -> dict[int, object]:
    runs = client.search_runs([context.experiment_id], schema.tag_filter({schema.PARENT_RUN_ID: context.parent_run_id}))
    return {int(run.data.tags.get(schema.MEMBER, 0)): run for run in runs}


def run_models(client: MlflowClient, run) -> dict[str, object]:
    """The run's models by kind."""
    found = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    kinds = [model.tags[schema.MODEL_KIND] for model in found]
    assert len(kinds) == len(set(kinds)), kinds  # one of each kind: never logged twice
    return {model.tags[schema.MODEL_KIND]: model for model in found}


def steps_of_every_metric(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith(schema.SYSTEM_METRICS_PREFIX)]
    return {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in keys}


@pytest.mark.slow  # a few seconds of MLflow calls on a loaded machine
def test_stopped_members_log_their_models_as_they_stop_and_one_that_fails_leaves_a_line(mlflow_server, tmp_path,
                                                                                        capsys, monkeypatch):
    """Member 0 diverges at epoch 2 (best at 1), member 2 stops stuck after epoch 1, member 1 trains on and its
    best weights cannot be read at the end."""
    client, context = study_on(mlflow_server)
    cfgs = [base(seed=0), base(seed=1), base(seed=2)]
    folder = tmp_path / "trial"
    folder.mkdir()
    torch.manual_seed(0)
    first = [STAWM(cfg).state_dict() for cfg in cfgs]
    recorder = RunRecorder(context, cfgs, "t0001", "trainable_t0001", {schema.GPU: "cpu"})
    with recorder:
        recorder.resume(None, None, folder)
        write_checkpoint(folder, 1, stacked(*first))
        for epoch, records in ((1, [record(1, 0.5), record(1, 0.25), record(1, 0.75, stop="stuck")]),
                               (2, [record(2, None), record(2, 0.125), None])):
            if epoch == 2:  # member 0's weights went non-finite with its loss; member 2's stay as it stopped
                nan = {n: t * math.nan if t.is_floating_point() else t for n, t in first[0].items()}
                write_checkpoint(folder, 2, stacked(nan, first[1], first[2]))
            models.keep_best(folder, records)
            recorder.epoch(records)
            recorder.checkpoint(str(folder / CHECKPOINT))
            if epoch == 1:  # member 2 stopped: its models logged and its run closed, the others train on
                stuck = member_runs(client, context)[2]
                assert stuck.info.status == "FINISHED" and list(run_models(client, stuck)) == [schema.MODEL_FINAL]
        runs = member_runs(client, context)
        assert runs[0].info.status == "FINISHED" and runs[1].info.status == "RUNNING"  # 0 stopped, logged, closed
        shutil.copytree(folder, tmp_path / "kept")
        (folder / BEST_WEIGHTS).write_bytes(b"not a torch file")  # member 1's best cannot be read now
        recorder.finish()
    runs = member_runs(client, context)
    assert {k: run.info.status for k, run in runs.items()} == {0: "FINISHED", 1: "FINISHED", 2: "FINISHED"}
    (final,) = run_models(client, runs[2]).values()  # its best epoch is its last: one model
    assert final.tags[schema.MODEL_EPOCH] == "1" and schema.MODELS_SKIPPED not in runs[2].data.tags

    diverged = run_models(client, runs[0])
    assert list(diverged) == [schema.MODEL_BEST]
    assert diverged[schema.MODEL_BEST].tags[schema.MODEL_EPOCH] == "1"
    assert runs[0].data.tags[schema.MODELS_SKIPPED] == "final: diverged at epoch 2 (not evaluated)"
    metrics = {m.key: m.value for m in diverged[schema.MODEL_BEST].metrics}
    assert metrics[schema.TEST_ERROR] == 0.5 and metrics[schema.TRAIN_LOSS] == 2.3
    assert steps_of_every_metric(client, runs[0].info.run_id)[schema.TRAIN_LOSS] == [1, 2]  # the NaN one kept once
    again = models.log_member_models(client, runs[0].info.run_id, cfgs[0], tmp_path / "kept", 0, 2, True)
    assert again == [diverged[schema.MODEL_BEST].model_id]  # a retried call finds it: not logged twice
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # where models:/ID is looked up
    loaded = mlflow.pytorch.load_model(f"models:/{again[0]}")
    assert torch.equal(outputs(loaded, IMAGES), outputs(net(cfgs[0], first[0]), IMAGES))  # epoch 1's, finite
    loaded = mlflow.pytorch.load_model(f"models:/{final.model_id}")
    assert torch.equal(outputs(loaded, IMAGES), outputs(net(cfgs[2], first[2]), IMAGES))

    assert run_models(client, runs[1]) == {}
    lines = [line for line in capsys.readouterr().out.splitlines() if "not logged" in line]
    assert len(lines) == 1 and lines[0].startswith("trial trainable_t0001: the models of seed 1 not logged (")
    assert lines[0].endswith("); its run closes without them")


# --- fused members trained for real, through a restart and an outage -----------------------------------------

@pytest.fixture(scope="module")
def data() -> DataBundle:
    full = load_data("mnist-sample")
    return DataBundle(train=full.train.subset(torch.arange(64)), val=None, test=full.test.subset(torch.arange(64)),
                      num_classes=full.num_classes, mean=full.mean, std=full.std)


# The test errors each epoch reports (set on the real records): member 0 is best at epoch 2, member 1 at epoch 1,
# both before the last (3), and the trial restarts after epoch 2: both best epochs are before the restart.
ERRORS = {1: [0.5, 0.25], 2: [0.375, 0.5], 3: [0.625, 0.75]}
BEST_EPOCHS = [2, 1]
OUTAGE_S = 6.0  # MLflow's client rides out ~3 s itself (outbox.CLIENT_RETRIES); past that, the recorder waits


def trained_epochs(recorder: RunRecorder, cfgs: list[Config], data: DataBundle, folder: Path, resume: bool,
                   weights: dict) -> None:
    """What the trainable does each epoch, the test errors set from ERRORS; each member's weights kept by epoch."""
    for records in train(cfgs, data=data, checkpoint_dir=folder, resume=resume):
        for k, member in enumerate(records):
            member[schema.TEST_ERROR] = ERRORS[member["epoch"]][k]
            weights[member["epoch"], k] = member_weights(folder / CHECKPOINT, k)
        models.keep_best(folder, records)
        recorder.epoch(records)
        save_state(folder, recorder.last_epoch, *recorder.saved_state())
        recorder.checkpoint(str(folder / CHECKPOINT))
        if records[0]["epoch"] == 2 and not resume:
            return  # the process dies here: its runs stay RUNNING, its checkpoint folder is all that is left


@pytest.mark.slow  # seconds of real training and of an outage
def test_fused_members_log_their_own_models_through_a_restart_and_an_outage(mlflow_server, gate, data, tmp_path,
                                                                            capsys, monkeypatch):
    client, context = study_on(gate.uri, swept=("lr",))
    cfgs = [base(seed=0), base(seed=1, lr=2e-3)]
    weights = {}
    first = RunRecorder(context, cfgs, "t0001", "trainable_t0001", {schema.GPU: "cpu"})
    first.resume(None, None, tmp_path / "first")
    trained_epochs(first, cfgs, data, tmp_path / "first", resume=False, weights=weights)
    stored = tmp_path / "storage" / "checkpoint_000001"  # what Tune kept of it
    shutil.copytree(tmp_path / "first", stored)
    shutil.rmtree(tmp_path / "first")

    work = tmp_path / "second"
    work.mkdir()
    checkpoint, saved = restore_newest(tune.Checkpoint.from_directory(str(stored)), work)
    recorder = RunRecorder(context, cfgs, "t0001", "trainable_t0001", {schema.GPU: "cpu"})
    recorder.server.retry_s = 0.5
    assert all(member.resumed for member in recorder.members)
    with recorder:
        recorder.resume(saved, str(stored / CHECKPOINT), work)
        trained_epochs(recorder, cfgs, data, work, resume=True, weights=weights)
        gate.shut()  # the server stops answering as the models are logged, for longer than MLflow's own retries
        threading.Timer(OUTAGE_S, gate.open).start()
        started = time.monotonic()
        recorder.finish()
    assert time.monotonic() - started >= OUTAGE_S
    out = capsys.readouterr().out
    assert "trial trainable_t0001 waits to log its models" in out and "back after" in out

    client = MlflowClient(mlflow_server)
    runs = member_runs(client, context)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # where models:/ID is looked up
    for k, cfg in enumerate(cfgs):
        run = runs[k]
        assert run.info.status == "FINISHED" and schema.MODELS_SKIPPED not in run.data.tags
        assert all(steps == [1, 2, 3] for steps in steps_of_every_metric(client, run.info.run_id).values())
        found = run_models(client, run)
        assert set(found) == {schema.MODEL_FINAL, schema.MODEL_BEST}
        lr = tracking.value_text(cfg.lr).replace(".", "_")  # "lr=0.003 seed=0" is the run's name
        for kind, epoch in ((schema.MODEL_FINAL, 3), (schema.MODEL_BEST, BEST_EPOCHS[k])):
            model = found[kind]
            assert model.name == f"lr={lr} seed={cfg.seed} {models.NAMES[kind]}"
            assert model.status == LoggedModelStatus.READY
            assert model.source_run_id == run.info.run_id and model.experiment_id == context.experiment_id
            assert {key: model.tags[key] for key in (schema.STUDY, schema.SEED, schema.TRIAL_ID, schema.MEMBER,
                                                     schema.MODEL_EPOCH)} == {
                schema.STUDY: context.study, schema.SEED: str(cfg.seed), schema.TRIAL_ID: "t0001",
                schema.MEMBER: str(k), schema.MODEL_EPOCH: str(epoch)}
            assert Config.from_flat(model.params) == cfg
            history = {key: next(m.value for m in client.get_metric_history(run.info.run_id, key) if m.step == epoch)
                       for key in steps_of_every_metric(client, run.info.run_id)}
            assert {m.key: m.value for m in model.metrics} == history
            assert history[schema.TEST_ERROR] == ERRORS[epoch][k]
            loaded = mlflow.pytorch.load_model(f"models:/{model.model_id}")
            assert torch.equal(outputs(loaded, IMAGES), outputs(net(cfg, weights[epoch, k]), IMAGES))
        outputs_link = client.get_run(run.info.run_id).outputs.model_outputs
        assert sorted(o.step for o in outputs_link) == sorted([3, BEST_EPOCHS[k]])


# --- the session's quick study (SQLite store, trials through Ray) --------------------------------------------

@pytest.mark.slow  # the quick study's fixture is the full suite's
def test_the_quick_studys_models_rank_as_its_runs_histories_and_load_as_its_checkpoints(glimpse_size_study,
                                                                                         monkeypatch):
    uri = glimpse_size_study["uri"]
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(glimpse_size_study["name"]).experiment_id
    runs = [run for run in client.search_runs([experiment_id])
            if run.data.tags.get(schema.ROLE) == schema.ROLE_TRIAL]
    assert len(runs) == 4
    expected = {}  # (run id, epoch) -> test error, from the runs' histories alone
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for run in runs:
        run_id = run.info.run_id
        assert all(steps == [1, 2] for steps in steps_of_every_metric(client, run_id).values())  # none doubled
        errors = {m.step: m.value for m in client.get_metric_history(run_id, schema.TEST_ERROR)}
        expected[run_id, 2] = errors[2]
        if errors[1] < errors[2]:
            expected[run_id, 1] = errors[1]
        found = run_models(client, run)
        assert {(kind, int(model.tags[schema.MODEL_EPOCH])) for kind, model in found.items()} == (
            {(schema.MODEL_FINAL, 2)} | ({(schema.MODEL_BEST, 1)} if (run_id, 1) in expected else set()))
        assert found[schema.MODEL_FINAL].name == f"{run.info.run_name} final"
        assert found[schema.MODEL_FINAL].tags[schema.SEED] == run.data.tags[schema.SEED]
        cfg = Config.from_flat(run.data.params)
        checkpoint = Path(run.data.tags[schema.CHECKPOINT])  # the trial's newest checkpoint, as Tune stored it
        final = mlflow.pytorch.load_model(f"models:/{found[schema.MODEL_FINAL].model_id}")
        assert torch.equal(outputs(final, IMAGES), outputs(net(cfg, member_weights(checkpoint)), IMAGES))
        if schema.MODEL_BEST in found:
            best = mlflow.pytorch.load_model(f"models:/{found[schema.MODEL_BEST].model_id}")
            kept = torch.load(checkpoint.parent / BEST_WEIGHTS, weights_only=True)["members"][0]["weights"]
            assert torch.equal(outputs(best, IMAGES), outputs(net(cfg, kept), IMAGES))

    ranked = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list",
                                         order_by=[{"field_name": f"metrics.{schema.TEST_ERROR}", "ascending": True}])
    ranked_errors = [next(m.value for m in model.metrics if m.key == schema.TEST_ERROR) for model in ranked]
    assert {(m.source_run_id, int(m.tags[schema.MODEL_EPOCH])): e for m, e in zip(ranked, ranked_errors)} == expected
    assert ranked_errors == sorted(expected.values())  # the first is the study's best, as its histories say
    assert "not logged (" not in glimpse_size_study["stdout"]  # no trial gave up on a model
