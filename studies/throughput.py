"""Throughput: how many training images per second one device gives STAWM, and how to get more.

Times, in one run on one device:
(a) baseline: the authors' pipeline rebuilt here (their mnist_class_8.py): a torchvision-MNIST-style dataset
    of PIL images, per-image RandomRotation, ToTensor and Normalize in DataLoader worker processes
    (--workers, theirs was 10), the model eager, batch 128 (the config's), clipping by value, the loss and accuracy
    read with `.item()` every step as their training library (torchbearer) did (their per-epoch
    checkpoint and TensorBoard writing are left out, as (b) runs without a checkpoint folder too);
(b) the loop as users run it (stawm.train.train), once per --engine-options (compile/precision);
(c) K trials packed on the device as separate Ray Tune trials with fractional resources
    (tune.with_resources(fn, {"gpu": 1/K, "cpu": cores/K})), K in --packed-ks; on a CPU only K up to
    the number of cores;
(d) K trials fused in one process (the same loop with K members).
The "trials" of (c) and (d) are seeds 0..K-1 of one configuration: there is no search space.

What the table means (also in the JSON, per row):
- s/epoch: training-loop seconds per epoch, the mean over the epochs after the first when there are
  several (the first holds compilation and warm-up), else the first. (a) includes starting its workers.
- full-epoch s: K x the training set / images/s, the training time of one whole epoch of each of the K
  trials at the measured rate (with --max-steps, a projection).
- images/s: images trained per second over those epochs; for K trials, all of them together ((c): all
  trials' images over the span from the first trial's start of those epochs to the last one's end).
- wall s: from the start of training (data loaded) to the last record: compilation, evaluation, start-up.
- peak MB: CUDA: the most memory this variant allocated ((c): summed over its processes). CPU: the
  process's peak RSS, a high-water mark over the whole benchmark (compare nothing with it).
- test error: after the same epochs from the same seed, so no speed is bought with accuracy; for K
  trials the mean over the K seeds, whose spread is the noise to judge (a) against (b) by.
With --repeats R the whole plan runs R times round robin and each row is that variant's median run (by
images/s): on a shared, noisy machine compare only ratios of rows from one such run.

    python studies/throughput.py --quick                                    # CPU smoke test, < 1 minute
    python studies/throughput.py --device cuda --epochs 2 --max-steps 100 --json throughput.json
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from stawm import schema
from stawm.bench import benchmark
from stawm.bench import report as report_
from stawm.flags import fail
from stawm.provenance import PROJECT_ROOT
from stawm.train.data import load_training_data


def ray_trial(config: dict) -> None:
    """One of (c)'s trials: `benchmark.packed_trial` on the seed Tune gives it, reporting to Tune."""
    from ray import tune

    benchmark.packed_trial(config["spec"] | {"cfg": {**config["spec"]["cfg"], "seed": config["seed"]}}, tune.report)


def packed(cfg, device: torch.device, K: int, opts: tuple[str, str], args) -> dict:
    """(c): K trials on one device at once, each a Ray Tune trial in its own process."""
    import ray  # here: (a), (b) and (d) run without Ray installed
    from ray import tune

    cores = os.cpu_count() or 1
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's older reporter prints nothing at verbose=0
    wall = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address="local",  # our own cluster, never one found running on the machine
                 num_cpus=cores, num_gpus=1 if device.type == "cuda" else 0, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR",  # stawm from this checkout, installed or not:
                 runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}})
    resources = {"cpu": cores / K, **({"gpu": 1 / K} if device.type == "cuda" else {})}
    spec = benchmark.packed_spec(cfg, device, K, opts, args)
    tuner = tune.Tuner(
        tune.with_resources(ray_trial, resources),
        param_space={"seed": tune.grid_search(list(range(K))), "spec": spec},
        tune_config=tune.TuneConfig(max_concurrent_trials=K),
        run_config=tune.RunConfig(name=f"throughput-packed-k{K}", storage_path=tempfile.mkdtemp(prefix="stawm-ray-"),
                                  verbose=0),
    )
    results = tuner.fit()
    errors = [str(r.error) for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {K} Ray trials failed; the first: {errors[0][-2000:]}")
    trials = [r.metrics_dataframe.to_dict("records") for r in results]
    how = "Ray Tune trials, " + ", ".join(f"{k} {v:g}" for k, v in resources.items())
    return benchmark.packed_row(trials, opts, time.perf_counter() - wall, how)


def main(argv: list[str] | None = None) -> int:
    args = benchmark.parse_args(__doc__, argv)
    quick = {"augment": "rotate"} if args.quick else {}  # so the smoke test runs both rotation pipelines
    try:
        cfg = args.configuration.config(seed=args.seed, **quick)  # --preset, --epochs, --config.FIELD...
    except schema.ParamError as err:  # ConfigError is one
        fail(Path(sys.argv[0]).name, err)
    device, cores = torch.device(args.device), os.cpu_count() or 1
    data = load_training_data(cfg, args.data_root, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"meta": report_.meta(args, cfg, device), "rows": [], "notes": []}
    benchmark.warm_up(cfg, device)
    began = time.perf_counter()
    samples: dict[tuple, list[dict]] = {}  # (variant, K, options) -> one row per repeat
    for repeat in range(args.repeats):  # round robin, so that a noisy minute hits every variant alike
        for variant, K, opts in benchmark.plan(args):
            label = f"({variant}) {report_.VARIANTS[variant]} K={K} {'/'.join(opts) if opts else ''}".rstrip()
            if args.time_limit and time.perf_counter() - began > args.time_limit:
                report["notes"].append(f"{label}: not run (repeat {repeat + 1}), past --time-limit "
                                       f"{args.time_limit:g} s")
                continue
            if variant == "c" and device.type == "cpu" and K > cores:
                if repeat == 0:
                    report["notes"].append(f"{label}: skipped, {K} trials on {cores} CPU cores would only time-slice")
                continue
            print(f"running {label} ...", flush=True)
            try:
                if variant == "a":
                    result = benchmark.baseline(cfg, device, args)
                elif variant == "c":
                    result = packed(cfg, device, K, opts, args)
                else:  # (b) the loop, (d) K seeds fused in it
                    result = benchmark.loop(variant, cfg, device, data, K, opts)
            except Exception as err:  # one broken variant must not cost the others (one GPU call runs them all)
                report["notes"].append(f"{label}: failed: {type(err).__name__}: {str(err)[:1000]}")
                print(f"  failed: {type(err).__name__}: {err}", flush=True)
                continue
            print(f"  {result['seconds_per_epoch']:.3f} s/epoch, {result['images_per_second']:.0f} images/s, "
                  f"test error {report_.fmt_error(result)}", flush=True)
            result["full_epoch_seconds"] = K * len(data.train) / result["images_per_second"]
            samples.setdefault((variant, K, opts), []).append(result)
            report["rows"] = [report_.median_row(rows) for rows in samples.values()]
            report_.add_speedups(report["rows"])
            report_.write(report, args.json)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    report["accuracy"] = report_.accuracy(report["rows"])
    report_.write(report, args.json)
    print()
    print(report_.table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
