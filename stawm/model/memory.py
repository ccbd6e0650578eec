"""The Hebb-Rosenblatt memory (Section 3.1, Eq. 2): the weights of a layer, written by a Hebbian rule.

Letters: B batch, M memory size. W is one M x M matrix per image, (B, M, M).

The state W is passed in and returned, never kept on the module, so the same step runs eager,
compiled, graph-captured or over a stack of fused trials.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..conditions import ACTIVATIONS as BOUNDS  # (sigma(0), Lambda) per activation

# sigma of layers I and II and its upper bound Lambda (Appendix A needs it nonnegative and bounded)
ACTIVATIONS = {"relu6": (F.relu6, BOUNDS["relu6"][1]), "sigmoid": (torch.sigmoid, BOUNDS["sigmoid"][1])}


class HebbRosenblatt(nn.Module):
    """W(t+1) = W(t) + eta [e (x) sigma(W(t) e + theta e)] - delta W(t)      (Eq. 2)

    Entry (i, j) of the increment is eta * e_i * sigma(W e + theta e)_j, with (W e)_i = sum_j W_ij e_j.
    Reading with a query q gives sigma(W q): no theta q term, or the memory could learn the identity.
    """

    def __init__(self, memory_size: int, delta: float = 0.2, eta: float = 0.4, theta: float = 0.5,
                 learnable: bool = False, activation: str = "relu6"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not allowed: choose one of {sorted(ACTIVATIONS)}")
        self.memory_size = memory_size
        self.activation = activation
        self.sigma, self.bound = ACTIVATIONS[activation]
        for name, value in (("delta", delta), ("eta", eta), ("theta", theta)):
            rate = torch.tensor(float(value))
            if learnable:  # scalar parameters trained by the optimiser with the rest of the model
                self.register_parameter(name, nn.Parameter(rate))
            else:  # constants that still follow .to(device) and live in the state dict
                self.register_buffer(name, rate)

    def init_state(self, batch_size: int) -> torch.Tensor:
        """An empty memory per image: W starts at zero (a random start would implant a false memory)."""
        return self.delta.new_zeros(batch_size, self.memory_size, self.memory_size)  # (B, M, M)

    def update(self, W: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """One glimpse's write (Eq. 2). With theta = 0 and W = 0 nothing is ever learned."""
        post = self.sigma(torch.bmm(W, e.unsqueeze(2)).squeeze(2) + self.theta * e)  # (B, M)
        increment = e.unsqueeze(2) * post.unsqueeze(1)  # (B, M, M): [i, j] = e_i * post_j
        return W + self.eta * increment - self.delta * W  # (B, M, M)

    def project(self, W: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """W q before the activation: the read-out whose bound Appendix A checks."""
        return torch.bmm(W, q.unsqueeze(2)).squeeze(2)  # (B, M)

    def read(self, W: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Intermediate or terminal read: sigma(W q); the memory is not changed."""
        return self.sigma(self.project(W, q))  # (B, M)

    def rates(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in ("delta", "eta", "theta")}

    def extra_repr(self) -> str:
        learnable = isinstance(self.delta, nn.Parameter)
        return f"memory_size={self.memory_size}, activation={self.activation}, learnable={learnable}"
