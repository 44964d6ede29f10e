"""Low-bit data layouts and the kernels that compute on them (installed as ``edgeq.kernels``).

Every kernel comes with a NumPy reference in the same module; the compiled and SIMD
versions are tested bit-exactly against it.
"""
