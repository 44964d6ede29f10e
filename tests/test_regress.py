"""The regression gate: exit codes, thresholds in points and percent, and bad input."""

import json

import pytest

from .test_cli import _assert_one_line_error, run_cli


def _report(top1, latency_ms, bits="w2a4", target="x86-avx2"):
    return {
        "schema": "edgeq.verify/1",
        "model": "zoo:fmnist-resnet",
        "target": target,
        "bits": bits,
        "compiled_top1": top1,
        "latency_ms": latency_ms,
    }


def _write(path, report):
    path.write_text(json.dumps(report))
    return str(path)


def _sweep(*entries):
    return {"schema": "edgeq.sweep/1", "entries": list(entries)}


@pytest.mark.parametrize(
    "top1, latency, code",
    [
        (0.900, 10.0, 0),  # unchanged
        (0.896, 10.9, 0),  # 0.4 points and 9%: inside 0.5 points and 10%
        (0.894, 10.0, 1),  # 0.6 points
        (0.900, 11.2, 1),  # 12%
        (0.950, 5.0, 0),  # better on both
    ],
)
def test_gate_exit_codes(monkeypatch, capsys, tmp_path, top1, latency, code):
    baseline = _write(tmp_path / "base.json", _report(0.900, 10.0))
    current = _write(tmp_path / "new.json", _report(top1, latency))
    result, out, _ = run_cli(
        monkeypatch,
        capsys,
        "regress",
        "--baseline",
        baseline,
        "--current",
        current,
        "--max-acc-drop",
        "0.5",
        "--max-latency-increase",
        "10%",
    )
    assert result == code
    assert "| zoo:fmnist-resnet | x86-avx2 | w2a4 |" in out
    assert ("FAIL" in out) == (code == 1)


def test_gate_matches_sweep_entries_and_fails_on_a_missing_one(monkeypatch, capsys, tmp_path):
    baseline = _write(tmp_path / "base.json", _sweep(_report(0.9, 10.0), _report(0.8, 6.0, bits="w4a4")))
    same = _write(tmp_path / "same.json", _sweep(_report(0.8, 6.0, bits="w4a4"), _report(0.9, 10.0)))
    code, out, _ = run_cli(
        monkeypatch, capsys, "regress", "--baseline", baseline, "--current", same, "--max-acc-drop", "0"
    )
    assert code == 0 and "all 2 entries within bounds" in out
    fewer = _write(tmp_path / "fewer.json", _sweep(_report(0.9, 10.0)))
    code, out, _ = run_cli(
        monkeypatch, capsys, "regress", "--baseline", baseline, "--current", fewer, "--max-acc-drop", "1", "--json"
    )
    result = json.loads(out)
    assert code == 1 and not result["ok"]
    assert [row["problems"] for row in result["rows"] if not row["ok"]] == [["missing from the current report"]]


def test_emulated_runs_are_not_gated_on_latency_but_must_be_gated_on_something(monkeypatch, capsys, tmp_path):
    baseline = _write(tmp_path / "base.json", _report(0.9, None, target="rpi4"))
    current = _write(tmp_path / "new.json", _report(0.9, None, target="rpi4"))
    gate = ["regress", "--baseline", baseline, "--current", current, "--max-latency-increase", "1%"]
    code, out, _ = run_cli(monkeypatch, capsys, *gate, "--max-acc-drop", "0.5")
    assert code == 0 and "latency measured in neither report" in out
    code, out, _ = run_cli(monkeypatch, capsys, *gate)  # latency alone: nothing could be checked
    assert code == 2 and "CANNOT GATE" in out and "could not be gated" in out


@pytest.mark.parametrize(
    "base, new, code, words",
    [
        ((0.9, 10.0), (None, 10.0), 1, "compiled top-1 missing"),  # the baseline had one
        ((0.9, 10.0), (float("nan"), 10.0), 2, "not a finite"),
        ((0.9, 10.0), ("0.9", 10.0), 2, "not a finite"),
        ((None, 10.0), (None, 10.0), 2, "baseline has no compiled top-1"),  # unlabelled data: nothing to gate
        ((0.9, 10.0), (0.9, -1.0), 2, "latency_ms is not a positive"),
        ((0.9, 10.0), (0.9, None), 1, "latency missing"),
    ],
)
def test_missing_or_broken_figures_fail_closed(monkeypatch, capsys, tmp_path, base, new, code, words):
    baseline = _write(tmp_path / "base.json", _report(*base))
    current = tmp_path / "new.json"
    current.write_text(json.dumps(_report(*new)))  # NaN written as JSON's NaN, as Python writes it
    result, out, _ = run_cli(
        monkeypatch,
        capsys,
        "regress",
        "--baseline",
        baseline,
        "--current",
        str(current),
        "--max-acc-drop",
        "0.5",
        "--max-latency-increase",
        "10%",
    )
    assert result == code and words in out


def test_no_threshold_and_malformed_entries_are_errors(monkeypatch, capsys, tmp_path):
    good = _write(tmp_path / "good.json", _report(0.9, 1.0))
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "regress", "--baseline", good, "--current", good), "no threshold"
    )
    for broken in (
        _sweep({"model": "m", "target": "t"}),
        _sweep("not an entry"),
        {"schema": "edgeq.sweep/1", "entries": {"a": 1}},
        {**_report(0.9, 1.0), "model": None},
    ):
        path = _write(tmp_path / "broken.json", broken)
        code, _, err = run_cli(
            monkeypatch, capsys, "regress", "--baseline", good, "--current", path, "--max-acc-drop", "1"
        )
        assert code == 2 and err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_reports_are_one_line_errors(monkeypatch, capsys, tmp_path):
    good = _write(tmp_path / "good.json", _report(0.9, 1.0))
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "regress", "--baseline", str(tmp_path / "none.json"), "--current", good),
        "does not exist",
    )
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "regress", "--baseline", str(broken), "--current", good), "not JSON"
    )
    other = _write(tmp_path / "other.json", {"schema": "something/1"})
    _assert_one_line_error(run_cli(monkeypatch, capsys, "regress", "--baseline", other, "--current", good), "schema")
    _assert_one_line_error(
        run_cli(
            monkeypatch, capsys, "regress", "--baseline", good, "--current", good, "--max-latency-increase", "fast"
        ),
        "percentage",
    )


def test_an_automatically_chosen_mixed_spec_is_gated_by_its_target_not_its_layers(monkeypatch, capsys, tmp_path):
    def chosen(digest, top1):
        entry = _report(top1, 10.0, bits=f"w2a4-mixed-{digest}")
        return entry | {"auto_mixed": {"min_agreement": 0.98}}

    baseline = _write(tmp_path / "base.json", _sweep(_report(0.5, 5.0), chosen("aaaaaa", 0.90)))
    current = _write(tmp_path / "new.json", _sweep(_report(0.5, 5.0), chosen("bbbbbb", 0.80)))
    result, out, _ = run_cli(
        monkeypatch, capsys, "regress", "--baseline", baseline, "--current", current, "--max-acc-drop", "0.5"
    )
    # the search chose other layers this time, and the configuration lost 10 points: caught, not "missing"
    assert result == 1 and "auto-mixed ≥98% agreement" in out and "missing" not in out
