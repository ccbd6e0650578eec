"""A study's plan (stawm/study/plan.py): trials x epochs x s/epoch -> hours, before its first trial.

- the arithmetic on hand-set inputs, the numbers worked out by hand (waves, wall seconds, device-hours, cost,
  a resumed launch, stages that wait for each other, a GPU share) and what fits at once;
- seconds per epoch from a real sqlite store: the median of matching FINISHED trial runs, named as its source;
  the trials a resumed study has FINISHED already;
- `--plan` on a real quick study: the block printed, exit 0, no Ray, no run, no Tune experiment;
- the session's quick study (glimpse_size) printed the block, logged it on its parent run and set it against
  what it took.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from stawm import schema
from stawm.study import plan as plans
from stawm.study import runner
from stawm.study.plan import Plan

REPO = Path(__file__).resolve().parents[1]


def hand_plan(**changes) -> Plan:
    """12 trials (6 configurations x 2 seeds), 3 epochs of 10 s, 2 at once, 1 CPU core each, 0.5 a core-hour."""
    values = dict(study="s", configurations=6, seeds=2, fused=False, stages=(12,), done=0, epochs=3, epoch_s=10.0,
                  epoch_source="set by hand", start_s=15.0, start_source="by hand", concurrency=2,
                  concurrency_why="by hand", share=1.0, device="CPU core", price_per_hour=0.5)
    return Plan(**{**values, **changes})


# --- the arithmetic -------------------------------------------------------------------------------------

def test_the_plan_arithmetic_worked_by_hand():
    assert (plans.OUTSIDE_STEPS, plans.RAY_S_PER_TRIAL) == (0.08, 2.0)  # the constants the hand numbers below use
    plan = hand_plan()
    assert (plan.trials, plan.left, plan.waves) == (12, 12, (6,))  # 12 trials, 2 at once: 6 waves
    # a trial: 3 epochs x 10 s = 30 s of steps, which are 92% of its run: 32.61 s; + 2 s of Ray = 34.61 s
    assert plan.trial_s == pytest.approx(34.6087, abs=1e-4)
    assert plan.wall_s == pytest.approx(15 + 6 * 34.6087, abs=1e-3)  # = 222.652 s
    # 12 trials x 3 epochs x 10 s = 360 s = 0.1 h, x 1 core each; at 0.5 a core-hour: 0.05
    assert plan.device_hours == pytest.approx(0.1)
    assert plan.cost == pytest.approx(0.05)


def test_a_resumed_launch_plans_only_what_is_left():
    plan = hand_plan(done=5)  # 7 left: 4 waves of 2
    assert (plan.left, plan.waves) == (7, (4,))
    assert plan.wall_s == pytest.approx(15 + 4 * 34.6087, abs=1e-3)  # = 153.435 s
    assert plan.device_hours == pytest.approx(7 * 30 / 3600)  # 0.0583 core-hours
    finished = hand_plan(done=12)
    assert (finished.left, finished.waves, finished.wall_s, finished.device_hours) == (0, (0,), 0.0, 0.0)
    assert "nothing was planned to run" in finished.against(12, 3.0)


def test_a_stage_that_waits_for_the_one_before_adds_its_own_waves():
    # table1's shape: 6 trials, then 2 that need them, each stage a Tuner of its own (its workers start again);
    # 4 at once: 2 + 1 waves (one stage of 8 would be 2), and two starts
    plan = hand_plan(configurations=4, stages=(6, 2), concurrency=4)
    assert plan.waves == (2, 1) and plan.wall_s == pytest.approx(2 * 15 + 3 * 34.6087, abs=1e-3)  # = 133.826 s
    assert "wall: ~134 s (2.2 min) = 2 x 15 s start (by hand) + 2 + 1 waves x 35 s" in plan.describe()
    resumed = hand_plan(configurations=4, stages=(6, 2), concurrency=4, done=7)  # done: the first stage's first
    assert resumed.waves == (0, 1) and resumed.wall_s == pytest.approx(15 + 34.6087, abs=1e-3)


def test_gpu_hours_count_each_trials_share_of_a_gpu():
    plan = hand_plan(share=0.25, device="GPU", price_per_hour=2.0)
    assert plan.device_hours == pytest.approx(0.1 * 0.25)  # 0.025 GPU-hours
    assert plan.cost == pytest.approx(0.05)
    assert "0.025 GPU-hours" in plan.describe() and "cost: 0.05 at 2 a GPU-hour" in plan.describe()


def test_the_block_is_short_and_gives_its_units():
    block = hand_plan().describe().splitlines()
    assert 5 <= len(block) <= 8
    assert block[0] == "plan for s: 6 configurations x 2 seeds (a trial each) = 12 trials, 3 epochs each"
    assert block[1] == "  epoch: 10 s of training steps, set by hand"
    assert block[3] == "  trial: 35 s (3 epochs x 10 s, + 8% outside the steps, + 2 s of Ray's scheduling)"
    assert block[4] == "  wall: ~223 s (3.7 min) = 15 s start (by hand) + 6 waves x 35 s"
    assert block[5] == "  device: 0.1 CPU core-hours (12 trials x 3 epochs x 10 s x 1 CPU core each)"
    assert block[6] == "  cost: 0.05 at 0.5 a CPU core-hour"
    assert "cost" not in hand_plan(price_per_hour=0.0).describe()
    assert hand_plan().against(12, 250.0) == ("plan: 12 trials, ~223 s expected; actual: 12 trials in 250 s "
                                              "(1.12x the plan)")


def test_the_start_is_this_drivers_own_unless_it_was_not_started_for_the_study(monkeypatch):
    seconds, source = plans.startup_s()  # this test process: up for less than STARTUP_MAX_S, or not
    assert plans.TUNE_START_S < seconds < plans.STARTUP_MAX_S + plans.TUNE_START_S or source.startswith("START_S:")
    monkeypatch.setattr(plans, "STARTUP_MAX_S", 0.0)  # a process up longer than that: the constant
    assert plans.startup_s() == (plans.START_S, "START_S: this process was not started for the study")


def test_what_fits_at_once():
    assert plans.concurrency(2, 0, 1, 0, where="here")[0] == 2  # 2 cores, 1 per trial
    assert plans.concurrency(2, 0, 1, 0, where="here", max_concurrent=1)[0] == 1
    assert plans.concurrency(2, 0, 1, 0, where="here", trials=1)[0] == 1  # never more than the trials left
    assert plans.concurrency(16, 1, 1, 1 / 3, where="here")[0] == 3  # 1/3 GPU each: 3 on one GPU, not 2
    count, why = plans.concurrency(8, 0, 1, 0.25, where="the cluster", more_nodes=3,
                                   node_types={"head": {"CPU": 8}, "worker.gpu": {"CPU": 4, "GPU": 1}})
    assert count == 12 and "+ 3 x 4 on the worker.gpu nodes the autoscaler may add" in why  # none on the head
    assert plans.concurrency(8, 0, 1, 1, where="the cluster") == (1, "the cluster: 8 CPUs / 1 per trial, 0 GPUs / 1 per"
                                                                     " trial; no trial fits now: counted as 1")


# --- the store ---------------------------------------------------------------------------------------------

def trial_run(client: MlflowClient, experiment_id: str, params: dict, seconds: float, *, status: str = "FINISHED",
              parent: str = "p", trial: str = "t", member: int | None = None) -> str:
    """A trial's run as tracking.open_trial_run leaves it (tags, every config field as a str param), with its last
    epoch's epoch_seconds."""
    tags = {schema.ROLE: schema.ROLE_TRIAL, schema.PARENT_RUN_ID: parent, schema.TRIAL_ID: trial,
            schema.SEED: str(params["seed"]), **({schema.MEMBER: str(member)} if member is not None else {})}
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    client.log_batch(run_id, metrics=[Metric(plans.EPOCH_SECONDS, seconds, 0, 1)],
                     params=[Param(key, str(value)) for key, value in params.items()])
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A real sqlite store whose experiment `stored` holds earlier runs of the quick tiny config: four FINISHED ones
    that match it (1, 2, 3, 10 s an epoch; other seeds and rates), and three that must not count. One per module:
    a new sqlite store takes seconds to make."""
    tmp_path = tmp_path_factory.mktemp("stored")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["--quick", "--tracking-uri", uri, "--storage", str(tmp_path / "ray"), "--name", "stored"]
    args = runner.parse_args("a study", preset="mnist-class-8", argv=argv)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("stored")
    for seed, delta, seconds in ((0, 0.2, 1.0), (1, 0.2, 2.0), (0, 1.5, 3.0), (1, 0.05, 10.0)):
        trial_run(client, experiment_id, {**args.config, "seed": seed, "delta": delta}, seconds, trial=f"{seed}{delta}")
    trial_run(client, experiment_id, {**args.config}, 50.0, status="RUNNING")  # not finished
    trial_run(client, experiment_id, {**args.config, "glimpses": 5}, 100.0)  # another config: another speed
    trial_run(client, experiment_id, {**args.config}, 70.0, member=0)  # a fused trial's member
    return args, client, experiment_id


def test_seconds_per_epoch_come_from_earlier_runs_of_the_same_config_in_the_store(stored, capsys, monkeypatch):
    import ray

    args, client, experiment_id = stored
    assert plans.store_epoch_seconds(client, experiment_id, args.config, fused=False) == (2.5, 4)  # of 1, 2, 3, 10
    assert plans.store_epoch_seconds(client, experiment_id, args.config, fused=True) == (70.0, 1)
    assert plans.store_epoch_seconds(client, experiment_id, {**args.config, "batch_size": 32}, fused=False) is None

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    made = runner.plan(args, configurations=2)  # no probe: the store has the figure
    assert made.epoch_s == 2.5
    assert made.epoch_source == "the base config's, from 4 earlier runs in the store (median of their last epochs)"
    assert (made.trials, made.done, made.epochs) == (4, 0, 1) and not ray.is_initialized()
    assert capsys.readouterr().out.strip() == made.describe()
    # trials of two speeds (table1's rows): the mean over the trials, each config looked up once
    mixed = runner.plan(args, configurations=2, variants=[{}, {}, {"glimpses": 5}, {"glimpses": 5}])
    assert mixed.epoch_s == pytest.approx((2.5 + 2.5 + 100 + 100) / 4)
    assert mixed.epoch_source == "the mean over the trials' 2 configurations (2.5 to 100 s): 2 from the store, 0 probed"
    assert len(client.search_runs([experiment_id])) == 7  # read, nothing written


def test_a_resumed_study_counts_the_trials_its_parent_finished(stored):
    client = stored[1]  # its store, another experiment
    experiment_id = client.create_experiment("resumed")
    config = {"seed": 0}
    trial_run(client, experiment_id, {**config, "seed": 0}, 1.0, trial="a")
    trial_run(client, experiment_id, {**config, "seed": 1}, 1.0, trial="b")
    trial_run(client, experiment_id, {**config, "seed": 0}, 1.0, trial="c", member=0)  # fused: one trial, two runs
    trial_run(client, experiment_id, {**config, "seed": 1}, 1.0, trial="c", member=1)
    trial_run(client, experiment_id, {**config, "seed": 0}, 1.0, trial="d", status="FAILED")
    trial_run(client, experiment_id, {**config, "seed": 0}, 1.0, trial="e", status="RUNNING")
    trial_run(client, experiment_id, {**config, "seed": 0}, 1.0, trial="f", parent="another study")
    assert plans.trials_done(client, experiment_id, "p", [0, 1]) == 3  # a, b, c
    assert plans.trials_done(client, experiment_id, "p", [1]) == 2  # b, c: only the seeds this launch trains
    assert plans.trials_done(client, experiment_id, "p", [2, 3]) == 0  # seeds added: none of them done


# --- --plan on a real quick study -----------------------------------------------------------------------------

def study_main(script: str):
    spec = importlib.util.spec_from_file_location(script, REPO / "studies" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.slow  # seconds of a real run: the full suite's (the fast one stays under its budget)
def test_plan_flag_prints_the_plan_and_exits_0_before_any_trial(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["--quick", "--tracking-uri", uri, "--storage", str(tmp_path / "ray"), "--name", "planned", "--plan",
            "--price-per-hour", "0.1"]
    with pytest.raises(SystemExit) as stop:
        study_main("glimpse_size")(argv)
    out = capsys.readouterr().out
    assert stop.value.code == 0 and not ray.is_initialized()
    block = out.strip().splitlines()
    assert block[0] == "plan for planned: 2 configurations x 2 seeds (a trial each) = 4 trials, 1 epoch each"
    assert block[1].startswith("  epoch: ") and "probe of " in block[1] and "steps an epoch" in block[1]
    assert block[2].startswith(f"  at once: {min(4, os.cpu_count())} trials (this machine")  # its cores, 1 a trial
    assert [line.split(":")[0].strip() for line in block] == ["plan for planned", "epoch", "at once", "trial", "wall",
                                                              "device", "cost"]
    assert not (tmp_path / "ray" / "planned").exists()  # no Tune experiment
    assert MlflowClient(uri).get_experiment_by_name("planned") is None  # no experiment, so no run


# --- the session's quick study -------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_quick_study_printed_its_plan_logged_it_and_set_it_against_what_it_took(glimpse_size_study, tmp_path):
    # the shared session run: studies/glimpse_size.py --quick --epochs 2 --set max_steps=3 (see conftest)
    out = glimpse_size_study["stdout"]
    start = out.index("plan for t: ")
    block = out[start:].splitlines()[:6]
    assert block[0] == "plan for t: 2 configurations x 2 seeds (a trial each) = 4 trials, 2 epochs each"
    assert "x 3 steps an epoch" in block[1]  # the probe scaled to max_steps=3
    assert out.index("plan for t: ") < out.index("t: 4 trials")  # before the trials, the summary after them
    (closing,) = [line for line in out.splitlines() if line.startswith("plan: ")]
    assert closing.startswith("plan: 4 trials, ~") and "actual: 4 trials in " in closing and "x the plan)" in closing

    client = MlflowClient(glimpse_size_study["uri"])
    experiment = client.get_experiment_by_name("t")
    (parent,) = client.search_runs([experiment.experiment_id], schema.tag_filter({schema.ROLE: schema.ROLE_STUDY}))
    assert parent.data.params[schema.PLAN_TRIALS] == "4" and parent.data.params[schema.PLAN_DONE] == "0"
    assert set(schema.PLAN_PARAMS) <= set(parent.data.params)
    folder = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path)))
    assert (folder / schema.PLAN_TEXT_ARTIFACT).read_text().splitlines()[:6] == block
    logged = json.loads((folder / schema.PLAN_ARTIFACT).read_text())
    assert (logged["trials"], logged["epochs"], logged["concurrency"]) == (4, 2, 2)
    assert float(parent.data.params[schema.PLAN_WALL_S]) == pytest.approx(logged["wall_s"], abs=0.1)
