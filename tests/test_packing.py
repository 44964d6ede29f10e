import numpy as np
import onnx
import pytest
from edgeq.kernels.packing import pack, unpack
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from edgeq.qdq import integer_tensor


def _values(bits, signed):
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return st.lists(st.integers(low, high), min_size=1, max_size=67)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("signed", [True, False])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_pack_unpack_round_trip(bits, signed, data):
    values = np.array(data.draw(_values(bits, signed)))
    packed = pack(values, bits)
    assert len(packed) == -(-len(values) // (8 // bits))
    assert np.array_equal(unpack(packed, bits, len(values), signed), values)


def test_layout_low_bits_first():
    assert pack(np.array([1, -2, 0, -1]), 2) == bytes([0b11_00_10_01])
    assert pack(np.array([7, -8, 3]), 4) == bytes([0x87, 0x03])


@pytest.mark.parametrize("bits,signed", [(2, True), (2, False), (4, True), (4, False), (8, True), (8, False)])
def test_onnx_reads_our_initializers(bits, signed):
    """onnx's own decoder is the reference for the ONNX storage layout."""
    rng = np.random.default_rng(bits)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    values = rng.integers(low, high, size=(3, 5, 7))
    tensor = integer_tensor("w", values, bits, signed)
    onnx.checker.check_tensor(tensor)
    assert np.array_equal(numpy_helper.to_array(tensor).astype(np.int64), values)
