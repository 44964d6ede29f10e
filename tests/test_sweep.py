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
