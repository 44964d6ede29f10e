"""Randomized bit-exact check of a built kernel library against the NumPy references.

Runs as a script as well as a module, with nothing but NumPy, so the same check runs
natively and inside the arm64 emulator (``python selfcheck.py LIBRARY [--cases N] [--seed S]``).
It prints one JSON line (cases run, layout, failures) and exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np


def _load(name: str):
    if __package__:
        return importlib.import_module(f"{__package__}.{name}")
    spec = importlib.util.spec_from_file_location(f"edgeq_selfcheck_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


layouts = _load("layouts")
native = _load("native")
reference = _load("reference")


def check_gemm(lib, rng) -> str | None:
    m, k, n = int(rng.integers(1, 40)), int(rng.integers(1, 700)), int(rng.integers(1, 80))
    bits = int(rng.choice([2, 4, 8]))
    a = rng.integers(0, 16, (m, k)).astype(np.uint8)
    w = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k))
    candidates = layouts.candidate_layouts(lib.layout, 15, w)  # every kernel that could run these weights
    layout = candidates[int(rng.integers(0, len(candidates)))]
    got = lib.gemm_raw(a, layouts.pack_weights(w, layout))
    if not np.array_equal(got, reference.int_gemm(a, w)):
        return f"gemm m={m} k={k} n={n} w{bits} ({layout.name}): accumulators differ"
    return None


def check_table_lookup(lib, rng) -> str | None:
    """The build's table-lookup kernel (if it has one) on 2-bit weights, with reductions long enough
    (past 2048) to cross its 16-bit chunks."""
    lut = layouts.TABLE_LOOKUP.get(lib.layout.name)
    if lut is None:
        return None
    m, n = int(rng.integers(1, 12)), int(rng.integers(1, 50))
    k = int(rng.choice([int(rng.integers(1, 300)), int(rng.integers(2040, 2400))]))
    a = rng.integers(0, 16, (m, k)).astype(np.uint8)
    a[:, : min(k, 64)] = 15  # largest codes against the largest weights: the sums' worst case
    w = rng.integers(-2, 2, (n, k))
    w[: n // 2, : min(k, 64)] = -2
    got = lib.gemm_raw(a, layouts.pack_weights(w, layouts.LAYOUTS[lut]))
    if not np.array_equal(got, reference.int_gemm(a, w)):
        return f"table lookup m={m} k={k} n={n} ({lut}): accumulators differ"
    return None


def check_conv(
    lib,
    rng,
    min_size: int = 0,
    wide_inputs: bool = False,
    in_place: bool = False,
    winograd: bool = False,
    short_pointwise: bool = False,
    depthwise_only: bool = False,
    classifier: bool = False,
) -> str | None:
    """One random convolution through ``lib`` against the reference; ``min_size`` sets the input's least
    height and width (larger maps have enough rows for the AMX tiles), ``wide_inputs`` draws 64 or 128 input
    channels (stride-1 layers of them run on AMX tiles without im2col), ``in_place`` a multiple of 16 input
    channels, which the vector kernels read in place (implicit GEMM) at any stride and padding, ``winograd`` a
    3x3 stride-1 layer of 4-bit codes as Winograd F(2x2, 3x3) (odd and even sizes, any padding),
    ``short_pointwise`` a 1x1 layer of 4-bit codes with 8-40 input channels and 32-100 outputs, codes only and
    symmetric weights (the fast requantization straight from the microkernel's registers where the build has it),
    ``depthwise_only`` a depthwise layer of 16 to 272 channels (AVX2 pairs its taps: whole and half 32-channel
    blocks, more than one 256-channel pass), ``classifier`` a 1x1 layer on a single pixel (one row of products),
    8-bit inputs for the most part."""
    special = in_place or winograd or short_pointwise or classifier
    depthwise = depthwise_only or (not special and bool(rng.integers(0, 4) == 0))
    kernel = 3 if winograd else (1 if short_pointwise or classifier else int(rng.choice([1, 3, 5])))
    stride = 1 if winograd or short_pointwise or classifier else int(rng.integers(1, 3))
    pad = 0 if classifier else int(rng.integers(0, kernel // 2 + 1))
    low = max(kernel, min_size)
    h, w = int(rng.integers(low, max(13, low + 6))), int(rng.integers(low, max(13, low + 6)))
    if classifier:
        h = w = 1
    # depthwise layers with a multiple of 16 channels take the vectorized path (16 channels per register)
    cin = int(rng.choice([16, 32, 48])) if depthwise and rng.integers(0, 2) else int(rng.integers(1, 40))
    if depthwise_only:
        cin = int(rng.choice([16, 32, 48, 80, 272]))
    if wide_inputs and not depthwise:
        cin = int(rng.choice([64, 128]))
    if in_place:
        cin = int(rng.choice([16, 32, 48, 64]))
    if winograd:
        cin = int(rng.choice([32, 40, 64]))
    if short_pointwise:
        cin = int(rng.integers(8, 41))
    if classifier:
        cin = int(rng.integers(1, 300))
    # short pointwise: 16 outputs or a ragged last block of at most 16 take AVX2's 8-row x 16-channel tiles
    if depthwise:
        n = cin
    elif short_pointwise:
        n = int(rng.choice([16, int(rng.integers(32, 101))]))
    else:
        n = int(rng.integers(1, 70))
    x_max = (
        15
        if winograd or short_pointwise
        else (int(rng.choice([15, 255, 255])) if classifier else int(rng.choice([15, 255])))
    )
    bits = 2 if winograd else (int(rng.choice([2, 4])) if short_pointwise else int(rng.choice([2, 4, 8])))
    x = rng.integers(0, x_max + 1, (h, w, cin)).astype(np.uint8)
    x_zero = int(rng.integers(0, x_max + 1))
    weights = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, 1 if depthwise else cin, kernel, kernel))
    if bits == 8 and rng.integers(0, 2):  # symmetric 8-bit weights (|w| <= 127): Arm's one-pass 8-bit-input path
        weights = np.clip(weights, -127, 127)
    # asymmetric weights: a zero point per output channel, applied by the epilogue to the window sums
    w_zero = (
        rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), n)
        if not depthwise and not winograd and not short_pointwise and rng.integers(0, 2)
        else None
    )
    centred = weights if w_zero is None else weights - w_zero.reshape(-1, 1, 1, 1)
    acc = reference.conv2d(x, centred, x_zero, (stride, stride), (pad,) * 4, depthwise=depthwise)
    out_h, out_w = acc.shape[:2]
    multiplier = rng.uniform(0.001, 0.05, n).astype(np.float32)
    bias = rng.normal(0, 1, n).astype(np.float32)
    residual = (
        rng.normal(0, 1, (out_h * out_w, n)).astype(np.float32) if not short_pointwise and rng.integers(0, 2) else None
    )
    clamp = (0.0, float("inf")) if rng.integers(0, 2) else (-float("inf"), float("inf"))
    out_scale, out_zero, out_qmax = 0.07, int(rng.integers(0, 4)), int(rng.choice([15, 255]))
    y_ref, codes_ref = reference.epilogue(
        acc.reshape(-1, n), multiplier, bias, residual, clamp, out_scale, out_zero, out_qmax
    )
    winograd_sums = None
    if winograd:
        packed, winograd_sums, winograd_chunk = layouts.pack_winograd(weights, lib.layout)
    elif depthwise:
        packed = layouts.pack_depthwise(weights[:, 0])
    else:
        rows = weights.transpose(0, 2, 3, 1).reshape(n, -1)
        candidates = layouts.candidate_layouts(lib.layout, x_max, rows)  # every kernel this layer could run on
        packed = layouts.pack_weights(rows, candidates[int(rng.integers(0, len(candidates)))])
    params = native.conv_params(
        in_h=h,
        in_w=w,
        in_c=cin,
        out_h=out_h,
        out_w=out_w,
        out_c=n,
        kernel_h=kernel,
        kernel_w=kernel,
        stride_h=stride,
        stride_w=stride,
        pad_top=pad,
        pad_left=pad,
        x_zero=x_zero,
        x_max=x_max,
        w_bits=packed.bits,
        w_low=packed.low,
        w_absmax=packed.absmax,
        k_padded=packed.k_padded,
        w_layout=packed.layout,
        out_zero=out_zero,
        out_qmin=0,
        out_qmax=out_qmax,
        out_scale=out_scale,
        clamp_min=max(clamp[0], -3.0e38),
        clamp_max=min(clamp[1], 3.0e38),
        w_zeros=int(w_zero is not None),
        winograd=winograd_chunk if winograd else 0,
    )
    wsum = weights.reshape(n, -1).sum(1).astype(np.int32)
    if w_zero is not None:
        wsum = np.concatenate([wsum, w_zero.astype(np.int32)])
    if winograd_sums is not None:
        wsum = np.concatenate([wsum, winograd_sums])
    y, codes = lib.conv2d(params, x, packed, wsum, multiplier, bias, residual, depthwise=depthwise)
    what = (
        f"conv {'depthwise ' if depthwise else ''}{h}x{w}x{cin}->{n} k{kernel} s{stride} p{pad} a{x_max} w{bits} "
        f"layout {packed.layout}{' with weight zero points' if w_zero is not None else ''}"
        f"{' as Winograd F(2x2, 3x3)' if winograd else ''}"
    )
    # The integer part is exact, so float results agree up to float32 rounding of the same expression.
    if not np.allclose(y, y_ref, rtol=1e-6, atol=1e-5):
        return f"{what}: float outputs differ by {np.abs(y - y_ref).max():.3g}"
    if np.abs(codes.astype(int) - codes_ref).max(initial=0) > 0:
        return f"{what}: output codes differ"
    if residual is None:  # codes-only: the one-multiply requantization, where the plan can prove it exact
        fast = reference.fast_requantization(
            centred, x_zero, x_max, multiplier, bias, clamp, out_scale, out_zero, out_qmax
        )
        if fast is not None:
            fast_m, fast_b, lo, hi = fast
            for name, value in (("fast_codes", 1), ("fast_lo", lo), ("fast_hi", hi)):
                setattr(params, name, value)
            _, fast_codes = lib.conv2d(
                params,
                x,
                packed,
                wsum,
                np.concatenate([multiplier, fast_m]),
                np.concatenate([bias, fast_b]),
                None,
                want_float=False,
                depthwise=depthwise,
            )
            if not np.array_equal(fast_codes, codes_ref):
                return f"{what}: codes of the proven fast requantization differ"
    return None


def check_unpack(lib, rng) -> str | None:
    bits = int(rng.choice([2, 4, 8]))
    count = 32 * (8 // bits) * int(rng.integers(1, 9))
    low = -(2 ** (bits - 1))
    values = rng.integers(low, 2 ** (bits - 1), count).astype(np.int8)
    packed = layouts.pack_fields(values, bits, low)
    out = np.zeros(count, np.int8)
    lib.lib.edgeq_unpack(lib._ptr(packed), native.ctypes.c_int64(count), bits, low, lib._ptr(out))
    if not (np.array_equal(out, values) and np.array_equal(layouts.unpack_fields(packed, count, bits, low), values)):
        return f"unpack w{bits}: values differ"
    return None


def _float_op(lib, name, a, b, ints, floats, shape):
    out = np.zeros(shape, np.float32)
    ptr = lib._ptr
    getattr(lib.lib, name)(
        ptr(np.ascontiguousarray(a)),
        ptr(None if b is None else np.ascontiguousarray(b, np.uint8 if b.dtype == np.uint8 else np.float32)),
        ptr(np.array(ints, np.int32)),
        ptr(np.array(floats or [0.0], np.float32)),
        ptr(out),
    )
    return out


def _differs_from_reference(lib, name: str, kernel: str, a, b, ints, floats, shape) -> bool:
    """The C operator's output bits against reference.py's float32 sequence of the same operations."""
    ours = _float_op(lib, name, a, b, ints, floats, shape)
    expected = reference.float_op(
        kernel, a, b, np.array(ints, np.int32), np.array(floats or [0.0], np.float32)
    ).reshape(shape)
    return not np.array_equal(ours, expected)


def check_float_ops(lib, rng) -> str | None:
    """The float operators of transformer plans: bit for bit against reference.py, and against float64 NumPy
    (to float32 rounding), which checks that the reference itself computes the operator."""
    import math

    rows, cols = int(rng.integers(1, 9)), int(rng.integers(1, 260))
    x = (rng.normal(0, 1, (rows, cols)) * rng.choice([0.1, 4.0, 30.0])).astype(np.float32)
    e = np.exp(x.astype(np.float64) - x.max(1, keepdims=True))
    if (
        np.abs(_float_op(lib, "edgeq_softmax", x, None, [rows, cols], [], x.shape) - e / e.sum(1, keepdims=True)).max()
        > 2e-6
    ):
        return f"softmax {rows}x{cols}: differs from NumPy"
    gelu = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.reshape(-1).astype(np.float64)]).reshape(
        x.shape
    )
    if np.any(
        np.abs(_float_op(lib, "edgeq_gelu", x, None, [x.size], [], x.shape) - gelu)
        > 2e-6 * np.maximum(1.0, np.abs(gelu))
    ):
        return f"gelu {x.size}: differs from the erf form"
    gamma_beta = rng.normal(0, 1, 2 * cols).astype(np.float32)
    x64 = x.astype(np.float64)
    norm = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-5) * gamma_beta[
        :cols
    ] + gamma_beta[cols:]
    if np.abs(_float_op(lib, "edgeq_layer_norm", x, gamma_beta, [rows, cols], [1e-5], x.shape) - norm).max() > 1e-4:
        return f"layer_norm {rows}x{cols}: differs from NumPy"
    k, n = int(rng.integers(1, 80)), int(rng.integers(1, 40))
    b = rng.normal(0, 1, (k, n)).astype(np.float32)
    a = rng.normal(0, 1, (rows, k)).astype(np.float32)
    bound = 4 * k * np.finfo(np.float32).eps * (np.abs(a).astype(np.float64) @ np.abs(b)) + 1e-30
    if np.any(
        np.abs(_float_op(lib, "edgeq_matmul", a, b, [1, rows, k, n], [1.0], (rows, n)) - a.astype(np.float64) @ b)
        > bound
    ):
        return f"matmul {rows}x{k}x{n}: differs from NumPy"
    batch = int(rng.integers(1, 4))
    left, right = (
        rng.normal(0, 1, (batch, rows, k)).astype(np.float32),
        rng.normal(0, 1, (batch, k, n)).astype(np.float32),
    )
    codes_left = rng.integers(0, 256, (batch, rows, k), dtype=np.uint8)
    codes_right = rng.integers(0, 256, (batch, k, n), dtype=np.uint8)
    zeros = [int(z) for z in rng.integers(0, 256, 2)]
    exact = [
        (
            "edgeq_matmul_codes",
            "matmul_codes",
            codes_left,
            codes_right,
            [batch, rows, k, n, *zeros],
            [0.01],
            (batch, rows, n),
        ),
        ("edgeq_softmax", "softmax", x, None, [rows, cols], [], x.shape),
        ("edgeq_gelu", "gelu", x, None, [x.size], [], x.shape),
        ("edgeq_layer_norm", "layer_norm", x, gamma_beta, [rows, cols], [1e-5], x.shape),
        ("edgeq_matmul", "matmul", left, right, [batch, rows, k, n], [0.125], (batch, rows, n)),
        ("edgeq_binary", "binary", x, gamma_beta[:cols], [x.size, cols, 1], [-3.0e38, 3.0e38], x.shape),
        ("edgeq_activation", "activation", x, None, [x.size, 0], [0.0, 0.0], x.shape),  # sigmoid
        ("edgeq_activation", "activation", x, None, [x.size, 2], [1 / 6, 0.5], x.shape),  # hard swish
    ]
    for name, kernel, a, b, ints, floats, shape in exact:
        if _differs_from_reference(lib, name, kernel, a, b, ints, floats, shape):
            return f"{kernel} {shape}: not bit for bit the reference's"
    return None


def check_in_place_conv(lib, rng) -> str | None:
    """A convolution the kernels read in place, and the same one through im2col rows."""
    state = rng.bit_generator.state
    problem = check_conv(lib, rng, in_place=True)
    if problem:
        return f"in place: {problem}"
    rng.bit_generator.state = state
    with lib.in_place_allowed(False):
        problem = check_conv(lib, rng, in_place=True)
    return f"im2col: {problem}" if problem else None


def check_winograd_conv(lib, rng) -> str | None:
    """A 3x3 stride-1 layer of 4-bit codes as Winograd F(2x2, 3x3), where the build has the kernel."""
    if lib.layout.name not in layouts.WINOGRAD_LAYOUTS:
        return None
    return check_conv(lib, rng, winograd=True)


def check_short_pointwise_conv(lib, rng) -> str | None:
    """A 1x1 layer with few input channels and codes out: AVX2 requantizes its tiles from the registers."""
    return check_conv(lib, rng, short_pointwise=True)


def check_depthwise_conv(lib, rng) -> str | None:
    """A depthwise layer of 16 to 272 channels (the vector kernels' whole and partial channel blocks)."""
    return check_conv(lib, rng, depthwise_only=True)


def check_classifier_conv(lib, rng) -> str | None:
    """A 1x1 layer on one pixel (a classifier on one image): AVX2 runs 8-bit inputs on a one-row wide kernel."""
    return check_conv(lib, rng, classifier=True)


def run(library_path: str, cases: int, seed: int) -> dict:
    lib = native.Library(library_path)
    rng = np.random.default_rng(seed)
    failures = []
    for case in range(cases):
        checks = (
            check_unpack,
            check_gemm,
            check_table_lookup,
            check_conv,
            check_in_place_conv,
            check_winograd_conv,
            check_short_pointwise_conv,
            check_depthwise_conv,
            check_classifier_conv,
            check_float_ops,
        )
        for check in checks:
            problem = check(lib, rng)
            if problem:
                failures.append(f"case {case}: {problem}")
    return {"layout": lib.layout.name, "cases": cases, "failures": failures}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library")
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = run(args.library, args.cases, args.seed)
    print(json.dumps(report))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
