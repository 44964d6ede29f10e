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


# -- to an accuracy target ---------------------------------------------------------------------------------------
#
# The search raises layers up a ladder of bit widths (w2a4 -> w4a4 -> w8a8 by default; a raise may skip a rung), in
# order of what the raise buys per unit of cost, until the quantized model agrees with the float one on held-out
# images often enough. What a raise buys is measured, not predicted: the drop of the mean KL divergence from the
# float model's predictions on the held-out images (smooth where agreement moves in whole images). Layers are
# quantized once per rung (round to nearest, input ranges from the float model's activations, so a layer's
# quantization does not depend on its neighbours' bits) and a mixed model is those layers put together. Gains are
# evaluated lazily: a candidate's stored gain is measured again when it comes to the top, and taken only if it is
# still the best, which needs far fewer passes than measuring every candidate after every raise.


@dataclasses.dataclass(frozen=True)
class Promotion:
    layer: str
    bits: tuple[int, int]  # (weight, activation) bits after the raise
    added_cost: float
    agreement: float  # on the held-out images, after it
    metric: float  # agreement, or top-1 with labels


@dataclasses.dataclass(frozen=True)
class TargetSearch:
    spec: QuantSpec
    target: float
    metric_name: str  # agreement or top1
    reached: bool
    start_metric: float
    final_metric: float
    cost: float
    uniform_costs: dict  # rung (str) -> cost of every layer at it
    uniform_metrics: dict  # rung (str) -> the target's metric with every layer at it
    unit: str
    cost_model: str
    promotions: tuple[Promotion, ...]
    calibration_images: int
    held_out_images: int
    passes: int  # forward passes over the held-out images the search took

    def stopped_at(self, target: float) -> TargetSearch:
        """The search as it would have ended with the lower ``target``: the raises are taken in the same order
        whatever the target (the order depends on gains and costs alone), so a lower target's search is a prefix
        of this one's, and one search serves every lower target."""
        if target > self.target:
            raise ValueError(f"a search to {self.target} cannot tell where one to {target} would end")
        taken = next((i + 1 for i, step in enumerate(self.promotions) if step.metric >= target), None)
        if self.start_metric >= target:
            taken = 0
        if taken is None:  # this search did not reach it either: it stops where this one did
            taken = len(self.promotions)
        steps = self.promotions[:taken]
        bits = {step.layer: step.bits for step in steps}
        order = [entry[0] for entry in self.spec.layers]  # the model's order of every layer this search raised
        entries = tuple((name, *bits[name]) for name in order if name in bits)
        final = steps[-1].metric if steps else self.start_metric
        return dataclasses.replace(
            self,
            spec=dataclasses.replace(self.spec, layers=entries),
            target=target,
            reached=final >= target,
            final_metric=final,
            cost=self.cost - sum(step.added_cost for step in self.promotions[taken:]),
            promotions=steps,
        )

    def to_dict(self) -> dict:
        return {
            "target": {self.metric_name: self.target},
            "reached": self.reached,
            "start": self.start_metric,
            "final": self.final_metric,
            "cost": self.cost,
            "uniform_costs": self.uniform_costs,
            "uniform_metrics": self.uniform_metrics,
            "unit": self.unit,
            "cost_model": self.cost_model,
            "calibration_images": self.calibration_images,
            "held_out_images": self.held_out_images,
            "passes": self.passes,
            "promotions": [dataclasses.asdict(p) for p in self.promotions],
        }


def search_to_target(
    module: torch.nn.Module,
    calibration: np.ndarray,
    held_out: np.ndarray,
    ladder: list[QuantSpec],
    costs,
    *,
    min_agreement: float | None = None,
    min_top1: float | None = None,
    labels: np.ndarray | None = None,
    budget: float | None = None,
    seed: int = 0,
    bias_correction: bool = False,
    progress: bool = True,
) -> TargetSearch:
    """The cheapest raises from ``ladder[0]`` that reach ``min_agreement`` (or ``min_top1`` on ``labels``) on
    ``held_out``, within ``budget`` (in ``costs.unit``); ``calibration`` and ``held_out`` never share an image."""
    import heapq

    from .evaluate import predict
    from .graph import eval_mode
    from .layer_costs import layer_shapes
    from .quantized import QuantizedLayer, quantize_module
    from .reconstruction import ReconstructionConfig

    if (min_agreement is None) == (min_top1 is None):
        raise EdgeqError("give one accuracy target", "pass --min-agreement or --min-top1")
    if min_top1 is not None and labels is None:
        raise EdgeqError(
            "--min-top1 needs labelled images", "pass --data with a labelled folder (ROOT/<class>/<image>)"
        )
    module = eval_mode(module)
    with torch.no_grad():
        reference = predict(module, held_out)
    fp_top = reference.argmax(1)
    shapes = layer_shapes(module, torch.from_numpy(held_out[:1]))
    config = ReconstructionConfig(method="rtn", bias_correction=True) if bias_correction else None
    rungs = []
    for rung in tqdm(ladder, desc="quantizing each rung", unit="rung", leave=False, disable=not progress):
        quantized = quantize_module(copy.deepcopy(module), calibration, rung, seed=seed, reconstruction=config)
        rungs.append({n: m for n, m in quantized.named_modules() if isinstance(m, QuantizedLayer)})
    working = copy.deepcopy(quantized)  # the structure; every layer is set to rung 0 below
    layers = {n: m for n, m in working.named_modules() if isinstance(m, QuantizedLayer)}
    level = dict.fromkeys(layers, 0)

    def bits_at(name: str, rung: int) -> tuple[int, int]:
        layer = rungs[rung][name]
        return layer.weight_bits, layer.act_bits

    def set_level(name: str, rung: int) -> None:
        source, target = rungs[rung][name], layers[name]
        target.weight_bits, target.act_bits = source.weight_bits, source.act_bits
        for buffer_name, buffer in source.named_buffers(recurse=False):
            getattr(target, buffer_name).copy_(buffer)
        if source.layer.bias is not None:  # bias correction moves biases per rung
            target.layer.bias.data.copy_(source.layer.bias.data)

    for name in layers:
        set_level(name, 0)
    passes = 0

    def measure() -> tuple[float, float, float]:
        """(mean KL from full precision, agreement, the target's metric) of the working model."""
        nonlocal passes
        passes += 1
        with torch.no_grad():
            logits = predict(working, held_out)
        agreement = float((logits.argmax(1) == fp_top).mean())
        metric = agreement if min_top1 is None else float((logits.argmax(1) == labels).mean())
        return _mean_kl(reference, logits), agreement, metric

    def layer_cost(name: str, rung: int) -> float:
        return costs.cost(shapes[name], *bits_at(name, rung))

    def total_cost() -> float:
        return sum(layer_cost(name, level[name]) for name in layers)

    target = min_agreement if min_top1 is None else min_top1
    uniform = {str(rung): sum(layer_cost(name, index) for name in layers) for index, rung in enumerate(ladder)}
    uniform_metrics = {}
    for index, rung in reversed(list(enumerate(ladder))):  # ends with every layer at the first rung
        for name in layers:
            set_level(name, index)
        uniform_metrics[str(rung)] = measure()[2]
    kl, agreement, metric = measure()
    start_metric, spent = metric, total_cost()
    if budget is not None and spent > budget:
        raise EdgeqError(
            f"the budget ({budget:g} {costs.unit}) is below the cost of every layer at {ladder[0]} "
            f"({spent:.4g} {costs.unit})",
            "raise the budget or start the ladder lower",
        )

    def priority(gain: float, added: float) -> float:
        # a raise that costs nothing (or saves) and helps comes first; otherwise gain per unit of cost
        return -(gain / added if added > 1e-12 else gain * 1e12)

    def candidate(name: str) -> tuple[float, float, float, int] | None:
        """(priority, gain in KL, added cost, rung) of the best raise of ``name`` to any higher rung, measured now
        (a higher rung can cost less: 8-bit kernels against 4-bit ones); None at the top."""
        rung, best = level[name], None
        for higher in range(rung + 1, len(rungs)):
            if bits_at(name, higher) == bits_at(name, rung):
                continue
            set_level(name, higher)
            raised_kl, _, _ = measure()
            set_level(name, rung)
            gain, added = kl - raised_kl, layer_cost(name, higher) - layer_cost(name, rung)
            if best is None or priority(gain, added) < best[0]:
                best = (priority(gain, added), gain, added, higher)
        return best

    heap: list = []
    bar = tqdm(total=len(layers), desc="first gain of each layer", unit="layer", leave=False, disable=not progress)
    for name in layers:
        measured = candidate(name)
        bar.update(1)
        if measured is not None:
            heapq.heappush(heap, (measured[0], name))
    bar.close()
    promotions: list[Promotion] = []
    while metric < target and heap:
        _, name = heapq.heappop(heap)
        measured = candidate(name)  # again, on the model as it is now
        if measured is None:
            continue
        rank, _, added, rung = measured
        if budget is not None and spent + added > budget:
            continue  # no longer affordable; cheaper raises may still be
        if heap and rank > heap[0][0]:
            heapq.heappush(heap, (rank, name))  # no longer the best: back in line
            continue
        level[name] = rung
        set_level(name, rung)
        kl, agreement, metric = measure()
        spent += added
        promotions.append(Promotion(name, bits_at(name, rung), added, agreement, metric))
        log.info(
            "raised %s to w%da%d: %s %.4f",
            name,
            *bits_at(name, rung),
            "agreement" if min_top1 is None else "top-1",
            metric,
        )
        following = candidate(name)
        if following is not None:
            heapq.heappush(heap, (following[0], name))
    base = ladder[0]
    entries = tuple((name, *bits_at(name, level[name])) for name in layers if level[name] > 0)
    return TargetSearch(
        spec=dataclasses.replace(base, layers=entries),
        target=target,
        metric_name="agreement" if min_top1 is None else "top1",
        reached=metric >= target,
        start_metric=start_metric,
        final_metric=metric,
        cost=spent,
        uniform_costs=uniform,
        uniform_metrics=dict(reversed(list(uniform_metrics.items()))),
        unit=costs.unit,
        cost_model=costs.describe(),
        promotions=tuple(promotions),
        calibration_images=len(calibration),
        held_out_images=len(held_out),
        passes=passes,
    )
