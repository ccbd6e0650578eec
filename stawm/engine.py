"""The training engine: one loop for every head, exact seeds, atomic resumable checkpoints.

`train(cfg, ...)` is a generator that yields one plain record per epoch. Whoever drives it (Ray Tune,
MLflow, the CLI, a benchmark) consumes the records; the loop knows none of them.

The step keeps no Python-side state and has no shape-dependent branches: training batches are full
(drop_last), statistics stay on the device until the epoch ends (no `.item()` per step), so the same
step can be compiled or graph-captured.

Speed options (`train(..., compile=, precision=)`) change how the model runs, never what it computes
by default: with compile="none" and precision="fp32" the loop is the plain eager one, bit for bit.

What happens around the step (sums, clock, the record, checkpoint identity) is `stawm.bookkeeping`'s,
shared with the fused loop (`stawm.fused`).
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from . import schema
from .bookkeeping import (CheckpointError, EpochClock, EpochStats, check_resume_identity, checkpoint_path,
                          epoch_record, evaluation_record, load_training_data, monitor_state, read_checkpoint,
                          restore_monitor, rng_state, save_checkpoint, set_rng_state, steps_per_epoch)
from .config import Config
from .data import DataBundle, iterate_batches, prepare_batch
from .model import STAWM, Output
from .stability import StabilityMonitor, step_bound_ratio

CHECKPOINT = "checkpoint.pt"
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")  # torch.compile modes; none = eager
PRECISIONS = ("fp32", "bf16")  # bf16 = autocast of the forward pass (the loss, W's sums and Adam stay fp32)


# --- seeds: the one labelled place --------------------------------------------------------------


def seed_everything(seed: int, device: torch.device) -> torch.Generator:
    """Seed python, numpy and torch (init, dropout) and return the data generator (order, augmentation)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# --- schedule -----------------------------------------------------------------------------------


def lr_factor(cfg: Config, epoch: int) -> float:
    """Multiplier of the base learning rate after `epoch` finished epochs (Appendix D)."""
    if cfg.lr_schedule == "constant":
        return 1.0
    factor = cfg.lr_decay**epoch
    if cfg.lr_schedule == "paper":  # exponential 0.99 and divided by ten at each milestone
        factor *= 0.1 ** sum(epoch >= m for m in cfg.lr_milestones)
    return factor


# --- speed options ------------------------------------------------------------------------------


def check_speed_options(compile: str, precision: str) -> None:
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile={compile!r} is not allowed: choose one of {list(COMPILE_MODES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not allowed: choose one of {list(PRECISIONS)}")


def model_forward(model: nn.Module, device: torch.device, *, compile: str = "none",
                  precision: str = "fp32") -> Callable | None:
    """The callable that runs `model` under the speed options; None for the plain eager fp32 call.

    Only the model is compiled, with static shapes (training batches are full, so one graph serves
    every step; evaluation recompiles once for eval mode and once for a smaller last batch). The loss
    stays eager: compiled with the forward, inductor returned it without a grad_fn (torch 2.14:
    `new_zeros(()) + 1.0 * nll` returned beside `nll.detach()`). State dicts and checkpoints keep
    using `model` itself, so their keys do not change.
    """
    check_speed_options(compile, precision)
    if compile == "none" and precision == "fp32":
        return None
    run = model if compile == "none" else new_step(torch.compile(model, mode=compile, dynamic=False))
    if precision == "fp32":
        return run

    def forward(x: torch.Tensor):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = run(x)
        return to_fp32(out)

    return forward


def new_step(compiled: Callable) -> Callable:
    """Each call starts a new step for CUDA graphs (reduce-overhead, max-autotune): the previous step's
    outputs have been consumed by then, so their memory may be reused."""

    def call(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args)

    return call


def to_fp32(out: Output) -> Output:
    """Outputs back to float32 after autocast, so the loss is reduced in fp32 on every device
    (CPU autocast leaves log_softmax in bf16; CUDA's already returns it in fp32)."""
    fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    return Output(**{k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in fields.items()})


# --- the step -----------------------------------------------------------------------------------


def to_model_input(x01: torch.Tensor, cfg: Config, data: DataBundle) -> torch.Tensor:
    if not cfg.normalize:
        return x01
    mean = x01.new_tensor(data.mean).view(1, -1, 1, 1)
    std = x01.new_tensor(data.std).view(1, -1, 1, 1)
    return (x01 - mean) / std


def clip_gradients(params: list[nn.Parameter], cfg: Config) -> None:
    if cfg.grad_clip_mode == "value":  # the authors clipped each gradient element
        torch.nn.utils.clip_grad_value_(params, cfg.grad_clip)
    elif cfg.grad_clip_mode == "norm":
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)


def train_step(model: STAWM, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], x: torch.Tensor,
               target: torch.Tensor, labels: torch.Tensor, stats: EpochStats, forward: Callable | None = None) -> None:
    """One optimiser step; folds this batch's statistics into `stats` on the device.

    forward: what runs the model (`model_forward`'s compiled or autocast callable); None runs `model`.
    """
    out = model(x) if forward is None else forward(x)
    loss, parts = model.loss(out, target, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norms = torch._foreach_norm([p.grad for p in params if p.grad is not None])
    stats.grads_finite &= torch.stack(grad_norms).isfinite().all()  # before clipping hides an inf
    clip_gradients(params, model.cfg)
    optimizer.step()
    stats.loss += loss.detach()
    stats.loss_finite &= loss.detach().isfinite()
    stats.w_finite &= out.memory.detach().isfinite().all()
    stats.correct += parts.get("correct", 0)
    stats.recon += parts.get("recon_loss", 0)
    stats.kl += parts.get("kl", 0)
    stats.max_w = torch.maximum(stats.max_w, out.max_w)
    stats.max_readout = torch.maximum(stats.max_readout, out.max_readout)
    stats.bound_ratio = torch.maximum(stats.bound_ratio, step_bound_ratio(model.memory, out.max_w, out.max_readout))


@torch.no_grad()
def evaluate(model: STAWM, split, cfg: Config, data: DataBundle, forward: Callable | None = None) -> dict[str, float]:
    """Error (classification) and reconstruction (drawing) over a whole split, in eval mode."""
    model.eval()
    errors = torch.zeros((), device=split.images.device)
    recon = torch.zeros((), device=split.images.device)
    for images, labels in iterate_batches(split, cfg.batch_size, generator=None, shuffle=False, drop_last=False):
        x01 = prepare_batch(images, augment="none", generator=None)
        x = to_model_input(x01, cfg, data)
        out = model(x) if forward is None else forward(x)
        if out.log_probs is not None:
            errors += (out.log_probs.argmax(1) != labels).sum()
        if out.canvas is not None:
            recon += ((out.canvas - x01) ** 2).sum()
    model.train()
    n = len(split)
    result = {}
    if model.classifies:
        result["error"] = float(errors) / n
    if model.draws:
        result["recon_loss"] = float(recon) / n
    return result


# --- checkpoints --------------------------------------------------------------------------------


def load_checkpoint(path: Path, cfg: Config) -> dict:
    state = read_checkpoint(path)
    saved = state.get("config") if isinstance(state, dict) else None
    if saved is None:
        raise CheckpointError(f"{path} is not a STAWM checkpoint (no config)")
    check_resume_identity(saved, cfg, f"checkpoint {path}")
    return state


# --- the loop -----------------------------------------------------------------------------------


def build(cfg: Config, device: torch.device):
    """Model, its trainable parameters, Adam and the explicit schedule."""
    model = STAWM(cfg).to(device)
    if cfg.task == "selfsup" and cfg.pretrained:
        model.load_drawing_weights(torch.load(cfg.pretrained, map_location=device, weights_only=True)["model"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(cfg, epoch))
    return model, params, optimizer, scheduler


def train(cfg: Config, *, device: str | torch.device = "cpu", data_root: str | Path | None = None,
          checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = False,
          data: DataBundle | None = None, compile: str = "none", precision: str = "fp32") -> Iterator[dict]:
    """Train `cfg` and yield one record per epoch (the checkpoint of that epoch is already on disk).

    resume=True continues from checkpoint_dir's checkpoint when there is one (epochs already done are
    not yielded again). A record with diverged=True (non-finite loss, gradients or W) is the last.
    Speed options: compile (one of COMPILE_MODES: torch.compile of the model, static shapes) and
    precision ("bf16": autocast of the forward pass); the defaults run the plain eager fp32 loop.
    """
    check_speed_options(compile, precision)
    device = torch.device(device)
    if device.type == "cuda":  # a worker process may run trial after trial: each reports its own peak
        torch.cuda.reset_peak_memory_stats(device)
    generator = seed_everything(cfg.seed, device)
    if data is None:
        data = load_training_data(cfg, data_root, device)
    model, params, optimizer, scheduler = build(cfg, device)
    forward = model_forward(model, device, compile=compile, precision=precision)
    monitor = StabilityMonitor(cfg)
    start_epoch = 0
    path = checkpoint_path(checkpoint_dir, CHECKPOINT)
    if resume and path is not None and path.exists():
        state = load_checkpoint(path, cfg)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_monitor(monitor, state["stability"])
        set_rng_state(state["rng"], generator)
        start_epoch = state["epoch"]

    model.train()
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        stats, steps, seconds = run_epoch(model, params, optimizer, data, cfg, generator, epoch, progress, forward)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        record = epoch_record(monitor, epoch, stats, steps=steps, seconds=seconds, batch_size=cfg.batch_size,
                              heads=model, rates=model.memory.rates(), lr=lr, device=device,
                              evaluate=lambda: evaluation_metrics(model, cfg, data, forward))
        if path is not None:
            save_checkpoint(path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "config": cfg.to_flat(),
                "rng": rng_state(generator), "stability": monitor_state(monitor),
            })
        yield record
        if record["diverged"]:
            return


def evaluation_metrics(model: STAWM, cfg: Config, data: DataBundle,
                       forward: Callable | None = None) -> dict[str, float]:
    test = evaluate(model, data.test, cfg, data, forward)
    val = evaluate(model, data.val, cfg, data, forward) if data.val is not None else None
    return evaluation_record(test, val)


def run_epoch(model, params, optimizer, data: DataBundle, cfg: Config, generator, epoch: int,
              progress: bool, forward: Callable | None = None) -> tuple[EpochStats, int, float]:
    """One pass over the training set; returns the epoch's sums, its steps and its seconds."""
    device = data.train.images.device
    stats = EpochStats.zeros(device)
    steps = steps_per_epoch(cfg, len(data.train))
    batches = iterate_batches(data.train, cfg.batch_size, generator=generator, shuffle=True, drop_last=True)
    clock = EpochClock(steps, epoch, cfg.epochs, device, progress)
    for step, (images, labels) in enumerate(batches):
        if step == steps:
            break
        x01 = prepare_batch(images, augment=cfg.augment, generator=generator, rotation_degrees=cfg.rotation_degrees,
                            rotation_interpolation=cfg.rotation_interpolation)
        train_step(model, optimizer, params, to_model_input(x01, cfg, data), x01, labels, stats, forward)
        clock.step()
    return stats, steps, clock.stop()


def final_metrics(records: list[dict]) -> dict:
    """The last record's numbers plus the best test error, for summaries."""
    last = {k: v for k, v in records[-1].items() if k != "stability"}
    errors = [r[schema.TEST_ERROR] for r in records if math.isfinite(r.get(schema.TEST_ERROR, math.nan))]
    if errors:
        last[schema.BEST_TEST_ERROR] = min(errors)
    return last
