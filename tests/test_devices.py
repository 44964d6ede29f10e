"""Runners: a TVM RPC server on loopback, natively and under qemu-aarch64 (a rehearsal of a
board), gives the same outputs as the local and emulated runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from edgeq.targets import get_target

from edgeq import devices, emulation
from edgeq.errors import EdgeqError
from edgeq.runtime import rpc_server as rpc_server_script
from edgeq.stages import bundle as bundle_stage
from edgeq.stages import compile as compile_stage
from edgeq.stages import export as export_stage
from edgeq.stages import verify as verify_stage

from .conftest import requires_emulator

RPC_SERVER = [str(Path(rpc_server_script.__file__)), "--host", "127.0.0.1"]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, quantized_dirs):
    return export_stage.run(quantized_dirs("w2a4"), tmp_path_factory.mktemp("devices") / "exported")


def _wait_for_port(port: int, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the RPC server exited: {process.stderr.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the RPC server did not listen on {port} within {seconds} s")


@pytest.fixture
def rpc_server():
    """Start an RPC server with the given Python command prefix; yields its HOST:PORT."""
    started = []

    def start(python: list[str], env=None, wait_s: float = 30.0) -> str:
        port = devices.free_port()
        process = subprocess.Popen(
            [*python, *RPC_SERVER, "--port", str(port), "--port-end", str(port + 1)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        started.append(process)
        _wait_for_port(port, process, wait_s)
        return f"127.0.0.1:{port}"

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_verify_over_loopback_rpc_matches_the_local_run(tmp_path, tiny_export, rpc_server):
    compiled = compile_stage.run(tiny_export, tmp_path / "compiled", target="x86")
    local = verify_stage.run(compiled, tmp_path / "local", data="fashion-mnist:test", num_images=40, latency_runs=3)
    address = rpc_server([sys.executable])
    remote = verify_stage.run(
        compiled, tmp_path / "remote", data="fashion-mnist:test", num_images=40, latency_runs=5, rpc=address
    )
    assert remote["ran"] == f"rpc {address}" and local["ran"] == "native"
    assert remote["agreement_with_reference"] == local["agreement_with_reference"] == 1.0
    assert remote["compiled_top1"] == local["compiled_top1"]
    assert remote["max_abs_diff_vs_onnxruntime"] == local["max_abs_diff_vs_onnxruntime"] < 1e-4
    assert remote["latency_runs"] == 5 and remote["latency_ms"] > 0


@pytest.mark.qemu
@requires_emulator
def test_verify_over_rpc_to_an_emulated_raspberry_pi(tmp_path, tiny_export, rpc_server):
    compiled = compile_stage.run(tiny_export, tmp_path / "compiled", target="rpi4")
    command, env = emulation.python_command("cortex-a72")
    address = rpc_server(command, env=env, wait_s=120.0)
    report = verify_stage.run(
        compiled, tmp_path / "verified", data="fashion-mnist:test", num_images=20, latency_runs=2, rpc=address
    )
    assert report["ran"] == f"rpc {address}" and report["agreement_with_reference"] == 1.0
    assert report["agreement_with_onnxruntime"] == 1.0 and report["max_abs_diff_vs_onnxruntime"] < 1e-3


def test_rpc_errors_are_one_line_with_a_fix(tmp_path, tiny_export):
    with pytest.raises(EdgeqError, match="not HOST:PORT"):
        devices.runner_for(get_target("x86"), rpc="localhost")
    with pytest.raises(EdgeqError, match="needs --key"):
        devices.runner_for(get_target("x86"), tracker="127.0.0.1:9190")
    runner = devices.runner_for(get_target("x86"), rpc=f"127.0.0.1:{devices.free_port()}")  # nothing listens there
    with pytest.raises(EdgeqError, match="cannot reach the RPC server") as caught:
        runner.run(tmp_path / "module.so", np.zeros((1, 1, 28, 28), np.float32), 0)
    assert "\n" not in caught.value.message


def _selftest(bundle: Path, python: list[str], env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*python, str(bundle / "selftest.py")], env=env, capture_output=True, text=True, check=False, cwd=str(bundle)
    )


def test_bundle_selftest_passes_and_catches_a_wrong_result(tmp_path, tiny_export):
    compiled = compile_stage.run(tiny_export, tmp_path / "compiled", target="x86")
    made = bundle_stage.run(compiled, tmp_path / "bundle", num_samples=6, tar=True)
    names = {p.name for p in made.iterdir()}
    assert {
        "module.so",
        "runner.py",
        "selftest.py",
        "rpc_server.py",
        "preprocess.json",
        "selftest.json",
        "README.md",
        "manifest.json",
    } <= names
    with tarfile.open(tmp_path / "bundle.tar.gz") as archive:
        assert "bundle/module.so" in archive.getnames()
    preprocess = json.loads((made / "preprocess.json").read_text())
    assert preprocess["input_shape"] == [1, 1, 28, 28] and len(preprocess["classes"]) == 10
    # the bundle's scripts must not need torch, onnxruntime or edgeq: run them with those imports failing
    blocked = tmp_path / "blocked"
    for package in ("torch", "onnxruntime", "edgeq"):
        (blocked / package).mkdir(parents=True)
        (blocked / package / "__init__.py").write_text(f"raise ImportError('{package} is not on the board')\n")
    env = {**os.environ, "PYTHONPATH": str(blocked)}
    result = _selftest(made, [sys.executable], env)
    assert result.returncode == 0 and result.stdout.startswith("PASS"), result.stdout + result.stderr
    check = json.loads((made / "selftest.json").read_text())
    assert (
        check["max_abs_diff"] == 0.0 and "bit-exact" in check["expected_from"]
    )  # a kernels module: the reference's bits
    expected = np.load(made / "selftest" / "expected.npy")
    off_by_one_ulp = expected.copy()
    off_by_one_ulp[0, 0] = np.nextafter(off_by_one_ulp[0, 0], np.float32(np.inf))
    np.save(made / "selftest" / "expected.npy", off_by_one_ulp)
    result = _selftest(made, [sys.executable], env)
    assert result.returncode == 1 and result.stdout.startswith("FAIL")
    np.save(made / "selftest" / "expected.npy", expected[::-1])  # another image's logits
    result = _selftest(made, [sys.executable], env)
    assert result.returncode == 1 and result.stdout.startswith("FAIL")


@pytest.mark.qemu
@requires_emulator
def test_rpi4_bundle_selftest_under_qemu(tmp_path, tiny_export):
    compiled = compile_stage.run(tiny_export, tmp_path / "compiled", target="rpi4")
    made = bundle_stage.run(compiled, tmp_path / "bundle", num_samples=4)
    command, env = emulation.python_command("cortex-a72")
    result = _selftest(made, command, env)
    assert result.returncode == 0 and result.stdout.startswith("PASS"), result.stdout + result.stderr
