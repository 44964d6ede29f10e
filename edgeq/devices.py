"""Where a compiled module runs: this machine, qemu-aarch64, or a board over TVM RPC.

Every runner has one interface, :meth:`Runner.run`: the module's outputs for a batch of
inputs (one image per call), and per-call milliseconds when the runner measures time
(``None`` when it cannot: emulated code says nothing about a board's speed).

Over RPC the module is uploaded to the board, loaded there, fed one image at a time, and
timed there with TVM's time evaluator, so the figures are the board's. The RPC server
on the board is unauthenticated: bind it to localhost and reach it over an SSH tunnel
(docs/deploy.md).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import emulation
from .errors import EdgeqError
from .runtime import runner as board_runner
from .targets import Target

log = logging.getLogger(__name__)

RUNNER_SCRIPT = Path(board_runner.__file__)


@dataclasses.dataclass(frozen=True)
class RunResult:
    outputs: np.ndarray
    timings_ms: list[float] | None  # None: this runner does not measure time
    ran: str  # where, in words ("native", "qemu-aarch64 -cpu cortex-a72", "rpc 10.0.0.7:9090")


class Runner:
    description = "?"

    def run(self, module_path: Path, inputs: np.ndarray, latency_runs: int) -> RunResult:
        raise NotImplementedError


class LocalRunner(Runner):
    """This machine (the target's instruction set must be one this CPU runs)."""

    description = "native"

    def __init__(self, target: Target):
        missing = target.missing_host_features()
        if missing:
            raise EdgeqError(
                f"this CPU lacks {', '.join(missing)}, which target {target.name} needs",
                "verify on a machine that has them, or compile for target x86",
            )

    def run(self, module_path, inputs, latency_runs):
        machine = board_runner.load(str(module_path))
        with tqdm(total=len(inputs), desc="running", unit="img", leave=False) as bar:
            outputs = board_runner.predict(machine, inputs, progress=lambda done: bar.update(done - bar.n))
        timings = board_runner.time_runs(machine, inputs[:1], latency_runs) if latency_runs else None
        return RunResult(outputs, timings, self.description)


class QemuRunner(Runner):
    """qemu-aarch64 with the target's CPU model: correctness only, never latency."""

    def __init__(self, target: Target):
        if target.arch != "aarch64" or not target.qemu_cpu:
            raise EdgeqError(f"cannot run {target.arch} code on this machine", "verify on the device (--rpc HOST:PORT)")
        self.qemu_cpu = target.qemu_cpu
        self.description = f"qemu-aarch64 -cpu {target.qemu_cpu}"

    def run(self, module_path, inputs, latency_runs):
        with tempfile.TemporaryDirectory(prefix="edgeq-verify-") as scratch:
            scratch = Path(scratch)
            np.save(scratch / "inputs.npy", inputs)
            with tqdm(total=len(inputs), desc=self.description, unit="img", leave=False) as bar:
                emulation.run_python(
                    RUNNER_SCRIPT,
                    [str(module_path), str(scratch / "inputs.npy"), str(scratch / "outputs.npy")],
                    self.qemu_cpu,
                    on_progress=lambda done: bar.update(done - bar.n),
                )
            return RunResult(np.load(scratch / "outputs.npy"), None, self.description)


def parse_address(text: str, what: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EdgeqError(f"{what} {text!r} is not HOST:PORT", f"for example {what} 127.0.0.1:9090")
    return host, int(port)


class RpcRunner(Runner):
    """A board running ``python -m tvm.exec.rpc_server``, directly or through a tracker and key."""

    def __init__(self, address: str, *, tracker: bool = False, key: str | None = None, timeout_s: int = 0):
        self.host, self.port = parse_address(address, "--tracker" if tracker else "--rpc")
        if tracker and not key:
            raise EdgeqError(
                "--tracker needs --key (the device key the board registered with)",
                "for example --tracker 10.0.0.2:9190 --key rpi4",
            )
        self.tracker, self.key, self.timeout_s = tracker, key, timeout_s
        self.description = (
            f"rpc tracker {self.host}:{self.port} key {key}" if tracker else f"rpc {self.host}:{self.port}"
        )

    def connect(self):
        from tvm import rpc

        try:
            if self.tracker:
                return rpc.connect_tracker(self.host, self.port).request(self.key, session_timeout=self.timeout_s)
            return rpc.connect(self.host, self.port, session_timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - TVM raises its own error kinds for refused, reset and timed-out sockets
            raise EdgeqError(
                f"cannot reach the RPC server at {self.host}:{self.port}: {str(exc).splitlines()[-1]}",
                "start it on the board (python -m tvm.exec.rpc_server --host 127.0.0.1 --port 9090) "
                "and forward the port over SSH",
            ) from None

    def run(self, module_path, inputs, latency_runs):
        import tvm
        from tvm import relax

        session = self.connect()
        remote_name = f"edgeq-{Path(module_path).stem}.so"
        session.upload(str(module_path), remote_name)
        try:
            machine = relax.VirtualMachine(session.load_module(remote_name), session.cpu())
        except Exception as exc:  # noqa: BLE001
            raise EdgeqError(
                f"the board could not load the module: {str(exc).splitlines()[-1]}",
                "compile for the board's target (edgeq targets)",
            ) from None
        device = session.cpu()
        outputs = []
        for i in tqdm(range(len(inputs)), desc=self.description, unit="img", leave=False):
            result = machine["main"](tvm.runtime.tensor(np.ascontiguousarray(inputs[i : i + 1]), device))
            outputs.append(board_runner._to_numpy(result))
        timings = None
        if latency_runs:
            evaluate = machine.time_evaluator("main", device, number=1, repeat=latency_runs)
            timings = [
                seconds * 1e3
                for seconds in evaluate(tvm.runtime.tensor(np.ascontiguousarray(inputs[:1]), device)).results
            ]
        return RunResult(np.concatenate(outputs), timings, self.description)


def runner_for(target: Target, *, rpc: str | None = None, tracker: str | None = None, key: str | None = None) -> Runner:
    """RPC when an address is given; else this machine when it runs the target's code; else qemu."""
    if rpc and tracker:
        raise EdgeqError(
            "--rpc and --tracker both given", "use --rpc HOST:PORT for one board, or --tracker HOST:PORT --key KEY"
        )
    if rpc or tracker:
        return RpcRunner(rpc or tracker, tracker=bool(tracker), key=key)
    if target.is_native_arch:
        return LocalRunner(target)
    return QemuRunner(target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
