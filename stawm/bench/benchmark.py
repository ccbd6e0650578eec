"""The variants the throughput benchmark (studies/throughput.py) times, its flags and its plan.

(a) `baseline`: the authors' pipeline rebuilt; (b) `engine`: stawm.train.train under speed options;
(c) `packed`: K separate Ray Tune trials with fractional resources, each `packed_trial`; (d) `fused`:
K trials in one process (the same loop with K members). Each returns one row (`report.row`).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import schema
from ..config import PRESETS, Config
from ..model import STAWM
from ..provenance import PROJECT_ROOT
from ..train.data import DATASETS, load_data, load_training_data
from ..train.loop import lr_factor, peak_memory_mb, steps_per_epoch, train
from ..train.step import COMPILE_MODES, PRECISIONS
from .report import VARIANTS, row, steady

QUICK = dict(preset="tiny", dataset="mnist-sample", epochs=1, max_steps=3, ks="1,2", packed_ks="2", workers=1,
             threads=1, engine_options="none/fp32,none/bf16", fused_options="none/fp32")


# --- flags and the plan ---------------------------------------------------------------------------


def parse_args(doc: str, argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc.split("\n\n", 1)[1])
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


def plan(args) -> list[tuple[str, int, tuple[str, str] | None]]:
    """(variant, K, options) in the order they run: the most telling first, Ray last."""
    steps = [("a", 1, None), ("b", 1, args.engine_options[0])]
    steps += [("d", K, args.fused_options[0]) for K in args.ks]
    steps += [("b", 1, o) for o in args.engine_options[1:]]
    steps += [("d", max(args.ks), o) for o in args.fused_options[1:]]
    steps += [("c", K, args.packed_options[0]) for K in args.packed_ks]
    return [s for s in steps if s[0] not in args.skip]


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


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
    order = torch.Generator().manual_seed(cfg.seed)
    train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, generator=order, **loader_args)
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


def loop(variant: str, cfg: Config, device: torch.device, data, K: int, opts: tuple[str, str]) -> dict:
    """(b) the loop as users run it (one config) or (d) K seeds of `cfg` fused in it: one row."""
    cfgs = [cfg.replace(seed=seed) for seed in range(K)] if variant == "d" else [cfg]
    reset_peak(device)
    with warnings.catch_warnings(record=True) as caught:  # ops vmap runs one member at a time
        warnings.simplefilter("always")
        _vmap_fallback_warnings(True)
        try:
            wall = time.perf_counter()
            epochs = []
            for records in train(cfgs, device=device, data=data, compile=opts[0], precision=opts[1]):
                epochs.append(records)
                live = [r for r in records if r is not None]
                progress_line(live[0]["epoch"], live[0]["epoch_seconds"], [r.get(schema.TEST_ERROR) for r in live])
            wall = time.perf_counter() - wall
        finally:
            _vmap_fallback_warnings(False)
    fallbacks = sorted({str(w.message).split("batching rule for ")[-1].split(".")[0]
                        for w in caught if "performance drop" in str(w.message)})
    last = [r for r in epochs[-1] if r is not None]
    extra = {"vmap_fallbacks": fallbacks, "diverged": sum(r is None or r["diverged"] for r in epochs[-1])}
    return row(variant, len(cfgs), opts,
               epoch_seconds=[next(r for r in e if r is not None)["epoch_seconds"] for e in epochs],
               images_per_epoch=len(cfgs) * steps_per_epoch(cfg, len(data.train)) * cfg.batch_size, wall=wall,
               peak=peak_memory_mb(device), test_errors=[r.get(schema.TEST_ERROR) for r in last],
               **(extra if variant == "d" else {}))


def progress_line(epoch: int, seconds: float, errors: list) -> None:
    finite = [e for e in errors if e is not None]
    error = f", test error {100 * statistics.fmean(finite):.2f}%" if finite else ""
    print(f"    epoch {epoch}: {seconds:.2f} s{error}", flush=True)


def _vmap_fallback_warnings(enabled: bool) -> None:
    try:  # private switch (torch 2.x); without it the check is simply absent
        torch._C._functorch._set_vmap_fallback_warning_enabled(enabled)
    except AttributeError:
        pass


# --- (c) packed trials --------------------------------------------------------------------------


def packed_trial(spec: dict, report) -> None:
    """One packed trial: the loop on its own seed, `report`ing each epoch with its training window."""
    cfg = Config.from_flat(spec["cfg"])
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if device.type == "cuda":  # a fractional GPU only sets CUDA_VISIBLE_DEVICES: cap the memory here
        torch.cuda.set_per_process_memory_fraction(spec["memory_fraction"], device)
    data = load_training_data(cfg, spec["data_root"], device)
    epochs = train([cfg], device=device, data=data, compile=spec["compile"], precision=spec["precision"])
    while True:
        called = time.time()  # the loop starts the epoch's training as soon as it is asked for it
        records = next(epochs, None)
        if records is None:
            return
        (record,) = records
        report({"epoch": record["epoch"], "epoch_seconds": record["epoch_seconds"],
                "images_per_second": record["images_per_second"],
                schema.TEST_ERROR: record.get(schema.TEST_ERROR, math.nan), "peak_memory_mb": record["peak_memory_mb"],
                "start": called,
                "end": called + record["epoch_seconds"]})


def _ray_trial(config: dict) -> None:
    from ray import tune

    packed_trial(config["spec"] | {"cfg": {**config["spec"]["cfg"], "seed": config["seed"]}}, tune.report)


def packed(cfg: Config, device: torch.device, K: int, opts: tuple[str, str], args) -> dict:
    """(c): K trials on one device at once, each a Ray Tune trial in its own process."""
    import ray
    from ray import tune

    cores = os.cpu_count() or 1
    spec = {"cfg": cfg.to_flat(), "device": device.type, "data_root": str(Path(args.data_root).resolve())
            if args.data_root else None, "compile": opts[0], "precision": opts[1],
            "threads": max(1, min(args.threads or cores, cores // K)), "memory_fraction": 0.9 / K}
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's older reporter prints nothing at verbose=0
    wall = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address="local",  # our own cluster, never one found running on the machine
                 num_cpus=cores, num_gpus=1 if device.type == "cuda" else 0, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR",  # stawm from this checkout, installed or not:
                 runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}})
    resources = {"cpu": cores / K, **({"gpu": 1 / K} if device.type == "cuda" else {})}
    tuner = tune.Tuner(
        tune.with_resources(_ray_trial, resources),
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
    wall = time.perf_counter() - wall
    epochs = min(len(t) for t in trials)
    first = 1 if epochs > 1 else 0  # the steady epochs, as steady() takes them
    start = min(t[first]["start"] for t in trials)
    end = max(t[epochs - 1]["end"] for t in trials)
    images = sum(t[i]["images_per_second"] * t[i]["epoch_seconds"] for t in trials for i in range(first, epochs))
    how = "Ray Tune trials, " + ", ".join(f"{k} {v:g}" for k, v in resources.items())
    return {**row("c", K, opts, epoch_seconds=[statistics.fmean(t[i]["epoch_seconds"] for t in trials)
                                                for i in range(epochs)],
                  images_per_epoch=1, wall=wall, peak=sum(t[-1]["peak_memory_mb"] for t in trials),
                  test_errors=[t[-1][schema.TEST_ERROR] for t in trials], how=how),
            # all trials' images over the span from the first trial's start to the last one's end of training
            # (staggered starts lengthen the span: a lower bound); the sum of their own rates beside it
            "images_per_second": images / (end - start),
            "images_per_second_sum_of_trials": sum(steady([e["images_per_second"] for e in t]) for t in trials),
            "trial_windows": [[t[i]["start"], t[i]["end"]] for t in trials for i in range(epochs)]}
