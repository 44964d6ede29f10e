"""From an exported QDQ model to a plan of edgeq kernel calls.

The QDQ graph quantizes each layer's input (QuantizeLinear -> DequantizeLinear) and runs
the layer in float on dequantized weights. The plan runs the same arithmetic in integers:

    Q(x) -> DQ -> Conv/Gemm(DQ(w)) [-> Add(residual)] [-> Relu/Clip]    becomes one
    kernel call on activation codes (NHWC, one per byte) and bit-packed weights, with the
    scale, bias, residual and clamp fused into its epilogue (:mod:`.fusion`); when the only
    consumer is the next layer's QuantizeLinear, the epilogue writes that layer's codes
    directly and the float tensor is never materialized.

Tensors between kernels are NHWC. What stays float (residual stream, pooling, a
transformer's layer norm, softmax, GELU and attention) runs in small C operators of the
same library. A node outside this set raises :class:`Unsupported`, or, when the plan is built
with ``generic=True`` (the compile stage's ``--kernels auto``), becomes a ``generic`` step: the
node alone as a small ONNX model that TVM's importer compiles into the same module. Graphs the
plan cannot take at all still raise, and the compile stage falls back to TVM's ONNX importer.

A plan is executed three ways, each in its own module: :mod:`.relax_module` emits the
Relax module that the compile stage builds, :mod:`.execute` calls the C library through
ctypes (tests, profiling), and :func:`edgeq.kernels.reference.run_plan` computes it in
NumPy, bit for bit as the kernels do.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx
from onnx import numpy_helper

from . import layouts, reference
from .fusion import INF, compose_copies, fuse

log = logging.getLogger(__name__)

# Activation zero-point types the kernels take (unsigned codes); value = largest code
UNSIGNED_ACTIVATIONS = {onnx.TensorProto.UINT8: 255, onnx.TensorProto.UINT4: 15, onnx.TensorProto.UINT2: 3}


# The opset of a generic step's small model: the one the compile stage gives TVM's ONNX importer
GENERIC_OPSET = 21
# edgeq_matmul_codes sums k products of two factors within +-255 in int32
MATMUL_CODES_MAX_K = 32768


class Unsupported(Exception):
    """The graph uses something the kernel plan does not cover (the message says what)."""


@dataclasses.dataclass
class Value:
    """A tensor of the plan: float or codes, NHWC (or rows x channels for dense layers)."""

    name: str
    kind: str  # "float" | "codes" | "input" | "constant"
    shape: tuple[int, ...]  # nhwc: (h, w, c); plain: the ONNX shape, batch 1 (the graph input is plain NCHW)
    scale: float = 1.0
    zero: int = 0
    qmax: int = 255
    layout: str = "nhwc"  # "nhwc" (feature maps of the convolution kernels) | "plain" (row-major in ONNX's order)


@dataclasses.dataclass
class Step:
    """One kernel call. ``inputs`` name plan values; ``params`` are its constants."""

    kernel: str
    inputs: list[str]
    output: str
    params: dict
    out_kind: str = "float"


@dataclasses.dataclass
class Plan:
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    output_shape: tuple[int, ...]
    steps: list[Step]
    values: dict[str, Value]
    layout: layouts.Layout

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        generic = [step.params["node"] for step in self.steps if step.kernel == "generic"]
        weight_layouts: dict[str, int] = {}  # which microkernel each convolution and dense layer runs on
        names = {layout.id: name for name, layout in layouts.LAYOUTS.items()}
        for step in self.steps:
            counts[step.kernel] = counts.get(step.kernel, 0) + 1
            packed = step.params.get("packed")
            if isinstance(packed, layouts.PackedWeights) and packed.layout >= 0:
                name = names[packed.layout] + (" winograd" if step.params.get("winograd") else "")
                weight_layouts[name] = weight_layouts.get(name, 0) + 1
        return {
            "layout": self.layout.name,
            "steps": len(self.steps),
            "kernels": counts,
            "weight_layouts": weight_layouts,
            **({"generic": generic} if generic else {}),
        }


def _attributes(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _scalar(array: np.ndarray, what: str) -> float:
    if array.size != 1:
        raise Unsupported(f"{what} is per-channel; the kernels take per-tensor activation quantization")
    return float(array.reshape(-1)[0])


class _Planner:
    def __init__(self, model: onnx.ModelProto, layout: layouts.Layout, generic: bool = False, winograd: bool = True):
        from ..lowering import LOW_BIT_TYPES, widen

        self.layout = layout
        self.winograd = winograd
        self.opsets = list(model.opset_import)
        self.generic = generic  # nodes without a kernel become generic steps instead of failing the plan
        self.graph = model.graph
        self.initializers = {}
        self.types = {}
        for tensor in self.graph.initializer:
            self.types[tensor.name] = tensor.data_type
            self.initializers[tensor.name] = numpy_helper.to_array(
                widen(tensor) if tensor.data_type in LOW_BIT_TYPES else tensor
            )
        self.values: dict[str, Value] = {}
        self.weights: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # name -> (codes, scale, zero)
        self.weight_axes: dict[str, int | None] = {}  # DQ output -> its per-channel axis (None: per tensor)
        self.dequantized: dict[str, str] = {}  # DQ output -> codes value
        self.steps: list[Step] = []

    def const(self, name: str) -> np.ndarray:
        if name not in self.initializers:
            raise Unsupported(f"{name} is computed at run time; the kernels need it constant")
        return self.initializers[name]

    def plan(self) -> Plan:
        if len(self.graph.input) != 1 or len(self.graph.output) != 1:
            raise Unsupported("the kernels take models with one input and one output")
        graph_input = self.graph.input[0]
        dims = tuple(d.dim_value or 1 for d in graph_input.type.tensor_type.shape.dim)
        if len(dims) != 4:
            raise Unsupported(f"input {graph_input.name} has shape {dims}, not NCHW")
        self.values[graph_input.name] = Value(graph_input.name, "input", dims, layout="plain")
        for node in self.graph.node:
            if self._fold(node):
                continue
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None or node.domain not in ("", "ai.onnx"):
                self._generic(node, f"operator {node.op_type} ({node.name}) has no kernel")
                continue
            steps, values = len(self.steps), dict(self.values)
            try:
                handler(node, _attributes(node))
            except Unsupported as exc:
                # what the handler planned before it gave up is dropped; the node runs as generic code instead
                del self.steps[steps:]
                self.values = values
                self._generic(node, str(exc))
        output = self.graph.output[0].name
        value = self.values.get(output)
        output_shape = tuple(d.dim_value or 1 for d in self.graph.output[0].type.tensor_type.shape.dim)
        if value is None or value.kind != "float" or int(np.prod(value.shape)) != int(np.prod(output_shape)):
            raise Unsupported("the model output must be a float tensor computed by the plan")
        if value.layout == "nhwc" and value.shape[:2] != (1, 1):
            raise Unsupported("the model output is a feature map (NHWC inside the plan, NCHW outside)")
        plan = Plan(graph_input.name, dims, output, output_shape, self.steps, self.values, self.layout)
        compose_copies(plan)
        fuse(plan)
        prove_fast_requantization(plan)
        return plan

    def _fold(self, node) -> bool:
        """Shape arithmetic on constants (exporters emit it for flatten/view): evaluate it now, at batch size 1."""
        if node.op_type == "Shape" and node.input[0] in self.values:
            value = self.values[node.input[0]]
            dims = value.shape if value.layout == "plain" else (1, value.shape[2], value.shape[0], value.shape[1])
            attrs = _attributes(node)
            start, end = attrs.get("start", 0), attrs.get("end", len(dims))
            self.initializers[node.output[0]] = np.array(dims[start:end], np.int64)
            return True
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or not all(
            not name or name in self.initializers for name in node.input
        ):
            return False
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(node)
        results = evaluator.run(None, {name: self.initializers[name] for name in node.input if name})
        for name, result in zip(node.output, results):
            self.initializers[name] = np.asarray(result)
        return True

    # -- quantization ------------------------------------------------------------------
    # -- nodes without a kernel ------------------------------------------------------------
    def _generic(self, node, reason: str) -> None:
        """Plan ``node`` as a ``generic`` step: the node alone as an ONNX model over float tensors, which the
        compiled module runs as TVM-generated code and the references run in onnxruntime. Feature maps
        cross its boundary NHWC (transposed inside the small model), so the kernels around it are unchanged."""
        if not self.generic or node.op_type in ("QuantizeLinear", "DequantizeLinear") or len(node.output) != 1:
            raise Unsupported(reason)
        from onnx import TensorProto, helper

        graph_inputs, initializers, nodes, operands = [], [], [], []
        inner = []
        for index, name in enumerate(node.input):
            if not name:
                inner.append("")
                continue
            if name in self.weights:  # dequantized weights: the float values onnxruntime would compute
                codes, scale, zero = self.weights[name]
                axis = self.weight_axes[name]
                shape = (-1,) + (1,) * (codes.ndim - 1) if axis == 0 else (1, -1) if axis == 1 else (1,) * codes.ndim
                array = ((codes - zero.reshape(shape)) * scale.reshape(shape)).astype(np.float32)
                initializers.append(numpy_helper.from_array(array, f"const{index}"))
                inner.append(f"const{index}")
                continue
            if name in self.initializers and name not in self.values:
                initializers.append(numpy_helper.from_array(np.asarray(self.initializers[name]), f"const{index}"))
                inner.append(f"const{index}")
                continue
            value = self._operand(name, node)
            operands.append(value)
            outer = f"in{len(operands) - 1}"
            if value.layout == "nhwc":
                h, w, c = value.shape
                graph_inputs.append(helper.make_tensor_value_info(outer, TensorProto.FLOAT, [1, h, w, c]))
                nodes.append(helper.make_node("Transpose", [outer], [f"{outer}/nchw"], perm=[0, 3, 1, 2]))
                inner.append(f"{outer}/nchw")
            else:
                graph_inputs.append(helper.make_tensor_value_info(outer, TensorProto.FLOAT, list(value.shape)))
                inner.append(outer)
        copied = onnx.NodeProto()
        copied.CopyFrom(node)
        copied.input[:] = inner
        copied.output[:] = ["result"]
        nodes.append(copied)
        opsets = [opset for opset in self.opsets if opset.domain not in ("", "ai.onnx")]
        probe = helper.make_model(
            helper.make_graph(
                nodes,
                "generic",
                graph_inputs,
                [helper.make_tensor_value_info("result", TensorProto.FLOAT, None)],
                initializers,
            ),
            opset_imports=[helper.make_opsetid("", GENERIC_OPSET), *opsets],
        )
        zeros = [np.zeros(_outer_shape(v), np.float32) for v in operands]
        try:  # the output's shape at batch size 1, from onnxruntime itself
            shape = tuple(int(d) for d in run_generic(probe.SerializeToString(), zeros, keep=False).shape)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises many kinds
            problem = str(exc).splitlines()[0]
            raise Unsupported(f"{reason}; onnxruntime cannot run it alone either ({problem})") from None
        result = helper.make_tensor_value_info("result", TensorProto.FLOAT, list(shape))
        feature_map = len(shape) == 4 and shape[0] == 1
        if feature_map:  # kept NHWC, as the kernels' feature maps are
            nodes.append(helper.make_node("Transpose", ["result"], ["result/nhwc"], perm=[0, 2, 3, 1]))
            _, c, h, w = shape
            result = helper.make_tensor_value_info("result/nhwc", TensorProto.FLOAT, [1, h, w, c])
        model = helper.make_model(
            helper.make_graph(nodes, "generic", graph_inputs, [result], initializers),
            opset_imports=[helper.make_opsetid("", GENERIC_OPSET), *opsets],
        )
        output = node.output[0]
        if feature_map:
            self.values[output] = Value(output, "float", (shape[2], shape[3], shape[1]), layout="nhwc")
        else:
            self.values[output] = Value(output, "float", shape, layout="plain")
        log.info("no kernel for %s %s (%s): TVM's generic code runs it", node.op_type, node.name, reason)
        self.steps.append(
            Step(
                "generic",
                [v.name for v in operands],
                output,
                {"model": model.SerializeToString(), "node": f"{node.op_type} {node.name}".strip(), "reason": reason},
            )
        )

    def op_QuantizeLinear(self, node, attrs):
        source = self.values.get(node.input[0])
        if source is None or source.kind == "codes":
            raise Unsupported(f"QuantizeLinear {node.name} of an unplanned tensor")
        scale = _scalar(self.const(node.input[1]), f"{node.name} scale")
        zero_type = self.types.get(node.input[2]) if len(node.input) > 2 else onnx.TensorProto.UINT8
        if zero_type not in UNSIGNED_ACTIVATIONS:
            raise Unsupported(f"{node.name} quantizes to signed codes")
        zero = int(_scalar(self.const(node.input[2]), f"{node.name} zero point")) if len(node.input) > 2 else 0
        qmax = UNSIGNED_ACTIVATIONS[zero_type]
        if source.kind == "input":
            _, c, h, w = source.shape
            shape, nchw, layout = (h, w, c), 1, "nhwc"
        else:
            shape, nchw, layout = source.shape, 0, source.layout
        self.values[node.output[0]] = Value(node.output[0], "codes", shape, scale, zero, qmax, layout)
        self.steps.append(
            Step(
                "quantize",
                [source.name],
                node.output[0],
                {"nchw": nchw, "scale": scale, "zero": zero, "qmax": qmax},
                "codes",
            )
        )

    def op_DequantizeLinear(self, node, attrs):
        if node.input[0] in self.initializers:
            codes = self.const(node.input[0]).astype(np.int32)
            scale = self.const(node.input[1]).astype(np.float32)
            zero = self.const(node.input[2]).astype(np.int32) if len(node.input) > 2 else np.zeros_like(scale, np.int32)
            axis = attrs.get("axis", 1) % codes.ndim if scale.size > 1 else None
            if axis not in (None, 0) and not (axis == 1 and codes.ndim == 2):
                raise Unsupported(f"{node.name}: weights must be quantized per output channel")
            self.weights[node.output[0]] = (codes, scale.reshape(-1), zero.reshape(-1))
            self.weight_axes[node.output[0]] = axis
            return
        source = self.values.get(node.input[0])
        if source is None or source.kind != "codes":
            raise Unsupported(f"DequantizeLinear {node.name} of an unplanned tensor")
        scale = _scalar(self.const(node.input[1]), f"{node.name} scale")
        zero = int(_scalar(self.const(node.input[2]), f"{node.name} zero point")) if len(node.input) > 2 else 0
        if not math.isclose(scale, source.scale, rel_tol=1e-7) or zero != source.zero:
            raise Unsupported(f"{node.name} dequantizes with parameters other than its QuantizeLinear's")
        self.dequantized[node.output[0]] = source.name

    # -- layers --------------------------------------------------------------------------
    def _layer_inputs(self, node):
        if node.input[0] not in self.dequantized or node.input[1] not in self.weights:
            raise Unsupported(
                f"{node.op_type} {node.name} is not quantized (needs DequantizeLinear on input and weight)"
            )
        x = self.values[self.dequantized[node.input[0]]]
        codes, w_scale, w_zero = self.weights[node.input[1]]
        bias = self.const(node.input[2]).astype(np.float32) if len(node.input) > 2 and node.input[2] else None
        return x, codes, w_scale, w_zero, bias

    def _output_channel_axis(self, node, axis):
        if self.weight_axes[node.input[1]] not in (None, axis):
            raise Unsupported(
                f"{node.op_type} {node.name}: weights quantized along axis {self.weight_axes[node.input[1]]}, "
                "not per output channel"
            )

    def _conv_step(self, node, x, values, w_scale, bias, geometry, depthwise, out_shape=None, w_zero=None):
        """``w_zero``: per-output-channel weight zero points kept out of ``values`` (the codes as stored),
        subtracted by the kernel's epilogue as w_zero[n] times the input window's sum."""
        n = values.shape[0]
        w_scale = np.broadcast_to(w_scale, (n,)).astype(np.float32)
        multiplier = (np.float32(x.scale) * w_scale).astype(np.float32)
        bias = np.zeros(n, np.float32) if bias is None else bias
        winograd = None
        if depthwise:
            packed = layouts.pack_depthwise(values.reshape(n, geometry["kernel_h"], geometry["kernel_w"]))
            wsum = np.zeros(1, np.int32)
        else:
            # (N, kh·kw·C): im2col's order
            rows = values.transpose(0, 2, 3, 1).reshape(n, -1) if values.ndim == 4 else values
            packed = layouts.pack_weights(
                rows, layouts.conv_layout(self.layout, x.qmax, rows, geometry["out_h"] * geometry["out_w"])
            )
            wsum = rows.sum(1).astype(np.int32)
            if w_zero is not None:
                wsum = np.concatenate([wsum, np.broadcast_to(w_zero, (n,)).astype(np.int32)])
            winograd = self._winograd(x, values, geometry, w_zero)
            if winograd is not None:
                packed, offsets, chunk = winograd
                wsum = np.concatenate([wsum, offsets])
        if out_shape is None:
            self.values[node.output[0]] = Value(node.output[0], "float", (geometry["out_h"], geometry["out_w"], n))
        else:  # dense layers: rows x channels is the plain tensor (..., rows, n) in memory
            self.values[node.output[0]] = Value(node.output[0], "float", tuple(out_shape), layout="plain")
        # ``weights`` (N, C or 1, kh, kw) int8 is what the packing encodes: the reference computes from it
        weights = values.reshape(n, -1, 1, 1) if values.ndim == 2 else values
        params = dict(
            geometry,
            x_zero=x.zero,
            x_max=x.qmax,
            out_c=n,
            winograd=0 if winograd is None else chunk,
            packed=packed,
            wsum=wsum,
            w_zeros=int(w_zero is not None),
            w_zero=None if w_zero is None else np.broadcast_to(w_zero, (n,)).astype(np.int32),
            multiplier=multiplier,
            bias=bias.astype(np.float32),
            weights=weights.astype(np.int8),
            depthwise=depthwise,
            clamp=(-INF, INF),
            residual=None,
            quant=None,
        )
        self.steps.append(Step("conv2d", [x.name], node.output[0], params))

    def _winograd(self, x, values, geometry, w_zero):
        """U's packing and sums where a layer runs as Winograd F(2x2, 3x3), else None."""
        if not (
            self.winograd
            and values.ndim == 4
            and values.shape[2:] == (3, 3)
            and (geometry["stride_h"], geometry["stride_w"]) == (1, 1)
            and x.qmax <= 15
            and w_zero is None
            and layouts.winograd_applies(self.layout, geometry["in_c"], geometry["out_h"] * geometry["out_w"])
        ):
            return None
        return layouts.pack_winograd(values, self.layout)

    def op_Conv(self, node, attrs):
        x, codes, w_scale, w_zero, bias = self._layer_inputs(node)
        self._output_channel_axis(node, 0)
        if x.layout != "nhwc":
            raise Unsupported(f"Conv {node.name}: its input is not a feature map of the plan")
        if any(d != 1 for d in attrs.get("dilations", [1, 1])) or attrs.get("auto_pad", b"NOTSET") not in (
            b"NOTSET",
            "NOTSET",
        ):
            raise Unsupported(f"Conv {node.name}: dilation and auto_pad are not supported")
        n, cin_per_group, kh, kw = codes.shape
        h, w, c = x.shape
        group = attrs.get("group", 1)
        depthwise = group != 1
        if depthwise and not (group == c == n and cin_per_group == 1):
            raise Unsupported(f"Conv {node.name}: grouped convolution other than depthwise")
        pads = attrs.get("pads", [0, 0, 0, 0])
        sh, sw = attrs.get("strides", [1, 1])
        out_h = (h + pads[0] + pads[2] - kh) // sh + 1
        out_w = (w + pads[1] + pads[3] - kw) // sw + 1
        rows = codes.transpose(0, 2, 3, 1).reshape(n, -1)
        w_zero = np.broadcast_to(w_zero.reshape(-1), (n,))
        in_epilogue = not depthwise and self._zero_points_in_epilogue(x, rows, w_zero, out_h * out_w)
        kept_zero = w_zero if in_epilogue else None
        values = codes if kept_zero is not None else codes - w_zero.reshape(-1, 1, 1, 1)
        if values.min() < -128 or values.max() > 127:
            raise Unsupported(f"Conv {node.name}: weight codes minus zero point exceed int8")
        geometry = {
            "in_h": h,
            "in_w": w,
            "in_c": c,
            "out_h": out_h,
            "out_w": out_w,
            "kernel_h": kh,
            "kernel_w": kw,
            "stride_h": sh,
            "stride_w": sw,
            "pad_top": pads[0],
            "pad_left": pads[1],
        }
        self._conv_step(node, x, values, w_scale, bias, geometry, depthwise, w_zero=kept_zero)

    def _zero_points_in_epilogue(self, x, codes, w_zero, rows: int) -> bool:
        """Whether a layer's weight zero points go to the epilogue (w_zero[n] times the input window's sum,
        the codes stored as they are) rather than into the codes (codes minus zero point, one field width).

        Subtracting widens the fields (2-bit codes minus zero points in [-2, 1] span -3..3: 4-bit fields) but
        costs nothing per output, and measured faster on x86 (CIFAR-10 ResNet-20 W2A4: 0.36 against
        0.41 ms with AMX, 0.77 against 0.83 ms on the AVX2 build). The epilogue is needed where the
        difference leaves int8 (8-bit first and last layers), and pays where the codes' own width
        selects a faster kernel: the table-lookup kernels take 2-bit weights only.
        """
        if not np.any(w_zero):
            return False
        centred = codes.reshape(len(w_zero), -1) - w_zero.reshape(-1, 1)
        if centred.min() < -128 or centred.max() > 127:
            return True
        chosen = layouts.conv_layout(self.layout, x.qmax, codes.reshape(len(w_zero), -1), rows)
        return chosen.name.endswith("-lut")

    def _dense_step(self, node, x, weight, w_zero, w_scale, bias):
        """y = x·weightᵀ over the rows of ``x`` (weight: out x in codes) as a 1x1 convolution."""
        zero = w_zero if w_zero.size == weight.shape[0] else np.broadcast_to(w_zero, (weight.shape[0],))
        rows = int(np.prod(x.shape[:-1]))
        kept_zero = zero.reshape(-1) if self._zero_points_in_epilogue(x, weight, zero.reshape(-1), rows) else None
        values = weight if kept_zero is not None else weight - zero.reshape(-1, 1)
        if values.min() < -128 or values.max() > 127:
            raise Unsupported(f"{node.op_type} {node.name}: weight codes minus zero point exceed int8")
        if weight.shape[1] != x.shape[-1]:
            raise Unsupported(
                f"{node.op_type} {node.name}: weight has {weight.shape[1]} inputs, activation {x.shape[-1]}"
            )
        rows = int(np.prod(x.shape[:-1]))
        geometry = {
            "in_h": rows,
            "in_w": 1,
            "in_c": x.shape[-1],
            "out_h": rows,
            "out_w": 1,
            "kernel_h": 1,
            "kernel_w": 1,
            "stride_h": 1,
            "stride_w": 1,
            "pad_top": 0,
            "pad_left": 0,
        }
        batch = x.shape[:-1] if x.layout == "plain" else (rows,)
        self._conv_step(
            node,
            x,
            values,
            w_scale,
            bias,
            geometry,
            depthwise=False,
            out_shape=(*batch, weight.shape[0]),
            w_zero=kept_zero,
        )

    def op_Gemm(self, node, attrs):
        x, codes, w_scale, w_zero, bias = self._layer_inputs(node)
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise Unsupported(f"Gemm {node.name}: only y = x·Wᵀ + b")
        if int(np.prod(x.shape[:-1])) != 1:
            raise Unsupported(f"Gemm {node.name}: input is not a vector")
        self._output_channel_axis(node, 0 if attrs.get("transB", 0) else 1)
        if bias is not None and bias.size != codes.shape[0 if attrs.get("transB", 0) else 1]:
            raise Unsupported(f"Gemm {node.name}: bias is not one value per output")
        x = dataclasses.replace(x, shape=(1, x.shape[-1]), layout="plain")
        self._dense_step(node, x, codes if attrs.get("transB", 0) else codes.T, w_zero, w_scale, bias)

    def op_MatMul(self, node, attrs):
        if node.input[0] in self.dequantized and node.input[1] in self.weights:
            x = self.values[self.dequantized[node.input[0]]]
            codes, w_scale, w_zero = self.weights[node.input[1]]
            if codes.ndim != 2:
                raise Unsupported(f"MatMul {node.name}: weights must be a matrix")
            self._output_channel_axis(node, 1)
            self._dense_step(node, x, codes.T, w_zero, w_scale, None)
            return
        if self._matmul_of_codes(node):
            return
        a, b = self._plain(node.input[0], node), self._plain(node.input[1], node)
        if len(a.shape) < 2 or len(b.shape) < 2 or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
            raise Unsupported(
                f"MatMul {node.name}: float operands {a.shape} and {b.shape} (needs equal batch dimensions)"
            )
        batch, m, k, n = int(np.prod(a.shape[:-2])), a.shape[-2], a.shape[-1], b.shape[-1]
        self._float_op("matmul", node, [a, b], (*a.shape[:-1], n), [batch, m, k, n], [1.0])

    def _matmul_of_codes(self, node) -> bool:
        """Both operands quantized (attention's scores and context at ``attention_bits``): one integer product of
        their codes, scaled once, instead of two dequantized copies and a float product. False where it does
        not apply (the float path takes it)."""
        names = node.input[:2]
        if not all(name in self.dequantized for name in names):
            return False
        a, b = (self.values[self.dequantized[name]] for name in names)
        if a.layout != "plain" or b.layout != "plain" or len(a.shape) < 2 or len(b.shape) < 2:
            return False
        if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2] or a.shape[-1] > MATMUL_CODES_MAX_K:
            return False
        batch, m, k, n = int(np.prod(a.shape[:-2])), a.shape[-2], a.shape[-1], b.shape[-1]
        alpha = np.float32(a.scale) * np.float32(b.scale)
        self._float_op("matmul_codes", node, [a, b], (*a.shape[:-1], n), [batch, m, k, n, a.zero, b.zero], [alpha])
        return True

    # -- float operators -------------------------------------------------------------------
    def _float(self, name, node) -> Value:
        value = self.values.get(name)
        if value is None or value.kind != "float":
            raise Unsupported(f"{node.op_type} {node.name} takes a tensor that is not a planned float tensor")
        return value

    def _operand(self, name, node) -> Value:
        """A float value, or a constant made a value of the plan (operands of Concat, MatMul, Add)."""
        if name in self.values and self.values[name].kind == "constant":
            return self.values[name]
        if name in self.dequantized and name not in self.values:  # codes a float operator takes (attention matmuls)
            codes = self.values[self.dequantized[name]]
            self.values[name] = Value(name, "float", codes.shape, layout=codes.layout)
            params = {
                "ints": np.array([int(np.prod(codes.shape)), codes.zero], np.int32),
                "floats": np.array([codes.scale], np.float32),
                "constant": None,
            }
            self.steps.append(Step("dequantize", [codes.name], name, params))
            return self.values[name]
        if name in self.initializers and name not in self.values:
            array = np.ascontiguousarray(self.initializers[name], np.float32)
            self.values[name] = Value(name, "constant", tuple(array.shape), layout="plain")
            self.steps.append(Step("constant", [], name, {"array": array}))
            return self.values[name]
        return self._float(name, node)

    def _plain(self, name, node) -> Value:
        """The value in ONNX's order: a feature map is copied from NHWC to NCHW (once)."""
        value = self._operand(name, node)
        if value.layout == "plain":
            return value
        h, w, c = value.shape
        converted = f"{name}/nchw"
        if converted not in self.values:
            if (h, w) == (1, 1):
                self.values[converted] = Value(converted, "float", (1, c, 1, 1), layout="plain")
                self.steps.append(Step("alias", [name], converted, {"shape": (1, c, 1, 1)}))
            else:
                self._copy(converted, value, (1, c, h, w), (0, 1, w * c, c), 0)
        return self.values[converted]

    def _float_op(self, kernel, node, operands, shape, ints, floats, constant=None):
        self.values[node.output[0]] = Value(node.output[0], "float", tuple(int(d) for d in shape), layout="plain")
        params = {
            "ints": np.array(ints, np.int32),
            "floats": np.array(floats or [0.0], np.float32),
            "constant": constant,
        }
        self.steps.append(Step(kernel, [v.name for v in operands], node.output[0], params))

    def _copy(self, output, source, shape, strides, offset):
        """``output`` = source elements at ``offset + Σ index·stride`` (a view of ``source`` made contiguous)."""
        shape, strides = [int(d) for d in shape], [int(s) for s in strides]
        if len(shape) > 6:
            raise Unsupported(f"{output}: tensors of rank {len(shape)} (the copy kernel takes up to 6)")
        self.values[output] = Value(output, "float", tuple(shape), layout="plain")
        if offset == 0 and tuple(strides) == _contiguous(shape) and int(np.prod(shape)) == int(np.prod(source.shape)):
            self.steps.append(Step("alias", [source.name], output, {"shape": tuple(shape)}))
            return
        pad = 6 - len(shape)
        ints = [1] * pad + shape + [0] * pad + strides + [int(offset)]
        self.steps.append(
            Step(
                "copy",
                [source.name],
                output,
                {"ints": np.array(ints, np.int32), "floats": np.zeros(1, np.float32), "constant": None},
            )
        )

    def _clamp(self, node, lo, hi, other=None):
        a = self._float(node.input[0], node)
        inputs = [a.name]
        if other is not None:
            b = self._float(other, node)
            if b.shape != a.shape or b.layout != a.layout:
                raise Unsupported(f"{node.op_type} {node.name}: broadcasting is not supported")
            inputs.append(b.name)
        self.values[node.output[0]] = dataclasses.replace(a, name=node.output[0])
        self.steps.append(Step("add_clamp", inputs, node.output[0], {"clamp": (lo, hi)}))

    def op_Relu(self, node, attrs):
        self._clamp(node, 0.0, INF)

    def op_Clip(self, node, attrs):
        lo = float(self.const(node.input[1])) if len(node.input) > 1 and node.input[1] else -INF
        hi = float(self.const(node.input[2])) if len(node.input) > 2 and node.input[2] else INF
        self._clamp(node, lo, hi)

    def _feature_map_binary(self, node, multiply: bool) -> bool:
        """Add/Mul of two NHWC feature maps of one shape, or of a feature map and a per-channel (1, 1, c) one
        (a squeeze-excitation gate): elementwise in NHWC memory too, so no layout copies. False if not such."""
        values = [self.values.get(name) for name in node.input[:2]]
        if any(v is None or v.kind != "float" or v.layout != "nhwc" for v in values):
            return False
        a, b = values
        if a.shape[:2] == (1, 1) and b.shape[:2] != (1, 1):
            a, b = b, a
        if b.shape not in (a.shape, (1, 1, a.shape[2])):
            return False
        count = int(np.prod(a.shape))
        self.values[node.output[0]] = dataclasses.replace(a, name=node.output[0])
        params = {
            "ints": np.array([count, int(np.prod(b.shape)), int(multiply)], np.int32),
            "floats": np.array([-3.0e38, 3.0e38], np.float32),
            "constant": None,
        }
        self.steps.append(Step("binary", [a.name, b.name], node.output[0], params))
        return True

    def _activation(self, node, kind: int, alpha: float = 0.0, beta: float = 0.0):
        x = self._operand(node.input[0], node)
        self.values[node.output[0]] = dataclasses.replace(x, name=node.output[0], kind="float")
        params = {
            "ints": np.array([int(np.prod(x.shape)), kind], np.int32),
            "floats": np.array([alpha, beta], np.float32),
            "constant": None,
        }
        self.steps.append(Step("activation", [x.name], node.output[0], params))

    def op_Sigmoid(self, node, attrs):
        self._activation(node, 0)

    def op_HardSigmoid(self, node, attrs):
        self._activation(node, 1, attrs.get("alpha", 0.2), attrs.get("beta", 0.5))

    def op_HardSwish(self, node, attrs):
        self._activation(node, 2, 1.0 / 6.0, 0.5)

    def _binary(self, node, multiply: bool):
        if self._feature_map_binary(node, multiply):
            return
        first, second = node.input[0], node.input[1]
        if first in self.initializers and first not in self.values:  # both operators commute
            first, second = second, first
        a = self._plain(first, node)
        if second in self.initializers and second not in self.values:
            b_array = np.asarray(self.initializers[second], np.float32)
            b_shape = b_array.shape
        else:
            b_array, b_shape = None, self._plain(second, node).shape
        if tuple(np.broadcast_shapes(a.shape, b_shape)) != a.shape:
            raise Unsupported(
                f"{node.op_type} {node.name}: the second operand {b_shape} is larger than the first {a.shape}"
            )
        padded = (1,) * (len(a.shape) - len(b_shape)) + tuple(b_shape)
        lead = next((i for i, d in enumerate(padded) if d != 1), len(padded))
        count = int(np.prod(a.shape))
        if tuple(padded[lead:]) == tuple(a.shape[lead:]):
            period = int(np.prod(a.shape[lead:]))  # b repeats over a's leading dimensions
        elif b_array is not None:
            b_array, period = np.broadcast_to(b_array.reshape(padded), a.shape), count
        else:
            raise Unsupported(f"{node.op_type} {node.name}: broadcasting {b_shape} to {a.shape} inside a row")
        if b_array is not None:
            period = max(period, a.shape[-1] if a.shape else 1)  # a scalar repeats over one row
            constant = np.ascontiguousarray(
                np.broadcast_to(b_array.reshape(padded), a.shape).reshape(-1)[:period], np.float32
            )
            self._float_op(
                "binary", node, [a], a.shape, [count, period, int(multiply)], [-3.0e38, 3.0e38], constant=constant
            )
        else:
            self._float_op(
                "binary",
                node,
                [a, self._plain(second, node)],
                a.shape,
                [count, period, int(multiply)],
                [-3.0e38, 3.0e38],
            )

    def op_Add(self, node, attrs):
        a, b = self.values.get(node.input[0]), self.values.get(node.input[1])
        if (
            a is not None
            and b is not None
            and a.kind == b.kind == "float"
            and a.shape == b.shape
            and a.layout == b.layout
        ):
            self._clamp(
                node, -INF, INF, other=node.input[1]
            )  # a residual add, fused into the layer that computes one side
        else:
            self._binary(node, multiply=False)

    def op_Mul(self, node, attrs):
        self._binary(node, multiply=True)

    def op_MaxPool(self, node, attrs):
        x = self._float(node.input[0], node)
        if x.layout != "nhwc":
            raise Unsupported(f"MaxPool {node.name}: its input is not a feature map of the plan")
        if attrs.get("ceil_mode", 0) or any(d != 1 for d in attrs.get("dilations", [1, 1])) or len(node.output) > 1:
            raise Unsupported(f"MaxPool {node.name}: ceil_mode, dilation and indices are not supported")
        kh, kw = attrs["kernel_shape"]
        sh, sw = attrs.get("strides", [1, 1])
        pads = attrs.get("pads", [0, 0, 0, 0])
        h, w, c = x.shape
        out = ((h + pads[0] + pads[2] - kh) // sh + 1, (w + pads[1] + pads[3] - kw) // sw + 1, c)
        self.values[node.output[0]] = Value(node.output[0], "float", out)
        self.steps.append(
            Step(
                "max_pool",
                [x.name],
                node.output[0],
                {"ints": [h, w, c, out[0], out[1], kh, kw, sh, sw, pads[0], pads[1]]},
            )
        )

    def _global_average(self, node, keepdims: bool = True):
        x = self._float(node.input[0], node)
        if x.layout != "nhwc":
            raise Unsupported(f"{node.op_type} {node.name}: its input is not a feature map of the plan")
        h, w, c = x.shape
        pooled = node.output[0] if keepdims else f"{node.output[0]}/keepdims"
        self.values[pooled] = Value(pooled, "float", (1, 1, c))
        self.steps.append(Step("global_average_pool", [x.name], pooled, {"ints": [h * w, c]}))
        if not keepdims:  # x.mean((2, 3)): the pooled pixel is already the (1, c) row
            self.values[node.output[0]] = Value(node.output[0], "float", (1, c), layout="plain")
            self.steps.append(Step("alias", [pooled], node.output[0], {"shape": (1, c)}))

    def op_GlobalAveragePool(self, node, attrs):
        self._global_average(node)

    def op_ReduceMean(self, node, attrs):
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1:
            axes = self.const(node.input[1]).tolist()
        if sorted(int(a) % 4 for a in (axes or [])) != [2, 3]:
            raise Unsupported(f"ReduceMean {node.name}: only the spatial mean has a kernel")
        self._global_average(node, keepdims=bool(attrs.get("keepdims", 1)))

    def op_LayerNormalization(self, node, attrs):
        x = self._plain(node.input[0], node)
        if attrs.get("axis", -1) % len(x.shape) != len(x.shape) - 1 or len(node.output) > 1 and any(node.output[1:]):
            raise Unsupported(f"LayerNormalization {node.name}: only over the last axis, without mean/variance outputs")
        cols = x.shape[-1]
        gamma = np.broadcast_to(self.const(node.input[1]).astype(np.float32), (cols,))
        beta = (
            np.broadcast_to(self.const(node.input[2]).astype(np.float32), (cols,))
            if len(node.input) > 2 and node.input[2]
            else np.zeros(cols, np.float32)
        )
        self._float_op(
            "layer_norm",
            node,
            [x],
            x.shape,
            [int(np.prod(x.shape[:-1])), cols],
            [attrs.get("epsilon", 1e-5)],
            constant=np.concatenate([gamma, beta]),
        )

    def op_Softmax(self, node, attrs):
        x = self._plain(node.input[0], node)
        if attrs.get("axis", -1) % len(x.shape) != len(x.shape) - 1:
            raise Unsupported(f"Softmax {node.name}: only over the last axis")
        self._float_op("softmax", node, [x], x.shape, [int(np.prod(x.shape[:-1])), x.shape[-1]], [])

    def op_Gelu(self, node, attrs):
        x = self._plain(node.input[0], node)
        if attrs.get("approximate", b"none") not in (b"none", "none"):
            raise Unsupported(f"Gelu {node.name}: only the exact (erf) form")
        self._float_op("gelu", node, [x], x.shape, [int(np.prod(x.shape))], [])

    # -- tensor moves ----------------------------------------------------------------------
    def _reshaped(self, node, shape):
        x = self._plain(node.input[0], node)
        shape = tuple(int(d) for d in shape)
        if int(np.prod(shape)) != int(np.prod(x.shape)):
            raise Unsupported(f"{node.op_type} {node.name}: {x.shape} cannot become {shape}")
        self.values[node.output[0]] = Value(node.output[0], "float", shape, layout="plain")
        self.steps.append(Step("alias", [x.name], node.output[0], {"shape": shape}))

    def op_Reshape(self, node, attrs):
        x = self._plain(node.input[0], node)
        target = [int(d) for d in self.const(node.input[1]).reshape(-1)]
        if not attrs.get("allowzero", 0):
            target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
        if -1 in target:
            known = int(np.prod([d for d in target if d != -1]))
            target[target.index(-1)] = int(np.prod(x.shape)) // max(known, 1)
        self._reshaped(node, target)

    def op_Flatten(self, node, attrs):
        x = self._plain(node.input[0], node)
        axis = attrs.get("axis", 1) % (len(x.shape) + 1) if x.shape else 0
        self._reshaped(node, (int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:]))))

    def _axes(self, node, attrs, rank):
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self.const(node.input[1]).reshape(-1).tolist()
        return None if axes is None else sorted(int(a) % rank for a in axes)

    def op_Squeeze(self, node, attrs):
        x = self._plain(node.input[0], node)
        axes = self._axes(node, attrs, len(x.shape))
        self._reshaped(node, [d for i, d in enumerate(x.shape) if not (d == 1 and (axes is None or i in axes))])

    def op_Unsqueeze(self, node, attrs):
        x = self._plain(node.input[0], node)
        axes = attrs.get("axes")
        if axes is None:
            axes = self.const(node.input[1]).reshape(-1).tolist()
        rank = len(x.shape) + len(axes)
        shape = list(x.shape)
        for axis in sorted(int(a) % rank for a in axes):
            shape.insert(axis, 1)
        self._reshaped(node, shape)

    def op_Identity(self, node, attrs):
        x = self._plain(node.input[0], node)
        self._reshaped(node, x.shape)

    def op_Transpose(self, node, attrs):
        x = self._plain(node.input[0], node)
        perm = attrs.get("perm", list(range(len(x.shape)))[::-1])
        strides = _contiguous(x.shape)
        self._copy(node.output[0], x, [x.shape[p] for p in perm], [strides[p] for p in perm], 0)

    def _feature_map(self, name) -> Value | None:
        """The float NHWC feature map ``name`` names, if it is one (shape and layout operators keep it NHWC)."""
        value = self.values.get(name)
        if value is not None and value.kind == "float" and value.layout == "nhwc" and len(value.shape) == 3:
            return value
        return None

    def op_Slice(self, node, attrs):
        source = self._feature_map(node.input[0])
        x = source or self._plain(node.input[0], node)
        rank = 4 if source else len(x.shape)
        starts, ends = self.const(node.input[1]).reshape(-1), self.const(node.input[2]).reshape(-1)
        axes = (
            self.const(node.input[3]).reshape(-1) if len(node.input) > 3 and node.input[3] else np.arange(len(starts))
        )
        steps = (
            self.const(node.input[4]).reshape(-1)
            if len(node.input) > 4 and node.input[4]
            else np.ones(len(starts), np.int64)
        )
        # a feature map is sliced where it lies: ONNX axes (N, C, H, W) are NHWC memory dims (-, 2, 0, 1)
        dims = {1: 2, 2: 0, 3: 1} if source else {axis: axis for axis in range(rank)}
        shape, strides, offset = list(x.shape), list(_contiguous(x.shape)), 0
        for start, end, axis, step in zip(starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist()):
            axis = int(axis) % rank
            if axis not in dims:  # the batch axis of a feature map (batch 1): the slice must keep its one item
                if len(range(*slice(int(start), int(end), int(step)).indices(1))) != 1:
                    raise Unsupported(f"Slice {node.name}: empty result")
                continue
            dim = dims[axis]
            indices = range(*slice(int(start), int(end), int(step)).indices(x.shape[dim]))
            if len(indices) == 0:
                raise Unsupported(f"Slice {node.name}: empty result")
            offset += indices.start * strides[dim]
            shape[dim], strides[dim] = len(indices), strides[dim] * indices.step
        self._copy(node.output[0], x, shape, strides, offset)
        if source:
            self.values[node.output[0]] = dataclasses.replace(self.values[node.output[0]], layout="nhwc")

    def op_Pad(self, node, attrs):
        """Constant padding (CIFAR ResNets' "option A" shortcuts pad channels with zeros), as concatenations
        with constant blocks, in the layout the input lies in."""
        mode = attrs.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "constant":
            raise Unsupported(f"Pad {node.name}: mode {mode!r} (only constant padding has a kernel)")
        source = self._feature_map(node.input[0])
        x = source or self._plain(node.input[0], node)
        rank = 4 if source else len(x.shape)
        pads = self.const(node.input[1]).reshape(-1).astype(np.int64)
        fill = float(self.const(node.input[2]).reshape(-1)[0]) if len(node.input) > 2 and node.input[2] else 0.0
        axes = (
            self.const(node.input[3]).reshape(-1).astype(np.int64) % rank
            if len(node.input) > 3 and node.input[3]
            else np.arange(rank)
        )
        if pads.size != 2 * axes.size or (pads < 0).any():
            raise Unsupported(f"Pad {node.name}: pads {pads.tolist()} (cropping or malformed)")
        dims = {1: 2, 2: 0, 3: 1} if source else {axis: axis for axis in range(rank)}
        current = x
        for index, axis in enumerate(axes.tolist()):
            before, after = int(pads[index]), int(pads[index + axes.size])
            if before == after == 0:
                continue
            if axis not in dims:
                raise Unsupported(f"Pad {node.name}: padding the batch axis")
            dim = dims[axis]
            for side, width in (("before", before), ("after", after)):
                if width == 0:
                    continue
                block_shape = list(current.shape)
                block_shape[dim] = width
                block = f"{node.output[0]}/{axis}/{side}"
                self.values[block] = Value(block, "constant", tuple(block_shape), layout="plain")
                self.steps.append(Step("constant", [], block, {"array": np.full(block_shape, fill, np.float32)}))
                shape = list(current.shape)
                shape[dim] += width
                outer, inner = int(np.prod(shape[:dim])), int(np.prod(shape[dim + 1 :]))
                parts = [self.values[block], current] if side == "before" else [current, self.values[block]]
                name = f"{node.output[0]}/{axis}/{side}/padded"
                self._float_op(
                    "concat",
                    _Named(name),
                    parts,
                    shape,
                    [outer, parts[0].shape[dim] * inner, parts[1].shape[dim] * inner],
                    [],
                )
                current = self.values[name] = dataclasses.replace(self.values[name], layout=x.layout)
        if current is x:
            self._copy(node.output[0], x, x.shape, _contiguous(x.shape), 0)
        else:
            self.steps.append(Step("alias", [current.name], node.output[0], {"shape": tuple(current.shape)}))
        self.values[node.output[0]] = dataclasses.replace(current, name=node.output[0], layout=x.layout)

    def op_Gather(self, node, attrs):
        x = self._plain(node.input[0], node)
        indices = self.const(node.input[1])
        axis = attrs.get("axis", 0) % len(x.shape)
        shape, strides = list(x.shape), list(_contiguous(x.shape))
        flat = indices.reshape(-1) % x.shape[axis]
        if np.array_equal(flat, np.arange(x.shape[axis])):  # every index in order: exporters write flattens so
            self._reshaped(node, (*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :]))
        elif flat.size == 1:
            offset = int(flat[0]) * strides[axis]
            if indices.ndim == 0:
                del shape[axis], strides[axis]
            else:
                shape[axis] = 1
            self._copy(node.output[0], x, shape, strides, offset)
        else:
            raise Unsupported(f"Gather {node.name}: only one index, or all of them in order")

    def op_Expand(self, node, attrs):
        x = self._plain(node.input[0], node)
        target = tuple(int(d) for d in self.const(node.input[1]).reshape(-1))
        shape = tuple(np.broadcast_shapes(x.shape, target))
        padded = (1,) * (len(shape) - len(x.shape)) + x.shape
        strides = (0,) * (len(shape) - len(x.shape)) + _contiguous(x.shape)
        self._copy(
            node.output[0], x, shape, [0 if d == 1 and s != 1 else st for d, s, st in zip(padded, shape, strides)], 0
        )

    def op_Concat(self, node, attrs):
        maps = [self._feature_map(name) for name in node.input]
        if all(maps) and attrs["axis"] % 4 != 0:  # feature maps are joined where they lie: ONNX (N, C, H, W) in NHWC
            parts, axis, layout = maps, {1: 2, 2: 0, 3: 1}[attrs["axis"] % 4], "nhwc"
        else:
            parts = [self._plain(name, node) for name in node.input]
            axis, layout = attrs["axis"] % len(parts[0].shape), "plain"
        current = parts[0]
        for index, part in enumerate(parts[1:], start=1):
            if len(part.shape) != len(current.shape) or any(
                a != b for i, (a, b) in enumerate(zip(part.shape, current.shape)) if i != axis
            ):
                raise Unsupported(f"Concat {node.name}: shapes {current.shape} and {part.shape}")
            shape = list(current.shape)
            shape[axis] += part.shape[axis]
            name = node.output[0] if index == len(parts) - 1 else f"{node.output[0]}/{index}"
            outer = int(np.prod(shape[:axis]))
            inner = int(np.prod(shape[axis + 1 :]))
            self._float_op(
                "concat",
                _Named(name),
                [current, part],
                shape,
                [outer, current.shape[axis] * inner, part.shape[axis] * inner],
                [],
            )
            current = self.values[name] = dataclasses.replace(self.values[name], layout=layout)
        if len(parts) == 1:
            self.values[node.output[0]] = dataclasses.replace(current, name=node.output[0])
            self.steps.append(Step("alias", [current.name], node.output[0], {"shape": tuple(current.shape)}))


@dataclasses.dataclass
class _Named:
    """Stands in for a node where a step writes an intermediate value of its own name."""

    name: str

    @property
    def output(self):
        return [self.name]


def _outer_shape(value: Value) -> tuple[int, ...]:
    """A value's shape as a generic step's small model takes it (a feature map with its batch axis)."""
    return (1, *value.shape) if value.layout == "nhwc" else tuple(value.shape)


_GENERIC_SESSIONS: dict[bytes, object] = {}


def run_generic(model: bytes, inputs: list[np.ndarray], keep: bool = True) -> np.ndarray:
    """A generic step's small model run by onnxruntime (sessions are kept unless ``keep`` is false: plans run
    image by image)."""
    import onnxruntime

    session = _GENERIC_SESSIONS.get(model)
    if session is None:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        if keep:
            _GENERIC_SESSIONS[model] = session
    feeds = {
        spec.name: np.ascontiguousarray(array, np.float32).reshape([int(d) for d in spec.shape])
        for spec, array in zip(session.get_inputs(), inputs)
    }
    return session.run(None, feeds)[0]


def _contiguous(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(tuple(shape)):
        strides.append(step)
        step *= int(d)
    return tuple(reversed(strides))


def prove_fast_requantization(plan: Plan) -> None:
    """Give each codes-only convolution (no residual) the one-multiply requantization where it is proven to write
    the exact epilogue's codes for every accumulator the layer can produce (reference.fast_requantization).

    The exact epilogue rounds y / scale half to even with a division check near ties, which made the epilogue,
    not the products, the cost of layers with few input channels (MobileNetV2's 16- and 24-channel expansions).
    """
    for step in plan.steps:
        p = step.params
        if step.kernel != "conv2d" or step.out_kind != "codes" or p["residual"] is not None or p["quant"] is None:
            continue
        weights = np.asarray(p["weights"], np.int64)
        if p.get("w_zero") is not None:
            weights = weights - np.asarray(p["w_zero"], np.int64).reshape(-1, 1, 1, 1)
        quant = p["quant"]
        fast = reference.fast_requantization(
            weights, p["x_zero"], p["x_max"], p["multiplier"], p["bias"], p["clamp"], quant["scale"],
            quant["zero"], quant["qmax"],
        )  # fmt: skip
        if fast is not None:
            fast_m, fast_b, lo, hi = fast
            p.update(fast_codes=1, fast_lo=lo, fast_hi=hi, fast_multiplier=fast_m, fast_bias=fast_b)


def epilogue_arrays(params: dict) -> tuple[np.ndarray, np.ndarray]:
    """The multiplier and bias arrays a conv2d step passes to the kernel: the fast requantization's after the
    exact ones when it has one (edgeq_kernels.h, fast_codes)."""
    if not params.get("fast_codes"):
        return params["multiplier"], params["bias"]
    return (
        np.concatenate([params["multiplier"], params["fast_multiplier"]]).astype(np.float32),
        np.concatenate([params["bias"], params["fast_bias"]]).astype(np.float32),
    )


def build_plan(model: onnx.ModelProto, layout: layouts.Layout, *, generic: bool = False, winograd: bool = True) -> Plan:
    """The kernel plan of ``model``. A node without a kernel raises :class:`Unsupported`, or with ``generic``
    becomes a step of TVM's generated code in the same module (``Plan.summary()["generic"]`` lists them).
    ``winograd``: 3x3 stride-1 layers of 4-bit codes run as Winograd F(2x2, 3x3) where the build has the kernel."""
    return _Planner(model, layout, generic, winograd).plan()


def reference_outputs(
    model: onnx.ModelProto, arch: str, cpu_features, inputs: np.ndarray, progress: str | None = None
) -> np.ndarray:
    """What a module compiled on the kernels for (``arch``, ``cpu_features``) must return for ``inputs``, bit for bit.

    The plan is rebuilt as the compile stage builds it (same layout choices), then computed by
    :func:`edgeq.kernels.reference.run_plan`, one input at a time (the plan has batch size 1). Generic steps
    (nodes without a kernel) are onnxruntime's float operators here and TVM's in the module, so behind them
    outputs may differ by float rounding.
    """
    from tqdm.auto import tqdm

    from . import reference

    plan = build_plan(model, layouts.layout_for(arch, cpu_features), generic=True)
    outputs = []
    for x in tqdm(inputs, desc=progress, unit="img", leave=False, disable=progress is None):
        outputs.append(reference.run_plan(plan, x[None])[plan.output_name].reshape(plan.output_shape))
    return np.concatenate(outputs) if outputs else np.zeros((0, *plan.output_shape[1:]), np.float32)
