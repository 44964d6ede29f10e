"""GPTQ: rounding that feeds each weight's error forward to the weights not yet rounded.

Round-to-nearest rounds every weight on its own. GPTQ (Frantar et al., ICLR 2023; the
Optimal Brain Quantizer of Frantar & Alistarh 2022) rounds the input columns of a layer one
at a time and, after each, moves the columns still to be rounded so that the layer's output
on the calibration inputs changes as little as possible: with H = Σ x xᵀ over the layer's
inputs x (im2col columns for a convolution) and U the upper Cholesky factor of H⁻¹,

    q_i   = round(w_i / s) clamped          (w_i: column i as already moved)
    e     = (w_i − s·q_i) / U_ii
    w_j  −= e · U_ij   for j > i

which is closed form: one pass over the calibration images per layer to gather H, and a
loop over the columns. Columns go in order of decreasing H_ii (the most used inputs first,
"act order"), and H gets 1% of its mean diagonal added (dampening) so it stays invertible.

A grouped convolution has one H per group (a depthwise 3×3 filter: 9×9), handled as a
batch. Layers are rounded in execution order, each gathering H from the inputs the already
rounded layers give it, quantized as the layer quantizes them.

The moved weights a layer had when each column was rounded are kept on the layer
(``rounding_start``): AdaRound started from them begins with its hard rounding at GPTQ's
codes and its soft weight next to them, so a short reconstruction refines GPTQ instead of
round-to-nearest.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DAMPENING = 0.01


class _Captured(Exception):
    """Raised by the hook once the layer's input is seen: nothing after it needs to run."""


def _input_columns(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's (quantized) input as (groups, features, positions): one column per output position."""
    inner = layer.layer
    if isinstance(inner, nn.Conv2d):
        padding = inner.padding
        if isinstance(padding, str):  # "valid", or "same" (stride 1): the odd pixel of padding goes after
            total = [0, 0] if padding == "valid" else [d * (k - 1) for d, k in zip(inner.dilation, inner.kernel_size)]
            x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
            padding = 0
        columns = F.unfold(x, inner.kernel_size, inner.dilation, padding, inner.stride)  # (B, Cin*kh*kw, L)
        batch, features, positions = columns.shape
        columns = columns.reshape(batch, inner.groups, features // inner.groups, positions)
        return columns.permute(1, 2, 0, 3).reshape(inner.groups, features // inner.groups, batch * positions)
    return x.reshape(-1, x.shape[-1]).T.unsqueeze(0)


def _gather_hessian(model: nn.Module, layer, inputs: np.ndarray, batch_size: int) -> torch.Tensor:
    hessian = None

    def capture(_module, args):
        nonlocal hessian
        columns = _input_columns(layer, layer.quantize_input(args[0].detach()))
        product = (columns @ columns.transpose(1, 2)).double()
        hessian = product if hessian is None else hessian + product
        raise _Captured

    handle = layer.register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                try:
                    model(torch.from_numpy(inputs[start : start + batch_size]))
                except _Captured:
                    pass
    finally:
        handle.remove()
    return hessian


def round_columns(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    dampening: float = DAMPENING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ on grouped weights: ``weight`` (G, R, D), ``hessian`` (G, D, D), ``scale`` and
    ``zero_point`` (G, R), one per row. Returns (codes, moved weights), both (G, R, D): each
    column of the moved weights is that column as it was when rounded, so rounding it to
    nearest gives the codes."""
    weight = weight.double().clone()
    hessian = hessian.double().clone()
    groups, rows, features = weight.shape
    diagonal = hessian.diagonal(dim1=1, dim2=2)
    dead = diagonal == 0  # inputs that are always zero: any rounding of their weights is as good
    diagonal[dead] = 1.0
    order = torch.argsort(diagonal, dim=1, descending=True)
    restore = torch.argsort(order, dim=1)
    weight = weight.gather(2, order[:, None, :].expand(groups, rows, features))
    hessian = hessian.gather(1, order[:, :, None].expand(-1, -1, features)).gather(
        2, order[:, None, :].expand(-1, features, -1)
    )
    identity = torch.eye(features, dtype=hessian.dtype)
    damp = dampening * hessian.diagonal(dim1=1, dim2=2).mean(1)
    for attempt in range(6):
        factor, info = torch.linalg.cholesky_ex(hessian + (damp * 10**attempt)[:, None, None] * identity)
        if not info.any():
            break
    else:
        raise ValueError("the inputs' Hessian is not positive definite even with 10^5 times the dampening")
    upper = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    scale, zero_point = scale.double(), zero_point.double()
    codes = torch.empty_like(weight)
    moved = torch.empty_like(weight)
    for i in range(features):
        column = weight[:, :, i]
        code = torch.clamp(torch.round(column / scale) + zero_point, qmin, qmax)
        codes[:, :, i], moved[:, :, i] = code, column
        error = (column - (code - zero_point) * scale) / upper[:, i, i][:, None]
        weight[:, :, i + 1 :] -= error[:, :, None] * upper[:, None, i, i + 1 :]
    back = restore[:, None, :].expand(groups, rows, features)
    return codes.gather(2, back), moved.gather(2, back)


@torch.no_grad()
def gptq_round(
    model: nn.Module, layers: dict, order: list[str], inputs: np.ndarray, *, batch_size: int = 8
) -> list[dict]:
    """Round every layer of ``layers`` by GPTQ, in ``order`` (execution order), at its calibrated
    scales; writes the codes into ``weight_int`` and the moved weights into ``rounding_start``.
    Returns per layer the relative output error on the calibration inputs, GPTQ against nearest."""
    report = []
    for name in tqdm(order, desc="rounding (gptq)", unit="layer"):
        layer = layers[name]
        weight = layer.layer.weight.detach()
        groups = layer.layer.groups if isinstance(layer.layer, nn.Conv2d) else 1
        grouped = weight.reshape(groups, weight.shape[0] // groups, -1)
        hessian = _gather_hessian(model, layer, inputs, batch_size)
        scale = layer.weight_scale.reshape(groups, -1)
        zero_point = layer.weight_zero_point.float().reshape(groups, -1)
        codes, moved = round_columns(grouped, hessian, scale, zero_point, *layer.weight_range)

        def output_error(candidate: torch.Tensor) -> float:
            delta = ((candidate - zero_point[..., None]) * scale[..., None] - grouped).double()
            return float(torch.einsum("grd,gde,gre->", delta, hessian, delta))

        nearest = layer.weight_int.float().reshape(grouped.shape)
        before, after = output_error(nearest), output_error(codes.float())
        layer.weight_int.copy_(codes.reshape(weight.shape).to(torch.int8))
        layer.rounding_start = moved.reshape(weight.shape).float()
        report.append({"layer": name, "error_nearest": before, "error_gptq": after})
        log.debug("%s: output error %.4g (nearest) -> %.4g (gptq)", name, before, after)
    total_before = sum(r["error_nearest"] for r in report)
    total_after = sum(r["error_gptq"] for r in report)
    log.info(
        "gptq: %d layers, summed output error on the calibration inputs %.3f of round-to-nearest's",
        len(report),
        total_after / max(total_before, 1e-30),
    )
    return report
