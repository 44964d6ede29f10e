"""Mixed precision on the tiny model: sensitivities, the allocation under a size budget,
and a mixed spec through quantize, export and compile."""

import dataclasses
import json

import pytest
from edgeq.targets import get_target

from edgeq import mixed
from edgeq.data import resolve_dataset
from edgeq.errors import EdgeqError
from edgeq.evaluate import predict
from edgeq.models import load_model
from edgeq.pipeline import RunOptions, run
from edgeq.spec import QuantSpec

from .conftest import TINY
from .test_cli import _assert_one_line_error, run_cli

HIGH, LOW = QuantSpec.load("w4a4"), QuantSpec.load("w2a4")


@pytest.fixture(scope="module")
def tiny_sensitivity():
    loaded = load_model(TINY)
    inputs = loaded.preprocess(resolve_dataset("fashion-mnist:A", 48).images)
    return loaded, inputs, mixed.sensitivities(loaded.module, inputs, HIGH, LOW)


def test_sensitivity_is_measured_per_middle_layer(tiny_sensitivity):
    _, _, layers = tiny_sensitivity
    assert layers[0].edge and layers[-1].edge and not any(layer.edge for layer in layers[1:-1])
    assert all(layer.sensitivity == 0.0 for layer in layers if layer.edge)
    middle = [layer.sensitivity for layer in layers[1:-1]]
    assert max(middle) > 0  # 2-bit weights cost something somewhere
    assert all(layer.high == (4, 4) and layer.low == (2, 4) for layer in layers[1:-1])


def test_allocation_fits_the_budget_and_lowers_the_cheap_layers_first(tiny_sensitivity):
    loaded, inputs, layers = tiny_sensitivity
    all_high, all_low = mixed.weight_bytes(layers, HIGH), mixed.weight_bytes(layers, LOW)
    budget = (all_high + all_low) / 2
    spec, lowered = mixed.allocate(layers, HIGH, budget)
    assert mixed.weight_bytes(layers, spec) <= budget and 0 < len(lowered) < len(layers) - 2
    assert {name for name, _, _ in spec.layers} == set(lowered) and str(spec).startswith("w4a4-mixed-")
    # the same number of layers lowered, chosen as the most sensitive per byte instead: worse
    middle = sorted(layers[1:-1], key=lambda layer: layer.sensitivity / layer.weights, reverse=True)
    worst = dataclasses.replace(HIGH, layers=tuple((layer.name, 2, 4) for layer in middle[: len(lowered)]))
    fp = predict(loaded.module.eval(), inputs)
    chosen_kl = mixed._mean_kl(fp, mixed._quantized_logits(loaded.module, inputs, spec, 0)[0])
    worst_kl = mixed._mean_kl(fp, mixed._quantized_logits(loaded.module, inputs, worst, 0)[0])
    if set(lowered) != {layer.name for layer in middle[: len(lowered)]}:
        assert chosen_kl < worst_kl
    with pytest.raises(EdgeqError, match="below the smallest allocation"):
        mixed.allocate(layers, HIGH, all_low * 0.9)
    unchanged, none = mixed.allocate(layers, HIGH, all_high)
    assert none == [] and unchanged == HIGH


def test_mixed_spec_file_runs_through_the_pipeline(tmp_path, tiny_sensitivity, tiny_generator):
    _, _, layers = tiny_sensitivity
    spec, lowered = mixed.allocate(
        layers, HIGH, (mixed.weight_bytes(layers, HIGH) + mixed.weight_bytes(layers, LOW)) / 2
    )
    path = mixed.write_spec(spec, layers, lowered, tmp_path / "mixed.json", budget_bytes=1.0)
    assert QuantSpec.load(str(path)) == spec
    assert json.loads(path.read_text())["allocation"]["lowered"] == lowered
    summary = run(
        TINY,
        RunOptions(
            target=get_target("x86"),
            spec=QuantSpec.load(str(path)),
            run_dir=str(tmp_path / "run"),
            generator=tiny_generator,
            num_images=16,
            method="rtn",
            eval_images=50,
            latency_runs=2,
        ),
    )
    assert summary["bits"] == str(spec) and summary["agreement_with_onnxruntime"] >= 0.98
    assert summary["agreement_with_reference"] == 1.0
    from edgeq.quantized import QuantizedLayer, load

    model, _, loaded_spec, _ = load(summary["stage_dirs"]["quantize"])
    bits = {name: (m.weight_bits, m.act_bits) for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    assert loaded_spec == spec and all(bits[name] == (2, 4) for name in lowered)
    assert all(bits[layer.name] == (4, 4) for layer in layers[1:-1] if layer.name not in lowered)


def test_compile_one_shot_takes_a_spec_file_and_records_the_host_as_a_concrete_target(
    monkeypatch, capsys, tmp_path, tiny_sensitivity, tiny_generator
):
    from edgeq.targets import host_target

    from edgeq.manifest import Manifest
    from edgeq.quantized import QuantizedLayer, load

    _, _, layers = tiny_sensitivity
    # first_last_bits 2: the first and last layer at the spec's own widths (what null used to mean); one layer raised
    spec = dataclasses.replace(LOW, first_last_bits=2, weight_observer="minmax", layers=((layers[1].name, 4, 4),))
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.to_dict()))
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "compile",
        TINY,
        "--bits",
        str(path),
        "--method",
        "rtn",
        "--generator",
        tiny_generator,
        "--num-images",
        "16",
        "--eval-images",
        "50",
        "--latency-runs",
        "2",
        "--run-dir",
        str(tmp_path / "run"),
        "--json",
    )
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    host = host_target().name
    assert summary["bits"] == str(spec) and summary["target"] == host != "host"
    assert summary["agreement_with_onnxruntime"] >= 0.98 and summary["latency_ms"] > 0
    assert summary["agreement_with_reference"] == 1.0
    dirs = summary["stage_dirs"]
    assert dirs["compile"].endswith(f"-rtn-{host}") and dirs["verify"].endswith(f"-rtn-{host}")
    assert (
        Manifest.load(dirs["compile"], "compile").target == host
        and Manifest.load(dirs["verify"], "verify").target == host
    )
    model, _, loaded_spec, _ = load(dirs["quantize"])
    assert loaded_spec == spec
    bits = {name: (m.weight_bits, m.act_bits) for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    assert bits[layers[0].name] == bits[layers[-1].name] == (2, 4)  # not the 8 bits a plain w2a4 gives them
    assert bits[layers[1].name] == (4, 4) and all(bits[layer.name] == (2, 4) for layer in layers[2:-1])


@pytest.mark.parametrize("field", ["first_last_bits", "act_bits"])
@pytest.mark.parametrize("command", ["compile", "quantize"])
def test_a_spec_file_with_a_null_or_missing_field_is_a_one_line_error(monkeypatch, capsys, tmp_path, field, command):
    data = LOW.to_dict()
    path = tmp_path / "null.json"
    path.write_text(json.dumps(data | {field: None}))
    extra = (
        ["--calib", "fashion-mnist:A", "-o", str(tmp_path / "q")]
        if command == "quantize"
        else ["--run-dir", str(tmp_path / "run")]
    )
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, command, TINY, "--bits", str(path), *extra), f"'{field}'", "null"
    )
    del data[field]
    path.write_text(json.dumps(data))
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, command, TINY, "--bits", str(path), *extra), f"'{field}'", "lacks"
    )
    assert not (tmp_path / "q").exists() and not (tmp_path / "run").exists()


def test_bad_mixed_specs_are_one_line_errors(monkeypatch, capsys, tmp_path):
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps(HIGH.to_dict() | {"layers": [["no.such.layer", 2, 4]]}))
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "quantize",
        TINY,
        "--calib",
        "fashion-mnist:A",
        "--bits",
        str(spec),
        "--num-images",
        "8",
        "-o",
        str(tmp_path / "q"),
    )
    errors = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert (
        code == 2
        and len(errors) == 1
        and "no.such.layer" in errors[0]
        and "stem.0" in errors[0]
        and "Traceback" not in err
    )
    assert not (tmp_path / "q").exists()
    spec.write_text(json.dumps(HIGH.to_dict() | {"layers": [["stem.0", 9, 4]]}))
    _assert_one_line_error(
        run_cli(
            monkeypatch,
            capsys,
            "mixed",
            TINY,
            "--calib",
            "fashion-mnist:A",
            "--high",
            str(spec),
            "--budget-mb",
            "1",
            "-o",
            str(tmp_path / "m.json"),
        ),
        "bit width 9",
    )


def test_layer_bits_parse_globs_and_order():
    from edgeq.spec import LayerOverride, apply_layer_bits, parse_layer_bits

    overrides = parse_layer_bits("stem.0=8, block_*=w4a4,block_conv2.0=w3a4")
    assert overrides == (
        LayerOverride("stem.0", 8, 8),
        LayerOverride("block_*", 4, 4),
        LayerOverride("block_conv2.0", 3, 4),
    )
    names = ["stem.0", "block_conv1.0", "block_conv2.0", "down1.0", "classifier"]
    spec = apply_layer_bits(LOW, overrides, names)
    # a later entry wins; the first layer's override beats nothing, the last keeps the first/last rule
    assert spec.layers == (("block_conv1.0", 4, 4), ("block_conv2.0", 3, 4), ("stem.0", 8, 8))
    assert spec.layer_bits(edge=False, name="down1.0") == (2, 4)
    assert spec.layer_bits(edge=True, name="classifier") == (8, 8)
    # an override beats the first/last rule, and '*' spans dots
    assert apply_layer_bits(LOW, "*=w2a4", names).layer_bits(edge=True, name="classifier") == (2, 4)
    with pytest.raises(EdgeqError, match="'blok_\\*' matches no quantizable layer") as caught:
        apply_layer_bits(LOW, "blok_*=4", names)
    assert "block_conv1.0" in caught.value.hint
    for bad, words in [("stem.0", "invalid --layer-bits entry"), ("stem.0=w9a4", "bit widths run"), ("x=abc", "bits")]:
        with pytest.raises(EdgeqError, match=words):
            parse_layer_bits(bad)


def test_layer_bits_reach_the_quantized_layers_and_the_manifest(monkeypatch, capsys, tmp_path):
    from edgeq.quantized import QuantizedLayer, load

    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "quantize",
        TINY,
        "--calib",
        "fashion-mnist:A",
        "--bits",
        "w2a4",
        "--layer-bits",
        "block_conv*=w4a4,classifier=w2a4",
        "--method",
        "rtn",
        "--num-images",
        "16",
        "-o",
        str(tmp_path / "q"),
    )
    assert code == 0, err
    model, _, spec, _ = load(tmp_path / "q")
    assert spec.layers == (("block_conv1.0", 4, 4), ("block_conv2.0", 4, 4), ("classifier", 2, 4))
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["spec"]["layers"] == [list(entry) for entry in spec.layers]
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    assert {name: (m.weight_bits, m.act_bits) for name, m in layers.items()} == {
        "stem.0": (8, 8),
        "block_conv1.0": (4, 4),
        "block_conv2.0": (4, 4),
        "down1.0": (2, 4),
        "down2.0": (2, 4),
        "classifier": (2, 4),
    }
    # the weights really are on those grids: integer codes within each layer's signed range, 4-bit ones beyond 2 bits
    for name, layer in layers.items():
        codes = layer.weight_int
        low, high = -(2 ** (layer.weight_bits - 1)), 2 ** (layer.weight_bits - 1) - 1
        assert low <= codes.min() and codes.max() <= high, name
        if layer.weight_bits == 4:
            assert codes.abs().max() > 2, name
    _assert_one_line_error(
        run_cli(
            monkeypatch,
            capsys,
            "quantize",
            TINY,
            "--calib",
            "fashion-mnist:A",
            "--layer-bits",
            "blocks.*=4",
            "-o",
            str(tmp_path / "bad"),
        ),
        "matches no quantizable layer",
        "block_conv",
    )
    assert not (tmp_path / "bad").exists()


def test_compile_one_shot_takes_layer_bits(monkeypatch, capsys, tmp_path):
    from edgeq.quantized import QuantizedLayer, load

    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "compile",
        TINY,
        "--bits",
        "w2a4",
        "--layer-bits",
        "down*=w4a4",
        "--calib",
        "fashion-mnist:A",
        "--method",
        "rtn",
        "--num-images",
        "16",
        "--eval-images",
        "20",
        "--latency-runs",
        "1",
        "--target",
        "x86",
        "--run-dir",
        str(tmp_path / "run"),
        "--json",
    )
    assert code in (0, None), err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["bits"].startswith("w2a4-mixed-") and summary["agreement_with_reference"] == 1.0
    model, _, spec, _ = load(summary["stage_dirs"]["quantize"])
    assert spec.layers == (("down1.0", 4, 4), ("down2.0", 4, 4))
    bits = {name: (m.weight_bits, m.act_bits) for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    assert bits["down1.0"] == bits["down2.0"] == (4, 4) and bits["block_conv1.0"] == (2, 4)
