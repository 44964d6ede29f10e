"""Static throughput estimate of the ARM kernels' inner loops (llvm-mca), against an int8 baseline.

    python benchmarks/arm_estimate.py [--json]

No Arm board is needed: the kernels are cross-compiled (aarch64-linux-gnu-gcc) for each
core, the hottest inner loop is cut out of the assembly (the innermost loop with the most
multiply-accumulate instructions), and llvm-mca simulates it on that core's scheduling
model. The baseline is the int8 dot-product sequence an int8 kernel would run on the same
core (edgeq_int8_peak_loop: smull + smlal2 + sadalp without dot product, sdot with it),
analysed the same way. On cores without dot product the table-lookup kernel (micro_lut)
is analysed too: each tbl looks up one bit plane of 16 channels' weights against 4
activations, 32 multiply-accumulates' worth (two planes make a 2-bit weight). The result is
multiply-accumulates per cycle of each steady-state loop: an upper bound that ignores
memory and the tables' construction, so it compares instruction mixes, not whole models.
Emulator timings mean nothing and are never used.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "kernels" / "csrc" / "edgeq_kernels.c"
CORES = [
    # (label, gcc -mcpu, llvm-mca -mcpu)
    ("Cortex-A72 (Raspberry Pi 4): NEON, no dot product", "cortex-a72", "cortex-a72"),
    ("Cortex-A76 (Raspberry Pi 5; A78AE in Jetson Orin is alike): dot product", "cortex-a76", "cortex-a76"),
]
# multiply-accumulates per instruction (16-byte vectors)
MACS = {"smlal": 8, "smlal2": 8, "smull": 8, "smull2": 8, "sdot": 16, "tbl": 32}
MAC_PATTERN = re.compile(r"^\s*(smlal2?|smull2?|sdot|tbl)\b")


def loops(assembly: str, function: str) -> list[list[str]]:
    """Bodies of the backward-branching loops inside ``function``'s assembly."""
    lines = assembly.splitlines()
    # GCC may specialize a static function (micro.constprop.0)
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{re.escape(function)}(\.\w+)*:$", line))
    name = lines[start][:-1]
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].startswith("\t.size") and name in lines[i]), len(lines)
    )
    body = lines[start:end]
    labels = {line[:-1]: i for i, line in enumerate(body) if re.match(r"^\.L\w+:$", line)}
    found = []
    for i, line in enumerate(body):
        match = re.match(
            r"^\s*(b\.?(?:eq|ne|gt|ge|lt|le|hi|hs|lo|ls|mi|pl|cs|cc)|b|cbn?z|tbn?z)\s+.*?(\.L\w+)\s*$", line
        )
        if match and match.group(2) in labels and labels[match.group(2)] < i:
            found.append(
                [
                    text
                    for text in body[labels[match.group(2)] + 1 : i + 1]
                    if text.strip() and not text.strip().startswith((".", "//"))
                ]
            )
    return found


def hottest(assembly: str, function: str) -> tuple[list[str], int]:
    """The innermost loop with the most multiply-accumulates, and its MACs per iteration."""
    best, best_macs = None, 0
    for body in loops(assembly, function):
        macs = sum(MACS[MAC_PATTERN.match(line).group(1)] for line in body if MAC_PATTERN.match(line))
        # the int8 baseline's smull + smlal2 pair is one 16-MAC product; count smull's lanes only once
        if any(line.strip().startswith("sadalp") for line in body):
            macs = sum(16 for line in body if line.strip().startswith("sadalp"))
        if macs > best_macs or (macs == best_macs and best is not None and len(body) < len(best)):
            best, best_macs = body, macs
    if best is None:
        raise RuntimeError(f"no multiply-accumulate loop found in {function}")
    return best, best_macs


def mca(body: list[str], mcpu: str) -> float:
    """Cycles per iteration of a loop body in llvm-mca's steady state."""
    tool = shutil.which("llvm-mca") or next(
        (shutil.which(f"llvm-mca-{v}") for v in range(20, 13, -1) if shutil.which(f"llvm-mca-{v}")), None
    )
    if tool is None:
        raise SystemExit("llvm-mca not found: sudo apt-get install llvm")
    iterations = 200
    result = subprocess.run(
        [tool, "-mtriple=aarch64-linux-gnu", f"-mcpu={mcpu}", f"-iterations={iterations}"],
        input="\n".join(body) + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", result.stdout).group(1))
    return cycles / iterations


def analyse(gcc_cpu: str, mca_cpu: str, workdir: Path) -> dict:
    assembly_path = workdir / f"{gcc_cpu}.s"
    subprocess.run(
        [
            "aarch64-linux-gnu-gcc",
            "-O3",
            "-fno-math-errno",
            f"-mcpu={gcc_cpu}",
            "-std=c11",
            "-S",
            str(SOURCE),
            "-o",
            str(assembly_path),
        ],
        check=True,
    )
    assembly = assembly_path.read_text()
    kernel_body, kernel_macs = hottest(assembly, "micro")
    baseline_body, baseline_macs = hottest(assembly, "edgeq_int8_peak_loop")
    kernel_cycles, baseline_cycles = mca(kernel_body, mca_cpu), mca(baseline_body, mca_cpu)
    table_lookup = None
    if re.search(r"^micro_lut(\.\w+)*:$", assembly, re.M):
        lut_body, lut_macs = hottest(assembly, "micro_lut")
        lut_cycles = mca(lut_body, mca_cpu)
        table_lookup = {
            "instructions": len(lut_body),
            "macs": lut_macs,
            "cycles": lut_cycles,
            "macs_per_cycle": lut_macs / lut_cycles,
            "ratio": (lut_macs / lut_cycles) / (baseline_macs / baseline_cycles),
        }
    return {
        "kernel_loop": {
            "instructions": len(kernel_body),
            "macs": kernel_macs,
            "cycles": kernel_cycles,
            "macs_per_cycle": kernel_macs / kernel_cycles,
        },
        "int8_baseline_loop": {
            "instructions": len(baseline_body),
            "macs": baseline_macs,
            "cycles": baseline_cycles,
            "macs_per_cycle": baseline_macs / baseline_cycles,
        },
        "ratio": (kernel_macs / kernel_cycles) / (baseline_macs / baseline_cycles),
        "table_lookup_loop": table_lookup,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        raise SystemExit("aarch64-linux-gnu-gcc not found: sudo apt-get install gcc-aarch64-linux-gnu")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, gcc_cpu, mca_cpu in CORES:
            results[gcc_cpu] = {"label": label, **analyse(gcc_cpu, mca_cpu, Path(tmp))}
    if args.json:
        print(json.dumps(results))
        return 0
    print("llvm-mca steady-state estimate, multiply-accumulates per cycle of the inner loop (one core, data in L1)")
    print(f"{'core':<12} {'edgeq W2A4 loop':>24} {'int8 baseline loop':>24} {'ratio':>7}")
    for core, r in results.items():
        k, b = r["kernel_loop"], r["int8_baseline_loop"]
        print(
            f"{core:<12} {k['macs_per_cycle']:>10.1f} ({k['macs']} in {k['cycles']:.1f} cyc) "
            f"{b['macs_per_cycle']:>10.1f} ({b['macs']} in {b['cycles']:.1f} cyc) "
            f"{r['ratio']:>6.2f}x"
        )
        lut = r["table_lookup_loop"]
        if lut:
            print(
                f"{'  tbl loop':<12} {lut['macs_per_cycle']:>10.1f} ({lut['macs']} in {lut['cycles']:.1f} cyc) "
                f"{'':>24} {lut['ratio']:>6.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
