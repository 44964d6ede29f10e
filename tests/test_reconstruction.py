"""Reconstruction: AdaRound, LSQ steps, QDrop, units, and the quantize stage's learned path end to end."""

import pytest
import torch
from torch import nn

from edgeq import EdgeqError, quant, quantized
from edgeq.reconstruction import Method, ReconstructionConfig, default_round_weight, reconstruct
from edgeq.reconstruction.activation import LearnedActivation, drop_quantization
from edgeq.reconstruction.blocks import find_units, register_block
from edgeq.reconstruction.rounding import AdaRound, beta_schedule
from edgeq.spec import QuantSpec
from edgeq.stages import export, quantize
from edgeq.zoo.teachers import FmnistMobileNetV2, FmnistResNet, FmnistViT

from .conftest import TINY


def _two_layer_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1)
    )


def _inputs(count=128, seed=1):
    return torch.randn(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).numpy()


def test_adaround_starts_at_the_float_weight_and_at_round_to_nearest():
    weight = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    scale = quant.channel_view(quant.weight_scales(weight, 2, quant.Observer.MSE), weight)
    rounding = AdaRound(weight, scale, -2, 1)
    inside = (weight / scale >= -2) & (weight / scale <= 1)  # clipped weights cannot be reproduced
    assert torch.allclose(rounding.soft_weight()[inside], weight[inside], atol=1e-5)
    nearest = torch.clamp(torch.round(weight / scale), -2, 1)
    assert torch.equal(rounding.hard_codes(), nearest)  # no exact ties in random weights
    with torch.no_grad():
        rounding.v.copy_(torch.where(rounding.v >= 0, 50.0, -50.0))  # h at exactly 0 or 1
    assert rounding.regularizer(2.0).item() == 0.0


def test_adaround_lowers_a_layers_output_error_against_round_to_nearest():
    model = _two_layer_model()
    inputs = _inputs()
    x = torch.from_numpy(inputs)
    with torch.no_grad():
        reference = model(x)
    rtn = quantized.quantize_module(model, inputs, "w2a8")
    learned = quantized.quantize_module(
        model, inputs, "w2a8", reconstruction=ReconstructionConfig(method="adaround", iters=400)
    )
    with torch.no_grad():
        error_rtn = (rtn(x) - reference).pow(2).mean().item()
        error_learned = (learned(x) - reference).pow(2).mean().item()
    assert error_learned < 0.7 * error_rtn  # measured: about 0.4x
    codes = learned.get_submodule("2").weight_int
    assert codes.min() >= -2 and codes.max() <= 1  # still 2-bit codes at the same scales
    assert torch.equal(learned.get_submodule("2").weight_scale, rtn.get_submodule("2").weight_scale)


def test_learned_steps_get_gradients_and_match_the_reference_quantizer():
    x = torch.linspace(-1, 3, 1000).reshape(10, 100)
    activation = LearnedActivation(0.2, 5, 15, learn_scale=True)
    out = activation(x)
    assert torch.equal(
        out, quant.fake_quantize(x, torch.tensor(0.2), 5.0, 0, 15)
    )  # the forward is the primitive, bit for bit
    (out - x).pow(2).sum().backward()
    assert (
        activation.scale.grad is not None and torch.isfinite(activation.scale.grad) and activation.scale.grad.abs() > 0
    )
    fixed = LearnedActivation(0.2, 5, 15, learn_scale=False)
    assert not fixed.scale.requires_grad


def test_qdrop_drops_about_the_requested_share():
    x = torch.randn(200, 100)
    quantized = torch.round(x * 2) / 2 + 10.0  # distinguishable from x everywhere
    generator = torch.Generator().manual_seed(0)
    mixed = drop_quantization(x, quantized, 0.5, generator)
    kept_float = (mixed == x).float().mean().item()
    assert 0.48 < kept_float < 0.52 and torch.all((mixed == x) | (mixed == quantized))
    assert torch.equal(drop_quantization(x, quantized, 0.0, generator), quantized)
    assert torch.equal(drop_quantization(x, quantized, 1.0, generator), x)


def test_beta_schedule_warms_up_then_decays():
    assert beta_schedule(199, 1000, 0.2, 20, 2) is None
    assert beta_schedule(200, 1000, 0.2, 20, 2) == 20
    assert beta_schedule(600, 1000, 0.2, 20, 2) == pytest.approx(11)
    assert beta_schedule(1000, 1000, 0.2, 20, 2) == 2


def _units(model, blocks=True):
    prepared, layers = quantized.prepare(model, QuantSpec.parse("w4a4"), torch.zeros(1, 1, 28, 28))
    return {u.name: u for u in find_units(prepared, list(layers), blocks=blocks)}


def test_units_are_the_residual_blocks_of_each_teacher():
    resnet = _units(FmnistResNet())
    assert list(resnet) == ["layers.0", "layers.1", "layers.2", "layers.3", "layers.4", "layers.5", "stem.0", "fc"]
    assert resnet["layers.2"].layers == ("layers.2.conv1", "layers.2.conv2", "layers.2.shortcut.0")
    mobilenet = _units(FmnistMobileNetV2())
    assert sum(u.kind == "block" for u in mobilenet.values()) == 8 and mobilenet["head.0"].kind == "layer"
    vit = _units(FmnistViT())
    assert vit["blocks.0"].layers == (
        "blocks.0.attn.q",
        "blocks.0.attn.k",
        "blocks.0.attn.v",
        "blocks.0.attn.proj",
        "blocks.0.fc1",
        "blocks.0.fc2",
    )
    assert [u.kind for u in _units(FmnistResNet(), blocks=False).values()] == ["layer"] * 16


class PlainStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class Registered(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(4, 4, 1))

    def forward(self, x):
        return self.inner(x)


def test_unregistered_blocks_are_found_by_structure_and_registered_ones_by_type():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Sequential(PlainStage(), PlainStage()),
        Registered(),
        nn.Flatten(),
        nn.LazyLinear(10),
    )
    model(torch.zeros(1, 1, 28, 28))
    units = _units(model)
    assert units["1.0"].kind == "block" and units["1.1"].kind == "block" and units["2.inner.0"].kind == "layer"
    register_block(Registered)
    assert _units(model)["2"].kind == "block"


def test_reconstruction_is_deterministic_and_round_weight_follows_the_architecture():
    model = _two_layer_model()
    inputs = _inputs(64)
    config = ReconstructionConfig(method="qdrop", iters=30, batch_size=8)
    first = quantized.quantize_module(model, inputs, "w2a4", reconstruction=config, seed=3)
    again = quantized.quantize_module(model, inputs, "w2a4", reconstruction=config, seed=3)
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert default_round_weight(FmnistMobileNetV2()) == 0.1 and default_round_weight(FmnistResNet()) == 0.01


def test_config_errors_name_the_choices():
    with pytest.raises(EdgeqError, match="unknown reconstruction method 'optq'"):
        ReconstructionConfig(method="optq")
    with pytest.raises(EdgeqError, match="drop-prob"):
        ReconstructionConfig(drop_prob=1.5)
    assert ReconstructionConfig(method="rtn").learns is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(EdgeqError, match="no CUDA device"):
        reconstruct(nn.Linear(2, 2), {}, torch.zeros(1, 2), ReconstructionConfig(), device="cuda")


def test_a_learned_model_saves_loads_and_exports_with_the_same_numbers(tmp_path):
    from edgeq.data import resolve_dataset
    from edgeq.models import load_model

    config = ReconstructionConfig(method="qdrop", iters=20, batch_size=8)
    folder = quantize.run(
        TINY, "fashion-mnist:A", tmp_path / "q", bits="w2a4", num_images=32, reconstruction=config, seed=4
    )
    model, _loaded, _spec, manifest = quantized.load(folder)
    assert manifest.params["method"] == "qdrop" and manifest.params["reconstruction"]["iters"] == 20
    assert [r["unit"] for r in manifest.extra["reconstruction"]] == [
        "stem.0",
        "block_conv1.0",
        "block_conv2.0",
        "down1.0",
        "down2.0",
        "classifier",
    ]
    tiny = load_model(TINY)
    calibration = tiny.preprocess(resolve_dataset("fashion-mnist:A").subset(32).images)
    in_memory = quantized.quantize_module(tiny.module, calibration, "w2a4", reconstruction=config, seed=4)
    test_inputs = tiny.preprocess(resolve_dataset("fashion-mnist:test").subset(64).images)
    with torch.no_grad():
        assert torch.equal(model(torch.from_numpy(test_inputs)), in_memory(torch.from_numpy(test_inputs)))
    onnx_model, records = export.build_qdq_model(model, torch.from_numpy(test_inputs[:2]))
    check = export.compare_with_onnxruntime(model, onnx_model, records, test_inputs)
    assert check["quantizer_max_lsb"] == 0 and check["top1_agreement"] == 1.0


def test_the_command_line_methods_are_the_library_ones():
    from edgeq.cli.main import METHODS

    assert METHODS == tuple(m.value for m in Method)


def test_a_time_budget_caps_the_iterations_and_fisher_weights_are_squared_gradients():
    model = _two_layer_model()
    inputs = _inputs(32)
    report: list = []
    config = ReconstructionConfig(method="adaround", iters=100000, batch_size=4, time_budget=2.0, loss="fisher")
    quantized.quantize_module(model, inputs, "w2a4", reconstruction=config, report=report)
    assert len(report) == 3 and all(20 <= r["iterations"] < 100000 for r in report)
    assert sum(r["seconds"] for r in report) < 10

    from edgeq.reconstruction.cache import fisher_weights

    x = torch.from_numpy(inputs[:4])
    weights = fisher_weights(model, model[2], x, 4, "cpu")
    hidden = model[1](model[0](x)).detach()
    out2 = model[2](hidden).detach().requires_grad_(True)
    logits = model[4](model[3](out2))
    nn.functional.cross_entropy(logits, logits.detach().argmax(1), reduction="sum").backward()
    assert torch.allclose(weights, out2.grad.pow(2))


def test_gptq_spends_from_the_time_budget(monkeypatch):
    import time

    real_gptq = quantized.gptq_round
    seen = {}

    def slow_gptq(*args, **kwargs):
        time.sleep(0.5)
        return real_gptq(*args, **kwargs)

    def recording_reconstruct(model, layers, inputs, config, **kwargs):
        seen["budget"] = config.time_budget
        return []

    monkeypatch.setattr(quantized, "gptq_round", slow_gptq)
    monkeypatch.setattr(quantized, "reconstruct", recording_reconstruct)
    config = ReconstructionConfig(method="adaround", iters=10, time_budget=3.0, initial_rounding="gptq")
    quantized.quantize_module(_two_layer_model(), _inputs(16), "w2a4", reconstruction=config)
    assert 0 < seen["budget"] <= 2.5  # what GPTQ took is not given to reconstruction again
    config = ReconstructionConfig(method="adaround", iters=10, time_budget=0.2, initial_rounding="gptq")
    quantized.quantize_module(_two_layer_model(), _inputs(16), "w2a4", reconstruction=config)
    assert 0 < seen["budget"] <= 1e-3  # spent: every unit gets its minimum
    config = ReconstructionConfig(method="adaround", iters=10, time_budget=3.0)
    quantized.quantize_module(_two_layer_model(), _inputs(16), "w2a4", reconstruction=config)
    assert 2.5 < seen["budget"] <= 3.0  # from nearest, reconstruction has (nearly) all of it


def test_attention_matmul_inputs_are_quantized_learned_exported_and_compiled(tmp_path):
    from edgeq.stages import compile as compile_stage
    from edgeq.stages import verify as verify_stage

    config = ReconstructionConfig(method="qdrop", iters=10, batch_size=8)
    folder = quantize.run(
        "tests.factories:tiny_zoo_vit",
        "fashion-mnist:A",
        tmp_path / "q",
        bits="w4a4",
        num_images=32,
        reconstruction=config,
    )
    model, _loaded, _, manifest = quantized.load(folder)
    assert manifest.extra["matmuls"] == ["blocks.0.attn.scores", "blocks.0.attn.context"]
    scores = model.get_submodule("blocks.0.attn.scores")
    assert (
        scores.act_bits == 8 and torch.all(scores.act_scale > 0) and not torch.equal(scores.act_scale, torch.ones(2))
    )  # attention_bits
    exported = export.run(folder, tmp_path / "e")
    from edgeq.manifest import Manifest

    onnx_records = [r for r in Manifest.load(exported, "export").extra["layers"] if "operand" in r]
    assert [(r["layer"], r["operand"]) for r in onnx_records] == [
        ("blocks.0.attn.scores", 0),
        ("blocks.0.attn.scores", 1),
        ("blocks.0.attn.context", 0),
        ("blocks.0.attn.context", 1),
    ]
    check = Manifest.load(exported, "export").extra["onnxruntime_check"]
    assert check["quantizer_max_lsb"] == 0 and check["layer_max_rel_error"] < 1e-5 and check["top1_agreement"] == 1.0
    compiled = compile_stage.run(exported, tmp_path / "c", target="x86")
    report = verify_stage.run(compiled, tmp_path / "v", data="fashion-mnist:test", num_images=100, latency_runs=0)
    assert report["agreement_with_reference"] == 1.0
    assert report["agreement_with_onnxruntime"] >= 0.99 and report["max_abs_diff_vs_onnxruntime"] < 1e-3


def test_asymmetric_weights_learn_export_and_compile(tmp_path):
    import dataclasses

    from edgeq.stages import compile as compile_stage
    from edgeq.stages import verify as verify_stage

    spec = dataclasses.replace(QuantSpec.parse("w2a4"), weight_symmetric=False)
    folder = quantize.run(
        TINY,
        "fashion-mnist:A",
        tmp_path / "q",
        bits=spec,
        num_images=32,
        reconstruction=ReconstructionConfig(method="brecq", iters=20),
    )
    model, _, loaded_spec, _ = quantized.load(folder)
    assert loaded_spec.weight_symmetric is False
    zero_points = model.get_submodule("down1.0").weight_zero_point
    assert zero_points.abs().sum() > 0 and zero_points.min() >= -2 and zero_points.max() <= 1
    exported = export.run(folder, tmp_path / "e")
    from edgeq.manifest import Manifest

    check = Manifest.load(exported, "export").extra["onnxruntime_check"]
    assert check["quantizer_max_lsb"] == 0 and check["layer_max_rel_error"] < 1e-5 and check["top1_agreement"] == 1.0
    compiled = compile_stage.run(exported, tmp_path / "c", target="x86")
    report = verify_stage.run(compiled, tmp_path / "v", data="fashion-mnist:test", num_images=100, latency_runs=0)
    # every layer runs on the kernels: the 8-bit first and last layers, whose codes minus zero point leave int8,
    # subtract their zero points in the epilogue; x86 stores the 2-bit layers minus zero points in 4-bit fields
    build = Manifest.load(compiled, "compile").extra["build"]
    assert build["path"] == "kernels" and build["kernels"]["conv2d"] >= 1 and not build.get("generic")
    import onnx
    from edgeq.kernels import layouts
    from edgeq.kernels.plan import build_plan

    model = onnx.load(str(exported / "model.onnx"))

    def fields(layout):  # (stored field width, zero points in the epilogue) of each layer
        plan = build_plan(model, layouts.LAYOUTS[layout])
        return sorted((p["packed"].bits, p["w_zeros"]) for p in (s.params for s in plan.steps if s.kernel == "conv2d"))

    assert fields("portable") == [(4, 0)] * 4 + [(8, 1)] * 2
    # Arm without dot product: 2-bit codes select the table-lookup kernel, so they stay 2-bit
    assert fields("neon") == [(2, 1)] * 4 + [(8, 1)] * 2
    assert report["agreement_with_reference"] == 1.0
    assert report["agreement_with_onnxruntime"] == 1.0 and report["max_abs_diff_vs_onnxruntime"] < 1e-4


class _Pooled(nn.Module):
    """A convolution scaled by its global mean: not translation-equivariant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y * y.mean((2, 3), keepdim=True)


def test_windows_are_planned_only_for_units_that_commute_with_translation():
    from edgeq.reconstruction.crops import WindowPlan, plan_windows

    torch.manual_seed(0)
    images = torch.randn(3, 4, 40, 40)

    def run_float(call):
        with torch.no_grad():
            return call()

    strided = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    plan = plan_windows(strided, images, 17, run_float)
    assert plan == WindowPlan(size=16, stride=2)  # rounded down to the stride
    assert plan_windows(_Pooled(), images, 16, run_float) is None
    assert plan_windows(strided, images, 40, run_float) is None  # no smaller than the input: whole inputs
    assert plan_windows(nn.Flatten(), images, 16, run_float) is None

    offsets = plan.offsets(3, 40, 40, torch.Generator().manual_seed(0))
    assert (offsets % 2 == 0).all() and (offsets >= 0).all() and (offsets <= 24).all()
    windows = plan.crop(images, offsets)
    for image, window, (r, c) in zip(images, windows, offsets.tolist()):
        assert torch.equal(window, image[:, r : r + 16, c : c + 16])
    out = plan.crop(strided(images), offsets, scale=2)
    assert out.shape == (3, 8, 8, 8)


def test_reconstruction_on_windows_learns_and_is_deterministic():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1)
    )
    inputs = torch.randn(32, 3, 24, 24, generator=torch.Generator().manual_seed(1)).numpy()
    x = torch.from_numpy(inputs)
    with torch.no_grad():
        reference = model(x)
    config = ReconstructionConfig(method="adaround", iters=300, batch_size=8, window=12)
    report: list = []
    learned = quantized.quantize_module(model, inputs, "w2a8", reconstruction=config, report=report)
    again = quantized.quantize_module(model, inputs, "w2a8", reconstruction=config)
    rtn = quantized.quantize_module(model, inputs, "w2a8")
    assert [r["window"] for r in report] == [12, 12, 12]
    assert all(r["mse_after"] < r["mse_before"] for r in report)  # measured on whole inputs
    with torch.no_grad():
        error_learned = (learned(x) - reference).pow(2).mean().item()
        error_rtn = (rtn(x) - reference).pow(2).mean().item()
        assert torch.equal(learned(x), again(x))
    assert error_learned < 0.8 * error_rtn
    with pytest.raises(EdgeqError, match="--window"):
        ReconstructionConfig(window=4)
