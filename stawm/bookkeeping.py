"""What both training loops keep of an epoch and of a checkpoint, in one place.

`engine.train` (one model) and `fused.train_fused` (K members as one vectorised model) differ in how a
step runs; everything around the step is here and both call it: the running sums (`EpochStats`, for
one model or K), the steps an epoch takes, its clock and progress bar, the record it yields (with the
stability monitor's verdict), and what makes a checkpoint resumable (RNG streams, monitor state, the
configuration it was written for). The same record keys come out of both loops by construction.
"""

from __future__ import annotations

import dataclasses
import os
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import schema
from .config import Config
from .data import DataBundle, load_data
from .stability import StabilityMonitor


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, or written for another configuration."""


# --- an epoch -------------------------------------------------------------------------------------


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
    def zeros(cls, device, members: int | None = None) -> "EpochStats":
        """Sums of nothing yet: scalars for one model, (K,) tensors for `members` fused ones."""
        shape = () if members is None else (members,)
        z = torch.zeros(shape, device=device)
        t = torch.ones(shape, dtype=torch.bool, device=device)
        return cls(z, z.clone(), z.clone(), z.clone(), z.clone(), z.clone(), z.clone(), t, t.clone(), t.clone())

    def member(self, k: int) -> "EpochStats":
        """Member k's sums out of a fused stack's (K,) ones."""
        return EpochStats(*(getattr(self, f.name)[k] for f in dataclasses.fields(self)))


def load_training_data(cfg: Config, data_root: str | Path | None, device: torch.device) -> DataBundle:
    """The dataset as every run of `cfg` loads it (the validation split always carved with seed 0)."""
    return load_data(cfg.dataset, data_root, validation_size=cfg.validation_size, split_seed=0,
                     image_size=cfg.image_size, device=device)


def steps_per_epoch(cfg: Config, train_size: int) -> int:
    """Full batches per epoch (drop_last: the step's shapes never change), capped at max_steps."""
    steps = train_size // cfg.batch_size
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    if steps == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set ({train_size} images)")
    return steps


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


def epoch_record(monitor: StabilityMonitor, epoch: int, stats: EpochStats, *, steps: int, seconds: float,
                 batch_size: int, heads, rates: dict[str, float], lr: float, evaluate: Callable[[], dict],
                 device: torch.device) -> dict:
    """The record of one epoch of one model: the training numbers, the stability verdict after
    `monitor.observe`, and `evaluate()`'s metrics unless the epoch diverged (nothing to evaluate).

    stats: this model's sums (scalars); heads: what says whether it classifies and draws (the model, or
    the fused stack); rates: its memory rates at the end of the epoch; lr: the rate it trained with.
    """
    images_seen = steps * batch_size
    record = {"epoch": epoch, schema.TRAIN_LOSS: float(stats.loss) / steps, "epoch_seconds": seconds,
              "images_per_second": images_seen / seconds}
    if heads.classifies:
        record["train_accuracy"] = float(stats.correct) / images_seen
    if heads.draws:
        record["recon_loss"] = float(stats.recon) / steps
        record["kl"] = float(stats.kl) / steps
    max_w, max_readout = float(stats.max_w), float(stats.max_readout)
    verdict = monitor.observe(
        epoch, rates=rates, max_w=max_w, max_readout=max_readout, loss_finite=bool(stats.loss_finite),
        grads_finite=bool(stats.grads_finite), w_finite=bool(stats.w_finite), bound_ratio=float(stats.bound_ratio),
    )
    diverged = monitor.diverged
    if not diverged:
        record.update(evaluate())
    record.update(rates, lr=lr, max_w=max_w, max_readout=max_readout, peak_memory_mb=peak_memory_mb(device),
                  stability_ok=verdict["ok"], stability_flags=verdict["failed"], diverged=diverged,
                  stability=monitor.report())
    return record


def evaluation_record(test: dict[str, float], val: dict[str, float] | None) -> dict[str, float]:
    """`evaluate`'s results ("error", "recon_loss") on the test split, and on the validation split if
    there is one, under their record keys (which are also their MLflow metric names)."""
    names = {"test": {"error": schema.TEST_ERROR, "recon_loss": schema.TEST_RECON_LOSS},
             "val": {"error": schema.VAL_ERROR, "recon_loss": schema.VAL_RECON_LOSS}}
    return {names[split][name]: value for split, result in (("test", test), ("val", val))
            for name, value in (result or {}).items()}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (kB on Linux)


# --- a checkpoint ---------------------------------------------------------------------------------


def checkpoint_path(checkpoint_dir: str | Path | None, name: str) -> Path | None:
    """Where a loop writes its checkpoint `name` each epoch, the folder made; None without a folder."""
    if checkpoint_dir is None:
        return None
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    return Path(checkpoint_dir) / name


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path) -> dict:
    """The saved state at `path`, on the CPU; CheckpointError if it is not a readable torch file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, unsafe pickle...
        # torch's own text runs to several lines (the weights_only explanation): say what matters in one
        first = next((line for line in str(err).splitlines() if line.strip()), "")[:200]
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: {first}); delete it "
                              "to start afresh, or resume from another folder") from err


def check_resume_identity(saved: dict, cfg: Config, checkpoint: str) -> None:
    """CheckpointError unless the flat config `saved` with a checkpoint is `cfg` in every field but those
    a resumed run may change (more epochs, a step cap). `checkpoint` names it in the message."""
    mismatched = {k: (saved.get(k), v) for k, v in cfg.to_flat().items()
                  if k not in ("epochs", "max_steps") and saved.get(k) != v}
    if mismatched:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
        raise CheckpointError(f"{checkpoint} was written for another configuration ({detail})")


def monitor_state(monitor: StabilityMonitor) -> dict:
    """What a checkpoint keeps of a stability monitor, so that a resumed run's report goes on from it."""
    return {"first_failed": monitor.first_failed, "history": monitor.history}


def restore_monitor(monitor: StabilityMonitor, state: dict) -> None:
    monitor.first_failed, monitor.history = dict(state["first_failed"]), list(state["history"])


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
