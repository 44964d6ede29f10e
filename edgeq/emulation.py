"""Running arm64 modules on an x86 machine under qemu-aarch64, for correctness only.

A minimal Debian arm64 root filesystem (Python, libstdc++, libgomp) and an aarch64
site-packages with the TVM runtime and NumPy are built once into the cache folder
(``$EDGEQ_CACHE``, default ``~/.cache/edgeq``). Building needs root (debootstrap), and
network access to a Debian mirror and PyPI. Emulated timings mean nothing and are never
reported as latency.
"""

from __future__ import annotations

import fcntl
import logging
import os
import platform
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from .errors import EdgeqError

log = logging.getLogger(__name__)

DEBIAN_SUITE = "bookworm"  # Python 3.11, matching the cp311 wheels below
DEBIAN_MIRROR = os.environ.get("EDGEQ_DEBIAN_MIRROR", "http://deb.debian.org/debian")
ROOTFS_PACKAGES = "python3,libstdc++6,libgomp1"
RUNTIME_WHEELS = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy")
PYTHON = "usr/bin/python3.11"
SETUP_HINT = "run 'edgeq emulator setup' as root (needs debootstrap, qemu-user and network access to Debian and PyPI)"


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEQ_CACHE", Path.home() / ".cache" / "edgeq"))


def arm64_dir() -> Path:
    return cache_dir() / "arm64"


def is_ready(root: Path | None = None) -> bool:
    root = root or arm64_dir()
    return (root / "rootfs" / PYTHON).is_file() and (root / "site" / "tvm").is_dir() and (root / "READY").is_file()


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise EdgeqError(f"{what} failed: {tail[0]}", SETUP_HINT)


def setup(root: Path | None = None, *, force: bool = False) -> Path:
    """Build the arm64 rootfs and runtime site-packages (idempotent; safe to run concurrently)."""
    root = root or arm64_dir()
    if is_ready(root) and not force:
        return root
    for tool in ("qemu-aarch64", "debootstrap", "dpkg"):
        if shutil.which(tool) is None:
            raise EdgeqError(f"{tool} not found", "sudo apt-get install qemu-user debootstrap")
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / ".arm64.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready(root) and not force:
            return root
        staging = root.parent / f".arm64.partial-{uuid.uuid4().hex[:8]}"
        try:
            rootfs = staging / "rootfs"
            log.info("building the arm64 root filesystem (Debian %s) in %s", DEBIAN_SUITE, root)
            _run(
                [
                    "debootstrap",
                    "--arch=arm64",
                    "--foreign",
                    "--variant=minbase",
                    f"--include={ROOTFS_PACKAGES}",
                    DEBIAN_SUITE,
                    str(rootfs),
                    DEBIAN_MIRROR,
                ],
                "debootstrap",
            )
            # --foreign skips the second stage (it would need the emulator as init): unpacking the debs is enough to run
            # Python.
            for deb in sorted((rootfs / "var/cache/apt/archives").glob("*.deb")):
                _run(["dpkg", "-x", str(deb), str(rootfs)], f"unpacking {deb.name}")
            shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
            log.info("installing the aarch64 TVM runtime and NumPy wheels")
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--platform",
                    "manylinux_2_28_aarch64",
                    "--python-version",
                    "3.11",
                    "--implementation",
                    "cp",
                    "--abi",
                    "cp311",
                    "--only-binary=:all:",
                    "--target",
                    str(staging / "site"),
                    *RUNTIME_WHEELS,
                ],
                "pip install (aarch64 wheels)",
            )
            (staging / "READY").write_text("ok\n")
            if root.exists():
                shutil.rmtree(root)
            os.rename(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root


def python_command(qemu_cpu: str, root: Path | None = None) -> tuple[list[str], dict]:
    """The command prefix and environment that run the arm64 Python under qemu with ``qemu_cpu``."""
    root = root or arm64_dir()
    if platform.machine() == "aarch64":
        return [sys.executable], dict(os.environ)
    if not is_ready(root):
        raise EdgeqError(f"no arm64 emulation environment in {root}", SETUP_HINT)
    if shutil.which("qemu-aarch64") is None:
        raise EdgeqError("qemu-aarch64 not found", "sudo apt-get install qemu-user")
    rootfs = root / "rootfs"
    env = {"PYTHONPATH": str(root / "site"), "PATH": "/usr/bin:/bin", "HOME": "/tmp", "OMP_NUM_THREADS": "1"}
    return ["qemu-aarch64", "-cpu", qemu_cpu, "-L", str(rootfs), str(rootfs / PYTHON)], env


def run_python(script: str | Path, args: list[str], qemu_cpu: str, *, on_progress=None) -> None:
    """Run an arm64 Python script under qemu; stderr lines from the runner's progress reports go to ``on_progress``."""
    from .runtime.runner import PROGRESS_PREFIX

    command, env = python_command(qemu_cpu)
    process = subprocess.Popen(
        [*command, str(script), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    other_lines = []
    for line in process.stderr:
        if line.startswith(PROGRESS_PREFIX):
            if on_progress:
                on_progress(int(line[len(PROGRESS_PREFIX) :]))
        else:
            other_lines.append(line.rstrip())
    returncode = process.wait()
    if returncode != 0:
        detail = [line for line in other_lines if line][-1:] or [f"exit code {returncode}"]
        if returncode in (132, -4):
            detail = [f"illegal instruction: the module uses an instruction that CPU '{qemu_cpu}' lacks"]
        raise EdgeqError(
            f"arm64 run under qemu failed: {detail[0]}", "check that the module was compiled for this target"
        )
