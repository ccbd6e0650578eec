"""How does the number of glimpses N change MNIST classification error (Table 1 uses N = 8 at S_g = 8)?

Classification with the paper's 8x8 configuration (preset mnist-class-8), only N varied, crossed with
seeds 0..4; everything else as Appendix D.

    python studies/glimpse_count.py                    # the study: N = 1 ... 12 x 5 seeds, 200 epochs each
    python studies/glimpse_count.py --quick            # small mode: tiny preset, N = 2 and 4, 2 seeds, 1 epoch
    python studies/glimpse_count.py --resume           # continue after a crash or a stop
"""

import sys

from ray import tune

from stawm.study import runner

GLIMPSES = list(range(1, 13))  # N = 1 ... 12
QUICK_GLIMPSES = [2, 4]


def main(argv: list[str] | None = None) -> int:
    args = runner.parse_args(__doc__, preset="mnist-class-8", argv=argv)
    grid = {"glimpses": QUICK_GLIMPSES if args.quick else GLIMPSES}
    runner.check_grid(args, grid)
    plan = runner.plan(args, configurations=len(grid["glimpses"]))  # trials x epochs x s/epoch; --plan stops here
    study = runner.start_study(args, swept=list(grid), plan=plan)
    space = {
        "glimpses": tune.grid_search(grid["glimpses"]),
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
