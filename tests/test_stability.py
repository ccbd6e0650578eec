"""Appendix A: the static check and the runtime monitor."""

import json
import math

import pytest
import torch

from stawm import HebbRosenblatt, preset
from stawm.model.heads import QUERY_BOUND
from stawm.model.stability import INFORMATIONAL, StabilityMonitor, bounds, static_check, step_bound_ratio

DEFAULT_RATES = {"delta": 0.2, "eta": 0.4, "theta": 0.5}


def healthy(**kw):
    values = dict(rates=DEFAULT_RATES, max_w=1.0, max_readout=10.0, loss_finite=True, grads_finite=True,
                  w_finite=True)
    return {**values, **kw}


def test_paper_defaults_pass_every_non_informational_condition():
    check = static_check(preset("mnist-class-8"))
    assert check["ok"] and check["failed"] == []
    assert {n: ok for n, ok in check["conditions"].items() if n not in INFORMATIONAL} == {
        "activation": True, "rates": True, "decay": True}
    assert check["conditions"]["eta_gt_delta"] is True
    assert check["conditions"]["stationary_input"] is False  # reported, not a failure


def test_bounds_worked_by_hand():
    # W_ij <= (0.4 / 0.2) * 6 * 6 = 72; (W q)_i <= 256 * 6 * 72 = 110592; Eq. 16: 2 * 8 * 256 * 216
    b = bounds(preset("mnist-class-8"), 0.2, 0.4)
    assert b["w"] == pytest.approx(72.0)
    assert b["readout"] == pytest.approx(110592.0)
    assert b["eq16"] == pytest.approx(2 * 8 * 256 * 216)
    assert bounds(preset("mnist-class-8", activation="sigmoid"), 0.5, 0.25)["w"] == pytest.approx(0.5)


def test_delta_above_one_fails_decay_only():
    check = static_check(preset("mnist-class-8", delta=1.5))
    assert check["failed"] == ["decay"]
    assert check["conditions"]["eta_gt_delta"] is False  # informational: reported, not failed
    assert math.isinf(check["bounds"]["w"])


def test_negative_eta_fails_rates():
    assert static_check(preset("mnist-class-8", eta=-0.1))["failed"] == ["rates"]


def test_nan_at_runtime_fails_finite_and_rates():
    monitor = StabilityMonitor(preset("mnist-class-8", learnable_rates=True))
    assert monitor.observe(1, **healthy())["ok"]
    verdict = monitor.observe(2, **healthy(rates={**DEFAULT_RATES, "eta": math.nan}, loss_finite=False))
    assert verdict["failed"] == ["rates", "decay", "finite"]  # a NaN rate satisfies no comparison
    report = monitor.report()
    assert report["conditions"]["finite"]["first_failed_epoch"] == 2
    assert report["conditions"]["rates"]["first_failed_epoch"] == 2
    assert report["diverged"] and not report["ok"] and report["static_ok"]


def test_bound_violation_is_caught_with_its_epoch():
    monitor = StabilityMonitor(preset("mnist-class-8"))
    monitor.observe(1, **healthy(max_w=71.9))
    verdict = monitor.observe(2, **healthy(max_w=72.5))  # above (eta/delta) * 36 = 72
    assert verdict["failed"] == ["bound"]
    assert monitor.report()["conditions"]["bound"]["first_failed_epoch"] == 2


def test_learned_rate_drifting_out_fails_per_epoch():
    monitor = StabilityMonitor(preset("mnist-class-8", learnable_rates=True))
    monitor.observe(1, **healthy())
    monitor.observe(2, **healthy(rates={"delta": 1.2, "eta": 0.4, "theta": 0.5}))
    assert monitor.report()["conditions"]["decay"]["first_failed_epoch"] == 2


def test_static_failure_is_recorded_at_epoch_zero_and_report_is_json():
    monitor = StabilityMonitor(preset("mnist-class-8", delta=1.5))
    monitor.observe(1, **healthy(rates={"delta": 1.5, "eta": 0.4, "theta": 0.5}))
    report = json.loads(json.dumps(monitor.report(), allow_nan=False))
    assert report["failed"] == ["decay"] and not report["static_ok"]
    assert report["conditions"]["decay"]["first_failed_epoch"] == 0
    assert report["conditions"]["stationary_input"]["first_failed_epoch"] == 0  # informational, reported
    assert report["ok"] is False


def test_bound_check_fires_exactly_when_a_hand_built_memory_breaks_it():
    """W entries and read-outs of a hand-built memory against (eta/delta) 36 = 72 and M 6 72 (M = 4: 1728)."""
    memory = HebbRosenblatt(4, delta=0.2, eta=0.4, theta=0.5)
    query = torch.full((1, 4), QUERY_BOUND)  # the largest query a ReLU6 lets through

    def ratio(W):
        max_w, max_readout = W.amax(), memory.project(W, query).amax()
        return float(step_bound_ratio(memory.delta, memory.eta, max_w, max_readout, bound=memory.bound,
                                      memory_size=memory.memory_size))

    at_bound = torch.full((1, 4, 4), 72.0)
    assert memory.project(at_bound, query).amax() == 1728.0  # 4 * 6 * 72, the read-out bound, reached
    assert ratio(at_bound) == pytest.approx(1.0)
    above = at_bound.clone()
    above[0, 2, 1] = 72.0 * 1.001
    below = at_bound * 0.999
    for W, breaks in ((at_bound, False), (below, False), (above, True)):
        monitor = StabilityMonitor(preset("mnist-class-8", memory_size=4))
        verdict = monitor.observe(1, **healthy(max_w=float(W.amax()), bound_ratio=ratio(W)))
        assert verdict["failed"] == (["bound"] if breaks else [])
    # a query of 12 (dropout's x2 after the ReLU6, the order this project once had) doubles the read-out
    assert float(memory.project(at_bound, 2 * query).amax()) / 1728.0 == pytest.approx(2.0)
