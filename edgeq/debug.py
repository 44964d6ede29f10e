"""Which layer breaks a quantized model: per-layer errors of an 'edgeq quantize' folder.

For every quantized Conv2d/Linear, in execution order (``edgeq debug``):

* **own SQNR**: the layer's output with only that layer quantized (its float input, its own
  quantized weights and input) against its float output: the error it makes itself;
* **inherited SQNR**: its output in the fully quantized model against the float model's: the
  error everything up to it adds up to;
* **clipping**: the share of its input values (in the quantized model) below the lowest or
  above the highest level of its input range, each end apart;
* its weight and input ranges;
* **8-bit gain**: the change in agreement with full precision (same top-1) when this layer
  alone is raised to 8-bit weights and inputs (weights rounded to nearest per channel, the
  input over the same range), every other layer as quantized.

SQNR is 10·log10(Σ signal² / Σ error²) over every value of every image, in dB. The ranking
of the layers that lose the most is by 8-bit gain when it was measured, else by own SQNR:
own SQNR finds the layers that round badly, the gain finds those whose error matters to the
prediction (a noisy layer late in the network may cost nothing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import numpy as np
import torch
from tqdm import tqdm

from . import quant
from .quantized import QuantizedLayer, running_float
from .spec import Observer

log = logging.getLogger(__name__)

SCHEMA = "edgeq.debug/1"
BATCH = 16  # images per pass: every layer's float output of a batch is held at once
RESTORED_BITS = 8


@dataclasses.dataclass(frozen=True)
class LayerDebug:
    """What one quantized layer does to the model (see the module docstring for each figure)."""

    name: str
    kind: str  # conv, depthwise, grouped, linear
    weight_bits: int
    act_bits: int
    own_sqnr_db: float
    inherited_sqnr_db: float
    clipped_low: float  # share of input values below the lowest level
    clipped_high: float  # share above the highest
    weight_min: float
    weight_max: float
    input_low: float  # the input range the levels span
    input_high: float
    gain_at_8_bits: float | None  # agreement with full precision, this layer at 8 bits minus as quantized

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class DebugReport:
    model: str
    bits: str
    images: int
    agreement: float  # same top-1 as full precision
    top1: float | None  # with labels
    fp_top1: float | None
    layers: tuple[LayerDebug, ...]

    def worst(self, count: int = 5) -> list[LayerDebug]:
        """The layers that lose the most: by 8-bit gain when measured, else by own SQNR."""
        if all(layer.gain_at_8_bits is not None for layer in self.layers):
            return sorted(self.layers, key=lambda layer: (-layer.gain_at_8_bits, layer.own_sqnr_db))[:count]
        return sorted(self.layers, key=lambda layer: layer.own_sqnr_db)[:count]

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "bits": self.bits,
            "images": self.images,
            "agreement_with_fp": self.agreement,
            "top1": self.top1,
            "fp_top1": self.fp_top1,
            "ranked_by": "gain_at_8_bits"
            if all(layer.gain_at_8_bits is not None for layer in self.layers)
            else "own_sqnr_db",
            "worst": [layer.name for layer in self.worst()],
            "layers": [layer.to_dict() for layer in self.layers],
        }


def _kind(layer: QuantizedLayer) -> str:
    inner = layer.layer
    if isinstance(inner, torch.nn.Linear):
        return "linear"
    if inner.groups == 1:
        return "conv"
    return "depthwise" if inner.groups == inner.in_channels == inner.out_channels else "grouped"


def _quantized_output(layer: QuantizedLayer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The layer's output with its own quantization (and its own, possibly corrected, ``bias``) on input ``x``."""
    params = {"weight": layer.dequantized_weight()} | ({"bias": bias} if bias is not None else {})
    return torch.func.functional_call(layer.layer, params, (layer.quantize_input(x),))


def _input_bounds(layer: QuantizedLayer) -> tuple[float, float]:
    low, high = layer.act_range
    scale, zero_point = float(layer.act_scale), float(layer.act_zero_point)
    return scale * (low - zero_point), scale * (high - zero_point)


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


@contextlib.contextmanager
def raised_to_8_bits(layer: QuantizedLayer, float_bias: torch.Tensor | None = None):
    """``layer`` at 8-bit weights (per channel, rounded to nearest) and 8-bit input over its own range, for a while;
    with ``float_bias``, that bias instead of one corrected for its low-bit rounding."""
    saved = {name: buffer.clone() for name, buffer in layer.named_buffers(recurse=False)}
    saved_bias = None if layer.layer.bias is None else layer.layer.bias.detach().clone()
    bits = layer.weight_bits, layer.act_bits
    low, high = _input_bounds(layer)
    symmetric = bool((layer.weight_zero_point == 0).all())
    try:
        layer.weight_bits = layer.act_bits = RESTORED_BITS
        scale, zero_point = quant.weight_qparams(layer.layer.weight.detach(), RESTORED_BITS, Observer.MINMAX, symmetric)
        layer.set_weight_qparams(scale, zero_point.to(torch.int8))
        step = (high - low) / (2**RESTORED_BITS - 1)
        layer.act_scale.fill_(step if step > 0 else 1.0)
        layer.act_zero_point.fill_(int(round(-low / step)) if step > 0 else 0)
        if float_bias is not None and saved_bias is not None:
            layer.layer.bias.data.copy_(float_bias)
        yield layer
    finally:
        layer.weight_bits, layer.act_bits = bits
        if saved_bias is not None:
            layer.layer.bias.data.copy_(saved_bias)
        for name, buffer in saved.items():
            getattr(layer, name).copy_(buffer)


@torch.no_grad()
def debug_model(
    model: torch.nn.Module,
    inputs: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    restore: bool = True,
    name: str = "model",
    bits: str = "",
    progress: bool = True,
    biases: dict | None = None,
) -> DebugReport:
    """Per-layer figures of fake-quantized ``model`` on ``inputs``. Full precision is the model with every layer
    bypassed and, when given, the float model's ``biases`` (:func:`edgeq.quantized.float_biases`; needed after bias
    correction, which moves the quantized layers' biases)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    quantized_biases = {n: None if m.layer.bias is None else m.layer.bias.detach().clone() for n, m in layers.items()}
    totals = {n: dict.fromkeys(("signal", "own", "inherited", "low", "high", "count"), 0.0) for n in layers}
    order: list[str] = []
    float_outputs: dict[str, torch.Tensor] = {}
    phase = {"float": True}

    def hook(layer_name):
        def observe(module, args, output):
            x, out = args[0], output.detach().float()
            entry = totals[layer_name]
            if phase["float"]:
                if layer_name not in order:
                    order.append(layer_name)
                float_outputs[layer_name] = out
                entry["signal"] += float((out**2).sum())
                own = _quantized_output(module, x, quantized_biases[layer_name]).float()
                entry["own"] += float(((own - out) ** 2).sum())
            else:
                entry["inherited"] += float(((out - float_outputs[layer_name]) ** 2).sum())
                low, high = _input_bounds(module)
                entry["low"] += float((x < low).sum())
                entry["high"] += float((x > high).sum())
                entry["count"] += x.numel()

        return observe

    handles = [layer.register_forward_hook(hook(n)) for n, layer in layers.items()]
    fp_logits, q_logits = [], []
    try:
        bar = tqdm(total=len(inputs), desc="per-layer errors", unit="img", leave=False, disable=not progress)
        for start in range(0, len(inputs), BATCH):
            batch = torch.from_numpy(np.ascontiguousarray(inputs[start : start + BATCH], np.float32))
            phase["float"] = True
            with running_float(layers, biases):
                fp_logits.append(model(batch).float())
            phase["float"] = False
            q_logits.append(model(batch).float())
            float_outputs.clear()
            bar.update(len(batch))
        bar.close()
    finally:
        for handle in handles:
            handle.remove()
    fp_top, q_logits_all = torch.cat(fp_logits).argmax(1), torch.cat(q_logits)
    agreement = float((q_logits_all.argmax(1) == fp_top).float().mean())

    gains: dict[str, float] = {}
    if restore:
        for layer_name in tqdm(order, desc="each layer at 8 bits", unit="layer", leave=False, disable=not progress):
            with raised_to_8_bits(layers[layer_name], (biases or {}).get(layer_name)):
                top = torch.cat(
                    [
                        model(torch.from_numpy(np.ascontiguousarray(inputs[s : s + BATCH], np.float32))).argmax(1)
                        for s in range(0, len(inputs), BATCH)
                    ]
                )
            gains[layer_name] = float((top == fp_top).float().mean()) - agreement

    reports = []
    for layer_name in order:
        layer, entry = layers[layer_name], totals[layer_name]
        weight = layer.layer.weight.detach()
        low, high = _input_bounds(layer)
        count = max(entry["count"], 1.0)
        reports.append(
            LayerDebug(
                name=layer_name,
                kind=_kind(layer),
                weight_bits=layer.weight_bits,
                act_bits=layer.act_bits,
                own_sqnr_db=_sqnr(entry["signal"], entry["own"]),
                inherited_sqnr_db=_sqnr(entry["signal"], entry["inherited"]),
                clipped_low=entry["low"] / count,
                clipped_high=entry["high"] / count,
                weight_min=float(weight.min()),
                weight_max=float(weight.max()),
                input_low=low,
                input_high=high,
                gain_at_8_bits=gains.get(layer_name),
            )
        )
    top1 = fp_top1 = None
    if labels is not None:
        targets = torch.from_numpy(np.asarray(labels))
        top1 = float((q_logits_all.argmax(1) == targets).float().mean())
        fp_top1 = float((fp_top == targets).float().mean())
    return DebugReport(name, bits, len(inputs), agreement, top1, fp_top1, tuple(reports))


def debug_folder(quantized_dir, data: str, *, num_images: int | None = None, restore: bool = True, allow_pickle=False):
    """:func:`debug_model` on an 'edgeq quantize' folder, on ``data`` (any evaluation data edgeq reads)."""
    from .data import resolve_dataset
    from .quantized import float_biases, load

    model, loaded, spec, _ = load(quantized_dir, allow_pickle=allow_pickle)
    images = resolve_dataset(data, num_images, preprocess=loaded.preprocess, classes=loaded.classes)
    log.info("debugging %s (%s) on %d images of %s", quantized_dir, spec, len(images), data)
    return debug_model(
        model.eval(),
        loaded.preprocess(images.images),
        labels=images.targets,
        restore=restore,
        name=str(quantized_dir),
        bits=str(spec),
        biases=float_biases(loaded.module),
    )


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1f}"


def table(report: DebugReport) -> str:
    """The terminal table, one line a layer in execution order, then the layers that lose the most."""
    header = f"{'layer':<34} {'kind':<9} {'bits':<5} {'own dB':>7} {'inh. dB':>7} {'clip lo':>7} {'clip hi':>7} "
    header += f"{'weights':>17} {'input range':>17} {'8-bit gain':>10}"
    lines = [header]
    for layer in report.layers:
        gain = "" if layer.gain_at_8_bits is None else f"{layer.gain_at_8_bits * 100:+.1f} pt"
        lines.append(
            f"{layer.name[-34:]:<34} {layer.kind:<9} w{layer.weight_bits}a{layer.act_bits:<2} "
            f"{_db(layer.own_sqnr_db):>7} {_db(layer.inherited_sqnr_db):>7} {layer.clipped_low:>7.2%} "
            f"{layer.clipped_high:>7.2%} {f'{layer.weight_min:.3g}..{layer.weight_max:.3g}':>17} "
            f"{f'{layer.input_low:.3g}..{layer.input_high:.3g}':>17} {gain:>10}"
        )
    lines.append("")
    lines.append(
        f"agreement with full precision: {report.agreement:.2%} on {report.images} images"
        + (f"; top-1 {report.top1:.2%} (full precision {report.fp_top1:.2%})" if report.top1 is not None else "")
    )
    ranked = report.worst()
    by = "8-bit gain" if ranked and ranked[0].gain_at_8_bits is not None else "own SQNR"
    lines.append(
        f"layers that lose the most (by {by}): "
        + ", ".join(
            layer.name
            + (
                f" ({layer.gain_at_8_bits * 100:+.1f} pt at 8 bits)"
                if layer.gain_at_8_bits is not None
                else f" ({_db(layer.own_sqnr_db)} dB)"
            )
            for layer in ranked
        )
    )
    return "\n".join(lines)


def write_html(report: DebugReport, path) -> None:
    """A static page: both SQNR curves along the network (and the 8-bit gains), then the table."""
    import base64
    import html
    import io
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [layer.name for layer in report.layers]
    steps = range(len(names))
    capped = lambda values: [min(v, 60.0) for v in values]  # noqa: E731 - inf (exact) drawn at the top
    has_gain = all(layer.gain_at_8_bits is not None for layer in report.layers)
    fig, axes = plt.subplots(
        2 if has_gain else 1, 1, sharex=True, figsize=(max(8, len(names) * 0.18), 7 if has_gain else 4)
    )
    axes = np.atleast_1d(axes)
    axes[0].plot(
        steps,
        capped([layer.own_sqnr_db for layer in report.layers]),
        "o-",
        ms=3,
        label="own (only this layer quantized)",
    )
    axes[0].plot(
        steps,
        capped([layer.inherited_sqnr_db for layer in report.layers]),
        "s-",
        ms=3,
        label="inherited (all quantized up to it)",
    )
    axes[0].set_ylabel("output SQNR vs float (dB)")
    axes[0].legend(loc="best")
    axes[0].grid(alpha=0.3)
    if has_gain:
        axes[1].bar(steps, [layer.gain_at_8_bits * 100 for layer in report.layers], color="tab:green")
        axes[1].set_ylabel("agreement gain at 8 bits (points)")
        axes[1].grid(alpha=0.3)
    axes[-1].set_xticks(list(steps))
    axes[-1].set_xticklabels(names, rotation=90, fontsize=6)
    fig.suptitle(f"{report.model} ({report.bits}), {report.images} images")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    image = base64.b64encode(buffer.getvalue()).decode()
    worst = {layer.name for layer in report.worst()}
    rows = "\n".join(
        "<tr{}><td>{}</td><td>{}</td><td>w{}a{}</td><td>{}</td><td>{}</td><td>{:.2%}</td><td>{:.2%}</td>"
        "<td>{:.3g} .. {:.3g}</td><td>{:.3g} .. {:.3g}</td><td>{}</td></tr>".format(
            ' class="worst"' if layer.name in worst else "",
            html.escape(layer.name),
            layer.kind,
            layer.weight_bits,
            layer.act_bits,
            _db(layer.own_sqnr_db),
            _db(layer.inherited_sqnr_db),
            layer.clipped_low,
            layer.clipped_high,
            layer.weight_min,
            layer.weight_max,
            layer.input_low,
            layer.input_high,
            "" if layer.gain_at_8_bits is None else f"{layer.gain_at_8_bits * 100:+.1f}",
        )
        for layer in report.layers
    )
    accuracy, summary = (html.escape(line) for line in table(report).splitlines()[-2:])
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>edgeq debug: {html.escape(report.model)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}} td:first-child{{text-align:left}}
tr.worst{{background:#fde0dc}} img{{max-width:100%}}</style></head><body>
<h1>{html.escape(report.model)} ({html.escape(report.bits)})</h1>
<p>{accuracy}</p><p>{summary}</p>
<img src="data:image/png;base64,{image}" alt="per-layer SQNR">
<p>Own SQNR: the layer's error alone (float input). Inherited: its output in the quantized model against the
float model's. Clipping: share of its input values outside its levels. 8-bit gain: agreement with full precision
when only this layer is raised to 8 bits, in points. Highlighted: the layers that lose the most.</p>
<table><tr><th>layer</th><th>kind</th><th>bits</th><th>own dB</th><th>inherited dB</th><th>clipped low</th>
<th>clipped high</th><th>weights</th><th>input range</th><th>8-bit gain (pt)</th></tr>
{rows}
</table></body></html>
"""
    path = Path(path)
    staged = path.with_name(f".{path.name}.partial")
    staged.write_text(page)
    staged.replace(path)
