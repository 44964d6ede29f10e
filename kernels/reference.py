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
        index = (plane.reshape(plane.shape[0], groups, LUT_GROUP) * weights).sum(
            2
        )  # (N, groups): a 4-bit pattern per group
        return np.take_along_axis(tables[:, None, :, :], index[None, :, :, None], axis=3)[..., 0].sum(2)  # (M, N)

    return (-2 * plane_sum(b1) + plane_sum(b0)).astype(np.int32)


def requantize(
    acc: np.ndarray,
    a_scale: float,
    w_scale: np.ndarray,
    bias: np.ndarray | None,
    out_scale: float,
    out_zero: int,
    out_bits: int,
    relu: bool = False,
) -> np.ndarray:
    """Output activation codes (uint8) from int32 accumulators, in float32 as a QDQ graph computes them."""
    y = acc.astype(np.float32) * (np.float32(a_scale) * np.asarray(w_scale, np.float32)[None, :])
    if bias is not None:
        y = y + np.asarray(bias, np.float32)[None, :]
    if relu:
        y = np.maximum(y, np.float32(0))
    codes = np.rint(y / np.float32(out_scale)) + out_zero
    return np.clip(codes, 0, 2**out_bits - 1).astype(np.uint8)


def conv2d(
    x: np.ndarray,
    w: np.ndarray,
    x_zero: int,
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
    depthwise: bool = False,
) -> np.ndarray:
    """acc (out_h, out_w, N) int32 of a convolution over NHWC codes ``x`` (H, W, C) and weights ``w``
    (N, C or 1, kh, kw)."""
    x64 = np.asarray(x, np.int64) - int(x_zero)
    x64 = np.pad(
        x64, ((pads[0], pads[2]), (pads[1], pads[3]), (0, 0))
    )  # padding is real zero, i.e. the zero point in codes
    n, _, kh, kw = w.shape
    out_h = (x64.shape[0] - kh) // stride[0] + 1
    out_w = (x64.shape[1] - kw) // stride[1] + 1
    acc = np.zeros((out_h, out_w, n), np.int64)
    w64 = np.asarray(w, np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = x64[
                i : i + stride[0] * (out_h - 1) + 1 : stride[0], j : j + stride[1] * (out_w - 1) + 1 : stride[1], :
            ]  # (oh, ow, C)
            acc += patch * w64[:, 0, i, j] if depthwise else patch @ w64[:, :, i, j].T
    return acc.astype(np.int32)


def epilogue(
    acc: np.ndarray,
    multiplier: np.ndarray,
    bias: np.ndarray,
    residual: np.ndarray | None,
    clamp: tuple[float, float],
    out_scale: float,
    out_zero: int,
    out_qmax: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(float y, codes) from accumulators, as the kernels' fused epilogue computes them in float32."""
    y = acc.astype(np.float32) * np.asarray(multiplier, np.float32) + np.asarray(bias, np.float32)
    if residual is not None:
        y = y + np.asarray(residual, np.float32)
    y = np.clip(y, np.float32(max(clamp[0], -3.0e38)), np.float32(min(clamp[1], 3.0e38))).astype(np.float32)
    codes = np.clip(np.rint(y / np.float32(out_scale)) + out_zero, 0, out_qmax).astype(np.uint8)
    return y, codes


def accumulator_bounds(weights: np.ndarray, x_zero: int, x_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel, the least and greatest acc = Σ_k (x_k - x_zero)·w[n, k] over every input x_k in
    [0, x_max] (padding is x_zero, inside that range). ``weights``: (N, ...) values, zero points subtracted."""
    w = np.asarray(weights, np.int64).reshape(len(weights), -1)
    low, high = -int(x_zero) * w, (int(x_max) - int(x_zero)) * w
    return np.minimum(low, high).sum(1), np.maximum(low, high).sum(1)


def fast_requantization(
    weights: np.ndarray,
    x_zero: int,
    x_max: int,
    multiplier: np.ndarray,
    bias: np.ndarray,
    clamp: tuple[float, float],
    out_scale: float,
    out_zero: int,
    out_qmax: int,
) -> tuple[np.ndarray, np.ndarray, int, int] | None:
    """(m', b', lo, hi) such that clamp(floor(fl(fl(acc·m'[n]) + b'[n])), lo, hi) equals the codes of
    :func:`epilogue` (no residual) for every accumulator the layer can produce, or None where it cannot be shown.

    The exact epilogue rounds y / scale half to even after y = acc·m + b and the clamp; the fast form is one
    multiply, one add and a floor per output. Both are non-decreasing step functions of acc (m > 0, and every
    float operation and rounding is monotone), so they are equal on [lo_n, hi_n] exactly when each code c is
    first reached at the same acc: found for both by bisection over the reachable accumulators
    (:func:`accumulator_bounds`), all channels and codes at once. (Both convert acc to float32 the same way, a
    monotone rounding too beyond 2^24.) A tie lying within float rounding of a jump point makes the two differ
    there; such a layer keeps the exact epilogue.
    """
    multiplier = np.asarray(multiplier, F32)
    if not np.all(multiplier > 0):
        return None
    least, most = accumulator_bounds(weights, x_zero, x_max)
    if max(-least.min(), most.max()) >= 2**31:  # beyond the kernels' int32 accumulators
        return None
    scale = F32(out_scale)
    fast_m = (multiplier / scale).astype(F32)
    fast_b = (np.asarray(bias, F32) / scale + F32(out_zero) + F32(0.5)).astype(F32)
    ends = [F32(max(clamp[0], -3.0e38)), F32(min(clamp[1], 3.0e38))]
    with np.errstate(over="ignore"):  # an open clamp end divides to infinity: the first or last code
        lo, hi = (int(np.clip(np.rint(end / scale) + out_zero, 0, out_qmax)) for end in ends)

    def exact(acc):
        return epilogue(acc, multiplier, bias, None, clamp, out_scale, out_zero, out_qmax)[1].astype(np.int64)

    def fast(acc):
        y = acc.astype(F32) * fast_m + fast_b
        return np.clip(np.floor(y), lo, hi).astype(np.int64)

    codes = np.arange(lo + 1, hi + 1)[:, None]  # (levels, 1): the first acc reaching each code, per channel

    def jumps(function):
        below = np.broadcast_to(least, (len(codes), len(least))).copy()
        above = np.broadcast_to(most + 1, below.shape).copy()  # most + 1: never reached
        while np.any(below < above):
            middle = (below + above) // 2
            reached = function(np.minimum(middle, most)) >= codes
            searching = below < above
            above = np.where(searching & reached, middle, above)
            below = np.where(searching & ~reached, middle + 1, below)
        return below

    if len(codes) and not np.array_equal(jumps(exact), jumps(fast)):
        return None
    if not np.array_equal(exact(least[None]), fast(least[None])):  # the code at the low end, below every jump
        return None
    return fast_m, fast_b, lo, hi


# ---------------------------------------------------------------------------------------
# A whole kernel plan in NumPy, bit for bit as the compiled module computes it.
#
# Integer accumulators are exact (float64 products of integers far below 2^53); every float
# operation is one float32 NumPy operation in the order the C code performs it, which the
# C sources fix for every build: no fused multiply-add (-ffp-contract=off, no FMA
# intrinsics), reductions in LANES strided partial sums combined as combine_lanes() does,
# then the tail in order. The plan is any object with the attributes of
# edgeq.kernels.plan.Plan (this module imports nothing from the package, so it runs
# inside the arm64 emulator too).

F32 = np.float32
LANES = 8


def lane_sum(x: np.ndarray) -> np.ndarray:
    """Row sums of ``x`` (rows, cols) in float32, in the order of lane_sum() in edgeq_float.c."""
    x = np.asarray(x, F32)
    full = x.shape[1] - x.shape[1] % LANES
    lanes = np.zeros((x.shape[0], LANES), F32)
    for c in range(0, full, LANES):
        lanes = lanes + x[:, c : c + LANES]
    total = ((lanes[:, 0] + lanes[:, 4]) + (lanes[:, 2] + lanes[:, 6])) + (
        (lanes[:, 1] + lanes[:, 5]) + (lanes[:, 3] + lanes[:, 7])
    )
    for c in range(full, x.shape[1]):
        total = total + x[:, c]
    return total


def exp_poly(x: np.ndarray) -> np.ndarray:
    """exp_poly() of edgeq_float.c: Cephes' expf polynomial, operation by operation."""
    x = np.clip(np.asarray(x, F32), F32(-87.0), F32(88.0))
    n = np.floor(x * F32(1.44269504088896341) + F32(0.5))
    r = x - n * F32(0.693359375)
    r = r - n * F32(-2.12194440e-4)
    p = np.full_like(r, F32(1.9875691500e-4))
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + F32(c)
    p = p * r * r + r + F32(1.0)
    scale = ((n.astype(np.int32) + 127) << 23).view(F32)
    return p * scale


def erf_poly(x: np.ndarray) -> np.ndarray:
    """erf_poly() of edgeq_float.c: a rational approximation on [-4, 4], operation by operation."""
    x = np.clip(np.asarray(x, F32), F32(-4.0), F32(4.0))
    x2 = x * x
    p = np.full_like(x, F32(-2.72614225801306e-10))
    for c in (
        2.77068142495902e-08,
        -2.10102402082508e-06,
        -5.69250639462346e-05,
        -7.34990630326855e-04,
        -2.95459980854025e-03,
        -1.60960333262415e-02,
    ):
        p = p * x2 + F32(c)
    p = p * x
    q = np.full_like(x, F32(-1.45660718464996e-05))
    for c in (-2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03, -1.42647390514189e-02):
        q = q * x2 + F32(c)
    return p / q


def _quantize_codes(y: np.ndarray, scale: float, zero: int, qmax: int) -> np.ndarray:
    """clamp(rint(y / scale) + zero, 0, qmax), as quantize_run() and the epilogue compute it in float32."""
    q = np.rint(np.asarray(y, F32) / F32(scale)) + F32(zero)
    return np.clip(q, F32(0), F32(qmax)).astype(np.uint8)


def _conv_accumulators(x: np.ndarray, p: dict) -> np.ndarray:
    """acc (out_h, out_w, N) of a conv2d step: Σ (x - x_zero)·w over the receptive field, exactly (float64 holds it)."""
    w = np.asarray(p["weights"], np.float64)  # (N, C or 1, kh, kw)
    if p.get("w_zero") is not None:  # codes as stored, zero points kept apart for the epilogue
        w = w - np.asarray(p["w_zero"], np.float64).reshape(-1, 1, 1, 1)
    kh, kw, sh, sw = p["kernel_h"], p["kernel_w"], p["stride_h"], p["stride_w"]
    out_h, out_w = p["out_h"], p["out_w"]
    x64 = np.asarray(x, np.float64).reshape(p["in_h"], p["in_w"], p["in_c"]) - p["x_zero"]
    bottom = max(0, (out_h - 1) * sh + kh - p["in_h"] - p["pad_top"])
    right = max(0, (out_w - 1) * sw + kw - p["in_w"] - p["pad_left"])
    x64 = np.pad(
        x64, ((p["pad_top"], bottom), (p["pad_left"], right), (0, 0))
    )  # padding is the zero point: 0 after the shift
    acc = np.zeros((out_h, out_w, p["out_c"]), np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = x64[i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :]
            acc += patch * w[:, 0, i, j] if p["depthwise"] else patch @ w[:, :, i, j].T
    return acc


def _conv(env: dict, step, x: np.ndarray) -> np.ndarray:
    p = step.params
    y = _conv_accumulators(x, p).astype(F32) * np.asarray(p["multiplier"], F32) + np.asarray(p["bias"], F32)
    if p["residual"]:
        y = y + np.asarray(env[p["residual"]], F32).reshape(y.shape)
    lo, hi = p["clamp"]
    y = np.clip(y, F32(max(lo, -3.0e38)), F32(min(hi, 3.0e38)))
    if step.out_kind == "codes":
        quant = p["quant"]
        return _quantize_codes(y, quant["scale"], quant["zero"], quant["qmax"])
    return y


def float_op(kernel: str, a: np.ndarray, b: np.ndarray | None, ints: np.ndarray, floats: np.ndarray) -> np.ndarray:
    ints = [int(i) for i in np.asarray(ints).reshape(-1)]
    floats = np.asarray(floats, F32).reshape(-1)
    if kernel == "copy":
        flat = np.ascontiguousarray(a).reshape(-1)
        view = np.lib.stride_tricks.as_strided(
            flat[ints[12] :], shape=ints[:6], strides=[s * flat.itemsize for s in ints[6:12]]
        )
        return np.array(view, F32)
    if kernel == "concat":
        outer = ints[0]
        return np.concatenate([np.reshape(a, (outer, ints[1])), np.reshape(b, (outer, ints[2]))], axis=1)
    if kernel == "dequantize":
        return (np.asarray(a).reshape(-1)[: ints[0]].astype(np.int32) - ints[1]).astype(F32) * floats[0]
    if kernel == "binary":
        count, period, multiply = ints[:3]
        rows = np.asarray(a, F32).reshape(count // period, period)
        second = np.asarray(b, F32).reshape(-1)[:period]
        return np.clip(rows * second if multiply else rows + second, floats[0], floats[1])
    if kernel == "layer_norm":
        rows, cols = ints[:2]
        x = np.asarray(a, F32).reshape(rows, cols)
        gamma, beta = np.asarray(b, F32)[:cols], np.asarray(b, F32)[cols : 2 * cols]
        mean = (lane_sum(x) / F32(cols))[:, None]
        squares = lane_sum((x - mean) * (x - mean))[:, None]
        inv = F32(1.0) / np.sqrt(squares / F32(cols) + floats[0])
        return (x - mean) * inv * gamma + beta
    if kernel == "softmax":
        rows, cols = ints[:2]
        x = np.asarray(a, F32).reshape(rows, cols)
        e = exp_poly(x - x.max(1, keepdims=True))
        return e * (F32(1.0) / lane_sum(e))[:, None]
    if kernel == "gelu":
        x = np.asarray(a, F32).reshape(-1)[: ints[0]]
        return F32(0.5) * x * (F32(1.0) + erf_poly(x * F32(0.70710678118654752)))
    if kernel == "activation":
        x = np.asarray(a, F32).reshape(-1)[: ints[0]]
        if ints[1] == 0:
            return F32(1.0) / (F32(1.0) + exp_poly(-x))
        gate = np.clip(F32(floats[0]) * x + F32(floats[1]), F32(0.0), F32(1.0))
        return x * gate if ints[1] == 2 else gate
    if kernel == "matmul":
        batch, m, k, n = ints[:4]
        left, right = np.asarray(a, F32).reshape(batch, m, k), np.asarray(b, F32).reshape(batch, k, n)
        acc = np.zeros((batch, m, n), F32)
        for p in range(k):  # each output sums its products in k order, multiply and add rounded separately
            acc = acc + left[:, :, p : p + 1] * right[:, p : p + 1, :]
        return acc * floats[0]
    if kernel == "matmul_codes":
        batch, m, k, n, a_zero, b_zero = ints[:6]
        left = np.asarray(a).reshape(batch, m, k).astype(np.int64) - a_zero
        right = np.asarray(b).reshape(batch, k, n).astype(np.int64) - b_zero
        return (left @ right).astype(np.int32).astype(F32) * floats[0]  # exact sums, one rounding each way
    raise ValueError(f"no reference for the float operator {kernel!r}")


def run_plan(plan, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every value of ``plan`` (an edgeq.kernels.plan.Plan) for the input ``x`` (batch 1), by name.

    Codes are uint8 and floats float32, shaped as the plan's values; a compiled module of the
    plan must return exactly the bits of ``env[plan.output_name]``.
    """
    env: dict[str, np.ndarray] = {plan.input_name: np.ascontiguousarray(x, F32).reshape(plan.input_shape)}
    for step in plan.steps:
        value = plan.values[step.output]
        args = [env[name] for name in step.inputs]
        p = step.params
        if step.kernel == "constant":
            out = np.asarray(p["array"], F32)
        elif step.kernel == "alias":
            out = args[0]
        elif step.kernel == "quantize":
            source = args[0]
            if p["nchw"]:
                source = source.reshape(source.shape[1], -1).T  # NCHW planes to NHWC pixels
            out = _quantize_codes(source, p["scale"], p["zero"], p["qmax"])
        elif step.kernel == "conv2d":
            out = _conv(env, step, args[0])
        elif step.kernel == "generic":  # TVM's code in the module; onnxruntime here (float, not bit for bit)
            from .plan import run_generic

            out = run_generic(p["model"], args).reshape(value.shape)
        elif step.kernel == "add_clamp":
            lo, hi = p["clamp"]
            total = args[0] + args[1] if len(args) > 1 else args[0]
            out = np.clip(total, F32(max(lo, -3.0e38)), F32(min(hi, 3.0e38)))
        elif step.kernel == "max_pool":
            h, w, c, out_h, out_w, kh, kw, sh, sw, pad_top, pad_left = p["ints"]
            # codes pool with code 0 as the padding, floats with -inf: below every value either way
            dtype, low = (np.uint8, 0) if step.out_kind == "codes" else (F32, -np.inf)
            padded = np.full(
                (max(h + pad_top, (out_h - 1) * sh + kh), max(w + pad_left, (out_w - 1) * sw + kw), c), low, dtype
            )
            padded[pad_top : pad_top + h, pad_left : pad_left + w] = args[0].reshape(h, w, c)
            out = np.full((out_h, out_w, c), low, dtype)
            for i in range(kh):
                for j in range(kw):
                    out = np.maximum(out, padded[i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw])
        elif step.kernel == "global_average_pool":
            pixels, c = p["ints"]
            rows = args[0].reshape(pixels, c)
            total = np.zeros(c, F32)
            for m in range(pixels):  # in pixel order, as edgeq_global_average_pool sums
                total = total + rows[m]
            out = total / F32(pixels)
        else:
            second = args[1] if len(args) > 1 else p.get("constant")
            out = float_op(step.kernel, args[0], second, p["ints"], p["floats"])
        env[step.output] = np.asarray(out).reshape(value.shape)
    return env
