"""Whole-layer cycle estimates of the kernels on cores that are not at hand, from an emulator's block counts and
llvm-mca.

A layer runs once through the kernels exactly as a compiled module calls them
(``edgeq_conv2d`` / ``edgeq_depthwise_conv2d``: im2col, table builds, unpacking, products,
epilogue) in a small static program (``harness/layer_harness.c``) under
``qemu-<arch> -d exec,nochain``. The trace gives how many times each basic block ran
(exact counts; the emulator's timing is never used). Every block that ran is cut out of the
program's disassembly, llvm-mca (LLVM's scheduling model of the core) gives its cycles per
execution in steady state, and the layer's estimate is the sum of count × cycles. Cache
misses and branch mispredictions are not modelled, so it is a lower bound that compares
instruction mixes over whole layers, not a latency; benchmarks/layer_estimate.py
``--validate`` measures its error on x86, where the same kernels can also be timed
(docs/kernels.md: about a third over a whole model, about a half on a layer at worst).

Needs the target's C compiler, qemu-user and llvm-mca (``scripts/setup.sh`` installs all
three on Debian).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from . import layouts, native, reference, toolchain

HARNESS = Path(__file__).resolve().parent / "harness" / "layer_harness.c"
INF = float("inf")


@dataclasses.dataclass(frozen=True)
class Core:
    """A core to estimate for: how the harness is built for it (compiler, flags), traced (emulator) and modelled
    (llvm-mca's triple and CPU)."""

    label: str
    arch: str
    compiler: str
    flags: tuple[str, ...]
    features: frozenset[str]
    mca_triple: str
    mca_cpu: str
    emulator: tuple[str, ...]

    @property
    def layout(self) -> layouts.Layout:
        return layouts.layout_for(self.arch, self.features)


def core(label: str, arch: str, features, mcpu: str | None, mca_cpu: str, emulator: tuple[str, ...]) -> Core:
    """A core built with the kernels' own flags for ``arch``, ``features`` and ``mcpu``."""
    compiler = "aarch64-linux-gnu-gcc" if arch == "aarch64" else (shutil.which("gcc") or "cc")
    flags = tuple(f for f in toolchain.compile_flags(arch, features, mcpu) if f not in ("-fopenmp", "-fPIC"))
    triple = "aarch64-linux-gnu" if arch == "aarch64" else "x86_64-linux-gnu"
    return Core(label, arch, compiler, flags, frozenset(features), triple, mca_cpu, emulator)


def core_for_target(target) -> Core:
    """The core of an Arm target (an ``edgeq.targets.Target``): built as compile builds its kernels, traced on the
    target's qemu CPU and modelled as its ``mcpu`` (or, where llvm-mca has no model of it, as its qemu CPU)."""
    mcpu = target.tvm_target.get("mcpu")
    known = mca_cpus(target.tvm_target.get("mtriple", "aarch64-linux-gnu"))
    model = mcpu if mcpu in known else target.qemu_cpu
    return Core(
        f"{target.name} ({model})",
        target.arch,
        target.cross_compiler or (shutil.which("gcc") or "cc"),
        tuple(
            f for f in toolchain.compile_flags(target.arch, target.cpu_features, mcpu) if f not in ("-fopenmp", "-fPIC")
        ),
        frozenset(target.cpu_features),
        target.tvm_target.get("mtriple", "aarch64-linux-gnu"),
        model,
        (f"qemu-{target.arch}", "-cpu", target.qemu_cpu or "max"),
    )


@functools.cache
def mca_cpus(triple: str) -> frozenset[str]:
    """The CPU models llvm-mca has for ``triple`` (empty when llvm-mca is missing)."""
    tool = mca_tool()
    if tool is None:
        return frozenset()
    done = subprocess.run([tool, f"-mtriple={triple}", "-mcpu=help"], capture_output=True, text=True)
    text = done.stdout + done.stderr  # llvm prints its help on either, by version
    return frozenset(re.findall(r"^\s+([\w.-]+)\s+- Select the", text, re.M))


def mca_tool() -> str | None:
    return shutil.which("llvm-mca") or shutil.which("llvm-mca-14")


def missing_tools(chosen: Core) -> list[str]:
    """The programs an estimate for ``chosen`` needs that this machine lacks."""
    needed = [
        chosen.compiler,
        chosen.emulator[0],
        "objdump" if chosen.arch == "x86_64" else "aarch64-linux-gnu-objdump",
    ]
    missing = [tool for tool in needed if shutil.which(tool) is None]
    return missing + ([] if mca_tool() else ["llvm-mca"])


@dataclasses.dataclass(frozen=True)
class ConvCase:
    """One convolution at batch 1 (NHWC codes in, codes out): dense (im2col) or depthwise."""

    in_h: int
    in_w: int
    in_c: int
    out_c: int
    kernel_h: int
    kernel_w: int
    stride_h: int = 1
    stride_w: int = 1
    pad_top: int = 0
    pad_left: int = 0
    depthwise: bool = False

    @property
    def out_h(self) -> int:
        return (self.in_h + 2 * self.pad_top - self.kernel_h) // self.stride_h + 1

    @property
    def out_w(self) -> int:
        return (self.in_w + 2 * self.pad_left - self.kernel_w) // self.stride_w + 1

    @property
    def macs(self) -> int:
        per_pixel = self.kernel_h * self.kernel_w * (1 if self.depthwise else self.in_c) * self.out_c
        return self.out_h * self.out_w * per_pixel


def case_bytes(case: ConvCase, weight_bits: int, input_bits: int, build_layout: layouts.Layout, seed: int = 0) -> bytes:
    """The harness's input for one layer: random codes and weights packed as the planner packs them (so a layer runs
    on the microkernel the planner would choose for it)."""
    rng = np.random.default_rng(seed)
    x_max = 2**input_bits - 1
    winograd_chunk = 0
    x = rng.integers(0, x_max + 1, (case.in_h, case.in_w, case.in_c)).astype(np.uint8)
    # 8-bit weights in [-127, 127], as symmetric quantization gives: an int8 kernel's int16 pair sums then fit
    low, high = -(2 ** (weight_bits - 1)) + (weight_bits == 8), 2 ** (weight_bits - 1)
    if case.depthwise:
        w = rng.integers(low, high, (case.out_c, case.kernel_h, case.kernel_w))
        packed = layouts.pack_depthwise(w)
        wsum = np.zeros(case.out_c, np.int32)
    else:
        w = rng.integers(low, high, (case.out_c, case.kernel_h * case.kernel_w * case.in_c))
        packed = layouts.pack_weights(w, layouts.conv_layout(build_layout, x_max, w, case.out_h * case.out_w))
        wsum = w.sum(1).astype(np.int32)
        winograd = _winograd(case, w, x_max, build_layout)
        if winograd is not None:  # as the planner runs such a layer
            packed, offsets, winograd_chunk = winograd
            wsum = np.concatenate([wsum, offsets])
    params = native.conv_params(
        in_h=case.in_h,
        in_w=case.in_w,
        in_c=case.in_c,
        out_h=case.out_h,
        out_w=case.out_w,
        out_c=case.out_c,
        kernel_h=case.kernel_h,
        kernel_w=case.kernel_w,
        stride_h=case.stride_h,
        stride_w=case.stride_w,
        pad_top=case.pad_top,
        pad_left=case.pad_left,
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
        winograd=winograd_chunk,
    )
    # a scale product without exact ties at code boundaries, as real layers' are (1e-3 puts acc = 500 exactly on 0.5)
    multiplier = np.full(case.out_c, 1.0123e-3, np.float32)
    bias = np.zeros(case.out_c, np.float32)
    # codes out, as the plan's codes-only layers: the one-multiply requantization wherever it is proven
    # (for the W2A4 layer and the int8 baseline alike, so the two share the epilogue's cost)
    fast = reference.fast_requantization(w, 0, x_max, multiplier, bias, (-INF, INF), 1.0, 0, 15)
    if fast is not None:
        fast_m, fast_b, params.fast_lo, params.fast_hi = fast
        params.fast_codes = 1
        multiplier, bias = np.concatenate([multiplier, fast_m]), np.concatenate([bias, fast_b])
    blob = struct.pack("<ii", int(case.depthwise), native.ctypes.sizeof(params)) + bytes(params)
    for array in (x, packed.data, wsum):
        data = np.ascontiguousarray(array).tobytes()
        blob += struct.pack("<q", len(data)) + data
    return blob + multiplier.tobytes() + bias.tobytes()


def _winograd(case: ConvCase, w: np.ndarray, x_max: int, build_layout: layouts.Layout):
    """The planner's Winograd packing where it would run this layer so (kernels/plan.py _winograd), else None."""
    if (
        (case.kernel_h, case.kernel_w, case.stride_h, case.stride_w) != (3, 3, 1, 1)
        or x_max > 15
        or not layouts.winograd_applies(build_layout, case.in_c, case.out_h * case.out_w)
    ):
        return None
    values = w.reshape(case.out_c, 3, 3, case.in_c).transpose(0, 3, 1, 2)
    return layouts.pack_winograd(values, build_layout)


def build_harness(chosen: Core, out: Path) -> Path:
    """The harness for ``chosen``, statically linked (qemu-user then needs no sysroot)."""
    binary = out / f"harness-{chosen.arch}-{chosen.mca_cpu}"
    # the harness includes edgeq_kernels.c itself (its int8 baseline shares the kernels' static parts)
    float_ops = [str(source) for source in toolchain.C_SOURCES if source != toolchain.C_SOURCE]
    command = [
        chosen.compiler,
        *chosen.flags,
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
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the layer harness failed: {' '.join(command)}\n{done.stderr.strip()[-2000:]}")
    return binary


BRANCH = {
    "aarch64": re.compile(r"^(b|bl|br|blr|ret|cbz|cbnz|tbz|tbnz|b\.\w+|svc)$"),
    "x86_64": re.compile(r"^(j\w+|call\w*|ret\w*|syscall|hlt|ud2)$"),
}


@dataclasses.dataclass(frozen=True)
class Program:
    """A disassembled harness: every instruction by address, the addresses in order, and the functions' starts."""

    instructions: dict[int, tuple[str, str]]
    order: list[int]
    functions: list[tuple[int, str]]


def disassemble(binary: Path, arch: str) -> Program:
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
    return Program(instructions, sorted(instructions), sorted(functions))


def block_text(start: int, program: Program, arch: str) -> list[str] | None:
    """The straight-line code qemu translates from ``start`` (to the first control transfer), as assembly
    llvm-mca reads: addresses in operands become one local label."""
    index = bisect.bisect_left(program.order, start)
    if index >= len(program.order) or program.order[index] != start:
        return None
    lines = []
    for address in program.order[index : index + 512]:
        mnemonic, operands = program.instructions[address]
        operands = operands.split("#", 1)[0] if arch == "x86_64" else operands.split("//", 1)[0]
        operands = re.sub(r"\b(0x)?[0-9a-f]+ <[^>]*>", "here", operands).strip()
        if mnemonic.startswith("rep"):  # x86 string loops: llvm-mca charges a flat 100 cycles, whatever the count
            continue
        if mnemonic.startswith(("cs", "ds", "data16", "notrack")):
            continue
        if mnemonic in ("(bad)", ".inst", ".word"):
            return None
        lines.append(f"{mnemonic} {operands}".strip())
        if BRANCH[arch].match(mnemonic):
            break
    return lines


def run_case(command: list[str], binary: Path, case: Path, mode: list[str]) -> str:
    """The checksum of the harness's output codes for one run of ``case``, run under ``command`` (an emulator)."""
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
    tool = mca_tool()
    if tool is None:
        raise RuntimeError("llvm-mca not found: install llvm (scripts/setup.sh does)")
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


@dataclasses.dataclass(frozen=True)
class LayerEstimate:
    cycles: float
    blocks_run: int
    share_estimated: float  # of the blocks run, the share llvm-mca could cost (the rest count as 0)
    where: dict  # the functions that take the most cycles, with their shares
    case: Path  # the harness input, for timing it natively where the core is this machine's


class Estimator:
    """Estimates layers on one core; the harness is built once and each block is costed once."""

    def __init__(self, chosen: Core, work: Path):
        self.core = chosen
        self.work = Path(work)
        self.binary = build_harness(chosen, self.work)
        self.program = disassemble(self.binary, chosen.arch)
        self._block_cycles: dict[int, float] = {}

    def estimate(self, case: ConvCase, weight_bits: int, input_bits: int, *, int8_baseline: bool = False):
        """Cycles of one run of ``case`` at the bit widths; with ``int8_baseline`` (Arm, dense layers, 8 bits), the
        harness's int8 kernel of the same tiling instead of edgeq's (checked to give the same outputs)."""
        chosen, command = self.core, list(self.core.emulator)
        name = (
            f"{case.in_h}x{case.in_w}x{case.in_c}-{case.out_c}-k{case.kernel_h}x{case.kernel_w}-"
            f"s{case.stride_h}x{case.stride_w}-p{case.pad_top}x{case.pad_left}-{'dw' if case.depthwise else 'dense'}-"
            f"w{weight_bits}a{input_bits}.bin"
        )
        path = self.work / name
        path.write_bytes(case_bytes(case, weight_bits, input_bits, chosen.layout))
        mode = ["int8"] if int8_baseline else []
        if mode and run_case(command, self.binary, path, mode) != run_case(command, self.binary, path, []):
            raise RuntimeError(f"{name}: the int8 baseline's outputs differ from the kernels' (a defect)")
        counts = trace_counts(command, self.binary, path, mode)
        blocks = {}
        for address in counts:
            if address not in self._block_cycles:
                text = block_text(address, self.program, chosen.arch)
                if text:
                    blocks[address] = text
        self._block_cycles.update(dict.fromkeys(blocks, None))  # costed below; a block llvm-mca rejects stays None
        self._block_cycles.update(mca_cycles(blocks, chosen.mca_triple, chosen.mca_cpu))
        cycles = known = 0.0
        total = sum(counts.values())
        where: collections.Counter = collections.Counter()
        starts = [start for start, _ in self.program.functions]
        for address, count in counts.items():
            per = self._block_cycles.get(address)
            if per is not None:
                cycles += count * per
                known += count
                index = bisect.bisect_right(starts, address) - 1
                where[self.program.functions[index][1] if index >= 0 else "?"] += count * per
        top = {function: round(value / cycles, 3) for function, value in where.most_common(4)} if cycles else {}
        return LayerEstimate(cycles, total, known / total if total else 1.0, top, path)


__all__ = [
    "Core",
    "ConvCase",
    "Estimator",
    "LayerEstimate",
    "case_bytes",
    "core",
    "core_for_target",
    "missing_tools",
]
