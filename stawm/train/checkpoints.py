"""The loop's checkpoint: one file per run, whatever the number of members, written atomically each epoch.

    {"format", "epoch", "configs": [flat Config per member], "members": the step implementation's state
     (its "weights": every parameter and buffer with a leading member axis, and its optimiser),
     "stopped": [bool per member], "rng": python/numpy/torch streams, "data_generators": [per member],
     "stability": [each member's monitor state]}

A resumed run must be the same configurations (`check_resume_identity`: all but epochs and max_steps);
a file that is not such a checkpoint, or was cut short, is a CheckpointError naming what to do.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..model.stability import StabilityMonitor

CHECKPOINT = "checkpoint.pt"
FORMAT = "stawm-3"  # one format for one member or K; older files are refused (stawm-2: before the
# Appendix A conditions were rewritten, its stability monitors name conditions that are gone)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, or written for another configuration."""


def checkpoint_path(checkpoint_dir: str | Path | None) -> Path | None:
    """Where the loop writes its checkpoint each epoch, the folder made; None without a folder."""
    if checkpoint_dir is None:
        return None
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    return Path(checkpoint_dir) / CHECKPOINT


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict:
    """The saved state at `path`, on the CPU; CheckpointError if it is not a readable STAWM checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, unsafe pickle...
        # torch's own text runs to several lines (the weights_only explanation): say what matters in one
        first = next((line for line in str(err).splitlines() if line.strip()), "")[:200]
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: {first}); delete it "
                              "to start afresh, or resume from another folder") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format", "no format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a STAWM checkpoint of format {FORMAT!r} ({found}); an older stawm "
                              "wrote it, or something else did: train afresh into another folder")
    return state


def load_checkpoint(path: Path, cfgs: list[Config]) -> dict:
    """The checkpoint at `path`, checked to be these members' (CheckpointError otherwise)."""
    state = read_checkpoint(path)
    saved = state["configs"]
    if len(saved) != len(cfgs):
        raise CheckpointError(f"checkpoint {path} holds {len(saved)} members, not {len(cfgs)}")
    for k, (flat, cfg) in enumerate(zip(saved, cfgs)):
        check_resume_identity(flat, cfg, f"checkpoint {path}" + (f" member {k}" if len(cfgs) > 1 else ""))
    return state


def member_weights(path: str | Path, member: int = 0) -> dict[str, torch.Tensor]:
    """One member's weights in a checkpoint as a plain STAWM state dict (a selfsup run's `pretrained`)."""
    return {name: t[member] for name, t in read_checkpoint(path)["members"]["weights"].items()}


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
    return {"first_failed": monitor.first_failed, "diverged_epoch": monitor.diverged_epoch, "history": monitor.history}


def restore_monitor(monitor: StabilityMonitor, state: dict) -> None:
    monitor.first_failed, monitor.history = dict(state["first_failed"]), list(state["history"])
    monitor.diverged_epoch = state["diverged_epoch"]


def global_rng_state() -> dict:
    """The process-wide streams (python, numpy, torch, CUDA): dropout, drawing noise."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
