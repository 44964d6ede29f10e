"""Shared fixtures: a tiny random generator, a synth folder and quantized folders, built once per session."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from edgeq import emulation


def _import_installed(name: str) -> None:
    """Import the installed package ``name`` although a folder of the checkout has that name too.

    The checkout keeps ``edgeq.kernels`` in a top-level ``kernels/`` folder, and pytest (tests are
    a package) puts the checkout on ``sys.path``, where that folder would stand in for the PyPI
    package ``kernels`` that transformers imports when it is installed (transformers >= 5.25
    depends on it). Importing the real one first, with the checkout off the path, leaves it in
    ``sys.modules`` for every later import.
    """
    root = Path(__file__).resolve().parent.parent
    saved = sys.path[:]
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != root]
    try:
        importlib.import_module(name)
    except ImportError:  # not installed: nothing can be shadowed
        pass
    finally:
        sys.path[:] = saved


_import_installed("kernels")

TINY = "builtin:tiny-fmnist"  # the fast model for tests; the zoo teachers are bigger
PORTABLE_FLAGS = ["-O3", "-fPIC", "-fno-math-errno", "-ffp-contract=off"]  # no SIMD flags: the portable C kernels


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory):
    from edgeq.zoo.tiny_pipeline import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("generator") / "tiny"))


@pytest.fixture(scope="session")
def builtin_model():
    from edgeq.models import load_model

    return load_model(TINY)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory, tiny_generator, builtin_model):
    from edgeq.stages import synth

    return synth.run(
        tiny_generator,
        builtin_model.classes,
        tmp_path_factory.mktemp("synth") / "calib",
        synth.SynthOptions(num_images=16, seed=3, steps=4),
    )


@pytest.fixture(scope="session")
def quantized_dirs(tmp_path_factory):
    """Quantize folders of the built-in model, calibrated on real images (split A), per bit spec."""
    from edgeq.stages import quantize

    made = {}
    root = tmp_path_factory.mktemp("quantized")

    def get(bits: str):
        if bits not in made:
            made[bits] = quantize.run(TINY, "fashion-mnist:A", root / bits, bits=bits, num_images=64)
        return made[bits]

    return get


requires_emulator = pytest.mark.skipif(
    not emulation.is_ready(),
    reason="arm64 emulation environment not built (scripts/setup.sh builds it; needs root and network)",
)


@pytest.fixture(scope="session")
def libraries(tmp_path_factory):
    """The host's best build, the AVX2 build (the host's own on AVX2-only CPUs; on VNNI machines
    the build those run) and the portable C build: different microkernels and layouts."""
    import platform

    from edgeq.kernels import native, toolchain

    cache = tmp_path_factory.mktemp("kernels")
    compiler, flags = toolchain.host_flags()
    built = {
        "host": native.Library(toolchain.build_shared(compiler, flags, cache)),
        "portable": native.Library(toolchain.build_shared(compiler, PORTABLE_FLAGS, cache)),
    }
    if platform.machine() == "x86_64" and "avx2" in toolchain.host_cpu_features():
        avx2_flags = toolchain.compile_flags("x86_64", {"avx2", "fma"})
        built["avx2"] = native.Library(toolchain.build_shared(compiler, avx2_flags, cache))
    return built
