"""K trials trained as one vectorised model in one process (trial fusion over seeds and rates, as HFTA does).

Letters: K members (fused trials), B batch, C channels, H image side, N trainable numbers per member.

Why: one STAWM step is a long chain of small kernels, so a GPU running one trial mostly waits on
kernel launches, and separate processes on one GPU only time-slice it (../shared/PITFALLS.md). Here
the members' parameters and buffers are stacked on a new leading axis (`stack_module_state`), the
model runs once under `vmap` over that axis (`functional_call` on a weightless copy), and one Adam
updates the whole stack: every kernel is K times larger and is launched once.

Each member is the plain run it stands for:
- built after `seed_everything(seed)` exactly as `engine.train` builds it (same initial weights), with
  its own data generator (order, augmentation);
- its own BatchNorm running statistics: stacked buffers, updated in place under vmap (functorch's
  batch-norm caveat is about unbatched running stats; these are batched, and tests/test_fused.py
  checks them against plain runs);
- Adam and clipping by value are elementwise, so one over the stack is K independent ones; the
  learning rate, schedule and clip bound are per member; clipping by norm takes each member's norm;
- its own StabilityMonitor and its own per-epoch record, made by the same `bookkeeping.epoch_record` as
  `engine.train`'s, so the keys are the same by construction.
With dropout 0 and no drawing noise a member's numbers equal its plain run up to float rounding.
Dropout masks and drawing noise come from one global stream (vmap randomness="different", seeded with
member 0's seed): independent across members, but not the masks the member's plain run draws.

A member that diverges (non-finite loss, gradients or W) is frozen at the step it happened: its
parameters, Adam moments and step count stop changing, its loss is masked out of the backward pass,
and its epoch record says diverged=True; later epochs yield None in its place, and keep its BatchNorm
statistics too. It still occupies its slot of the stack (shapes stay static), so it still costs compute.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from .bookkeeping import (CheckpointError, EpochClock, EpochStats, check_resume_identity, checkpoint_path,
                          epoch_record, evaluation_record, load_training_data, monitor_state, read_checkpoint,
                          restore_monitor, rng_state, save_checkpoint, set_rng_state, steps_per_epoch)
from .config import Config
from .data import DataBundle, iterate_batches, prepare_batch
from .engine import build, check_speed_options, lr_factor, new_step, seed_everything, to_fp32, to_model_input
from .stability import StabilityMonitor, step_bound_ratio

FUSED_CHECKPOINT = "fused-checkpoint.pt"
FORMAT = "stawm-fused-1"

# What may differ between members, and why each can:
FUSIBLE_FIELDS = (
    "seed",  # own initial weights and own data generator
    "pretrained",  # initial weights only: each member is built, and loads its file, as in its plain run
    "delta", "eta", "theta",  # memory buffers (parameters when learnable_rates): stacked per member
    "lr", "lr_schedule", "lr_decay", "lr_milestones",  # the stacked Adam takes one learning rate per member
    "grad_clip",  # one clipping bound per member
    "augment", "rotation_degrees", "rotation_interpolation",  # each member's batch augmented with its own generator
)
# Every other field sets a shape, a constant the forward pass reads from the config (dropout, loss
# scales, beta, temperature), the data (dataset, batch, augmentation) or the loop (epochs, max_steps).


class FusionError(ValueError):
    """Configs that cannot train as one fused model; the message names the field that differs."""


def check_fusible(cfgs: list[Config]) -> None:
    """Raise FusionError naming the first field, outside FUSIBLE_FIELDS, on which two members differ."""
    if not cfgs:
        raise FusionError("no configs to fuse: give at least one")
    first = cfgs[0].to_flat()
    for k, cfg in enumerate(cfgs[1:], start=1):
        flat = cfg.to_flat()
        for name, value in first.items():
            if name not in FUSIBLE_FIELDS and flat[name] != value:
                raise FusionError(
                    f"cannot fuse: {name} differs (member 0: {value!r}, member {k}: {flat[name]!r}); "
                    f"fused members may differ only in {', '.join(FUSIBLE_FIELDS)}")


# --- making the model vmappable -----------------------------------------------------------------


class _VmapLSTMCell(nn.LSTMCell):
    """nn.LSTMCell's arithmetic in plain ops: vmap has no batching rule for aten::lstm_cell (torch 2.14)."""

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        h, c = state
        gates = F.linear(x, self.weight_ih, self.bias_ih) + F.linear(h, self.weight_hh, self.bias_hh)  # (B, 4 Hd)
        i, f, g, o = gates.chunk(4, dim=1)  # PyTorch's gate order
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (B, Hd)
        return torch.sigmoid(o) * torch.tanh(c), c


def _weightless_copy(model: nn.Module) -> nn.Module:
    """The module structure on the meta device (functional_call supplies every tensor), LSTM cells swapped."""
    base = copy.deepcopy(model).to("meta")
    for parent in base.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.LSTMCell:
                setattr(parent, name, _VmapLSTMCell(child.input_size, child.hidden_size, child.bias, device="meta"))
    return base


_VMAP_RULES = None  # the torch.library registration below, kept alive for the process


def _register_vmap_rules() -> None:
    """affine_grid_generator has no vmap rule (torch 2.14): vmap would loop over the K members at every
    glimpse. Its decomposition (torch._decomp) is made of batchable ops, so register it as the rule,
    as torch._functorch does for nll_loss. Process-wide, and only under vmap; done once, on first use."""
    global _VMAP_RULES
    if _VMAP_RULES is not None:
        return
    from torch._decomp import decomposition_table

    op = torch.ops.aten.affine_grid_generator.default
    library = torch.library.Library("aten", "IMPL", "FuncTorchBatched")
    try:
        library.impl(op, decomposition_table[op])
    except (RuntimeError, KeyError):  # a later torch with its own rule, or no decomposition: keep the fallback
        pass
    _VMAP_RULES = library


# --- one Adam over the stack --------------------------------------------------------------------


class StackedAdam:
    """torch.optim.Adam's update (amsgrad off, no weight decay) over all members' numbers as one (K, N) tensor.

    Elementwise, so it is K independent Adams; each member has its own learning rate and step count.
    A member whose `alive` is False keeps its parameters, moments and step count (masking the update:
    zero gradients alone would still let Adam's momentum move it). One flat state makes the update a
    dozen kernels whatever the number of parameter tensors.
    """

    def __init__(self, params: list[torch.Tensor], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = params  # stacked leaves, each (K, ...)
        self.sizes = [p[0].numel() for p in params]
        self.betas, self.eps = betas, eps
        K, device = params[0].shape[0], params[0].device
        self.steps = torch.zeros(K, dtype=torch.float64, device=device)  # (K,)
        self.exp_avg = torch.zeros(K, sum(self.sizes), device=device)  # (K, N)
        self.exp_avg_sq = torch.zeros(K, sum(self.sizes), device=device)  # (K, N)

    def flat_grad(self) -> torch.Tensor:
        """The members' gradients side by side (a parameter without a gradient counts as zeros)."""
        K = self.exp_avg.shape[0]
        grads = [p.grad.reshape(K, -1) if p.grad is not None else p.new_zeros(K, n)
                 for p, n in zip(self.params, self.sizes)]
        return torch.cat(grads, dim=1)  # (K, N)

    @torch.no_grad()
    def step(self, grad: torch.Tensor, lr: torch.Tensor, alive: torch.Tensor) -> None:
        """grad (K, N) after clipping; lr (K,) float64; alive (K,) bool."""
        beta1, beta2 = self.betas
        self.steps += alive
        steps = self.steps.clamp(min=1)  # a member never stepped is masked below; keep its division finite
        step_size = (lr / (1 - beta1**steps)).float()[:, None]  # (K, 1), as Adam's Python-float step size
        bias2_sqrt = (1 - beta2**steps).sqrt().float()[:, None]  # (K, 1)
        keep = alive[:, None]  # (K, 1)
        exp_avg = self.exp_avg.lerp(grad, 1 - beta1)
        exp_avg_sq = self.exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(self.eps)
        update = torch.where(keep, step_size * exp_avg / denom, 0.0)  # (K, N)
        self.exp_avg.copy_(torch.where(keep, exp_avg, self.exp_avg))
        self.exp_avg_sq.copy_(torch.where(keep, exp_avg_sq, self.exp_avg_sq))
        torch._foreach_sub_(self.params, [u.view_as(p) for u, p in zip(update.split(self.sizes, dim=1), self.params)])

    def state_dict(self) -> dict:
        return {"steps": self.steps, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        for name in ("steps", "exp_avg", "exp_avg_sq"):
            getattr(self, name).copy_(state[name])


# --- the stack: K members as one model ------------------------------------------------------------


class FusedStack:
    """Stacked parameters and buffers of K members, the vmapped step and evaluation, and the optimiser."""

    def __init__(self, cfgs: list[Config], device: torch.device, compile: str = "none", precision: str = "fp32"):
        check_fusible(cfgs)
        check_speed_options(compile, precision)
        _register_vmap_rules()
        self.cfgs, self.cfg, self.K, self.device = cfgs, cfgs[0], len(cfgs), device
        models, self.generators = [], []
        for cfg in cfgs:  # each member exactly as engine.train makes it: seed, then build
            self.generators.append(seed_everything(cfg.seed, device))
            models.append(build(cfg, device)[0].train())
        seed_everything(cfgs[0].seed, device)  # the one global stream for dropout and drawing noise
        self.params, self.buffers = stack_module_state(models)  # name -> (K, ...)
        self.trainable = [p for p in self.params.values() if p.requires_grad]
        self.statistics = [name for name in self.buffers  # what the forward pass updates in place: BatchNorm's
                           if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")]
        self.base = _weightless_copy(models[0])
        self.classifies, self.draws = models[0].classifies, models[0].draws
        self.optimizer = StackedAdam(self.trainable)
        self.clip = torch.tensor([c.grad_clip for c in cfgs], device=device)[:, None]  # (K, 1)
        if compile != "none":  # the stack is the model's state, not per-call input: CUDA graphs may keep its
            for t in [*self.params.values(), *self.buffers.values()]:  # addresses and update BatchNorm in place
                torch._dynamo.mark_static_address(t)
        self.bf16 = precision == "bf16"
        self.step_fn = self._speed(vmap(self._member_step, randomness="different"), compile)
        self.eval_fn = self._speed(vmap(self._member_eval, in_dims=(0, 0, None, None, None), randomness="different"),
                                   compile)

    def _speed(self, fn: Callable, compile: str) -> Callable:
        return fn if compile == "none" else new_step(torch.compile(fn, mode=compile, dynamic=False))

    def _forward(self, params, buffers, x):
        """The model on one member's weights; under bf16 autocast when asked, outputs back in fp32."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = functional_call(self.base, (params, buffers), (x,))
        return to_fp32(out) if self.bf16 else out

    def _rates(self, params: dict, buffers: dict):
        tensors = {**buffers, **params}
        return SimpleNamespace(delta=tensors["memory.delta"], eta=tensors["memory.eta"],
                               theta=tensors["memory.theta"], bound=self.base.memory.bound,
                               memory_size=self.base.memory.memory_size)

    def _member_step(self, params, buffers, x, target, labels):
        """One member's forward pass and loss, under vmap; returns (loss, statistics), all tensors."""
        out = self._forward(params, buffers, x)
        loss, parts = self.base.loss(out, target, labels)
        zero = loss.detach().new_zeros(())
        return loss, {
            "correct": parts.get("correct", zero).to(zero.dtype), "recon": parts.get("recon_loss", zero),
            "kl": parts.get("kl", zero), "max_w": out.max_w, "max_readout": out.max_readout,
            "w_finite": out.memory.detach().isfinite().all(),
            "bound_ratio": step_bound_ratio(self._rates(params, buffers), out.max_w, out.max_readout),
        }

    def _member_eval(self, params, buffers, x, x01, labels):
        out = self._forward(params, buffers, x)
        zero = x01.new_zeros(())
        errors = (out.log_probs.argmax(1) != labels).sum().to(zero.dtype) if out.log_probs is not None else zero
        recon = ((out.canvas - x01) ** 2).sum() if out.canvas is not None else zero
        return errors, recon

    def train_step(self, x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor,
                   alive: torch.Tensor, stats: EpochStats, freeze_buffers: bool = False) -> None:
        """One step of every member; x (K, B, C, H, H), labels (K, B), lr (K,), alive (K,) updated in place.

        No host sync: a member's divergence only clears its `alive` entry on the device.
        freeze_buffers: also keep the BatchNorm statistics of members that are not alive (their forward
        pass still runs and would update them); costs a copy of the buffers, so only once one has stopped.
        """
        if freeze_buffers:
            dead = ~alive
            saved = {name: self.buffers[name].clone() for name in self.statistics}
        losses, aux = self.step_fn(self.params, self.buffers, x, target, labels)  # (K,), each (K,)
        for p in self.trainable:
            p.grad = None
        torch.where(alive, losses, 0.0).sum().backward()  # members are independent: d(sum)/d(loss_k) = 1
        grad = self.optimizer.flat_grad()  # (K, N)
        norms = grad.norm(dim=1)  # (K,)
        grads_finite = norms.isfinite()  # before clipping hides an inf
        if self.cfg.grad_clip_mode == "value":  # the authors clipped each gradient element
            grad = torch.minimum(torch.maximum(grad, -self.clip), self.clip)
        elif self.cfg.grad_clip_mode == "norm":  # as clip_grad_norm_, with each member's own norm
            grad = grad * (self.clip[:, 0] / (norms + 1e-6)).clamp(max=1.0)[:, None]
        loss = losses.detach()
        alive &= loss.isfinite() & grads_finite & aux["w_finite"]
        self.optimizer.step(grad, lr, alive)
        if freeze_buffers:  # after the backward pass, which may still read the buffers it saw
            with torch.no_grad():
                for name, old in saved.items():
                    b = self.buffers[name]
                    b.copy_(torch.where(dead.view(-1, *[1] * (b.dim() - 1)), old, b))
        stats.loss += loss
        stats.loss_finite &= loss.isfinite()
        stats.grads_finite &= grads_finite
        stats.w_finite &= aux["w_finite"]
        stats.correct += aux["correct"]
        stats.recon += aux["recon"]
        stats.kl += aux["kl"]
        stats.max_w = torch.maximum(stats.max_w, aux["max_w"])
        stats.max_readout = torch.maximum(stats.max_readout, aux["max_readout"])
        stats.bound_ratio = torch.maximum(stats.bound_ratio, aux["bound_ratio"])

    @torch.no_grad()
    def evaluate(self, split, data: DataBundle) -> list[dict[str, float]]:
        """engine.evaluate for every member at once: the same batches, each member's own weights."""
        cfg = self.cfg
        self.base.eval()
        errors = torch.zeros(self.K, device=self.device)
        recon = torch.zeros(self.K, device=self.device)
        for images, labels in iterate_batches(split, cfg.batch_size, generator=None, shuffle=False, drop_last=False):
            x01 = prepare_batch(images, augment="none", generator=None)
            e, r = self.eval_fn(self.params, self.buffers, to_model_input(x01, cfg, data), x01, labels)  # (K,) each
            errors += e
            recon += r
        self.base.train()
        n = len(split)
        results = [{} for _ in range(self.K)]
        for k, result in enumerate(results):
            if self.classifies:
                result["error"] = float(errors[k]) / n
            if self.draws:
                result["recon_loss"] = float(recon[k]) / n
        return results

    def rates(self, k: int) -> dict[str, float]:
        r = self._rates(self.params, self.buffers)
        return {name: float(getattr(r, name)[k].detach()) for name in ("delta", "eta", "theta")}

    def member_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's weights as a plain STAWM state dict (e.g. to load as a selfsup `pretrained` model)."""
        return {name: t[k].detach().clone() for name, t in {**self.params, **self.buffers}.items()}


def _learning_rates(cfgs: list[Config], epoch: int) -> list[float]:
    """Each member's rate during `epoch` (1-based): what engine.train's LambdaLR gives after epoch - 1 steps."""
    return [cfg.lr * lr_factor(cfg, epoch - 1) for cfg in cfgs]


def run_fused_epoch(stack: FusedStack, data: DataBundle, epoch: int, alive: torch.Tensor, progress: bool,
                    freeze_buffers: bool = False) -> tuple[EpochStats, int, float, list[float]]:
    """One pass of every member over the training set, each in its own order; returns stats, steps, seconds, lrs."""
    cfg, K, device = stack.cfg, stack.K, data.train.images.device
    stats = EpochStats.zeros(device, members=K)
    steps = steps_per_epoch(cfg, len(data.train))
    lrs = _learning_rates(stack.cfgs, epoch)
    lr = torch.tensor(lrs, dtype=torch.float64, device=device)  # (K,)
    members = [iterate_batches(data.train, cfg.batch_size, generator=g, shuffle=True, drop_last=True)
               for g in stack.generators]
    augmented = any(c.augment != "none" for c in stack.cfgs)
    clock = EpochClock(steps, epoch, cfg.epochs, device, progress)
    for step, batches in enumerate(zip(*members)):
        if step == steps:
            break
        images = torch.stack([b[0] for b in batches])  # (K, B, C, H, H) uint8
        labels = torch.stack([b[1] for b in batches])  # (K, B)
        if augmented:  # each member's augmentation from its own generator, as in its plain run
            x01 = torch.stack([prepare_batch(images[k], augment=c.augment, generator=g,
                                             rotation_degrees=c.rotation_degrees,
                                             rotation_interpolation=c.rotation_interpolation)
                               for k, (c, g) in enumerate(zip(stack.cfgs, stack.generators))])
        else:  # nothing random: one conversion for the whole stack
            x01 = prepare_batch(images.flatten(0, 1), augment="none", generator=None).view(images.shape)
        stack.train_step(to_model_input(x01, cfg, data), x01, labels, lr, alive, stats, freeze_buffers)
        clock.step()
    return stats, steps, clock.stop(), lrs


def train_fused(cfgs: list[Config], *, device: str | torch.device = "cpu", data_root: str | Path | None = None,
                checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = False,
                data: DataBundle | None = None, compile: str = "none",
                precision: str = "fp32") -> Iterator[list[dict | None]]:
    """Train the configs as one fused model; yield, per epoch, one record per member (engine.train's keys).

    A member's record is None once it has stopped (diverged in an earlier epoch); the run ends when
    every member has. images_per_second is each member's own rate: their sum is the stack's.
    The checkpoint (FUSED_CHECKPOINT in checkpoint_dir, written atomically each epoch) holds the whole
    stack; resume=True continues it exactly. compile and precision mean what they do in engine.train.
    """
    check_fusible(cfgs)
    check_speed_options(compile, precision)
    device = torch.device(device)
    cfg = cfgs[0]
    if data is None:  # loading draws nothing from the seeded generators, so loading first changes no init
        data = load_training_data(cfg, data_root, device)
    stack = FusedStack(cfgs, device, compile=compile, precision=precision)
    monitors = [StabilityMonitor(c) for c in cfgs]
    alive = torch.ones(stack.K, dtype=torch.bool, device=device)  # (K,) on the device, cleared by the step
    stopped = [False] * stack.K  # on the host: members whose diverged record has been yielded
    start_epoch = 0
    path = checkpoint_path(checkpoint_dir, FUSED_CHECKPOINT)
    if resume and path is not None and path.exists():
        state = load_fused_checkpoint(path, cfgs)
        with torch.no_grad():
            for name, t in {**stack.params, **stack.buffers}.items():
                t.copy_(state["stack"][name])
        stack.optimizer.load_state_dict(state["optimizer"])
        alive.copy_(state["alive"])
        stopped = list(state["stopped"])
        for monitor, saved in zip(monitors, state["stability"]):
            restore_monitor(monitor, saved)
        set_rng_state(state["rng"], stack.generators[0])
        for g, saved in zip(stack.generators, state["data_generators"]):
            g.set_state(saved)
        start_epoch = state["epoch"]

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        if all(stopped):
            return
        stats, steps, seconds, lrs = run_fused_epoch(stack, data, epoch, alive, progress, freeze_buffers=any(stopped))
        evaluations = _evaluate_members(stack, data)  # for all; a diverged member's are dropped
        records: list[dict | None] = []
        for k, monitor in enumerate(monitors):
            if stopped[k]:
                records.append(None)
                continue
            records.append(epoch_record(monitor, epoch, stats.member(k), steps=steps, seconds=seconds,
                                        batch_size=cfg.batch_size, heads=stack, rates=stack.rates(k), lr=lrs[k],
                                        evaluate=evaluations[k].copy, device=device))
            stopped[k] = records[k]["diverged"]
        if path is not None:
            save_checkpoint(path, {
                "format": FORMAT, "configs": [c.to_flat() for c in cfgs], "epoch": epoch,
                "stack": {name: t.detach() for name, t in {**stack.params, **stack.buffers}.items()},
                "optimizer": stack.optimizer.state_dict(), "alive": alive, "stopped": stopped,
                "rng": rng_state(stack.generators[0]), "data_generators": [g.get_state() for g in stack.generators],
                "stability": [monitor_state(m) for m in monitors],
            })
        yield records


def _evaluate_members(stack: FusedStack, data: DataBundle) -> list[dict[str, float]]:
    """engine.evaluation_metrics for every member: each one's test (and validation) record keys."""
    tests = stack.evaluate(data.test, data)
    vals = stack.evaluate(data.val, data) if data.val is not None else [None] * stack.K
    return [evaluation_record(test, val) for test, val in zip(tests, vals)]


def load_fused_checkpoint(path: Path, cfgs: list[Config]) -> dict:
    """The fused checkpoint at `path`, checked against the members' configs (CheckpointError otherwise)."""
    state = read_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fused STAWM checkpoint")
    saved = state["configs"]
    if len(saved) != len(cfgs):
        raise CheckpointError(f"checkpoint {path} holds {len(saved)} members, not {len(cfgs)}")
    for k, (flat, cfg) in enumerate(zip(saved, cfgs)):
        check_resume_identity(flat, cfg, f"checkpoint {path} member {k}")
    return state
