"""What a layer costs at given bit widths: packed weight bytes (exact), or the measured time of
edgeq's kernels for it, built for the target and run on this machine.

Time is measured, not modelled: a layer's shape (channels, kernel, stride, groups, input size)
is rebuilt alone with random weights, quantized at the bit widths, exported to QDQ ONNX and
planned onto the kernels with the target's layout, as the compile stage would (a small
quantized consumer behind it, so its epilogue writes codes as inside a network); its own
convolution step is timed through ctypes (the fastest of repeated runs). Timings are
cached per shape, bit widths, target and CPU in a JSON file, so a search over a model measures
each distinct shape once. Targets of another architecture (the Arm boards) cannot run here:
their costs need the board or an estimate, and asking for them is an error that says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import EdgeqError

log = logging.getLogger(__name__)

CACHE_ENV = "EDGEQ_CACHE"
# Timed runs per layer: at least this long in total and at least _MIN_RUNS; the fastest counts (other work on the
# machine only ever adds time)
_MIN_SECONDS = 0.1
_MIN_RUNS = 7


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """Everything of a Conv2d or Linear that decides its kernels' time."""

    kind: str  # conv or linear
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    input_size: tuple[int, ...]  # conv: (height, width); linear: the leading dimensions (tokens) of its input

    @property
    def weights(self) -> int:
        return self.out_channels * (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1]

    def key(self) -> str:
        return (
            f"{self.kind} {self.in_channels}->{self.out_channels} k{self.kernel[0]}x{self.kernel[1]} "
            f"s{self.stride[0]}x{self.stride[1]} p{self.padding[0]}x{self.padding[1]} g{self.groups} "
            f"in{'x'.join(map(str, self.input_size))}"
        )

    def build(self, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
        """The layer alone, with random weights, and an input of its size."""
        generator = torch.Generator().manual_seed(seed)
        if self.kind == "linear":
            # the kernels run a Linear as a 1x1 convolution over its rows (tokens): time it as one
            rows = int(np.prod(self.input_size)) if self.input_size else 1
            layer = nn.Conv2d(self.in_channels, self.out_channels, 1)
            example = torch.randn(1, self.in_channels, rows, 1, generator=generator)
        else:
            layer = nn.Conv2d(
                self.in_channels,
                self.out_channels,
                self.kernel,
                stride=self.stride,
                padding=self.padding,
                groups=self.groups,
            )
            example = torch.randn(1, self.in_channels, *self.input_size, generator=generator)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.1)
        # a quantized consumer behind it, as in a network: its epilogue then writes codes, not floats (and the
        # plan's output is a vector, as the kernels' plans need); only the layer's own steps are timed
        return nn.Sequential(
            layer, nn.ReLU(), nn.Conv2d(self.out_channels, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        ).eval(), example


def layer_shapes(module: nn.Module, example: torch.Tensor) -> dict[str, LayerShape]:
    """The shape of every Conv2d and Linear of ``module`` (by module name), from one forward pass on ``example``."""
    shapes: dict[str, LayerShape] = {}
    handles = []

    def hook(name):
        def observe(layer, args):
            x = args[0]
            if isinstance(layer, nn.Linear):
                shapes[name] = LayerShape(
                    "linear", layer.in_features, layer.out_features, (1, 1), (1, 1), (0, 0), 1, tuple(x.shape[1:-1])
                )
            else:
                padding = layer.padding if isinstance(layer.padding, tuple) else (0, 0)
                shapes[name] = LayerShape(
                    "conv",
                    layer.in_channels,
                    layer.out_channels,
                    tuple(layer.kernel_size),
                    tuple(layer.stride),
                    tuple(padding),
                    layer.groups,
                    tuple(x.shape[2:]),
                )

        return observe

    for name, layer in module.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and name:
            handles.append(layer.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


class ByteCosts:
    """Packed weight bytes: exact, the same on every target."""

    unit = "MB"

    def cost(self, shape: LayerShape, weight_bits: int, act_bits: int) -> float:
        return shape.weights * weight_bits / 8 / 1e6

    def describe(self) -> str:
        return "packed weight bytes"


class LatencyCosts:
    """Measured milliseconds of a layer's kernels, built for ``target`` and run on this machine."""

    unit = "ms"

    def __init__(self, target, cache: Path | None = None):
        from .kernels import layouts, native, toolchain

        if not target.is_native_arch:
            raise EdgeqError(
                f"layer times for {target.name} ({target.arch}) cannot be measured on this {os.uname().machine} "
                "machine",
                "price layers in weight bytes (--budget-mb), or run the search on the board",
            )
        missing = target.missing_host_features()
        if missing:
            raise EdgeqError(
                f"this CPU lacks {', '.join(missing)}, which {target.name}'s kernels need, so their time cannot be "
                "measured here",
                "pick a target this CPU runs ('edgeq targets'), or price layers in weight bytes (--budget-mb)",
            )
        self.target = target
        compiler, _, flags = toolchain.kernel_toolchain(target)
        root = _cache_root()
        self.library = native.Library(toolchain.build_shared(compiler, flags, root / "kernels"))
        self.layout = layouts.layout_for(target.arch, target.cpu_features)
        from .targets import host_cpu

        cpu = host_cpu()
        self.cpu = f"{cpu['model']} ({', '.join(cpu['features'])})"
        self.cache_path = cache or root / "layer-costs.json"
        self._cache = _read_cache(self.cache_path)

    def describe(self) -> str:
        return f"measured kernel time for {self.target.name} on {self.cpu}"

    def cost(self, shape: LayerShape, weight_bits: int, act_bits: int) -> float:
        key = f"{self.target.name} | {self.cpu} | {shape.key()} | w{weight_bits}a{act_bits}"
        if key not in self._cache:
            self._cache[key] = self._measure(shape, weight_bits, act_bits)
            _write_cache(self.cache_path, self._cache)
        return self._cache[key]

    def _measure(self, shape: LayerShape, weight_bits: int, act_bits: int) -> float:
        from .kernels import execute
        from .kernels import plan as kernel_plan
        from .qdq_model import build_qdq_model
        from .quantized import quantize_module
        from .spec import QuantSpec

        module, example = shape.build()
        spec = QuantSpec(weight_bits, act_bits, first_last_bits=None)
        calibration = torch.cat([example, example.flip(-1)]).numpy()
        quantized = quantize_module(module, calibration, spec, seed=0)
        onnx_model, _ = build_qdq_model(quantized, example)
        plan = kernel_plan.build_plan(onnx_model, self.layout)
        x = example.numpy()
        execute.run_plan(plan, self.library, x)  # warm: caches, lazily built tables
        times: list[float] = []
        began = time.perf_counter()
        while len(times) < _MIN_RUNS or time.perf_counter() - began < _MIN_SECONDS:
            timings: list = []
            execute.run_plan(plan, self.library, x, timings=timings)
            times.append(next(seconds for step, seconds in timings if step.kernel == "conv2d"))
        milliseconds = min(times) * 1e3
        log.debug("%s at w%da%d: %.4f ms", shape.key(), weight_bits, act_bits, milliseconds)
        return milliseconds


def _cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "edgeq")


def _read_cache(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}


def _write_cache(path: Path, values: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}.partial")
    staged.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    staged.replace(path)


def costs_for(budget: str, target=None):
    """The cost model of a budget kind: ``bytes`` or ``latency`` (the latter needs ``target``)."""
    if budget == "bytes":
        return ByteCosts()
    if budget == "latency":
        return LatencyCosts(target)
    raise EdgeqError(f"unknown cost '{budget}'", "choose bytes or latency")


__all__ = ["ByteCosts", "LatencyCosts", "LayerShape", "costs_for", "layer_shapes"]
