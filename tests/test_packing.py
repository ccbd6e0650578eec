"""Packing in studies: seeds fused into one Tune trial (--fuse-seeds), GPU shares from a measured peak.

- the share arithmetic, by hand (the probe that measures the peak needs a GPU: not run here);
- the trainable on fused seeds, outside Ray (Tune's three calls faked): a diverging member's run is
  closed, flagged, while the other member goes on; a retried trial continues every member's run;
- a real quick study with --fuse-seeds through a subprocess (conftest's `shared_ray_studies`): one Tune trial per
  glimpse size, one MLflow run per seed, and each member's numbers equal to its plain engine run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from ray import tune

from stawm import schema
from stawm.config import Config, preset
from stawm.study import gpu_share, runner, tracking, trial
from stawm.train import train
from stawm.train.data import load_data

FIELDS = set(Config.__dataclass_fields__)


# --- the share of a GPU, by hand ------------------------------------------------------------------

@pytest.mark.parametrize("peak, total, overhead, max_trials, expected", [
    (3000, 80000, 0, 32, 1 / 21),  # need 3000 x 1.25 = 3750; 80000 / 3750 = 21.3 -> 21 trials
    (3000, 80000, 0, 8, 1 / 8),  # the same, capped at 8 trials per GPU
    (3000, 80000, 500, 32, 1 / 18),  # need 3750 + 500 = 4250; 80000 / 4250 = 18.8 -> 18
    (16000, 80000, 0, 8, 1 / 4),  # need 20000: exactly 4 fit, and 4 it is (no rounding down to 3)
    (30000, 80000, 0, 8, 1 / 2),  # need 37500; 2.13 -> 2
    (70000, 80000, 0, 8, 1.0),  # need 87500 is more than the GPU: still one whole GPU, never more
])
def test_gpu_fraction_by_hand(peak, total, overhead, max_trials, expected):
    assert gpu_share.gpu_fraction(peak, total, overhead_mb=overhead, safety=1.25, max_trials=max_trials) == expected


def test_seed_space_is_a_seed_grid_or_the_fused_seeds(tmp_path):
    argv = ["--quick", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "ray")]
    plain = runner.parse_args("a study", preset="mnist-class-8", argv=argv)
    fused = runner.parse_args("a study", preset="mnist-class-8",
                              argv=[*argv, "--fuse-seeds", "--gpus-per-trial", "auto"])
    assert runner.seed_space(plain) == {"seed": tune.grid_search([0, 1])}
    assert runner.seed_space(fused) == {"seeds": [0, 1]}
    assert fused.gpus_per_trial == "auto" and fused.device == "auto"  # chosen in start_study, once Ray is up


# --- the trainable on fused seeds, outside Ray -------------------------------------------------------

class FakeTune:
    """The calls the trainable makes to Tune. Each report's checkpoint is copied into the trial folder,
    as Tune persists it (checkpoint_000000, ...); a new attempt starts from the last one.
    fail_at_report: the first attempt dies at that report (after the epoch's MLflow logs), as a crash would."""

    Checkpoint = tune.Checkpoint

    def __init__(self, folder: Path, fail_at_report: int = 0):
        self.folder, self.reports, self.latest, self.on_report = folder, [], None, None
        self.fail_at_report, self.calls = fail_at_report, 0

    def get_context(self):
        return SimpleNamespace(get_trial_id=lambda: "f0001", get_trial_name=lambda: "trainable_f0001")

    def get_checkpoint(self):
        return self.latest

    def report(self, metrics: dict, checkpoint: tune.Checkpoint) -> None:
        self.calls += 1
        if self.calls == self.fail_at_report:
            raise RuntimeError(f"fault injected at report {self.calls}")
        stored = self.folder / f"checkpoint_{len(list(self.folder.glob('checkpoint_*'))):06d}"
        shutil.copytree(checkpoint.path, stored)
        self.latest = tune.Checkpoint.from_directory(str(stored))
        self.reports.append(metrics)
        if self.on_report is not None:
            self.on_report(metrics)


def diverging_member_1(train):
    """The loop with member 1's epoch-1 record turned into a diverged one, and None after it, as the
    loop gives for a member that diverged (tests/test_fused.py checks that on a real one)."""

    def wrapped(cfgs, **kw):
        for records in train(cfgs, **kw):
            record = records[1]
            if record["epoch"] == 1:
                report = {**record["stability"], "ok": False, "diverged": True, "failed": ["rates"]}
                record = {k: v for k, v in record.items() if k != "test_error"}  # a diverged epoch is not evaluated
                records[1] = {**record, "diverged": True, "stability_ok": False, "stability_flags": ["rates"],
                              "stability": report}
            else:
                records[1] = None
            yield records

    return wrapped


def test_a_diverging_member_is_closed_flagged_while_the_other_goes_on_and_a_retry_continues_both(
        tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = tracking.experiment(client, "fused", uri)
    parent = client.create_run(experiment_id, tags={schema.ROLE: schema.ROLE_STUDY, schema.STUDY: "fused"}).info.run_id
    context = runner.TrialContext(study="fused", experiment_id=experiment_id, parent_run_id=parent, tracking_uri=uri,
                                  base_config=preset("tiny", epochs=3, max_steps=2).to_flat(), device="cpu",
                                  fuse_seeds=True)
    config = {"seeds": [0, 1]}  # what the study sweeps: here only the seed axis, fused
    fake = FakeTune(tmp_path / "trial", fail_at_report=2)  # epoch 2: logged to MLflow, then the crash
    fake.folder.mkdir()
    monkeypatch.setattr(trial, "tune", fake)
    monkeypatch.setattr(trial, "train", diverging_member_1(trial.train))

    def runs() -> dict[int, object]:
        found = client.search_runs([experiment_id], schema.tag_filter({schema.ROLE: schema.ROLE_TRIAL}))
        return {int(run.data.tags[schema.MEMBER]): run for run in found}

    status_at_report = []
    fake.on_report = lambda metrics: status_at_report.append({k: r.info.status for k, r in runs().items()})

    with pytest.raises(RuntimeError, match="fault injected at report 2"):  # the first attempt: Tune would retry it
        trial.trainable(config, context)
    assert {k: r.info.status for k, r in runs().items()} == {0: "FAILED", 1: "FINISHED"}
    trial.trainable(config, context)  # the retry: from the epoch-1 checkpoint, into the same two runs

    assert status_at_report == [{0: "RUNNING", 1: "RUNNING"},  # epoch 1: member 1 is closed after its report
                                {0: "RUNNING", 1: "FINISHED"}, {0: "RUNNING", 1: "FINISHED"}]
    by_member = runs()
    assert sorted(by_member) == [0, 1]
    for k, run in by_member.items():
        assert run.info.status == "FINISHED" and run.data.tags[schema.TRIAL_ID] == "f0001"
        assert run.data.tags[schema.SEED] == run.data.params["seed"] == str(k)
    steps = {k: [m.step for m in client.get_metric_history(r.info.run_id, "train_loss")] for k, r in by_member.items()}
    assert steps == {0: [1, 2, 3], 1: [1]}  # each epoch once: epoch 1 restored, not redone
    ok, diverged = by_member[0].data.tags, by_member[1].data.tags
    assert (ok[schema.STABILITY_OK], ok[schema.STABILITY_DIVERGED]) == ("true", "false")
    assert (diverged[schema.STABILITY_OK], diverged[schema.STABILITY_FLAGS], diverged[schema.STABILITY_DIVERGED]) == (
        "false", "rates", "true")

    # Tune sees the mean over both seeds, the diverged one counted as wrong on every image
    assert len(fake.reports) == 3
    for report in fake.reports:
        assert report["test_error_seed1"] == 1.0 and report["members_diverged"] == 1
        assert report["test_error"] == pytest.approx((report["test_error_seed0"] + 1.0) / 2)
        assert not report["stability_ok"] and report["stability_flags"] == "rates" and not report["diverged"]
    errors = [m.value for m in client.get_metric_history(by_member[0].info.run_id, "test_error")]
    assert [r["test_error_seed0"] for r in fake.reports] == errors


# --- a real quick study with --fuse-seeds -----------------------------------------------------------

@pytest.mark.slow
def test_glimpse_size_quick_with_fused_seeds_end_to_end(shared_ray_studies, tmp_path):
    # glimpse_size.py --quick --fuse-seeds --gpus-per-trial auto --epochs 2 --set max_steps=3
    # (conftest's `shared_ray_studies`)
    stdout, uri = shared_ray_studies.stdout("fused"), shared_ray_studies.uri

    # Tune ran one trial per glimpse size, each over both seeds
    assert "fused: 2 trials" in stdout
    lines = [line for line in stdout.splitlines()  # the summary's, indented (not the trials' "ended  ..." lines)
             if line.startswith("  ") and "glimpse_size=" in line and "seed=0,1" in line]
    assert len(lines) == 2 and all("conditions met" in line and "test_error=0." in line for line in lines)
    assert "--gpus-per-trial auto: 0 GPU per trial (the Ray cluster (1 node) has no GPU and can start none" in stdout

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("fused").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_STUDY]
    children = [r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_TRIAL]
    assert len(children) + 1 == len(runs) and parent.info.status == "FINISHED"
    assert (parent.data.params["fuse_seeds"], parent.data.params["gpus_per_trial"],
            parent.data.params["gpu_fraction"]) == ("True", "auto", "0.0")
    assert "probe_peak_mb" not in parent.data.params  # nothing probed without a GPU
    assert sorted((c.data.params["glimpse_size"], c.data.params["seed"]) for c in children) == [
        ("6", "0"), ("6", "1"), ("8", "0"), ("8", "1")]
    trials = {}
    for child in children:
        trials.setdefault(child.data.tags[schema.TRIAL_ID], []).append(child.data.tags[schema.MEMBER])
    assert sorted(sorted(members) for members in trials.values()) == [["0", "1"], ["0", "1"]]

    data = load_data("mnist-sample", validation_size=0, split_seed=0, image_size=28)  # what each trial loads
    for child in children:
        tags, params, run_id = child.data.tags, child.data.params, child.info.run_id
        assert child.info.status == "FINISHED" and child.data.tags[schema.PARENT_RUN_ID] == parent.info.run_id
        assert tags[schema.SEED] == params["seed"] == tags[schema.MEMBER]  # member k is seed k here
        assert (tags[schema.STABILITY_OK], tags[schema.STABILITY_FLAGS], tags[schema.STABILITY_STATIC_OK],
                tags[schema.STABILITY_DIVERGED]) == ("true", "", "true", "false")
        assert set(params) == FIELDS
        for key in ("train_loss", "test_error", "best_test_error", "max_abs_w", "readout_dead", "lr"):
            assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], key
        folder = Path(client.download_artifacts(run_id, "", str(tmp_path / run_id)))
        cfg = Config.from_flat(json.loads((folder / schema.CONFIG_ARTIFACT).read_text()))
        assert cfg == Config.from_flat(params) and (cfg.dropout, cfg.augment) == (0.0, "none")
        report = json.loads((folder / schema.STABILITY_ARTIFACT).read_text())
        assert report["ok"] and len(report["history"]) == 2

        # the member equals its plain run: nothing random in the forward pass (dropout 0, no augmentation)
        plain = [record for (record,) in train([cfg], data=data)]
        for key in ("test_error", "train_loss"):
            fused = [m.value for m in client.get_metric_history(run_id, key)]
            assert fused == pytest.approx([r[key] for r in plain], abs=1e-4), key


# --- --device auto: what a trial trains on ------------------------------------------------------------


def test_device_auto_trains_on_the_cpu_when_the_trial_sees_no_gpu(capsys):
    from stawm.study.gpu_share import trial_device

    context = lambda device, share: runner.TrialContext("s", "e", "p", "sqlite://", device=device, gpu_fraction=share)
    assert trial_device(context("auto", 0.0)) == ("cpu", "cpu")
    assert capsys.readouterr().out == ""  # no GPU asked, nothing to say
    assert trial_device(context("auto", 0.5)) == ("cpu", "cpu")  # this machine has no CUDA
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "asked for 0.5 GPU but sees no CUDA device" in said[0] and "on the CPU" in said[0]
    with pytest.raises(RuntimeError, match="--device cuda, but this trial sees no GPU.*--device auto"):
        trial_device(context("cuda", 0.5))
