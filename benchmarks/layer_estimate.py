"""Whole-layer cycle estimates of the edgeq kernels from an emulator's block counts and llvm-mca.

    python benchmarks/layer_estimate.py [--models resnet18,mobilenetv2] [--cores a72,a76] [--validate] [--json]

For boards we do not have. Each layer of ResNet-18 and MobileNetV2 (224×224) is run once,
through the kernels exactly as a compiled module calls them (``edgeq_conv2d`` /
``edgeq_depthwise_conv2d``, im2col, table builds, unpacking, epilogue and all), in a small
static program under ``qemu-aarch64 -d exec,nochain``: the trace gives how many times each
basic block ran (exact counts; the emulator's timing is never used). Every block that ran
is cut out of the program's disassembly and llvm-mca (LLVM's scheduling model of the core)
gives its cycles per execution in steady state; the layer's estimate is the sum of count ×
cycles. It ignores cache misses and branch mispredictions, so it is a lower bound that
compares instruction mixes over whole layers, not a latency.

Each layer is estimated twice per core: as edgeq runs it at W2A4 (2-bit weights, 4-bit
inputs; the table-lookup kernel on the Cortex-A72 where edgeq chooses it, sdot on the A76)
and as an int8 kernel of the same tiling (the same code with 8-bit weights and inputs: the
int16-lane smlal/sadalp kernel without dot product, sdot with it). The first and last
layers stay 8-bit in both, as edgeq's W2A4 spec keeps them.

``--validate`` checks the method where it can be measured: the same estimate for the x86
AVX2 kernels (block counts from ``qemu-x86_64 -cpu max``, llvm-mca's Zen 3 model) against
their measured thread CPU time on this machine, converted to cycles with the core clock
measured by a chain of dependent adds; it prints the error per layer. (There the "int8"
column is edgeq's own 8-bit path: the int8 baseline is written for Arm.) x86 string
instructions (``rep stos`` in glibc's memset) are left out of the estimate: llvm-mca
charges them a flat 100 cycles whatever their length.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from edgeq.kernels import estimate

CORES = {
    "a72": estimate.core(
        "Cortex-A72 (Raspberry Pi 4)", "aarch64", (), "cortex-a72", "cortex-a72", ("qemu-aarch64", "-cpu", "cortex-a72")
    ),
    "a76": estimate.core(
        "Cortex-A76 (Raspberry Pi 5)",
        "aarch64",
        ("asimddp",),
        "cortex-a76",
        "cortex-a76",
        ("qemu-aarch64", "-cpu", "max"),
    ),
    "x86-avx2": estimate.core(
        "this x86 CPU, AVX2 kernels (llvm-mca: Zen 3)",
        "x86_64",
        ("avx2", "fma"),
        None,
        "znver3",
        ("qemu-x86_64", "-cpu", "max"),
    ),
}


@dataclasses.dataclass(frozen=True)
class Layer:
    """A convolution of a network at batch 1 (NHWC), and how many times the network has it."""

    name: str
    in_hw: int
    in_c: int
    out_c: int
    kernel: int
    stride: int
    depthwise: bool = False
    count: int = 1
    eight_bit: bool = False  # the first and last layers keep 8 bits in edgeq's W2A4 spec

    @property
    def out_hw(self) -> int:
        return (self.in_hw + 2 * (self.kernel // 2) - self.kernel) // self.stride + 1

    @property
    def macs(self) -> int:
        return self.case.macs

    @property
    def case(self) -> estimate.ConvCase:
        pad = self.kernel // 2
        return estimate.ConvCase(
            self.in_hw,
            self.in_hw,
            self.in_c,
            self.out_c,
            self.kernel,
            self.kernel,
            self.stride,
            self.stride,
            pad,
            pad,
            self.depthwise,
        )


def resnet18() -> list[Layer]:
    layers = [Layer("conv1 7x7/2", 224, 3, 64, 7, 2, eight_bit=True)]
    layers.append(Layer("layer1 3x3 64", 56, 64, 64, 3, 1, count=4))
    for stage, (c, hw) in enumerate([(128, 56), (256, 28), (512, 14)], start=2):
        layers.append(Layer(f"layer{stage} 3x3/2 {c}", hw, c // 2, c, 3, 2))
        layers.append(Layer(f"layer{stage} 1x1/2 {c} shortcut", hw, c // 2, c, 1, 2))
        layers.append(Layer(f"layer{stage} 3x3 {c}", hw // 2, c, c, 3, 1, count=3))
    layers.append(Layer("fc 512x1000", 1, 512, 1000, 1, 1, eight_bit=True))
    return layers


def mobilenetv2() -> list[Layer]:
    layers = [Layer("stem 3x3/2 32", 224, 3, 32, 3, 2, eight_bit=True)]
    found: dict[Layer, int] = collections.Counter()
    hw, c_in = 112, 32
    for t, c, n, s in [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = c_in * t
            if t != 1:
                found[Layer(f"expand 1x1 {c_in}->{hidden} @{hw}", hw, c_in, hidden, 1, 1)] += 1
            found[Layer(f"depthwise 3x3/{stride} {hidden} @{hw}", hw, hidden, hidden, 3, stride, True)] += 1
            hw = (hw - 1) // stride + 1
            found[Layer(f"project 1x1 {hidden}->{c} @{hw}", hw, hidden, c, 1, 1)] += 1
            c_in = c
    layers += [dataclasses.replace(layer, count=count) for layer, count in found.items()]
    layers.append(Layer("head 1x1 320->1280 @7", 7, 320, 1280, 1, 1))
    layers.append(Layer("fc 1280x1000", 1, 1280, 1000, 1, 1, eight_bit=True))
    return layers


MODELS = {"resnet18": resnet18, "mobilenetv2": mobilenetv2}


def estimate_layer(estimator: estimate.Estimator, layer: Layer, bits: tuple[int, int]) -> estimate.LayerEstimate:
    """Cycles of one layer: at ``bits``, or (8, 8) through the int8 baseline on Arm (dense layers)."""
    weight_bits, input_bits = (8, 8) if layer.eight_bit else bits
    baseline = bits == (8, 8) and estimator.core.arch == "aarch64" and not layer.depthwise
    return estimator.estimate(layer.case, weight_bits, input_bits, int8_baseline=baseline)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenetv2")
    parser.add_argument("--cores", default="a72,a76")
    parser.add_argument("--validate", action="store_true", help="also estimate the x86 AVX2 kernels and time them")
    parser.add_argument("--layers", type=int, default=0, help="only the first N layers of each model (tests)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    for tool in ("aarch64-linux-gnu-gcc", "qemu-aarch64"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: run scripts/setup.sh (it installs the cross compiler and qemu)")
    cores = [c.strip() for c in args.cores.split(",") if c.strip()]
    if args.validate and "x86-avx2" not in cores:
        cores.append("x86-avx2")
    unknown = [c for c in cores if c not in CORES] + [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown {unknown}; cores: {', '.join(CORES)}; models: {', '.join(MODELS)}")
    results = {"cores": {}, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for core in cores:
            spec = CORES[core]
            estimator = estimate.Estimator(spec, work)
            binary = estimator.binary
            results["cores"][core] = {"label": spec.label, "build_layout": spec.layout.name}
            clock = None
            if core == "x86-avx2":
                clock = float(
                    subprocess.run([str(binary), "--clock"], check=True, capture_output=True, text=True).stdout
                )
                results["cores"][core]["clock_hz"] = clock
            for model in args.models.split(","):
                rows = results["models"].setdefault(model, {}).setdefault(core, [])
                layers = MODELS[model]()
                for layer in layers[: args.layers or None]:
                    low = estimate_layer(estimator, layer, (2, 4))
                    int8 = estimate_layer(estimator, layer, (8, 8))
                    row = {
                        "layer": layer.name,
                        "count": layer.count,
                        "macs": layer.macs,
                        "w2a4_cycles": low.cycles,
                        "int8_cycles": int8.cycles,
                        "share_estimated": min(low.share_estimated, int8.share_estimated),
                        "w2a4_where": low.where,
                        "int8_where": int8.where,
                        "kernel": layer.kernel,
                        "depthwise": layer.depthwise,
                        "eight_bit": layer.eight_bit,
                    }
                    if clock:
                        row["w2a4_measured_cycles"] = clock * _measure(binary, low.case)
                        row["int8_measured_cycles"] = clock * _measure(binary, int8.case)
                    rows.append(row)
                    print(_format_row(core, row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    _print_tables(results)
    return 0


def _measure(binary: Path, case: Path) -> float:
    """Seconds of one run of the layer, natively (median of five timed batches after a warm-up)."""
    single = float(
        subprocess.run([str(binary), str(case), "1"], check=True, capture_output=True, text=True).stdout.split()[0]
    )
    repeats = max(1, int(0.05 / max(single, 1e-6)))
    times = [
        float(
            subprocess.run(
                [str(binary), str(case), str(repeats)], check=True, capture_output=True, text=True
            ).stdout.split()[0]
        )
        for _ in range(5)
    ]
    return float(np.median(times))


def _format_row(core: str, row: dict) -> str:
    text = (
        f"{core:<9} {row['layer']:<34} x{row['count']:<2} W2A4 {row['w2a4_cycles'] / 1e6:8.2f} Mcyc  "
        f"int8 {row['int8_cycles'] / 1e6:8.2f} Mcyc  int8/W2A4 {row['int8_cycles'] / row['w2a4_cycles']:5.2f}x"
    )
    text += "  W2A4 time in: " + ", ".join(f"{name} {share:.0%}" for name, share in row["w2a4_where"].items())
    if "w2a4_measured_cycles" in row:
        text += (
            f"  measured W2A4 {row['w2a4_measured_cycles'] / 1e6:8.2f} "
            f"int8 {row['int8_measured_cycles'] / 1e6:8.2f} Mcyc"
        )
    return text


def _print_tables(results: dict) -> None:
    for model, per_core in results["models"].items():
        print(f"\n{model} (224x224, batch 1): estimated cycles, whole model = sum of layers x count")
        for core, rows in per_core.items():
            label = results["cores"][core]["label"]
            low = sum(r["w2a4_cycles"] * r["count"] for r in rows)
            int8 = sum(r["int8_cycles"] * r["count"] for r in rows)
            print(
                f"  {label}: W2A4 {low / 1e6:.1f} Mcycles, int8 of the same tiling {int8 / 1e6:.1f} Mcycles, "
                f"int8/W2A4 {int8 / low:.2f}x"
            )
            spatial = [r for r in rows if r.get("kernel") == 3 and not r.get("depthwise") and not r.get("eight_bit")]
            if spatial:
                low3 = sum(r["w2a4_cycles"] * r["count"] for r in spatial)
                int83 = sum(r["int8_cycles"] * r["count"] for r in spatial)
                print(
                    f"    its 3x3 convolutions at W2A4 ({sum(r['count'] for r in spatial)} layers; not the 8-bit first "
                    f"layer, not depthwise): W2A4 {low3 / 1e6:.1f} Mcycles, int8 {int83 / 1e6:.1f}, "
                    f"int8/W2A4 {int83 / low3:.2f}x"
                )
            if rows and "w2a4_measured_cycles" in rows[0]:
                for kind in ("w2a4", "int8"):
                    errors = [r[f"{kind}_cycles"] / r[f"{kind}_measured_cycles"] - 1 for r in rows]
                    measured = sum(r[f"{kind}_measured_cycles"] * r["count"] for r in rows)
                    estimated = sum(r[f"{kind}_cycles"] * r["count"] for r in rows)
                    print(
                        f"    {kind}: estimate/measured over the model {estimated / measured:.2f}; per layer "
                        f"median error {np.median(np.abs(errors)):.0%}, worst {max(errors, key=abs):+.0%}"
                    )


if __name__ == "__main__":
    sys.exit(main())
