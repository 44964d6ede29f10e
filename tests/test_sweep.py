"""Sweeps and their reports on the tiny model: entries, reuse, the Pareto front, the plots."""

import json

import numpy as np
from edgeq.targets import get_target
from PIL import Image

from edgeq import reports
from edgeq.pipeline import RunOptions
from edgeq.spec import QuantSpec
from edgeq.stages import sweep as sweep_stage

from .conftest import TINY


def test_pareto_front_keeps_only_undominated_points():
    points = [(10.0, 0.90), (5.0, 0.85), (6.0, 0.80), (12.0, 0.90), (4.0, 0.50)]
    assert reports.pareto_front(points) == [4, 1, 0]


def test_sweep_writes_a_report_and_reuses_stages(tmp_path, tiny_generator):
    # evaluated on the calibration images: the tiny generator's images are far from Fashion-MNIST, so on real
    # images even w8a8 saturates; in distribution, the error reflects the bit widths alone
    options = RunOptions(
        run_dir=str(tmp_path / "run"),
        generator=tiny_generator,
        num_images=16,
        method="rtn",
        eval_data=str(tmp_path / "run" / "synth"),
        eval_images=60,
        latency_runs=3,
    )
    specs = [QuantSpec.parse("w8a8"), QuantSpec.parse("w2a4")]
    report = sweep_stage.run(
        TINY, tmp_path / "sweep", specs=specs, targets=[get_target("x86")] * 2, options=options, layer_error_images=8
    )
    assert report["schema"] == "edgeq.sweep/1" and report["cost_axis"] == "latency_ms"
    entries = report["entries"]
    assert [e["bits"] for e in entries] == ["w8a8", "w2a4"]
    assert entries[1]["stages"]["synth"] == "reused"  # one calibration set for the whole sweep
    assert json.loads((tmp_path / "sweep" / "report.json").read_text()) == report
    for entry in entries:
        assert entry["latency_ms"] > 0 and entry["module_bytes"] > 0
        sqnr = [layer["sqnr_db"] for layer in entry["layer_sqnr_db"]]
        assert len(sqnr) >= 3
    # 8-bit layers are far more faithful than 2-bit ones (error accumulates, so compare means)
    mean = {e["bits"]: np.mean([min(layer["sqnr_db"], 80) for layer in e["layer_sqnr_db"]]) for e in entries}
    assert mean["w8a8"] > mean["w2a4"] + 10
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "| x86 | rtn |" in line]
    assert len(rows) == 2 and any(
        row.startswith("| ★ |") for row in rows
    )  # at least one configuration is Pareto-optimal
    for png in (reports.PARETO_PNG, reports.LAYERS_PNG):
        with Image.open(tmp_path / "sweep" / png) as image:
            assert image.size[0] > 500 and image.size[1] > 300
    again = sweep_stage.run(
        TINY, tmp_path / "sweep", specs=specs, targets=[get_target("x86")], options=options, layer_error_images=8
    )
    assert all(set(e["stages"].values()) == {"reused"} for e in again["entries"])


def test_sweep_adds_an_automatically_chosen_mixed_spec_beside_the_uniform_ones(tmp_path, tiny_generator):
    options = RunOptions(
        run_dir=str(tmp_path / "run"),
        generator=tiny_generator,
        num_images=24,
        method="rtn",
        eval_data=str(tmp_path / "run" / "synth"),
        eval_images=24,
        latency_runs=3,
    )
    ladder = [QuantSpec.parse("w2a4"), QuantSpec.parse("w8a8")]
    report = sweep_stage.run(
        TINY,
        tmp_path / "sweep",
        specs=ladder,
        targets=[get_target("x86")],
        options=options,
        layer_error_images=8,
        auto_mixed=[0.99],
        ladder=ladder,
    )
    uniform, chosen = report["entries"][:2], report["entries"][2]
    assert [e["bits"] for e in uniform] == ["w2a4", "w8a8"] and not any("auto_mixed" in e for e in uniform)
    auto = chosen["auto_mixed"]
    assert auto["min_agreement"] == 0.99 and auto["held_out_images"] == 12  # half of the 24 calibration images
    assert auto["reached"] == (auto["held_out_agreement"] >= 0.99)
    if auto["uniform_agreement"]["w2a4"] < 0.99:
        assert auto["raised"]  # uniform w2a4 falls short, so the search had to raise something
    # priced by the kernels' measured time on the target: the uniform rungs bracket the chosen spec
    assert auto["unit"] == "ms" and "measured kernel time" in auto["cost_model"]
    assert auto["uniform_costs"]["w2a4"] <= auto["cost"] <= auto["uniform_costs"]["w8a8"] + 1e-9
    # the spec file beside the report is what ran, and reads back as a --bits argument
    spec = QuantSpec.load(str(tmp_path / "sweep" / auto["spec_file"]))
    assert str(spec) == chosen["bits"]
    # two rungs: each raised layer appears once in the spec, at the top rung
    assert sorted(entry[0] for entry in spec.layers) == sorted(auto["raised"])
    assert all(tuple(entry[1:]) == (8, 8) for entry in spec.layers)
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert "(auto ≥99%" in summary and auto["spec_file"] in summary
