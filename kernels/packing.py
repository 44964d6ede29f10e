"""Packing sub-byte integers into bytes, as ONNX stores INT4/UINT4 and INT2/UINT2 tensors.

Values are taken in row-major (C) order and packed low bits first:

    4-bit, two per byte:   byte k = | v[2k+1] (bits 7..4) | v[2k] (bits 3..0) |
    2-bit, four per byte:  byte k = | v[4k+3] 7..6 | v[4k+2] 5..4 | v[4k+1] 3..2 | v[4k] 1..0 |

Signed values are stored in two's complement within their field (-2 -> 0b10 in 2 bits).
A tensor whose element count is not a multiple of the values per byte ends with a
partial byte whose unused high bits are zero.
"""

from __future__ import annotations

import numpy as np


def values_per_byte(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"packing supports 2, 4 or 8 bits, not {bits}")
    return 8 // bits


def pack(values: np.ndarray, bits: int) -> bytes:
    """Pack integers (signed or unsigned, within ``bits``) into bytes, low bits first."""
    per_byte = values_per_byte(bits)
    flat = np.asarray(values).astype(np.int64).ravel()
    fields = (flat & ((1 << bits) - 1)).astype(np.uint8)
    padded = np.zeros(-(-flat.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: flat.size] = fields
    lanes = padded.reshape(-1, per_byte)
    packed = np.zeros(len(lanes), dtype=np.uint8)
    for lane in range(per_byte):
        packed |= lanes[:, lane] << np.uint8(lane * bits)
    return packed.tobytes()


def unpack(data: bytes, bits: int, count: int, signed: bool) -> np.ndarray:
    """The inverse of :func:`pack`: ``count`` values as int8 (signed) or uint8."""
    per_byte = values_per_byte(bits)
    packed = np.frombuffer(data, dtype=np.uint8)
    lanes = np.stack(
        [(packed >> np.uint8(lane * bits)) & np.uint8((1 << bits) - 1) for lane in range(per_byte)], axis=1
    )
    fields = lanes.ravel()[:count]
    if not signed:
        return fields.astype(np.uint8)
    sign_bit = 1 << (bits - 1)
    return ((fields.astype(np.int16) ^ sign_bit) - sign_bit).astype(np.int8)
