"""The heads that read the memory (Section 3.3): classification, drawing, and the variational terms.

Letters: B batch, M memory size, K latent components, N glimpses, C channels, H image side, S glimpse side.
Each head owns a query projection of the (detached) image context; several heads can read one memory.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .glimpse import warp
from .networks import TransposeCNN

CANVAS_START = -6.0  # addition canvas starts at -6 so that an empty canvas is black after the sigmoid
QUERY_BOUND = 6.0  # every query ends in a ReLU6


class Query(nn.Module):
    """Linear(context -> M), dropout, ReLU6: the biases learn a static query that the image context modulates.

    The activation comes last, so a query never exceeds 6 (dropout's 1/(1-p) scaling happens before it):
    the read-out bound of Appendix A takes that 6 as the query's bound (stability.QUERY_BOUND).
    """

    def __init__(self, context_features: int, memory_size: int, dropout: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(context_features, memory_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        # detached, so that divergent queries do not pollute the context network (Section 3.3)
        return F.relu6(self.dropout(self.proj(context.detach())))  # (B, M)


class Classifier(nn.Module):
    """Terminal read -> Linear(M -> classes) -> LogSoftmax (Figure 3)."""

    def __init__(self, context_features: int, memory_size: int, num_classes: int, query_dropout: float):
        super().__init__()
        self.query = Query(context_features, memory_size, query_dropout)
        self.out = nn.Linear(memory_size, num_classes)

    def forward(self, memory, W: torch.Tensor, context: torch.Tensor):
        projected = memory.project(W, self.query(context))  # (B, M), before sigma: for the stability bound
        return F.log_softmax(self.out(memory.sigma(projected)), dim=1), projected  # (B, classes), (B, M)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """D_KL(N(mu, sigma^2) || N(0, I)) = -1/2 sum_k (1 + log sigma_k^2 - mu_k^2 - sigma_k^2)   (Eq. 24).

    Summed over every axis but the batch, so for stacked glimpse sub-spaces (B, N, K) it is the joint
    KL of Eq. 25 under conditional independence.
    """
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).flatten(1).sum(1)  # (B,)


def relaxed_bernoulli(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """A differentiable Concrete sample (reparameterised logistic noise); -> Bernoulli as tau -> 0.

    torch.distributions' own, as the authors' code calls it (it clamps probabilities at the dtype's eps).
    validate_args=False: checking that probs lie in [0, 1] would sync the host every step.
    """
    return torch.distributions.RelaxedBernoulli(temperature, probs=probs, validate_args=False).rsample()


class Drawer(nn.Module):
    """Per glimpse: intermediate read -> Gaussian latent -> transpose CNN sketch -> warped onto the canvas.

    canvas="addition" (Eq. 3): C_N = S(C_0 + sum_n t_{A^-1}(U_n)), C_0 = -6.
    canvas="bernoulli" (Eq. 4): an alpha channel P gives a Concrete mask B ~ Concrete(t_{A^-1}(S(P)), tau);
    C_n = C_{n-1} (1 - B) + t_{A^-1}(S(U_n)) B, C_0 = 0.
    """

    def __init__(self, cfg, context_features: int, decoder_features: int):
        super().__init__()
        self.canvas_kind = cfg.canvas
        self.image_size, self.channels = cfg.image_size, cfg.channels
        self.temperature, self.align_corners = cfg.concrete_temperature, cfg.align_corners
        self.eval_sample = cfg.eval_sample  # z in eval mode: sampled (authors' MNIST) or mu (their CelebA)
        self.eval_sample_mask = cfg.eval_sample_mask  # the Concrete mask in eval mode: sampled in their code
        self.query = Query(context_features, cfg.memory_size)  # no dropout in any drawing model
        self.latent = nn.Linear(cfg.memory_size, 2 * cfg.latent_size)  # -> (mu, log sigma^2)
        self.expand = nn.Sequential(nn.Linear(cfg.latent_size, decoder_features), nn.ReLU())
        sketch_channels = cfg.channels + (1 if cfg.canvas == "bernoulli" else 0)  # + alpha channel P
        self.decoder = TransposeCNN(cfg, sketch_channels)

    def start(self, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        start = CANVAS_START if self.canvas_kind == "addition" else 0.0
        return like.new_full((batch_size, self.channels, self.image_size, self.image_size), start)  # (B, C, H, H)

    def step(self, memory, W, q, A_inv, canvas):
        """One intermediate read and canvas update; returns the new canvas, (mu, logvar), and the read-out."""
        projected = memory.project(W, q)  # (B, M)
        mu, logvar = self.latent(memory.sigma(projected)).chunk(2, dim=1)  # (B, K) each
        sample = self.training or self.eval_sample
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu) if sample else mu  # reparameterised
        sketch = self.decoder(self.expand(z))  # (B, C(+1), S_d, S_d), logits
        if self.canvas_kind == "addition":
            canvas = canvas + warp(sketch, A_inv, self.image_size, self.align_corners)
        else:
            # warp after the sigmoid: the zeros outside the warped sketch then mean "mask 0, leave the canvas"
            warped = warp(torch.sigmoid(sketch), A_inv, self.image_size, self.align_corners)  # (B, C+1, H, H)
            paint, probs = warped[:, :-1], warped[:, -1:]
            mask = relaxed_bernoulli(probs, self.temperature) if self.training or self.eval_sample_mask else probs
            canvas = canvas * (1 - mask) + paint * mask
        return canvas, (mu, logvar), projected

    def finish(self, canvas: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(canvas) if self.canvas_kind == "addition" else canvas  # (B, C, H, H) in [0, 1]
