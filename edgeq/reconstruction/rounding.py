"""AdaRound: learned rounding of weights (Nagel et al., ICML 2020).

Each weight w with channel scale s is split into floor(w/s) and a learned offset h(V) in [0, 1]:

    w_soft = s * (clamp(floor(w/s) + z + h(V), qmin, qmax) - z)      during reconstruction
    w_hard = s * (clamp(floor(w/s) + z + [V >= 0], qmin, qmax) - z)  afterwards (h(V) >= 0.5 <=> V >= 0)

(z: the channel's zero point, 0 for symmetric weights).

h is the rectified sigmoid clamp(sigmoid(V)·(ζ-γ) + γ, 0, 1) with ζ = 1.1, γ = -0.1, whose
stretch lets h reach exactly 0 and 1. V starts where h(V) equals the fractional part of
w/s, so the soft weight starts at the float weight and the hard one at round-to-nearest.
The regularizer Σ 1 - |2h - 1|^β pushes every h to 0 or 1; β anneals from large (only
values near 1/2 are pushed) to small (all are).
"""

from __future__ import annotations

import torch
from torch import nn

GAMMA, ZETA = -0.1, 1.1


class AdaRound:
    """The learned rounding of one weight tensor; ``v`` is the only trainable tensor."""

    def __init__(
        self, weight: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, zero_point: torch.Tensor | float = 0.0
    ):
        scaled = weight.detach() / scale
        rest = (scaled - torch.floor(scaled)).clamp(1e-6, 1 - 1e-6)
        self.floor = torch.floor(scaled) + zero_point  # codes are floor(w/s) + zero point + offset
        self.scale = scale.detach()
        self.zero_point = zero_point
        self.qmin, self.qmax = qmin, qmax
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def offset(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def soft_weight(self) -> torch.Tensor:
        return (torch.clamp(self.floor + self.offset(), self.qmin, self.qmax) - self.zero_point) * self.scale

    def hard_weight(self) -> torch.Tensor:
        return (self.hard_codes() - self.zero_point) * self.scale

    def hard_codes(self) -> torch.Tensor:
        return torch.clamp(self.floor + (self.v.detach() >= 0).to(self.floor.dtype), self.qmin, self.qmax)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.offset() - 1).abs().pow(beta)).sum()

    def to(self, device) -> AdaRound:
        self.floor, self.scale = self.floor.to(device), self.scale.to(device)
        if isinstance(self.zero_point, torch.Tensor):
            self.zero_point = self.zero_point.to(device)
        self.v.data = self.v.data.to(device)
        return self


def beta_schedule(iteration: int, total: int, warmup: float, start: float, end: float) -> float | None:
    """β at ``iteration``: None during the warm-up (no regularizer yet), then a linear decay
    from ``start`` to ``end``, as in the AdaRound reference code."""
    first = int(warmup * total)
    if iteration < first:
        return None
    progress = (iteration - first) / max(total - first, 1)
    return end + (start - end) * max(0.0, 1.0 - progress)
