"""Compilation targets, stored as data: one JSON file per target in this folder.

A target names the TVM target (a dict: TVM 0.27 rejects the old "llvm -mcpu=..."
strings), the C compiler that links the module for it (None: the host's), and the
qemu CPU model used to run it on an x86 machine (None: it runs natively). Adding a
board is adding a JSON file; no code changes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import platform
from importlib import resources

from edgeq.errors import one_of


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str  # "x86_64" or "aarch64", as uname -m prints it
    tvm_target: dict
    cross_compiler: str | None
    qemu_cpu: str | None
    cpu_features: tuple[str, ...]  # /proc/cpuinfo flags the generated code needs

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
        flags = _host_cpu_flags()
        return [f for f in self.cpu_features if f not in flags]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"cpu_features": list(self.cpu_features)}


@functools.cache
def _load_all() -> dict[str, Target]:
    found = {}
    for entry in resources.files(__name__).iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text())
            data["cpu_features"] = tuple(data.get("cpu_features", ()))
            found[data["name"]] = Target(**data)
    return found


def list_targets() -> list[Target]:
    return [t for _, t in sorted(_load_all().items())]


def get_target(name: str) -> Target:
    """Look a target up by name; an unknown name lists the valid ones."""
    if isinstance(name, Target):
        return name
    targets = _load_all()
    if name not in targets:
        raise one_of("target", name, targets)
    return targets[name]


@functools.cache
def _host_cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
