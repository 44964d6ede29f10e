"""The wheel, as ``pip install .``, a package index or a Docker image installs edgeq: built, checked, installed into a
fresh virtual environment away from the checkout, and run stage by stage from there.

The wheel is built from a copy of the source, not in place: setuptools builds through ``build/lib`` in the source
tree and keeps what an earlier build left there, so a module deleted or moved since would still ship.

The fresh environment gets the wheel with ``--no-deps``: installing torch, TVM and the rest (several GB) into it
would make this test take many minutes. Instead a ``.pth`` file in its site-packages names the test environment's
site-packages folders, so the already-installed dependencies import from there. A path line in a ``.pth`` file only
extends ``sys.path``; the ``.pth`` files inside that folder are not run, so the test environment's editable edgeq
(a ``.pth`` hook pointing at the checkout) stays inactive, and ``import edgeq`` must find the wheel's copy.
``pip check`` in the fresh environment then confirms the wheel's declared requirements are met there.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder in the source tree -> the import path it installs as (setup.py's package_dir).
PACKAGE_ROOTS = {"edgeq": "edgeq", "cli": "edgeq.cli", "kernels": "edgeq.kernels", "targets": "edgeq.targets"}
SKIPPED = {"__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache", "build", "dist", "runs"}


def _ignore(_folder, names):
    return [name for name in names if name in SKIPPED or name.startswith(".") or name.endswith((".egg-info", ".pyc"))]


def _source_files() -> dict[str, Path]:
    """Every file the package folders hold, by the path it must have in the wheel (documentation aside)."""
    files = {}
    for folder, package in PACKAGE_ROOTS.items():
        base = ROOT / folder
        for path in base.rglob("*"):
            relative = path.relative_to(base)
            if not path.is_file() or SKIPPED.intersection(relative.parts) or path.suffix in (".pyc", ".md"):
                continue
            files["/".join([*package.split("."), *relative.parts])] = path
    return files


def _packages() -> list[str]:
    """Every folder with an ``__init__.py`` under the package roots, as its import path."""
    found = []
    for folder, package in PACKAGE_ROOTS.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT / folder)
            if not SKIPPED.intersection(relative.parts):
                found.append(".".join([package, *relative.parts]))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source") / "edgeq"
    shutil.copytree(ROOT, source, ignore=_ignore)
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the build uses this environment's setuptools, so it needs no network.
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        out,
        source,
    ]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = out.glob("edgeq-*.whl")
    return built


def test_wheel_holds_every_package_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = _packages()
    assert "edgeq.reconstruction" in packages and "edgeq.kernels" in packages  # the walk sees the tree
    missing_packages = [p for p in packages if f"{p.replace('.', '/')}/__init__.py" not in names]
    assert not missing_packages, f"packages missing from the wheel: {missing_packages}"
    expected = _source_files()
    assert "edgeq/targets/x86-avx2.json" in expected and "edgeq/kernels/csrc/edgeq_kernels.c" in expected
    missing_files = sorted(set(expected) - names)
    assert not missing_files, f"files missing from the wheel (add them to setup.py's package_data): {missing_files}"
    # Nothing installs as a generic top-level module (cli, kernels, targets, tests).
    assert {name.split("/")[0] for name in names} == {"edgeq", wheel.name.split("-py")[0] + ".dist-info"}


def _run(command, cwd, env):
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_installed_wheel_runs_the_stages_without_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    # Without pip: ensurepip's bundled setuptools would shadow the newer one torch requires. This environment's pip
    # installs into it (--python) before the .pth exists, then runs inside it through the .pth for 'pip check'.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    python, edgeq = venv / "bin" / "python", venv / "bin" / "edgeq"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    work = tmp_path / "work"  # the current folder: not the checkout, so nothing of it is on sys.path
    work.mkdir()
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], work, env
    )
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    fresh_site = Path(_run([python, "-c", purelib], work, env).strip())
    (fresh_site / "test_environment_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    imports = "import edgeq, edgeq.reconstruction, edgeq.cli.main as cli\nprint(edgeq.__file__, cli.__file__)"
    where = _run([python, "-c", imports], work, env).split()
    for path in map(Path, where):
        assert path.is_relative_to(fresh_site) and not path.is_relative_to(ROOT), where
    _run([python, "-m", "pip", "check"], work, env)

    model = "builtin:tiny-fmnist"
    _run([edgeq, "synth", model, "--strategy", "noise", "--num-images", "8", "-o", "calib"], work, env)
    _run(
        [edgeq, "quantize", model, "--calib", "calib", "--method", "rtn", "--bits", "w2a4", "-o", "quantized"],
        work,
        env,
    )
    _run([edgeq, "export", "quantized", "-o", "exported"], work, env)
    _run([edgeq, "compile", "exported", "--target", "x86-avx2", "-o", "compiled"], work, env)
    module = work / "compiled" / "module.so"
    assert module.is_file() and module.stat().st_size > 0
    manifest = json.loads((work / "compiled" / "manifest.json").read_text())
    # The wheel's C kernel sources built the module (the generic TVM path would hide missing csrc files).
    assert manifest["extra"]["build"]["path"] == "kernels" and "x86-avx2" in json.dumps(manifest["target"])
