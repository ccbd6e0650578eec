"""The training engine: one loop for every head, exact seeds, atomic resumable checkpoints.

`train(cfg, ...)` is a generator that yields one plain record per epoch. Whoever drives it (Ray Tune,
MLflow, the CLI, a benchmark) consumes the records; the loop knows none of them.

The step keeps no Python-side state and has no shape-dependent branches: training batches are full
(drop_last), statistics stay on the device until the epoch ends (no `.item()` per step), so the same
step can be compiled or graph-captured.

Speed options (`train(..., compile=, precision=)`) change how the model runs, never what it computes
by default: with compile="none" and precision="fp32" the loop is the plain eager one, bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from .config import Config
from .data import DataBundle, iterate_batches, load_data, prepare_batch
from .model import STAWM, Output
from .stability import StabilityMonitor, step_bound_ratio

CHECKPOINT = "checkpoint.pt"
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")  # torch.compile modes; none = eager
PRECISIONS = ("fp32", "bf16")  # bf16 = autocast of the forward pass (the loss, W's sums and Adam stay fp32)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, or written for another configuration."""


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


@dataclass
class EpochStats:
    """Running sums of one epoch, kept on the device."""

    loss: torch.Tensor
    correct: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    max_w: torch.Tensor
    max_readout: torch.Tensor
    bound_ratio: torch.Tensor
    loss_finite: torch.Tensor
    grads_finite: torch.Tensor
    w_finite: torch.Tensor

    @classmethod
    def zeros(cls, device) -> "EpochStats":
        z = torch.zeros((), device=device)
        t = torch.ones((), dtype=torch.bool, device=device)
        return cls(z, z.clone(), z.clone(), z.clone(), z.clone(), z.clone(), z.clone(), t, t.clone(), t.clone())


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


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, cfg: Config) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, unsafe pickle...
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    saved = state.get("config") if isinstance(state, dict) else None
    if saved is None:
        raise CheckpointError(f"{path} is not a STAWM checkpoint (no config)")
    mismatched = {k: (saved.get(k), v) for k, v in _resume_identity(cfg).items() if saved.get(k) != v}
    if mismatched:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
        raise CheckpointError(f"checkpoint {path} was written for another configuration ({detail})")
    return state


def _resume_identity(cfg: Config) -> dict:
    """Every field but those a resumed run may change (more epochs, a step cap)."""
    return {k: v for k, v in cfg.to_flat().items() if k not in ("epochs", "max_steps")}


def rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "data": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (kB on Linux)


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
        data = load_data(cfg.dataset, data_root, validation_size=cfg.validation_size, split_seed=0,
                         image_size=cfg.image_size, device=device)
    model, params, optimizer, scheduler = build(cfg, device)
    forward = model_forward(model, device, compile=compile, precision=precision)
    monitor = StabilityMonitor(cfg)
    start_epoch = 0
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.exists():
            state = load_checkpoint(path, cfg)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            monitor.first_failed, monitor.history = dict(state["stability"]["first_failed"]), list(state["stability"]["history"])
            set_rng_state(state["rng"], generator)
            start_epoch = state["epoch"]

    model.train()
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        record = run_epoch(model, params, optimizer, data, cfg, generator, epoch, progress, forward)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        rates = model.memory.rates()
        stats = record.pop("_stats")
        verdict = monitor.observe(
            epoch, rates=rates, max_w=float(stats.max_w), max_readout=float(stats.max_readout),
            loss_finite=bool(stats.loss_finite), grads_finite=bool(stats.grads_finite),
            w_finite=bool(stats.w_finite), bound_ratio=float(stats.bound_ratio),
        )
        diverged = monitor.diverged
        if not diverged:
            record.update(evaluation_metrics(model, cfg, data, forward))
        record.update(rates, lr=lr, max_w=float(stats.max_w), max_readout=float(stats.max_readout),
                      peak_memory_mb=peak_memory_mb(device), stability_ok=verdict["ok"],
                      stability_flags=verdict["failed"], diverged=diverged, stability=monitor.report())
        if path is not None:
            save_checkpoint(path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "config": cfg.to_flat(),
                "rng": rng_state(generator),
                "stability": {"first_failed": monitor.first_failed, "history": monitor.history},
            })
        yield record
        if diverged:
            return


def evaluation_metrics(model: STAWM, cfg: Config, data: DataBundle,
                       forward: Callable | None = None) -> dict[str, float]:
    metrics = {}
    test = evaluate(model, data.test, cfg, data, forward)
    if "error" in test:
        metrics["test_error"] = test["error"]
    if "recon_loss" in test:
        metrics["test_recon_loss"] = test["recon_loss"]
    if data.val is not None:
        val = evaluate(model, data.val, cfg, data, forward)
        if "error" in val:
            metrics["val_error"] = val["error"]
        if "recon_loss" in val:
            metrics["val_recon_loss"] = val["recon_loss"]
    return metrics


def run_epoch(model, params, optimizer, data: DataBundle, cfg: Config, generator, epoch: int,
              progress: bool, forward: Callable | None = None) -> dict:
    """One pass over the training set; returns the epoch's training metrics (+ the raw stats)."""
    device = data.train.images.device
    stats = EpochStats.zeros(device)
    steps = len(data.train) // cfg.batch_size
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    if steps == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set ({len(data.train)} images)")
    batches = iterate_batches(data.train, cfg.batch_size, generator=generator, shuffle=True, drop_last=True)
    bar = _progress_bar(steps, epoch, cfg.epochs) if progress else None
    start = time.perf_counter()
    for step, (images, labels) in enumerate(batches):
        if step == steps:
            break
        x01 = prepare_batch(images, augment=cfg.augment, generator=generator, rotation_degrees=cfg.rotation_degrees,
                            rotation_interpolation=cfg.rotation_interpolation)
        train_step(model, optimizer, params, to_model_input(x01, cfg, data), x01, labels, stats, forward)
        if bar is not None:
            bar.update(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    images_seen = steps * cfg.batch_size
    record = {
        "epoch": epoch,
        "train_loss": float(stats.loss) / steps,
        "epoch_seconds": seconds,
        "images_per_second": images_seen / seconds,
        "_stats": stats,
    }
    if model.classifies:
        record["train_accuracy"] = float(stats.correct) / images_seen
    if model.draws:
        record["recon_loss"] = float(stats.recon) / steps
        record["kl"] = float(stats.kl) / steps
    return record


def _progress_bar(steps: int, epoch: int, epochs: int):
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False)


def final_metrics(records: list[dict]) -> dict:
    """The last record's numbers plus the best test error, for summaries."""
    last = {k: v for k, v in records[-1].items() if k != "stability"}
    errors = [r["test_error"] for r in records if "test_error" in r and math.isfinite(r["test_error"])]
    if errors:
        last["best_test_error"] = min(errors)
    return last
