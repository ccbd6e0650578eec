"""Throughput: how many training images per second one device gives STAWM, and how to get more.

Times, in one run on one device:
(a) baseline: the authors' pipeline rebuilt here (their mnist_class_8.py): a torchvision-MNIST-style dataset
    of PIL images, per-image RandomRotation, ToTensor and Normalize in DataLoader worker processes
    (--workers, theirs was 10), the model eager, batch 128 (the config's), clipping by value, the loss and accuracy
    read with `.item()` every step as their training library (torchbearer) did (their per-epoch
    checkpoint and TensorBoard writing are left out, as (b) runs without a checkpoint folder too);
(b) the engine as users run it (stawm.engine.train), once per --engine-options (compile/precision);
(c) K trials packed on the device as separate Ray Tune trials with fractional resources
    (tune.with_resources(fn, {"gpu": 1/K, "cpu": cores/K})), K in --packed-ks; without Ray installed,
    K plain processes; on a CPU only K up to the number of cores;
(d) K trials fused in one process (stawm.fused.train_fused).
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

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python studies/throughput.py` from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from stawm.config import PRESETS, Config, preset  # noqa: E402
from stawm.schema import parse_pairs  # noqa: E402
from stawm.data import DATASETS, load_data  # noqa: E402
from stawm.engine import COMPILE_MODES, PRECISIONS, lr_factor, peak_memory_mb, train  # noqa: E402
from stawm.fused import train_fused  # noqa: E402
from stawm.model import STAWM  # noqa: E402

VARIANTS = {
    "a": "baseline: authors' pipeline",
    "b": "engine",
    "c": "packed: separate trials",
    "d": "fused: one process",
}
QUICK = dict(preset="tiny", dataset="mnist-sample", epochs=1, max_steps=3, ks="1,2", packed_ks="2", workers=1,
             threads=1, engine_options="none/fp32,none/bf16", fused_options="none/fp32")


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", default="mnist-class-8", choices=sorted(PRESETS), metavar="NAME",
                   help="the configuration every variant trains (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field of every variant, repeatable (e.g. --set glimpses=10)")
    p.add_argument("--dataset", choices=DATASETS, help="dataset (default: the preset's)")
    p.add_argument("--data-root", help="dataset folder (default: $STAWM_DATA or ~/.cache/stawm)")
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"],
                   help="device (default: cuda when available, here %(default)s)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per variant (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=0, help="cap on steps per epoch, 0 = whole epochs (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of (a) and (b); (c) and (d) use seeds 0..K-1")
    p.add_argument("--ks", default="1,2,4,8,16", help="trial counts K for (c) and (d) (default: %(default)s)")
    p.add_argument("--packed-ks", help="trial counts K for (c) (default: --ks)")
    p.add_argument("--skip", default="", help="variants to leave out, e.g. 'c' or 'ac'")
    p.add_argument("--engine-options", default=None, metavar="C/P,...",
                   help="(b) once per COMPILE/PRECISION pair; compile in "
                        f"{list(COMPILE_MODES)}, precision in {list(PRECISIONS)} "
                        "(default: cuda none/fp32,reduce-overhead/fp32,reduce-overhead/bf16; cpu none/fp32,none/bf16)")
    p.add_argument("--fused-options", default="none/fp32", metavar="C/P,...",
                   help="(d) with the first pair at every K, with the others at the largest K only (compile time)")
    p.add_argument("--packed-options", default="none/fp32", metavar="C/P", help="(c) trials' engine options")
    p.add_argument("--workers", type=int, default=min(10, os.cpu_count() or 1),
                   help="(a) DataLoader worker processes (the authors': 10; default min(10, cores) = %(default)s)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the whole plan this many times, round robin, and keep each variant's median run "
                        "(for noisy machines; default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads of this process (0 = torch's default); a busy shared CPU times "
                        "steadier with 1")
    p.add_argument("--time-limit", type=float, default=0,
                   help="start no new variant after this many seconds (0 = none); the JSON keeps what ran")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the rows here (rewritten after every row)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny preset, mnist-sample, 1 epoch of 3 steps, K = 1, 2 ((c): 2), 1 thread "
                        "(CPU, under a minute)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one packed trial in its own process
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.engine_options is None:
        args.engine_options = "none/fp32,reduce-overhead/fp32,reduce-overhead/bf16" if args.device == "cuda" \
            else "none/fp32,none/bf16"
    for name in ("ks", "packed_ks"):
        text = getattr(args, name) or args.ks
        setattr(args, name, [int(k) for k in str(text).split(",") if k.strip()] if isinstance(text, str) else text)
        if not getattr(args, name) or min(getattr(args, name)) < 1:
            p.error(f"--{name.replace('_', '-')} must list positive trial counts, got {getattr(args, name)}")
    unknown = set(args.skip) - set(VARIANTS)
    if unknown:
        p.error(f"--skip takes letters of {sorted(VARIANTS)}, got {sorted(unknown)}")
    try:
        for name in ("engine_options", "fused_options", "packed_options"):
            setattr(args, name, options(getattr(args, name)))
    except ValueError as err:
        p.error(str(err))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    return args


def options(text: str) -> list[tuple[str, str]]:
    """'none/fp32,reduce-overhead/bf16' -> [('none', 'fp32'), ('reduce-overhead', 'bf16')], checked."""
    pairs = []
    for item in text.split(","):
        compile_mode, _, precision = item.strip().partition("/")
        precision = precision or "fp32"
        if compile_mode not in COMPILE_MODES or precision not in PRECISIONS:
            raise ValueError(f"{item!r} is not COMPILE/PRECISION with compile in {list(COMPILE_MODES)} "
                             f"and precision in {list(PRECISIONS)}")
        pairs.append((compile_mode, precision))
    return pairs


# --- measuring ----------------------------------------------------------------------------------


def steady(values: list[float]) -> float:
    """The mean over epochs after the first when there are several (the first compiles and warms up)."""
    return statistics.fmean(values[1:] if len(values) > 1 else values)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def row(variant: str, K: int, opts: tuple[str, str] | None, *, epoch_seconds: list[float], images_per_epoch: int,
        wall: float, peak: float, test_errors: list[float], **extra) -> dict:
    s = steady(epoch_seconds)
    finite = [e for e in test_errors if e is not None and math.isfinite(e)]
    return {
        "variant": variant, "name": VARIANTS[variant], "K": K,
        "options": "/".join(opts) if opts else "", "seconds_per_epoch": s, "images_per_second": images_per_epoch / s,
        "first_epoch_seconds": epoch_seconds[0], "wall_seconds": wall, "peak_memory_mb": peak,
        "test_error": statistics.fmean(finite) if finite else None,
        "test_error_std": statistics.stdev(finite) if len(finite) > 1 else None,
        "test_errors": test_errors, **extra,
    }


# --- (a) the authors' pipeline ------------------------------------------------------------------


class PILDigits(torch.utils.data.Dataset):
    """torchvision.datasets.MNIST's __getitem__ over a split held as a uint8 tensor: PIL image, then transform."""

    def __init__(self, split, transform):
        self.images, self.labels, self.transform = split.images, split.labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i, 0].numpy())), int(self.labels[i])


def baseline(cfg: Config, device: torch.device, args) -> dict:
    """(a): the authors' MNIST classification script's pipeline, with this project's model and schedule."""
    from torchvision import transforms

    if cfg.task != "classify" or cfg.channels != 1:
        raise ValueError(f"the baseline mirrors the authors' MNIST classification scripts; {cfg.preset} is not one")
    data = load_data(cfg.dataset, args.data_root, validation_size=cfg.validation_size)  # on the CPU, for PIL
    norm = [transforms.Normalize(data.mean, data.std)] if cfg.normalize else []
    rotate = [transforms.RandomRotation(cfg.rotation_degrees)] if cfg.augment == "rotate" else []
    train_set = PILDigits(data.train, transforms.Compose([*rotate, transforms.ToTensor(), *norm]))
    test_set = PILDigits(data.test, transforms.Compose([transforms.ToTensor(), *norm]))
    loader_args = dict(batch_size=cfg.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, generator=torch.Generator().manual_seed(cfg.seed),
                                               **loader_args)
    test_loader = torch.utils.data.DataLoader(test_set, shuffle=False, **loader_args)

    torch.manual_seed(cfg.seed)
    model = STAWM(cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(cfg, epoch))
    reset_peak(device)
    epoch_seconds, images, test_errors = [], 0, []
    wall = time.perf_counter()
    for _ in range(cfg.epochs):
        model.train()
        start, images, running_loss, correct = time.perf_counter(), 0, 0.0, 0
        for step, (x, y) in enumerate(train_loader):
            if cfg.max_steps and step == cfg.max_steps:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            loss = F.nll_loss(out.log_probs, y)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_value_(params, cfg.grad_clip)
            optimizer.step()
            running_loss += loss.item()  # torchbearer's running metrics: a host sync per step
            correct += (out.log_probs.argmax(1) == y).sum().item()
            images += len(y)
        epoch_seconds.append(time.perf_counter() - start)
        scheduler.step()
        model.eval()
        errors = 0
        with torch.no_grad():
            for x, y in test_loader:
                errors += (model(x.to(device)).log_probs.argmax(1).cpu() != y).sum().item()
        test_errors.append(errors / len(test_set))
    wall = time.perf_counter() - wall
    return row("a", 1, None, epoch_seconds=epoch_seconds, images_per_epoch=images, wall=wall,
               peak=peak_memory_mb(device), test_errors=test_errors[-1:], workers=args.workers)


# --- (b) the engine, (d) fused trials -----------------------------------------------------------


def engine(cfg: Config, device: torch.device, data, opts: tuple[str, str]) -> dict:
    reset_peak(device)
    wall = time.perf_counter()
    records = []
    for record in train(cfg, device=device, data=data, compile=opts[0], precision=opts[1]):
        records.append(record)
        progress_line(record["epoch"], record["epoch_seconds"], [record.get("test_error")])
    wall = time.perf_counter() - wall
    last = records[-1]
    return row("b", 1, opts, epoch_seconds=[r["epoch_seconds"] for r in records],
               images_per_epoch=steps_per_epoch(cfg, data) * cfg.batch_size, wall=wall,
               peak=peak_memory_mb(device), test_errors=[last.get("test_error")])


def fused(cfg: Config, device: torch.device, data, K: int, opts: tuple[str, str]) -> dict:
    cfgs = [cfg.replace(seed=seed) for seed in range(K)]
    reset_peak(device)
    with warnings.catch_warnings(record=True) as caught:  # ops vmap runs one member at a time
        warnings.simplefilter("always")
        _vmap_fallback_warnings(True)
        try:
            wall = time.perf_counter()
            epochs = []
            for records in train_fused(cfgs, device=device, data=data, compile=opts[0], precision=opts[1]):
                epochs.append(records)
                live = [r for r in records if r is not None]
                progress_line(live[0]["epoch"], live[0]["epoch_seconds"], [r.get("test_error") for r in live])
            wall = time.perf_counter() - wall
        finally:
            _vmap_fallback_warnings(False)
    fallbacks = sorted({str(w.message).split("batching rule for ")[-1].split(".")[0]
                        for w in caught if "performance drop" in str(w.message)})
    last = [r for r in epochs[-1] if r is not None]
    return row("d", K, opts, epoch_seconds=[next(r for r in e if r is not None)["epoch_seconds"] for e in epochs],
               images_per_epoch=K * steps_per_epoch(cfg, data) * cfg.batch_size, wall=wall,
               peak=peak_memory_mb(device), test_errors=[r.get("test_error") for r in last],
               vmap_fallbacks=fallbacks, diverged=sum(r is None or r["diverged"] for r in epochs[-1]))


def progress_line(epoch: int, seconds: float, errors: list) -> None:
    finite = [e for e in errors if e is not None]
    error = f", test error {100 * statistics.fmean(finite):.2f}%" if finite else ""
    print(f"    epoch {epoch}: {seconds:.2f} s{error}", flush=True)


def _vmap_fallback_warnings(enabled: bool) -> None:
    try:  # private switch (torch 2.x); without it the check is simply absent
        torch._C._functorch._set_vmap_fallback_warning_enabled(enabled)
    except AttributeError:
        pass


def steps_per_epoch(cfg: Config, data) -> int:
    steps = len(data.train) // cfg.batch_size
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


# --- (c) packed trials --------------------------------------------------------------------------


def trial(spec: dict, report) -> None:
    """One packed trial: the engine on its own seed, `report`ing each epoch (Ray's or a JSON line)."""
    import torch as _torch  # imported here too: Ray ships this function to its workers by value

    from stawm.config import Config as _Config
    from stawm.data import load_data as _load_data
    from stawm.engine import train as _train

    cfg = _Config.from_flat(spec["cfg"])
    _torch.set_num_threads(spec["threads"])
    device = _torch.device(spec["device"])
    if device.type == "cuda":  # a fractional GPU only sets CUDA_VISIBLE_DEVICES: cap the memory here
        _torch.cuda.set_per_process_memory_fraction(spec["memory_fraction"], device)
    data = _load_data(cfg.dataset, spec["data_root"], validation_size=cfg.validation_size, device=device)
    records = _train(cfg, device=device, data=data, compile=spec["compile"], precision=spec["precision"])
    while True:
        called = time.time()  # the engine starts the epoch's training loop as soon as it is asked for it
        record = next(records, None)
        if record is None:
            return
        report({"epoch": record["epoch"], "epoch_seconds": record["epoch_seconds"],
                "images_per_second": record["images_per_second"], "test_error": record.get("test_error", math.nan),
                "peak_memory_mb": record["peak_memory_mb"], "start": called,
                "end": called + record["epoch_seconds"]})


def ray_trial(config: dict) -> None:
    from ray import tune

    trial(config["spec"] | {"cfg": {**config["spec"]["cfg"], "seed": config["seed"]}}, tune.report)


def packed(cfg: Config, device: torch.device, K: int, opts: tuple[str, str], args) -> dict:
    """(c): K trials on one device at once, each its own process; Ray Tune's when Ray is installed."""
    cores = os.cpu_count() or 1
    spec = {"cfg": cfg.to_flat(), "device": device.type, "data_root": str(Path(args.data_root).resolve())
            if args.data_root else None, "compile": opts[0], "precision": opts[1],
            "threads": max(1, min(args.threads or cores, cores // K)), "memory_fraction": 0.9 / K}
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's older reporter prints nothing at verbose=0
    try:
        import ray
        from ray import tune
    except ImportError:
        ray = None
    wall = time.perf_counter()
    if ray is not None:
        if not ray.is_initialized():
            ray.init(address="local",  # our own cluster, never one found running on the machine
                     num_cpus=cores, num_gpus=1 if device.type == "cuda" else 0, include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR",
                     runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        resources = {"cpu": cores / K, **({"gpu": 1 / K} if device.type == "cuda" else {})}
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
    else:
        trials = processes(spec, K)
        how = "plain processes (Ray is not installed)"
    wall = time.perf_counter() - wall
    epochs = min(len(t) for t in trials)
    first = 1 if epochs > 1 else 0  # the steady epochs, as steady() takes them
    start = min(t[first]["start"] for t in trials)
    end = max(t[epochs - 1]["end"] for t in trials)
    images = sum(t[i]["images_per_second"] * t[i]["epoch_seconds"] for t in trials for i in range(first, epochs))
    return {**row("c", K, opts, epoch_seconds=[statistics.fmean(t[i]["epoch_seconds"] for t in trials)
                                                for i in range(epochs)],
                  images_per_epoch=1, wall=wall, peak=sum(t[-1]["peak_memory_mb"] for t in trials),
                  test_errors=[t[-1]["test_error"] for t in trials], how=how),
            # all trials' images over the span from the first trial's start to the last one's end of training
            # (staggered starts lengthen the span: a lower bound); the sum of their own rates beside it
            "images_per_second": images / (end - start),
            "images_per_second_sum_of_trials": sum(steady([e["images_per_second"] for e in t]) for t in trials),
            "trial_windows": [[t[i]["start"], t[i]["end"]] for t in trials for i in range(epochs)]}


def processes(spec: dict, K: int) -> list[list[dict]]:
    """K copies of this script in --worker mode, at once; each prints one JSON line per epoch."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    workers = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps({**spec, "cfg": {**spec["cfg"], "seed": k}})],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for k in range(K)]
    trials = []
    for w in workers:
        out, err = w.communicate()
        if w.returncode != 0:
            raise RuntimeError(f"a packed trial failed ({w.returncode}): {err[-2000:]}")
        trials.append([json.loads(line) for line in out.splitlines() if line.startswith("{")])
    return trials


# --- the run ------------------------------------------------------------------------------------


def plan(args) -> list[tuple[str, int, tuple[str, str]]]:
    """(variant, K, options) in the order they run: the most telling first, Ray last."""
    steps = [("a", 1, None), ("b", 1, args.engine_options[0])]
    steps += [("d", K, args.fused_options[0]) for K in args.ks]
    steps += [("b", 1, o) for o in args.engine_options[1:]]
    steps += [("d", max(args.ks), o) for o in args.fused_options[1:]]
    steps += [("c", K, args.packed_options[0]) for K in args.packed_ks]
    return [s for s in steps if s[0] not in args.skip]


def warm_up(cfg: Config, device: torch.device) -> None:
    """Two training steps on noise, so that no variant pays the process's one-off start-up (CUDA context,
    cuDNN/oneDNN handles and kernels): otherwise whichever runs first looks slower."""
    model = STAWM(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x = torch.rand(cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size, device=device)
    labels = torch.zeros(cfg.batch_size, dtype=torch.long, device=device)
    for _ in range(2):
        loss, _ = model.loss(model(x), x, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:  # one packed trial, in its own process
        trial(json.loads(args.worker), lambda metrics: print(json.dumps(metrics), flush=True))
        return 0
    changes = {**parse_pairs(args.set), "epochs": args.epochs, "max_steps": args.max_steps, "seed": args.seed}
    if args.dataset:
        changes["dataset"] = args.dataset
    if args.quick:
        changes["augment"] = "rotate"  # so the smoke test runs both rotation pipelines
    cfg = preset(args.preset, **changes)
    device = torch.device(args.device)
    cores = os.cpu_count() or 1
    data = load_data(cfg.dataset, args.data_root, validation_size=cfg.validation_size, image_size=cfg.image_size,
                     device=device)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"meta": meta(args, cfg, device), "rows": [], "notes": []}
    warm_up(cfg, device)
    began = time.perf_counter()
    samples: dict[tuple, list[dict]] = {}  # (variant, K, options) -> one row per repeat
    for repeat in range(args.repeats):  # round robin, so that a noisy minute hits every variant alike
        for variant, K, opts in plan(args):
            label = f"({variant}) {VARIANTS[variant]} K={K} {'/'.join(opts) if opts else ''}".rstrip()
            if args.time_limit and time.perf_counter() - began > args.time_limit:
                report["notes"].append(f"{label}: not run (repeat {repeat + 1}), past --time-limit {args.time_limit:g} s")
                continue
            if variant == "c" and device.type == "cpu" and K > cores:
                if repeat == 0:
                    report["notes"].append(f"{label}: skipped, {K} trials on {cores} CPU cores would only time-slice")
                continue
            print(f"running {label} ...", flush=True)
            try:
                if variant == "a":
                    result = baseline(cfg, device, args)
                elif variant == "b":
                    result = engine(cfg, device, data, opts)
                elif variant == "c":
                    result = packed(cfg, device, K, opts, args)
                else:
                    result = fused(cfg, device, data, K, opts)
            except Exception as err:  # one broken variant must not cost the others (one GPU call runs them all)
                report["notes"].append(f"{label}: failed: {type(err).__name__}: {str(err)[:1000]}")
                print(f"  failed: {type(err).__name__}: {err}", flush=True)
                continue
            print(f"  {result['seconds_per_epoch']:.3f} s/epoch, {result['images_per_second']:.0f} images/s, "
                  f"test error {fmt_error(result)}", flush=True)
            result["full_epoch_seconds"] = K * len(data.train) / result["images_per_second"]
            samples.setdefault((variant, K, opts), []).append(result)
            report["rows"] = [median_row(rows) for rows in samples.values()]
            add_speedups(report["rows"])
            write(report, args.json)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    report["accuracy"] = accuracy(report["rows"])
    write(report, args.json)
    print()
    print(table(report))
    return 0


def median_row(rows: list[dict]) -> dict:
    """One variant over its repeats: the run with the median images/s, the other runs' rates beside it."""
    ranked = sorted(rows, key=lambda r: r["images_per_second"])
    return {**ranked[(len(ranked) - 1) // 2], "repeats": len(rows),
            "images_per_second_repeats": [r["images_per_second"] for r in rows]}


def meta(args, cfg: Config, device: torch.device) -> dict:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores",
        "torch": torch.__version__, "preset": cfg.preset, "dataset": cfg.dataset, "epochs": cfg.epochs,
        "max_steps": cfg.max_steps, "batch_size": cfg.batch_size, "seed": args.seed, "ks": args.ks,
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "config": cfg.to_flat(),
    }


def add_speedups(rows: list[dict]) -> None:
    base = next((r for r in rows if r["variant"] == "a"), None)
    for r in rows:
        r["speedup"] = r["images_per_second"] / base["images_per_second"] if base else None


def accuracy(rows: list[dict]) -> dict:
    """The test errors of (a) and (b) after the same epochs and seed, beside the spread over fused seeds."""
    pick = lambda v, opts="": next((r for r in rows if r["variant"] == v and (not opts or r["options"] == opts)), None)
    a, b = pick("a"), pick("b", "none/fp32")
    spread = max((r for r in rows if r["variant"] == "d" and r["test_error_std"] is not None),
                 key=lambda r: r["K"], default=None)
    return {"baseline": a and a["test_error"], "engine": b and b["test_error"],
            "seeds": spread and {"K": spread["K"], "mean": spread["test_error"], "std": spread["test_error_std"]}}


def fmt_error(r: dict) -> str:
    if r.get("test_error") is None:
        return "-"
    text = f"{100 * r['test_error']:.2f}%"
    if r.get("test_error_std") is not None:
        text += f" ± {100 * r['test_error_std']:.2f}"
    return text


def table(report: dict) -> str:
    """The rows as a Markdown table, then the notes and the accuracy check."""
    lines = ["| variant | K | options | s/epoch | full-epoch s | images/s | wall s | peak MB | speed-up | test error |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        lines.append(f"| ({r['variant']}) {r['name']} | {r['K']} | {r['options'] or '-'} | {r['seconds_per_epoch']:.3f} "
                     f"| {r['full_epoch_seconds']:.2f} | {r['images_per_second']:.0f} | {r['wall_seconds']:.1f} | {r['peak_memory_mb']:.0f} "
                     f"| {speedup} | {fmt_error(r)} |")
    meta_ = report["meta"]
    lines.append("")
    lines.append(f"{meta_['device']}, torch {meta_['torch']}, {meta_['preset']} on {meta_['dataset']}, "
                 f"{meta_['epochs']} epoch(s) of {meta_['max_steps'] or 'all'} steps, batch {meta_['batch_size']}, "
                 f"{meta_['threads']} torch thread(s), median of {meta_['repeats']} round-robin repeat(s). "
                 "Test error for K trials: mean ± std (ddof=1) over seeds 0..K-1.")
    acc = report.get("accuracy") or {}
    if acc.get("baseline") is not None and acc.get("engine") is not None:
        seeds = acc.get("seeds")
        noise = f"; over {seeds['K']} fused seeds {100 * seeds['mean']:.2f}% ± {100 * seeds['std']:.2f}" if seeds else ""
        lines.append(f"Accuracy check, same epochs and seed: baseline {100 * acc['baseline']:.2f}%, "
                     f"engine {100 * acc['engine']:.2f}%{noise}.")
    for r in report["rows"]:
        if r.get("vmap_fallbacks"):
            lines.append(f"(d) K={r['K']}: vmap ran these ops member by member: {', '.join(r['vmap_fallbacks'])}")
    lines += [f"Note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def write(report: dict, path: Path | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
