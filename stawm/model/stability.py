"""Appendix A stability conditions, as ../shared/paper/NOTES.md states them for this project.

Two parts:
- `static_check(cfg)`: the named conditions of a configuration before anything runs, with the
  analytic bounds;
- `StabilityMonitor`: fed once per epoch by the training loop (largest W entry and read-out, the
  finiteness of loss, gradients and W, the current rates); records every condition that fails and
  the epoch it first failed (0 = before training), and writes one JSON-serialisable report.

A run breaks Appendix A when any non-informational condition fails, at the start or at any epoch.
Such a run is flagged, never dropped. Knows configs and tensors only (no Ray, no MLflow).
"""

from __future__ import annotations

import math

import torch

from ..config import Config
from ..schema import CONDITIONS
from .heads import QUERY_BOUND
from .memory import ACTIVATIONS

INFORMATIONAL = tuple(name for name, (kind, _) in CONDITIONS.items() if kind == "informational")
TOLERANCE = 1e-4  # relative slack on the bounds, for float32 rounding


def rate_conditions(delta: float, eta: float, theta: float) -> dict[str, bool]:
    """The conditions that depend on the rates alone; checked again each epoch when rates learn."""
    finite = all(math.isfinite(x) for x in (delta, eta, theta))
    return {
        "rates": finite and eta > 0 and delta > 0 and theta >= 0,
        "decay": finite and delta <= 1,
        "eta_gt_delta": finite and eta > delta,
    }


def bounds(cfg: Config, delta: float, eta: float) -> dict[str, float]:
    """Analytic bounds from W = 0 with 0 < delta <= 1 (NOTES, `bound`); inf where they do not hold."""
    lam = ACTIVATIONS[cfg.activation][1]  # Lambda_I = Lambda_II: both memory layers use sigma
    lam_q = QUERY_BOUND  # every query ends in a ReLU6, after its dropout
    if not (0 < delta <= 1 and math.isfinite(eta)):
        return {"w": math.inf, "readout": math.inf, "eq16": math.inf}
    w = (eta / delta) * lam * lam
    return {
        "w": w,
        "readout": cfg.memory_size * lam_q * w,
        "eq16": (eta / delta) * cfg.glimpses * cfg.memory_size * lam**2 * lam,  # Eq. 16's looser form
    }


def _ratio(value: float, bound: float) -> float:
    return 0.0 if math.isinf(bound) else value / bound


def step_bound_ratio(delta, eta, max_w, max_readout, *, bound: float, memory_size: int):
    """On-device (value / bound) for one step, with that step's rates (tensors); no host sync.

    bound: the activation's bound L (both memory layers); 0 where the bound does not apply (delta outside
    (0, 1]): `rates`/`decay` flag those runs.
    """
    lam2 = bound**2
    applies = (delta > 0) & (delta <= 1)
    # value * delta / (eta L^2) rather than value / bound: the bound itself overflows float32 for huge eta
    w_ratio = max_w * delta / (eta * lam2)
    readout_ratio = max_readout * delta / (eta * lam2 * memory_size * QUERY_BOUND)
    ratio = torch.maximum(w_ratio, readout_ratio)
    return torch.where(applies, ratio, torch.zeros_like(ratio)).detach()


def static_check(cfg: Config) -> dict:
    """Each named condition with pass/fail before training, plus the analytic bounds."""
    conditions = {
        "activation": cfg.activation in ACTIVATIONS,
        **rate_conditions(cfg.delta, cfg.eta, cfg.theta),
        "stationary_input": False,  # the 'where' pathway reads the emission LSTM: outside the proof, by design
    }
    failed = [n for n, ok in conditions.items() if not ok and n not in INFORMATIONAL]
    return {"ok": not failed, "conditions": conditions, "failed": failed, "bounds": bounds(cfg, cfg.delta, cfg.eta)}


class StabilityMonitor:
    """Collects per-epoch observations into the run's stability report."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.static = static_check(cfg)
        self.first_failed: dict[str, int] = {}
        self.history: list[dict] = []
        for name, ok in self.static["conditions"].items():
            if not ok:
                self.first_failed[name] = 0

    def observe(self, epoch: int, *, rates: dict[str, float], max_w: float, max_readout: float,
                loss_finite: bool, grads_finite: bool, w_finite: bool, bound_ratio: float | None = None) -> dict:
        """One epoch's conditions; returns {'ok', 'failed', 'values'} for the epoch record.

        bound_ratio: the largest (value / bound) seen during the epoch, each step against the rates of
        that step (learnable rates move the bound). Without it the epoch's maxima are compared with
        the bounds at the current rates, which is exact for fixed rates.
        """
        limit = bounds(self.cfg, rates["delta"], rates["eta"])
        if bound_ratio is None:
            bound_ratio = max(_ratio(max_w, limit["w"]), _ratio(max_readout, limit["readout"]))
        checks = {
            **rate_conditions(rates["delta"], rates["eta"], rates["theta"]),
            "bound": bound_ratio <= 1 + TOLERANCE,
            "finite": loss_finite and grads_finite and w_finite,
        }
        for name, ok in checks.items():
            if not ok:
                self.first_failed.setdefault(name, epoch)
        values = {**rates, "max_w": max_w, "max_readout": max_readout, "w_bound": limit["w"],
                  "readout_bound": limit["readout"], "bound_ratio": bound_ratio}
        self.history.append({"epoch": epoch, **values, "failed": [n for n, ok in checks.items() if not ok]})
        failed = self.failed()
        return {"ok": not failed, "failed": failed, "values": values}

    def failed(self) -> list[str]:
        """Every non-informational condition that has failed so far, in table order."""
        return [n for n in CONDITIONS if n in self.first_failed and n not in INFORMATIONAL]

    @property
    def diverged(self) -> bool:
        return "finite" in self.first_failed

    def report(self) -> dict:
        """The run's report: overall verdict (ignoring informational conditions), per-condition detail."""
        conditions = {
            name: {"kind": kind, "asks": asks, "ok": name not in self.first_failed,
                   "first_failed_epoch": self.first_failed.get(name)}
            for name, (kind, asks) in CONDITIONS.items()
        }
        failed = self.failed()
        return {
            "ok": not failed,
            "failed": failed,
            "static_ok": self.static["ok"],
            "diverged": self.diverged,
            "conditions": conditions,
            "bounds": _json_safe(self.static["bounds"]),
            "history": [_json_safe(h) for h in self.history],
        }


def _json_safe(d: dict) -> dict:
    """JSON has no inf/nan: write them as strings so the report always serialises."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
