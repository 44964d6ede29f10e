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
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from edgeq.kernels import layouts, native, toolchain

HARNESS = Path(__file__).resolve().parent / "csrc" / "layer_harness.c"


@dataclasses.dataclass(frozen=True)
class Core:
    """A core to estimate for: how the harness is built for it, modelled (llvm-mca) and traced (qemu)."""

    label: str
    arch: str
    gcc_cpu: str | None
    features: frozenset[str]
    mca_triple: str
    mca_cpu: str
    emulator: tuple[str, ...]


CORES = {
    "a72": Core(
        "Cortex-A72 (Raspberry Pi 4)",
        "aarch64",
        "cortex-a72",
        frozenset(),
        "aarch64-linux-gnu",
        "cortex-a72",
        ("qemu-aarch64", "-cpu", "cortex-a72"),
    ),
    "a76": Core(
        "Cortex-A76 (Raspberry Pi 5)",
        "aarch64",
        "cortex-a76",
        frozenset({"asimddp"}),
        "aarch64-linux-gnu",
        "cortex-a76",
        ("qemu-aarch64", "-cpu", "max"),
    ),
    "x86-avx2": Core(
        "this x86 CPU, AVX2 kernels (llvm-mca: Zen 3)",
        "x86_64",
        None,
        frozenset({"avx2", "fma"}),
        "x86_64-linux-gnu",
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
        per_pixel = self.kernel * self.kernel * (1 if self.depthwise else self.in_c) * self.out_c
        return self.out_hw * self.out_hw * per_pixel


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


def case_bytes(layer: Layer, weight_bits: int, input_bits: int, build_layout: layouts.Layout, seed: int = 0) -> bytes:
    """The harness's input for one layer: random codes and weights packed as the planner packs them."""
    rng = np.random.default_rng(seed)
    x_max = 2**input_bits - 1
    x = rng.integers(0, x_max + 1, (layer.in_hw, layer.in_hw, layer.in_c)).astype(np.uint8)
    # 8-bit weights in [-127, 127], as symmetric quantization gives: an int8 kernel's int16 pair sums then fit
    low, high = -(2 ** (weight_bits - 1)) + (weight_bits == 8), 2 ** (weight_bits - 1)
    if layer.depthwise:
        w = rng.integers(low, high, (layer.out_c, layer.kernel, layer.kernel))
        packed = layouts.pack_depthwise(w)
        wsum = np.zeros(layer.out_c, np.int32)
    else:
        w = rng.integers(low, high, (layer.out_c, layer.kernel * layer.kernel * layer.in_c))
        rows = layer.out_hw * layer.out_hw
        packed = layouts.pack_weights(w, layouts.conv_layout(build_layout, x_max, w, rows))
        wsum = w.sum(1).astype(np.int32)
    pad = layer.kernel // 2
    params = native.conv_params(
        in_h=layer.in_hw,
        in_w=layer.in_hw,
        in_c=layer.in_c,
        out_h=layer.out_hw,
        out_w=layer.out_hw,
        out_c=layer.out_c,
        kernel_h=layer.kernel,
        kernel_w=layer.kernel,
        stride_h=layer.stride,
        stride_w=layer.stride,
        pad_top=pad,
        pad_left=pad,
        x_zero=0,
        x_max=x_max,
        w_bits=packed.bits,
        w_low=packed.low,
        w_absmax=packed.absmax,
        k_padded=packed.k_padded,
        w_layout=packed.layout,
        out_zero=0,
        out_qmin=0,
        out_qmax=15,
        out_scale=1.0,
        clamp_min=-3.0e38,
        clamp_max=3.0e38,
    )
    multiplier = np.full(layer.out_c, 1e-3, np.float32)
    bias = np.zeros(layer.out_c, np.float32)
    blob = struct.pack("<ii", int(layer.depthwise), native.ctypes.sizeof(params)) + bytes(params)
    for array in (x, packed.data, wsum):
        data = np.ascontiguousarray(array).tobytes()
        blob += struct.pack("<q", len(data)) + data
    return blob + multiplier.tobytes() + bias.tobytes()


def build_harness(core: str, out: Path) -> Path:
    spec = CORES[core]
    flags = [
        f for f in toolchain.compile_flags(spec.arch, spec.features, spec.gcc_cpu) if f not in ("-fopenmp", "-fPIC")
    ]
    compiler = "aarch64-linux-gnu-gcc" if spec.arch == "aarch64" else (shutil.which("gcc") or "cc")
    binary = out / f"harness-{core}"
    # the harness includes edgeq_kernels.c itself (its int8 baseline shares the kernels' static parts)
    float_ops = [str(source) for source in toolchain.C_SOURCES if source != toolchain.C_SOURCE]
    command = [
        compiler,
        *flags,
        "-static",
        "-std=gnu11",
        "-I",
        str(toolchain.SOURCE_DIR),
        str(HARNESS),
        *float_ops,
        "-o",
        str(binary),
        "-lm",
    ]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return binary


BRANCH = {
    "aarch64": re.compile(r"^(b|bl|br|blr|ret|cbz|cbnz|tbz|tbnz|b\.\w+|svc)$"),
    "x86_64": re.compile(r"^(j\w+|call\w*|ret\w*|syscall|hlt|ud2)$"),
}


def disassemble(binary: Path, arch: str) -> tuple[dict[int, tuple[str, str]], list[int], list[tuple[int, str]]]:
    """address -> (mnemonic, operands) of every instruction, the addresses in order, and the functions' starts."""
    tool = "aarch64-linux-gnu-objdump" if arch == "aarch64" else "objdump"
    text = subprocess.run(
        [tool, "-d", "--no-show-raw-insn", str(binary)], check=True, capture_output=True, text=True
    ).stdout
    instructions, functions = {}, []
    for line in text.splitlines():
        match = re.match(r"^\s+([0-9a-f]+):\s+(\S+)\s*(.*)$", line)
        if match:
            instructions[int(match.group(1), 16)] = (match.group(2), match.group(3))
            continue
        match = re.match(r"^([0-9a-f]+) <([^>]+)>:$", line)
        if match:  # GCC's clones (micro.constprop.0) count as their function
            functions.append((int(match.group(1), 16), match.group(2).split(".")[0]))
    return instructions, sorted(instructions), sorted(functions)


def block_text(start: int, instructions, order, arch: str) -> list[str] | None:
    """The straight-line code qemu translates from ``start`` (to the first control transfer), as assembly
    llvm-mca reads: addresses in operands become one local label."""
    import bisect

    index = bisect.bisect_left(order, start)
    if index >= len(order) or order[index] != start:
        return None
    lines = []
    for address in order[index : index + 512]:
        mnemonic, operands = instructions[address]
        operands = operands.split("#", 1)[0] if arch == "x86_64" else operands.split("//", 1)[0]
        operands = re.sub(r"\b(0x)?[0-9a-f]+ <[^>]*>", "here", operands).strip()
        if mnemonic.startswith("rep"):  # x86 string loops: llvm-mca charges a flat 100 cycles, whatever the count
            continue
        if mnemonic in ("(bad)", ".inst", ".word") or mnemonic.startswith(("cs", "ds", "data16", "notrack")):
            if mnemonic.startswith(("cs", "ds", "data16", "notrack")):
                continue
            return None
        lines.append(f"{mnemonic} {operands}".strip())
        if BRANCH[arch].match(mnemonic):
            break
    return lines


def run_case(command: list[str], binary: Path, case: Path, mode: list[str]) -> str:
    """The harness's output line (seconds, checksum of the output codes), run under the emulator."""
    done = subprocess.run([*command, str(binary), str(case), "1", *mode], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{binary.name} {case.name} {' '.join(mode)}: {done.stderr.strip()[-300:]}")
    return done.stdout.split()[1]


def trace_counts(command: list[str], binary: Path, case: Path, mode: list[str]) -> collections.Counter:
    """How many times each translated block ran between the two edgeq_profile_mark calls (qemu's exec trace)."""
    with tempfile.TemporaryDirectory() as tmp:
        fifo = Path(tmp) / "trace"
        os.mkfifo(fifo)
        process = subprocess.Popen(
            [*command, "-d", "exec,nochain", "-D", str(fifo), str(binary), str(case), "1", *mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        counts: collections.Counter = collections.Counter()
        inside, marks = False, 0
        with open(fifo, "rb") as trace:
            for line in trace:
                if not line.startswith(b"Trace"):
                    continue
                if line.rstrip().endswith(b"edgeq_profile_mark"):
                    if not inside and marks == 0:
                        inside, marks = True, 1
                    elif inside and marks == 1:
                        inside, marks = False, 2
                    continue
                if inside:
                    fields = line.split(b"[", 1)[1].split(b"/")
                    counts[int(fields[1], 16)] += 1
        _, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {stderr.decode()[-500:]}")
    return counts


def mca_cycles(blocks: dict[int, list[str]], triple: str, mcpu: str) -> dict[int, float]:
    """Steady-state cycles per execution of each block (llvm-mca, one region per block)."""
    tool = shutil.which("llvm-mca") or shutil.which("llvm-mca-14")
    if tool is None:
        raise SystemExit("llvm-mca not found: sudo apt-get install llvm")
    result = {}
    iterations = 100

    def run(items):
        source = [".text", "here:"]
        for address, lines in items:
            source += [f"# LLVM-MCA-BEGIN b{address:x}", *lines, f"# LLVM-MCA-END b{address:x}"]
        done = subprocess.run(
            [tool, f"-mtriple={triple}", f"-mcpu={mcpu}", f"-iterations={iterations}"],
            input="\n".join(source) + "\n",
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            return None
        found = {}
        for region, cycles in re.findall(
            r"\[\d+\] Code Region - b([0-9a-f]+).*?Total Cycles:\s+(\d+)", done.stdout, re.S
        ):
            found[int(region, 16)] = int(cycles) / iterations
        return found

    items = sorted(blocks.items())
    for start in range(0, len(items), 64):
        chunk = items[start : start + 64]
        found = run(chunk)
        if found is None:  # one block llvm-mca cannot parse: analyse them one by one, skipping it
            found = {}
            for item in chunk:
                single = run([item])
                if single:
                    found.update(single)
        result.update(found)
    return result


def estimate(core: str, binary: Path, layer: Layer, bits: tuple[int, int], build_layout, work: Path, code) -> dict:
    """Cycles of one layer on ``core``: emulator block counts × llvm-mca cycles per block."""
    spec = CORES[core]
    arch, command = spec.arch, list(spec.emulator)
    weight_bits, input_bits = (8, 8) if layer.eight_bit else bits
    case = work / f"{core}-{layer.name.replace(' ', '_').replace('/', 's')}-w{weight_bits}a{input_bits}.bin"
    case.write_bytes(case_bytes(layer, weight_bits, input_bits, build_layout))
    mode = ["int8"] if bits == (8, 8) and arch == "aarch64" and not layer.depthwise else []
    if mode and run_case(command, binary, case, mode) != run_case(command, binary, case, []):
        raise RuntimeError(f"{core} {layer.name}: the int8 baseline's outputs differ from the kernels' (a defect)")
    counts = trace_counts(command, binary, case, mode)
    instructions, order, functions = code
    missing = {address for address in counts if address not in estimate.cache.setdefault(core, {})}
    blocks = {}
    for address in missing:
        text = block_text(address, instructions, order, arch)
        if text:
            blocks[address] = text
    estimate.cache[core].update(mca_cycles(blocks, spec.mca_triple, spec.mca_cpu))
    import bisect

    cycles = known = 0.0
    total = sum(counts.values())
    where: collections.Counter = collections.Counter()
    starts = [start for start, _ in functions]
    for address, count in counts.items():
        per = estimate.cache[core].get(address)
        if per is not None:
            cycles += count * per
            known += count
            index = bisect.bisect_right(starts, address) - 1
            where[functions[index][1] if index >= 0 else "?"] += count * per
    top = {name: round(value / cycles, 3) for name, value in where.most_common(4)} if cycles else {}
    return {
        "cycles": cycles,
        "blocks_run": total,
        "share_estimated": known / total if total else 1.0,
        "where": top,
        "case": case,
    }


estimate.cache = {}


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
            binary = build_harness(core, work)
            code = disassemble(binary, spec.arch)
            build_layout = layouts.layout_for(spec.arch, spec.features)
            results["cores"][core] = {"label": spec.label, "build_layout": build_layout.name}
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
                    low = estimate(core, binary, layer, (2, 4), build_layout, work, code)
                    int8 = estimate(core, binary, layer, (8, 8), build_layout, work, code)
                    row = {
                        "layer": layer.name,
                        "count": layer.count,
                        "macs": layer.macs,
                        "w2a4_cycles": low["cycles"],
                        "int8_cycles": int8["cycles"],
                        "share_estimated": min(low["share_estimated"], int8["share_estimated"]),
                        "w2a4_where": low["where"],
                        "int8_where": int8["where"],
                    }
                    if clock:
                        row["w2a4_measured_cycles"] = clock * _measure(binary, low["case"])
                        row["int8_measured_cycles"] = clock * _measure(binary, int8["case"])
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
