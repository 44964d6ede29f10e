"""Weight layouts of the low-bit kernels: which panel order each microkernel reads, which one a
layer runs in, and the bit-packing of weights into that order (drawn in csrc/edgeq_kernels.h).

A target's build flags decide which microkernel the C file compiles (AVX2, AArch64 dot
product, AArch64 NEON, or portable C), and each microkernel reads its own panel layout;
:func:`layout_for` picks the same one in Python so the weights are stored in the order the
kernel consumes them. NumPy and the standard library only: this also runs inside the arm64
emulator.
"""

from __future__ import annotations

import dataclasses

import numpy as np

K_ALIGN = 16  # reduction length is padded to this (one 16-byte activation load on NEON)
GROUP_BYTES = 32  # packed fields come in groups of 32 bytes (one AVX2 register)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a microkernel wants its weights: blocks of ``block`` output channels, ``group`` consecutive k per channel."""

    name: str
    id: int  # matches EDGEQ_LAYOUT_* in edgeq_kernels.h
    block: int
    group: int


LAYOUTS = {
    "neon": Layout("neon", 0, 8, 8),
    "portable": Layout("portable", 4, 16, 1),
    "avx2": Layout("avx2", 1, 32, 2),
    "sdot": Layout("sdot", 2, 16, 4),
    "avx2-wide": Layout("avx2-wide", 3, 16, 2),
    # table lookup: 16-channel blocks, groups of 4 k (see edgeq_kernels.h; not a panel)
    "avx2-lut": Layout("avx2-lut", 5, 16, 4),
    "neon-lut": Layout("neon-lut", 6, 16, 4),  # the same stored bytes, read with tbl
    "vnni": Layout("vnni", 7, 32, 4),  # AVX-512 VNNI builds: every layer, 4- or 8-bit inputs
}
TABLE_LOOKUP = {"avx2": "avx2-lut", "neon": "neon-lut"}  # the table-lookup kernel each build also has
# When the table-lookup kernel is chosen: measured on Zen 3 against the vpmaddubsw kernel
# (benchmarks/speed.py, docs/kernels.md), tables cost more than they save below ~512 output
# channels (they are built per row and shared by the channels) and for few rows; and below ~256
# products per output (k), where building a row's tables costs as much as its lookups save (MobileNetV2's
# 96 -> 576 expansions at 14x14: 0.143 ms on tables against 0.117 on vpmaddubsw; 320 -> 1280 at 7x7,
# k = 320: 0.222 against 0.236; Zen 3, one thread, interleaved).
LUT_MIN_ROWS = 9
LUT_MIN_CHANNELS = 512
LUT_MIN_K = 256
# On NEON without dot product the tables win from the first block of 16 channels (an
# estimate: benchmarks/arm_estimate.py; no A72 was at hand to time it): per group pair
# and row the lookups take 10 instructions on two pipes for 128 multiply-adds, smlal 16 on
# one, and the tables cost about one block's lookups per row. A tile holds 4 rows.
NEON_LUT_MIN_ROWS = 4


def candidate_layouts(layout: Layout, x_max: int, weights: np.ndarray) -> list[Layout]:
    """Every layout a build with its own ``layout`` can run one layer in (the tests try them all)."""
    if layout.name == "vnni":  # a VNNI build also has every AVX2 kernel
        return [*candidate_layouts(LAYOUTS["avx2"], x_max, weights), layout]
    if layout.name == "avx2" and x_max > 15:
        return [LAYOUTS["avx2-wide"]]
    lut = TABLE_LOOKUP.get(layout.name)
    if lut and x_max <= 15 and weights.size and weights.min() >= -2 and weights.max() <= 1:
        return [layout, LAYOUTS[lut]]
    return [layout]


def conv_layout(layout: Layout, x_max: int, weights: np.ndarray | None = None, rows: int | None = None) -> Layout:
    """The layout one layer runs in on a build whose own layout is ``layout``.

    AVX2 builds run layers with 8-bit inputs on the wide (int16) kernel, and layers with
    4-bit inputs, 2-bit weights (values in [-2, 1]), many rows, many output channels and a
    long k on the table-lookup kernel; NEON builds (no dot product) run such layers on theirs
    from a few rows on.
    """
    if layout.name == "vnni":  # 64 multiply-adds per instruction at any input width: nothing beats it there
        return layout
    if weights is None:
        return LAYOUTS["avx2-wide"] if layout.name == "avx2" and x_max > 15 else layout
    candidates = candidate_layouts(layout, x_max, weights)
    if len(candidates) > 1:
        lut = candidates[-1]
        if lut.name == "avx2-lut":
            loses = (
                rows is None
                or rows < LUT_MIN_ROWS
                or weights.shape[0] < LUT_MIN_CHANNELS
                or weights.shape[1] < LUT_MIN_K
            )
        else:
            loses = rows is None or rows < NEON_LUT_MIN_ROWS
        if loses:
            candidates.remove(lut)
    return candidates[-1]


def layout_for(arch: str, cpu_features) -> Layout:
    """The layout the C file compiles to for a target (see :func:`compile_flags`)."""
    features = set(cpu_features)
    if arch == "x86_64":
        if {"avx512_vnni", "avx512bw"} <= features:
            return LAYOUTS["vnni"]
        return LAYOUTS["avx2" if "avx2" in features else "portable"]
    if arch == "aarch64":
        return LAYOUTS["sdot" if "asimddp" in features else "neon"]
    raise ValueError(f"no kernel layout for architecture {arch!r}")


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def storage(values: np.ndarray) -> tuple[int, int]:
    """(bits, low): the narrowest field width in (2, 4, 8) that holds ``values`` and 0 (padding) as codes
    ``v - low``. At 8 bits low is 0: the codes are the values' two's complement bytes, which the kernels
    read in place as their int8 panel."""
    low = min(int(values.min(initial=0)), 0)
    high = max(int(values.max(initial=0)), 0)
    for bits in (2, 4):
        if high - low < 2**bits:
            return bits, low
    if -128 <= low and high <= 127:
        return 8, 0
    raise ValueError(f"weights span {low}..{high}: more than 8 bits")


def pack_fields(values: np.ndarray, bits: int, low: int) -> np.ndarray:
    """Pack int8 ``values`` (length a multiple of 32·8/bits) as codes v - low, `bits` per field, 32-byte groups
    (see edgeq_kernels.h)."""
    per_byte = 8 // bits
    codes = (np.asarray(values, np.int16).ravel() - low).astype(np.uint8)
    if codes.size % (GROUP_BYTES * per_byte):
        raise ValueError(f"{codes.size} values do not fill whole groups of {GROUP_BYTES * per_byte}")
    fields = codes.reshape(-1, per_byte, GROUP_BYTES)
    packed = np.zeros((fields.shape[0], GROUP_BYTES), np.uint8)
    for field in range(per_byte):
        packed |= fields[:, field, :] << np.uint8(field * bits)
    return packed.ravel()


def unpack_fields(packed: np.ndarray, count: int, bits: int, low: int) -> np.ndarray:
    """The inverse of :func:`pack_fields` (the NumPy reference of ``edgeq_unpack``)."""
    per_byte = 8 // bits
    groups = np.asarray(packed, np.uint8).reshape(-1, GROUP_BYTES)
    fields = np.stack([(groups >> np.uint8(field * bits)) & np.uint8(2**bits - 1) for field in range(per_byte)], axis=1)
    return (fields.reshape(-1)[:count].astype(np.int16) + low).astype(np.int8)


def panel(weights: np.ndarray, layout: Layout) -> np.ndarray:
    """Weights (N, K) int8 in panel order [N/block][K/group][block][group], zero-padded to whole blocks and K to 16."""
    n, k = weights.shape
    padded = np.zeros((round_up(n, layout.block), round_up(k, K_ALIGN)), np.int8)
    padded[:n, :k] = weights
    blocks, k_padded = padded.shape[0] // layout.block, padded.shape[1]
    return padded.reshape(blocks, layout.block, k_padded // layout.group, layout.group).transpose(0, 2, 1, 3).ravel()


@dataclasses.dataclass(frozen=True)
class PackedWeights:
    """Weights in a layout's panel order, bit-packed: what a compiled module stores."""

    data: np.ndarray  # uint8
    bits: int
    low: int
    absmax: int
    k_padded: int
    out_channels: int
    layout: int = -1  # EDGEQ_LAYOUT_* of the packing (-1: depthwise, which has one layout)


def pack_lut(weights: np.ndarray) -> np.ndarray:
    """2-bit weights (N, K) in [-2, 1] as table indices: per 16-channel block, group pair, half block, 16 bytes
    (edgeq_kernels.h)."""
    n, k = weights.shape
    padded = np.zeros((round_up(n, 16), round_up(k, K_ALIGN)), np.int16)
    padded[:n, :k] = weights
    bits = padded & 3  # two's complement fields: b0 = bit 0 (weight 1), b1 = bit 1 (weight -2)
    planes = [((bits >> plane) & 1).reshape(padded.shape[0], -1, 4) for plane in (0, 1)]  # (N, groups, 4)
    place = np.array([1, 2, 4, 8])
    index = (planes[0] * place).sum(2) | ((planes[1] * place).sum(2) << 4)  # (N, groups): i0 | i1 << 4
    blocks, groups = padded.shape[0] // 16, padded.shape[1] // 4
    # (block, half, channel j, pair, parity) -> (block, pair, half, parity, j)
    index = index.reshape(blocks, 2, 8, groups // 2, 2).transpose(0, 3, 1, 4, 2)
    return np.ascontiguousarray(index).astype(np.uint8).ravel()


def pack_weights(weights: np.ndarray, layout: Layout) -> PackedWeights:
    weights = np.asarray(weights)
    if weights.min(initial=0) < -128 or weights.max(initial=0) > 127:
        raise ValueError("weight codes must fit int8")
    if layout.name in TABLE_LOOKUP.values():
        if weights.min(initial=0) < -2 or weights.max(initial=0) > 1:
            raise ValueError("the table-lookup layout takes 2-bit weights in [-2, 1]")
        return PackedWeights(
            pack_lut(weights),
            2,
            -2,
            int(np.abs(weights.astype(np.int16)).max(initial=0)),
            round_up(weights.shape[1], K_ALIGN),
            weights.shape[0],
            layout.id,
        )
    weights = weights.astype(np.int8)
    bits, low = storage(weights)
    values = panel(weights, layout)
    return PackedWeights(
        pack_fields(values, bits, low),
        bits,
        low,
        int(np.abs(weights.astype(np.int16)).max(initial=0)),
        round_up(weights.shape[1], K_ALIGN),
        weights.shape[0],
        layout.id,
    )


def pack_depthwise(weights: np.ndarray) -> PackedWeights:
    """Depthwise weights (C, kh, kw) int8 stored as [kh][kw][C], padded to whole groups."""
    weights = np.asarray(weights).astype(np.int8)
    values = np.ascontiguousarray(weights.transpose(1, 2, 0)).ravel()
    bits, low = storage(values)
    padded = np.zeros(round_up(values.size, 128), np.int8)
    padded[: values.size] = values
    return PackedWeights(
        pack_fields(padded, bits, low),
        bits,
        low,
        int(np.abs(values.astype(np.int16)).max(initial=0)),
        0,
        weights.shape[0],
    )


# Winograd F(2x2, 3x3) in integers (edgeq_kernels.c winograd_conv): U = (2G) w (2G)^T per tile position
WINOGRAD_G2 = np.array([[2, 0, 0], [1, 1, 1], [1, -1, 1], [0, 0, 2]], np.int64)
WINOGRAD_LAYOUTS = ("avx2", "neon", "sdot", "portable")  # builds whose winograd_conv reads panels of their own layout
WINOGRAD_A = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.int64)  # A^T
WINOGRAD_OFFSET = 30  # added to B^T d B (in [-30, 60] for d in [0, 15]) for an unsigned operand
WINOGRAD_V_MAX = 90
WINOGRAD_MIN_CHUNK = 16  # int16 sums of at least this many codes between widenings, or the direct kernel wins
WINOGRAD_MIN_CHANNELS = 32  # below this the transforms cost per channel what a few products do
# Without dot product the direct layers run on the table-lookup kernel, about 1.75x the multiply-adds per cycle of
# the smlal kernel that Winograd's 8-bit weights take: Winograd's 2.25x fewer products win on large maps only
# (Cortex-A72 estimate, ResNet-18: 7% faster at 56x56, 5% at 28x28, 5% slower at 14x14, 15% at 7x7).
WINOGRAD_MIN_PIXELS = {"neon": 28 * 28}


def winograd_applies(layout: Layout, in_c: int, out_pixels: int) -> bool:
    """Whether a 3x3 stride-1 layer of 4-bit codes runs as Winograd on a build of ``layout``."""
    return (
        layout.name in WINOGRAD_LAYOUTS
        and in_c >= WINOGRAD_MIN_CHANNELS
        and out_pixels >= WINOGRAD_MIN_PIXELS.get(layout.name, 0)
    )


def winograd_weights(values: np.ndarray) -> np.ndarray:
    """U (16, N, C): (2G) w (2G)^T of each (output, input) channel pair's 3x3 weights, position-major (4 i + j)."""
    n, c = values.shape[:2]
    return np.einsum("ai,ncij,bj->abnc", WINOGRAD_G2, values.astype(np.int64), WINOGRAD_G2).reshape(16, n, c)


def winograd_chunk(u: np.ndarray, k_padded: int) -> int:
    """The most codes (a multiple of 16, every microkernel's step; whole chunks from k = 0) whose int16 sums cannot
    wrap: for every position, output channel and chunk, 90 · Σ |U| <= 32767 (each transformed input code is at
    most 90). NEON's lanes each hold part of a chunk's sum, so the bound holds for them too."""
    magnitude = np.zeros((16, u.shape[1], k_padded), np.int64)
    magnitude[:, :, : u.shape[2]] = np.abs(u)
    for chunk in range(k_padded, 0, -K_ALIGN):
        chunks = -(-k_padded // chunk)
        padded = np.zeros((16, u.shape[1], chunks * chunk), np.int64)
        padded[:, :, :k_padded] = magnitude
        if WINOGRAD_V_MAX * padded.reshape(16, u.shape[1], chunks, chunk).sum(3).max(initial=0) <= 32767:
            return chunk
    return 0


def pack_winograd(values: np.ndarray, layout: Layout) -> tuple[PackedWeights, np.ndarray, int] | None:
    """The 16 panels of U (8-bit, ``layout``'s panel order), the input offset's share of each output of a 2x2
    block, A^T (30 sum_c U) A as (4 · N) int32, and the int16 chunk, or None where U's range makes the chunks
    too short (4-bit and wider weights)."""
    u = winograd_weights(values)
    absmax = int(np.abs(u).max(initial=0))
    n, c = values.shape[:2]
    chunk = winograd_chunk(u, round_up(c, K_ALIGN)) if absmax <= 127 else 0
    if chunk < WINOGRAD_MIN_CHUNK:
        return None
    data = np.concatenate([panel(u[pos].astype(np.int8), layout).view(np.uint8) for pos in range(16)])
    packed = PackedWeights(data, 8, 0, absmax, round_up(c, K_ALIGN), n, layout.id)
    usum = u.sum(2).reshape(4, 4, n)
    offsets = WINOGRAD_OFFSET * np.einsum("ai,ijn,bj->abn", WINOGRAD_A, usum, WINOGRAD_A).reshape(4, n)
    return packed, offsets.astype(np.int32).ravel(), chunk
