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


def compose_copies(plan: Plan) -> None:
    """A copy of a copy reads the first copy's source directly where its view is a box of the first's output
    (exporters write attention's head split as a permute and then one slice per Q, K and V, and K's transpose
    after its slice): moves are exact, so the values do not change; a copy or alias left without readers goes.
    """
    producers = {step.output: step for step in plan.steps if step.kernel in ("copy", "alias")}
    for step in plan.steps:
        if step.kernel != "copy":
            continue
        source = producers.get(step.inputs[0])
        while source is not None and source.kernel == "alias":  # a reshape keeps the flat order
            source = producers.get(source.inputs[0])
        if source is None or source.kernel != "copy":
            continue
        ints = _composed_view(source.params["ints"], step.params["ints"])
        if ints is None:
            continue
        step.inputs = [source.inputs[0]]
        step.params = {**step.params, "ints": ints}
        shape = tuple(int(n) for n in ints[:6])
        whole = int(np.prod(shape)) == int(np.prod(plan.values[source.inputs[0]].shape))
        if whole and ints[12] == 0 and all(s == c or n == 1 for n, s, c in zip(shape, ints[6:12], _contiguous(shape))):
            # the two copies undo each other (a ViT's patch grid: NHWC to NCHW, flattened, transposed back)
            step.kernel, step.params = "alias", {"shape": plan.values[step.output].shape}
    changed = True
    while changed:
        read = set(_consumers(plan)) | {step.params.get("residual") for step in plan.steps}  # residuals go by name
        unread = [
            step
            for step in plan.steps
            if step.kernel in ("copy", "alias") and step.output != plan.output_name and step.output not in read
        ]
        for step in unread:
            plan.steps.remove(step)
        changed = bool(unread)


def _composed_view(first: np.ndarray, second: np.ndarray) -> np.ndarray | None:
    """The copy kernel's ints (shape[6], strides[6], offset) of ``second``'s view taken straight from ``first``'s
    source, where every dimension of ``second`` walks one dimension of ``first``'s (contiguous) output within
    its bounds; None otherwise. Neighbouring dimensions of ``first`` that its source lays out as one (an NHWC map's
    height and width) count as one, so a flatten between the copies composes too."""
    dims = [(int(n), int(s)) for n, s in zip(first[:6], first[6:12]) if n > 1]
    merged: list[tuple[int, int]] = []
    for n, s in dims:
        if merged and merged[-1][1] == s * n:
            merged[-1] = (merged[-1][0] * n, s)
        else:
            merged.append((n, s))
    # as they are first (a view may walk part of what would merge), then merged
    for grid in (dims, merged) if merged != dims else (dims,):
        ints = _view_of_grid([n for n, _ in grid], [s for _, s in grid], int(first[12]), second)
        if ints is not None:
            return ints
    return None


def _view_of_grid(shape_a: list[int], strides_a: list[int], offset_a: int, second: np.ndarray) -> np.ndarray | None:
    """``second``'s view over the contiguous grid ``shape_a`` as a view of the grid's source (its ``strides_a``)."""
    shape_b, strides_b, offset_b = [int(v) for v in second[:6]], [int(v) for v in second[6:12]], int(second[12])
    contiguous = [int(np.prod(shape_a[e + 1 :])) for e in range(len(shape_a))]
    base = [(offset_b // contiguous[e]) % shape_a[e] for e in range(len(shape_a))]
    composed, used = [0] * 6, set()
    for d in range(6):
        if shape_b[d] == 1 or strides_b[d] == 0:
            continue  # stride 0 broadcasts in either view
        walked = next((e for e in range(len(shape_a)) if contiguous[e] == strides_b[d]), None)
        if walked is None or walked in used or base[walked] + shape_b[d] > shape_a[walked]:
            return None
        used.add(walked)
        composed[d] = strides_a[walked]
    offset = offset_a + sum(base[e] * strides_a[e] for e in range(len(shape_a)))
    return np.array([*shape_b, *composed, offset], np.int32)


def _contiguous(shape: tuple[int, ...]) -> list[int]:
    return [int(np.prod(shape[d + 1 :])) for d in range(len(shape))]
