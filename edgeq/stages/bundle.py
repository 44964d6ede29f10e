"""Deploy bundles: everything a board needs to run a compiled model, and to check it runs right.

A bundle folder holds the compiled ``module.so``; ``runner.py`` (run the module on .npy
inputs, time it), ``selftest.py`` and ``rpc_server.py``, which need only NumPy and the
TVM runtime (no torch, no edgeq); ``preprocess.json`` (input shape, normalization, class
names); a few inputs with the outputs onnxruntime gives for them on the exported model
(``selftest/``); a README; and a manifest. ``tar=True`` also writes ``<folder>.tar.gz``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import uuid
from pathlib import Path

import numpy as np
import onnx

from ..data import resolve_dataset
from ..errors import EdgeqError
from ..folders import MODEL_FILE, MODULE_FILE, upstream
from ..manifest import Manifest, claim_output, input_entry, releases_on_failure, staged_folder
from ..qdq import INPUT_NAME, onnxruntime_session
from ..quantized import load as load_quantized
from ..runtime import runner
from ..targets import get_target

log = logging.getLogger(__name__)

RUNTIME_DIR = Path(runner.__file__).resolve().parent
BOARD_SCRIPTS = ("runner.py", "selftest.py", "rpc_server.py")

# Agreement a board must reach: the same argmax everywhere, and for a module built on the
# kernels the reference's exact bits; for TVM's generic code, outputs within 5% of the logit
# scale of onnxruntime's (a float reference that rounds differently).
MIN_TOP1_AGREEMENT = 1.0
RELATIVE_TOLERANCE = 0.05

README = """# edgeq bundle: {model} at {bits} for {target}

{description}

Files: `module.so` (the compiled model), `runner.py`, `selftest.py`, `rpc_server.py`
(NumPy and the TVM runtime only), `preprocess.json`, `selftest/` (inputs and expected
outputs), `manifest.json`.

## Install on the board

    python3 -m venv ~/edgeq && . ~/edgeq/bin/activate
    pip install numpy apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1

## Self-test

    python selftest.py          # PASS/FAIL, exit code 0/1

## Run

    python runner.py module.so inputs.npy outputs.npy --latency-runs 100 --timings timings.json

`inputs.npy` is float32 (N, {channels}, {height}, {width}), normalized as `preprocess.json`
says: pixel / 255, minus `mean`, divided by `std`, per channel. Or give images, which
`runner.py` resizes, crops and normalizes as edgeq did on the host (decoding image files
needs Pillow; a uint8 (N, H, W, C) .npy does not):

    python runner.py module.so photo1.jpg photos/ outputs.npy --preprocess preprocess.json

## Verify from a workstation over RPC

    python rpc_server.py --host 127.0.0.1 --port 9090            # on the board
    ssh -N -L 9090:localhost:9090 user@board                        # on the workstation
    edgeq verify COMPILED_FOLDER --rpc 127.0.0.1:9090 -o verified/  # on the workstation

The RPC protocol has no authentication: keep the server on localhost and use the tunnel.
"""


@releases_on_failure
def run(
    compiled_dir: str | Path,
    out: str | Path,
    *,
    data: str | None = None,
    num_samples: int = 8,
    tar: bool = False,
    allow_pickle: bool = False,
    force: bool = False,
) -> Path:
    """Write a bundle folder for ``compiled_dir`` (and ``<out>.tar.gz`` when ``tar``).

    ``allow_pickle``: the float model is a pickle and the command line allows it. ``force``: replace ``out`` even
    when it is not a bundle folder."""
    compiled_dir, out = Path(compiled_dir), Path(out)
    compiled, export_dir, quantized_dir = upstream(compiled_dir)
    claim_output(out, "bundle", inputs=[compiled_dir, export_dir, quantized_dir, data], force=force)
    archive = out.parent / f"{out.name}.tar.gz"
    if tar and archive.exists() and not archive.is_file():
        raise EdgeqError(f"{archive} is a folder, so the bundle archive cannot be written there", "choose another -o")
    _, loaded, spec, quant_manifest = load_quantized(quantized_dir, allow_pickle=allow_pickle)
    data = data or quant_manifest.input("calibration")["path"]
    images = resolve_dataset(data, num_samples, preprocess=loaded.preprocess)
    if len(images) == 0:
        raise EdgeqError(f"no images in {data}", "pass --data with a non-empty folder or fashion-mnist:test")
    inputs = loaded.preprocess(images.images).astype(np.float32)
    onnx_model = onnx.load(str(export_dir / MODEL_FILE))
    target = get_target(compiled.target)
    build = (compiled.extra or {}).get("build", {})
    if build.get("path") == "kernels":
        # the board must compute the reference's bits: any difference is a fault of the module or the board
        from ..kernels.plan import reference_outputs

        expected = reference_outputs(onnx_model, target.arch, target.cpu_features, inputs)
        max_abs_diff, expected_from = 0.0, "the bit-exact NumPy reference of the kernel plan"
        if build.get("generic"):  # TVM's float code for those nodes rounds as it will, not as onnxruntime does
            max_abs_diff = float(RELATIVE_TOLERANCE * max(1.0, float(np.abs(expected).max())))
            expected_from = (
                f"the NumPy reference of the kernel plan, its {len(build['generic'])} node(s) without a kernel "
                "computed by onnxruntime"
            )
    else:
        expected = onnxruntime_session(onnx_model).run(None, {INPUT_NAME: inputs})[0]
        max_abs_diff = float(RELATIVE_TOLERANCE * max(1.0, float(np.abs(expected).max())))
        expected_from = "onnxruntime on the exported model (TVM's generic code has no bit-exact reference)"
    manifest = Manifest(
        stage="bundle",
        inputs=[input_entry("compiled", compiled_dir)],
        params={"num_samples": num_samples, "data": data},
        spec=compiled.spec,
        target=compiled.target,
        seed=compiled.seed,
    )
    with staged_folder(out) as tmp:
        shutil.copy2(compiled_dir / MODULE_FILE, tmp / MODULE_FILE)
        for script in BOARD_SCRIPTS:  # copied, not imported: selftest.py imports runner.py from its own folder
            shutil.copy2(RUNTIME_DIR / script, tmp / script)
        (tmp / "selftest").mkdir()
        np.save(tmp / "selftest" / "inputs.npy", inputs)
        np.save(tmp / "selftest" / "expected.npy", expected)
        check = {
            "module": MODULE_FILE,
            "inputs": "selftest/inputs.npy",
            "expected": "selftest/expected.npy",
            "min_top1_agreement": MIN_TOP1_AGREEMENT,
            "max_abs_diff": max_abs_diff,
            "expected_from": expected_from,
        }
        (tmp / "selftest.json").write_text(json.dumps(check, indent=2) + "\n")
        preprocess = {
            "input_name": INPUT_NAME,
            "input_shape": list(loaded.preprocess.input_shape),
            **loaded.preprocess.to_dict(),
            "scale": "(x - 255 mean) / (255 std) on 0..255 pixels, per channel"
            if loaded.preprocess.scaling == "byte"
            else "pixel / 255, then (x - mean) / std per channel",
            "geometry": "shorter side resized to int(max(height, width) / crop_pct) (Pillow's filter named by "
            "interpolation), then the center height x width cropped"
            if loaded.preprocess.crop_pct is not None
            else "resized to height x width (Pillow's filter named by interpolation)",
            "classes": list(loaded.classes),
        }
        (tmp / "preprocess.json").write_text(json.dumps(preprocess, indent=2) + "\n")
        (tmp / "README.md").write_text(
            README.format(
                model=loaded.source,
                bits=str(spec),
                target=target.name,
                description=target.description,
                channels=loaded.preprocess.channels,
                height=loaded.preprocess.height,
                width=loaded.preprocess.width,
            )
        )
        manifest.extra = {
            "model": loaded.source,
            "bits": str(spec),
            "target": target.to_dict(),
            "files": sorted(p.name for p in tmp.iterdir()),
        }
        manifest.write(tmp)
    if tar:
        archive = out.parent / f"{out.name}.tar.gz"
        partial = out.parent / f".{out.name}.tar.gz.partial-{uuid.uuid4().hex[:8]}"
        try:
            with tarfile.open(partial, "w:gz") as packed:
                packed.add(out, arcname=out.name)
            os.replace(partial, archive)
        finally:
            partial.unlink(missing_ok=True)
        log.info("bundle archive written to %s", archive)
    log.info("bundle written to %s", out)
    return out
