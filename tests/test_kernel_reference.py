"""The kernel references agree with each other bit for bit, and requantization with onnxruntime's QDQ graph."""

import numpy as np
import onnx
from edgeq.kernels import reference
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgeq.qdq import onnxruntime_session

shapes = st.tuples(st.integers(1, 9), st.integers(1, 70), st.integers(1, 17))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), a_zero=st.integers(0, 15), asymmetric=st.booleans())
def test_lut_and_corrected_products_equal_the_plain_integer_gemm(shape, seed, a_zero, asymmetric):
    m, k, n = shape
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 16, size=(m, k))
    w = rng.integers(-2, 2, size=(n, k))
    w_zero = rng.integers(-2, 2, size=n) if asymmetric else 0
    expected = reference.int_gemm(a, w, a_zero, w_zero)
    assert np.array_equal(reference.corrected_gemm(a, w, a_zero, w_zero), expected)
    assert np.array_equal(reference.lut_dot(a, w), reference.int_gemm(a, w))


def test_bit_planes_rebuild_the_codes():
    w = np.array([-2, -1, 0, 1])
    b1, b0 = reference.bit_planes(w)
    assert np.array_equal(-2 * b1.astype(int) + b0, w)


def test_requantize_matches_onnxruntime_qdq_within_one_step():
    rng = np.random.default_rng(0)
    m, k, n = 16, 96, 24
    a, w = rng.integers(0, 16, size=(m, k)), rng.integers(-2, 2, size=(n, k))
    a_scale, a_zero = 0.05, 3
    w_scale, bias = rng.uniform(0.01, 0.1, n).astype(np.float32), rng.normal(0, 0.5, n).astype(np.float32)
    out_scale, out_zero = 0.1, 0
    acc = reference.int_gemm(a, w, a_zero, 0)
    ours = reference.requantize(acc, a_scale, w_scale, bias, out_scale, out_zero, 4, relu=True)

    nodes = [
        helper.make_node("DequantizeLinear", ["a_q", "a_s", "a_z"], ["a"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=1),
        helper.make_node("MatMul", ["a", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["y"]),
        helper.make_node("Relu", ["y"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "o_s", "o_z"], ["out"]),
    ]
    inits = [
        numpy_helper.from_array(np.float32(a_scale), "a_s"),
        numpy_helper.from_array(np.uint8(a_zero), "a_z"),
        numpy_helper.from_array(w.T.astype(np.int8), "w_q"),
        numpy_helper.from_array(w_scale, "w_s"),
        numpy_helper.from_array(np.zeros(n, np.int8), "w_z"),
        numpy_helper.from_array(bias, "bias"),
        numpy_helper.from_array(np.float32(out_scale), "o_s"),
        numpy_helper.from_array(np.uint8(out_zero), "o_z"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("a_q", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("out", TensorProto.UINT8, [m, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    theirs = onnxruntime_session(model).run(None, {"a_q": a.astype(np.uint8)})[0]
    theirs = np.minimum(theirs, 15)  # the graph's 8-bit output clipped to the 4-bit range the kernel writes
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    assert (ours != theirs).mean() < 0.01


def test_fast_requantization_is_proven_equal_or_refused():
    """floor(acc·m' + b') replaces the exact epilogue only where it gives the same code for every reachable acc."""
    rng = np.random.default_rng(0)
    weights = rng.integers(-2, 2, (24, 16, 3, 3))
    multiplier = rng.uniform(0.001, 0.02, 24).astype(np.float32)
    bias = rng.normal(0, 1, 24).astype(np.float32)
    settings = dict(clamp=(0.0, 6.0), out_scale=0.0731, out_zero=0, out_qmax=15)
    fast = reference.fast_requantization(weights, 3, 15, multiplier, bias, **settings)
    assert fast is not None
    fast_m, fast_b, lo, hi = fast
    least, most = reference.accumulator_bounds(weights, 3, 15)
    acc = np.arange(least.min(), most.max() + 1)[:, None].clip(least, most)  # every reachable acc per channel
    exact = reference.epilogue(acc, multiplier, bias, None, settings["clamp"], 0.0731, 0, 15)[1]
    assert np.array_equal(np.clip(np.floor(acc.astype(np.float32) * fast_m + fast_b), lo, hi), exact)
    # acc·0.5 lands on a half at every odd acc, where rounding half to even and the floor of x + 0.5 part
    halves = reference.fast_requantization(
        weights[:1], 3, 15, np.float32([0.5]), np.float32([0.0]), (-np.inf, np.inf), 1.0, 8, 15
    )
    assert halves is None
