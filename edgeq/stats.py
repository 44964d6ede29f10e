"""Paired comparisons of classifiers on the same test images."""

from __future__ import annotations

import math

import numpy as np


def pack(correct: np.ndarray) -> str:
    """Per-image correctness as hex of its bits (8 images a byte, first image in the high bit)."""
    return np.packbits(np.asarray(correct, bool)).tobytes().hex()


def unpack(bits: str, count: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(bits), np.uint8))[:count].astype(bool)


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict:
    """McNemar's exact test of paired correctness: two-sided binomial test of the discordant pairs at 1/2.

    ``a_only``: images ``a`` gets right and ``b`` wrong; ``b_only`` the reverse.
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired results need the same images ({a.shape} against {b.shape})")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n, low = a_only + b_only, min(a_only, b_only)
    tail = sum(math.comb(n, k) for k in range(low + 1)) / 2**n if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": min(1.0, 2 * tail)}
