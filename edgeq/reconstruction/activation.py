"""Learned activation step sizes (LSQ, Esser et al. 2020) with QDrop's random dropping.

    x_q = s · (clamp(round(x/s) + z, 0, 2^b - 1) - z)

round passes gradients straight through; the step s is a trainable parameter whose
gradient is scaled by 1/sqrt(elements per sample · (2^b - 1)) so that its updates are
comparable in size to the weights' (LSQ). The zero point z stays where the MSE
initialization put it, so zero stays exact.

QDrop (Wei et al., ICLR 2022): while a block is reconstructed, each activation element
skips quantization with probability p, so the learned rounding sees both quantized and
full-precision inputs and settles in a flatter minimum.
"""

from __future__ import annotations

import torch
from torch import nn


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``factor``."""
    return (x - x * factor).detach() + x * factor


class LearnedActivation:
    """Per-tensor activation fake-quantizer with a trainable step (``scale``)."""

    def __init__(self, scale: float, zero_point: int, qmax: int, *, learn_scale: bool):
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learn_scale)
        self.zero_point = float(zero_point)
        self.qmax = qmax

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        factor = 1.0 / (max(x[0].numel(), 1) * self.qmax) ** 0.5
        scale = scale_gradient(self.scale.abs().clamp_min(1e-8), factor)
        codes = torch.clamp(round_ste(x / scale) + self.zero_point, 0, self.qmax)
        return (codes - self.zero_point) * scale

    def to(self, device) -> LearnedActivation:
        self.scale.data = self.scale.data.to(device)
        return self


def drop_quantization(
    x: torch.Tensor, quantized: torch.Tensor, probability: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Each element is ``x`` (quantization dropped) with ``probability``, else ``quantized``."""
    if probability <= 0:
        return quantized
    keep_float = torch.rand(x.shape, generator=generator, device=x.device) < probability
    return torch.where(keep_float, x, quantized)
