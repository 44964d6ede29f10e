"""Plain NumPy references for the low-bit kernels: what every fast kernel must equal.

A quantized layer computes, from unsigned activation codes a (zero point za) and signed
weight codes w (per-output-channel zero point zw, 0 for symmetric weights):

    acc[m, n] = Σ_k (a[m, k] - za) · (w[n, k] - zw[n])                      (int32, exact)
              = Σ_k a·w  -  za·Σ_k w[n, k]  -  zw[n]·Σ_k a[m, k]  +  K·za·zw[n]

The first sum is what a kernel computes on raw codes; the three corrections depend on one
side only, so they are precomputed per row or column. Fast kernels must match ``acc``
bit for bit. Requantization then maps acc to the next layer's activation codes:

    y = acc · (sa · sw[n]) + bias[n];  y = max(y, 0) with a fused ReLU
    out = clamp(round_half_even(y / so) + zo, 0, 2^bits - 1)

``lut_dot`` is the table-lookup formulation (T-MAC): 2-bit two's-complement weights split
into bit planes, w = -2·b1 + b0, so Σ_k w·a = -2·Σ_k b1·a + Σ_k b0·a; for each group of
four activations a table of all 16 subset sums is built once and indexed by each output
channel's 4 plane bits, replacing multiplications by lookups and adds.
"""
from __future__ import annotations

import numpy as np

LUT_GROUP = 4  # activations per table; 2^4 = 16 entries, one byte-shuffle wide


def int_gemm(a: np.ndarray, w: np.ndarray, a_zero: int = 0, w_zero: np.ndarray | int = 0) -> np.ndarray:
    """acc (M, N) int32 = Σ_k (a[m,k] - a_zero)·(w[n,k] - w_zero[n]), computed in int64 and checked to fit int32."""
    a64 = np.asarray(a, np.int64) - int(a_zero)
    w64 = np.asarray(w, np.int64) - np.asarray(w_zero, np.int64).reshape(-1, 1)
    acc = a64 @ w64.T
    if acc.size and (acc.max() > np.iinfo(np.int32).max or acc.min() < np.iinfo(np.int32).min):
        raise OverflowError("accumulator exceeds int32")
    return acc.astype(np.int32)


def corrected_gemm(a: np.ndarray, w: np.ndarray, a_zero: int, w_zero: np.ndarray | int) -> np.ndarray:
    """The same acc from the raw-code product plus the precomputed zero-point corrections."""
    a64, w64 = np.asarray(a, np.int64), np.asarray(w, np.int64)
    w_zero = np.broadcast_to(np.asarray(w_zero, np.int64), (w64.shape[0],))
    k = a64.shape[1]
    raw = a64 @ w64.T
    acc = raw - a_zero * w64.sum(1)[None, :] - a64.sum(1)[:, None] * w_zero[None, :] + k * a_zero * w_zero[None, :]
    return acc.astype(np.int32)


def bit_planes(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(b1, b0) in {0, 1} with w = -2·b1 + b0 for 2-bit two's-complement codes in [-2, 1]."""
    w = np.asarray(w, np.int64)
    if w.min(initial=0) < -2 or w.max(initial=0) > 1:
        raise ValueError("2-bit signed codes must lie in [-2, 1]")
    bits = w & 0b11
    return (bits >> 1).astype(np.uint8), (bits & 1).astype(np.uint8)


def lut_dot(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Σ_k a[m,k]·w[n,k] (raw codes, no zero points) by table lookup over groups of 4 activations."""
    a = np.asarray(a, np.int64)
    m, k = a.shape
    pad = -k % LUT_GROUP
    a = np.pad(a, ((0, 0), (0, pad)))
    b1, b0 = (np.pad(p, ((0, 0), (0, pad))) for p in bit_planes(w))
    groups = a.shape[1] // LUT_GROUP
    subsets = (np.arange(16)[:, None] >> np.arange(LUT_GROUP)[None, :]) & 1  # (16, 4): which activations entry p sums
    tables = np.einsum("mgi,pi->mgp", a.reshape(m, groups, LUT_GROUP), subsets)  # (M, groups, 16)
    weights = 1 << np.arange(LUT_GROUP)

    def plane_sum(plane: np.ndarray) -> np.ndarray:
        index = (plane.reshape(plane.shape[0], groups, LUT_GROUP) * weights).sum(2)  # (N, groups): a 4-bit pattern per group
        return np.take_along_axis(tables[:, None, :, :], index[None, :, :, None], axis=3)[..., 0].sum(2)  # (M, N)

    return (-2 * plane_sum(b1) + plane_sum(b0)).astype(np.int32)


def requantize(acc: np.ndarray, a_scale: float, w_scale: np.ndarray, bias: np.ndarray | None, out_scale: float, out_zero: int, out_bits: int,
               relu: bool = False) -> np.ndarray:
    """Output activation codes (uint8) from int32 accumulators, in float32 as a QDQ graph computes them."""
    y = acc.astype(np.float32) * (np.float32(a_scale) * np.asarray(w_scale, np.float32)[None, :])
    if bias is not None:
        y = y + np.asarray(bias, np.float32)[None, :]
    if relu:
        y = np.maximum(y, np.float32(0))
    codes = np.rint(y / np.float32(out_scale)) + out_zero
    return np.clip(codes, 0, 2**out_bits - 1).astype(np.uint8)


def conv2d(x: np.ndarray, w: np.ndarray, x_zero: int, stride: tuple[int, int], pads: tuple[int, int, int, int], depthwise: bool = False) -> np.ndarray:
    """acc (out_h, out_w, N) int32 of a convolution over NHWC codes ``x`` (H, W, C) and weights ``w`` (N, C or 1, kh, kw)."""
    x64 = np.asarray(x, np.int64) - int(x_zero)
    x64 = np.pad(x64, ((pads[0], pads[2]), (pads[1], pads[3]), (0, 0)))  # padding is real zero, i.e. the zero point in codes
    n, _, kh, kw = w.shape
    out_h = (x64.shape[0] - kh) // stride[0] + 1
    out_w = (x64.shape[1] - kw) // stride[1] + 1
    acc = np.zeros((out_h, out_w, n), np.int64)
    w64 = np.asarray(w, np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = x64[i: i + stride[0] * (out_h - 1) + 1: stride[0], j: j + stride[1] * (out_w - 1) + 1: stride[1], :]  # (oh, ow, C)
            acc += patch * w64[:, 0, i, j] if depthwise else patch @ w64[:, :, i, j].T
    return acc.astype(np.int32)


def epilogue(acc: np.ndarray, multiplier: np.ndarray, bias: np.ndarray, residual: np.ndarray | None, clamp: tuple[float, float],
             out_scale: float, out_zero: int, out_qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(float y, codes) from accumulators, as the kernels' fused epilogue computes them in float32."""
    y = acc.astype(np.float32) * np.asarray(multiplier, np.float32) + np.asarray(bias, np.float32)
    if residual is not None:
        y = y + np.asarray(residual, np.float32)
    y = np.clip(y, np.float32(max(clamp[0], -3.0e38)), np.float32(min(clamp[1], 3.0e38))).astype(np.float32)
    codes = np.clip(np.rint(y / np.float32(out_scale)) + out_zero, 0, out_qmax).astype(np.uint8)
    return y, codes
