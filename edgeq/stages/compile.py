"""Stage 4, compile: a TVM (Relax) module for a target, from an export folder.

The QDQ model is lowered to 8-bit containers plus Clips (see :mod:`edgeq.lowering`),
imported with TVM's ONNX frontend at batch size 1, built for the target's TVM target
and linked into ``module.so`` (with the target's cross compiler for arm64).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import onnx

from ..errors import EdgeqError
from ..lowering import lower_low_bit_qdq
from ..manifest import Manifest, input_entry, staged_folder
from ..targets import Target, get_target
from .export import MODEL_FILE

log = logging.getLogger(__name__)

MODULE_FILE = "module.so"


def build(onnx_model: onnx.ModelProto, target: Target, input_name: str, input_shape, out_path: Path) -> None:
    """Lower, import, build and link ``onnx_model`` for ``target`` into the shared library ``out_path``."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    lowered = lower_low_bit_qdq(onnx_model)
    try:
        mod = from_onnx(lowered, shape_dict={input_name: list(input_shape)}, keep_params_in_input=False)
    except Exception as exc:  # noqa: BLE001 - the frontend raises many kinds
        raise EdgeqError(f"TVM could not import the ONNX model: {str(exc).splitlines()[0]}", "the model uses an operator TVM's ONNX frontend lacks") from None
    executable = tvm.compile(mod, target=target.tvm())
    if target.cross_compiler:
        if shutil.which(target.cross_compiler) is None:
            raise EdgeqError(f"cross compiler {target.cross_compiler} not found", "install it: sudo apt-get install gcc-aarch64-linux-gnu")
        from tvm.support.cc import cross_compiler

        executable.export_library(str(out_path), fcompile=cross_compiler(target.cross_compiler))
    else:
        executable.export_library(str(out_path))


def plan(export_dir: str | Path, target: Target) -> Manifest:
    source = Manifest.load(export_dir, "export")
    return Manifest(stage="compile", inputs=[input_entry("export", export_dir)], params={"batch_size": 1}, spec=source.spec,
                    target=target.name, seed=source.seed)


def run(export_dir: str | Path, out: str | Path, *, target: str | Target = "x86") -> Path:
    """Compile an export folder for ``target`` into ``out/module.so``."""
    target = get_target(target)
    manifest = plan(export_dir, target)
    source = Manifest.load(export_dir, "export")
    onnx_model = onnx.load(str(Path(export_dir) / MODEL_FILE))
    input_info = source.extra["input"]
    log.info("compiling for %s (%s)", target.name, target.description)
    with staged_folder(out) as tmp:
        build(onnx_model, target, input_info["name"], input_info["shape"], tmp / MODULE_FILE)
        manifest.extra = {"model": source.extra["model"], "input": input_info, "target": target.to_dict()}
        manifest.write(tmp)
    log.info("compiled module written to %s", Path(out) / MODULE_FILE)
    return Path(out)
