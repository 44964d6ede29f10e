"""ctypes bindings of a built kernel library (tests, profiling, the arm64 self-check).

NumPy and the standard library only, so it also runs inside the arm64 emulator, where
selfcheck.py loads these modules as plain files.
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

import numpy as np

try:
    from .layouts import LAYOUTS, PackedWeights
except ImportError:  # loaded as a plain file next to layouts.py (selfcheck.py under the emulator)
    from layouts import LAYOUTS, PackedWeights


class ConvParams(ctypes.Structure):
    """``edgeq_conv_params`` of csrc/edgeq_kernels.h. The one definition on the Python side: the
    compiled module receives these bytes as they are (edgeq_ffi.cc checks their size), and a
    test checks the fields against the header and the size against the C compiler's."""

    _fields_ = [
        (name, ctypes.c_int32)
        for name in (
            "in_h",
            "in_w",
            "in_c",
            "out_h",
            "out_w",
            "out_c",
            "kernel_h",
            "kernel_w",
            "stride_h",
            "stride_w",
            "pad_top",
            "pad_left",
            "x_zero",
            "x_max",
            "w_bits",
            "w_low",
            "w_absmax",
            "k_padded",
            "w_layout",
            "out_zero",
            "out_qmin",
            "out_qmax",
        )
    ] + [
        ("out_scale", ctypes.c_float),
        ("clamp_min", ctypes.c_float),
        ("clamp_max", ctypes.c_float),
        ("w_zeros", ctypes.c_int32),
        ("fast_codes", ctypes.c_int32),
        ("fast_lo", ctypes.c_int32),
        ("fast_hi", ctypes.c_int32),
        ("winograd", ctypes.c_int32),
    ]

    def words(self) -> np.ndarray:
        """The struct's bytes as int32 words (floats bit for bit), the tensor the module passes to the kernel."""
        return np.frombuffer(bytes(self), np.int32).copy()


def conv_params(**values) -> ConvParams:
    params = ConvParams()
    for name, value in values.items():
        if not hasattr(params, name):
            raise TypeError(f"edgeq_conv_params has no field {name!r}")
        setattr(params, name, value)
    return params


class Library:
    """ctypes bindings of a built kernel library."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lib = ctypes.CDLL(str(path))
        self.layout = next(layout for layout in LAYOUTS.values() if layout.id == self.lib.edgeq_layout())

    @contextlib.contextmanager
    def threads(self, count: int):
        """The kernels called from this thread use ``count`` threads for a while, then as many as before."""
        before = self.lib.edgeq_threads()
        self.lib.edgeq_set_threads(count)
        try:
            yield
        finally:
            self.lib.edgeq_set_threads(before)

    @property
    def amx(self) -> bool:
        """Whether layers of 64 rows or more run on AMX tiles now (VNNI builds on CPUs with AMX-INT8)."""
        return bool(self.lib.edgeq_amx())

    @contextlib.contextmanager
    def amx_allowed(self, allowed: bool):
        """Let the kernels use AMX tiles, or keep every layer on the VNNI kernel, for a while (process-wide)."""
        self.lib.edgeq_set_amx(int(allowed))
        try:
            yield
        finally:
            self.lib.edgeq_set_amx(1)

    @contextlib.contextmanager
    def in_place_allowed(self, allowed: bool):
        """Let convolutions read their input in place (implicit GEMM), or make every one copy im2col rows,
        for a while (process-wide)."""
        self.lib.edgeq_set_in_place(int(allowed))
        try:
            yield
        finally:
            self.lib.edgeq_set_in_place(1)

    @staticmethod
    def _ptr(array: np.ndarray | None):
        return None if array is None else array.ctypes.data_as(ctypes.c_void_p)

    def gemm_raw(self, a: np.ndarray, weights: PackedWeights) -> np.ndarray:
        """Σ_k a[m, k]·w[n, k] (raw codes) through the microkernel; ``a`` (M, K) codes ≤ 15."""
        m, k = a.shape
        rows = np.zeros((m, weights.k_padded), np.uint8)
        rows[:, :k] = a
        out = np.zeros((m, weights.out_channels), np.int32)
        status = self.lib.edgeq_gemm_raw(
            self._ptr(rows),
            m,
            weights.out_channels,
            weights.k_padded,
            self._ptr(weights.data),
            weights.bits,
            weights.low,
            weights.absmax,
            int(a.max(initial=0)),
            weights.layout,
            self._ptr(out),
        )
        if status != 0:
            raise ValueError(f"edgeq_gemm_raw rejected its arguments ({status})")
        return out

    def conv2d(
        self,
        params: ConvParams,
        x: np.ndarray,
        weights: PackedWeights,
        wsum: np.ndarray,
        multiplier: np.ndarray,
        bias: np.ndarray,
        residual: np.ndarray | None = None,
        want_float: bool = True,
        want_codes: bool = True,
        depthwise: bool = False,
    ):
        m = params.out_h * params.out_w
        out_float = np.zeros((m, params.out_c), np.float32) if want_float else None
        out_codes = np.zeros((m, params.out_c), np.uint8) if want_codes else None
        x = np.ascontiguousarray(x, np.uint8)
        args = [ctypes.byref(params), self._ptr(x), self._ptr(weights.data)]
        if not depthwise:
            args.append(self._ptr(np.ascontiguousarray(wsum, np.int32)))
        args += [
            self._ptr(np.ascontiguousarray(multiplier, np.float32)),
            self._ptr(np.ascontiguousarray(bias, np.float32)),
            self._ptr(None if residual is None else np.ascontiguousarray(residual, np.float32)),
            self._ptr(out_float),
            self._ptr(out_codes),
        ]
        status = (self.lib.edgeq_depthwise_conv2d if depthwise else self.lib.edgeq_conv2d)(*args)
        if status != 0:
            raise ValueError(f"the convolution kernel rejected its arguments ({status})")
        return out_float, out_codes
