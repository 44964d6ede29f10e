"""Stage 3, export: ONNX with QuantizeLinear/DequantizeLinear in the true low-bit types.

torch's ONNX exporters reject sub-8-bit fake quantization, so the float model (with the
dequantized weights in place) is exported first, and edgeq then writes the QDQ nodes
itself: each quantized Conv/Gemm/MatMul gets its weight as an INT8/INT4/INT2 initializer
behind a per-channel DequantizeLinear, and its input behind a QuantizeLinear ->
DequantizeLinear pair in UINT8/UINT4/UINT2. Layers are matched to ONNX nodes by the
exact bytes of their weights, which survives whatever names the exporter chooses.
Widths with no ONNX type (3, 5, 6, 7 bits) use the next container and a Clip.

Opset 21 is used (INT4/UINT4 QDQ), or 25 when a tensor is 2-bit (INT2/UINT2).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from .. import quant, quantized
from ..data import resolve_dataset
from ..errors import EdgeqError
from ..folders import MODEL_FILE
from ..graph import eval_mode, execution_order
from ..manifest import Manifest, claim_output, input_entry, releases_on_failure, staged_folder
from ..qdq import INPUT_NAME, OUTPUT_NAME, integer_tensor, onnxruntime_session

log = logging.getLogger(__name__)

CHECK_IMAGES = 16
LAYER_TOLERANCE = 1e-4  # float32 rounding of one layer, relative to its output range


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(
        np.ascontiguousarray(array, dtype=np.float32).tobytes() + str(array.shape).encode()
    ).hexdigest()


def _float_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy where each QuantizedLayer is its plain layer holding the dequantized weight,
    and each QuantizedMatMul its plain MatMul."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, quantized.QuantizedLayer):
            inner = module.layer
            inner.weight = torch.nn.Parameter(module.dequantized_weight())
        elif isinstance(module, quantized.QuantizedMatMul):
            inner = module.matmul
        else:
            continue
        parent_name, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(parent_name) if parent_name else twin, leaf, inner)
    return twin


def _torch_onnx(model: torch.nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    buffer = io.BytesIO()
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter prints progress to stdout and warns about its own internals.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for chatty in ("torch.onnx", "onnxscript", "onnx_ir"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
        try:
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                external_data=False,
                optimize=True,
                verbose=False,
            )
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types
            raise EdgeqError(
                f"torch could not export the model to ONNX: {str(exc).splitlines()[0]}",
                "the model must be exportable with torch.export",
            ) from None
        program.save(buffer)
    return onnx.load_from_string(buffer.getvalue())


def build_qdq_model(model: torch.nn.Module, example: torch.Tensor) -> tuple[onnx.ModelProto, list[dict]]:
    """The QDQ ONNX model of a fake-quantized torch model, and what was quantized where.

    Layers are found by the bytes of their weights. Matrix products of two activations
    (QuantizedMatMul) have no weights: they are the MatMul nodes with no initializer input,
    which the exporter writes in execution order, so they are matched in that order.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, quantized.QuantizedLayer)}
    matmuls = quantized.quantized_matmuls(model)
    matmul_order = execution_order(model, list(matmuls), example) if matmuls else []
    needs_2bit = any(min(m.weight_bits, m.act_bits) <= 2 for m in layers.values()) or any(
        m.act_bits <= 2 for m in matmuls.values()
    )
    opset = 25 if needs_2bit else 21
    graph_model = _torch_onnx(eval_mode(_float_twin(model)), example, 21)

    by_digest = {}
    for name, layer in layers.items():
        weight = layer.dequantized_weight().detach().numpy()
        by_digest.setdefault(_digest(weight), []).append((name, False))
        if weight.ndim == 2:
            by_digest.setdefault(_digest(weight.T), []).append((name, True))

    graph = graph_model.graph
    initializers = {init.name: init for init in graph.initializer}
    new_nodes, records, replaced = [], [], set()
    pending_matmuls = list(matmul_order)
    for node in graph.node:
        matched = None
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in initializers:
            candidates = by_digest.get(_digest(numpy_helper.to_array(initializers[node.input[1]])), [])
            matched = next(
                (c for c in candidates if c[0] not in {r["layer"] for r in records}),
                candidates[0] if candidates else None,
            )
        elif node.op_type == "MatMul" and pending_matmuls and not set(node.input[:2]) & set(initializers):
            name = pending_matmuls.pop(0)
            matmul = matmuls[name]
            for index in (0, 1):
                tag = f"edgeq.{name}.in{index}"
                new_nodes.extend(
                    _activation_qdq(
                        node,
                        index,
                        float(matmul.act_scale[index]),
                        int(matmul.act_zero_point[index]),
                        matmul.act_bits,
                        tag,
                        graph,
                    )
                )
                records.append(
                    {
                        "layer": name,
                        "operand": index,
                        "onnx_node": node.name,
                        "op": "MatMul",
                        "act_bits": matmul.act_bits,
                        "act_scale": float(matmul.act_scale[index]),
                        "act_zero_point": int(matmul.act_zero_point[index]),
                    }
                )
            new_nodes.append(node)
            continue
        if matched is None:
            new_nodes.append(node)
            continue
        layer_name, transposed = matched
        layer = layers[layer_name]
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            transposed = not trans_b
        tag = f"edgeq.{layer_name}"
        new_nodes.extend(
            _activation_qdq(node, 0, float(layer.act_scale), int(layer.act_zero_point), layer.act_bits, tag, graph)
        )
        weight_name = node.input[1]
        if weight_name not in replaced:
            codes = layer.weight_int.numpy()
            codes = codes.T if transposed else codes
            axis = 1 if transposed else 0
            graph.initializer.extend(
                [
                    integer_tensor(f"{tag}.weight_q", codes, layer.weight_bits, signed=True),
                    numpy_helper.from_array(layer.weight_scale.numpy().astype(np.float32), f"{tag}.weight_scale"),
                    integer_tensor(
                        f"{tag}.weight_zero_point",
                        layer.weight_zero_point.numpy().astype(np.int8),
                        layer.weight_bits,
                        signed=True,
                    ),
                ]
            )
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{tag}.weight_q", f"{tag}.weight_scale", f"{tag}.weight_zero_point"],
                    [weight_name],
                    name=f"{tag}/weight_dq",
                    axis=axis,
                )
            )
            replaced.add(weight_name)
        new_nodes.append(node)
        records.append(
            {
                "layer": layer_name,
                "onnx_node": node.name,
                "op": node.op_type,
                "weight_bits": layer.weight_bits,
                "act_bits": layer.act_bits,
                "act_scale": float(layer.act_scale),
                "act_zero_point": int(layer.act_zero_point),
            }
        )
    missing = sorted((set(layers) | set(matmuls)) - {r["layer"] for r in records})
    if missing:
        raise EdgeqError(
            f"could not find the ONNX nodes of quantized layers {', '.join(missing)}",
            "the exporter changed these weights; report this model to edgeq",
        )
    kept = [init for init in graph.initializer if init.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph_model.opset_import[:]
    graph_model.opset_import.extend([helper.make_opsetid("", opset)])
    graph_model.producer_name = "edgeq"
    onnx.checker.check_model(graph_model, full_check=True)
    return graph_model, records


def _activation_qdq(node, input_index: int, scale: float, zero_point: int, bits: int, tag: str, graph) -> list:
    """Nodes that fake-quantize ``node``'s input ``input_index``, rewiring the node to their output."""
    qmin, qmax = quant.unsigned_range(bits)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(scale, np.float32), f"{tag}.act_scale"),
            integer_tensor(f"{tag}.act_zero_point", np.array(zero_point), bits, signed=False),
        ]
    )
    source, nodes = node.input[input_index], []
    if bits not in (2, 4, 8):  # no ONNX type: clip to the range, then use the wider container
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array((qmin - zero_point) * scale, np.float32), f"{tag}.act_low"),
                numpy_helper.from_array(np.array((qmax - zero_point) * scale, np.float32), f"{tag}.act_high"),
            ]
        )
        nodes.append(
            helper.make_node(
                "Clip", [source, f"{tag}.act_low", f"{tag}.act_high"], [f"{tag}.act_clipped"], name=f"{tag}/act_clip"
            )
        )
        source = f"{tag}.act_clipped"
    nodes.append(
        helper.make_node(
            "QuantizeLinear",
            [source, f"{tag}.act_scale", f"{tag}.act_zero_point"],
            [f"{tag}.act_q"],
            name=f"{tag}/act_q",
        )
    )
    nodes.append(
        helper.make_node(
            "DequantizeLinear",
            [f"{tag}.act_q", f"{tag}.act_scale", f"{tag}.act_zero_point"],
            [f"{tag}.act_dq"],
            name=f"{tag}/act_dq",
        )
    )
    node.input[input_index] = f"{tag}.act_dq"
    return nodes


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
