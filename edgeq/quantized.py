"""The quantized model: fake-quantized layers, how a float model becomes one, and its folder on disk.

Every ``nn.Conv2d`` and ``nn.Linear`` (after BatchNorm folding) is wrapped by a
:class:`QuantizedLayer` that quantizes its input (per tensor, unsigned) and uses
integer weights times per-channel scales; the first and last layer (in execution order)
keep the spec's ``first_last_bits``. A :class:`edgeq.layers.MatMul` of two activations
becomes a :class:`QuantizedMatMul`. Ranges come from MSE searches on calibration images
(:func:`calibrate`); :func:`quantize_module` adds ``edgeq.reconstruction``'s learned
rounding. A quantize folder holds ``quantized.safetensors`` (the wrapped model's state
and the spec); :func:`load` rebuilds the model from the float model its manifest names.

The quantize stage makes these folders; export, verify, bundle, mixed precision, the
evaluation and the reports read them through this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import quant
from .data import Preprocess
from .errors import EdgeqError
from .graph import eval_mode, execution_order, fold_batchnorm
from .layers import MatMul, expose_timm_attention
from .manifest import Manifest, sha256_file, staged_folder
from .models import LoadedModel, load_model
from .reconstruction import ReconstructionConfig, Rounding, reconstruct
from .reconstruction.gptq import gptq_round
from .spec import QuantSpec

log = logging.getLogger(__name__)

WEIGHTS_FILE = "quantized.safetensors"
QUANTIZABLE = (nn.Conv2d, nn.Linear)
_SAMPLES_PER_BATCH = 1 << 15  # activation values kept per batch for the MSE range search


class QuantizedLayer(nn.Module):
    """A Conv2d or Linear with fake-quantized input and weights.

    Buffers: ``weight_int`` (int8 container for any bit width), ``weight_scale`` (one per
    output channel), ``act_scale`` and ``act_zero_point`` (per tensor). The float weight
    stays in ``layer`` so later rounding methods can start from it.
    """

    def __init__(self, layer: nn.Module, weight_bits: int, act_bits: int):
        super().__init__()
        self.layer = layer
        self.weight_bits, self.act_bits = weight_bits, act_bits
        out_channels = layer.weight.shape[0]
        self.register_buffer("weight_int", torch.zeros_like(layer.weight, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels))
        self.register_buffer(
            "weight_zero_point", torch.zeros(out_channels, dtype=torch.int8)
        )  # 0 unless weights are asymmetric
        self.register_buffer("act_scale", torch.tensor(1.0))
        self.register_buffer("act_zero_point", torch.tensor(0, dtype=torch.int32))
        self.bypass = False  # True: run the float layer (while observing calibration ranges)
        # during reconstruction: the rounding and step being learned (edgeq.reconstruction.LayerLearning)
        self.learning = None
        # GPTQ's moved weights (edgeq.reconstruction.gptq) while the model is being quantized; never saved
        self.rounding_start = None

    @property
    def weight_range(self) -> tuple[int, int]:
        return quant.signed_range(self.weight_bits)

    @property
    def act_range(self) -> tuple[int, int]:
        return quant.unsigned_range(self.act_bits)

    def set_weight_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        """Set the per-channel scales (and zero points) and round the weights to nearest."""
        weight = self.layer.weight.detach()
        self.weight_scale.copy_(scale)
        self.weight_zero_point.copy_(torch.zeros_like(scale) if zero_point is None else zero_point)
        codes = quant.quantize(weight, quant.channel_view(scale, weight), self.channel_zero_point(), *self.weight_range)
        self.weight_int.copy_(codes.to(torch.int8))

    def channel_zero_point(self) -> torch.Tensor:
        return quant.channel_view(self.weight_zero_point.float(), self.weight_int)

    def dequantized_weight(self) -> torch.Tensor:
        return quant.dequantize(
            self.weight_int.float(), quant.channel_view(self.weight_scale, self.weight_int), self.channel_zero_point()
        )

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return quant.fake_quantize(x, self.act_scale, self.act_zero_point.float(), *self.act_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return self.layer(x)
        if self.learning is not None:
            weight, x = self.learning.weight(self), self.learning.quantize_input(x)
        else:
            weight, x = self.dequantized_weight(), self.quantize_input(x)
        params = {"weight": weight}
        if self.layer.bias is not None:
            params["bias"] = self.layer.bias
        return torch.func.functional_call(self.layer, params, (x,))


class QuantizedMatMul(nn.Module):
    """A :class:`edgeq.layers.MatMul` of two activations, each input fake-quantized per tensor.

    Buffers: ``act_scale`` and ``act_zero_point``, one entry per input (unsigned, with a
    zero point, as every activation). ``matmul`` is the wrapped module.
    """

    def __init__(self, matmul: nn.Module, act_bits: int):
        super().__init__()
        self.matmul = matmul
        self.act_bits = act_bits
        self.register_buffer("act_scale", torch.ones(2))
        self.register_buffer("act_zero_point", torch.zeros(2, dtype=torch.int32))
        self.bypass = False
        self.learning = None  # during reconstruction: edgeq.reconstruction.MatMulLearning

    @property
    def act_range(self) -> tuple[int, int]:
        return quant.unsigned_range(self.act_bits)

    def quantize_operand(self, x: torch.Tensor, index: int) -> torch.Tensor:
        return quant.fake_quantize(x, self.act_scale[index], self.act_zero_point[index].float(), *self.act_range)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return self.matmul(a, b)
        if self.learning is not None:
            return self.matmul(*self.learning.quantize_operands(a, b))
        return self.matmul(self.quantize_operand(a, 0), self.quantize_operand(b, 1))


def quantized_matmuls(model: nn.Module) -> dict[str, QuantizedMatMul]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedMatMul)}


def quantizable_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, QUANTIZABLE) and name]


def _wrap(model: nn.Module, names: list[str], spec: QuantSpec) -> dict[str, QuantizedLayer]:
    """Wrap ``names`` (in execution order): the first and last take the spec's edge bit widths."""
    unknown = sorted({layer for layer, _, _ in spec.layers} - set(names))
    if unknown:
        raise EdgeqError(
            f"the spec names layers the model lacks: {', '.join(unknown[:3])}",
            f"quantizable layers: {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}",
        )
    wrapped = {}
    for index, name in enumerate(names):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped[name] = QuantizedLayer(
            getattr(parent, leaf), *spec.layer_bits(edge=index in (0, len(names) - 1), name=name)
        )
        setattr(parent, leaf, wrapped[name])
    return wrapped


def _unwrap(model: nn.Module, name: str) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, getattr(parent, leaf).layer)


def prepare(model: nn.Module, spec: QuantSpec, example: torch.Tensor) -> tuple[nn.Module, dict[str, QuantizedLayer]]:
    """Fold BatchNorm and wrap every quantizable layer (uncalibrated); ``example`` is an input
    batch that shows the order layers run in, which decides the first and the last."""
    folded = eval_mode(fold_batchnorm(model))
    exposed = expose_timm_attention(folded)  # folded is a copy: the caller's model keeps its attention
    if exposed:
        log.info("timm attention: Q·Kᵀ and weights·V of %d modules quantized at %d bits", exposed, spec.matmul_act_bits)
    names = quantizable_layers(folded)
    if not names:
        raise EdgeqError(
            "the model has no Conv2d or Linear layer to quantize", "pass a CNN or ViT built from torch.nn layers"
        )
    wrapped = _wrap(folded, execution_order(folded, names, example), spec)
    for name, module in list(folded.named_modules()):
        if isinstance(module, MatMul):
            parent_name, _, leaf = name.rpartition(".")
            setattr(
                folded.get_submodule(parent_name) if parent_name else folded,
                leaf,
                QuantizedMatMul(module, spec.matmul_act_bits),
            )
    return folded, wrapped


@torch.no_grad()
def calibrate(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    inputs: np.ndarray,
    spec: QuantSpec,
    *,
    seed: int = 0,
    batch_size: int = 32,
) -> None:
    """Set every layer's weight scales and input range from the float model's activations."""
    for layer in layers.values():
        layer.set_weight_qparams(
            *quant.weight_qparams(layer.layer.weight, layer.weight_bits, spec.weight_observer, spec.weight_symmetric)
        )

    generator = torch.Generator().manual_seed(seed)
    stats = {name: {"low": float("inf"), "high": float("-inf"), "samples": []} for name in layers}

    def observe(name):
        def hook(_module, args):
            x = args[0].detach()
            entry = stats[name]
            entry["low"] = min(entry["low"], x.min().item())
            entry["high"] = max(entry["high"], x.max().item())
            flat = x.flatten()
            if flat.numel() > _SAMPLES_PER_BATCH:
                flat = flat[torch.randint(flat.numel(), (_SAMPLES_PER_BATCH,), generator=generator)]
            entry["samples"].append(flat.clone())

        return hook

    matmuls = quantized_matmuls(model)
    for name in matmuls:
        for index in (0, 1):
            stats[f"{name}#{index}"] = {"low": float("inf"), "high": float("-inf"), "samples": []}

    def observe_operands(name):
        def hook(_module, args):
            for index in (0, 1):
                observe(f"{name}#{index}")(None, (args[index],))

        return hook

    # Observe the float model, so no quantization error feeds the ranges.
    handles = [layer.layer.register_forward_pre_hook(observe(name)) for name, layer in layers.items()]
    handles += [m.matmul.register_forward_pre_hook(observe_operands(name)) for name, m in matmuls.items()]
    bypassed = [*layers.values(), *matmuls.values()]
    for module in bypassed:
        module.bypass = True
    try:
        batches = range(0, len(inputs), batch_size)
        # one batch is over in a moment: a bar for it is only noise (the layer-cost search calibrates hundreds)
        for start in tqdm(batches, desc="calibrating", unit="batch", leave=False, disable=len(batches) <= 1):
            model(torch.from_numpy(inputs[start : start + batch_size]))
    finally:
        for handle in handles:
            handle.remove()
        for module in bypassed:
            module.bypass = False
    for name, matmul in matmuls.items():
        for index in (0, 1):
            entry = stats.pop(f"{name}#{index}")
            if not entry["samples"]:
                continue
            scale, zero_point = quant.activation_qparams(
                torch.cat(entry["samples"]), entry["low"], entry["high"], matmul.act_bits, spec.act_observer
            )
            matmul.act_scale[index] = scale
            matmul.act_zero_point[index] = zero_point
    unused = [name for name in layers if not stats[name]["samples"]]
    for name in unused:  # never called in forward (e.g. an unused head): leave it as it was
        log.warning("layer %s never ran during calibration; it stays unquantized", name)
        _unwrap(model, name)
        del layers[name]
    for name, layer in layers.items():
        entry = stats[name]
        scale, zero_point = quant.activation_qparams(
            torch.cat(entry["samples"]), entry["low"], entry["high"], layer.act_bits, spec.act_observer
        )
        layer.act_scale.fill_(scale)
        layer.act_zero_point.fill_(zero_point)


def layer_output_error(layer: QuantizedLayer, x: torch.Tensor) -> torch.Tensor:
    """Per output channel, the mean over a batch of what the layer's weight rounding adds to its
    output: ``mean(x_q · (W_q − W))`` with the input quantized as the layer quantizes it."""
    x = layer.quantize_input(x)
    delta = layer.dequantized_weight() - layer.layer.weight
    inner = layer.layer
    if isinstance(inner, nn.Conv2d):
        out = F.conv2d(x, delta, None, inner.stride, inner.padding, inner.dilation, inner.groups)
        return out.mean(dim=(0, 2, 3))
    return F.linear(x, delta).reshape(-1, delta.shape[0]).mean(0)


@torch.no_grad()
def correct_biases(model: nn.Module, layers: dict[str, QuantizedLayer], inputs: np.ndarray) -> int:
    """Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2).

    Rounding weights shifts each output channel's mean: with 4-bit depthwise weights the
    shift alone takes EfficientNet-Lite0 to chance. Subtracting, from each layer's bias, the
    mean error its rounding adds on the calibration images (synthetic ones keep it
    data-free) removes that shift. One forward pass in execution order corrects every
    layer: each layer is corrected, from the inputs the already corrected layers give it,
    before it computes its own output. All ``inputs`` go through in one batch, so the means
    are over all of them. The biases are changed in place, so this runs once, on final
    rounding: a second run would subtract the first run's correction again. Layers without a
    bias (no BatchNorm folded into them) are left as they are, so the model keeps the
    parameters its float model has. Returns the number of layers corrected.
    """
    corrected = 0

    def correct(layer):
        def hook(_module, args):
            nonlocal corrected
            if layer.layer.bias is not None and layer.learning is None:
                layer.layer.bias.sub_(layer_output_error(layer, args[0]))
                corrected += 1

        return hook

    handles = [layer.register_forward_pre_hook(correct(layer)) for layer in layers.values()]
    try:
        model(torch.from_numpy(inputs))
    finally:
        for handle in handles:
            handle.remove()
    log.info("bias correction: %d of %d layers", corrected, len(layers))
    return corrected


def quantize_module(
    model: nn.Module,
    inputs: np.ndarray,
    spec: QuantSpec | str,
    *,
    seed: int = 0,
    reconstruction: ReconstructionConfig | None = None,
    device: str = "cpu",
    report: list | None = None,
) -> nn.Module:
    """In memory: BN-fold, wrap, calibrate and (with ``reconstruction``) reconstruct ``model`` on float ``inputs``
    (N, C, H, W).

    ``report``, when given, receives one entry per reconstructed unit. With
    ``reconstruction.bias_correction`` every layer's bias is corrected for the mean error of its
    rounded weights (:func:`correct_biases`) once rounding is final (after reconstruction, if
    any); ``ReconstructionConfig(method="rtn", bias_correction=True)`` corrects round-to-nearest.
    The corrected bias replaces the float one inside the quantized model.
    """
    spec = QuantSpec.load(spec) if isinstance(spec, str) else spec
    prepared, layers = prepare(model, spec, torch.from_numpy(inputs[:1]))
    calibrate(prepared, layers, inputs, spec, seed=seed)
    started = time.perf_counter()
    if reconstruction is not None and reconstruction.initial_rounding is Rounding.GPTQ:
        order = execution_order(prepared, list(layers), torch.from_numpy(inputs[:1]))
        gptq_round(prepared, layers, order, inputs)
    if reconstruction is not None and reconstruction.learns:
        learning = reconstruction
        if reconstruction.time_budget is not None:
            # A budget is for the rounding as a whole: GPTQ's pass over the layers is spent from it, so
            # `edgeq compile --time-budget 1800` means 30 minutes whatever the start.
            left = reconstruction.time_budget - (time.perf_counter() - started)
            if left < reconstruction.time_budget:
                log.info("%.0f s of the time budget left for reconstruction after GPTQ", max(left, 0.0))
            learning = dataclasses.replace(reconstruction, time_budget=max(left, 1e-3))
        units = reconstruct(
            prepared,
            layers,
            torch.from_numpy(inputs),
            learning,
            seed=seed,
            device=device,
            matmuls=quantized_matmuls(prepared),
        )
        if report is not None:
            report.extend(units)
    # Once, at the end: the biases are corrected in place, and reconstruction's float targets
    # (the same layers run unquantized) must see the model's own biases, as must the error
    # the correction subtracts from them.
    if reconstruction is not None and reconstruction.bias_correction:
        correct_biases(prepared, layers, inputs)
    for layer in layers.values():
        layer.rounding_start = None
    return prepared


def float_biases(float_model: nn.Module) -> dict[str, torch.Tensor | None]:
    """The biases of the float model's quantizable layers, BatchNorm folded in, by layer name.

    Bias correction changes a quantized layer's bias in place (on ``layer.layer``), so a
    quantized model run with its layers bypassed is not the float model: comparisons
    against full precision take these biases back for the float run (:func:`running_float`).
    """
    folded = fold_batchnorm(float_model)
    return {
        name: (None if m.bias is None else m.bias.detach().clone())
        for name, m in folded.named_modules()
        if isinstance(m, QUANTIZABLE) and name
    }


@contextlib.contextmanager
def running_float(layers: dict[str, QuantizedLayer], biases: dict[str, torch.Tensor | None] | None = None):
    """Every layer bypassed to its float layer for a while, with ``biases`` (:func:`float_biases`) in place of the
    corrected ones when given, so the model computes full precision; all is put back after."""
    saved = {}
    try:
        for name, layer in layers.items():
            layer.bypass = True
            if biases is not None and biases.get(name) is not None and layer.layer.bias is not None:
                saved[name] = layer.layer.bias.detach().clone()
                layer.layer.bias.data.copy_(biases[name])
        yield
    finally:
        for name, layer in layers.items():
            layer.bypass = False
            if name in saved:
                layer.layer.bias.data.copy_(saved[name])


def quantized_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, QuantizedLayer)]


def save(model: nn.Module, manifest: Manifest, out) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with staged_folder(out) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"spec": json.dumps(manifest.spec)})
        manifest.write(tmp)
    log.info("quantized model written to %s", out)
    return out


def load_recorded_model(manifest: Manifest, *, allow_pickle: bool = False, preprocess=None) -> LoadedModel:
    """The float model a quantize manifest names, checked against what it records.

    A model file's bytes are compared with the recorded hash before it is opened, so a
    file swapped since quantization is never unpickled; the weights' digest is compared
    after. Unpickling needs ``allow_pickle`` from the command line: the manifest cannot
    grant it (a folder from elsewhere could then run any code).
    """
    model_entry = manifest.input("model")
    path = model_entry["path"]
    recorded_file = model_entry.get("file_sha256")
    if Path(path).is_file():
        if recorded_file is None and allow_pickle:
            raise EdgeqError(
                f"{manifest.stage} manifest records no file hash for model {path}, so it cannot be checked before "
                "unpickling",
                "re-run 'edgeq quantize' with this edgeq",
            )
        if recorded_file is not None and sha256_file(path) != recorded_file:
            raise EdgeqError(
                f"model {path} changed since it was quantized (its sha256 differs from the manifest's)",
                "re-run 'edgeq quantize' on the model you mean",
            )
    loaded = load_model(path, allow_pickle=allow_pickle, preprocess=preprocess)
    if loaded.digest() != model_entry["sha256"]:
        if loaded.arch and loaded.arch.startswith("factory:"):
            raise EdgeqError(
                f"factory {path} returned other weights than when it was quantized",
                "a factory must return the same weights every call (load them from a file, or seed any random "
                "initialization), then re-run 'edgeq quantize'",
            )
        raise EdgeqError(f"model {path} changed since it was quantized", "re-run 'edgeq quantize'")
    return loaded


def load(folder, *, allow_pickle: bool = False) -> tuple[nn.Module, LoadedModel, QuantSpec, Manifest]:
    """Rebuild the fake-quantized model of a quantize folder (from the float model it names).

    ``allow_pickle`` comes from the command line only (see :func:`load_recorded_model`).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = Manifest.load(folder, "quantize")
    spec = QuantSpec.from_dict(manifest.spec)
    model_entry = manifest.input("model")
    meta = manifest.extra["model"]
    # what calibration used, command-line overrides included
    recorded = Preprocess.from_dict(meta["preprocess"]) if meta.get("preprocess") else None
    loaded = load_recorded_model(manifest, allow_pickle=allow_pickle, preprocess=recorded)
    loaded.classes = tuple(meta["classes"])
    model, layers = prepare(loaded.module, spec, torch.zeros(loaded.preprocess.input_shape))
    recorded = set(manifest.extra["layers"])
    if not recorded <= set(layers):
        raise EdgeqError(f"{folder} does not match the layers of {model_entry['path']}", "re-run 'edgeq quantize'")
    for name in set(layers) - recorded:  # left unquantized at calibration
        _unwrap(model, name)
    state = load_file(str(manifest.checked_output(folder, WEIGHTS_FILE)))
    missing = [key for key in model.state_dict() if key not in state]
    if missing:  # e.g. timm attention quantized since the folder was made
        raise EdgeqError(
            f"{folder} holds no {missing[0]} (made by an edgeq that quantized less of this model)",
            "re-run 'edgeq quantize'",
        )
    model.load_state_dict(state)
    return eval_mode(model), loaded, spec, manifest
