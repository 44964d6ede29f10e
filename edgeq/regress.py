"""The CI regression gate: compare two reports, entry by entry, against thresholds.

A report is a verify report (``report.json`` of ``edgeq verify``, schema ``edgeq.verify/1``)
or a sweep report (``edgeq.sweep/1``, a list of them under ``entries``). Entries are
matched by (model, target, bits). An entry regresses when its compiled top-1 drops by more
than ``max_acc_drop`` percentage points, or its median latency rises by more than
``max_latency_increase`` (a fraction); an entry of the baseline missing from the current
report also fails the gate, and so does a figure the baseline has and the current report
lacks (null, NaN or negative). The gate fails closed: a threshold that no entry could be
checked against (top-1 of unlabelled data, latency of emulated runs in both reports), a
baseline without the gated figure, or no threshold at all is bad input, never a pass.
Latency missing from both reports of an entry (emulated runs measure none) is not
compared when another threshold gates that entry.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .errors import EdgeqError

SCHEMAS = ("edgeq.verify/1", "edgeq.sweep/1")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    max_acc_drop: float | None = None  # percentage points of top-1
    max_latency_increase: float | None = None  # fraction: 0.1 is 10%


@dataclasses.dataclass(frozen=True)
class Row:
    model: str
    target: str
    bits: str
    baseline_top1: float | None
    current_top1: float | None
    baseline_latency_ms: float | None
    current_latency_ms: float | None
    problems: tuple[str, ...]  # regressions: exit 1
    errors: tuple[str, ...] = ()  # figures that cannot be gated: exit 2
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems and not self.errors


def parse_percent(text: str) -> float:
    """'10%' or '10' -> 0.10."""
    value = text.strip().removesuffix("%")
    try:
        fraction = float(value) / 100.0
    except ValueError:
        raise EdgeqError(
            f"latency threshold {text!r} is not a percentage", "for example --max-latency-increase 10%"
        ) from None
    if fraction < 0:
        raise EdgeqError(f"latency threshold {text!r} is negative", "give the allowed increase, for example 10%")
    return fraction


def load_entries(path: str | Path) -> dict[tuple[str, str, str], dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgeqError(f"{path} does not exist", "pass a report.json of 'edgeq verify' or 'edgeq sweep'") from None
    except json.JSONDecodeError as exc:
        raise EdgeqError(
            f"{path} is not JSON ({exc.msg} at line {exc.lineno})",
            "pass a report.json of 'edgeq verify' or 'edgeq sweep'",
        ) from None
    schema = report.get("schema") if isinstance(report, dict) else None
    if schema not in SCHEMAS:
        raise EdgeqError(
            f"{path} has schema {schema!r}, not one of {', '.join(SCHEMAS)}",
            "pass a report.json of 'edgeq verify' or 'edgeq sweep'",
        )
    entries = report.get("entries") if schema == "edgeq.sweep/1" else [report]
    if not isinstance(entries, list):
        raise EdgeqError(f"{path} has no list of entries", "pass a report.json written by 'edgeq sweep'")
    keyed = {}
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("model", "target", "bits")):
            raise EdgeqError(
                f"{path}: entry {number} lacks a model, target or bits string",
                "pass a report.json written by 'edgeq verify' or 'edgeq sweep'",
            )
        key = (entry["model"], entry["target"], _bits_key(entry))
        if key in keyed:
            raise EdgeqError(
                f"{path} has two entries for {' '.join(key)}", "keep one verify run per model, target and bit width"
            )
        keyed[key] = entry
    return keyed


def _bits_key(entry: dict) -> str:
    """A sweep's automatically chosen mixed spec is matched by what it was chosen for, not by its layers: a search
    that picks other layers in the next run is the same configuration, to be gated like the others."""
    auto = entry.get("auto_mixed")
    level = auto.get("min_agreement") if isinstance(auto, dict) else None
    if isinstance(level, (int, float)) and not isinstance(level, bool):
        return f"auto-mixed ≥{100 * level:g}% agreement"
    return entry["bits"]


def _figure(entry: dict | None, field: str):
    """(value, invalid): a finite, non-negative number, or None; ``invalid`` when present but not such a number."""
    if entry is None or entry.get(field) is None:
        return None, False
    value = entry[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None, True
    return float(value), False


def compare(baseline: dict, current: dict, thresholds: Thresholds) -> list[Row]:
    if thresholds.max_acc_drop is None and thresholds.max_latency_increase is None:
        raise EdgeqError(
            "no threshold given, so nothing would be gated",
            "pass --max-acc-drop POINTS and/or --max-latency-increase %",
        )
    rows = []
    for key in sorted(set(baseline) | set(current)):
        base, new = baseline.get(key), current.get(key)
        problems, errors, notes = [], [], []
        if new is None:
            problems.append("missing from the current report")
        base_top1, base_top1_bad = _figure(base, "compiled_top1")
        new_top1, new_top1_bad = _figure(new, "compiled_top1")
        base_ms, base_ms_bad = _figure(base, "latency_ms")
        new_ms, new_ms_bad = _figure(new, "latency_ms")
        if base is not None and new is not None:
            gated = False
            if thresholds.max_acc_drop is not None:
                if base_top1_bad or new_top1_bad:
                    errors.append("compiled_top1 is not a finite, non-negative number")
                elif base_top1 is None:
                    errors.append("the baseline has no compiled top-1 (unlabelled data?) to gate on")
                elif new_top1 is None:
                    problems.append("compiled top-1 missing from the current report")
                else:
                    gated = True
                    drop = (base_top1 - new_top1) * 100.0
                    if drop > thresholds.max_acc_drop + 1e-9:
                        problems.append(f"top-1 dropped {drop:.2f} points (limit {thresholds.max_acc_drop:g})")
            if thresholds.max_latency_increase is not None:
                if base_ms_bad or new_ms_bad or base_ms == 0 or new_ms == 0:
                    errors.append("latency_ms is not a positive, finite number")
                elif base_ms is None and new_ms is None:
                    notes.append("latency measured in neither report (emulated runs measure none)")
                elif base_ms is None:
                    notes.append("the baseline measured no latency to compare with")
                elif new_ms is None:
                    problems.append("latency missing from the current report")
                else:
                    gated = True
                    increase = new_ms / base_ms - 1.0
                    if increase > thresholds.max_latency_increase + 1e-9:
                        problems.append(
                            f"latency rose {increase * 100:.1f}% (limit {thresholds.max_latency_increase * 100:g}%)"
                        )
            if not gated and not problems and not errors:
                errors.append("no threshold could be checked: " + "; ".join(notes))
        rows.append(Row(*key, base_top1, new_top1, base_ms, new_ms, tuple(problems), tuple(errors), tuple(notes)))
    return rows


def _fmt_top1(value):
    return "-" if value is None else f"{value * 100:.2f}%"


def _fmt_ms(value):
    return "-" if value is None else f"{value:.2f}"


def table(rows: list[Row]) -> str:
    """A Markdown table of what moved."""
    lines = [
        "| model | target | bits | top-1 base | top-1 now | Δ points | "
        "latency base (ms) | latency now (ms) | Δ latency | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        delta = (
            "-"
            if row.baseline_top1 is None or row.current_top1 is None
            else f"{(row.current_top1 - row.baseline_top1) * 100:+.2f}"
        )
        change = (
            "-"
            if not (row.baseline_latency_ms and row.current_latency_ms)
            else f"{(row.current_latency_ms / row.baseline_latency_ms - 1) * 100:+.1f}%"
        )
        verdict = (
            "ok" + "".join(f" ({note})" for note in row.notes)
            if row.ok
            else ("FAIL: " if row.problems else "CANNOT GATE: ") + "; ".join([*row.problems, *row.errors])
        )
        lines.append(
            f"| {row.model} | {row.target} | {row.bits} | "
            f"{_fmt_top1(row.baseline_top1)} | {_fmt_top1(row.current_top1)} | {delta} | "
            f"{_fmt_ms(row.baseline_latency_ms)} | {_fmt_ms(row.current_latency_ms)} | {change} | {verdict} |"
        )
    return "\n".join(lines)
