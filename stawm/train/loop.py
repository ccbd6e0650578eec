"""The training loop: K >= 1 configurations ("members") trained together, one record per member per epoch.

`train(cfgs, ...)` is a generator. Whoever drives it (Ray Tune, MLflow, the CLI, a benchmark) consumes
the records; the loop knows none of them. A plain run is K = 1: `step.OneModel`, the model with torch's
own Adam. K > 1 is `fused.FusedStack`: the members vectorised as one model. Everything around the step
is here, once: the schedule, the epoch over each member's own batches, the clock and progress bar,
evaluation, the records with each member's stability verdict, the checkpoint and resume.

The step keeps no Python-side state and has no shape-dependent branches: training batches are full
(drop_last), statistics stay on the device until the epoch ends (no `.item()` per step), so the same
step can be compiled or graph-captured. A fused stack changes shape only between epochs, when members that
stopped leave it: a compiled step recompiles once then.

Speed options (`compile=`, `precision=`) change how the model runs, never what it computes by default:
with compile="none" and precision="fp32" the loop is the plain eager one, bit for bit.
"""

from __future__ import annotations

import functools
import math
import resource
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .. import schema
from ..conditions import provably_stuck
from ..config import Config
from ..model.stability import StabilityMonitor
from .checkpoints import (checkpoint_path, global_rng_state, load_checkpoint, monitor_state, restore_monitor,
                          save_checkpoint, set_global_rng_state)
from .data import DataBundle, iterate_batches, load_training_data, prepare_batch, to_model_input
from .fused import FusedStack, check_fusible
from .step import EpochStats, Members, OneModel, check_speed_options


def train(cfgs: Sequence[Config], *, device: str | torch.device = "cpu", data_root: str | Path | None = None,
          checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = False,
          data: DataBundle | None = None, compile: str = "none",
          precision: str = "fp32") -> Iterator[list[dict | None]]:
    """Train the configs; yield, per epoch, one record per member (its checkpoint already on disk).

    One config is the plain run; several must differ only in `fused.FUSIBLE_FIELDS` (FusionError names
    the field otherwise). Every record has a stop_reason, None while the member goes on: "diverged" (non-finite
    loss, gradients or W) or, with cfg.stop_stuck, "stuck" (`stop_reason`) ends it after that epoch. Later
    epochs yield None in its place (in a fused stack it no longer costs compute), and the run ends when every
    member has stopped.
    images_per_second is each member's own rate (their sum is the run's).
    resume=True continues from checkpoint_dir's checkpoint when there is one (epochs already done are not
    yielded again). Speed options: compile (one of COMPILE_MODES: torch.compile, static shapes) and
    precision ("bf16": autocast of the forward pass); the defaults run the plain eager fp32 loop.
    """
    cfgs = list(cfgs)
    check_fusible(cfgs)
    check_speed_options(compile, precision)
    device = torch.device(device)
    if device.type == "cuda":  # a worker process may run trial after trial: each reports its own peak
        torch.cuda.reset_peak_memory_stats(device)
    if data is None:  # loading draws nothing from the seeded streams, so loading first changes no init
        data = load_training_data(cfgs[0], data_root, device)
    members: Members = (OneModel(cfgs[0], device, compile, precision) if len(cfgs) == 1 else
                        FusedStack(cfgs, device, compile, precision))
    monitors = [StabilityMonitor(cfg) for cfg in cfgs]
    stopped = [False] * len(cfgs)  # members whose record with a stop_reason has been yielded
    start_epoch = 0
    path = checkpoint_path(checkpoint_dir)
    if resume and path is not None and path.exists():
        state = load_checkpoint(path, cfgs)
        members.load_state_dict(state["members"])
        stopped = list(state["stopped"])
        for monitor, saved in zip(monitors, state["stability"]):
            restore_monitor(monitor, saved)
        set_global_rng_state(state["rng"])
        for generator, saved in zip(members.generators, state["data_generators"]):
            generator.set_state(saved)
        start_epoch = state["epoch"]

    for epoch in range(start_epoch + 1, cfgs[0].epochs + 1):
        if all(stopped):
            return
        lrs = [cfg.lr * lr_factor(cfg, epoch - 1) for cfg in cfgs]
        members.begin_epoch(lrs, stopped)
        stats, steps, seconds = run_epoch(members, data, epoch, progress)
        slots = {k: i for i, k in enumerate(members.active)}  # where each member's numbers are in the stack
        evaluations = functools.cache(lambda: evaluate_members(members, data))  # once, unless all diverged
        records: list[dict | None] = []
        for k, monitor in enumerate(monitors):
            if stopped[k]:
                records.append(None)
                continue
            record = epoch_record(monitor, epoch, stats.member(slots[k]), steps=steps, seconds=seconds,
                                  batch_size=cfgs[k].batch_size, heads=members, rates=members.rates(k), lr=lrs[k],
                                  evaluate=lambda k=k: evaluations()[slots[k]], device=device)
            record["stop_reason"] = stop_reason(record, cfgs[k], members.draws)
            stopped[k] = record["stop_reason"] is not None
            records.append(record)
        if path is not None:
            save_checkpoint(path, {
                "epoch": epoch, "configs": [cfg.to_flat() for cfg in cfgs], "members": members.state_dict(),
                "stopped": stopped, "rng": global_rng_state(),
                "data_generators": [g.get_state() for g in members.generators],
                "stability": [monitor_state(m) for m in monitors],
            })
        yield records


# --- schedule -----------------------------------------------------------------------------------


def lr_factor(cfg: Config, epoch: int) -> float:
    """Multiplier of the base learning rate after `epoch` finished epochs (Appendix D)."""
    if cfg.lr_schedule == "constant":
        return 1.0
    factor = cfg.lr_decay**epoch
    if cfg.lr_schedule == "paper":  # exponential 0.99 and divided by ten at each milestone
        factor *= 0.1 ** sum(epoch >= m for m in cfg.lr_milestones)
    return factor


def steps_per_epoch(cfg: Config, train_size: int) -> int:
    """Full batches per epoch (drop_last: the step's shapes never change), capped at max_steps."""
    steps = train_size // cfg.batch_size
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    if steps == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set ({train_size} images)")
    return steps


# --- an epoch -----------------------------------------------------------------------------------


def run_epoch(members: Members, data: DataBundle, epoch: int, progress: bool) -> tuple[EpochStats, int, float]:
    """One pass of every member that steps (`members.active`) over the training set, each in its own order;
    returns the epoch's sums (one per active member, in that order), its steps and its seconds."""
    cfgs = [members.cfgs[k] for k in members.active]
    generators = [members.generators[k] for k in members.active]
    cfg, device = members.cfgs[0], data.train.images.device
    stats = EpochStats.zeros(device, len(cfgs))
    steps = steps_per_epoch(cfg, len(data.train))
    orders = [iterate_batches(data.train, cfg.batch_size, generator=g, shuffle=True, drop_last=True)
              for g in generators]
    clock = EpochClock(steps, epoch, cfg.epochs, device, progress)
    for step, batches in enumerate(zip(*orders)):
        if step == steps:
            break
        images = torch.stack([images for images, _ in batches])  # (K, B, C, H, H) uint8
        labels = torch.stack([labels for _, labels in batches])  # (K, B)
        x01 = prepare_members(images, cfgs, generators)
        members.step(to_model_input(x01, cfg, data), x01, labels, stats)
        clock.step()
    return stats, steps, clock.stop()


def prepare_members(images: torch.Tensor, cfgs: list[Config], generators: list[torch.Generator]) -> torch.Tensor:
    """(K, B, C, H, H) uint8 -> float in [0, 1]; each member's augmentation from its own generator, as in
    its plain run, and one conversion for the whole stack when nothing is random."""
    if all(cfg.augment == "none" for cfg in cfgs):
        return prepare_batch(images.flatten(0, 1), augment="none", generator=None).view(images.shape)
    return torch.stack([prepare_batch(images[k], augment=cfg.augment, generator=g,
                                      rotation_degrees=cfg.rotation_degrees,
                                      rotation_interpolation=cfg.rotation_interpolation)
                        for k, (cfg, g) in enumerate(zip(cfgs, generators))])


class EpochClock:
    """The wall time of one pass over the training set, and its progress bar when asked for one."""

    def __init__(self, steps: int, epoch: int, epochs: int, device: torch.device, progress: bool):
        self.device, self.bar = device, None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False)
        self.start = time.perf_counter()

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def stop(self) -> float:
        """Seconds since the start; on CUDA once the queued steps have run (kernels launch asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.close()
        return seconds


# --- records ------------------------------------------------------------------------------------


def epoch_record(monitor: StabilityMonitor, epoch: int, stats: EpochStats, *, steps: int, seconds: float,
                 batch_size: int, heads, rates: dict[str, float], lr: float, evaluate: Callable[[], dict],
                 device: torch.device) -> dict:
    """The record of one epoch of one member: the training numbers, the stability verdict after
    `monitor.observe`, and `evaluate()`'s metrics unless the epoch diverged (nothing to evaluate).

    stats: this member's sums (scalars); heads: what says whether it classifies and draws; rates: its
    memory rates at the end of the epoch; lr: the rate it trained with.
    """
    images_seen = steps * batch_size
    record = {"epoch": epoch, schema.TRAIN_LOSS: float(stats.loss) / steps, "epoch_seconds": seconds,
              "images_per_second": images_seen / seconds}
    if heads.classifies:
        record["train_accuracy"] = float(stats.correct) / images_seen
    if heads.draws:
        record["recon_loss"] = float(stats.recon) / steps
        record["kl"] = float(stats.kl) / steps
    memory = {"max_abs_w": float(stats.max_abs_w), "max_readout": float(stats.max_readout),
              "readout_dead": float(stats.readout_dead) / steps,  # the mean over the epoch's steps
              "readout_saturated": float(stats.readout_saturated) / steps,
              "memory_bound_ratio": float(stats.memory_bound_ratio)}
    diverged = not (bool(stats.loss_finite) and bool(stats.grads_finite) and bool(stats.w_finite))
    verdict = monitor.observe(epoch, rates=rates, diverged=diverged, memory=memory)
    if not monitor.diverged:
        record.update(evaluate())
    record.update(rates, lr=lr, **memory, peak_memory_mb=peak_memory_mb(device), stability_ok=verdict["ok"],
                  stability_flags=verdict["failed"], diverged=monitor.diverged, stability=monitor.report())
    return record


def stop_reason(record: dict, cfg: Config, draws: bool) -> str | None:
    """Why a member stops after the epoch of `record`, or None: it goes on.

    "diverged": nothing left to train. "stuck" (only with cfg.stop_stuck): its memory stayed at W = 0 through
    the epoch with theta = 0 and a sigma flat at 0, so no later epoch can write it or train anything before
    its read-out (`conditions.provably_stuck`, a derived rule); the record keeps what it measured, its test
    error the last one measured.
    """
    if record["diverged"]:
        return "diverged"
    if cfg.stop_stuck and provably_stuck(cfg.activation, record["theta"], record["max_abs_w"], draws=draws):
        return "stuck"
    return None


def evaluate_members(members: Members, data: DataBundle) -> list[dict[str, float]]:
    """Each member's test (and validation) results under their record keys (also their MLflow metric names), in
    the order of `members.active`."""
    tests = members.evaluate(data.test, data)
    vals = members.evaluate(data.val, data) if data.val is not None else [None] * len(tests)
    names = {"test": {"error": schema.TEST_ERROR, "recon_loss": schema.TEST_RECON_LOSS},
             "val": {"error": schema.VAL_ERROR, "recon_loss": schema.VAL_RECON_LOSS}}
    return [{names[split][name]: value for split, result in (("test", test), ("val", val))
             for name, value in (result or {}).items()} for test, val in zip(tests, vals)]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (kB on Linux)


def final_metrics(records: list[dict]) -> dict:
    """A member's last record's numbers plus its best test error, for summaries."""
    last = {k: v for k, v in records[-1].items() if k != "stability"}
    errors = [r[schema.TEST_ERROR] for r in records if math.isfinite(r.get(schema.TEST_ERROR, math.nan))]
    if errors:
        last[schema.BEST_TEST_ERROR] = min(errors)
    return last
