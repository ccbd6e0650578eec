"""Which fixed memory rates (delta, eta, theta of Eq. 2) train, and do the Appendix A conditions predict it?

A grid that reaches into the region the conditions exclude: delta up to 2 (delta > 1 breaks `decay`:
W oscillates), eta up to 2, theta including 0 (with W = 0 and theta = 0 nothing is ever written).
Rates stay fixed (with --learnable-rates the grid holds their starting points). Every trial runs; the
ones breaking a condition are flagged in MLflow, never dropped (`stability.ok`, `stability.flags`,
`stability.static_ok`, `stability.diverged`).

    python studies/memory_rates.py                     # the study: 6 x 4 x 3 rates x 5 seeds, 200 epochs each
    python studies/memory_rates.py --quick             # small mode: 3 settings x 2 seeds, tiny preset, 1 epoch
    python studies/memory_rates.py --resume            # continue after a crash or a stop
    python studies/memory_rates.py --learnable-rates   # the same grid as starting points of learned rates

Small mode runs three settings: the paper's (0.2, 0.4, 0.5), which is stable; delta = 1.5, flagged
before training (`decay`) and trained anyway; and one that diverges during training (`finite`).
Nothing inside the grid diverges: ReLU6 bounds each write to 36 eta per entry and W is scaled by
(1 - delta) per glimpse, so over the tiny preset's 3 glimpses W stays finite (tried on it for one
epoch: delta = 2.5, eta = 1e6 and even delta = 1e13 all stay finite). The diverging setting
therefore takes eta = 1e38, the most extreme kind of legal (finite) rate: its first write, up to
36 eta, is beyond float32's largest number, so W, then the loss, become inf/NaN in the first step.
"""

import sys

from ray import tune

from stawm.study import runner

GRID = {
    "delta": [0.05, 0.2, 0.5, 1.0, 1.5, 2.0],
    "eta": [0.1, 0.4, 1.0, 2.0],
    "theta": [0.0, 0.5, 1.0],
}
QUICK_SETTINGS = [
    {"delta": 0.2, "eta": 0.4, "theta": 0.5},  # the paper's: stable
    {"delta": 1.5, "eta": 0.4, "theta": 0.5},  # breaks `decay` before training
    {"delta": 0.2, "eta": 1e38, "theta": 0.5},  # overflows float32 at the first write: `finite`
]


def flags(parser) -> None:
    parser.add_argument("--learnable-rates", action="store_true",
                        help="start the rates at each grid point and let the optimiser train them (default: fixed)")


def main(argv: list[str] | None = None) -> int:
    args = runner.parse_args(__doc__, preset="mnist-class-8", argv=argv, extra=flags)
    if args.quick:  # an explicit list of settings: each one is a trial's `_variant`
        runner.check_grid(args, variants=QUICK_SETTINGS)
        rates = {"_variant": tune.grid_search(QUICK_SETTINGS)}
    else:
        runner.check_grid(args, GRID)
        rates = {name: tune.grid_search(values) for name, values in GRID.items()}
    study = runner.start_study(args, swept=["delta", "eta", "theta"])
    space = {**study.base_config, "learnable_rates": args.extra["learnable_rates"], **rates, **runner.seed_space(args)}
    trainable = tune.with_resources(runner.trainable, runner.resources(args))
    tuner = runner.restored(args, trainable) or tune.Tuner(
        trainable,
        param_space=space,
        tune_config=runner.tune_config(args),
        run_config=runner.run_config(args),
    )
    return runner.finish_study(study, tuner.fit())


if __name__ == "__main__":
    sys.exit(main())
