"""What stage folders hold, by name, and how a folder leads back to the folders it was made from.

Every stage writes a folder with a ``manifest.json`` (:mod:`edgeq.manifest`); the names
here are the files that later stages, the bundle and the CLI read from those folders.
"""

from __future__ import annotations

from pathlib import Path

from .manifest import Manifest

MODEL_FILE = "model.onnx"  # an export folder's QDQ ONNX model
MODULE_FILE = "module.so"  # a compile folder's TVM module


def upstream(compiled_dir: str | Path) -> tuple[Manifest, Path, Path]:
    """The compile manifest, and the export and quantize folders it was made from.

    The module and the ONNX model are checked against the sha256 their manifests record before
    anything uses them: a truncated ``module.so`` would crash the process that loads it, and
    a swapped one would run someone else's native code (the quantize folder's weights are
    checked when they are loaded).
    """
    compiled = Manifest.load(compiled_dir, "compile")
    compiled.checked_output(compiled_dir, MODULE_FILE)
    export_dir = Path(compiled.input("export")["path"])
    exported = Manifest.load(export_dir, "export")
    exported.checked_output(export_dir, MODEL_FILE)
    quantized_dir = Path(exported.input("quantized")["path"])
    return compiled, export_dir, quantized_dir
