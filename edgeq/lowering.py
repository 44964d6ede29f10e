"""Lowering low-bit QDQ ONNX models to what TVM's ONNX importer accepts.

TVM 0.27 rejects 2- and 4-bit tensors ("TensorCopyFromBytes: size mismatch",
"Unsupported output datatype uint4"). The same numbers are kept by widening every
(U)INT2/(U)INT4 tensor to (U)INT8 and following each widened QuantizeLinear with a Clip
to the original range: QuantizeLinear saturates to its output type, so widening alone
would let codes beyond the low-bit range through (errors up to 8.8 on real models).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.kernels.packing import unpack

# low-bit type -> (bits, signed, widened type)
LOW_BIT_TYPES = {
    TensorProto.INT2: (2, True, TensorProto.INT8),
    TensorProto.UINT2: (2, False, TensorProto.UINT8),
    TensorProto.INT4: (4, True, TensorProto.INT8),
    TensorProto.UINT4: (4, False, TensorProto.UINT8),
}
TARGET_OPSET = 21


def widen(tensor: TensorProto) -> TensorProto:
    bits, signed, wide_type = LOW_BIT_TYPES[tensor.data_type]
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    values = unpack(tensor.raw_data, bits, count, signed).reshape(tuple(tensor.dims))
    return numpy_helper.from_array(values.astype(np.int8 if signed else np.uint8), tensor.name)


def lower_low_bit_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with 8-bit containers and Clips in place of 2/4-bit types."""
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    graph = lowered.graph
    ranges = {}  # widened zero-point name -> (qmin, qmax, signed)
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type in LOW_BIT_TYPES:
            bits, signed, _ = LOW_BIT_TYPES[tensor.data_type]
            ranges[tensor.name] = (
                (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, signed) if signed else (0, 2**bits - 1, signed)
            )
            graph.initializer[index].CopyFrom(widen(tensor))
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in ranges:
            qmin, qmax, signed = ranges[node.input[2]]
            dtype = np.int8 if signed else np.uint8
            output = node.output[0]
            node.output[0] = f"{output}.unclipped"
            graph.initializer.extend(
                [
                    numpy_helper.from_array(np.array(qmin, dtype), f"{output}.qmin"),
                    numpy_helper.from_array(np.array(qmax, dtype), f"{output}.qmax"),
                ]
            )
            nodes.append(
                helper.make_node(
                    "Clip", [node.output[0], f"{output}.qmin", f"{output}.qmax"], [output], name=f"{node.name}/clip"
                )
            )
    del graph.node[:]
    graph.node.extend(nodes)
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        kind = value.type.tensor_type
        if kind.elem_type in LOW_BIT_TYPES:
            kind.elem_type = LOW_BIT_TYPES[kind.elem_type][2]
    del lowered.opset_import[:]
    lowered.opset_import.extend([helper.make_opsetid("", TARGET_OPSET)])
    onnx.checker.check_model(lowered)
    return lowered
