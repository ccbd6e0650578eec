"""The stability conditions, each with where it comes from (Appendix A, Section 3.1, or derived here) and what
kind of check it is.

A condition is a prediction made from a configuration's activation and rates, before training and again
on each epoch's rates when they learn. What happened to a run (it diverged, learned nothing, trained
worse than the paper's rates) is an outcome, measured (`analysis/outcomes.py`); the two never share a flag.

Sources:
- `paper`: the paper states it (Appendix A's closing paragraph, or Section 3.1);
- `paper (reading)`: the paper states it, but its symbols were lost in extraction; this is our reading;
- `derived`: not in the paper; derived here (NOTES says how), and labelled so wherever it is shown.

Categories (shown beside each condition wherever conditions are tabulated against outcomes):
- `by construction`: holds or fails by how a run is built, so its agreement with an outcome checks the
  implementation, not a prediction (`writes`: with ReLU6 and W = 0 at the start, theta = 0 writes
  eta e (x) sigma(0) = 0 at every glimpse, W stays 0 and the run cannot learn through its memory;
  `activation`: the config accepts only bounded, nonnegative activations);
- `could fail`: a choice of rates, or rates that learn, can break it at any scale (`rates`, `decay`);
  whether it did is the count of runs it flagged;
- `informational`: reported, never flags a run (`stationary_input`, never met by STAWM's design;
  `eta_gt_delta`, a guess).

Informational conditions are reported but never flag a run. A run is flagged when any other condition
fails, at the start or at any epoch; a flagged run is kept, in every mean.

Plain Python (no torch): the runs check it while they train, the analysis re-checks recorded rates with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PAPER, READING, DERIVED = "paper", "paper (reading)", "derived"
BY_CONSTRUCTION, COULD_FAIL, INFORMATIONAL = "by construction", "could fail", "informational"

# sigma of the memory's layers I and II: (sigma(0), its upper bound Lambda). Nonnegative and bounded both.
ACTIVATIONS = {"relu6": (0.0, 6.0), "sigmoid": (0.5, 1.0)}


@dataclass(frozen=True)
class Condition:
    source: str  # PAPER, READING or DERIVED
    asks: str
    informational: bool = False  # reported, never flags a run
    category: str = COULD_FAIL  # BY_CONSTRUCTION, COULD_FAIL or INFORMATIONAL (the module's docstring says which)


CONDITIONS = {
    "activation": Condition(PAPER, "sigma_I and sigma_II nonnegative and bounded (condition 2; ReLU6: 6, sigmoid: 1)",
                            category=BY_CONSTRUCTION),
    "stationary_input": Condition(PAPER, "memory input independent of recurrent outputs (condition 1): STAWM's "
                                         "'where' pathway reads the emission LSTM, so never met", informational=True,
                                  category=INFORMATIONAL),
    "rates": Condition(READING, "delta > 0, eta >= 0, theta >= 0 (condition 3, read from Eq. 15)"),
    "writes": Condition(READING, "theta > 0 when sigma(0) = 0, since W starts at 0 (Section 3.1's sentence: with "
                                 "theta = 0 'nothing can be learned', read as a requirement; Eq. 15 from phi_0 = 0 "
                                 "stays at 0)", category=BY_CONSTRUCTION),
    "eta_gt_delta": Condition(READING, "eta > delta (a guess at condition 3's lost comparison)", informational=True,
                              category=INFORMATIONAL),
    "decay": Condition(DERIVED, "0 < delta <= 1: the discrete update W <- (1 - delta) W + ... keeps W >= 0 and "
                                "monotone, as the Appendix's argument needs (1 < delta < 2: bounded, alternating; "
                                "delta >= 2: grows as |1 - delta|^N)"),
}


def check(activation: str, delta: float, eta: float, theta: float) -> dict[str, bool]:
    """Every condition on one activation and one set of rates: name -> holds. A NaN or inf rate fails
    every condition on the rates (it satisfies no comparison that means anything)."""
    finite = all(math.isfinite(x) for x in (delta, eta, theta))
    sigma_at_zero = ACTIVATIONS.get(activation, (0.0, math.inf))[0]
    return {
        "activation": activation in ACTIVATIONS,
        "stationary_input": False,
        "rates": finite and delta > 0 and eta >= 0 and theta >= 0,
        "writes": finite and (theta > 0 or sigma_at_zero > 0),
        "eta_gt_delta": finite and eta > delta,
        "decay": finite and 0 < delta <= 1,
    }


def note_failures(first: dict[str, int], epoch: int, activation: str, delta: float, eta: float,
                  theta: float) -> dict[str, bool]:
    """`check` one epoch's rates (epoch 0: the configured ones) and record in `first` the epoch each condition
    first failed; returns the checks. The one bookkeeping of a run's monitor and of the analysis's re-check."""
    checks = check(activation, delta, eta, theta)
    for name, ok in checks.items():
        if not ok:
            first.setdefault(name, epoch)
    return checks


def failed(checks: dict[str, bool]) -> list[str]:
    """The conditions that flag a run (not informational) and fail, in table order."""
    return [name for name, c in CONDITIONS.items() if not c.informational and not checks.get(name, True)]


# --- a rule derived from Section 3.1, for stopping runs early --------------------------------------

# Activations with sigma(0) = 0 whose gradient at 0 is 0 as torch computes it (ReLU6's kink at 0 takes slope 0).
FLAT_AT_ZERO = ("relu6",)


def provably_stuck(activation: str, theta: float, max_abs_w: float, *, draws: bool = False) -> bool:
    """True when a run's memory can never be written again, whatever further training does (derived, not the
    paper's: Section 3.1 says only that with theta = 0 'nothing can be learned').

    The argument: if W = 0 through a whole epoch (`max_abs_w`, the epoch's largest |W| entry, is 0), theta = 0
    and sigma is flat at 0, every write of Eq. 2 is eta e (x) sigma(0 e + 0 e) = 0, so W stays 0; every read
    sigma(W q) is sigma(0) = 0 with zero slope, so no gradient reaches the memory, its rates (learnable or not)
    or any layer before it, and nothing upstream moves either. Only the layers after the read-out train, on a
    constant input: a classifier can then learn at best the most frequent class. A model that also draws is
    never called stuck: its decoder can still learn the mean image from that constant input.
    """
    return (not draws and activation in FLAT_AT_ZERO and theta == 0 and max_abs_w == 0)
