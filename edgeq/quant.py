"""Quantization primitives: the one definition of rounding that every path is tested against.

Affine quantization maps a real x to an integer q = clamp(round(x / scale) + zero_point,
qmin, qmax) and back to x_hat = (q - zero_point) * scale. ``round`` is round-half-to-even,
as in ONNX QuantizeLinear, so torch fake-quant, onnxruntime and the compiled module
agree on ties. Weights: per output channel, signed, zero point 0. Activations: per
tensor, unsigned, with a zero point. Errors are measured in steps (1 LSB = one scale).
"""

from __future__ import annotations

import torch

from .spec import Observer, signed_range, unsigned_range

_MIN_SCALE = 1e-8  # an all-zero channel or tensor still needs a positive scale
_SEARCH_POINTS = 100


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int, qmin: int, qmax: int
) -> torch.Tensor:
    """Integer codes (returned as float tensor holding integers)."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int) -> torch.Tensor:
    return (q - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    return dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)


def channel_view(values: torch.Tensor, like: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Reshape per-channel ``values`` to broadcast against ``like`` along ``axis``."""
    shape = [1] * like.dim()
    shape[axis] = -1
    return values.reshape(shape)


def weight_scales(weight: torch.Tensor, bits: int, observer: Observer) -> torch.Tensor:
    """Per-output-channel scales for signed symmetric weights (levels -2^(b-1) .. 2^(b-1)-1).

    ``minmax`` spreads each channel's largest magnitude over the (2^b - 1) / 2 steps on each
    side; ``mse`` searches fractions of that scale for the least squared rounding error, which
    clips outliers and matters most at 2 and 3 bits.
    """
    qmin, qmax = signed_range(bits)
    flat = weight.detach().reshape(weight.shape[0], -1).float()
    max_scale = (flat.abs().amax(1) / ((qmax - qmin) / 2)).clamp_min(_MIN_SCALE)
    if observer is Observer.MINMAX:
        return max_scale
    best_error = torch.full_like(max_scale, float("inf"))
    best_scale = max_scale.clone()
    for fraction in torch.linspace(1.0, 0.05, _SEARCH_POINTS):
        scale = (max_scale * fraction).clamp_min(_MIN_SCALE)
        error = (fake_quantize(flat, scale[:, None], 0, qmin, qmax) - flat).pow(2).sum(1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


def weight_qparams(
    weight: torch.Tensor, bits: int, observer: Observer, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (scales, zero points) for weights on the signed levels -2^(b-1) .. 2^(b-1)-1.

    Symmetric: zero points 0 (:func:`weight_scales`). Asymmetric: each channel's range
    [min(w, 0), max(w, 0)] is spread over all 2^b levels with an integer zero point, which
    wastes no level on a lopsided channel; ``mse`` shrinks the range per channel for the
    least squared error. Integer kernels then subtract zero point × input sums.
    """
    if symmetric:
        scales = weight_scales(weight, bits, observer)
        return scales, torch.zeros_like(scales)
    qmin, qmax = signed_range(bits)
    flat = weight.detach().reshape(weight.shape[0], -1).float()
    low, high = flat.amin(1).clamp_max(0), flat.amax(1).clamp_min(0)

    def qparams(fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        scale = ((high - low) * fraction / (qmax - qmin)).clamp_min(_MIN_SCALE)
        zero_point = torch.clamp(torch.round(qmin - low * fraction / scale), qmin, qmax)
        return scale, zero_point

    best_scale, best_zero = qparams(1.0)
    if observer is Observer.MINMAX:
        return best_scale, best_zero
    best_error = torch.full_like(best_scale, float("inf"))
    for fraction in torch.linspace(1.0, 0.05, _SEARCH_POINTS).tolist():
        scale, zero_point = qparams(fraction)
        error = (fake_quantize(flat, scale[:, None], zero_point[:, None], qmin, qmax) - flat).pow(2).sum(1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero_point, best_zero)
    return best_scale, best_zero


def activation_qparams(
    samples: torch.Tensor, low: float, high: float, bits: int, observer: Observer
) -> tuple[float, int]:
    """Per-tensor unsigned (scale, zero_point) from the observed range [low, high] and a sample.

    The range always contains 0, so zero (padding, ReLU outputs) is exact. ``mse`` shrinks
    the range towards 0 and keeps the shrink with the least squared error on ``samples``.
    """
    qmax = unsigned_range(bits)[1]
    low, high = min(float(low), 0.0), max(float(high), 0.0)

    def qparams(lo: float, hi: float) -> tuple[float, int]:
        scale = max((hi - lo) / qmax, _MIN_SCALE)
        zero_point = int(min(max(round(-lo / scale), 0), qmax))
        return scale, zero_point

    if observer is Observer.MINMAX or samples.numel() == 0:
        return qparams(low, high)
    samples = samples.detach().float().flatten()
    best, best_error = qparams(low, high), float("inf")
    for fraction in torch.linspace(1.0, 0.05, _SEARCH_POINTS).tolist():
        scale, zero_point = qparams(low * fraction, high * fraction)
        error = (fake_quantize(samples, scale, zero_point, 0, qmax) - samples).pow(2).sum().item()
        if error < best_error:
            best, best_error = (scale, zero_point), error
    return best
