"""Sweep reports: the JSON (schema ``edgeq.sweep/1``, documented in docs/reports.md), a
Markdown summary, and PNG plots of accuracy against latency (Pareto front marked) and of
the per-layer quantization error.

A sweep report's ``entries`` are verify reports (``edgeq.verify/1``) with three more
fields: ``method``, ``module_bytes`` (size of the compiled module) and ``layer_sqnr_db``
(per quantized layer, in execution order: name and output SQNR in dB of the quantized
network against the float one on the same inputs). Entries of mixed specs the sweep chose
itself have ``auto_mixed`` too: the agreement target, what the search reached on its held-out
images, its cost against the uniform rungs, the layers it raised and the spec file's name.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SCHEMA = "edgeq.sweep/1"
REPORT_FILE = "report.json"
SUMMARY_FILE = "summary.md"
PARETO_PNG = "accuracy_latency.png"
LAYERS_PNG = "layer_error.png"


def layer_sqnr(quantized_dir: str | Path, inputs: np.ndarray) -> list[dict]:
    """Output SQNR (dB) of every quantized layer: the quantized network against the same
    network run in float (every layer bypassed), on ``inputs``. Errors accumulate: a
    layer's figure includes what the layers before it did to its input."""
    import torch

    from .quantized import QuantizedLayer, float_biases, load, running_float

    model, loaded, _, _ = load(quantized_dir)
    biases = float_biases(loaded.module)  # bias correction moved the quantized layers' biases
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    captured: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def save(_module, _args, output):
            captured.setdefault(name, []).append(output.detach().float())

        return save

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    x = torch.from_numpy(np.ascontiguousarray(inputs, np.float32))
    order: list[str] = []
    try:
        with torch.no_grad():
            with running_float(layers, biases):
                model(x)
            order = list(captured)
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    results = []
    for name in order:
        reference, quantized = captured[name][0], captured[name][1]
        noise = float(((reference - quantized) ** 2).sum())
        signal = float((reference**2).sum())
        results.append(
            {"layer": name, "sqnr_db": float("inf") if noise == 0 else 10.0 * math.log10(max(signal, 1e-30) / noise)}
        )
    return results


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower cost (x) and higher accuracy (y)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((ox <= x and oy >= y) and (ox < x or oy > y) for j, (ox, oy) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _cost(entry: dict, use_latency: bool) -> float:
    return float(entry["latency_ms"]) if use_latency else entry["module_bytes"] / 1e6


def write(entries: list[dict], out: Path, *, title: str) -> dict:
    """Write report.json, summary.md and the two PNGs into ``out`` (an existing folder)."""
    use_latency = all(e.get("latency_ms") for e in entries)
    report = {
        "schema": SCHEMA,
        "title": title,
        "cost_axis": "latency_ms" if use_latency else "module_mb",
        "entries": entries,
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    points = [(_cost(e, use_latency), e["compiled_top1"] or 0.0) for e in entries]
    front = set(pareto_front(points))
    _plot_pareto(
        entries,
        points,
        front,
        use_latency,
        out / PARETO_PNG,
        f"{entries[0]['model']} on {', '.join(sorted({e['target'] for e in entries}))}",
    )
    _plot_layers(entries, out / LAYERS_PNG, entries[0]["model"])
    (out / SUMMARY_FILE).write_text(summary_markdown(report, front))
    return report


def _pct(value) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def bits_label(entry: dict) -> str:
    """The bits of an entry as a reader needs them: a chosen mixed spec says what it was chosen for."""
    auto = entry.get("auto_mixed")
    if not auto:
        return entry["bits"]
    return f"{entry['bits']} (auto ≥{auto['min_agreement']:.0%}{'' if auto['reached'] else ', not reached'})"


def summary_markdown(report: dict, front: set[int]) -> str:
    entries = report["entries"]
    lines = [
        f"# {report['title']}",
        "",
        f"Schema `{report['schema']}`; figures from `{REPORT_FILE}`. Pareto-optimal rows (no other row is both "
        f"{'faster' if report['cost_axis'] == 'latency_ms' else 'smaller'} and more accurate) are marked ★.",
        "",
        "| | bits | target | method | fp top-1 | compiled top-1 | agreement with fp | latency (ms) | module (MB) | "
        "worst layer SQNR (dB) | ran |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, e in enumerate(entries):
        worst = min((layer["sqnr_db"] for layer in e.get("layer_sqnr_db", [])), default=None)
        latency = "-" if e.get("latency_ms") is None else f"{e['latency_ms']:.2f}"
        lines.append(
            f"| {'★' if i in front else ''} | {bits_label(e)} | {e['target']} | {e.get('method', '-')} | "
            f"{_pct(e['fp_top1'])} | {_pct(e['compiled_top1'])} | "
            f"{_pct(e['agreement_with_fp']['compiled']['top1'])} | {latency} | {e['module_bytes'] / 1e6:.2f} | "
            f"{'-' if worst is None else f'{worst:.1f}'} | {e['ran']} |"
        )
    lines += [
        "",
        f"![accuracy against {'latency' if report['cost_axis'] == 'latency_ms' else 'module size'}]({PARETO_PNG})",
        "",
        f"![per-layer quantization error]({LAYERS_PNG})",
        "",
    ]
    chosen = [e for e in entries if e.get("auto_mixed")]
    if chosen:
        lines += [
            "Mixed specs chosen by the sweep (`edgeq mixed --min-agreement` on the calibration images: layers raised "
            "up the ladder by agreement bought per unit of their cost on the target, checked on held-out images):",
            "",
            "| target | agreement target | reached on held-out | cost | uniform rungs | layers raised | spec file |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in chosen:
            auto = e["auto_mixed"]
            unit = auto["unit"]
            rungs = ", ".join(
                f"{rung} {cost:.3g} {unit} ({_pct(auto['uniform_agreement'][rung])})"
                for rung, cost in auto["uniform_costs"].items()
            )
            lines.append(
                f"| {e['target']} | {_pct(auto['min_agreement'])} | {_pct(auto['held_out_agreement'])} of "
                f"{auto['held_out_images']}{'' if auto['reached'] else ' (not reached)'} | {auto['cost']:.3g} {unit} | "
                f"{rungs} | {len(auto['raised'])} | `{auto['spec_file']}` |"
            )
        lines += ["", f"Costs: {'; '.join(sorted({e['auto_mixed']['cost_model'] for e in chosen}))}.", ""]
    notes = {e["latency_note"] for e in entries if e.get("latency_note")}
    if notes:
        lines += ["Latency notes: " + "; ".join(sorted(notes)) + ".", ""]
    return "\n".join(lines)


def _plot_pareto(entries, points, front, use_latency, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    targets = sorted({e["target"] for e in entries})
    markers = dict(zip(targets, "osD^v<>p"))
    labelled = set()
    for i, (e, (x, y)) in enumerate(zip(entries, points)):
        label = None if e["target"] in labelled else e["target"]
        labelled.add(e["target"])
        color = "tab:red" if i in front else "tab:blue"
        auto = e.get("auto_mixed")
        ax.scatter(
            [x],
            [y * 100],
            marker=markers[e["target"]],
            s=90 if auto else 60,
            # a chosen mixed spec is drawn hollow, so it stands apart from the uniform widths it competes with
            facecolors="none" if auto else color,
            edgecolors=color,
            linewidths=1.6 if auto else 1.0,
            zorder=3,
            label=label,
        )
        text = f"auto ≥{auto['min_agreement']:.0%}" if auto else e["bits"]
        ax.annotate(text, (x, y * 100), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ordered = sorted(front, key=lambda i: points[i][0])
    ax.plot(
        [points[i][0] for i in ordered],
        [points[i][1] * 100 for i in ordered],
        color="tab:red",
        linewidth=1,
        label="Pareto front",
    )
    fp = [e["fp_top1"] for e in entries if e.get("fp_top1") is not None]
    if fp:
        ax.axhline(fp[0] * 100, color="gray", linestyle="--", linewidth=1, label="full precision")
    ax.set_xlabel("median latency (ms, batch 1)" if use_latency else "compiled module size (MB)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_layers(entries, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.0), dpi=120)
    seen = set()
    for e in entries:
        label = f"{e['bits']} ({e.get('method', '?')})"
        if label in seen or not e.get("layer_sqnr_db"):
            continue
        seen.add(label)
        values = [min(layer["sqnr_db"], 60.0) for layer in e["layer_sqnr_db"]]
        ax.plot(range(len(values)), values, marker=".", label=label)
    ax.set_xlabel("quantized layer (execution order)")
    ax.set_ylabel("output SQNR vs float (dB)")
    ax.set_title(f"{title}: per-layer quantization error", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
