"""Appendix A: the conditions on hand-built rates, the run-time monitor, and the memory bound as an invariant."""

import copy
import json
import math

import pytest
import torch

from stawm import HebbRosenblatt, preset
from stawm.conditions import CONDITIONS, DERIVED, PAPER, READING, check, failed
from stawm.model.heads import QUERY_BOUND
from stawm.model.stability import StabilityMonitor, step_bound_ratio
from stawm.train.data import load_data, prepare_batch, to_model_input
from stawm.train.step import EpochStats, OneModel

PAPER_RATES = {"delta": 0.2, "eta": 0.4, "theta": 0.5}
MEMORY = {"max_abs_w": 1.0, "max_readout": 10.0, "readout_dead": 0.5, "readout_saturated": 0.0,
          "memory_bound_ratio": 0.1}


def flagging(activation, delta, eta, theta):
    return failed(check(activation, delta, eta, theta))


def test_each_condition_names_its_source_as_notes_does():
    sources = {name: c.source for name, c in CONDITIONS.items()}
    # writes: Section 3.1's sentence (with theta = 0 'nothing can be learned'), not one of Appendix A's conditions
    assert sources == {"activation": PAPER, "stationary_input": PAPER, "rates": READING, "writes": READING,
                       "eta_gt_delta": READING, "decay": DERIVED}
    assert [n for n, c in CONDITIONS.items() if c.informational] == ["stationary_input", "eta_gt_delta"]


def test_the_paper_rates_meet_every_flagging_condition():
    checks = check("relu6", **PAPER_RATES)
    assert failed(checks) == []
    assert checks["eta_gt_delta"] is True and checks["stationary_input"] is False  # reported, never a flag


def test_theta_zero_writes_nothing_with_relu6_but_writes_with_a_sigmoid():
    # ReLU6(0) = 0: W = 0 and theta = 0 give every write eta e (x) 0 = 0 (Section 3.1)
    assert flagging("relu6", 0.2, 0.4, 0.0) == ["writes"]
    # sigmoid(0) = 1/2: the first write is eta e (x) 1/2, not zero
    assert flagging("sigmoid", 0.2, 0.4, 0.0) == []
    assert flagging("relu6", 0.2, 0.4, 0.01) == []  # any theta > 0 writes


def test_delta_above_one_breaks_only_the_derived_decay():
    assert flagging("relu6", 1.5, 0.4, 0.5) == ["decay"]
    assert check("relu6", 1.5, 0.4, 0.5)["eta_gt_delta"] is False  # informational: reported, not a flag
    assert flagging("relu6", 1.0, 0.4, 0.5) == []  # delta = 1 is inside: W is the last write alone


def test_delta_zero_breaks_the_paper_reading_and_decay():
    assert flagging("relu6", 0.0, 0.4, 0.5) == ["rates", "decay"]
    assert flagging("relu6", 0.2, -0.1, 0.5) == ["rates"]
    assert flagging("relu6", 0.2, 0.0, 0.5) == []  # eta >= 0 is what the reading asks
    assert flagging("relu6", 0.2, 0.4, -0.5) == ["rates", "writes"]
    assert flagging("relu6", 0.2, math.nan, 0.5) == ["rates", "writes", "decay"]  # NaN satisfies no comparison
    assert flagging("tanh", *PAPER_RATES.values()) == ["activation"]


def test_the_monitor_keeps_the_epoch_each_condition_first_failed_and_divergence_apart():
    monitor = StabilityMonitor(preset("mnist-class-8", learnable_rates=True))
    assert monitor.observe(1, rates=PAPER_RATES, diverged=False, memory=MEMORY) == {"ok": True, "failed": []}
    monitor.observe(2, rates={**PAPER_RATES, "delta": 1.2}, diverged=False, memory=MEMORY)
    verdict = monitor.observe(3, rates={**PAPER_RATES, "delta": -0.1}, diverged=True, memory=MEMORY)
    assert verdict == {"ok": False, "failed": ["rates", "decay"]}  # diverging is no condition
    report = json.loads(json.dumps(monitor.report(), allow_nan=False))
    assert report["conditions"]["decay"]["first_failed_epoch"] == 2
    assert report["conditions"]["rates"]["first_failed_epoch"] == 3
    assert report["diverged"] and report["diverged_epoch"] == 3 and report["static_ok"]
    assert report["conditions"]["decay"]["source"] == DERIVED
    assert [h["readout_dead"] for h in report["history"]] == [0.5, 0.5, 0.5]


def test_a_static_failure_is_recorded_at_epoch_zero():
    monitor = StabilityMonitor(preset("mnist-class-8", theta=0.0))
    monitor.observe(1, rates={**PAPER_RATES, "theta": 0.0}, diverged=False, memory=MEMORY)
    report = monitor.report()
    assert report["failed"] == ["writes"] and not report["static_ok"] and not report["diverged"]
    assert report["conditions"]["writes"]["first_failed_epoch"] == 0
    assert report["conditions"]["stationary_input"]["first_failed_epoch"] == 0  # informational, reported


def test_the_memory_bound_is_reported_apart_from_the_verdict():
    monitor = StabilityMonitor(preset("mnist-class-8"))
    monitor.observe(1, rates=PAPER_RATES, diverged=False, memory={**MEMORY, "memory_bound_ratio": 1.5})
    report = monitor.report()
    assert report["ok"] and report["memory_bound"] == {"largest_ratio": 1.5, "holds": False}


# --- the memory bound: an invariant of the implementation ---------------------------------------------------


def bound_ratio(memory, W, q, glimpses):
    max_abs_w, max_readout = W.abs().amax(), memory.project(W, q).amax()
    return float(step_bound_ratio(memory.delta, memory.eta, max_abs_w, max_readout, bound=memory.bound,
                                  memory_size=memory.memory_size, glimpses=glimpses))


def test_the_bound_is_reached_by_saturated_writes():
    """e = 6 everywhere and a large theta saturate every write at eta 36 = 14.4 per entry; with delta = 0.5 and
    N = 3: W = 14.4 (1 + 0.5 + 0.25) = 25.2 in every entry, exactly the bound."""
    memory = HebbRosenblatt(4, delta=0.5, eta=0.4, theta=10.0)
    W = memory.init_state(1)
    for _ in range(3):
        W = memory.update(W, torch.full((1, 4), 6.0))
    assert torch.allclose(W, torch.full_like(W, 25.2))
    query = torch.full((1, 4), QUERY_BOUND)  # a read-out of 4 * 6 * 25.2 = 604.8, its bound too
    assert bound_ratio(memory, W, query, glimpses=3) == pytest.approx(1.0, rel=1e-6)
    assert bound_ratio(memory, W * 1.01, query, glimpses=3) == pytest.approx(1.01, rel=1e-6)  # what a bug would do


@pytest.mark.parametrize("delta", [0.05, 0.5, 1.0, 1.5, 1.95])
@pytest.mark.parametrize("activation", ["relu6", "sigmoid"])
def test_random_writes_never_break_the_bound(delta, activation):
    """Eq. 2 iterated N = 8 times on random nonnegative, bounded inputs (as sigma gives them) and random queries
    in [0, 6]: max |W| and every read-out stay under their bounds for any delta in (0, 2)."""
    generator = torch.Generator().manual_seed(int(delta * 100))
    memory = HebbRosenblatt(16, delta=delta, eta=0.7, theta=0.3, activation=activation)
    W = memory.init_state(32)
    for _ in range(8):
        e = memory.sigma(torch.randn(32, 16, generator=generator) * 10)
        W = memory.update(W, e)
    assert W.abs().amax() > 0 and (W < 0).any() == (delta > 1)  # it wrote; it alternates in sign past delta = 1
    q = torch.rand(32, 16, generator=generator) * QUERY_BOUND
    assert 0 < bound_ratio(memory, W, q, glimpses=8) <= 1 + 1e-6  # float32 rounding: delta = 1 reaches it


def test_the_ratio_uses_the_rates_of_the_forward_pass_not_those_after_the_step():
    """One step with learnable rates and a large learning rate (Adam moves each rate by about lr = 0.1, a
    quarter of eta): the step's ratio is the one of the rates it ran with."""
    cfg = preset("tiny", learnable_rates=True, lr=0.1)
    data = load_data(cfg.dataset)
    images, labels = data.train.images[:64], data.train.labels[:64]
    x01 = prepare_batch(images, augment="none", generator=None)
    x = to_model_input(x01, cfg, data)
    one = OneModel(cfg, torch.device("cpu"))
    before = copy.deepcopy(one.model)
    out = before(x)  # the same forward as the step's (no dropout, no augmentation)
    memory = before.memory

    def ratio(delta, eta):
        return float(step_bound_ratio(delta, eta, out.max_abs_w, out.max_readout, bound=memory.bound,
                                      memory_size=memory.memory_size, glimpses=cfg.glimpses))

    stats = EpochStats.zeros("cpu", 1)
    one.step(x[None], x01[None], labels[None], stats)
    after = one.model.memory
    assert float(after.eta) != pytest.approx(float(memory.eta), rel=0.1)  # the step moved the rates
    assert float(stats.memory_bound_ratio[0]) == pytest.approx(ratio(memory.delta, memory.eta), rel=1e-5)
    assert ratio(after.delta.detach(), after.eta.detach()) != pytest.approx(ratio(memory.delta, memory.eta), rel=0.05)
