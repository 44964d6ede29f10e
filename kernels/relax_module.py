"""A kernel plan as a Relax module: one ``call_dps_packed`` per step, constants inlined.

The entry points it calls are the TVM FFI wrappers of ``csrc/edgeq_ffi.cc``, linked into
the same ``module.so`` by the compile stage.
"""

from __future__ import annotations

import numpy as np

from . import native
from .layouts import PackedWeights
from .plan import Plan, Step, Unsupported, Value, epilogue_arrays


def conv_struct(params: dict) -> native.ConvParams:
    """The kernel parameters of a conv2d step."""
    packed: PackedWeights = params["packed"]
    quant = params["quant"] or {"scale": 1.0, "zero": 0, "qmax": 255}
    lo, hi = params["clamp"]
    # the step's geometry and input fields carry the struct's own names
    geometry = {name: params[name] for name, _ in native.ConvParams._fields_ if name in params}
    return native.conv_params(
        **geometry,
        w_bits=packed.bits,
        w_low=packed.low,
        w_absmax=packed.absmax,
        k_padded=packed.k_padded,
        w_layout=packed.layout,
        out_zero=quant["zero"],
        out_qmin=0,
        out_qmax=quant["qmax"],
        out_scale=quant["scale"],
        clamp_min=max(lo, -3.0e38),
        clamp_max=min(hi, 3.0e38),
    )


def conv_flags(params: dict) -> np.ndarray:
    """[has residual, depthwise]: what the entry point needs besides the struct."""
    return np.array([int(params["residual"] is not None), int(params["depthwise"])], np.int32)


FLOAT_OPS = {
    "copy": "edgeq_strided_copy",
    "concat": "edgeq_concat",
    "dequantize": "edgeq_dequantize",
    "binary": "edgeq_binary",
    "layer_norm": "edgeq_layer_norm",
    "softmax": "edgeq_softmax",
    "gelu": "edgeq_gelu",
    "activation": "edgeq_activation",
    "matmul": "edgeq_matmul",
    "matmul_codes": "edgeq_matmul_codes",
}
# operators of FLOAT_OPS whose operands are uint8 codes, not float32
CODES_OPERANDS = frozenset({"dequantize", "matmul_codes"})


def quantize_arguments(plan: Plan, step: Step) -> tuple[list[int], float]:
    p = step.params
    source = plan.values[step.inputs[0]]
    channels = source.shape[1] if p["nchw"] else source.shape[-1]
    pixels = int(np.prod(source.shape[2:] if p["nchw"] else source.shape[:-1]))
    return [channels, pixels, p["nchw"], p["zero"], 0, p["qmax"]], p["scale"]


def generic_function(builder, step: Step):
    """A generic step's small ONNX model imported by TVM's ONNX frontend, added to the module as a function
    of its own (its operators are legalized and compiled with the rest of the module)."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx.load_from_string(step.params["model"])
    try:
        imported = from_onnx(model, keep_params_in_input=False)
    except Exception as exc:  # noqa: BLE001 - the frontend raises many kinds
        raise Unsupported(f"{step.params['node']}: TVM's ONNX importer failed ({str(exc).splitlines()[0]})") from None
    from tvm import relax

    name = "generic_" + "".join(c if c.isalnum() else "_" for c in step.params["node"])
    # the importer's helper functions (TIR kernels such as mirror_pad) join the module under names of their
    # own, so that two generic steps with a helper of the same name stay apart
    renamed = {}
    for old, function in imported.functions_items():
        if old.name_hint != "main":
            renamed[old] = builder.add_func(function.without_attr("global_symbol"), f"{name}_{old.name_hint}")

    @relax.expr_functor.mutator
    class Rename(relax.PyExprMutator):
        def visit_global_var_(self, op):
            return renamed.get(op, op)

    main = imported["main"].without_attr("global_symbol")
    if renamed:
        main = Rename().visit_expr(main)
    return builder.add_func(main, name)


def to_relax(plan: Plan):
    """A Relax IRModule whose ``main`` runs the plan through the edgeq kernels."""
    from tvm import relax

    def tensor_type(value: Value, kind: str):
        return relax.TensorType(value.shape, "uint8" if kind == "codes" else "float32")

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
                args = [env[name] for name in step.inputs]
                if step.kernel == "constant":
                    env[step.output] = const(step.params["array"])
                    continue
                if step.kernel == "alias":
                    same = tuple(plan.values[step.inputs[0]].shape) == tuple(step.params.get("shape", value.shape))
                    env[step.output] = (
                        args[0] if same else builder.emit(relax.op.reshape(args[0], step.params["shape"]))
                    )
                    continue
                if step.kernel == "generic":  # its model takes feature maps with their batch axis
                    outer = [
                        builder.emit(relax.op.reshape(arg, (1, *plan.values[name].shape)))
                        if plan.values[name].layout == "nhwc"
                        else arg
                        for name, arg in zip(step.inputs, args)
                    ]
                    result = builder.emit(relax.Call(generic_function(builder, step), outer))
                    env[step.output] = builder.emit(relax.op.reshape(result, value.shape))
                    continue
                if step.kernel == "conv2d":
                    packed = step.params["packed"]
                    residual = env[step.params["residual"]] if step.params["residual"] else dummy
                    multiplier, bias = epilogue_arrays(step.params)
                    call_args = [
                        args[0],
                        const(packed.data),
                        const(step.params["wsum"]),
                        const(multiplier),
                        const(bias),
                        const(conv_struct(step.params).words()),
                        const(conv_flags(step.params)),
                        residual,
                    ]
                    name = "edgeq_conv2d_codes" if step.out_kind == "codes" else "edgeq_conv2d_float"
                elif step.kernel == "quantize":
                    ints, scale = quantize_arguments(plan, step)
                    call_args = [args[0], const(np.array(ints, np.int32)), const(np.array([scale], np.float32))]
                    name = "edgeq_quantize"
                elif step.kernel == "add_clamp":
                    lo, hi = step.params["clamp"]
                    second = args[1] if len(args) > 1 else dummy
                    call_args = [args[0], second, const(np.array([max(lo, -3.0e38), min(hi, 3.0e38)], np.float32))]
                    name = "edgeq_add_clamp"
                elif step.kernel in ("max_pool", "global_average_pool"):
                    call_args = [args[0], const(np.array(step.params["ints"], np.int32))]
                    name = f"edgeq_{step.kernel}{'_codes' if step.out_kind == 'codes' else ''}"
                elif step.kernel in FLOAT_OPS:
                    p = step.params
                    second = (
                        args[1] if len(args) > 1 else (const(p["constant"]) if p["constant"] is not None else dummy)
                    )
                    call_args = [args[0], second, const(p["ints"]), const(p["floats"])]
                    name = FLOAT_OPS[step.kernel]
                else:  # pragma: no cover - the planner emits only the kernels above
                    raise Unsupported(step.kernel)
                env[step.output] = builder.emit(
                    relax.call_dps_packed(name, call_args, out_ty=tensor_type(value, step.out_kind))
                )
            result = env[plan.output_name]
            if tuple(plan.values[plan.output_name].shape) != tuple(plan.output_shape):
                result = builder.emit(relax.op.reshape(result, plan.output_shape))
            output = builder.emit_output(result)
        builder.emit_func_output(output)
    return builder.get()
