"""The CI regression gate: compare two reports, entry by entry, against thresholds.

A report is a verify report (``report.json`` of ``edgeq verify``, schema ``edgeq.verify/1``)
or a sweep report (``edgeq.sweep/1``, a list of them under ``entries``). Entries are
matched by (model, target, bits). An entry regresses when its compiled top-1 drops by more
than ``max_acc_drop`` percentage points, or its median latency rises by more than
``max_latency_increase`` (a fraction); an entry of the baseline missing from the current
report also fails the gate. Latency is compared only where both reports measured it
(emulated runs measure none).
"""

from __future__ import annotations

import dataclasses
import json
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
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


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
    entries = report["entries"] if schema == "edgeq.sweep/1" else [report]
    keyed = {}
    for entry in entries:
        key = (str(entry["model"]), str(entry["target"]), str(entry["bits"]))
        if key in keyed:
            raise EdgeqError(
                f"{path} has two entries for {' '.join(key)}", "keep one verify run per model, target and bit width"
            )
        keyed[key] = entry
    return keyed


def compare(baseline: dict, current: dict, thresholds: Thresholds) -> list[Row]:
    rows = []
    for key in sorted(set(baseline) | set(current)):
        base, new = baseline.get(key), current.get(key)
        problems = []
        if new is None:
            problems.append("missing from the current report")
        base_top1 = base.get("compiled_top1") if base else None
        new_top1 = new.get("compiled_top1") if new else None
        base_ms = base.get("latency_ms") if base else None
        new_ms = new.get("latency_ms") if new else None
        if base is not None and new is not None:
            if thresholds.max_acc_drop is not None and base_top1 is not None and new_top1 is not None:
                drop = (base_top1 - new_top1) * 100.0
                if drop > thresholds.max_acc_drop + 1e-9:
                    problems.append(f"top-1 dropped {drop:.2f} points (limit {thresholds.max_acc_drop:g})")
            if thresholds.max_latency_increase is not None and base_ms and new_ms:
                increase = new_ms / base_ms - 1.0
                if increase > thresholds.max_latency_increase + 1e-9:
                    problems.append(
                        f"latency rose {increase * 100:.1f}% (limit {thresholds.max_latency_increase * 100:g}%)"
                    )
        rows.append(Row(*key, base_top1, new_top1, base_ms, new_ms, tuple(problems)))
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
        verdict = "ok" if row.ok else "FAIL: " + "; ".join(row.problems)
        lines.append(
            f"| {row.model} | {row.target} | {row.bits} | "
            f"{_fmt_top1(row.baseline_top1)} | {_fmt_top1(row.current_top1)} | {delta} | "
            f"{_fmt_ms(row.baseline_latency_ms)} | {_fmt_ms(row.current_latency_ms)} | {change} | {verdict} |"
        )
    return "\n".join(lines)
