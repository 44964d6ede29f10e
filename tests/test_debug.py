"""edgeq debug: per-layer errors, checked against hand computations and on a deliberately damaged layer."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from edgeq import quant
from edgeq.data import resolve_dataset
from edgeq.debug import debug_model, raised_to_8_bits
from edgeq.models import load_model
from edgeq.quantized import QuantizedLayer, quantize_module
from edgeq.spec import Observer, QuantSpec

from .conftest import TINY
from .test_cli import _assert_one_line_error, run_cli

DAMAGED = "block_conv2.0"


@pytest.fixture(scope="module")
def tiny_w8a8():
    loaded = load_model(TINY)
    data = resolve_dataset("fashion-mnist:A", 96)
    inputs = loaded.preprocess(data.images)
    model = quantize_module(loaded.module, inputs[:48], QuantSpec(8, 8), seed=0).eval()
    return model, inputs[48:], data.targets[48:]


def _layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def _logits(model, inputs):
    with torch.no_grad():
        return model(torch.from_numpy(inputs)).numpy()


def test_the_damaged_layer_ranks_first_and_the_figures_match_hand_computation(tiny_w8a8):
    model, inputs, labels = tiny_w8a8
    layer = _layers(model)[DAMAGED]
    saved = {name: buffer.clone() for name, buffer in layer.named_buffers(recurse=False)}
    # the damage: 2-bit weights on the 8-bit steps, so every weight clips to at most two steps
    layer.weight_bits = 2
    layer.set_weight_qparams(layer.weight_scale.clone())
    try:
        before = _logits(model, inputs)
        report = debug_model(model, inputs, labels=labels, progress=False)
        # measuring leaves the model as it was, bit for bit (8-bit restores are undone)
        assert np.array_equal(_logits(model, inputs), before)
        by_name = {entry.name: entry for entry in report.layers}
        damaged = by_name[DAMAGED]
        assert [entry.name for entry in report.worst(1)] == [DAMAGED]
        assert damaged.weight_bits == 2 and damaged.own_sqnr_db < 3.0
        others = [entry for entry in report.layers if entry.name != DAMAGED]
        assert min(entry.own_sqnr_db for entry in others) > 20.0  # 8 bits elsewhere
        assert damaged.gain_at_8_bits > 0.2 and all(entry.gain_at_8_bits < damaged.gain_at_8_bits for entry in others)
        # the inherited error cannot be smaller than what the damaged layer makes, downstream of it
        assert damaged.inherited_sqnr_db <= damaged.own_sqnr_db + 0.5
        assert report.agreement == pytest.approx(
            float((before.argmax(1) == _float_logits(model, inputs).argmax(1)).mean())
        )
        assert report.top1 == pytest.approx(float((before.argmax(1) == labels).mean()))

        # hand computation of the damaged layer's own SQNR and its input clipping
        captured = {}
        handle = layer.register_forward_hook(lambda m, a, o: captured.update(x=a[0].detach(), out=o.detach()))
        _float_logits(model, inputs)
        handle.remove()
        quantized = torch.nn.functional.conv2d(
            layer.quantize_input(captured["x"]),
            layer.dequantized_weight(),
            layer.layer.bias,
            layer.layer.stride,
            layer.layer.padding,
            layer.layer.dilation,
            layer.layer.groups,
        )
        error = (quantized.detach() - captured["out"]) ** 2
        signal, noise = float((captured["out"] ** 2).sum()), float(error.sum())
        assert damaged.own_sqnr_db == pytest.approx(10 * math.log10(signal / noise), abs=1e-3)
        handle = layer.register_forward_hook(lambda m, a, o: captured.update(q=a[0].detach()))
        _logits(model, inputs)
        handle.remove()
        low = float(layer.act_scale) * (0 - float(layer.act_zero_point))
        high = float(layer.act_scale) * (255 - float(layer.act_zero_point))
        assert damaged.clipped_low == pytest.approx(float((captured["q"] < low).float().mean()))
        assert damaged.clipped_high == pytest.approx(float((captured["q"] > high).float().mean()))
        assert (damaged.input_low, damaged.input_high) == pytest.approx((low, high))
        # the first layer sees the same input either way: its own and inherited errors are one figure
        first = report.layers[0]
        assert first.own_sqnr_db == pytest.approx(first.inherited_sqnr_db, abs=1e-6)
    finally:
        layer.weight_bits = 8
        for name, buffer in saved.items():
            getattr(layer, name).copy_(buffer)


def _float_logits(model, inputs):
    layers = _layers(model).values()
    for layer in layers:
        layer.bypass = True
    try:
        return _logits(model, inputs)
    finally:
        for layer in layers:
            layer.bypass = False


def test_raising_a_layer_to_8_bits_keeps_its_input_range_and_rounds_weights_to_nearest(tiny_w8a8):
    model, _, _ = tiny_w8a8
    layer = _layers(model)[DAMAGED]
    saved = {name: buffer.clone() for name, buffer in layer.named_buffers(recurse=False)}
    layer.weight_bits, layer.act_bits = 2, 4  # as a W2A4 layer: 15 input steps over its range
    layer.set_weight_qparams(quant.weight_qparams(layer.layer.weight.detach(), 2, Observer.MSE)[0])
    layer.act_scale.mul_(255 / 15)
    low = float(layer.act_scale) * -float(layer.act_zero_point)
    high = float(layer.act_scale) * (15 - float(layer.act_zero_point))
    as_w2a4 = {name: buffer.clone() for name, buffer in layer.named_buffers(recurse=False)}
    try:
        with raised_to_8_bits(layer):
            assert (layer.weight_bits, layer.act_bits) == (8, 8)
            weight = layer.layer.weight.detach()
            step = quant.weight_qparams(weight, 8, Observer.MINMAX)[0]  # the full range, no clipping search
            assert torch.equal(layer.weight_scale, step)
            assert torch.equal(layer.weight_int.float(), torch.round(weight / step.view(-1, 1, 1, 1)).clamp(-128, 127))
            new_low = float(layer.act_scale) * -float(layer.act_zero_point)
            new_high = float(layer.act_scale) * (255 - float(layer.act_zero_point))
            assert float(layer.act_scale) == pytest.approx((high - low) / 255)
            assert new_low == pytest.approx(low, abs=float(layer.act_scale))  # within one 8-bit step
            assert new_high == pytest.approx(high, abs=float(layer.act_scale))
        assert (layer.weight_bits, layer.act_bits) == (2, 4)
        assert all(torch.equal(buffer, as_w2a4[name]) for name, buffer in layer.named_buffers(recurse=False))
    finally:
        layer.weight_bits = layer.act_bits = 8
        for name, buffer in saved.items():
            getattr(layer, name).copy_(buffer)


def test_debug_command_prints_a_table_json_and_html(monkeypatch, capsys, tmp_path, quantized_dirs):
    folder = str(quantized_dirs("w2a4"))
    page = tmp_path / "debug.html"
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "debug",
        folder,
        "--data",
        "fmnist-test",
        "--num-images",
        "32",
        "--html",
        str(page),
        "--json",
    )
    assert code in (0, None), err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["schema"] == "edgeq.debug/1" and result["images"] == 32 and result["ranked_by"] == "gain_at_8_bits"
    names = [layer["name"] for layer in result["layers"]]
    assert names[0] == "stem.0" and names[-1] == "classifier" and len(names) == 6
    assert result["layers"][0]["weight_bits"] == 8 and result["layers"][1]["weight_bits"] == 2
    assert set(result["worst"]) <= set(names) and 0 <= result["agreement_with_fp"] <= 1
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "data:image/png;base64," in text and "block_conv1.0" in text
    code, out, err = run_cli(monkeypatch, capsys, "debug", folder, "--num-images", "16", "--no-restore")
    assert code in (0, None), err
    assert "layers that lose the most (by own SQNR)" in out and "stem.0" in out
    _assert_one_line_error(run_cli(monkeypatch, capsys, "debug", str(tmp_path)), "manifest")


def _stretched_channel_model():
    """The tiny model with one channel between block_conv1 and block_conv2 made 30x larger and undone by
    block_conv2's weights: the same float function, but that channel's range stretched over every input of
    block_conv2.0 (the inter-channel imbalance cross-layer equalization undoes), so 4-bit inputs wreck it."""
    import copy

    loaded = load_model(TINY)
    module = copy.deepcopy(loaded.module).eval()
    norm, conv = module.get_submodule("block_conv1.1"), module.get_submodule("block_conv2.0")
    with torch.no_grad():
        norm.weight[0] *= 30
        norm.bias[0] *= 30
        conv.weight[:, 0] /= 30
    inputs = loaded.preprocess(resolve_dataset("fashion-mnist:A", 192).images)
    with torch.no_grad():
        same = torch.allclose(
            module(torch.from_numpy(inputs[:16])), loaded.module.eval()(torch.from_numpy(inputs[:16])), atol=1e-4
        )
    assert same  # the damage is invisible in full precision
    return module, inputs


def test_a_stretched_layer_is_ranked_first_by_the_debugger_and_raised_first_by_the_search():
    from edgeq import mixed
    from edgeq.layer_costs import ByteCosts, layer_shapes

    module, inputs = _stretched_channel_model()
    calibration, held_out = inputs[:64], inputs[64:]
    quantized = quantize_module(module, calibration, QuantSpec(4, 4), seed=0).eval()
    report = debug_model(quantized, held_out, progress=False)
    assert report.worst(1)[0].name == "block_conv2.0"
    by_own = sorted(report.layers, key=lambda layer: layer.own_sqnr_db)
    assert by_own[0].name == "block_conv2.0"

    ladder = [QuantSpec.load("w4a4"), QuantSpec.load("w8a8")]
    search = mixed.search_to_target(
        module, calibration, held_out, ladder, ByteCosts(), min_agreement=0.9, progress=False
    )
    assert search.promotions[0].layer == "block_conv2.0" and search.promotions[0].bits == (8, 8)
    assert search.reached and search.final_metric >= 0.9 > search.start_metric
    assert search.final_metric == search.promotions[-1].agreement
    assert dict((name, (w, a)) for name, w, a in search.spec.layers) == {p.layer: p.bits for p in search.promotions}
    # costs are the packed bytes of every layer at its final widths (edges at 8 bits)
    shapes = layer_shapes(module, torch.from_numpy(held_out[:1]))
    names = list(shapes)
    expected = sum(
        shapes[name].weights * search.spec.layer_bits(edge=name in (names[0], names[-1]), name=name)[0] / 8e6
        for name in names
    )
    assert search.cost == pytest.approx(expected)
    assert search.uniform_costs["w4a4"] < search.cost < search.uniform_costs["w8a8"]
    assert search.uniform_metrics["w4a4"] == search.start_metric < search.uniform_metrics["w8a8"]
    # a budget that cannot pay for the raise: an honest "not reached", at the start's agreement
    tight = mixed.search_to_target(
        module,
        calibration,
        held_out,
        ladder,
        ByteCosts(),
        min_agreement=0.9,
        budget=search.uniform_costs["w4a4"] + 1e-9,
        progress=False,
    )
    assert not tight.reached and tight.promotions == () and tight.final_metric == tight.start_metric


def test_mixed_to_an_agreement_target_on_the_command_line(monkeypatch, capsys, tmp_path):
    out = tmp_path / "mixed.json"
    args = ["mixed", TINY, "--calib", "fashion-mnist:A", "--num-images", "32", "--held-out", "64"]
    code, stdout, err = run_cli(
        monkeypatch,
        capsys,
        *args,
        "--min-agreement",
        "0.95",
        "--ladder",
        "w2a4,w8a8",
        "--budget-mb",
        "1",
        "-o",
        str(out),
    )
    assert code in (0, None), err
    record = json.loads(out.read_text())
    spec = QuantSpec.load(str(out))
    assert record["allocation"]["reached"] and record["allocation"]["final"] >= 0.95
    assert record["allocation"]["held_out_images"] == 64 and record["allocation"]["calibration_images"] == 32
    assert spec.layers and all((w, a) == (8, 8) for _, w, a in spec.layers)
    assert "reached agreement" in stdout and "uniform w2a4" in stdout
    few = tmp_path / "few"  # as many images as calibrate: none to check on
    few.mkdir()
    for index in range(32):
        Image.fromarray(np.full((28, 28), index * 8, np.uint8)).save(few / f"{index}.png")
    for extra, needles in [
        (["--min-agreement", "0.9", "--min-top1", "0.5", "--budget-mb", "1"], ("one accuracy target",)),
        (["--min-top1", "0.5", "--budget-mb", "1"], ("--min-top1 needs labelled images",)),
        (["--calib", str(few), "--min-agreement", "0.9", "--budget-mb", "1"], ("none left",)),
        (["--latency-budget-ms", "3"], ("accuracy target",)),
    ]:
        code, _, err = run_cli(monkeypatch, capsys, *args, *extra, "-o", str(tmp_path / "x.json"))
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code != 0 and len(errors) == 1 and "Traceback" not in err, err
    if all(shutil.which(tool) for tool in ("llvm-mca", "aarch64-linux-gnu-gcc", "qemu-aarch64")):
        # a board not at hand is priced by estimate: the search runs and says what it used (estimated afresh here)
        monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
        code, stdout, err = run_cli(
            monkeypatch, capsys, *args, "--min-agreement", "0.9", "--target", "rpi4", "-o", str(tmp_path / "arm.json")
        )
        assert code in (0, None), err
        assert "estimated kernel time for rpi4" in stdout and "reached agreement" in stdout
        assert all(needle in errors[0] for needle in needles), errors
    assert not (tmp_path / "x.json").exists()


def test_full_precision_is_the_float_model_even_after_bias_correction():
    from edgeq.quantized import float_biases
    from edgeq.reconstruction import ReconstructionConfig

    loaded = load_model(TINY)
    data = resolve_dataset("fashion-mnist:A", 96)
    inputs = loaded.preprocess(data.images)
    corrected = ReconstructionConfig(method="rtn", bias_correction=True)
    model = quantize_module(loaded.module, inputs[:48], QuantSpec(2, 4), seed=0, reconstruction=corrected).eval()
    float_logits = _logits(loaded.module.eval(), inputs[48:])
    quantized_logits = _logits(model, inputs[48:])
    report = debug_model(
        model, inputs[48:], labels=data.targets[48:], biases=float_biases(loaded.module), progress=False
    )
    assert report.fp_top1 == pytest.approx(float((float_logits.argmax(1) == data.targets[48:]).mean()))
    assert report.agreement == pytest.approx(float((quantized_logits.argmax(1) == float_logits.argmax(1)).mean()))
    assert np.array_equal(_logits(model, inputs[48:]), quantized_logits)  # corrected biases back in place
    # without the float biases, "full precision" would be the corrected model run in float: not the float model
    moved = debug_model(model, inputs[48:], labels=data.targets[48:], restore=False, progress=False)
    assert any(
        entry.inherited_sqnr_db != pytest.approx(other.inherited_sqnr_db)
        for entry, other in zip(report.layers, moved.layers)
    )


def test_debug_works_on_a_vision_transformer():
    """The zoo ViT at W4A4: every linear layer reported in execution order with finite figures, the model left as it
    was, and the agreement the model's own."""
    loaded = load_model("zoo:fmnist-vit")
    data = resolve_dataset("fashion-mnist:A", 48)
    inputs = loaded.preprocess(data.images)
    model = quantize_module(loaded.module, inputs[:24], QuantSpec(4, 4), seed=0).eval()
    checked = inputs[24:]
    before = _logits(model, checked)
    report = debug_model(model, checked, labels=data.targets[24:], progress=False)
    assert np.array_equal(_logits(model, checked), before)
    names = [entry.name for entry in report.layers]
    assert sorted(names) == sorted(_layers(model)) and len(names) > 8
    assert {entry.kind for entry in report.layers} >= {"linear"}
    for entry in report.layers:
        assert math.isfinite(entry.own_sqnr_db) and entry.own_sqnr_db > 0
        assert 0.0 <= entry.clipped_low <= 1.0 and 0.0 <= entry.clipped_high <= 1.0
    assert report.agreement == pytest.approx(
        float((before.argmax(1) == _float_logits(model, checked).argmax(1)).mean())
    )


def test_a_lower_targets_search_is_a_prefix_of_a_higher_ones():
    """One search to the highest target serves every lower one (the sweep's --auto-mixed relies on it): cut where
    the lower target is first reached, it equals a search run to that target on its own."""
    from edgeq import mixed
    from edgeq.layer_costs import ByteCosts

    loaded = load_model(TINY)
    inputs = loaded.preprocess(resolve_dataset("fashion-mnist:A", 96).images)
    ladder = [QuantSpec.load("w2a4"), QuantSpec.load("w4a4"), QuantSpec.load("w8a8")]

    def search(target):
        return mixed.search_to_target(
            loaded.module, inputs[:48], inputs[48:], ladder, ByteCosts(), min_agreement=target, progress=False
        )

    high = search(0.99)
    assert len(high.promotions) >= 3
    lower = high.promotions[len(high.promotions) // 2].metric  # reached midway
    alone, cut = search(lower), high.stopped_at(lower)
    assert cut.spec == alone.spec and cut.promotions == alone.promotions
    assert cut.reached and cut.final_metric == alone.final_metric and cut.cost == pytest.approx(alone.cost)
    assert high.stopped_at(high.start_metric).promotions == ()  # a target the start already meets: no raise
    with pytest.raises(ValueError):
        high.stopped_at(1.0 + 1e-9)
