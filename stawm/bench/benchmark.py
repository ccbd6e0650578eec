"""The variants the throughput benchmark (studies/throughput.py) times, its flags and its plan.

(a) `baseline`: the authors' pipeline rebuilt; (b) `engine`: stawm.train.train under speed options;
(c) `packed`: K separate Ray Tune trials with fractional resources, each `packed_trial`, which
studies/throughput.py runs (so that this package needs no Ray; `packed_spec` and `packed_row` are its pieces);
(d) `fused`: K trials in one process (the same loop with K members). Each returns one row (`report.row`).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import torch
import torch.nn.functional as F

from .. import schema
from ..config import Config
from ..flags import (ConfigFlags, ConfigGroup, DataFlags, Group, NaturalFloat, NaturalInt, PositiveInt, fail, flag,
                     flat, parse, value_type)
from ..model import STAWM
from ..train.data import load_data, load_training_data
from ..train.loop import lr_factor, peak_memory_mb, steps_per_epoch, train
from ..train.step import COMPILE_MODES, PRECISIONS
from .report import VARIANTS, row, steady

# --- flags and the plan ---------------------------------------------------------------------------


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


def counts(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]: trial counts K, each at least 1."""
    ks = [int(k) for k in text.split(",") if k.strip()]
    if not ks or min(ks) < 1:
        raise ValueError(f"must list positive trial counts, got {text!r}")
    return ks


def variants(text: str) -> str:
    """--skip's letters, each a variant."""
    if set(text) - set(VARIANTS):
        raise ValueError(f"takes letters of {sorted(VARIANTS)}, got {sorted(set(text) - set(VARIANTS))}")
    return text


Options = value_type(list, options, "C/P,...", show=lambda pairs: ",".join("/".join(p) for p in pairs))
Counts = value_type(list, counts, "K,...", show=lambda ks: ",".join(map(str, ks)))
Variants = value_type(str, variants, "LETTERS")
ENGINE_OPTIONS = {"cuda": "none/fp32,reduce-overhead/fp32,reduce-overhead/bf16", "cpu": "none/fp32,none/bf16"}


@flat("configuration", "data")  # args.preset, args.data_root...: see stawm.flags.flat
@dataclass
class BenchArgs:
    """The benchmark's own flags; the configuration and the data are the groups stawm-train and the studies share."""

    seed: int = 0  # seed of (a) and (b); (c) and (d) use seeds 0..K-1
    ks: Counts = field(default_factory=lambda: [1, 2, 4, 8, 16])  # trial counts K for (c) and (d)
    packed_ks: Annotated[Counts, flag(unset="--ks")] = field(default_factory=list)  # trial counts K for (c)
    skip: Variants = ""  # variants to leave out, e.g. 'c' or 'ac'
    engine_options: Annotated[Options, flag(
        unset="; ".join(f"{device}: {pairs}" for device, pairs in ENGINE_OPTIONS.items()),
        help=f"(b) once per COMPILE/PRECISION pair; compile in {list(COMPILE_MODES)}, precision in "
             f"{list(PRECISIONS)}")] = field(default_factory=list)
    # (d) with the first pair at every K, with the others at the largest K only (compile time)
    fused_options: Options = field(default_factory=lambda: options("none/fp32"))
    packed_options: Options = field(default_factory=lambda: options("none/fp32"))  # (c) trials' engine options
    workers: int = min(10, os.cpu_count() or 1)  # (a) DataLoader worker processes (the authors': 10)
    # run the whole plan this many times, round robin, and keep each variant's median run (for noisy machines)
    repeats: PositiveInt = 1
    # torch CPU threads of this process (0 = torch's default); a busy shared CPU times steadier with 1
    threads: NaturalInt = 0
    # start no new variant after this many seconds (0 = none); the JSON keeps what ran
    time_limit: NaturalFloat = 0.0
    # write the rows here (rewritten after every row)
    json: Annotated[Optional[Path], flag(unset="none", metavar="FILE")] = None
    # smoke test: tiny preset, mnist-sample, 1 epoch of 3 steps, K = 1, 2 ((c): 2), 1 thread (CPU, under a minute)
    quick: bool = False
    configuration: ConfigGroup = field(default_factory=lambda: ConfigFlags(preset="mnist-class-8", epochs=2))
    data: Group[DataFlags] = field(default_factory=DataFlags)


QUICK = dict(preset="tiny", dataset="mnist-sample", epochs=1, max_steps=3, ks=[1, 2], packed_ks=[2], workers=1,
             threads=1, engine_options=options(ENGINE_OPTIONS["cpu"]), fused_options=options("none/fp32"))


def parse_args(doc: str, argv=None) -> BenchArgs:
    prog = Path(sys.argv[0]).name
    args = parse(BenchArgs, argv, prog=prog, description=doc)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.engine_options = args.engine_options or options(ENGINE_OPTIONS[args.device])
    args.packed_ks = args.packed_ks or args.ks
    if args.device == "cuda" and not torch.cuda.is_available():
        fail(prog, "--device cuda, but torch sees no CUDA device")
    return args


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


def packed_spec(cfg: Config, device: torch.device, K: int, opts: tuple[str, str], args) -> dict:
    """What each of (c)'s K trials gets (`packed_trial`'s spec, its seed apart): an equal share of the cores."""
    cores = os.cpu_count() or 1
    return {"cfg": cfg.to_flat(), "device": device.type, "data_root": str(Path(args.data_root).resolve())
            if args.data_root else None, "compile": opts[0], "precision": opts[1],
            "threads": max(1, min(args.threads or cores, cores // K)), "memory_fraction": 0.9 / K}


def packed_row(trials: list[list[dict]], opts: tuple[str, str], wall: float, how: str) -> dict:
    """(c)'s row from its K trials' reports (one list of `packed_trial` reports per trial, in epoch order)."""
    epochs = min(len(t) for t in trials)
    first = 1 if epochs > 1 else 0  # the steady epochs, as steady() takes them
    start = min(t[first]["start"] for t in trials)
    end = max(t[epochs - 1]["end"] for t in trials)
    images = sum(t[i]["images_per_second"] * t[i]["epoch_seconds"] for t in trials for i in range(first, epochs))
    return {**row("c", len(trials), opts, epoch_seconds=[statistics.fmean(t[i]["epoch_seconds"] for t in trials)
                                                         for i in range(epochs)],
                  images_per_epoch=1, wall=wall, peak=sum(t[-1]["peak_memory_mb"] for t in trials),
                  test_errors=[t[-1][schema.TEST_ERROR] for t in trials], how=how),
            # all trials' images over the span from the first trial's start to the last one's end of training
            # (staggered starts lengthen the span: a lower bound); the sum of their own rates beside it
            "images_per_second": images / (end - start),
            "images_per_second_sum_of_trials": sum(steady([e["images_per_second"] for e in t]) for t in trials),
            "trial_windows": [[t[i]["start"], t[i]["end"]] for t in trials for i in range(epochs)]}
