"""Export: QDQ ONNX in true low-bit types, matching torch fake-quant in quantization steps."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from edgeq import qdq, quantized
from edgeq.data import load_fashion_mnist
from edgeq.lowering import lower_low_bit_qdq
from edgeq.stages import export, quantize


@pytest.fixture(scope="module")
def test_inputs(builtin_model):
    return builtin_model.preprocess(load_fashion_mnist("test").images[:64])


@pytest.mark.parametrize(
    "bits,opset,weight_type,act_type",
    [
        ("w2a4", 25, TensorProto.INT2, TensorProto.UINT4),
        ("w4a4", 21, TensorProto.INT4, TensorProto.UINT4),
        ("w3a3", 21, TensorProto.INT4, TensorProto.UINT4),
        ("w8a8", 21, TensorProto.INT8, TensorProto.UINT8),
    ],
)
def test_qdq_types_and_agreement_in_steps(quantized_dirs, test_inputs, bits, opset, weight_type, act_type):
    model, *_ = quantized.load(quantized_dirs(bits))
    onnx_model, records = export.build_qdq_model(model, torch.from_numpy(test_inputs[:2]))
    onnx.checker.check_model(onnx_model, full_check=True)
    assert onnx_model.opset_import[0].version == opset
    inits = {t.name: t for t in onnx_model.graph.initializer}
    assert len(records) == 6  # five convs and the classifier
    assert [r["layer"] for r in records][:: len(records) - 1] == ["stem.0", "classifier"]
    for index, record in enumerate(records):
        tag = f"edgeq.{record['layer']}"
        edge = index in (0, len(records) - 1)  # the first and last layer keep 8 bits
        assert inits[f"{tag}.weight_q"].data_type == (TensorProto.INT8 if edge else weight_type)
        assert inits[f"{tag}.act_zero_point"].data_type == (TensorProto.UINT8 if edge else act_type)
        assert len(inits[f"{tag}.weight_scale"].dims) == 1  # per output channel
    dq_axes = {n.name: n.attribute[0].i for n in onnx_model.graph.node if n.name.endswith("/weight_dq")}
    assert set(dq_axes.values()) <= {0, 1}
    check = export.compare_with_onnxruntime(model, onnx_model, records, test_inputs)
    assert check["quantizer_max_lsb"] == 0
    assert check["layer_max_rel_error"] < 1e-5
    # On this shallow model no tie flip grows past one step end to end.
    assert check["activation_max_lsb"] <= 1.0
    assert check["activation_fraction_differing"] <= 1e-3
    assert check["top1_agreement"] == 1.0


def test_three_bit_activations_are_clipped_to_their_range(quantized_dirs, test_inputs):
    model, *_ = quantized.load(quantized_dirs("w3a3"))
    onnx_model, records = export.build_qdq_model(model, torch.from_numpy(test_inputs[:2]))
    session = qdq.onnxruntime_session(onnx_model, intermediate=[f"edgeq.{r['layer']}.act_dq" for r in records])
    outputs = session.run(None, {qdq.INPUT_NAME: test_inputs})[1:]
    for index, (record, values) in enumerate(zip(records, outputs)):
        codes = np.round(values / record["act_scale"]) + record["act_zero_point"]
        assert record["act_bits"] == (8 if index in (0, len(records) - 1) else 3)  # the edges keep 8 bits
        assert codes.min() >= 0 and codes.max() <= 2 ** record["act_bits"] - 1


def test_weights_are_the_quantized_codes(quantized_dirs):
    from onnx import numpy_helper

    model, *_ = quantized.load(quantized_dirs("w2a4"))
    onnx_model, _ = export.build_qdq_model(model, torch.zeros(2, 1, 28, 28))
    codes = numpy_helper.to_array(
        next(t for t in onnx_model.graph.initializer if t.name == "edgeq.block_conv1.0.weight_q")
    )
    assert np.array_equal(codes.astype(np.int8), model.get_submodule("block_conv1.0").weight_int.numpy())
    assert codes.min() >= -2 and codes.max() <= 1


def _ort(model, inputs):
    return qdq.onnxruntime_session(model).run(None, {qdq.INPUT_NAME: inputs})[0]


@pytest.mark.parametrize("bits", ["w2a4", "w4a4"])
def test_lowering_keeps_the_numbers(quantized_dirs, test_inputs, bits):
    model, *_ = quantized.load(quantized_dirs(bits))
    onnx_model, _ = export.build_qdq_model(model, torch.from_numpy(test_inputs[:2]))
    lowered = lower_low_bit_qdq(onnx_model)
    assert all(
        t.data_type in (TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT64)
        for t in lowered.graph.initializer
    )
    assert np.array_equal(_ort(onnx_model, test_inputs), _ort(lowered, test_inputs))


def test_lowering_needs_the_clip():
    """Widening a 4-bit QuantizeLinear without the Clip lets codes past 15 through."""
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [
            numpy_helper.from_array(np.array(0.5, np.float32), "s"),
            qdq.integer_tensor("z", np.array(2), 4, signed=False),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = np.array([-3.0, 0.0, 6.5, 40.0], np.float32)
    expected = (np.clip(np.round(x / 0.5) + 2, 0, 15) - 2) * 0.5
    assert np.array_equal(qdq.onnxruntime_session(model).run(None, {"x": x})[0], expected)
    lowered = lower_low_bit_qdq(model)
    assert np.array_equal(qdq.onnxruntime_session(lowered).run(None, {"x": x})[0], expected)
    unclipped = onnx.ModelProto()
    unclipped.CopyFrom(lowered)
    clip = next(n for n in unclipped.graph.node if n.op_type == "Clip")
    unclipped.graph.node.remove(clip)
    next(n for n in unclipped.graph.node if n.op_type == "QuantizeLinear").output[0] = clip.output[0]
    assert not np.array_equal(qdq.onnxruntime_session(unclipped).run(None, {"x": x})[0], expected)


def test_vit_linears_export_within_one_step(tmp_path):
    """ViT linears on 3-D tensors export as MatMul with transposed weights (axis 1 dequantization)."""
    folder = quantize.run("tests.factories:tiny_vit", "fashion-mnist:A", tmp_path / "q", bits="w4a4", num_images=16)
    model, loaded, _, _ = quantized.load(folder)
    inputs = loaded.preprocess(load_fashion_mnist("test").images[:16])
    onnx_model, records = export.build_qdq_model(model, torch.from_numpy(inputs[:2]))
    assert {r["op"] for r in records} >= {"Conv", "MatMul"}
    layers = [r for r in records if "operand" not in r]
    assert len(layers) == 1 + 2 * 4 + 1  # patch embedding, 4 linears per block, head
    operands = [r for r in records if "operand" in r]  # timm attention's Q·Kᵀ and weights·V, both sides, per block
    assert len(operands) == 2 * 2 * 2 and {r["act_bits"] for r in operands} == {8}
    check = export.compare_with_onnxruntime(model, onnx_model, records, inputs)
    assert check["quantizer_max_lsb"] == 0 and check["layer_max_rel_error"] < 1e-5
