"""How does the glimpse size S_g change MNIST classification error (Table 1's S_g = 8 vs 28 and between)?

Classification with the paper's 8x8 configuration (preset mnist-class-8), only S_g varied, crossed
with seeds 0..4; everything else as Appendix D. S_g = 4 is not in the grid: the paper's glimpse CNN
(two unpadded 3x3 convolutions, the second with stride 2) leaves nothing of a 4x4 glimpse, and Config
validation says so.

    python studies/glimpse_size.py                     # the study: 5 sizes x 5 seeds, 200 epochs each
    python studies/glimpse_size.py --quick             # small mode: tiny preset, sizes 6 and 8, 2 seeds, 1 epoch
    python studies/glimpse_size.py --resume            # continue after a crash or a stop
    python studies/glimpse_size.py --fuse-seeds --gpus-per-trial auto  # one trial per size, its seeds fused
"""

import sys

from ray import tune

from stawm.study import runner

SIZES = [6, 8, 12, 16, 28]
QUICK_SIZES = [6, 8]


def main(argv: list[str] | None = None) -> int:
    args = runner.parse_args(__doc__, preset="mnist-class-8", argv=argv)
    grid = {"glimpse_size": QUICK_SIZES if args.quick else SIZES}
    runner.check_grid(args, grid)
    plan = runner.plan(args, configurations=len(grid["glimpse_size"]))  # trials x epochs x s/epoch; --plan stops here
    study = runner.start_study(args, swept=list(grid), plan=plan)
    space = {
        "glimpse_size": tune.grid_search(grid["glimpse_size"]),
        **runner.seed_space(args),  # seed: tune.grid_search(seeds), or with --fuse-seeds seeds: the list
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
