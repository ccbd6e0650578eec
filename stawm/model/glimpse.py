"""Transformational attention: the affine emitter and the glimpse transform t_A (Section 3.2).

Letters: B batch, C channels, H/W image side, S glimpse side, Hd hidden size.
A is a 2 x 3 affine matrix per image, in affine_grid's normalised coordinates ([-1, 1] spans the image).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


class AffineEmitter(nn.Module):
    """Two Linear layers from the emission LSTM output down to the six numbers of A.

    The last layer starts with zero weights and the identity as bias, as in spatial transformers:
    the first glimpses see the whole image, and the policy learns to move from there.
    """

    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, hidden_size // 2), nn.Dropout(dropout), nn.ReLU(),
            nn.Linear(hidden_size // 2, 6),
        )
        nn.init.zeros_(self.net[-1].weight)
        with torch.no_grad():
            self.net[-1].bias.copy_(torch.tensor(IDENTITY))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).view(-1, 2, 3)  # (B, 2, 3)


def warp(source: torch.Tensor, A: torch.Tensor, out_side: int, align_corners: bool) -> torch.Tensor:
    """Sample `source` on the grid A maps the output onto: bilinear, zeros outside."""
    B, C = source.shape[:2]
    grid = F.affine_grid(A, [B, C, out_side, out_side], align_corners=align_corners)  # (B, S, S, 2)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)


def glimpse(image: torch.Tensor, A: torch.Tensor, size: int, align_corners: bool) -> torch.Tensor:
    """t_A: an S x S glimpse of the image; the identity A with S = image side returns the image."""
    return warp(image, A, size, align_corners)  # (B, C, S, S)


def invert_affine(A: torch.Tensor) -> torch.Tensor:
    """The inverse transform t_{A^-1} as a 2 x 3 matrix ([A; 0 0 1]^-1, top two rows)."""
    bottom = A.new_tensor([0.0, 0.0, 1.0]).expand(A.shape[0], 1, 3)
    return torch.linalg.inv(torch.cat([A, bottom], dim=1))[:, :2]  # (B, 2, 3)
