"""The QDQ ONNX model as edgeq writes and reads it: tensor names, low-bit initializers, and onnxruntime.

The export stage writes the model (:func:`integer_tensor` for its packed INT2/INT4/INT8
weights); verify, bundle and the tests run it with :func:`onnxruntime_session`.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeq.kernels.packing import pack

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_SIGNED = {2: TensorProto.INT2, 4: TensorProto.INT4, 8: TensorProto.INT8}
_UNSIGNED = {2: TensorProto.UINT2, 4: TensorProto.UINT4, 8: TensorProto.UINT8}


def container_bits(bits: int) -> int:
    """The smallest ONNX integer width holding ``bits``-bit values."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def integer_tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> TensorProto:
    """An initializer of ONNX type (U)INT{2,4,8} holding ``values``, packed as ONNX stores them."""
    width = container_bits(bits)
    elem_type = (_SIGNED if signed else _UNSIGNED)[width]
    tensor = TensorProto(name=name, data_type=elem_type, dims=list(values.shape))
    if width < 8:
        tensor.raw_data = pack(values, width)
    else:
        tensor.raw_data = np.asarray(values, dtype=np.int8 if signed else np.uint8).tobytes()
    return tensor


def onnxruntime_session(path_or_model, *, intermediate: list[str] | None = None, threads: int = 1):
    """An onnxruntime CPU session computing the QDQ graph exactly as ONNX specifies it.

    ``intermediate`` adds those float tensors as extra outputs. Graph optimizations are
    off: onnxruntime 1.32's QDQ fusions build QLinearConv nodes on UINT4 inputs, an invalid
    graph it then refuses to run (any 2-bit-weight model), and on W4A4 they requantize in
    fused integer kernels that round differently (0.28 logit units on the built-in model).
    Unfused, onnxruntime matches torch fake-quant to ~1e-6.
    """
    import onnxruntime as ort

    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model))
    if intermediate:
        model = copy.deepcopy(model)
        model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in intermediate)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
