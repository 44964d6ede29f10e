"""What a layer costs at given bit widths: packed weight bytes (exact), or the measured time of
edgeq's kernels for it, built for the target and run on this machine.

Time is measured, not modelled: a layer's shape (channels, kernel, stride, groups, input size)
is rebuilt alone with random weights, quantized at the bit widths, exported to QDQ ONNX and
planned onto the kernels with the target's layout, as the compile stage would (a small
quantized consumer behind it, so its epilogue writes codes as inside a network); its own
convolution step is timed through ctypes (the fastest of repeated runs). Timings are
cached per shape, bit widths, target and CPU in a JSON file, so a search over a model measures
each distinct shape once.

Boards that are not at hand (the Arm targets, from an x86 machine) are priced by estimate
instead (:class:`EstimatedCosts`): the layer runs once through the kernels built for the
board, under qemu, and :mod:`edgeq.kernels.estimate` sums llvm-mca's cycles of every basic
block it ran; the board's clock (``clock_ghz`` in its target file) turns cycles into
milliseconds. An estimate ignores cache misses, so it ranks layers and bit widths rather
than predicting a latency (docs/kernels.md states its measured error).
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
                "estimate them (edgeq.layer_costs.EstimatedCosts), price layers in weight bytes (--budget-mb), "
                "or run the search on the board",
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
        return f"measured kernel time for {self.target.name} on {self.cpu}, one thread"

    def cost(self, shape: LayerShape, weight_bits: int, act_bits: int) -> float:
        from .kernels import toolchain

        # the kernels' sources are part of the key: a faster kernel must not be priced by an old timing
        key = (
            f"{self.target.name} | {self.cpu} | {toolchain.source_digest()} | 1 thread | {shape.key()} | "
            f"w{weight_bits}a{act_bits}"
        )
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
        times: list[float] = []
        # One thread: a parallel region waits for its slowest thread, so on a busy machine every run of a
        # multi-threaded kernel can take a scheduler slice, and no fastest run is then the layer's own time.
        with self.library.threads(1):
            execute.run_plan(plan, self.library, x)  # warm: caches, lazily built tables
            began = time.perf_counter()
            while len(times) < _MIN_RUNS or time.perf_counter() - began < _MIN_SECONDS:
                timings: list = []
                execute.run_plan(plan, self.library, x, timings=timings)
                times.append(next(seconds for step, seconds in timings if step.kernel == "conv2d"))
        milliseconds = min(times) * 1e3
        log.debug("%s at w%da%d: %.4f ms", shape.key(), weight_bits, act_bits, milliseconds)
        return milliseconds


class EstimatedCosts:
    """Estimated milliseconds of a layer's kernels on a board that is not at hand (cycles from
    :mod:`edgeq.kernels.estimate`, divided by the board's clock)."""

    unit = "ms"

    def __init__(self, target, cache: Path | None = None):
        from .kernels import estimate

        if not target.clock_ghz:
            raise EdgeqError(
                f"{target.name} records no core clock, so estimated cycles cannot become milliseconds",
                "price layers in weight bytes (--budget-mb), or add clock_ghz to its target file",
            )
        self.target = target
        self.core = estimate.core_for_target(target)
        missing = estimate.missing_tools(self.core)
        if missing:
            raise EdgeqError(
                f"estimating layer times for {target.name} needs {', '.join(missing)}",
                "run scripts/setup.sh (it installs the cross compiler, qemu-user and llvm), or price layers in "
                "weight bytes (--budget-mb)",
            )
        self.cache_path = cache or _cache_root() / "layer-costs.json"
        self._cache = _read_cache(self.cache_path)
        self._estimator = None
        self._work = None

    def describe(self) -> str:
        return (
            f"estimated kernel time for {self.target.name} (llvm-mca {self.core.mca_cpu} cycles of the blocks run "
            f"under qemu, at {self.target.clock_ghz:g} GHz; not a measurement)"
        )

    def cost(self, shape: LayerShape, weight_bits: int, act_bits: int) -> float:
        from .kernels import toolchain

        key = (
            f"{self.target.name} | estimate {self.core.mca_cpu} {toolchain.source_digest()} | {shape.key()} | "
            f"w{weight_bits}a{act_bits}"
        )
        if key not in self._cache:
            self._cache[key] = self._estimate(shape, weight_bits, act_bits)
            _write_cache(self.cache_path, self._cache)
        return self._cache[key]

    def _estimate(self, shape: LayerShape, weight_bits: int, act_bits: int) -> float:
        import tempfile

        from .kernels import estimate

        if self._estimator is None:
            self._work = tempfile.TemporaryDirectory(prefix="edgeq-estimate-")
            self._estimator = estimate.Estimator(self.core, Path(self._work.name))
        case, copies = conv_case(shape)
        cycles = self._estimator.estimate(case, weight_bits, act_bits).cycles * copies
        milliseconds = cycles / (self.target.clock_ghz * 1e6)
        log.debug(
            "%s at w%da%d on %s: %.4f ms (estimate)", shape.key(), weight_bits, act_bits, self.target.name, milliseconds
        )
        return milliseconds


def conv_case(shape: LayerShape):
    """The kernels' view of a layer, and how many times it runs: a Linear is a 1x1 convolution over its rows; a
    grouped convolution (neither dense nor depthwise) counts as its groups run one after another."""
    from .kernels.estimate import ConvCase

    if shape.kind == "linear":
        rows = int(np.prod(shape.input_size)) if shape.input_size else 1
        return ConvCase(rows, 1, shape.in_channels, shape.out_channels, 1, 1), 1
    height, width = shape.input_size
    depthwise = shape.groups > 1 and shape.groups == shape.in_channels == shape.out_channels
    groups = 1 if depthwise else shape.groups
    case = ConvCase(
        height,
        width,
        shape.in_channels // groups,
        shape.out_channels // groups,
        *shape.kernel,
        *shape.stride,
        *shape.padding,
        depthwise=depthwise,
    )
    return case, groups


def costs_for_target(target):
    """How a layer is priced for ``target``: measured where this machine runs its kernels, else estimated."""
    if target.is_native_arch and not target.missing_host_features():
        return LatencyCosts(target)
    return EstimatedCosts(target)


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


__all__ = ["ByteCosts", "EstimatedCosts", "LatencyCosts", "LayerShape", "costs_for_target", "layer_shapes"]
