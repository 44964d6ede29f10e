"""A copy of a copy reads the first copy's source directly (edgeq.kernels.fusion.compose_copies): the composed
view must move exactly the elements the two copies move, and refuse views it cannot express."""

from __future__ import annotations

import numpy as np
from edgeq.kernels import reference
from edgeq.kernels.fusion import _composed_view


def _copy_ints(shape, strides, offset) -> np.ndarray:
    pad = 6 - len(shape)
    return np.array([1] * pad + list(shape) + [0] * pad + list(strides) + [offset], np.int32)


def _copy(source: np.ndarray, ints: np.ndarray) -> np.ndarray:
    return reference.float_op("copy", source, None, ints, np.zeros(1, np.float32))


def test_a_slice_of_a_permute_is_one_strided_view_of_the_source():
    rng = np.random.default_rng(0)
    for _ in range(200):
        rank = int(rng.integers(2, 6))
        shape = [int(d) for d in rng.integers(1, 6, rank)]
        source = rng.normal(0, 1, shape).astype(np.float32)
        contiguous = [int(np.prod(shape[d + 1 :])) for d in range(rank)]
        order = [int(d) for d in rng.permutation(rank)]
        permuted_shape = [shape[d] for d in order]
        first = _copy_ints(permuted_shape, [contiguous[d] for d in order], 0)
        permuted = _copy(source, first)
        assert np.array_equal(permuted, source.transpose(order).reshape(permuted.shape))
        # a box of the permuted tensor: a start and length per axis, some axes broadcast (stride 0)
        starts = [int(rng.integers(0, n)) for n in permuted_shape]
        lengths = [int(rng.integers(1, n - s + 1)) for n, s in zip(permuted_shape, starts)]
        inner = [int(np.prod(permuted_shape[d + 1 :])) for d in range(rank)]
        strides = [0 if rng.random() < 0.15 else inner[d] for d in range(rank)]
        lengths = [length if stride else int(rng.integers(1, 4)) for length, stride in zip(lengths, strides)]
        second = _copy_ints(lengths, strides, sum(s * c for s, c in zip(starts, inner)))
        composed = _composed_view(first, second)
        assert composed is not None
        assert np.array_equal(_copy(source, composed), _copy(permuted, second))


def test_views_that_are_not_boxes_are_refused():
    first = _copy_ints([4, 6], [1, 4], 0)  # the transpose of a 6 x 4 matrix
    assert _composed_view(first, _copy_ints([3, 2], [2, 1], 0)) is None  # rows of 2 across the 4 x 6 rows' ends
    assert _composed_view(first, _copy_ints([2, 6], [6, 1], 18)) is None  # runs past the last row
    assert _composed_view(first, _copy_ints([2, 6], [6, 1], 12)) is not None


def test_a_flatten_between_copies_composes_and_a_round_trip_becomes_no_copy():
    """A ViT's patch grid: NHWC codes' map copied to NCHW, flattened to (C, H*W), transposed to tokens (H*W, C):
    the height and width the NHWC source lays out as one merge, and the composed view is the source itself."""
    h, w, c = 3, 4, 5
    source = np.arange(h * w * c, dtype=np.float32).reshape(h, w, c)
    to_nchw = _copy_ints([1, c, h, w], [0, 1, w * c, c], 0)
    tokens = _copy_ints([1, h * w, c], [0, 1, h * w], 0)
    composed = _composed_view(to_nchw, tokens)
    assert composed is not None
    assert np.array_equal(_copy(source, composed), _copy(_copy(source, to_nchw), tokens))
    assert np.array_equal(_copy(source, composed).reshape(-1), source.reshape(-1))
