"""STAWM, the Short Term Attentive Working Memory model (Section 3.2, Figures 2-4).

Letters: B batch, C channels, H image side, S glimpse side, N glimpses, M memory size, Hd hidden size,
K latent components.

One forward pass looks at an image N times. Each glimpse writes the Hebb-Rosenblatt memory once;
the heads read it with queries projected from the image context. Every piece of per-image state
(memory W, both LSTM states, the canvas) is a local of `forward`: nothing is parked on the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config
from .glimpse import AffineEmitter, glimpse, invert_affine
from .heads import Classifier, Drawer, gaussian_kl
from .memory import HebbRosenblatt
from .networks import MobileNetGlimpse, context_net, glimpse_conv_net


@dataclass
class Output:
    log_probs: torch.Tensor | None  # (B, classes), classification tasks
    canvas: torch.Tensor | None  # (B, C, H, H) in [0, 1], drawing tasks
    kl: torch.Tensor | None  # (B,) joint KL of the glimpse latents (Eq. 25)
    poses: torch.Tensor  # (B, N, 2, 3) the glimpse transforms A
    memory: torch.Tensor  # (B, M, M) terminal W
    max_abs_w: torch.Tensor  # () largest |W| entry over all glimpses (the memory bound; W < 0 when delta > 1)
    max_readout: torch.Tensor  # () largest read-out W q before sigma over every read (the memory bound)
    readout_dead: torch.Tensor  # () fraction of read-outs sigma(W q) at 0, over every read of the batch
    readout_saturated: torch.Tensor  # () fraction at Lambda, sigma's upper bound


class ReadCounts:
    """How many read-outs sigma(W q) sat at 0 (dead units) and at Lambda (saturated), over a forward pass."""

    def __init__(self, like: torch.Tensor):
        self.dead, self.saturated, self.total = like.new_zeros(()), like.new_zeros(()), 0

    def add(self, memory, projected: torch.Tensor) -> None:
        read = memory.sigma(projected.detach())
        self.dead = self.dead + (read <= 0).sum()
        self.saturated = self.saturated + (read >= memory.bound).sum()
        self.total += read.numel()

    def fractions(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dead / max(self.total, 1), self.saturated / max(self.total, 1)


class STAWM(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        Hd, M = cfg.hidden_size, cfg.memory_size
        self.classifies = cfg.task in ("classify", "sketchpad", "selfsup")
        self.draws = cfg.task in ("draw", "sketchpad")  # selfsup keeps the frozen drawer's weights, unused

        self.context_net = context_net(cfg)
        F_c = self.context_net.out_features
        self.context_to_hidden = nn.Sequential(nn.Linear(F_c, Hd), nn.Dropout(cfg.dropout), nn.ReLU())
        self.emission = nn.LSTMCell(Hd, Hd)  # decides where to look next
        self.aggregator = nn.LSTMCell(Hd, Hd)  # collects what the glimpses saw; starts from zeros
        self.emitter = AffineEmitter(Hd, cfg.dropout)
        self.glimpse_net = MobileNetGlimpse(cfg.channels) if cfg.glimpse_cnn == "mobilenetv2" else glimpse_conv_net(cfg)
        F_g = self.glimpse_net.out_features
        self.glimpse_to_hidden = nn.Sequential(nn.Linear(F_g, Hd), nn.Dropout(cfg.dropout), nn.ReLU())
        self.what = nn.Linear(Hd, M)
        self.where = nn.Linear(6 if cfg.where_source == "pose" else Hd, M)
        self.memory = HebbRosenblatt(M, cfg.delta, cfg.eta, cfg.theta, cfg.learnable_rates, cfg.activation)

        if cfg.task in ("draw", "sketchpad", "selfsup"):
            self.drawer = Drawer(cfg, F_c, F_g if cfg.glimpse_cnn == "conv" else 0)
            if cfg.inverse_transform == "learned":  # authors' code: a second emitter on the same output
                self.inverse_emitter = AffineEmitter(Hd, cfg.dropout)
        if self.classifies:
            self.classifier = Classifier(F_c, M, cfg.num_classes, cfg.query_dropout)
        if cfg.task == "selfsup":  # a trained drawing model, frozen; only the classifier (and rates) learn
            for name, p in self.named_parameters():
                p.requires_grad_(name.startswith("classifier.") or (name.startswith("memory.") and cfg.learnable_rates))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.task == "selfsup":  # the frozen drawing model keeps its BatchNorm statistics and no dropout
            for name, module in self.named_children():
                if name != "classifier":
                    module.train(False)
        return self

    def forward(self, images: torch.Tensor) -> Output:
        cfg = self.cfg
        B = images.shape[0]
        context = self.context_net(images)  # (B, F_c)
        emission_in = self.context_to_hidden(context)  # (B, Hd): the first input and initial hidden state
        emission_state = (emission_in, torch.zeros_like(emission_in))
        aggregator_state = (torch.zeros_like(emission_in), torch.zeros_like(emission_in))
        W = self.memory.init_state(B)  # (B, M, M)
        max_abs_w, max_readout, reads = W.new_zeros(()), W.new_zeros(()), ReadCounts(W)
        poses, latents = [], []
        if self.draws:
            canvas = self.drawer.start(B, images)
            draw_query = self.drawer.query(context)  # (B, M)

        for _ in range(cfg.glimpses):
            emission_state = self.emission(emission_in, emission_state)
            h = emission_state[0]  # (B, Hd)
            A = self.emitter(h)  # (B, 2, 3)
            g = self.glimpse_to_hidden(self.glimpse_net(glimpse(images, A, cfg.glimpse_size, cfg.align_corners)))
            aggregator_state = self.aggregator(g, aggregator_state)
            emission_in = aggregator_state[0]  # the aggregate informs the next glimpse
            where = self.where(A.flatten(1) if cfg.where_source == "pose" else h)  # (B, M)
            e = self.memory.sigma(self.what(g) * where)  # (B, M): multiplicative what/where pathway
            W = self.memory.update(W, e)  # update state: one write per glimpse (Eq. 2)
            max_abs_w = torch.maximum(max_abs_w, W.detach().abs().amax())
            poses.append(A)
            if self.draws:  # intermediate state: read after each write, draw one sketch
                A_inv = self.inverse_emitter(h) if cfg.inverse_transform == "learned" else invert_affine(A)
                canvas, latent, projected = self.drawer.step(self.memory, W, draw_query, A_inv, canvas)
                latents.append(latent)
                max_readout = torch.maximum(max_readout, projected.detach().amax())
                reads.add(self.memory, projected)

        log_probs = None
        if self.classifies:  # terminal state
            log_probs, projected = self.classifier(self.memory, W, context)
            max_readout = torch.maximum(max_readout, projected.detach().amax())
            reads.add(self.memory, projected)
        canvas_out, kl = None, None
        if self.draws:
            canvas_out = self.drawer.finish(canvas)
            mu = torch.stack([m for m, _ in latents], dim=1)  # (B, N, K)
            logvar = torch.stack([v for _, v in latents], dim=1)  # (B, N, K)
            kl = gaussian_kl(mu, logvar)  # (B,)
        return Output(log_probs, canvas_out, kl, torch.stack(poses, dim=1), W, max_abs_w, max_readout,
                      *reads.fractions())

    def loss(self, out: Output, targets: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The training objective and its parts as tensors (no host sync).

        targets: the images in [0, 1] (what the drawing reconstructs); labels: (B,) class indices.
        Drawing follows the authors' code where the paper is silent: squared error summed over the
        batch, KL averaged over it, weighted by beta (beta-VAE, Eq. 5/6).
        """
        cfg, parts = self.cfg, {}
        loss = targets.new_zeros(())
        if out.log_probs is not None:
            nll = F.nll_loss(out.log_probs, labels, reduction=cfg.nll_reduction)
            parts["nll"] = nll.detach()
            parts["correct"] = (out.log_probs.argmax(1) == labels).sum()
            loss = loss + cfg.class_loss_scale * nll
        if out.canvas is not None:
            recon = F.mse_loss(out.canvas, targets, reduction="sum")
            kl = out.kl.mean()
            parts["recon_loss"] = recon.detach() / targets.shape[0]  # per image, comparable across batch sizes
            parts["kl"] = kl.detach()
            loss = loss + cfg.draw_loss_scale * (recon + cfg.beta * kl)
        return loss, parts

    def load_drawing_weights(self, state_dict: dict) -> None:
        """Self-supervised setting: take every weight of a trained drawing model, keep our classifier."""
        own = {k: v for k, v in state_dict.items() if not k.startswith("classifier.")}
        missing, unexpected = self.load_state_dict(own, strict=False)
        missing = [k for k in missing if not k.startswith("classifier.")]
        if missing or unexpected:
            raise ValueError(f"pretrained drawing model does not match: missing {missing}, unexpected {unexpected}")
