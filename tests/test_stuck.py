"""Provably stuck runs stop (stawm.conditions.provably_stuck, a derived rule): the rule on hand-built states, the
argument behind it on the memory itself, a plain run that stops, a fused stack whose stopped members leave it
without changing the others' numbers, resume after the drop, and what the study layer reports of a stuck member.

Tiny preset on a small slice of mnist-sample, dropout 0 and no augmentation, as tests/test_fused.py; every
expected number of the trained runs comes from another run here (stop_stuck=False), never from a constant.
"""

import math

import pytest
import torch
from mlflow import MlflowClient

from stawm import preset, schema
from stawm.conditions import provably_stuck
from stawm.model.memory import HebbRosenblatt
from stawm.study import tracking
from stawm.study.context import TrialContext
from stawm.study.recorder import RunRecorder, member_epoch, stop_tags, stopped_metrics, tune_metrics, tune_report
from stawm.train import CHECKPOINT, train
from stawm.train.checkpoints import member_weights
from stawm.train.cli import main
from stawm.train.data import DataBundle
from stawm.train.fused import FusedStack

# a fused member against the same numbers in another stack shape; the same small digit sample
from test_fused import COMPARED, TIMING, TOL, small_sample


@pytest.fixture(scope="module")
def data() -> DataBundle:
    return small_sample(128)


def base(**changes):
    return preset("tiny", **{**dict(epochs=3, max_steps=1, dropout=0.0, query_dropout=0.0, augment="none"),
                             **changes})


def untimed(record: dict | None) -> dict | None:
    return record and {k: v for k, v in record.items() if k not in TIMING}


def untimed_epochs(run) -> list[list[dict | None]]:
    return [[untimed(r) for r in records] for records in run]


# --- the rule, on hand-built states ----------------------------------------------------------------

@pytest.mark.parametrize("activation, theta, max_abs_w, draws, stuck", [
    ("relu6", 0.0, 0.0, False, True),  # W = 0, theta = 0, relu6(0) = 0 with slope 0 at 0: every write is 0
    ("relu6", 0.5, 0.0, False, False),  # theta e writes relu6(0.5 e) != 0 as soon as e has a positive entry
    ("relu6", 1e-30, 0.0, False, False),  # any theta > 0 does
    ("relu6", 0.0, 1e-12, False, False),  # some W entry is not 0: W e can be
    ("sigmoid", 0.0, 0.0, False, False),  # sigmoid(0) = 0.5: the first write is 0.5 eta e_i, not 0
    ("relu6", 0.0, 0.0, True, False),  # a drawing model's decoder still learns the mean image
    ("tanh", 0.0, 0.0, False, False),  # an activation the rule knows nothing of
])
def test_the_rule_on_hand_built_states(activation, theta, max_abs_w, draws, stuck):
    assert provably_stuck(activation, theta, max_abs_w, draws=draws) is stuck


def test_the_argument_on_the_memory_itself():
    """W = 0 and theta = 0 with ReLU6: N writes leave W exactly 0, and a loss on the read has exactly zero
    gradient with respect to the (learnable) rates, the written inputs e and the query: nothing upstream moves.
    Theta > 0, or sigmoid, breaks it (the rule's conditions are each needed)."""
    torch.manual_seed(0)
    B, M, N = 3, 5, 4
    inputs = torch.rand(N, B, M) + 0.1  # positive: relu6(theta e) > 0 for any theta > 0
    target = torch.ones(B, M)  # the read is 0, so (read - target) is not: the loss does depend on the read

    def write_and_read(theta: float, activation: str = "relu6"):
        memory = HebbRosenblatt(M, delta=0.2, eta=0.4, theta=theta, learnable=True, activation=activation)
        e = inputs.clone().requires_grad_(True)
        q = torch.rand(B, M, requires_grad=True)
        W = memory.init_state(B)
        for n in range(N):
            W = memory.update(W, e[n])
        loss = ((memory.read(W, q) - target) ** 2).sum()
        grads = torch.autograd.grad(loss, [memory.theta, memory.eta, memory.delta, e, q])
        return W, grads

    W, grads = write_and_read(theta=0.0)
    assert torch.equal(W, torch.zeros(B, M, M))
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))

    W, (d_theta, _, _, d_e, _) = write_and_read(theta=0.5)
    assert W.abs().max() > 0 and d_theta.abs() > 0 and d_e.abs().max() > 0
    W, _ = write_and_read(theta=0.0, activation="sigmoid")
    assert W.abs().max() > 0


# --- a plain run -----------------------------------------------------------------------------------

@pytest.mark.slow  # seconds of a real run: the full suite's (the fast one stays under its budget)
def test_a_plain_stuck_run_stops_after_its_first_epoch_and_resumes_to_nothing(data, tmp_path):
    stuck = base(theta=0.0, epochs=2)
    stopped = [untimed(r) for (r,) in train([stuck], data=data, checkpoint_dir=tmp_path)]
    everything = [untimed(r) for (r,) in train([stuck.replace(stop_stuck=False)], data=data)]
    assert len(stopped) == 1 and stopped[0]["stop_reason"] == "stuck"
    assert (stopped[0]["max_abs_w"], stopped[0]["theta"], stopped[0]["diverged"]) == (0.0, 0.0, False)
    assert 0 <= stopped[0]["test_error"] <= 1  # measured: the last measured error is its final one
    assert [r["epoch"] for r in everything] == [1, 2]
    assert [r["stop_reason"] for r in everything] == [None, None]
    assert [r["max_abs_w"] for r in everything] == [0.0, 0.0]  # as the rule said: never written again
    assert stopped[0] == {**everything[0], "stop_reason": "stuck"}  # the stop changes nothing it measured
    assert list(train([stuck], data=data, checkpoint_dir=tmp_path, resume=True)) == []


def test_a_learning_run_does_not_stop(data):
    (record,) = next(train([base(epochs=2)], data=data))
    assert record["stop_reason"] is None and record["max_abs_w"] > 0


def test_the_command_says_why_it_stopped(tmp_path, capsys):
    argv = ["--preset", "tiny", "--epochs", "2", "--max-steps", "1", "--config.theta", "0", "--config.glimpses", "1",
            "--checkpoint-dir", str(tmp_path / "run")]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("epoch   1")
    assert lines[1].startswith("stopped after epoch 1 of 2: memory provably stuck")


# --- a fused stack -----------------------------------------------------------------------------------

# Member 1 is stuck from the start (theta = 0); members 0 and 2 learn (seeds and rates differ).
MEMBERS = [base(seed=0), base(seed=1, theta=0.0), base(seed=2, theta=0.4, lr=2e-3)]


@pytest.fixture(scope="module")
def without_the_drop(data):
    """The same stack with stop_stuck=False: every member runs every epoch in a stack of three."""
    return untimed_epochs(train([cfg.replace(stop_stuck=False) for cfg in MEMBERS], data=data))


@pytest.fixture(scope="module")
def with_the_drop(data, tmp_path_factory):
    """The stack as it is run: member 1 stops after epoch 1 and leaves. Its records and its checkpoint's folder."""
    folder = tmp_path_factory.mktemp("drop")
    return untimed_epochs(train(MEMBERS, data=data, checkpoint_dir=folder)), folder


def test_stopped_members_leave_the_stack_and_the_others_keep_their_numbers(with_the_drop, without_the_drop):
    epochs, folder = with_the_drop
    assert [[r and r["epoch"] for r in e] for e in epochs] == [[1, 1, 1], [2, None, 2], [3, None, 3]]
    assert epochs[0][1] == {**without_the_drop[0][1], "stop_reason": "stuck"}  # one stack, same numbers
    assert without_the_drop[2][1]["max_abs_w"] == 0.0  # run on, it was never written
    for e, (records, reference) in enumerate(zip(epochs, without_the_drop)):
        for k in (0, 2):  # from epoch 2 in a stack of two, against the stack of three
            assert records[k]["stop_reason"] is None
            for key in COMPARED:
                assert records[k][key] == pytest.approx(reference[k][key], abs=TOL), (e, k, key)
            assert records[k]["stability_flags"] == reference[k]["stability_flags"]
    # the checkpoint keeps one row per member: the stuck one's as it left the stack after epoch 1
    final = torch.load(folder / CHECKPOINT, weights_only=True)
    assert final["stopped"] == [False, True, False]
    assert all(t.shape[0] == 3 for t in final["members"]["weights"].values())
    assert final["members"]["optimizer"]["steps"].tolist() == [3, 1, 3]  # a step an epoch; member 1's stopped


def test_a_checkpoint_after_the_drop_resumes_to_the_same_records(data, with_the_drop, tmp_path):
    straight, folder = with_the_drop
    run = train(MEMBERS, data=data, checkpoint_dir=tmp_path)
    next(run), next(run)  # epoch 2 ran in the stack of two
    run.close()  # killed: only its checkpoint survives
    after_epoch_2 = member_weights(tmp_path / CHECKPOINT, member=1)
    resumed = untimed_epochs(train(MEMBERS, data=data, checkpoint_dir=tmp_path, resume=True))
    assert resumed == straight[2:]  # exactly: the resumed stack drops member 1 again before its first step
    a = torch.load(folder / CHECKPOINT, weights_only=True)["members"]
    b = torch.load(tmp_path / CHECKPOINT, weights_only=True)["members"]
    assert all(torch.equal(a["weights"][n], b["weights"][n]) for n in a["weights"])
    assert all(torch.equal(a["optimizer"][n], b["optimizer"][n]) for n in a["optimizer"])
    stuck = member_weights(tmp_path / CHECKPOINT, member=1)  # a stopped member's weights stay readable
    assert all(torch.equal(stuck[n], after_epoch_2[n]) for n in stuck)


def test_the_stack_compacts_and_scatters_back_exactly():
    """Leaving and the checkpoint layout alone, no training between: the full-K state before a drop is the
    state after it, and a stack loaded from it holds every member until its next begin_epoch."""
    stack = FusedStack(MEMBERS, torch.device("cpu"))
    before = stack.state_dict()
    before = {part: {n: t.clone() for n, t in before[part].items()} for part in ("weights", "optimizer")}
    stack.begin_epoch([1e-3, 1e-3, 2e-3], [False, True, False])
    assert stack.active == [0, 2] and all(p.shape[0] == 2 for p in stack.params.values())
    assert stack.lr.tolist() == [1e-3, 2e-3] and stack.clip[:, 0].tolist() == [MEMBERS[0].grad_clip] * 2
    after = stack.state_dict()
    for part in ("weights", "optimizer"):
        assert all(torch.equal(after[part][n], before[part][n]) for n in before[part]), part
    fresh = FusedStack(MEMBERS, torch.device("cpu"))
    fresh.load_state_dict(after)
    assert fresh.active == [0, 1, 2]
    fresh.begin_epoch([1e-3, 1e-3, 2e-3], [False, True, False])
    assert fresh.active == [0, 2] and all(torch.equal(fresh.params[n], stack.params[n]) for n in stack.params)


# --- what the study layer reports of a stuck member ---------------------------------------------------

REPORT = {"ok": False, "failed": ["writes"], "static_ok": False, "diverged": False}


def record(epoch: int, error: float, stop: str | None) -> dict:
    return {"epoch": epoch, "train_loss": 2.3, schema.TEST_ERROR: error, "max_abs_w": 0.0, "theta": 0.0,
            "diverged": False, "stop_reason": stop, "stability": REPORT}


def test_a_stuck_member_reports_its_last_measured_error_and_is_tagged():
    cfg = base(theta=0.0)
    _, state = member_epoch(record(1, 0.9, None), {})
    metrics, state = member_epoch(record(2, 0.85, "stuck"), state)
    assert state["stopped"] and state["stop"] == {"reason": "stuck", "epoch": 2, "max_abs_w": 0.0}
    later = stopped_metrics(state, cfg)  # what Tune sees of it at epochs 3, 4...
    assert later[schema.TEST_ERROR] == 0.85 and later[schema.BEST_TEST_ERROR] == 0.85  # not 1, the diverged one
    assert later["stuck"] and not later["diverged"]
    tags = {tag.key: tag.value for tag in stop_tags(state)}
    assert tags == {schema.STOP_REASON: "stuck", schema.STOP_EPOCH: "2", schema.STOP_MAX_ABS_W: "0.0",
                    schema.FINAL_ERROR: schema.FINAL_ERROR_LAST_MEASURED}
    live = tune_metrics({schema.TEST_ERROR: 0.1}, {"stability": {**REPORT, "ok": True, "failed": []},
                                                    "diverged": False}, cfg)
    trial = tune_report([later, live], seeds=[0, 1])
    assert trial[schema.TEST_ERROR] == pytest.approx((0.85 + 0.1) / 2) and trial["members_stuck"] == 1
    assert trial["members_diverged"] == 0 and not trial["diverged"]


def test_a_diverged_member_still_reports_an_error_of_one():
    cfg = base()
    diverged = {**record(1, math.nan, "diverged"), "diverged": True, "stability": {**REPORT, "diverged": True}}
    del diverged[schema.TEST_ERROR]
    _, state = member_epoch(diverged, {})
    later = stopped_metrics(state, cfg)
    assert later[schema.TEST_ERROR] == 1.0 and later["diverged"] and not later["stuck"]
    assert {tag.key: tag.value for tag in stop_tags(state)}[schema.STOP_REASON] == "diverged"
    assert schema.FINAL_ERROR not in {tag.key for tag in stop_tags(state)}
    assert stopped_metrics({"stability": REPORT, "stopped": True}, cfg)[schema.TEST_ERROR] == 1.0  # an older state


@pytest.mark.slow  # seconds of a real run: the full suite's (the fast one stays under its budget)
def test_a_stuck_members_run_is_closed_finished_and_tagged_never_stopped_early(tmp_path):
    """Two fused members in a real (SQLite) store: member 1 stops stuck after epoch 1, then Tune stops the trial
    after epoch 2 of 3. Member 0's run is marked stopped early; member 1's says why it stopped instead."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = tracking.experiment(client, "stuck", uri)
    parent = tracking.create_study_run(client, experiment_id, "stuck", {schema.SEEDS: 2}, "studies/x.py", "abc", False)
    context = TrialContext(study="stuck", experiment_id=experiment_id, parent_run_id=parent, tracking_uri=uri)
    cfgs = [base(seed=0), base(seed=1, theta=0.0)]
    live = {**record(1, 0.5, None), "max_abs_w": 0.3, "theta": 0.5, "stability": {**REPORT, "ok": True, "failed": []}}
    with pytest.raises(SystemExit):
        with RunRecorder(context, cfgs, "t0001", "trainable_t0001", {schema.GPU: "cpu"}) as recorder:
            recorder.resume(None, None)
            first = recorder.epoch([live, record(1, 0.875, "stuck")])
            second = recorder.epoch([{**live, "epoch": 2, schema.TEST_ERROR: 0.25}, None])
            raise SystemExit  # what Tune raises inside tune.report to stop a trial
    assert first[schema.TEST_ERROR] == pytest.approx((0.5 + 0.875) / 2)
    assert second[schema.TEST_ERROR] == pytest.approx((0.25 + 0.875) / 2)  # the stuck one's last measured error
    assert (second["members_stuck"], second["members_diverged"]) == (1, 0)
    runs = client.search_runs([experiment_id], schema.tag_filter({schema.PARENT_RUN_ID: parent}))
    tags = {int(run.data.tags[schema.MEMBER]): run.data.tags for run in runs}
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert tags[0].get(schema.STOPPED_EARLY) == schema.TRUE and schema.STOP_REASON not in tags[0]
    assert schema.STOPPED_EARLY not in tags[1]
    assert (tags[1][schema.STOP_REASON], tags[1][schema.STOP_EPOCH], tags[1][schema.STOP_MAX_ABS_W],
            tags[1][schema.FINAL_ERROR]) == ("stuck", "1", "0.0", schema.FINAL_ERROR_LAST_MEASURED)
