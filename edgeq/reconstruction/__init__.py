"""Post-training quantization by reconstruction: AdaRound, BRECQ and QDrop.

Round-to-nearest (``rtn``) leaves each weight at its nearest level; at 2 bits that loses
most of a network's accuracy. The methods here learn, unit by unit in execution order,
which way each weight rounds (AdaRound) so that the quantized unit's output matches the
full-precision one on the calibration images:

* ``adaround``: every layer on its own, activation steps fixed at their MSE initialization.
* ``brecq``: residual blocks as units (ResNet blocks, inverted residuals, ViT encoder
  blocks), learned activation steps (LSQ), inputs from the model quantized so far.
* ``qdrop``: BRECQ plus QDrop: each activation element skips quantization with
  probability ``drop_prob``, and the unit input mixes full-precision and quantized values.

Parts: ``rounding`` (AdaRound, β schedule), ``activation`` (LSQ, dropping), ``blocks``
(units), ``cache`` (captured inputs and targets), ``layer`` (per-layer learned state).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import EdgeqError, one_of
from ..graph import execution_order
from .blocks import Unit, find_units, register_block  # noqa: F401 - register_block is public API
from .cache import fisher_weights, unit_io
from .crops import plan_windows
from .layer import LayerLearning, MatMulLearning
from .rounding import beta_schedule

log = logging.getLogger(__name__)


class Method(str, enum.Enum):
    RTN = "rtn"
    ADAROUND = "adaround"
    BRECQ = "brecq"
    QDROP = "qdrop"

    def __str__(self) -> str:
        return self.value


class Rounding(str, enum.Enum):
    """Where rounding starts: each weight to its nearest level, or GPTQ's error-feeding rounding
    (:mod:`.gptq`), which AdaRound then refines."""

    NEAREST = "nearest"
    GPTQ = "gptq"

    def __str__(self) -> str:
        return self.value


class Loss(str, enum.Enum):
    MSE = "mse"
    FISHER = "fisher"  # output error weighted by squared task-loss gradients (BRECQ)


@dataclasses.dataclass(frozen=True)
class ReconstructionConfig:
    """Settings of reconstruction; the defaults are sized for a CPU.

    The reference settings (BRECQ, QDrop) are 20000 iterations per unit at batch 32,
    β from 20 to 2 after a 20% warm-up, rounding-loss weight 0.01 for ResNets and 0.1 for
    MobileNet-style networks (``round_weight=None`` picks by whether the model has
    depthwise convolutions), Adam at 1e-3 for the rounding and 4e-5 for activation steps.
    ``time_budget`` (seconds for the whole model, GPTQ's initial rounding included when
    ``edgeq.quantized.quantize_module`` runs both) caps the iterations of each unit to its
    share of what is left. ``window`` (pixels) reconstructs convolutional units whose
    inputs are larger on random ``window``×``window`` crops (:mod:`.crops`): many more
    iterations in the same time at high resolution. ``bias_correction`` corrects each layer's
    bias for the mean output error of its rounded weights (Nagel et al. 2019) once rounding is
    final; it applies to round-to-nearest too. ``initial_rounding`` ``gptq`` rounds every layer by
    GPTQ first (:mod:`.gptq`); with ``rtn`` those are the final codes, otherwise AdaRound starts from them.
    """

    method: Method = Method.QDROP
    iters: int = 2000
    batch_size: int = 32
    round_weight: float | None = None
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    lr_rounding: float = 1e-3
    lr_step: float = 4e-5
    drop_prob: float = 0.5
    loss: Loss = Loss.MSE
    time_budget: float | None = None
    window: int | None = None
    bias_correction: bool = False
    initial_rounding: Rounding = Rounding.NEAREST

    def __post_init__(self):
        for field, enum_type in (("method", Method), ("loss", Loss), ("initial_rounding", Rounding)):
            value = getattr(self, field)
            try:
                object.__setattr__(self, field, enum_type(value))
            except ValueError:
                raise one_of(f"reconstruction {field}", str(value), [m.value for m in enum_type]) from None
        if self.iters < 1 or self.batch_size < 1:
            raise EdgeqError(
                f"--iters and the batch size must be positive (got {self.iters}, {self.batch_size})",
                "pass e.g. --iters 2000",
            )
        if not 0.0 <= self.drop_prob <= 1.0:
            raise EdgeqError(f"--drop-prob must be in [0, 1], not {self.drop_prob}", "pass e.g. 0.5")
        if self.time_budget is not None and self.time_budget <= 0:
            raise EdgeqError(f"--time-budget must be positive, not {self.time_budget}", "pass seconds, e.g. 600")
        if self.window is not None and self.window < 8:
            raise EdgeqError(f"--window must be at least 8 pixels, not {self.window}", "pass e.g. --window 32")

    @property
    def learns(self) -> bool:
        return self.method is not Method.RTN

    @property
    def by_block(self) -> bool:
        return self.method in (Method.BRECQ, Method.QDROP)

    @property
    def learns_steps(self) -> bool:
        return self.method in (Method.BRECQ, Method.QDROP)

    @property
    def unit_drop_prob(self) -> float:
        return self.drop_prob if self.method is Method.QDROP else 0.0

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["method"], data["loss"] = self.method.value, self.loss.value
        # recorded only when not the default, so folders made before it existed stay reusable
        if self.initial_rounding is Rounding.NEAREST:
            del data["initial_rounding"]
        else:
            data["initial_rounding"] = self.initial_rounding.value
        return data


def default_round_weight(model: nn.Module) -> float:
    depthwise = any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())
    return 0.1 if depthwise else 0.01


def _reconstruction_error(
    module: nn.Module, learnings: list, inputs: torch.Tensor, targets: torch.Tensor, device, batch: int = 256
) -> float:
    """Mean squared error per element of the unit with hard rounding, no dropping."""
    for learning in learnings:
        learning.active = False
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(inputs), batch):
            out = module(inputs[start : start + batch].to(device))
            total += (out - targets[start : start + batch].to(device)).pow(2).sum().item()
            count += out.numel()
    for learning in learnings:
        learning.active = True
    return total / max(count, 1)


def _output_error(out: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Squared error summed over channels (the last dim of token tensors), averaged over the rest."""
    error = (out - target).pow(2)
    if weights is not None:
        error = error * weights
    return error.sum(-1 if error.dim() == 3 else 1).mean()


def reconstruct(
    model: nn.Module,
    layers: dict,
    inputs: torch.Tensor,
    config: ReconstructionConfig,
    *,
    seed: int = 0,
    device: str = "cpu",
    matmuls: dict | None = None,
) -> list[dict]:
    """Learn the rounding (and activation steps) of ``layers`` unit by unit; returns a report per unit.

    ``model`` is a prepared, calibrated model (``edgeq.quantized.prepare`` then ``calibrate``) whose
    QuantizedLayers are ``layers``; ``inputs`` the preprocessed calibration images. The
    learned codes and steps are written into the layers' buffers, so the model saves,
    loads and exports as any quantized model.
    """
    if not config.learns:
        return []
    if device == "cuda" and not torch.cuda.is_available():
        raise EdgeqError("--device cuda, but torch sees no CUDA device", "use --device cpu")
    round_weight = config.round_weight if config.round_weight is not None else default_round_weight(model)
    units = find_units(model, list(layers), blocks=config.by_block)
    order = execution_order(model, [u.name for u in units], inputs[:1])
    units = sorted(units, key=lambda u: order.index(u.name))
    log.info(
        "reconstructing %d units (%d blocks) with %s, %d iterations each",
        len(units),
        sum(u.kind == "block" for u in units),
        config.method,
        config.iters,
    )
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    model.to(device)
    index_generator = torch.Generator().manual_seed(seed)
    drop_generator = torch.Generator(device=device).manual_seed(seed + 1)
    started = time.perf_counter()
    reports = []
    try:
        for position, unit in enumerate(tqdm(units, desc=f"reconstruct ({config.method})", unit="unit")):
            share = None
            if config.time_budget is not None:
                share = max(config.time_budget - (time.perf_counter() - started), 0.0) / (len(units) - position)
            reports.append(
                _reconstruct_unit(
                    model,
                    layers,
                    matmuls or {},
                    unit,
                    inputs,
                    config,
                    round_weight,
                    device,
                    index_generator,
                    drop_generator,
                    share,
                )
            )
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.to("cpu")
        for module in [*layers.values(), *(matmuls or {}).values()]:
            module.learning = None
    return reports


def _reconstruct_unit(
    model,
    layers,
    matmuls,
    unit: Unit,
    inputs,
    config: ReconstructionConfig,
    round_weight: float,
    device,
    index_generator: torch.Generator,
    drop_generator: torch.Generator,
    time_share: float | None,
) -> dict:
    module = model.get_submodule(unit.name)
    unit_layers = [layers[name] for name in unit.layers]
    # Attention matmuls are learned with the block that holds them (module paths below the unit's).
    unit_matmuls = (
        [m for name, m in matmuls.items() if name.startswith(f"{unit.name}.")] if unit.kind == "block" else []
    )
    switchable = [*layers.values(), *matmuls.values()]
    for quantized in switchable:
        quantized.bypass = True
    try:
        fp_inputs, fp_outputs = unit_io(model, module, inputs, 64, outputs=True, device=device)
        weights = fisher_weights(model, module, inputs, 64, device) if config.loss is Loss.FISHER else None
    finally:
        for quantized in switchable:
            quantized.bypass = False
    quant_inputs, _ = unit_io(model, module, inputs, 64, outputs=False, device=device)

    learnings = [
        LayerLearning(
            layer,
            learn_rounding=True,
            learn_act=config.learns_steps,
            drop_prob=config.unit_drop_prob,
            generator=drop_generator,
        ).to(device)
        for layer in unit_layers
    ]
    matmul_learnings = [
        MatMulLearning(m, learn_act=config.learns_steps, drop_prob=config.unit_drop_prob, generator=drop_generator).to(
            device
        )
        for m in unit_matmuls
    ]
    for quantized, learning in zip([*unit_layers, *unit_matmuls], [*learnings, *matmul_learnings]):
        quantized.learning = learning
    evaluation = slice(0, min(len(inputs), 256))
    everything = [*learnings, *matmul_learnings]

    def run_float(call):
        for quantized in [*unit_layers, *unit_matmuls]:
            quantized.bypass = True
        try:
            with torch.no_grad():
                return call()
        finally:
            for quantized in [*unit_layers, *unit_matmuls]:
                quantized.bypass = False

    windows = None
    if config.window is not None:
        windows = plan_windows(module, fp_inputs[:2].to(device), config.window, run_float)
    before = _reconstruction_error(module, everything, quant_inputs[evaluation], fp_outputs[evaluation], device)

    rounding_params = [p for learning in learnings for p in learning.rounding_parameters()]
    step_params = [p for learning in everything for p in learning.step_parameters()]
    optimizer = torch.optim.Adam(rounding_params, lr=config.lr_rounding)
    step_optimizer = torch.optim.Adam(step_params, lr=config.lr_step) if step_params else None
    total = config.iters
    began = time.perf_counter()
    bar = tqdm(total=total, desc=f"{unit.name} ({unit.kind})", unit="it", leave=False)
    iteration = 0
    while iteration < total:
        index = torch.randint(len(inputs), (config.batch_size,), generator=index_generator)
        x, x_float = quant_inputs[index], fp_inputs[index]
        target = fp_outputs[index] if windows is None else None
        target_weights = None if weights is None else weights[index]
        if windows is not None:
            offsets = windows.offsets(len(index), *x.shape[2:], generator=index_generator)
            x, x_float = windows.crop(x, offsets), windows.crop(x_float, offsets)
            target = run_float(lambda: module(x_float.to(device)))
            if target_weights is not None:
                target_weights = windows.crop(target_weights, offsets, scale=windows.stride)
        x = x.to(device)
        if config.unit_drop_prob > 0:
            x = torch.where(
                torch.rand(x.shape, generator=drop_generator, device=device) < config.unit_drop_prob,
                x_float.to(device),
                x,
            )
        out = module(x)
        loss = _output_error(out, target.to(device), None if target_weights is None else target_weights.to(device))
        beta = beta_schedule(iteration, total, config.warmup, config.beta_start, config.beta_end)
        if beta is not None:
            loss = loss + round_weight * sum(learning.rounding.regularizer(beta) for learning in learnings)
        optimizer.zero_grad()
        if step_optimizer:
            step_optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step_optimizer:
            for group in step_optimizer.param_groups:  # cosine decay of the step learning rate, as in QDrop
                group["lr"] = 0.5 * config.lr_step * (1 + math.cos(math.pi * iteration / total))
            step_optimizer.step()
        iteration += 1
        bar.update(1)
        if iteration == 10 and time_share is not None:
            per_iteration = (time.perf_counter() - began) / 10
            capped = max(20, min(total, int(time_share / per_iteration)))
            if capped < total:
                log.info("%s: %d iterations fit the time budget (of %d)", unit.name, capped, total)
                total = capped
                bar.total = total
        if iteration % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4g}")
    bar.close()
    after = _reconstruction_error(module, everything, quant_inputs[evaluation], fp_outputs[evaluation], device)
    changed = [
        float((learning.rounding.hard_codes() != layer.weight_int.float()).float().mean())
        for layer, learning in zip(unit_layers, learnings)
    ]
    for quantized, learning in zip([*unit_layers, *unit_matmuls], everything):
        learning.write_back(quantized)
        quantized.learning = None
    log.info(
        "%s: output MSE %.4g -> %.4g over %d iterations%s",
        unit.name,
        before,
        after,
        iteration,
        "" if windows is None else f" on {windows.size}-pixel windows",
    )
    return {
        "unit": unit.name,
        "kind": unit.kind,
        "layers": list(unit.layers),
        "iterations": iteration,
        "window": None if windows is None else windows.size,
        "mse_before": before,
        "mse_after": after,
        "rounding_changed": changed,
        "seconds": round(time.perf_counter() - began, 2),
    }
