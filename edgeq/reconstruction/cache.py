"""The tensors a unit is reconstructed from: its inputs and the full-precision outputs to match.

Captured by hooks on the unit's module while the model runs over the calibration images;
the forward pass stops at the unit (an exception from the hook), so later layers cost nothing.
Tensors are kept on the CPU and moved to the reconstruction device a batch at a time.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


class _Reached(Exception):
    pass


@dataclasses.dataclass
class UnitData:
    fp_inputs: torch.Tensor  # the unit's input in the full-precision model
    quant_inputs: torch.Tensor  # ... in the model quantized up to this unit
    fp_outputs: torch.Tensor  # the full-precision unit output: the target
    output_weights: torch.Tensor | None = None  # Fisher weights (squared task-loss gradients), when used


def unit_io(
    model: nn.Module, module: nn.Module, inputs: torch.Tensor, batch_size: int, *, outputs: bool, device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unit's inputs (and, with ``outputs``, its outputs) over ``inputs``, on the CPU."""
    seen_in: list[torch.Tensor] = []
    seen_out: list[torch.Tensor] = []

    def pre_hook(_module, args):
        seen_in.append(args[0].detach().cpu())
        if not outputs:
            raise _Reached

    def hook(_module, _args, result):
        seen_out.append(result.detach().cpu())
        raise _Reached

    handles = [module.register_forward_pre_hook(pre_hook), module.register_forward_hook(hook)]
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                try:
                    model(inputs[start : start + batch_size].to(device))
                except _Reached:
                    continue
                raise RuntimeError(f"{type(module).__name__} did not run in the forward pass")
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(seen_in), (torch.cat(seen_out) if outputs else None)


def fisher_weights(model: nn.Module, module: nn.Module, inputs: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """Squared gradients of the cross-entropy against the model's own prediction, w.r.t. the unit output.

    BRECQ weights the output error by this diagonal Fisher approximation; with no labels
    (data-free), the full-precision model's top-1 stands in for the label.
    """
    grads: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []

    def hook(_module, _args, result):
        result.retain_grad()
        kept.append(result)

    handle = module.register_forward_hook(hook)
    try:
        for start in range(0, len(inputs), batch_size):
            kept.clear()
            x = (
                inputs[start : start + batch_size].to(device).requires_grad_(True)
            )  # parameters are frozen; this makes a graph
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, logits.detach().argmax(1), reduction="sum")
            loss.backward()
            grads.append(kept[0].grad.detach().pow(2).cpu())
    finally:
        handle.remove()
    return torch.cat(grads)
