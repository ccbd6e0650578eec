"""Appendix A on a training run: the conditions (`stawm.conditions`) each epoch, divergence as an outcome,
and the memory's own state; plus the memory bound, an invariant of the implementation.

- `StabilityMonitor`: fed once per epoch by the training loop (the epoch's rates, whether the loss,
  gradients or W went non-finite, the memory's statistics); records every condition that fails and the
  epoch it first failed (0 = before training), the epoch the run diverged, and writes one
  JSON-serialisable report.
- `step_bound_ratio`: max |W| and the largest read-out against their bounds (NOTES, "Invariants"), on the
  device, with the rates the forward pass used. With bounded sigma the bound holds by construction for
  any rates, so a ratio above 1 is a bug in the implementation, never a verdict on a run: tests check it,
  runs report it as the metric `memory_bound_ratio`, apart from the conditions.

Knows configs and tensors only (no Ray, no MLflow).
"""

from __future__ import annotations

import math

import torch

from ..conditions import CONDITIONS, failed, note_failures
from ..config import Config
from .heads import QUERY_BOUND

BOUND_TOLERANCE = 1e-4  # relative slack on the memory bound, for float32 rounding


def step_bound_ratio(delta, eta, max_w, max_readout, *, bound: float, memory_size: int, glimpses: int):
    """max(max|W| / W bound, max read-out / read-out bound) for one step, tensors on the device (no host sync).

    W after n writes from W = 0: each write adds eta e_i sigma_j with |e_i sigma_j| <= L^2 and the old W
    is scaled by (1 - delta), so |W_ij| <= |eta| L^2 sum_{k<N} |1 - delta|^k for any rates (NOTES); a
    read-out (W q)_i with 0 <= q <= L_q sums M entries: <= M L_q max|W|. delta, eta: the rates this
    forward pass used (before the optimiser moves them); bound: the activation's L.
    """
    decay = (1 - delta).abs()
    k = torch.arange(glimpses, dtype=decay.dtype, device=decay.device)
    w_bound = eta.abs() * bound**2 * (decay.unsqueeze(-1) ** k).sum(-1)
    readout_bound = w_bound * memory_size * QUERY_BOUND
    ratio = torch.maximum(max_w / w_bound, max_readout / readout_bound)
    # a bound that overflowed (huge rates) says nothing; eta = 0 writes nothing, so W stays 0 (0/0)
    informative = w_bound.isfinite() & (w_bound > 0)
    return torch.where(informative, ratio, torch.zeros_like(ratio)).detach()


class StabilityMonitor:
    """Collects per-epoch observations into the run's stability report."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.first_failed: dict[str, int] = {}
        self.static = note_failures(self.first_failed, 0, cfg.activation, cfg.delta, cfg.eta, cfg.theta)
        self.diverged_epoch: int | None = None
        self.history: list[dict] = []

    def observe(self, epoch: int, *, rates: dict[str, float], diverged: bool, memory: dict[str, float]) -> dict:
        """One epoch: the conditions on its rates, whether it diverged (loss, gradients or W not finite),
        and the memory's statistics (kept in the history). Returns {'ok', 'failed'} so far."""
        checks = note_failures(self.first_failed, epoch, self.cfg.activation, rates["delta"], rates["eta"],
                               rates["theta"])
        if diverged and self.diverged_epoch is None:
            self.diverged_epoch = epoch
        self.history.append({"epoch": epoch, **rates, **memory, "failed": failed(checks), "diverged": diverged})
        flagged = self.failed()
        return {"ok": not flagged, "failed": flagged}

    def failed(self) -> list[str]:
        """Every flagging condition that has failed so far, in table order."""
        return failed({name: name not in self.first_failed for name in CONDITIONS})

    @property
    def diverged(self) -> bool:
        return self.diverged_epoch is not None

    def report(self) -> dict:
        """The run's report: the verdict on the conditions (each with its source), the outcome `diverged`,
        and the memory bound (an invariant, reported apart: it flags nothing)."""
        conditions = {
            name: {"source": c.source, "asks": c.asks, "informational": c.informational,
                   "ok": name not in self.first_failed, "first_failed_epoch": self.first_failed.get(name)}
            for name, c in CONDITIONS.items()
        }
        largest = max((h["memory_bound_ratio"] for h in self.history  # a diverged epoch's is NaN or inf
                       if math.isfinite(h.get("memory_bound_ratio", math.nan))), default=0.0)
        flagged = self.failed()
        return {
            "ok": not flagged,
            "failed": flagged,
            "static_ok": not failed(self.static),
            "diverged": self.diverged,
            "diverged_epoch": self.diverged_epoch,
            "conditions": conditions,
            "memory_bound": {"largest_ratio": largest, "holds": largest <= 1 + BOUND_TOLERANCE},
            "history": [_json_safe(h) for h in self.history],
        }


def _json_safe(d: dict) -> dict:
    """JSON has no inf/nan: write them as strings so the report always serialises."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
