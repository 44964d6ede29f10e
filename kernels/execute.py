"""A kernel plan executed through ctypes, without TVM: every intermediate value by name,
for the tests and for per-step profiling."""

from __future__ import annotations

import time

import numpy as np

from . import native
from .plan import Plan, Unsupported, epilogue_arrays, run_generic
from .relax_module import CODES_OPERANDS, FLOAT_OPS, conv_struct, quantize_arguments


def conv_call(library: native.Library, step, env: dict[str, np.ndarray]):
    """A call of ``library``'s kernel for the conv2d ``step`` on its inputs in ``env``, returning (floats, codes);
    its arguments made once, so that it can be timed alone."""
    p = step.params
    params = conv_struct(p)
    residual = env[p["residual"]] if p["residual"] else None
    multiplier, bias = epilogue_arrays(p)
    source = env[step.inputs[0]]

    def call():
        return library.conv2d(
            params,
            source,
            p["packed"],
            p["wsum"],
            multiplier,
            bias,
            residual,
            want_float=step.out_kind == "float",
            want_codes=step.out_kind == "codes",
            depthwise=p["depthwise"],
        )

    return call


def run_plan(plan: Plan, library: native.Library, x: np.ndarray, timings: list | None = None) -> dict[str, np.ndarray]:
    """Execute a plan through ctypes (no TVM): every value by name, for tests and profiling.

    ``timings``, when given, receives (step, seconds) per step.
    """
    ptr = library._ptr
    env: dict[str, np.ndarray] = {plan.input_name: np.ascontiguousarray(x, np.float32)}
    for step in plan.steps:
        started = time.perf_counter()
        args = [env[name] for name in step.inputs]
        value = plan.values[step.output]
        p = step.params
        if step.kernel == "constant":
            out = p["array"]
        elif step.kernel == "alias":
            out = args[0].reshape(p.get("shape", value.shape))
        elif step.kernel == "quantize":
            ints, scale = quantize_arguments(plan, step)
            out = np.zeros(value.shape, np.uint8)
            library.lib.edgeq_quantize(ptr(args[0]), *ints[:3], native.ctypes.c_float(scale), *ints[3:], ptr(out))
        elif step.kernel == "conv2d":
            out_float, out_codes = conv_call(library, step, env)()
            out = (out_codes if step.out_kind == "codes" else out_float).reshape(value.shape)
        elif step.kernel == "generic":
            out = run_generic(p["model"], args).reshape(value.shape)
        elif step.kernel == "add_clamp":
            lo, hi = step.params["clamp"]
            out = np.clip(args[0] + (args[1] if len(args) > 1 else 0), lo, hi).astype(np.float32)
        elif step.kernel == "max_pool" and step.out_kind == "codes":
            out = np.zeros(value.shape, np.uint8)
            library.lib.edgeq_max_pool_codes(ptr(np.ascontiguousarray(args[0], np.uint8)), *p["ints"], ptr(out))
        elif step.kernel == "max_pool":
            out = np.zeros(value.shape, np.float32)
            library.lib.edgeq_max_pool(ptr(np.ascontiguousarray(args[0])), *p["ints"], ptr(out))
        elif step.kernel == "global_average_pool":
            out = args[0].reshape(-1, args[0].shape[-1]).mean(0, dtype=np.float32).reshape(value.shape)
        elif step.kernel in FLOAT_OPS:
            second = args[1] if len(args) > 1 else p["constant"]
            out = np.zeros(value.shape, np.float32)
            codes_in = step.kernel in CODES_OPERANDS
            first = np.ascontiguousarray(args[0], np.uint8 if codes_in else np.float32)
            getattr(library.lib, FLOAT_OPS[step.kernel])(
                ptr(first),
                ptr(None if second is None else np.ascontiguousarray(second, np.uint8 if codes_in else np.float32)),
                ptr(p["ints"]),
                ptr(p["floats"]),
                ptr(out),
            )
        else:  # pragma: no cover
            raise Unsupported(step.kernel)
        env[step.output] = out
        if timings is not None:
            timings.append((step, time.perf_counter() - started))
    return env
