import json

import pytest

from edgeq import EdgeqError, Observer, QuantSpec


@pytest.mark.parametrize("text", ["w2a4", "w3a3", "w4a4", "w4a8", "w8a8"])
def test_short_form_round_trips(text):
    spec = QuantSpec.parse(text)
    assert str(spec) == text
    assert QuantSpec.parse(str(spec)) == spec
    assert QuantSpec.from_json(spec.to_json()) == spec


def test_parse_reads_bits_and_defaults():
    spec = QuantSpec.parse("W2A4")
    assert (spec.weight_bits, spec.act_bits) == (2, 4)
    assert spec.weight_range == (-2, 1)
    assert spec.act_range == (0, 15)
    assert spec.weight_observer is Observer.MSE


def test_json_keeps_observers():
    spec = QuantSpec(4, 8, weight_observer="minmax", act_observer=Observer.MSE)
    data = json.loads(spec.to_json())
    assert data["weight_observer"] == "minmax" and data["bits"] == "w4a8"
    assert QuantSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("text", ["w9a4", "w1a4", "w4a9", "w4", "4a4", "", "w2a4x", "a4w2", "w-2a4"])
def test_malformed_strings_show_the_valid_form(text):
    with pytest.raises(EdgeqError) as info:
        QuantSpec.parse(text)
    assert "wWaA" in info.value.hint


def test_unknown_observer_lists_choices():
    with pytest.raises(EdgeqError, match="observer"):
        QuantSpec(4, 4, weight_observer="percentile")


def test_first_and_last_layer_bits_round_trip_and_load_from_a_file(tmp_path):
    spec = QuantSpec.parse("w2a4")
    assert spec.first_last_bits == 8 and spec.layer_bits(edge=True) == (8, 8) and spec.layer_bits(edge=False) == (2, 4)
    uniform = QuantSpec(2, 4, first_last_bits=None)
    assert uniform.layer_bits(edge=True) == (2, 4) and QuantSpec.from_json(uniform.to_json()) == uniform
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(QuantSpec(3, 4, first_last_bits=6).to_dict()))
    assert QuantSpec.load(str(path)) == QuantSpec(3, 4, first_last_bits=6)
    assert (
        QuantSpec.from_dict({"weight_bits": 2, "act_bits": 4}).first_last_bits == 8
    )  # manifests made before the field
    assert spec.matmul_act_bits == 8 and QuantSpec(2, 4, attention_bits=None).matmul_act_bits == 4
    asymmetric = QuantSpec(2, 4, weight_symmetric=False, attention_bits=6)
    assert QuantSpec.from_json(asymmetric.to_json()) == asymmetric and QuantSpec.parse("w2a4").weight_symmetric
    with pytest.raises(EdgeqError, match="spec file not found"):
        QuantSpec.load(str(tmp_path / "missing.json"))
    path.write_text("{")
    with pytest.raises(EdgeqError, match="not valid JSON"):
        QuantSpec.load(str(path))
    with pytest.raises(EdgeqError, match="first/last layer bit width"):
        QuantSpec(2, 4, first_last_bits=9)


FULL_FILE = {
    "weight_bits": 2,
    "act_bits": 4,
    "weight_observer": "minmax",
    "act_observer": "mse",
    "first_last_bits": 6,
    "weight_symmetric": False,
    "attention_bits": 8,
}


def test_a_spec_file_loads_every_field_it_states(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(
        json.dumps(FULL_FILE | {"layers": [["fc", 4, 4]], "allocation": {"budget_mb": 1}})
    )  # edgeq mixed adds "allocation"
    spec = QuantSpec.load(str(path))
    assert spec == QuantSpec(
        2, 4, weight_observer="minmax", first_last_bits=6, weight_symmetric=False, layers=(("fc", 4, 4),)
    )
    assert spec.layer_bits(edge=True) == (6, 6) and spec.layer_bits(edge=False, name="fc") == (4, 4)
    # the documented way to keep the first and last layer at the spec's widths: the least bits there is 2
    path.write_text(json.dumps(FULL_FILE | {"first_last_bits": 2}))
    assert QuantSpec.load(str(path)).layer_bits(edge=True) == (2, 4)


@pytest.mark.parametrize(
    "field",
    [
        "weight_bits",
        "act_bits",
        "weight_observer",
        "act_observer",
        "first_last_bits",
        "weight_symmetric",
        "attention_bits",
    ],
)
@pytest.mark.parametrize("how", ["missing", "null"])
def test_a_spec_file_with_a_missing_or_null_field_names_it(tmp_path, field, how):
    data = dict(FULL_FILE)
    if how == "missing":
        del data[field]
    else:
        data[field] = None
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    with pytest.raises(EdgeqError) as info:
        QuantSpec.load(str(path))
    assert f"'{field}'" in info.value.message and str(path) in info.value.message
    assert ("lacks" if how == "missing" else "is null") in info.value.message
    assert "\n" not in info.value.message + info.value.hint


@pytest.mark.parametrize(
    "field, value", [("weight_symmetric", "false"), ("first_last_bits", 8.5), ("act_bits", "4"), ("layers", None)]
)
def test_a_spec_file_with_a_wrongly_typed_field_names_it(tmp_path, field, value):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(FULL_FILE | {field: value}))
    with pytest.raises(EdgeqError, match=f"'{field}'"):
        QuantSpec.load(str(path))


def test_a_spec_file_with_an_unknown_field_names_it_and_any_case_of_json_loads(tmp_path):
    path = tmp_path / "spec.JSON"
    path.write_text(json.dumps(FULL_FILE | {"weight_symetric": False}))  # misspelt: would be ignored
    with pytest.raises(EdgeqError, match="'weight_symetric'"):
        QuantSpec.load(str(path))
    path.write_text(json.dumps(FULL_FILE))
    assert QuantSpec.load(str(path)).weight_bits == FULL_FILE["weight_bits"]
