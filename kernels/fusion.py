"""Fusion over a kernel plan: residual adds, clamps, dense biases and the next layer's
quantization folded into the epilogue of the convolution that computes their input (through a
max pool, which then pools codes)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .plan import Plan, Step

INF = float("inf")


def _consumers(plan: Plan) -> dict[str, list[Step]]:
    consumers: dict[str, list[Step]] = {}
    for step in plan.steps:
        for name in step.inputs:
            consumers.setdefault(name, []).append(step)
    return consumers


def fuse(plan: Plan) -> None:
    """Fold residual adds, clamps and the next layer's quantization into convolution epilogues."""
    changed = True
    while changed:
        changed = False
        consumers = _consumers(plan)
        for step in plan.steps:
            if step.kernel != "conv2d" or step.out_kind != "float" or step.output == plan.output_name:
                continue
            users = consumers.get(step.output, [])
            if len(users) != 1:
                continue
            user = users[0]
            params = step.params
            identity_clamp = params["clamp"] == (-INF, INF)
            if (
                user.kernel == "binary"
                and user.params["constant"] is not None
                and user.params["ints"][2] == 0
                and identity_clamp
                and params["residual"] is None
                and params["quant"] is None
                and user.params["constant"].size == params["out_c"]
            ):
                params["bias"] = (params["bias"] + user.params["constant"]).astype(
                    np.float32
                )  # a dense layer's bias, exported as an Add
                _replace(plan, user, step)
                changed = True
            elif user.kernel == "add_clamp" and len(user.inputs) == 2 and identity_clamp and params["residual"] is None:
                other = user.inputs[1] if user.inputs[0] == step.output else user.inputs[0]
                if _defined_before(plan, other, step):
                    params["residual"], params["clamp"] = other, user.params["clamp"]
                    step.inputs = step.inputs + [other]
                    _replace(plan, user, step)
                    changed = True
            elif user.kernel == "add_clamp" and len(user.inputs) == 1:
                lo, hi = params["clamp"]
                ulo, uhi = user.params["clamp"]
                params["clamp"] = (max(lo, ulo), min(hi, uhi))
                _replace(plan, user, step)
                changed = True
            elif user.kernel == "quantize" and user.params["nchw"] == 0:
                params["quant"] = user.params
                step.out_kind = "codes"
                _replace(plan, user, step)
                changed = True
            elif user.kernel == "max_pool" and user.out_kind == "float" and params["residual"] is None:
                # conv -> max pool -> quantize: quantization is monotone, so the convolution writes the codes
                # and the pool takes maxima of codes (a ResNet stem: 112x112x64 bytes instead of floats)
                pooled_users = consumers.get(user.output, [])
                quantize = pooled_users[0] if len(pooled_users) == 1 else None
                if (
                    quantize is not None
                    and quantize.kernel == "quantize"
                    and quantize.params["nchw"] == 0
                    and user.output != plan.output_name
                ):
                    params["quant"] = quantize.params
                    step.out_kind = "codes"
                    codes = plan.values[quantize.output]
                    plan.values[step.output] = dataclasses.replace(
                        codes, name=step.output, shape=plan.values[step.output].shape
                    )
                    user.out_kind = "codes"
                    _replace(plan, quantize, user)
                    changed = True
            if changed:
                break


def _defined_before(plan: Plan, name: str, step: Step) -> bool:
    for other in plan.steps:
        if other is step:
            return False
        if other.output == name:
            return True
    return False


def _replace(plan: Plan, user: Step, step: Step) -> None:
    """``step`` takes over ``user``'s output name; ``user`` disappears."""
    old = step.output
    step.output = user.output
    plan.values[user.output] = dataclasses.replace(plan.values[user.output], shape=plan.values[old].shape)
    plan.steps.remove(user)
