"""Stage 5, verify: run the compiled module on a data folder and report what it got right.

Reports top-1 of the float model, of the quantized model (torch fake-quant) and of the
compiled module; the compiled module's top-1 agreement with onnxruntime running the
exported QDQ model; and its latency (median and p90 over N runs) when it ran natively.
arm64 modules run here under qemu-aarch64 with the target's CPU model: the numbers are
checked, the time is not measured.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx

from .. import devices
from ..data import dataset_digest, resolve_dataset
from ..errors import EdgeqError
from ..evaluate import agreement, predict
from ..folders import MODEL_FILE, MODULE_FILE, upstream
from ..manifest import Manifest, claim_output, input_entry, releases_on_failure, staged_folder
from ..qdq import INPUT_NAME, onnxruntime_session
from ..quantized import load as load_quantized
from ..quantized import load_recorded_model
from ..targets import get_target

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"


def _top1(logits: np.ndarray, targets: np.ndarray | None) -> float | None:
    return None if targets is None else float((logits.argmax(1) == targets).mean())


def run_compiled(
    module_path: Path,
    target_name: str,
    inputs: np.ndarray,
    latency_runs: int,
    *,
    rpc: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
) -> tuple[np.ndarray, list[float] | None, str]:
    """Outputs of the module, per-run milliseconds (None when emulated), and where it ran."""
    result = devices.runner_for(get_target(target_name), rpc=rpc, tracker=tracker, key=key).run(
        module_path, inputs, latency_runs
    )
    return result.outputs, result.timings_ms, result.ran


REFERENCE_IMAGES = 100  # the NumPy reference is slow on large models: the first images are enough to catch a wrong bit


def reference_agreement(
    compiled: Manifest, onnx_model: onnx.ModelProto, inputs: np.ndarray, compiled_logits: np.ndarray
) -> dict:
    """How many outputs of the compiled module equal, bit for bit, the NumPy reference of its kernel plan.

    The reference (:func:`edgeq.kernels.reference.run_plan`) computes the plan the module was
    built from, integer accumulators exact and every float operation in the kernels' order, so
    anything but 1.0 is a compiler or kernel defect, on any target; onnxruntime sums in float32
    and rounds differently, which is why its agreement may be lower.
    """
    build = (compiled.extra or {}).get("build", {})
    if build.get("path") != "kernels":
        return {
            "agreement_with_reference": None,
            "reference_images": 0,
            "reference_note": "TVM's generic code has no bit-exact reference; agreement with onnxruntime applies",
        }
    from ..kernels.plan import reference_outputs

    target = get_target(compiled.target)
    count = min(len(inputs), REFERENCE_IMAGES)
    expected = reference_outputs(onnx_model, target.arch, target.cpu_features, inputs[:count], "bit-exact reference")
    ours = compiled_logits[:count].reshape(expected.shape)
    equal = sum(int(np.array_equal(a, b)) for a, b in zip(ours, expected))
    worst = float(np.abs(ours.astype(np.float64) - expected).max()) if count else 0.0
    return {
        "agreement_with_reference": equal / count if count else None,
        "reference_images": count,
        "max_abs_diff_vs_reference": worst,
        "reference_note": "share of outputs equal bit for bit to the NumPy reference of the kernel plan"
        + (
            f"; {len(build['generic'])} node(s) without a kernel run TVM's float code, which onnxruntime stands in "
            "for in the reference, so rounding may lower it"
            if build.get("generic")
            else ""
        ),
    }


def plan(compiled_dir: str | Path, *, data: str, num_images: int, latency_runs: int) -> Manifest:
    compiled = Manifest.load(compiled_dir, "compile")
    return Manifest(
        stage="verify",
        inputs=[input_entry("compiled", compiled_dir), input_entry("data", data, _data_digest(data))],
        params={"num_images": num_images, "latency_runs": latency_runs},
        spec=compiled.spec,
        target=compiled.target,
        seed=compiled.seed,
    )


def _data_digest(data: str) -> str:
    return dataset_digest(data)


@releases_on_failure
def run(
    compiled_dir: str | Path,
    out: str | Path,
    *,
    data: str | None = None,
    num_images: int = 1000,
    latency_runs: int = 100,
    rpc: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
    allow_pickle: bool = False,
    force: bool = False,
) -> dict:
    """Verify a compile folder on ``data`` (default: the calibration folder); returns the report.

    ``rpc`` (HOST:PORT), or ``tracker`` and ``key``, run the module on a board over TVM RPC.
    ``allow_pickle``: the float model is a pickle and the command line allows it. ``force``: replace ``out`` even
    when it is not a verify folder.
    """
    compiled_dir = Path(compiled_dir)
    compiled, export_dir, quantized_dir = upstream(compiled_dir)
    claim_output(out, "verify", inputs=[compiled_dir, export_dir, quantized_dir, data], force=force)
    quantized_model, loaded, spec, quant_manifest = load_quantized(quantized_dir, allow_pickle=allow_pickle)
    data = data or quant_manifest.input("calibration")["path"]
    manifest = plan(compiled_dir, data=data, num_images=num_images, latency_runs=latency_runs)
    images = resolve_dataset(data, num_images, preprocess=loaded.preprocess, classes=loaded.classes)
    if len(images) == 0:
        raise EdgeqError(f"no images in {data}", "pass --data with a non-empty folder or fashion-mnist:test")
    inputs = loaded.preprocess(images.images)
    targets = images.targets

    float_model = load_recorded_model(quant_manifest, allow_pickle=allow_pickle, preprocess=loaded.preprocess).module
    float_logits = predict(float_model, inputs, desc="full precision")
    quant_logits = predict(quantized_model, inputs, desc="fake-quant")
    onnx_model = onnx.load(str(export_dir / MODEL_FILE))
    ort_logits = onnxruntime_session(onnx_model).run(None, {INPUT_NAME: inputs})[0]
    compiled_logits, timings, how = run_compiled(
        compiled_dir / MODULE_FILE, compiled.target, inputs, latency_runs, rpc=rpc, tracker=tracker, key=key
    )

    report = {
        "schema": "edgeq.verify/1",
        "model": loaded.source,
        "target": compiled.target,
        "bits": str(spec),
        "data": data,
        "images": int(len(inputs)),
        "labels": images.label_kind,  # "none": top-1 figures are null, agreement_with_fp is what there is
        "fp_top1": _top1(float_logits, targets),
        "quant_top1": _top1(quant_logits, targets),
        "onnxruntime_top1": _top1(ort_logits, targets),
        "compiled_top1": _top1(compiled_logits, targets),
        "agreement_with_fp": {
            "quantized": agreement(quant_logits, float_logits),
            "compiled": agreement(compiled_logits, float_logits),
        },
        **reference_agreement(compiled, onnx_model, inputs, compiled_logits),
        "agreement_with_onnxruntime": float((compiled_logits.argmax(1) == ort_logits.argmax(1)).mean()),
        "max_abs_diff_vs_onnxruntime": float(np.abs(compiled_logits - ort_logits).max()),
        "ran": how,
        "latency_ms": float(np.median(timings)) if timings else None,
        "latency_p90_ms": float(np.percentile(timings, 90)) if timings else None,
        "latency_runs": len(timings) if timings else 0,
        "latency_note": None
        if timings
        else ("emulated: latency not measured" if how.startswith("qemu") else "latency not requested"),
        "artifact": str((compiled_dir / MODULE_FILE).resolve()),  # absolute: read from anywhere
    }
    manifest.extra = {"report": report}
    with staged_folder(out) as tmp:
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        manifest.write(tmp)
    return report


def load_report(folder: str | Path) -> dict:
    return json.loads((Path(folder) / REPORT_FILE).read_text())
