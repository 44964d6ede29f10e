"""Stage 3, export: ONNX with QuantizeLinear/DequantizeLinear in the true low-bit types.

The graph comes from :func:`edgeq.qdq_model.build_qdq_model` (the float model exported by
torch, then the QDQ nodes written by edgeq; its docstring says how). This stage checks the
graph against the fake-quantized model on calibration images, layer by layer and at the
output, through onnxruntime, and writes the folder with its manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from .. import quant, quantized
from ..data import resolve_dataset
from ..errors import EdgeqError
from ..folders import MODEL_FILE
from ..manifest import Manifest, claim_output, input_entry, releases_on_failure, staged_folder
from ..qdq import INPUT_NAME, onnxruntime_session
from ..qdq_model import build_qdq_model

log = logging.getLogger(__name__)

CHECK_IMAGES = 16
LAYER_TOLERANCE = 1e-4  # float32 rounding of one layer, relative to its output range


@torch.no_grad()
def compare_with_onnxruntime(
    model: torch.nn.Module, onnx_model: onnx.ModelProto, records: list[dict], inputs: np.ndarray
) -> dict:
    """How onnxruntime running the QDQ graph compares with torch fake-quant.

    Layer by layer, on onnxruntime's own tensors, so float rounding upstream cannot hide
    or fake a difference:

    * ``quantizer_max_lsb``: each QuantizeLinear/DequantizeLinear pair against
      :func:`edgeq.quant.fake_quantize` on the same float input, in steps (expect 0);
    * ``layer_max_rel_error``: each quantized Conv/Gemm/MatMul against the torch layer fed
      the same dequantized input, relative to the output's range (float rounding only).

    End to end: the largest code difference of any activation and the fraction of codes
    that differ (one-LSB flips at rounding ties grow through later layers of deep
    networks), the largest logit difference, and top-1 agreement.
    """
    layers = dict(model.named_modules())
    operand_records = [r for r in records if "operand" in r]
    records = [r for r in records if "operand" not in r]
    nodes = {node.name: node for node in onnx_model.graph.node}
    quant_inputs = {node.output[0]: node.input[0] for node in onnx_model.graph.node if node.op_type == "QuantizeLinear"}
    dq_names = [f"edgeq.{r['layer']}.act_dq" for r in records]
    pre_names = [quant_inputs[f"edgeq.{r['layer']}.act_q"] for r in records]
    out_names = [nodes[r["onnx_node"]].output[0] for r in records]
    operand_dq = [f"edgeq.{r['layer']}.in{r['operand']}.act_dq" for r in operand_records]
    operand_pre = [quant_inputs[f"edgeq.{r['layer']}.in{r['operand']}.act_q"] for r in operand_records]
    wanted = list(dict.fromkeys(dq_names + pre_names + out_names + operand_dq + operand_pre))
    session = onnxruntime_session(onnx_model, intermediate=wanted)
    ort_outputs = session.run(None, {INPUT_NAME: inputs})
    ort_logits, ort = ort_outputs[0], dict(zip(wanted, ort_outputs[1:]))

    torch_acts = {}
    hooks = [
        layers[r["layer"]].layer.register_forward_pre_hook(
            lambda _m, args, key=name: torch_acts.__setitem__(key, args[0].numpy().copy())
        )
        for r, name in zip(records, dq_names)
    ]
    try:
        torch_logits = model(torch.from_numpy(inputs)).numpy()
    finally:
        for hook in hooks:
            hook.remove()

    quantizer_lsb, layer_error, worst_lsb, differing, total = 0.0, 0.0, 0.0, 0, 0
    for record, dq, pre, out in zip(records, dq_names, pre_names, out_names):
        layer = layers[record["layer"]]
        scale = record["act_scale"]
        local = quant.fake_quantize(
            torch.from_numpy(ort[pre]), scale, record["act_zero_point"], *layer.act_range
        ).numpy()
        quantizer_lsb = max(quantizer_lsb, float(np.rint(np.abs(local - ort[dq]) / scale).max()))
        params = {"weight": layer.dequantized_weight()}
        if layer.layer.bias is not None:  # a MatMul's bias is a separate Add node, after the output compared here
            params["bias"] = None if record["op"] == "MatMul" else layer.layer.bias
        expected = torch.func.functional_call(layer.layer, params, (torch.from_numpy(ort[dq]),)).numpy()
        layer_error = max(layer_error, float(np.abs(expected - ort[out]).max() / max(np.abs(ort[out]).max(), 1e-12)))
        steps = np.rint(np.abs(ort[dq] - torch_acts[dq]) / scale)  # both sides sit on the grid
        worst_lsb = max(worst_lsb, float(steps.max()))
        differing += int((steps > 0).sum())
        total += steps.size
    for record, dq, pre in zip(operand_records, operand_dq, operand_pre):
        local = quant.fake_quantize(
            torch.from_numpy(ort[pre]),
            record["act_scale"],
            record["act_zero_point"],
            *quant.unsigned_range(record["act_bits"]),
        ).numpy()
        quantizer_lsb = max(quantizer_lsb, float(np.rint(np.abs(local - ort[dq]) / record["act_scale"]).max()))
    return {
        "images": int(len(inputs)),
        "quantizer_max_lsb": quantizer_lsb,
        "layer_max_rel_error": layer_error,
        "activation_max_lsb": worst_lsb,
        "activation_fraction_differing": differing / max(total, 1),
        "logits_max_abs_diff": float(np.abs(ort_logits - torch_logits).max()),
        "top1_agreement": float((ort_logits.argmax(1) == torch_logits.argmax(1)).mean()),
    }


def plan(quantized_dir: str | Path) -> Manifest:
    source = Manifest.load(quantized_dir, "quantize")
    return Manifest(
        stage="export",
        inputs=[input_entry("quantized", quantized_dir)],
        params={"check_images": CHECK_IMAGES},
        spec=source.spec,
        seed=source.seed,
    )


@releases_on_failure
def run(quantized_dir: str | Path, out: str | Path, *, allow_pickle: bool = False, force: bool = False) -> Path:
    """Export a quantize folder to ``out/model.onnx`` and check it against onnxruntime.

    ``allow_pickle``: the float model is a pickle and the command line allows it. ``force``: replace ``out`` even
    when it is not an export folder."""
    claim_output(out, "export", inputs=[quantized_dir], force=force)
    manifest = plan(quantized_dir)
    model, loaded, spec, source = quantized.load(quantized_dir, allow_pickle=allow_pickle)
    images = resolve_dataset(source.input("calibration")["path"], CHECK_IMAGES, preprocess=loaded.preprocess)
    inputs = loaded.preprocess(images.images)
    log.info(
        "exporting %s at %s to QDQ ONNX, checked against onnxruntime on %d images", loaded.source, spec, len(inputs)
    )
    example = torch.from_numpy(inputs[:2])
    onnx_model, records = build_qdq_model(model, example)
    check = compare_with_onnxruntime(model, onnx_model, records, inputs)
    log.info(
        "onnxruntime vs torch: quantizers within %.0f LSB, layers within %.1e relative, "
        "%.3f%% of activation codes differ end to end",
        check["quantizer_max_lsb"],
        check["layer_max_rel_error"],
        100 * check["activation_fraction_differing"],
    )
    if check["quantizer_max_lsb"] > 1 or check["layer_max_rel_error"] > LAYER_TOLERANCE:
        raise EdgeqError(
            f"onnxruntime disagrees with torch "
            f"(quantizers {check['quantizer_max_lsb']:.0f} LSB, layers {check['layer_max_rel_error']:.1e})",
            "this is a bug in edgeq's exporter; please report it",
        )
    manifest.extra = {
        "model": source.extra["model"],
        "layers": records,
        "opset": onnx_model.opset_import[0].version,
        "input": {"name": INPUT_NAME, "shape": list(loaded.preprocess.input_shape)},
        "onnxruntime_check": check,
    }
    with staged_folder(out) as tmp:
        onnx.save(onnx_model, str(tmp / MODEL_FILE))
        manifest.write(tmp)
    log.info("ONNX model written to %s", Path(out) / MODEL_FILE)
    return Path(out)
