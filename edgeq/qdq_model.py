"""The QDQ ONNX model of a fake-quantized torch model (what the export stage writes).

torch's ONNX exporters reject sub-8-bit fake quantization, so the float model (with the
dequantized weights in place) is exported first, and edgeq then writes the QDQ nodes
itself: each quantized Conv/Gemm/MatMul gets its weight as an INT8/INT4/INT2 initializer
behind a per-channel DequantizeLinear, and its input behind a QuantizeLinear ->
DequantizeLinear pair in UINT8/UINT4/UINT2. Layers are matched to ONNX nodes by the
exact bytes of their weights, which survives whatever names the exporter chooses.
Widths with no ONNX type (3, 5, 6, 7 bits) use the next container and a Clip.
Opset 21 is used (INT4/UINT4 QDQ), or 25 when a tensor is 2-bit (INT2/UINT2).

A library module, so that what prices a layer on the kernels (edgeq.layer_costs) builds
the same graph as the export stage without depending on the stage.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import warnings

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from . import quant, quantized
from .errors import EdgeqError
from .graph import eval_mode, execution_order
from .qdq import INPUT_NAME, OUTPUT_NAME, integer_tensor

log = logging.getLogger(__name__)


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
