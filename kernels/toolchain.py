"""Building the C kernels for a target: compiler flags per instruction set, object files for
linking into a TVM module, and cached shared libraries for ctypes."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
C_SOURCE = SOURCE_DIR / "edgeq_kernels.c"  # the integer kernels
C_SOURCES = (C_SOURCE, SOURCE_DIR / "edgeq_float.c")  # and the float operators around them
FFI_SOURCE = SOURCE_DIR / "edgeq_ffi.cc"


def compile_flags(arch: str, cpu_features, mcpu: str | None = None) -> list[str]:
    features = set(cpu_features)
    # -ffp-contract=off: the float epilogues and operators must round every multiply and add
    # on their own, as the reference does, on every target (GCC contracts by default
    # under -std=gnu*, and the AArch64 compilers would fuse them into fmla).
    flags = ["-O3", "-fPIC", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
    if arch == "x86_64":
        if "avx2" in features:
            flags += ["-mavx2", "-mfma"]
        if {"avx512_vnni", "avx512bw"} <= features:
            flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
    elif arch == "aarch64":
        if mcpu and mcpu != "generic":
            flags.append(f"-mcpu={mcpu}")
        if "asimddp" in features and not (mcpu and mcpu != "generic"):
            flags.append("-march=armv8.2-a+dotprod")
    return flags


def source_digest(source_dir: Path | None = None) -> str:
    """A short hash of what decides a compiled kernel module: the C sources (of ``source_dir``, default this
    package's) and the Python that packs and plans for them."""
    hasher = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for source in [*sorted((source_dir or SOURCE_DIR).iterdir()), *sorted(here.glob("*.py"))]:
        hasher.update(source.name.encode() + source.read_bytes())
    return hasher.hexdigest()[:16]


def build_object(compiler: str, flags: list[str], out_dir: Path) -> list[Path]:
    """Compile the C kernels into object files in ``out_dir`` (for linking into a TVM module)."""
    objects = []
    for source in C_SOURCES:
        out = Path(out_dir) / f"{source.stem}.o"
        command = [compiler, *flags, "-std=c11", "-c", str(source), "-o", str(out)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"compiling the kernels failed: {' '.join(command)}\n{result.stderr.strip()}")
        objects.append(out)
    return objects


def build_shared(compiler: str, flags: list[str], cache: Path, source_dir: Path | None = None) -> Path:
    """A shared library of the C kernels (for ctypes), cached by source and flags; ``source_dir`` builds another
    copy of ``csrc`` (an older revision, to compare against)."""
    cache.mkdir(parents=True, exist_ok=True)
    digest = source_digest(source_dir)
    path = cache / f"libedgeq_kernels-{hashlib.sha256(repr((digest, compiler, flags)).encode()).hexdigest()[:16]}.so"
    sources = C_SOURCES if source_dir is None else tuple(Path(source_dir) / source.name for source in C_SOURCES)
    if not path.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            partial = Path(tmp) / path.name
            command = [compiler, *flags, "-std=c11", "-shared", *map(str, sources), "-o", str(partial), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"compiling the kernels failed: {' '.join(command)}\n{result.stderr.strip()}")
            os.replace(partial, path)
    return path


def host_flags() -> tuple[str, list[str]]:
    """The compiler and flags for this machine, with the best layout its CPU runs."""
    import platform

    arch = platform.machine()
    features = host_cpu_features()
    compiler = shutil.which("gcc") or shutil.which("cc") or "cc"
    return compiler, compile_flags(arch, features)


def host_cpu_features() -> set[str]:
    from edgeq.targets import host_cpu_flags

    return set(host_cpu_flags())


def kernel_toolchain(target) -> tuple[str, str, list[str]]:
    """C compiler, C++ compiler and flags for building the kernels for ``target`` (an edgeq.targets.Target)."""
    from edgeq.errors import EdgeqError

    if target.cross_compiler:
        c_compiler = target.cross_compiler
        cxx_compiler = c_compiler[: -len("gcc")] + "g++" if c_compiler.endswith("gcc") else c_compiler
    else:
        c_compiler = shutil.which("gcc") or shutil.which("cc") or "cc"
        cxx_compiler = shutil.which("g++") or shutil.which("c++") or "c++"
    for tool in (c_compiler, cxx_compiler):
        if shutil.which(tool) is None:
            raise EdgeqError(
                f"compiler {tool} not found",
                "install gcc and g++ (for arm64: sudo apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)",
            )
    mcpu = target.tvm_target.get("mcpu")
    return c_compiler, cxx_compiler, compile_flags(target.arch, target.cpu_features, mcpu)
