"""Modules that make a model's operations visible to edgeq.

edgeq quantizes the inputs of modules it can see. Convolutions and linears are modules
already; a matrix product of two activations (attention's Q·Kᵀ and weights·V) is usually a
bare ``torch.matmul`` call. Writing it as a :class:`MatMul` module lets edgeq quantize
both of its inputs, as BRECQ/QDrop-style ViT quantization does; the numbers of the float
model do not change.
"""

from __future__ import annotations

import torch
from torch import nn


class MatMul(nn.Module):
    """``torch.matmul(a, b)`` as a module."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)
