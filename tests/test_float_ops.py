"""The float operators of the kernel library (edgeq_float.c) against NumPy, in the host's
SIMD build and the portable C build. Moves (copy, concat, dequantize, add, multiply) are
exact; arithmetic is held to float32 rounding of a float64 reference (stated per test)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

BUILDS = ["host", "portable"]


def call(library, name, a, b, ints, floats, out_shape):
    out = np.zeros(out_shape, np.float32)
    ptr = library._ptr
    second = None if b is None else np.ascontiguousarray(b, np.uint8 if b.dtype == np.uint8 else np.float32)
    getattr(library.lib, name)(
        ptr(np.ascontiguousarray(a)),
        ptr(second),
        ptr(np.array(ints, np.int32)),
        ptr(np.array(floats or [0.0], np.float32)),
        ptr(out),
    )
    return out


@pytest.mark.parametrize("build", BUILDS)
def test_matmul_tiles_equal_the_reference_bit_for_bit(libraries, build):
    """The register tiles (4 x 16 on AVX2, 4 x 32 on AVX-512) and the remainder loop each sum an output's products
    in k order: attention-sized products (DeiT's 197 tokens, 64 per head) equal the NumPy reference exactly."""
    from edgeq.kernels import reference

    rng = np.random.default_rng(3)
    for m, k, n in [(197, 64, 197), (197, 197, 64), (8, 5, 48), (5, 33, 100)]:
        a = rng.normal(0, 1, (2, m, k)).astype(np.float32)
        b = rng.normal(0, 1, (2, k, n)).astype(np.float32)
        ours = call(libraries[build], "edgeq_matmul", a, b, [2, m, k, n], [0.125], (2, m, n))
        expected = reference.float_op("matmul", a, b, np.array([2, m, k, n]), np.array([0.125], np.float32))
        assert np.array_equal(ours, expected), (m, k, n)


@pytest.mark.parametrize("build", BUILDS)
def test_matmul_of_codes_is_the_exact_integer_product_scaled_once(libraries, build):
    """Attention's quantized operands multiply as integers: every output is the exact sum of (a - a_zero) *
    (b - b_zero) converted to float and times alpha, bit for bit the reference's, on tile-sized and ragged shapes
    (odd k, rows not a multiple of 4, columns not of 16) and on the extreme codes that bound the int32 sums."""
    from edgeq.kernels import reference

    rng = np.random.default_rng(5)
    cases = [
        (197, 64, 197, 131, 7),
        (197, 197, 64, 0, 128),
        (5, 33, 100, 255, 0),
        (1, 1, 1, 3, 250),
        (6, 7, 17, 9, 200),
    ]
    for m, k, n, a_zero, b_zero in cases:
        a = rng.integers(0, 256, (3, m, k), dtype=np.uint8)
        b = rng.integers(0, 256, (3, k, n), dtype=np.uint8)
        a[0, 0], b[0, :, 0] = 0 if a_zero > 127 else 255, 0 if b_zero > 127 else 255  # the largest |products|
        ints, alpha = [3, m, k, n, a_zero, b_zero], np.float32(0.0123)
        ours = call(libraries[build], "edgeq_matmul_codes", a, b, ints, [alpha], (3, m, n))
        expected = reference.float_op("matmul_codes", a, b, np.array(ints), np.array([alpha], np.float32))
        assert np.array_equal(ours, expected), (m, k, n)
        exact = (a.astype(np.int64) - a_zero) @ (b.astype(np.int64) - b_zero)
        assert np.array_equal(ours, exact.astype(np.float32) * alpha), (m, k, n)


@pytest.mark.parametrize("build", BUILDS)
def test_softmax_rows_sum_to_one_and_match_numpy(libraries, build):
    rng = np.random.default_rng(0)
    for cols in (1, 7, 8, 197, 260):
        x = (rng.normal(0, 1, (5, cols)) * rng.choice([0.1, 3.0, 40.0], (5, 1))).astype(np.float32)
        x[0, 0] = -1.0e4  # a masked position: e^(x - max) underflows to 0
        ours = call(libraries[build], "edgeq_softmax", x, None, [5, cols], [], x.shape)
        e = np.exp(x.astype(np.float64) - x.max(1, keepdims=True))
        reference = e / e.sum(1, keepdims=True)
        assert np.abs(ours - reference).max() < 2e-6  # the polynomial exp is within 2 ulp
        assert np.allclose(ours.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("build", BUILDS)
def test_gelu_matches_the_erf_form(libraries, build):
    x = np.concatenate([np.linspace(-12, 12, 4001), np.random.default_rng(1).normal(0, 3, 3001)]).astype(np.float32)
    ours = call(libraries[build], "edgeq_gelu", x, None, [x.size], [], x.shape)
    reference = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    assert np.all(np.abs(ours - reference) <= 2e-6 * np.maximum(1.0, np.abs(reference)))


@pytest.mark.parametrize("build", BUILDS)
def test_activations_match_their_definitions(libraries, build):
    """Sigmoid within the polynomial exp's few ulp; the hard ones are two roundings of a float64 reference."""
    from edgeq.kernels import reference

    x = np.concatenate([np.linspace(-100, 100, 4001), np.random.default_rng(3).normal(0, 4, 3001)]).astype(np.float32)
    x64 = x.astype(np.float64)
    definitions = {
        0: (0.0, 0.0, 1 / (1 + np.exp(-x64)), 1e-6),
        1: (0.2, 0.5, np.clip(0.2 * x64 + 0.5, 0, 1), 2e-7),
        2: (1 / 6, 0.5, x64 * np.clip(x64 / 6 + 0.5, 0, 1), 4e-7),
    }
    for kind, (alpha, beta, expected, tolerance) in definitions.items():
        ours = call(libraries[build], "edgeq_activation", x, None, [x.size, kind], [alpha, beta], x.shape)
        assert np.all(np.abs(ours - expected) <= tolerance * np.maximum(1.0, np.abs(expected))), kind
        bits = reference.float_op("activation", x, None, [x.size, kind], np.array([alpha, beta], np.float32))
        assert np.array_equal(ours, bits), kind  # the NumPy reference's bits, in every build


@pytest.mark.parametrize("build", BUILDS)
def test_layer_norm_matches_numpy(libraries, build):
    rng = np.random.default_rng(2)
    rows, cols = 9, 192
    x = rng.normal(3, 2, (rows, cols)).astype(np.float32)
    gamma, beta = rng.normal(1, 0.2, cols).astype(np.float32), rng.normal(0, 0.2, cols).astype(np.float32)
    ours = call(libraries[build], "edgeq_layer_norm", x, np.concatenate([gamma, beta]), [rows, cols], [1e-6], x.shape)
    x64 = x.astype(np.float64)
    reference = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-6) * gamma + beta
    assert np.abs(ours - reference).max() < 1e-5


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    m=st.integers(1, 13),
    k=st.integers(1, 70),
    n=st.integers(1, 40),
    build=st.sampled_from(BUILDS),
    seed=st.integers(0, 2**31 - 1),
)
def test_matmul_matches_numpy(libraries, batch, m, k, n, build, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1, (batch, m, k)).astype(np.float32)
    b = rng.normal(0, 1, (batch, k, n)).astype(np.float32)
    ours = call(libraries[build], "edgeq_matmul", a, b, [batch, m, k, n], [0.5], (batch, m, n))
    reference = 0.5 * np.matmul(a.astype(np.float64), b.astype(np.float64))
    # float32 accumulation over k terms: a few ulp of the sum of |products|
    bound = (
        4 * k * np.finfo(np.float32).eps * 0.5 * np.matmul(np.abs(a).astype(np.float64), np.abs(b).astype(np.float64))
    )
    assert np.all(np.abs(ours - reference) <= bound + 1e-30)


@pytest.mark.parametrize("build", BUILDS)
def test_binary_broadcasts_a_period_and_clamps_exactly(libraries, build):
    rng = np.random.default_rng(3)
    a = rng.normal(0, 2, (4, 6, 10)).astype(np.float32)
    bias = rng.normal(0, 1, 10).astype(np.float32)
    ours = call(libraries[build], "edgeq_binary", a, bias, [a.size, 10, 0], [-1.5, 2.0], a.shape)
    assert np.array_equal(ours, np.clip(a + bias, np.float32(-1.5), np.float32(2.0)))
    table = rng.normal(0, 1, (6, 10)).astype(np.float32)
    ours = call(libraries[build], "edgeq_binary", a, table, [a.size, 60, 1], [-3.0e38, 3.0e38], a.shape)
    assert np.array_equal(ours, a * table)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    build=st.sampled_from(BUILDS),
    seed=st.integers(0, 2**31 - 1),
)
def test_strided_copy_transposes_and_slices_exactly(libraries, shape, build, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, shape).astype(np.float32)
    perm = rng.permutation(len(shape))
    starts = [int(rng.integers(0, d)) for d in shape]
    view = x.transpose(perm)[tuple(slice(starts[p], None, 1 + int(rng.integers(0, 2))) for p in perm)]
    strides = [s // 4 for s in view.strides]
    offset = (view.__array_interface__["data"][0] - x.__array_interface__["data"][0]) // 4
    pad = 6 - view.ndim
    ints = [1] * pad + list(view.shape) + [0] * pad + strides + [offset]
    ours = call(libraries[build], "edgeq_strided_copy", x, None, ints, [], view.shape)
    assert np.array_equal(ours, view)


@pytest.mark.parametrize("build", BUILDS)
def test_concat_and_dequantize_exactly(libraries, build):
    rng = np.random.default_rng(4)
    a, b = rng.normal(0, 1, (2, 1, 5)).astype(np.float32), rng.normal(0, 1, (2, 3, 5)).astype(np.float32)
    ours = call(libraries[build], "edgeq_concat", a, b, [2, 5, 15], [], (2, 4, 5))
    assert np.array_equal(ours, np.concatenate([a, b], axis=1))
    codes = rng.integers(0, 16, 300).astype(np.uint8)
    ours = call(libraries[build], "edgeq_dequantize", codes, None, [codes.size, 7], [0.37], codes.shape)
    assert np.array_equal(ours, (codes.astype(np.int32) - 7).astype(np.float32) * np.float32(0.37))
