"""Which memory rates and glimpse settings does a TPE search find, and do they hold up over fresh seeds?

Stage 1, the search (study NAME-search): Optuna's TPE, seeded (--search-seed), suggests delta, eta, theta,
glimpse_size and glimpses. Each suggestion trains with seeds 0..SEEDS-1 and is scored by its mean validation
error over them (`validation_size` images carved from the training set; the test set is never looked at).
Optuna is told one value per suggestion: that mean.
- By default each seed is a trial of its own (ray.tune.search.Repeater: the repeat index `__trial_index__` is
  the seed), so a configuration's seeds train at once on as many workers.
- With --asha, each suggestion is ONE trial that trains all its seeds fused in one process (`seeds: [0..S-1]`,
  stawm.train.fused), reporting their mean validation error every epoch. ASHA judges that mean: at each rung
  (epoch --asha-grace-period x --asha-reduction-factor^k, below --epochs) a configuration goes on only if its
  seeds' mean is in the best 1/reduction-factor of the configurations that reached that epoch before it;
  otherwise all its seeds stop together, at the same epoch. A configuration is never judged on one seed, and
  none of its seeds is stopped alone. It is then scored (for Optuna and stage 2) on its last epoch's mean.
- With --fuse-seeds (without --asha), the same fused trial per suggestion, trained to the end: packs a GPU,
  but a suggestion's seeds share one trial's resources instead of running on S workers.

Each seed keeps its own MLflow run either way.

Stage 2, the table (study NAME): the --top best configurations retrained on the whole training set
over fresh seeds listed explicitly (100..104), scored on the test set. Kept apart from the search that
chose them, as its own Tuner, MLflow experiment and parent run.

    python studies/search.py                           # 20 suggestions x 5 seeds, then the best over 5 seeds
    python studies/search.py --asha --samples 100      # 100 suggestions, each its 5 seeds fused; ASHA on their mean
    python studies/search.py --quick                   # small mode: 2 suggestions x 2 seeds, then 2 seeds
    python studies/search.py --resume                  # continue after a crash or a stop (either stage)
    optuna-dashboard sqlite:///optuna.db               # the search as Optuna kept it (study NAME-search)
"""

import sys
from dataclasses import dataclass
from typing import Annotated

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter, Repeater
from ray.tune.search.optuna import OptunaSearch

from stawm import schema
from stawm.flags import PositiveInt, at_least, flag
from stawm.study import runner

SPACE = {
    "delta": tune.uniform(0.01, 1.0),
    "eta": tune.loguniform(0.01, 2.0),
    "theta": tune.uniform(0.0, 1.0),
    "glimpse_size": tune.choice([6, 8, 12, 16, 28]),
    "glimpses": tune.randint(2, 13),  # 2..12
}
QUICK_SPACE = {**SPACE, "glimpse_size": tune.choice([6, 8]), "glimpses": tune.randint(2, 5)}
RERUN_SEEDS = [100, 101, 102, 103, 104]  # fresh: not the seeds the search selected on
AboveOne = at_least(float, 1, above=True)  # ASHA's reduction factor


@dataclass
class Flags:
    """The search's own flags."""

    # configurations the search tries
    samples: Annotated[PositiveInt, flag(unset="20; 2 with --quick")] = 0
    top: PositiveInt = 1  # best configurations rerun over fresh seeds
    # ASHA early stopping of whole configurations: each suggestion's seeds fused in one trial, judged on their mean
    asha: bool = False
    asha_grace_period: PositiveInt = 1  # --asha: epochs every configuration trains before ASHA may stop it
    # --asha: 1/this of the configurations reaching a rung go on; rungs at grace period x this^k epochs
    asha_reduction_factor: AboveOne = 4.0
    # training images held out to score the search
    validation_size: Annotated[PositiveInt, flag(unset="10000; 500 with --quick")] = 0
    search_seed: int = 0  # seed of the TPE sampler: the same seed, the same first suggestions
    # Optuna storage URL the search is kept in, for optuna-dashboard and optuna.load_study
    optuna_storage: Annotated[str, flag(unset="sqlite optuna.db beside a sqlite MLflow store, else in the "
                                              "working folder")] = ""


def main(argv: list[str] | None = None) -> int:
    args = runner.parse_args(__doc__, preset="mnist-class-8", argv=argv, own=Flags)
    own = args.own  # resolved here, so that the parent run records the values used
    own.samples = own.samples or (2 if args.quick else 20)
    own.validation_size = own.validation_size or (500 if args.quick else 10000)
    samples, top, validation_size = own.samples, own.top, own.validation_size
    if own.asha and own.asha_grace_period > args.config["epochs"]:
        runner.fail(f"--asha-grace-period {own.asha_grace_period} is more than --epochs {args.config['epochs']}")
    space = QUICK_SPACE if args.quick else SPACE
    runner.check_grid(args, {"glimpse_size": space["glimpse_size"].categories, "validation_size": [validation_size]})
    swept = list(space)
    # the Optuna study is named as the search's MLflow experiment; refused if it exists, unless --resume
    storage, own.optuna_storage = runner.optuna_storage(args, f"{args.name}-search", own.optuna_storage)

    # Stage 1: the search, scored on the validation split.
    fused = own.asha or args.fuse_seeds  # one trial per suggestion, its seeds fused: what ASHA must judge
    repeat = 1 if fused else args.seeds  # trials per suggestion
    rerun = RERUN_SEEDS[: args.seeds]
    # both stages' plans before the first starts; --plan stops after the second
    search_plan = runner.plan(args, configurations=samples, fused=fused, name=f"{args.name}-search",
                              fixed={"validation_size": validation_size},
                              max_concurrent=args.max_concurrent or 2 * repeat, last=False)
    rerun_plan = runner.plan(args, configurations=top, seeds=rerun)
    study = runner.start_study(args, swept=swept, name=f"{args.name}-search",
                               fixed={"validation_size": validation_size}, plan=search_plan)
    searcher = OptunaSearch(metric=schema.VAL_ERROR, mode="min", seed=own.search_seed, storage=storage,
                            study_name=study.name)
    if not fused:
        searcher = Repeater(searcher, repeat=repeat, set_index=True)  # Optuna is told the mean of the S trials
    trainable = tune.with_resources(tune.with_parameters(runner.trainable, context=study.context),
                                    runner.resources(args))
    tuner = runner.restored(args, trainable, name=study.name) or tune.Tuner(
        trainable,
        param_space={**space, "seeds": runner.seeds(args)} if fused else space,
        tune_config=runner.tune_config(
            args,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=args.max_concurrent or 2 * repeat),
            # ASHA sees a fused trial's val_error: its seeds' mean, each epoch (training_iteration)
            scheduler=ASHAScheduler(metric=schema.VAL_ERROR, mode="min", max_t=args.config["epochs"],
                                    grace_period=own.asha_grace_period, reduction_factor=own.asha_reduction_factor)
            if own.asha else None,
            num_samples=samples * repeat,  # a multiple of the Repeater's repeat
        ),
        run_config=runner.run_config(args, name=study.name),
    )
    searched = tuner.fit()
    status = runner.finish_study(study, searched)

    # Stage 2: the best configurations over fresh seeds, on the whole training set, scored on the test set.
    best = runner.best_configs(searched, swept, metric=schema.VAL_ERROR, top=top)
    print(f"best configurations (mean {schema.VAL_ERROR} over seeds):", *best, sep="\n  ")
    study = runner.start_study(args, swept=swept, plan=rerun_plan)
    trainable = tune.with_resources(tune.with_parameters(runner.trainable, context=study.context),
                                    runner.resources(args))
    tuner = runner.restored(args, trainable) or tune.Tuner(
        trainable,
        param_space={"variant": tune.grid_search(best),
                     **({"seeds": rerun} if args.fuse_seeds else {"seed": tune.grid_search(rerun)})},
        tune_config=runner.tune_config(args),
        run_config=runner.run_config(args),
    )
    return runner.finish_study(study, tuner.fit()) or status


if __name__ == "__main__":
    sys.exit(main())
