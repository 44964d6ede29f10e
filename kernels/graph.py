"""From an exported QDQ model to a plan of edgeq kernel calls, and from the plan to Relax.

The QDQ graph quantizes each layer's input (QuantizeLinear -> DequantizeLinear) and runs
the layer in float on dequantized weights. The plan runs the same arithmetic in integers:

    Q(x) -> DQ -> Conv/Gemm(DQ(w)) [-> Add(residual)] [-> Relu/Clip]    becomes one
    kernel call on activation codes (NHWC, one per byte) and bit-packed weights, with the
    scale, bias, residual and clamp fused into its epilogue; when the only consumer is the
    next layer's QuantizeLinear, the epilogue writes that layer's codes directly and the
    float tensor is never materialized.

Tensors between kernels are NHWC. What stays float (residual stream, pooling) runs in
small C loops of the same library. Graphs with operators outside this set raise
:class:`Unsupported`, and the compile stage falls back to TVM's ONNX importer.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx
from onnx import numpy_helper

from . import native

log = logging.getLogger(__name__)

INF = float("inf")
# Activation zero-point types the kernels take (unsigned codes); value = largest code
UNSIGNED_ACTIVATIONS = {onnx.TensorProto.UINT8: 255, onnx.TensorProto.UINT4: 15, onnx.TensorProto.UINT2: 3}


class Unsupported(Exception):
    """The graph uses something the kernel plan does not cover (the message says what)."""


@dataclasses.dataclass
class Value:
    """A tensor of the plan: float or codes, NHWC (or rows x channels for dense layers)."""

    name: str
    kind: str  # "float" | "codes" | "input"
    shape: tuple[int, ...]  # (h, w, c); the graph input keeps its NCHW (1, c, h, w)
    scale: float = 1.0
    zero: int = 0
    qmax: int = 255


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
    steps: list[Step]
    values: dict[str, Value]
    layout: native.Layout

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for step in self.steps:
            counts[step.kernel] = counts.get(step.kernel, 0) + 1
        return {"layout": self.layout.name, "steps": len(self.steps), "kernels": counts}


def _attributes(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _scalar(array: np.ndarray, what: str) -> float:
    if array.size != 1:
        raise Unsupported(f"{what} is per-channel; the kernels take per-tensor activation quantization")
    return float(array.reshape(-1)[0])


class _Planner:
    def __init__(self, model: onnx.ModelProto, layout: native.Layout):
        from ..lowering import LOW_BIT_TYPES, widen

        self.layout = layout
        self.graph = model.graph
        self.initializers = {}
        self.types = {}
        for tensor in self.graph.initializer:
            self.types[tensor.name] = tensor.data_type
            self.initializers[tensor.name] = numpy_helper.to_array(widen(tensor) if tensor.data_type in LOW_BIT_TYPES else tensor)
        self.values: dict[str, Value] = {}
        self.weights: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # name -> (codes, scale, zero)
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
        self.values[graph_input.name] = Value(graph_input.name, "input", dims)
        for node in self.graph.node:
            if self._fold(node):
                continue
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None or node.domain not in ("", "ai.onnx"):
                raise Unsupported(f"operator {node.op_type} ({node.name}) has no kernel")
            handler(node, _attributes(node))
        output = self.graph.output[0].name
        value = self.values.get(output)
        if value is None or value.kind != "float" or len(value.shape) != 3 or value.shape[:2] != (1, 1):
            raise Unsupported("the model output must be a vector (classifier logits)")
        plan = Plan(graph_input.name, dims, output, self.steps, self.values, self.layout)
        _fuse(plan)
        return plan

    def _fold(self, node) -> bool:
        """Shape arithmetic on constants (exporters emit it for flatten/view): evaluate it now, at batch size 1."""
        if node.op_type == "Shape" and node.input[0] in self.values:
            value = self.values[node.input[0]]
            dims = value.shape if value.kind == "input" else (1, value.shape[2], value.shape[0], value.shape[1])
            attrs = _attributes(node)
            start, end = attrs.get("start", 0), attrs.get("end", len(dims))
            self.initializers[node.output[0]] = np.array(dims[start:end], np.int64)
            return True
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or not all(not name or name in self.initializers for name in node.input):
            return False
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(node)
        results = evaluator.run(None, {name: self.initializers[name] for name in node.input if name})
        for name, result in zip(node.output, results):
            self.initializers[name] = np.asarray(result)
        return True

    # -- quantization ------------------------------------------------------------------
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
            shape, nchw = (h, w, c), 1
        else:
            shape, nchw = source.shape, 0
        self.values[node.output[0]] = Value(node.output[0], "codes", shape, scale, zero, qmax)
        self.steps.append(Step("quantize", [source.name], node.output[0], {"nchw": nchw, "scale": scale, "zero": zero, "qmax": qmax}, "codes"))

    def op_DequantizeLinear(self, node, attrs):
        if node.input[0] in self.initializers:
            codes = self.const(node.input[0]).astype(np.int32)
            scale = self.const(node.input[1]).astype(np.float32)
            zero = self.const(node.input[2]).astype(np.int32) if len(node.input) > 2 else np.zeros_like(scale, np.int32)
            if attrs.get("axis", 1) != 0 and scale.size > 1:
                raise Unsupported(f"{node.name}: weights must be quantized per output channel (axis 0)")
            self.weights[node.output[0]] = (codes, scale.reshape(-1), zero.reshape(-1))
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
            raise Unsupported(f"{node.op_type} {node.name} is not quantized (needs DequantizeLinear on input and weight)")
        x = self.values[self.dequantized[node.input[0]]]
        codes, w_scale, w_zero = self.weights[node.input[1]]
        bias = self.const(node.input[2]).astype(np.float32) if len(node.input) > 2 and node.input[2] else None
        return x, codes, w_scale, w_zero, bias

    def _conv_step(self, node, x, values, w_scale, bias, geometry, depthwise):
        n = values.shape[0]
        w_scale = np.broadcast_to(w_scale, (n,)).astype(np.float32)
        multiplier = (np.float32(x.scale) * w_scale).astype(np.float32)
        bias = np.zeros(n, np.float32) if bias is None else bias
        if depthwise:
            packed = native.pack_depthwise(values.reshape(n, geometry["kernel_h"], geometry["kernel_w"]))
            wsum = np.zeros(1, np.int32)
        else:
            rows = values.transpose(0, 2, 3, 1).reshape(n, -1) if values.ndim == 4 else values  # (N, kh·kw·C): im2col's order
            packed = native.pack_weights(rows, native.conv_layout(self.layout, x.qmax, rows, geometry["out_h"] * geometry["out_w"]))
            wsum = rows.sum(1).astype(np.int32)
        out_shape = (geometry["out_h"], geometry["out_w"], n)
        self.values[node.output[0]] = Value(node.output[0], "float", out_shape)
        params = dict(geometry, x_zero=x.zero, x_max=x.qmax, out_c=n, packed=packed, wsum=wsum, multiplier=multiplier, bias=bias.astype(np.float32),
                      depthwise=depthwise, clamp=(-INF, INF), residual=None, quant=None)
        self.steps.append(Step("conv2d", [x.name], node.output[0], params))

    def op_Conv(self, node, attrs):
        x, codes, w_scale, w_zero, bias = self._layer_inputs(node)
        if any(d != 1 for d in attrs.get("dilations", [1, 1])) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
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
        values = codes - w_zero.reshape(-1, 1, 1, 1)
        if values.min() < -128 or values.max() > 127:
            raise Unsupported(f"Conv {node.name}: weight codes minus zero point exceed int8")
        geometry = {"in_h": h, "in_w": w, "in_c": c, "out_h": out_h, "out_w": out_w, "kernel_h": kh, "kernel_w": kw, "stride_h": sh, "stride_w": sw,
                    "pad_top": pads[0], "pad_left": pads[1]}
        self._conv_step(node, x, values, w_scale, bias, geometry, depthwise)

    def op_Gemm(self, node, attrs):
        x, codes, w_scale, w_zero, bias = self._layer_inputs(node)
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise Unsupported(f"Gemm {node.name}: only y = x·Wᵀ + b")
        weight = codes if attrs.get("transB", 0) else codes.T
        zero = w_zero if w_zero.size == weight.shape[0] else np.broadcast_to(w_zero, (weight.shape[0],))
        values = weight - zero.reshape(-1, 1)
        if values.min() < -128 or values.max() > 127:
            raise Unsupported(f"Gemm {node.name}: weight codes minus zero point exceed int8")
        if x.shape[:2] != (1, 1):
            raise Unsupported(f"Gemm {node.name}: input is not a vector")
        geometry = {"in_h": 1, "in_w": 1, "in_c": x.shape[2], "out_h": 1, "out_w": 1, "kernel_h": 1, "kernel_w": 1, "stride_h": 1, "stride_w": 1,
                    "pad_top": 0, "pad_left": 0}
        self._conv_step(node, x, values, w_scale, bias, geometry, depthwise=False)

    # -- float glue ----------------------------------------------------------------------
    def _float(self, name, node) -> Value:
        value = self.values.get(name)
        if value is None or value.kind != "float":
            raise Unsupported(f"{node.op_type} {node.name} takes a tensor that is not a planned float tensor")
        return value

    def _clamp(self, node, lo, hi, other=None):
        a = self._float(node.input[0], node)
        inputs = [a.name]
        if other is not None:
            b = self._float(other, node)
            if b.shape != a.shape:
                raise Unsupported(f"{node.op_type} {node.name}: broadcasting is not supported")
            inputs.append(b.name)
        self.values[node.output[0]] = Value(node.output[0], "float", a.shape)
        self.steps.append(Step("add_clamp", inputs, node.output[0], {"clamp": (lo, hi)}))

    def op_Relu(self, node, attrs):
        self._clamp(node, 0.0, INF)

    def op_Clip(self, node, attrs):
        lo = float(self.const(node.input[1])) if len(node.input) > 1 and node.input[1] else -INF
        hi = float(self.const(node.input[2])) if len(node.input) > 2 and node.input[2] else INF
        self._clamp(node, lo, hi)

    def op_Add(self, node, attrs):
        self._clamp(node, -INF, INF, other=node.input[1])

    def op_MaxPool(self, node, attrs):
        x = self._float(node.input[0], node)
        if attrs.get("ceil_mode", 0) or any(d != 1 for d in attrs.get("dilations", [1, 1])) or len(node.output) > 1:
            raise Unsupported(f"MaxPool {node.name}: ceil_mode, dilation and indices are not supported")
        kh, kw = attrs["kernel_shape"]
        sh, sw = attrs.get("strides", [1, 1])
        pads = attrs.get("pads", [0, 0, 0, 0])
        h, w, c = x.shape
        out = ((h + pads[0] + pads[2] - kh) // sh + 1, (w + pads[1] + pads[3] - kw) // sw + 1, c)
        self.values[node.output[0]] = Value(node.output[0], "float", out)
        self.steps.append(Step("max_pool", [x.name], node.output[0], {"ints": [h, w, c, out[0], out[1], kh, kw, sh, sw, pads[0], pads[1]]}))

    def _global_average(self, node):
        x = self._float(node.input[0], node)
        h, w, c = x.shape
        self.values[node.output[0]] = Value(node.output[0], "float", (1, 1, c))
        self.steps.append(Step("global_average_pool", [x.name], node.output[0], {"ints": [h * w, c]}))

    def op_GlobalAveragePool(self, node, attrs):
        self._global_average(node)

    def op_ReduceMean(self, node, attrs):
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1:
            axes = self.const(node.input[1]).tolist()
        if sorted(int(a) % 4 for a in (axes or [])) != [2, 3]:
            raise Unsupported(f"ReduceMean {node.name}: only the spatial mean")
        self._global_average(node)

    def _vector(self, node):
        x = self._float(node.input[0], node)
        if x.shape[:2] != (1, 1):
            raise Unsupported(f"{node.op_type} {node.name} of a feature map: NHWC and NCHW orders differ")
        self.values[node.output[0]] = dataclasses.replace(x, name=node.output[0])
        self.steps.append(Step("alias", [x.name], node.output[0], {}))

    def op_Reshape(self, node, attrs):
        self._vector(node)

    def op_Flatten(self, node, attrs):
        self._vector(node)

    def op_Squeeze(self, node, attrs):
        self._vector(node)

    def op_Unsqueeze(self, node, attrs):
        self._vector(node)

    def op_Gather(self, node, attrs):
        x = self._float(node.input[0], node)
        indices = self.const(node.input[1]).reshape(-1)
        if x.shape[:2] != (1, 1) or not np.array_equal(indices, np.arange(x.shape[2])):
            raise Unsupported(f"Gather {node.name}: only the identity gather of a vector (as exporters write a flatten)")
        self._vector(node)


def _consumers(plan: Plan) -> dict[str, list[Step]]:
    consumers: dict[str, list[Step]] = {}
    for step in plan.steps:
        for name in step.inputs:
            consumers.setdefault(name, []).append(step)
    return consumers


def _fuse(plan: Plan) -> None:
    """Fold residual adds, clamps and the next layer's quantization into convolution epilogues."""
    changed = True
    while changed:
        changed = False
        consumers = _consumers(plan)
        for step in plan.steps:
            if step.kernel != "conv2d" or step.out_kind != "float" or step.output == plan.output_name:
                continue
            users = consumers.get(step.output, [])
            if len(users) != 1:
                continue
            user = users[0]
            params = step.params
            identity_clamp = params["clamp"] == (-INF, INF)
            if user.kernel == "add_clamp" and len(user.inputs) == 2 and identity_clamp and params["residual"] is None:
                other = user.inputs[1] if user.inputs[0] == step.output else user.inputs[0]
                if _defined_before(plan, other, step):
                    params["residual"], params["clamp"] = other, user.params["clamp"]
                    step.inputs = step.inputs + [other]
                    _replace(plan, user, step)
                    changed = True
            elif user.kernel == "add_clamp" and len(user.inputs) == 1:
                lo, hi = params["clamp"]
                ulo, uhi = user.params["clamp"]
                params["clamp"] = (max(lo, ulo), min(hi, uhi))
                _replace(plan, user, step)
                changed = True
            elif user.kernel == "quantize" and user.params["nchw"] == 0:
                params["quant"] = user.params
                step.out_kind = "codes"
                _replace(plan, user, step)
                changed = True
            if changed:
                break


def _defined_before(plan: Plan, name: str, step: Step) -> bool:
    for other in plan.steps:
        if other is step:
            return False
        if other.output == name:
            return True
    return False


def _replace(plan: Plan, user: Step, step: Step) -> None:
    """``step`` takes over ``user``'s output name; ``user`` disappears."""
    old = step.output
    step.output = user.output
    plan.values[user.output] = dataclasses.replace(plan.values[user.output], shape=plan.values[old].shape)
    plan.steps.remove(user)


def build_plan(model: onnx.ModelProto, layout: native.Layout) -> Plan:
    return _Planner(model, layout).plan()


# ---------------------------------------------------------------------------------------
# Relax


def conv_arguments(params: dict) -> tuple[np.ndarray, np.ndarray]:
    """The int32 and float32 parameter tensors of a conv step (edgeq_conv_params order + flags)."""
    packed: native.PackedWeights = params["packed"]
    quant = params["quant"] or {"scale": 1.0, "zero": 0, "qmax": 255}
    ints = [params[k] for k in ("in_h", "in_w", "in_c", "out_h", "out_w", "out_c", "kernel_h", "kernel_w", "stride_h", "stride_w", "pad_top", "pad_left")]
    ints += [params["x_zero"], params["x_max"], packed.bits, packed.low, packed.absmax, packed.k_padded, packed.layout, quant["zero"], 0, quant["qmax"]]
    ints += [int(params["residual"] is not None), int(params["depthwise"])]
    lo, hi = params["clamp"]
    floats = [quant["scale"], max(lo, -3.0e38), min(hi, 3.0e38)]
    return np.array(ints, np.int32), np.array(floats, np.float32)


def to_relax(plan: Plan):
    """A Relax IRModule whose ``main`` runs the plan through the edgeq kernels."""
    from tvm import relax

    def tensor_type(value: Value):
        if value.kind == "input":
            return relax.TensorType(value.shape, "float32")
        shape = value.shape if value.shape[:2] != (1, 1) or value.name != plan.output_name else (1, value.shape[2])
        return relax.TensorType(shape, "uint8" if value.kind == "codes" else "float32")

    def const(array):
        return relax.const(np.ascontiguousarray(array))

    builder = relax.BlockBuilder()
    graph_input = relax.Var(plan.input_name, relax.TensorType(plan.input_shape, "float32"))
    dummy = const(np.zeros(1, np.float32))
    with builder.function("main", [graph_input]):
        with builder.dataflow():
            env = {plan.input_name: graph_input}
            for step in plan.steps:
                value = plan.values[step.output]
                out_value = dataclasses.replace(value, kind=step.out_kind)
                args = [env[name] for name in step.inputs]
                if step.kernel == "alias":
                    env[step.output] = args[0]
                    continue
                if step.kernel == "conv2d":
                    ints, floats = conv_arguments(step.params)
                    packed = step.params["packed"]
                    residual = env[step.params["residual"]] if step.params["residual"] else dummy
                    call_args = [args[0], const(packed.data), const(step.params["wsum"]), const(step.params["multiplier"]), const(step.params["bias"]),
                                 const(ints), const(floats), residual]
                    name = "edgeq_conv2d_codes" if step.out_kind == "codes" else "edgeq_conv2d_float"
                elif step.kernel == "quantize":
                    p = step.params
                    source = plan.values[step.inputs[0]]
                    channels = source.shape[1] if p["nchw"] else source.shape[2]
                    pixels = int(np.prod(source.shape[2:] if p["nchw"] else source.shape[:2]))
                    call_args = [args[0], const(np.array([channels, pixels, p["nchw"], p["zero"], 0, p["qmax"]], np.int32)), const(np.array([p["scale"]], np.float32))]
                    name = "edgeq_quantize"
                elif step.kernel == "add_clamp":
                    lo, hi = step.params["clamp"]
                    second = args[1] if len(args) > 1 else dummy
                    call_args = [args[0], second, const(np.array([max(lo, -3.0e38), min(hi, 3.0e38)], np.float32))]
                    name = "edgeq_add_clamp"
                elif step.kernel in ("max_pool", "global_average_pool"):
                    call_args = [args[0], const(np.array(step.params["ints"], np.int32))]
                    name = f"edgeq_{step.kernel}"
                else:  # pragma: no cover - the planner emits only the kernels above
                    raise Unsupported(step.kernel)
                env[step.output] = builder.emit(relax.call_dps_packed(name, call_args, out_ty=tensor_type(out_value)))
            result = env[plan.output_name]
            output_value = plan.values[plan.output_name]
            result = builder.emit(relax.op.reshape(result, (1, output_value.shape[2])))
            output = builder.emit_output(result)
        builder.emit_func_output(output)
    return builder.get()


def run_plan(plan: Plan, library: native.Library, x: np.ndarray, timings: list | None = None) -> dict[str, np.ndarray]:
    """Execute a plan through ctypes (no TVM): every value by name, for tests and profiling.

    ``timings``, when given, receives (step, seconds) per step.
    """
    import time

    env: dict[str, np.ndarray] = {plan.input_name: np.ascontiguousarray(x, np.float32)}
    for step in plan.steps:
        started = time.perf_counter()
        args = [env[name] for name in step.inputs]
        value = plan.values[step.output]
        p = step.params
        if step.kernel == "alias":
            out = args[0]
        elif step.kernel == "quantize":
            source = plan.values[step.inputs[0]]
            channels = source.shape[1] if p["nchw"] else source.shape[2]
            pixels = int(np.prod(source.shape[2:] if p["nchw"] else source.shape[:2]))
            out = np.zeros(value.shape, np.uint8)
            library.lib.edgeq_quantize(library._ptr(args[0]), channels, pixels, p["nchw"], native.ctypes.c_float(p["scale"]), p["zero"], 0, p["qmax"],
                                       library._ptr(out))
        elif step.kernel == "conv2d":
            ints, floats = conv_arguments(p)
            params = native.conv_params(**dict(zip([f[0] for f in native._ConvParams._fields_[:22]], ints[:22].tolist())),
                                        out_scale=float(floats[0]), clamp_min=float(floats[1]), clamp_max=float(floats[2]))
            residual = env[p["residual"]] if p["residual"] else None
            out_float, out_codes = library.conv2d(params, args[0], p["packed"], p["wsum"], p["multiplier"], p["bias"], residual,
                                                  want_float=step.out_kind == "float", want_codes=step.out_kind == "codes", depthwise=p["depthwise"])
            out = (out_codes if step.out_kind == "codes" else out_float).reshape(value.shape)
        elif step.kernel == "add_clamp":
            lo, hi = step.params["clamp"]
            out = np.clip(args[0] + (args[1] if len(args) > 1 else 0), lo, hi).astype(np.float32)
        elif step.kernel == "max_pool":
            out = np.zeros(value.shape, np.float32)
            library.lib.edgeq_max_pool(library._ptr(np.ascontiguousarray(args[0])), *p["ints"], library._ptr(out))
        elif step.kernel == "global_average_pool":
            out = args[0].reshape(-1, args[0].shape[-1]).mean(0, dtype=np.float32).reshape(value.shape)
        else:  # pragma: no cover
            raise Unsupported(step.kernel)
        env[step.output] = out
        if timings is not None:
            timings.append((step, time.perf_counter() - started))
    return env
