"""What one training step runs on: the members of a run, behind one small interface (`Members`).

The loop (`stawm.train.loop`) trains K >= 1 configurations ("members") and never asks how: it talks to
a `Members`, a typing.Protocol (structural: an implementation need not inherit from it). Two
implementations: `OneModel` here (K = 1: the model, torch's own Adam; the plain run) and
`stawm.train.fused.FusedStack` (K members vectorised as one model with one stacked Adam).

Also here, for both: the seeds (`seed_everything`), a member's model as its run builds it (`build_model`),
the statistics a step folds (`EpochStats`), and the speed options (compile, precision).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn as nn

from ..config import Config
from ..model import STAWM, Output
from ..model.stability import step_bound_ratio
from .checkpoints import member_weights
from .data import DataBundle, Split, iterate_batches, prepare_batch, to_model_input

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


def build_model(cfg: Config, device: torch.device) -> STAWM:
    """A member's STAWM in training mode; selfsup starts from its `pretrained` drawing model (member 0 of
    that checkpoint)."""
    model = STAWM(cfg).to(device)
    if cfg.task == "selfsup" and cfg.pretrained:
        model.load_drawing_weights(member_weights(cfg.pretrained))
    return model.train()


# --- what a step folds --------------------------------------------------------------------------


@dataclass
class EpochStats:
    """Running sums of one epoch, (K,) tensors on the device: no host sync until the epoch ends."""

    loss: torch.Tensor
    correct: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    readout_dead: torch.Tensor  # sum over steps of each step's fraction
    readout_saturated: torch.Tensor
    max_abs_w: torch.Tensor  # largest over steps
    max_readout: torch.Tensor
    memory_bound_ratio: torch.Tensor
    loss_finite: torch.Tensor  # all steps
    grads_finite: torch.Tensor
    w_finite: torch.Tensor

    SUMS = ("loss", "correct", "recon", "kl", "readout_dead", "readout_saturated")
    MAXIMA = ("max_abs_w", "max_readout", "memory_bound_ratio")
    ALL = ("loss_finite", "grads_finite", "w_finite")

    @classmethod
    def zeros(cls, device, members: int) -> "EpochStats":
        """Sums of nothing yet, for `members` members."""
        return cls(**{name: torch.zeros(members, device=device) for name in cls.SUMS + cls.MAXIMA},
                   **{name: torch.ones(members, dtype=torch.bool, device=device) for name in cls.ALL})

    def fold(self, **step) -> None:
        """Add one step's numbers (every field by name): scalars for one member, or (K,) for a stack."""
        for name in self.SUMS:
            setattr(self, name, getattr(self, name) + step[name])
        for name in self.MAXIMA:
            setattr(self, name, torch.maximum(getattr(self, name), step[name]))
        for name in self.ALL:
            setattr(self, name, getattr(self, name) & step[name])

    def member(self, k: int) -> "EpochStats":
        """Member k's sums (scalars)."""
        return EpochStats(*(getattr(self, f.name)[k] for f in dataclasses.fields(self)))


def memory_statistics(out) -> dict[str, torch.Tensor]:
    """What a forward pass says of its memory, for `EpochStats.fold`."""
    return {"max_abs_w": out.max_abs_w, "max_readout": out.max_readout, "readout_dead": out.readout_dead,
            "readout_saturated": out.readout_saturated}


def split_results(errors: torch.Tensor, recon: torch.Tensor, n: int, heads) -> list[dict[str, float]]:
    """Each member's evaluation of a split of n images from its sums, errors and recon (K,): the error rate
    when it classifies, the mean reconstruction loss when it draws (`heads` says which)."""
    results = []
    for e, r in zip(errors, recon):
        result = {}
        if heads.classifies:
            result["error"] = float(e) / n
        if heads.draws:
            result["recon_loss"] = float(r) / n
        results.append(result)
    return results


# --- speed options ------------------------------------------------------------------------------


def check_speed_options(compile: str, precision: str) -> None:
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile={compile!r} is not allowed: choose one of {list(COMPILE_MODES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not allowed: choose one of {list(PRECISIONS)}")


def model_forward(model: nn.Module, device: torch.device, *, compile: str = "none",
                  precision: str = "fp32") -> Callable[[torch.Tensor], Output]:
    """The callable that runs `model` under the speed options: `model` itself for plain eager fp32.

    Only the model is compiled, with static shapes (training batches are full, so one graph serves
    every step; evaluation recompiles once for eval mode and once for a smaller last batch). The loss
    stays eager: compiled with the forward, inductor returned it without a grad_fn (torch 2.14:
    `new_zeros(()) + 1.0 * nll` returned beside `nll.detach()`). State dicts and checkpoints keep
    using `model` itself, so their keys do not change.
    """
    check_speed_options(compile, precision)
    run = model if compile == "none" else new_step(torch.compile(model, mode=compile, dynamic=False))
    if precision == "fp32":
        return run

    def forward(x: torch.Tensor) -> Output:
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


# --- the loop's interface to the members --------------------------------------------------------


@runtime_checkable  # so that tests can check each implementation with isinstance
class Members(Protocol):
    """K >= 1 members as the loop sees them. Batches arrive stacked over members: x, target
    (K, B, C, H, W), labels (K, B). Implemented by `OneModel` (K = 1) and `fused.FusedStack`."""

    cfgs: list[Config]  # each member's Config
    generators: list[torch.Generator]  # each member's data generator (order, augmentation)
    active: list[int]  # the members that step (k), in the order their batches are stacked; set by begin_epoch
    classifies: bool  # which heads the model has
    draws: bool

    def begin_epoch(self, lrs: list[float], stopped: list[bool]) -> None:
        """Each member's learning rate for the epoch; which members have stopped (their record named a stop_reason),
        which no longer step from now on."""

    def step(self, x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, stats: EpochStats) -> None:
        """One optimiser step of every member, folded into `stats` on the device (no host sync)."""

    def evaluate(self, split: Split, data: DataBundle) -> list[dict[str, float]]:
        """One result per member in `active`, in its order, over a whole split: {"error"} when it classifies,
        {"recon_loss"} when it draws."""

    def rates(self, k: int) -> dict[str, float]:
        """Member k's memory rates now (k in `active`)."""

    def state_dict(self) -> dict:
        """Everything a checkpoint needs: "weights" with a leading member axis, "optimizer", ..."""

    def load_state_dict(self, state: dict) -> None:
        """Back to what `state_dict` returned."""


# --- one member ---------------------------------------------------------------------------------


def clip_gradients(params: list[nn.Parameter], cfg: Config) -> None:
    if cfg.grad_clip_mode == "value":  # the authors clipped each gradient element
        torch.nn.utils.clip_grad_value_(params, cfg.grad_clip)
    elif cfg.grad_clip_mode == "norm":
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)


class OneModel:
    """One member (`Members` with K = 1): its STAWM and torch's own Adam, seeded and built as
    `seed_everything`, `build_model`.

    A step that goes non-finite still steps (the loop stops the member at the epoch's end, on its record).
    """

    def __init__(self, cfg: Config, device: torch.device, compile: str = "none", precision: str = "fp32"):
        self.cfgs, self.cfg, self.device, self.active = [cfg], cfg, device, [0]
        self.generators = [seed_everything(cfg.seed, device)]
        self.model = build_model(cfg, device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr)
        self.forward = model_forward(self.model, device, compile=compile, precision=precision)
        self.classifies, self.draws = self.model.classifies, self.model.draws

    # begin_epoch's `stopped` and rates' `k` are unused here but kept: the loop calls every `Members` alike.
    # With one member nothing else can stop (the loop ends when it does), and k is always 0.
    def begin_epoch(self, lrs: list[float], stopped: list[bool]) -> None:
        self.optimizer.param_groups[0]["lr"] = lrs[0]

    def step(self, x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, stats: EpochStats) -> None:
        out = self.forward(x[0])
        loss, parts = self.model.loss(out, target[0], labels[0])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norms = torch._foreach_norm([p.grad for p in self.params if p.grad is not None])
        grads_finite = torch.stack(grad_norms).isfinite().all()  # before clipping hides an inf
        memory = self.model.memory  # the bound with the rates this forward pass used: before the step moves them
        ratio = step_bound_ratio(memory.delta, memory.eta, out.max_abs_w, out.max_readout, bound=memory.bound,
                                 memory_size=memory.memory_size, glimpses=self.cfg.glimpses)
        clip_gradients(self.params, self.cfg)
        self.optimizer.step()
        loss = loss.detach()
        stats.fold(loss=loss, loss_finite=loss.isfinite(), grads_finite=grads_finite,
                   w_finite=out.memory.detach().isfinite().all(), correct=parts.get("correct", 0),
                   recon=parts.get("recon_loss", 0), kl=parts.get("kl", 0), memory_bound_ratio=ratio,
                   **memory_statistics(out))

    @torch.no_grad()
    def evaluate(self, split: Split, data: DataBundle) -> list[dict[str, float]]:
        """Error (classification) and reconstruction (drawing) over a whole split, in eval mode."""
        self.model.eval()
        errors = torch.zeros(1, device=split.images.device)
        recon = torch.zeros(1, device=split.images.device)
        for images, labels in iterate_batches(split, self.cfg.batch_size, generator=None, shuffle=False,
                                              drop_last=False):
            x01 = prepare_batch(images, augment="none", generator=None)
            out = self.forward(to_model_input(x01, self.cfg, data))
            if out.log_probs is not None:
                errors += (out.log_probs.argmax(1) != labels).sum()
            if out.canvas is not None:
                recon += ((out.canvas - x01) ** 2).sum()
        self.model.train()
        return split_results(errors, recon, len(split), self)

    def rates(self, k: int) -> dict[str, float]:
        return self.model.memory.rates()

    def state_dict(self) -> dict:
        return {"weights": {name: t[None] for name, t in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict({name: t[0] for name, t in state["weights"].items()})
        self.optimizer.load_state_dict(state["optimizer"])
