"""Compilation targets, stored as data: one JSON file per target in this folder.

A target names the TVM target (a dict: TVM 0.27 rejects the old "llvm -mcpu=..."
strings), the C compiler that links the module for it (None: the host's), and the
qemu CPU model used to run it on an x86 machine (None: it runs natively). Adding a
board is adding a JSON file; no code changes.

``host`` is not a file but a name for the best target the CPU running edgeq executes
(:func:`host_target_name`, from the architecture and the /proc/cpuinfo flags). It is
resolved when parsed, so manifests, reports and stage folders name the concrete target.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import platform
from importlib import resources

from edgeq.errors import EdgeqError, one_of

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str  # "x86_64" or "aarch64", as uname -m prints it
    tvm_target: dict
    cross_compiler: str | None
    qemu_cpu: str | None
    cpu_features: tuple[str, ...]  # /proc/cpuinfo flags the generated code needs
    # the board's core clock, for turning estimated cycles into milliseconds where the board is not at hand
    # (edgeq.layer_costs.EstimatedCosts); None where edgeq measures instead
    clock_ghz: float | None = None

    @property
    def is_native_arch(self) -> bool:
        return self.arch == platform.machine()

    def tvm(self):
        """The ``tvm.target.Target`` (imports TVM on first use only)."""
        import tvm

        return tvm.target.Target(self.tvm_target)

    def missing_host_features(self) -> list[str]:
        """Features this target needs that the CPU running edgeq lacks (native arch only)."""
        if not self.is_native_arch:
            return list(self.cpu_features)
        flags = host_cpu_flags()
        return [f for f in self.cpu_features if f not in flags]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"cpu_features": list(self.cpu_features)}


@functools.cache
def _load_all() -> dict[str, Target]:
    found = {}
    for entry in resources.files(__name__).iterdir():
        if entry.name.endswith(".json"):
            try:
                data = json.loads(entry.read_text())
                data["cpu_features"] = tuple(data.get("cpu_features", ()))
                target = Target(**data)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                # one broken board file must not take every other target down with it
                log.warning("ignoring target file %s: %s (%s)", entry.name, type(exc).__name__, exc)
                continue
            found[target.name] = target
    return found


def list_targets() -> list[Target]:
    return [t for _, t in sorted(_load_all().items())]


HOST = "host"
# Per architecture, the targets a host may resolve to, best first: the first whose cpu_features the
# CPU has wins. x86-avx512 runs the AVX2 kernels (edgeq has no AVX-512 kernel yet) but lets TVM use
# AVX-512 for the float layers. On Arm, dot product picks jetson-orin: ARMv8.2-A code with sdot/udot
# (tuned for the Cortex-A78AE), which every ARMv8.2-A core with dot product runs (Raspberry Pi 5's
# Cortex-A76, Neoverse N1/Graviton 2 and later); without it, the generic NEON arm64.
HOST_PREFERENCE = {"x86_64": ("x86-avx512", "x86-avx2", "x86"), "aarch64": ("jetson-orin", "arm64")}
_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


def host_target_name(arch: str, cpu_flags) -> str:
    """The best target for a CPU of ``arch`` (as ``uname -m`` prints it) with /proc/cpuinfo flags ``cpu_flags``."""
    arch = _ARCH_ALIASES.get(arch.lower(), arch.lower())
    flags = set(cpu_flags)
    targets = _load_all()
    for name in HOST_PREFERENCE.get(arch, ()):
        if set(targets[name].cpu_features) <= flags:
            return name
    raise EdgeqError(
        f"no edgeq target runs on this CPU ({arch or 'unknown architecture'})",
        f"pass --target with one of: {', '.join(sorted(targets))} (cross-compiles)",
    )


def host_target() -> Target:
    """The best target for the CPU running edgeq."""
    return get_target(host_target_name(platform.machine(), host_cpu_flags()))


def get_target(name: str) -> Target:
    """Look a target up by name (``host``: :func:`host_target`); an unknown name lists the valid ones."""
    if isinstance(name, Target):
        return name
    if name == HOST:
        return host_target()
    targets = _load_all()
    if name not in targets:
        raise one_of("target", name, [HOST, *sorted(targets)])
    return targets[name]


# The instruction-set extensions the kernels and onnxruntime choose code by: what a speed
# figure depends on, so every benchmark records which of them its CPU had.
SIMD_FEATURES = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "asimd",
    "asimddp",
    "i8mm",
)


def host_cpu() -> dict:
    """The CPU running edgeq as benchmarks record it: model name, logical cores, and which of
    :data:`SIMD_FEATURES` it has."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model") and value.strip():
                    model = value.strip()
                    break
    except OSError:
        pass
    flags = host_cpu_flags()
    return {"model": model, "cores": os.cpu_count(), "features": [f for f in SIMD_FEATURES if f in flags]}


@functools.cache
def host_cpu_flags() -> frozenset[str]:
    """Every /proc/cpuinfo flag of the CPU running edgeq (empty where there is no /proc)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
