"""Stage 4, compile: a TVM (Relax) module for a target, from an export folder.

Two paths, chosen per model:

* kernels (default when the graph allows): the quantized layers become calls of edgeq's
  bit-packed low-bit C kernels (:mod:`edgeq.kernels.plan`), compiled for the target's
  instruction set and linked into ``module.so`` beside TVM's code;
* generic: the QDQ model is lowered to 8-bit containers plus Clips (see
  :mod:`edgeq.lowering`) and imported with TVM's ONNX frontend.

Both build at batch size 1 for the target's TVM target and link with the target's cross
compiler for arm64.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import onnx

from ..errors import EdgeqError
from ..folders import MODEL_FILE, MODULE_FILE
from ..kernels.toolchain import kernel_toolchain
from ..lowering import lower_low_bit_qdq
from ..manifest import Manifest, claim_output, input_entry, releases_on_failure, staged_folder
from ..targets import Target, get_target

log = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "on", "off")


def build_with_kernels(plan, target: Target, out_path: Path) -> None:
    """Compile a kernel plan (see :mod:`edgeq.kernels.plan`) into ``out_path``."""
    import tempfile

    import tvm
    import tvm_ffi.libinfo

    from edgeq.kernels import relax_module, toolchain

    c_compiler, cxx_compiler, flags = kernel_toolchain(target)
    executable = tvm.compile(relax_module.to_relax(plan), target=target.tvm())
    with tempfile.TemporaryDirectory() as tmp:
        kernel_objects = toolchain.build_object(c_compiler, flags, Path(tmp))
        ffi_obj = Path(tmp) / "edgeq_ffi.o"
        command = [
            cxx_compiler,
            *flags,
            "-std=c++17",
            "-I",
            tvm_ffi.libinfo.find_include_path(),
            "-I",
            str(toolchain.SOURCE_DIR),
            "-c",
            str(toolchain.FFI_SOURCE),
            "-o",
            str(ffi_obj),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise EdgeqError(
                f"compiling the kernel entry points failed: {result.stderr.strip().splitlines()[-1:]}",
                "check the C++ compiler",
            )
        from tvm.support.cc import cross_compiler

        # linked by the C++ driver: the entry points need libstdc++, the kernels libgomp
        fcompile = cross_compiler(cxx_compiler, options=["-fopenmp"])
        executable.export_library(str(out_path), fcompile=fcompile, addons=[*map(str, kernel_objects), str(ffi_obj)])


def build(
    onnx_model: onnx.ModelProto, target: Target, input_name: str, input_shape, out_path: Path, *, kernels: str = "auto"
) -> dict:
    """Build and link ``onnx_model`` for ``target`` into the shared library ``out_path``; returns how (kernels or
    generic)."""
    if kernels not in KERNEL_MODES:
        raise EdgeqError(f"unknown kernel mode {kernels!r}", f"choose one of: {', '.join(KERNEL_MODES)}")
    if kernels != "off":
        from edgeq.kernels import layouts
        from edgeq.kernels import plan as kernel_plan

        try:
            plan = kernel_plan.build_plan(
                onnx_model, layouts.layout_for(target.arch, target.cpu_features), generic=kernels == "auto"
            )
        except kernel_plan.Unsupported as exc:
            if kernels == "on":
                raise EdgeqError(
                    f"the model cannot run on edgeq's kernels: {exc}",
                    "compile with --kernels auto (falls back to TVM's generic code)",
                ) from None
            log.info("low-bit kernels not used (%s); compiling with TVM's generic code", exc)
            reason = str(exc)
        else:
            build_with_kernels(plan, target, out_path)
            summary = plan.summary()
            if summary.get("generic"):
                log.info("on TVM's generic code (no kernel): %s", ", ".join(summary["generic"]))
            return {"path": "kernels"} | summary
    else:
        reason = "disabled (--kernels off)"
    build_generic(onnx_model, target, input_name, input_shape, out_path)
    return {"path": "generic", "reason": reason}


def build_generic(onnx_model: onnx.ModelProto, target: Target, input_name: str, input_shape, out_path: Path) -> None:
    """Lower, import (TVM's ONNX frontend), build and link ``onnx_model``."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    lowered = lower_low_bit_qdq(onnx_model)
    try:
        mod = from_onnx(lowered, shape_dict={input_name: list(input_shape)}, keep_params_in_input=False)
    except Exception as exc:  # noqa: BLE001 - the frontend raises many kinds
        raise EdgeqError(
            f"TVM could not import the ONNX model: {str(exc).splitlines()[0]}",
            "the model uses an operator TVM's ONNX frontend lacks",
        ) from None
    executable = tvm.compile(mod, target=target.tvm())
    if target.cross_compiler:
        if shutil.which(target.cross_compiler) is None:
            raise EdgeqError(
                f"cross compiler {target.cross_compiler} not found",
                "install it: sudo apt-get install gcc-aarch64-linux-gnu",
            )
        from tvm.support.cc import cross_compiler

        executable.export_library(str(out_path), fcompile=cross_compiler(target.cross_compiler))
    else:
        executable.export_library(str(out_path))


def plan(export_dir: str | Path, target: Target, kernels: str = "auto") -> Manifest:
    from edgeq.kernels import toolchain

    source = Manifest.load(export_dir, "export")
    # the kernel sources are part of the fingerprint: a changed kernel means a rebuild
    params = {"batch_size": 1, "kernels": kernels, "kernel_sources": toolchain.source_digest()}
    return Manifest(
        stage="compile",
        inputs=[input_entry("export", export_dir)],
        params=params,
        spec=source.spec,
        target=target.name,
        seed=source.seed,
    )


@releases_on_failure
def run(
    export_dir: str | Path,
    out: str | Path,
    *,
    target: str | Target = "host",
    kernels: str = "auto",
    force: bool = False,
) -> Path:
    """Compile an export folder for ``target`` (default: the best this CPU runs) into ``out/module.so``.

    ``force``: replace ``out`` even when it is not a compile folder."""
    claim_output(out, "compile", inputs=[export_dir], force=force)
    target = get_target(target)
    manifest = plan(export_dir, target, kernels)
    source = Manifest.load(export_dir, "export")
    onnx_model = onnx.load(str(source.checked_output(export_dir, MODEL_FILE)))
    input_info = source.extra["input"]
    log.info("compiling for %s (%s)", target.name, target.description)
    with staged_folder(out) as tmp:
        how = build(onnx_model, target, input_info["name"], input_info["shape"], tmp / MODULE_FILE, kernels=kernels)
        manifest.extra = {"model": source.extra["model"], "input": input_info, "target": target.to_dict(), "build": how}
        manifest.write(tmp)
    log.info("compiled module written to %s", Path(out) / MODULE_FILE)
    return Path(out)
