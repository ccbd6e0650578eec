"""Does learning the memory rates (delta, eta, theta) help MNIST classification, and from where they start?

Classification with the paper's 8x8 configuration (preset mnist-class-8): learnable_rates False or
True, crossed with three initial (delta, eta, theta) settings and seeds 0..4. The paper's setting
(0.2, 0.4, 0.5) comes first; the other two start slower to forget and faster to write. Learned rates
are checked against Appendix A after every epoch, so a run whose rates wander out is flagged.

    python studies/learnable_rates.py                  # the study: 2 x 3 settings x 5 seeds, 200 epochs each
    python studies/learnable_rates.py --quick          # small mode: fixed vs learnable from the paper's rates, 2 seeds
    python studies/learnable_rates.py --resume         # continue after a crash or a stop
"""

import sys

from ray import tune

from stawm.study import runner

INITIAL_RATES = [
    {"delta": 0.2, "eta": 0.4, "theta": 0.5},  # the paper's initialisation
    {"delta": 0.05, "eta": 0.4, "theta": 0.5},
    {"delta": 0.2, "eta": 1.0, "theta": 1.0},
]


def main(argv: list[str] | None = None) -> int:
    args = runner.parse_args(__doc__, preset="mnist-class-8", argv=argv)
    settings = INITIAL_RATES[:1] if args.quick else INITIAL_RATES
    grid = {"learnable_rates": [False, True]}
    runner.check_grid(args, grid, variants=settings)
    plan = runner.plan(args, configurations=len(grid["learnable_rates"]) * len(settings))  # --plan stops here
    study = runner.start_study(args, swept=["learnable_rates", "delta", "eta", "theta"], plan=plan)
    space = {
        "learnable_rates": tune.grid_search(grid["learnable_rates"]),
        "variant": tune.grid_search(settings),  # the initial rates, one dict per setting
        **runner.seed_space(args),
    }
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
