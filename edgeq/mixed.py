"""Mixed precision: which layers can take the lower bit width, under a size budget.

Sensitivity of a layer is measured, not guessed: the model is quantized (round to nearest,
calibrated on the calibration images) with every layer at the high bit widths, then once
more per layer with that layer alone at the low ones; the layer's sensitivity is how much
the mean KL divergence of the quantized model's predictions from the float model's grows
(on the calibration images: no labels, no real data). The first and last layers stay at
the spec's edge bit widths.

The allocation is the greedy answer to the knapsack: starting from all-high, lower the
layers in order of sensitivity per byte saved until the packed weights fit the budget.
The result is a :class:`QuantSpec` with per-layer entries, written as a JSON spec file
that ``--bits`` accepts everywhere (``edgeq compile --bits mixed.json``, ``edgeq sweep``).

Weight size is exact (packed bits). Latency is not modelled: edgeq's kernels unpack 2-,
3- and 4-bit weights to the same int8 arithmetic, so on them weight bits change size and
memory traffic, while activation bits (4 against 8) decide the inner loop.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import EdgeqError
from .spec import QuantSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    name: str
    weights: int  # number of weights
    high: tuple[int, int]  # (weight bits, activation bits) at the high spec
    low: tuple[int, int]
    sensitivity: float  # growth of the mean KL(float || quantized) with this layer alone at ``low``
    edge: bool  # first or last layer: kept at the spec's edge bit widths

    def weight_bytes(self, bits: int) -> float:
        return self.weights * bits / 8


def _mean_kl(reference: np.ndarray, logits: np.ndarray) -> float:
    p = torch.log_softmax(torch.from_numpy(reference), 1)
    q = torch.log_softmax(torch.from_numpy(logits), 1)
    return float((p.exp() * (p - q)).sum(1).mean())


def _quantized_logits(module: torch.nn.Module, inputs: np.ndarray, spec: QuantSpec, seed: int):
    from .evaluate import predict
    from .quantized import QuantizedLayer, quantize_module

    quantized = quantize_module(copy.deepcopy(module), inputs, spec, seed=seed)
    layers = {name: m for name, m in quantized.named_modules() if isinstance(m, QuantizedLayer)}
    with torch.no_grad():
        return predict(quantized, inputs), layers


def sensitivities(
    module: torch.nn.Module, inputs: np.ndarray, high: QuantSpec, low: QuantSpec, *, seed: int = 0
) -> list[LayerSensitivity]:
    """Per quantizable layer, in execution order (``inputs``: float model inputs, N x C x H x W)."""
    from .evaluate import predict
    from .graph import eval_mode

    module = eval_mode(module)
    with torch.no_grad():
        reference = predict(module, inputs)
    base_logits, layers = _quantized_logits(module, inputs, high, seed)
    base = _mean_kl(reference, base_logits)
    names = list(layers)
    results = []
    for index, name in enumerate(tqdm(names, desc="layer sensitivity", unit="layer", leave=False)):
        edge = index in (0, len(names) - 1)
        layer = layers[name]
        low_bits = low.layer_bits(edge=edge)
        high_bits = (layer.weight_bits, layer.act_bits)
        if edge or low_bits == high_bits:
            sensitivity = 0.0
        else:
            logits, _ = _quantized_logits(module, inputs, dataclasses.replace(high, layers=((name, *low_bits),)), seed)
            sensitivity = _mean_kl(reference, logits) - base
        results.append(
            LayerSensitivity(name, int(layer.layer.weight.numel()), high_bits, low_bits, float(sensitivity), edge)
        )
    return results


def allocate(layers: list[LayerSensitivity], high: QuantSpec, budget_bytes: float) -> tuple[QuantSpec, list[str]]:
    """The high spec with the fewest-cost layers lowered until the weights fit ``budget_bytes``; and the lowered
    names."""
    size = sum(layer.weight_bytes(layer.high[0]) for layer in layers)
    candidates = [layer for layer in layers if not layer.edge and layer.low != layer.high]
    smallest = size - sum(layer.weight_bytes(layer.high[0]) - layer.weight_bytes(layer.low[0]) for layer in candidates)
    if budget_bytes < smallest:
        raise EdgeqError(
            f"a budget of {budget_bytes / 1e6:.4f} MB is below the smallest allocation "
            f"({smallest / 1e6:.4f} MB, every middle layer at the low bits)",
            "raise --budget-mb or choose a lower --low",
        )
    order = sorted(
        candidates,
        key=lambda layer: (
            max(layer.sensitivity, 0.0)
            / max(layer.weight_bytes(layer.high[0]) - layer.weight_bytes(layer.low[0]), 1e-9)
        ),
    )
    lowered = []
    for layer in order:
        if size <= budget_bytes:
            break
        size -= layer.weight_bytes(layer.high[0]) - layer.weight_bytes(layer.low[0])
        lowered.append(layer.name)
    entries = tuple((layer.name, *layer.low) for layer in layers if layer.name in lowered)
    return dataclasses.replace(high, layers=entries), lowered


def weight_bytes(layers: list[LayerSensitivity], spec: QuantSpec) -> float:
    """Packed weight size of ``layers`` under ``spec`` (edge layers at the spec's edge widths)."""
    return sum(layer.weight_bytes(spec.layer_bits(edge=layer.edge, name=layer.name)[0]) for layer in layers)


def write_spec(
    spec: QuantSpec, layers: list[LayerSensitivity], lowered: list[str], path: str | Path, *, budget_bytes: float
) -> Path:
    """The spec as a JSON file (what ``--bits`` reads), with the sensitivities that chose it."""
    path = Path(path)
    record = spec.to_dict() | {
        "allocation": {
            "budget_mb": budget_bytes / 1e6,
            "weights_mb": weight_bytes(layers, spec) / 1e6,
            "lowered": lowered,
            "sensitivity": [dataclasses.asdict(layer) for layer in layers],
        }
    }
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(path)
    return path
