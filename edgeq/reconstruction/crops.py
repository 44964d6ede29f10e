"""Spatial windows: reconstruct a convolutional unit on crops of its cached inputs.

The early units of an ImageNet network run at 112×112 and cost most of a reconstruction's
time per iteration (EfficientNet-Lite0's first blocks: about 2 s an iteration on two cores,
so a CPU budget leaves them a few dozen iterations). A unit made of convolutions, folded
BatchNorm and pointwise activations commutes with translation: its output on a window of
the input is, away from the window's border, the same window of its full output. So such a
unit can learn on windows: each iteration takes a random ``size``×``size`` window per
image (aligned to the unit's stride), and the target is the full-precision unit run on the
same window, so the window's zero-padded border is matched as it is computed. A 32-pixel
window of a 112-pixel input costs about a twelfth of the full input, and every image gives
many different windows.

Whether a unit commutes with translation is checked on its data, not assumed from its
type: squeeze-and-excitation, global pooling or attention make the window's centre differ
from the full output's, and such a unit is reconstructed on whole inputs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

# Relative tolerance of the translation check: float32 convolutions of a window and of the whole
# input sum in different orders, which moves results by ~1e-6 of their magnitude.
_EQUIVARIANCE_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """Windows of ``size`` input pixels at offsets that are multiples of ``stride``."""

    size: int
    stride: int  # input pixels per output pixel

    @property
    def output_size(self) -> int:
        return self.size // self.stride

    def offsets(self, count: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """(count, 2) window corners (row, column) in input pixels, uniformly over aligned positions."""
        rows = torch.randint((height - self.size) // self.stride + 1, (count,), generator=generator)
        cols = torch.randint((width - self.size) // self.stride + 1, (count,), generator=generator)
        return torch.stack([rows, cols], 1) * self.stride

    def crop(self, tensor: torch.Tensor, offsets: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """Window ``i`` of ``tensor[i]``; ``scale`` divides offsets and size (output coordinates)."""
        size = self.size // scale
        return torch.stack([t[:, r : r + size, c : c + size] for t, (r, c) in zip(tensor, (offsets // scale).tolist())])


def plan_windows(
    module: nn.Module,
    inputs: torch.Tensor,
    size: int,
    run_float: Callable[[Callable[[], torch.Tensor]], torch.Tensor],
) -> WindowPlan | None:
    """The windows ``module`` can learn on, or None when it must see whole inputs.

    None when the inputs are not images (N, C, H, W), are no larger than ``size``, the
    unit's stride does not divide them, or the unit's output on a window differs from the
    window of its full output (checked on two images, with ``run_float`` running the unit
    in full precision).
    """
    if inputs.dim() != 4 or min(inputs.shape[2:]) <= size:
        return None
    sample = inputs[:2]
    full = run_float(lambda: module(sample))
    if not isinstance(full, torch.Tensor) or full.dim() != 4:
        return None
    height, width = inputs.shape[2:]
    if height % full.shape[2] or width % full.shape[3] or height // full.shape[2] != width // full.shape[3]:
        return None
    stride = height // full.shape[2]
    size -= size % stride
    if size < 4 * stride:
        return None
    plan = WindowPlan(size=size, stride=stride)
    # A window away from the input's border, so both its edges differ from the full computation's.
    corner = ((height - size) // 2 // stride) * stride
    offsets = torch.tensor([[corner, corner]] * len(sample))
    windowed = run_float(lambda: module(plan.crop(sample, offsets)))
    expected = plan.crop(full, offsets, scale=stride)
    if windowed.shape != expected.shape:
        return None
    margin = plan.output_size // 4  # the border that zero padding of the window may change
    centre = slice(margin, plan.output_size - margin)
    inner = (slice(None), slice(None), centre, centre)
    error = (windowed[inner] - expected[inner]).abs().max().item()
    if error > _EQUIVARIANCE_TOLERANCE * max(expected.abs().max().item(), 1e-12):
        log.info("output on a window differs from the window of the output (%.3g): whole inputs", error)
        return None
    return plan
