"""Which fixed memory rates (delta, eta, theta of Eq. 2) train, and how well do the Appendix A conditions
predict it?

A grid that reaches past every condition (stawm.conditions): delta from 0.05 to 4 (delta > 1 breaks the
derived `decay`: W alternates in sign; delta >= 2 lets it grow as |1 - delta|^N), eta from 0.1 to 2, theta
including 0 (with W = 0, theta = 0 and ReLU6 nothing is ever written: the paper's `writes`). Rates stay
fixed (with --learnable-rates the grid holds their starting points). Every trial runs; the ones breaking a
condition are flagged in MLflow, never dropped (`stability.ok`, `stability.flags`, `stability.static_ok`);
whether they diverged, learned nothing or trained worse than the paper's rates is measured by the analysis.

    python studies/memory_rates.py                     # the study: 7 x 3 x 4 rates x 5 seeds, 200 epochs each
    python studies/memory_rates.py --quick             # small mode: 3 settings x 2 seeds, tiny preset, 1 epoch
    python studies/memory_rates.py --resume            # continue after a crash or a stop
    python studies/memory_rates.py --learnable-rates   # the same grid as starting points of learned rates
    python studies/memory_rates.py --delta 2 3 4 --eta 0.4 --config.grad-clip-mode none   # a slice, unclipped

Small mode runs three settings: the paper's (0.2, 0.4, 0.5), which meets every condition; delta = 1.5,
flagged before training (`decay`) and trained anyway; and one that diverges during training (the outcome
`diverged`). Nothing inside the grid is sure to diverge in one epoch of the tiny preset (3 glimpses):
ReLU6 bounds each write to 36 eta per entry, so W grows at most as |1 - delta|^3. The diverging setting
therefore takes eta = 1e38, the most extreme kind of legal (finite) rate: its first write, up to 36 eta,
is beyond float32's largest number, so W, then the loss, become inf/NaN in the first step.
"""

import math
import sys
from dataclasses import dataclass, field

from ray import tune

from stawm.study import runner

GRID = {
    "delta": [0.05, 0.2, 1.0, 1.5, 2.0, 3.0, 4.0],
    "eta": [0.1, 0.4, 2.0],
    "theta": [0.0, 0.01, 0.1, 0.5],
}
QUICK_SETTINGS = [
    {"delta": 0.2, "eta": 0.4, "theta": 0.5},  # the paper's: stable
    {"delta": 1.5, "eta": 0.4, "theta": 0.5},  # breaks `decay` before training
    {"delta": 0.2, "eta": 1e38, "theta": 0.5},  # overflows float32 at the first write: diverges
]


@dataclass
class Flags:
    """The grid's values, and whether the rates stay fixed."""

    # start the rates at each grid point and let the optimiser train them (else they stay fixed)
    learnable_rates: bool = False
    delta: list[float] = field(default_factory=lambda: GRID["delta"])  # the grid's delta values
    eta: list[float] = field(default_factory=lambda: GRID["eta"])  # the grid's eta values
    theta: list[float] = field(default_factory=lambda: GRID["theta"])  # the grid's theta values


def main(argv: list[str] | None = None) -> int:
    args = runner.parse_args(__doc__, preset="mnist-class-8", argv=argv, own=Flags)
    if args.quick:  # an explicit list of settings: each one is a trial's `variant`
        runner.check_grid(args, variants=QUICK_SETTINGS)
        rates, settings = {"variant": tune.grid_search(QUICK_SETTINGS)}, len(QUICK_SETTINGS)
    else:
        grid = {name: getattr(args.own, name) for name in GRID}
        runner.check_grid(args, grid)
        rates = {name: tune.grid_search(values) for name, values in grid.items()}
        settings = math.prod(len(values) for values in grid.values())
    fixed = {"learnable_rates": args.own.learnable_rates}
    plan = runner.plan(args, configurations=settings, fixed=fixed)  # trials x epochs x s/epoch; --plan stops here
    study = runner.start_study(args, swept=["delta", "eta", "theta"], fixed=fixed, plan=plan)
    space = {**rates, **runner.seed_space(args)}
    trainable = tune.with_resources(tune.with_parameters(runner.trainable, context=study.context),
                                    runner.resources(args))
    tuner = runner.restored(args, trainable) or tune.Tuner(
        trainable,
        param_space=space,
        tune_config=runner.tune_config(args),
        run_config=runner.run_config(args),
    )
    return runner.finish_study(study, tuner.fit())


if __name__ == "__main__":
    sys.exit(main())
