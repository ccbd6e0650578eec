"""K trials trained as one vectorised model in one process (trial fusion over seeds and rates, as HFTA does).

Letters: K members (fused trials), A those still in the stack (A <= K: slot i holds member active[i]), B batch,
C channels, H image side, N trainable numbers per member.

Why: one STAWM step is a long chain of small kernels, so a GPU running one trial mostly waits on
kernel launches, and separate processes on one GPU only time-slice it. Here the members' parameters
and buffers are stacked on a new leading axis (`stack_module_state`), the model runs once under `vmap`
over that axis (`functional_call` on a weightless copy), and one Adam updates the whole stack: every
kernel is K times larger and is launched once.

Each member is the plain run it stands for:
- built after `seed_everything(seed)` exactly as its plain run (`step.OneModel`) builds it (same initial
  weights), with its own data generator (order, augmentation);
- its own BatchNorm running statistics: stacked buffers, updated in place under vmap (functorch's
  batch-norm caveat is about unbatched running stats; these are batched, and tests/test_fused.py
  checks them against plain runs);
- Adam and clipping by value are elementwise, so one over the stack is K independent ones; the
  learning rate, schedule and clip bound are per member; clipping by norm takes each member's norm;
- its own StabilityMonitor and its own per-epoch record: the loop (`stawm.train.loop`) makes both, as
  for a plain run.
With dropout 0 and no drawing noise a member's numbers equal its plain run up to float rounding.
Dropout masks and drawing noise come from one global stream (vmap randomness="different", seeded with
member 0's seed): independent across members, but not the masks the member's plain run draws.

A member that diverges (non-finite loss, gradients or W) is frozen at the step it happened: its
parameters, Adam moments and step count stop changing, and its loss is masked out of the backward pass
until the epoch ends (within an epoch the shapes stay static); its epoch record says diverged=True.

A member that has stopped (the loop's stop_reason: diverged, or stuck) leaves the stack at the start of the
next epoch, so its compute is saved: the stacked parameters, buffers, Adam state, learning rates and clip
bounds are rebuilt from the remaining members' rows (`begin_epoch`), and what the member left behind is
shelved as it was. The slots of the stack are then `active` (member indices k); everything the loop sees is
still indexed by k: its records, `rates(k)`, `generators`, and the checkpoint.
The checkpoint keeps the full-K layout (every tensor with one row per member, the shelved rows scattered back):
the format stays the one a plain run writes, `checkpoints.member_weights(path, k)` still finds any member
(a stopped one's final weights included), and a resumed stack loads all K rows and compacts again at its first
`begin_epoch` from the checkpoint's `stopped` list, to the same slots as the run it continues. Storing only
the remaining members would save a little disk at the price of a second layout every reader must know.
The remaining members compute what they would have with the stopped ones still there, up to float rounding
(the kernels batch A members instead of K; tests/test_stuck.py checks it), except with dropout or drawing
noise: their masks come from the one global stream in slot order, which shifts once a member leaves.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from ..config import Config
from ..model.stability import step_bound_ratio
from .data import DataBundle, Split, iterate_batches, prepare_batch, to_model_input
from .step import (EpochStats, build_model, check_speed_options, memory_statistics, new_step, seed_everything,
                   split_results, to_fp32)

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
    """K members as one model (`step.Members`, the loop's interface): stacked parameters and buffers, the vmapped
    step and evaluation, one StackedAdam, and which members are still alive (on the device).

    Slot i of every stacked tensor is member active[i]; members that stopped have left for the shelf."""

    def __init__(self, cfgs: list[Config], device: torch.device, compile: str = "none", precision: str = "fp32"):
        check_fusible(cfgs)
        check_speed_options(compile, precision)
        _register_vmap_rules()
        self.cfgs, self.cfg, self.K, self.device, self.compile = cfgs, cfgs[0], len(cfgs), device, compile
        models, self.generators = [], []
        for cfg in cfgs:  # each member exactly as its plain run makes it: seed, then build
            self.generators.append(seed_everything(cfg.seed, device))
            models.append(build_model(cfg, device))
        seed_everything(cfgs[0].seed, device)  # the one global stream for dropout and drawing noise
        params, buffers = stack_module_state(models)  # name -> (K, ...)
        self.learns = {name: p.requires_grad for name, p in params.items()}  # the parameters, and which train
        self.base = _weightless_copy(models[0])
        self.classifies, self.draws = models[0].classifies, models[0].draws
        self.shelf: dict[int, dict] = {}  # k -> the rows a member took with it when it left the stack (`_leave`)
        self._install(list(range(self.K)), {**params, **buffers}, None, torch.ones(self.K, dtype=torch.bool))
        self.lr = torch.full((self.K,), cfgs[0].lr, dtype=torch.float64, device=device)  # (A,) set per epoch
        self.bf16 = precision == "bf16"
        self.step_fn = self._speed(vmap(self._member_step, randomness="different"), compile)
        self.eval_fn = self._speed(vmap(self._member_eval, in_dims=(0, 0, None, None, None), randomness="different"),
                                   compile)

    def _install(self, members: list[int], weights: dict[str, torch.Tensor], optimizer: dict | None,
                 alive: torch.Tensor) -> None:
        """Make the stack hold `members` (indices k, in slot order) from tensors with one row each, in that order:
        its own copies on the device as fresh leaves, a StackedAdam over them (fresh when `optimizer` is None),
        and the members' clip bounds."""
        def own(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(self.device, copy=True)

        self.active = list(members)
        self.params = {name: own(weights[name]).requires_grad_(learns) for name, learns in self.learns.items()}
        self.buffers = {name: own(t) for name, t in weights.items() if name not in self.learns}  # name -> (A, ...)
        self.trainable = [p for p in self.params.values() if p.requires_grad]
        self.optimizer = StackedAdam(self.trainable)
        if optimizer is not None:
            self.optimizer.load_state_dict(optimizer)
        self.alive = own(alive)  # (A,) cleared by the step, no host sync
        self.clip = torch.tensor([self.cfgs[k].grad_clip for k in members], device=self.device)[:, None]  # (A, 1)
        if self.compile != "none":  # the stack is the model's state, not per-call input: CUDA graphs may keep its
            for t in [*self.params.values(), *self.buffers.values()]:  # addresses and update BatchNorm in place
                torch._dynamo.mark_static_address(t)

    def _rows(self) -> dict[str, dict[str, torch.Tensor]]:
        """The stack's state by part (weights, optimizer, alive), each tensor one row per slot."""
        return {"weights": {name: t.detach() for name, t in {**self.params, **self.buffers}.items()},
                "optimizer": self.optimizer.state_dict(), "alive": {"alive": self.alive}}

    def _leave(self, stopped: list[bool]) -> None:
        """The members that stopped leave: their rows go to the shelf (on the CPU: they never step again) and the
        others are installed anew, in their order. Once per member, at the start of the epoch after its stop."""
        rows = self._rows()
        for i, k in enumerate(self.active):
            if stopped[k]:
                self.shelf[k] = {part: {name: t[i].cpu() for name, t in part_rows.items()}
                                 for part, part_rows in rows.items()}
        slots = [i for i, k in enumerate(self.active) if not stopped[k]]
        keep = torch.tensor(slots, device=self.device)
        kept = {part: {name: t[keep] for name, t in part_rows.items()} for part, part_rows in rows.items()}
        self._install([self.active[i] for i in slots], kept["weights"], kept["optimizer"], kept["alive"]["alive"])

    def _speed(self, fn: Callable, compile: str) -> Callable:
        return fn if compile == "none" else new_step(torch.compile(fn, mode=compile, dynamic=False))

    def _forward(self, params, buffers, x):
        """The model on one member's weights; under bf16 autocast when asked, outputs back in fp32."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = functional_call(self.base, (params, buffers), (x,))
        return to_fp32(out) if self.bf16 else out

    def _rate(self, name: str, params: dict, buffers: dict) -> torch.Tensor:
        """A memory rate: a parameter when rates learn, else a buffer."""
        return params.get(f"memory.{name}", buffers.get(f"memory.{name}"))

    def _member_step(self, params, buffers, x, target, labels):
        """One member's forward pass and loss, under vmap; returns (loss, statistics), all tensors."""
        out = self._forward(params, buffers, x)
        loss, parts = self.base.loss(out, target, labels)
        zero = loss.detach().new_zeros(())
        return loss, {
            "correct": parts.get("correct", zero).to(zero.dtype), "recon": parts.get("recon_loss", zero),
            "kl": parts.get("kl", zero), "w_finite": out.memory.detach().isfinite().all(), **memory_statistics(out),
            "memory_bound_ratio": step_bound_ratio(  # the rates this forward pass used, before the step
                self._rate("delta", params, buffers), self._rate("eta", params, buffers), out.max_abs_w,
                out.max_readout, bound=self.base.memory.bound, memory_size=self.base.memory.memory_size,
                glimpses=self.base.cfg.glimpses),
        }

    def _member_eval(self, params, buffers, x, x01, labels):
        out = self._forward(params, buffers, x)
        zero = x01.new_zeros(())
        errors = (out.log_probs.argmax(1) != labels).sum().to(zero.dtype) if out.log_probs is not None else zero
        recon = ((out.canvas - x01) ** 2).sum() if out.canvas is not None else zero
        return errors, recon

    def begin_epoch(self, lrs: list[float], stopped: list[bool]) -> None:
        """Members that stopped leave the stack (`_leave`: their BatchNorm statistics, weights and Adam state stay as
        their last epoch left them); each remaining member's learning rate for the epoch."""
        if any(stopped[k] for k in self.active):
            self._leave(stopped)
        self.lr = torch.tensor([lrs[k] for k in self.active], dtype=torch.float64, device=self.device)  # (A,)

    def step(self, x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, stats: EpochStats) -> None:
        """One step of every member in the stack; x (A, B, C, H, H), labels (A, B), in slot order.

        No host sync: a member's divergence only clears its `alive` entry on the device.
        """
        alive = self.alive
        losses, aux = self.step_fn(self.params, self.buffers, x, target, labels)  # (A,), each (A,)
        for p in self.trainable:
            p.grad = None
        torch.where(alive, losses, 0.0).sum().backward()  # members are independent: d(sum)/d(loss_k) = 1
        grad = self.optimizer.flat_grad()  # (A, N)
        norms = grad.norm(dim=1)  # (A,)
        grads_finite = norms.isfinite()  # before clipping hides an inf
        if self.cfg.grad_clip_mode == "value":  # the authors clipped each gradient element
            grad = torch.minimum(torch.maximum(grad, -self.clip), self.clip)
        elif self.cfg.grad_clip_mode == "norm":  # as clip_grad_norm_, with each member's own norm
            grad = grad * (self.clip[:, 0] / (norms + 1e-6)).clamp(max=1.0)[:, None]
        loss = losses.detach()
        alive &= loss.isfinite() & grads_finite & aux["w_finite"]
        self.optimizer.step(grad, self.lr, alive)
        stats.fold(loss=loss, loss_finite=loss.isfinite(), grads_finite=grads_finite, **aux)

    @torch.no_grad()
    def evaluate(self, split: Split, data: DataBundle) -> list[dict[str, float]]:
        """OneModel.evaluate for every member in the stack at once (slot order): the same batches, each member's
        own weights."""
        cfg = self.cfg
        self.base.eval()
        errors = torch.zeros(len(self.active), device=self.device)
        recon = torch.zeros(len(self.active), device=self.device)
        for images, labels in iterate_batches(split, cfg.batch_size, generator=None, shuffle=False, drop_last=False):
            x01 = prepare_batch(images, augment="none", generator=None)
            e, r = self.eval_fn(self.params, self.buffers, to_model_input(x01, cfg, data), x01, labels)  # (A,) each
            errors += e
            recon += r
        self.base.train()
        return split_results(errors, recon, len(split), self)

    def rates(self, k: int) -> dict[str, float]:
        slot = self.active.index(k)  # the loop asks only members still in the stack
        return {name: float(self._rate(name, self.params, self.buffers)[slot].detach())
                for name in ("delta", "eta", "theta")}

    def state_dict(self) -> dict:
        """Every tensor with one row per member k (K rows): the stack's rows and the shelf's, scattered back."""
        full = {part: {name: self._scatter(t, part, name) for name, t in part_rows.items()}
                for part, part_rows in self._rows().items()}
        return {"weights": full["weights"], "optimizer": full["optimizer"], "alive": full["alive"]["alive"]}

    def _scatter(self, rows: torch.Tensor, part: str, name: str) -> torch.Tensor:
        """(A, ...) slot rows -> (K, ...) member rows, the shelved members' own rows in their places."""
        if not self.shelf:  # no member has left: slot i is member i
            return rows
        full = rows.new_empty((self.K, *rows.shape[1:]))
        full[torch.tensor(self.active, device=rows.device)] = rows
        for k, shelved in self.shelf.items():
            full[k] = shelved[part][name]
        return full

    def load_state_dict(self, state: dict) -> None:
        """Back to a `state_dict`: all K members in the stack again; the loop's next `begin_epoch` lets those that
        had stopped leave, as they did in the run the state comes from."""
        self.shelf = {}
        self._install(list(range(self.K)), state["weights"], state["optimizer"], state["alive"])
