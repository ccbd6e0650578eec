"""Fused trials (the loop with K > 1 members, stawm.train.fused): each member equals its plain run, diverging
members are masked, resume is exact.

Every expected number comes from a plain run here, never from a constant.
Tiny preset on a small slice of mnist-sample, dropout 0 and no augmentation (nothing random in the forward).
"""

import inspect
import math
import re

import pytest
import torch

from stawm import preset
from stawm.train import CHECKPOINT, FusionError, train
from stawm.train.checkpoints import member_weights
from stawm.train.data import DataBundle, load_data
from stawm.train.fused import FusedStack, check_fusible
from stawm.train.step import Members, OneModel, build_model, seed_everything

TOL = 1e-4
TIMING = ("epoch_seconds", "images_per_second", "peak_memory_mb")
COMPARED = ("train_loss", "train_accuracy", "test_error", "max_abs_w", "max_readout", "readout_dead",
            "readout_saturated", "memory_bound_ratio", "lr", "delta", "eta", "theta")


def small_sample(test_images: int) -> DataBundle:
    """The digit sample cut to 640 training images (a few tiny-preset steps) and its first `test_images` test ones."""
    full = load_data("mnist-sample")
    return DataBundle(train=full.train.subset(torch.arange(640)), val=None,
                      test=full.test.subset(torch.arange(test_images)), num_classes=full.num_classes, mean=full.mean,
                      std=full.std)


@pytest.fixture(scope="module")
def data() -> DataBundle:
    return small_sample(200)


def base(**changes):
    return preset("tiny", **{**dict(epochs=2, max_steps=3, dropout=0.0, query_dropout=0.0, augment="none"), **changes})


# Two members that differ in seed and in the float fields fusion allows to differ.
MEMBERS = [base(seed=0), base(seed=1, lr=2e-3, theta=0.4, grad_clip=0.05)]


@pytest.fixture(scope="module")
def plain(data, tmp_path_factory):
    """Each member's plain run: its records and its final weights."""
    runs = []
    for k, cfg in enumerate(MEMBERS):
        folder = tmp_path_factory.mktemp(f"plain{k}")
        records = [record for (record,) in train([cfg], data=data, checkpoint_dir=folder)]
        runs.append((records, member_weights(folder / CHECKPOINT)))
    return runs


def assert_same_numbers(fused: dict, plain: dict):
    assert set(fused) == set(plain)  # exactly a plain run's keys
    for key in COMPARED:
        assert fused[key] == pytest.approx(plain[key], abs=TOL), key
    assert (fused["stability_ok"], fused["stability_flags"], fused["diverged"]) == \
        (plain["stability_ok"], plain["stability_flags"], plain["diverged"])


def test_fused_members_equal_their_plain_runs(data, plain, tmp_path):
    epochs = list(train(MEMBERS, data=data, checkpoint_dir=tmp_path))
    assert len(epochs) == 2
    for e, records in enumerate(epochs):
        for k, record in enumerate(records):
            assert_same_numbers(record, plain[k][0][e])
    # BatchNorm statistics (running mean/var, batch count) evolved per member, as in each plain run
    stack = torch.load(tmp_path / CHECKPOINT, weights_only=True)["members"]["weights"]
    statistics = [n for n in stack if n.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")]
    assert len(statistics) == 12  # 4 BatchNorm layers
    for k, (_, weights) in enumerate(plain):
        assert weights.keys() == stack.keys()
        for name in statistics:
            # 10 TOL: float rounding can tip a ReLU at its kink and move a few weights by about one Adam step,
            # and the statistics downstream with them (seen with lr 1e-3 here: as much as 1 vs 2 CPU threads give)
            torch.testing.assert_close(stack[name][k], weights[name], atol=10 * TOL, rtol=0, msg=name)
    mean = "context_net.layers.0.1.running_mean"
    assert (stack[mean][0] - stack[mean][1]).abs().max() > 100 * TOL  # each member its own, not one shared
    assert torch.equal(stack["context_net.layers.0.1.num_batches_tracked"], torch.tensor([6, 6]))


def test_both_loops_refuse_a_batch_larger_than_the_training_set(data):
    cfg = base(batch_size=len(data.train) + 1)  # one steps_per_epoch for both: the same error
    message = re.escape(f"batch_size={len(data.train) + 1} is larger than the training set ({len(data.train)} images)")
    for run in (train([cfg], data=data), train([cfg, cfg.replace(seed=1)], data=data)):
        with pytest.raises(ValueError, match=message):
            next(run)


def test_both_step_implementations_satisfy_the_loops_interface():
    """OneModel and FusedStack are `step.Members`: every attribute and method the protocol names (isinstance
    on real instances), and each method takes the protocol's parameters by name, so neither can drift."""
    methods = [name for name, value in vars(Members).items() if callable(value) and not name.startswith("_")]
    assert {"begin_epoch", "step", "evaluate", "rates"} <= set(methods)  # the listing found the protocol's methods
    for members in (OneModel(MEMBERS[0], torch.device("cpu")), FusedStack(MEMBERS, torch.device("cpu"))):
        assert isinstance(members, Members), type(members).__name__
        for name in methods:
            expected = list(inspect.signature(getattr(Members, name)).parameters)
            found = list(inspect.signature(getattr(type(members), name)).parameters)
            assert found == expected, f"{type(members).__name__}.{name}{found} != Members.{name}{expected}"


def test_fused_members_start_from_their_plain_initial_weights():
    stack = FusedStack(MEMBERS, torch.device("cpu"))
    weights = stack.state_dict()["weights"]
    for k, cfg in enumerate(MEMBERS):
        seed_everything(cfg.seed, torch.device("cpu"))
        model = build_model(cfg, torch.device("cpu"))
        for name, value in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items():
            assert torch.equal(weights[name][k], value), name


def test_clipping_by_norm_takes_each_members_own_norm(data):
    cfgs = [base(seed=s, grad_clip_mode="norm", grad_clip=c, epochs=1, max_steps=2) for s, c in ((0, 0.1), (1, 1.0))]
    fused = next(train(cfgs, data=data))
    for cfg, record in zip(cfgs, fused):
        assert_same_numbers(record, next(train([cfg], data=data))[0])


def test_each_member_augments_with_its_own_generator_as_in_its_plain_run(data):
    cfgs = [base(seed=0, augment="rotate", epochs=1, max_steps=2), base(seed=1, augment="none", epochs=1, max_steps=2)]
    fused = next(train(cfgs, data=data))
    for cfg, record in zip(cfgs, fused):
        assert_same_numbers(record, next(train([cfg], data=data))[0])


def test_a_diverging_member_is_flagged_and_masked_while_the_other_goes_on(data, plain, tmp_path):
    # eta = 1e38: the first Hebbian write overflows float32, so its loss, gradients and W go non-finite
    members = [MEMBERS[0], base(seed=1, eta=1e38)]
    run = train(members, data=data, checkpoint_dir=tmp_path)
    first = next(run)
    frozen = torch.load(tmp_path / CHECKPOINT, weights_only=True)["members"]["weights"]
    second = next(run)
    assert first[1]["diverged"] and first[1]["stability_flags"] == [] and "test_error" not in first[1]
    assert set(first[1]) == set(plain[1][0][0]) - {"test_error"}
    assert second[1] is None  # stopped: no more records for it
    for e, records in enumerate((first, second)):
        assert_same_numbers(records[0], plain[0][0][e])
    after = torch.load(tmp_path / CHECKPOINT, weights_only=True)["members"]["weights"]
    for name, value in after.items():  # the diverged member no longer changes, and never held a NaN
        assert torch.equal(value[1], frozen[name][1]), name
        assert value[1].float().isfinite().all(), name


def test_configs_that_cannot_fuse_are_rejected_naming_the_field():
    with pytest.raises(FusionError, match="memory_size differs"):
        check_fusible([base(), base(memory_size=16)])
    with pytest.raises(FusionError, match="dropout differs"):
        next(train([base(), base(dropout=0.5)]))
    with pytest.raises(FusionError, match="at least one"):
        check_fusible([])
    check_fusible([base(seed=0), base(seed=3, delta=0.1, eta=0.3, theta=0.2, lr=1e-2, grad_clip=1.0,
                                      lr_schedule="exponential", lr_decay=0.9, augment="rotate")])


def test_resume_from_a_checkpoint_is_exact(data, tmp_path):
    # with augmentation (for one member), so each data generator must resume where it stopped too
    members = [base(seed=0, augment="rotate", epochs=3, max_steps=2),
               base(seed=1, augment="none", epochs=3, max_steps=2, lr=1e-3),
               base(seed=2, augment="rotate", epochs=3, max_steps=2, eta=0.3)]
    strip = lambda epochs: [[{k: v for k, v in r.items() if k not in TIMING} for r in e] for e in epochs]
    straight = strip(train(members, data=data, checkpoint_dir=tmp_path / "a"))
    run = train(members, data=data, checkpoint_dir=tmp_path / "b")
    next(run)
    run.close()  # killed after epoch 1: only its checkpoint survives
    resumed = strip(train(members, data=data, checkpoint_dir=tmp_path / "b", resume=True))
    assert [[r["epoch"] for r in e] for e in resumed] == [[2, 2, 2], [3, 3, 3]]
    assert resumed == straight[1:]
    a = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)["members"]
    b = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["members"]
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert all(torch.equal(a["optimizer"][k], b["optimizer"][k]) for k in a["optimizer"])
    assert math.isfinite(resumed[-1][0]["train_loss"])
