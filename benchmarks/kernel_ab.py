"""Every convolution of a model on the kernels of two source revisions, interleaved in one process.

    python benchmarks/kernel_ab.py [--models mobilenetv2_100] [--base HEAD] [--rounds 7] [--calls 15]

A whole-model ratio on a shared machine moves with the host's noise by more than a kernel
change is worth; this compares kernel against kernel instead. The model is the one
`benchmarks/speed.py` builds (timm, random weights, W2A4, 224x224, batch 1, from its cache).
Its plan runs once to give every layer its real input; then each convolution is called on
the C kernels built from `git show BASE:kernels/csrc/...` (A) and from this checkout (B), in
alternating rounds of --calls calls each, one thread, and the table shows the fastest round
of each (the least disturbed) and B/A, and whether the two wrote the same outputs. The base
must share this checkout's weight packing (the Python that packs for the kernels is this
checkout's).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _speed_module():
    spec = importlib.util.spec_from_file_location("edgeq_bench_speed", Path(__file__).with_name("speed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_sources(revision: str, into: Path) -> Path:
    """The kernel sources of ``revision`` written into ``into``."""
    listing = subprocess.run(
        ["git", "-C", str(REPO), "ls-tree", "--name-only", f"{revision}:kernels/csrc"],
        capture_output=True,
        text=True,
        check=False,
    )
    if listing.returncode != 0:
        raise SystemExit(
            f"error: cannot read kernels/csrc at {revision!r} ({listing.stderr.strip()}); "
            "give --base a revision of this repository"
        )
    for name in listing.stdout.split():
        blob = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{revision}:kernels/csrc/{name}"], capture_output=True, check=True
        ).stdout
        (into / name).write_bytes(blob)
    return into


def compare(model_name: str, libraries: dict, plan, inputs: np.ndarray, rounds: int, calls: int) -> list[dict]:
    from edgeq.kernels import execute

    rows = []
    with libraries["A"].threads(1), libraries["B"].threads(1):
        values = execute.run_plan(plan, libraries["A"], inputs)
        for step in plan.steps:
            if step.kernel != "conv2d":
                continue
            p = step.params
            kernels = {tag: execute.conv_call(library, step, values) for tag, library in libraries.items()}
            best, outputs = {"A": float("inf"), "B": float("inf")}, {}
            for _ in range(rounds):
                for tag, call in kernels.items():
                    outputs[tag] = call()
                    began = time.perf_counter()
                    for _ in range(calls):
                        call()
                    best[tag] = min(best[tag], (time.perf_counter() - began) / calls * 1e3)
            same = all(
                np.array_equal(a, b) for a, b in zip(outputs["A"], outputs["B"]) if a is not None or b is not None
            )
            layer = (
                f"{'dw ' if p['depthwise'] else ''}{p['in_c']}->{p['out_c']} {p['kernel_h']}x{p['kernel_w']}"
                f"/{p['stride_h']} @{p['in_h']}"
            )
            rows.append({"model": model_name, "layer": layer, "a_ms": best["A"], "b_ms": best["B"], "same": same})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenetv2_100", help="comma-separated timm model names (speed.py's)")
    parser.add_argument("--base", default="HEAD", help="git revision whose kernels are A (B: this checkout's)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per layer (the fastest is kept)")
    parser.add_argument("--calls", type=int, default=15, help="calls per round")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("EDGEQ_CACHE", Path.home() / ".cache" / "edgeq")) / "speed",
        help="speed.py's cache of built models",
    )
    args = parser.parse_args(argv)
    import onnx
    from edgeq.kernels import native, toolchain
    from edgeq.kernels import plan as kernel_plan
    from edgeq.targets import host_cpu

    speed = _speed_module()
    compiler, flags = toolchain.host_flags()
    with tempfile.TemporaryDirectory() as tmp:
        base = base_sources(args.base, Path(tmp))
        cache = Path(tempfile.gettempdir()) / "edgeq-kernel-ab"
        libraries = {
            "A": native.Library(toolchain.build_shared(compiler, flags, cache, source_dir=base)),
            "B": native.Library(toolchain.build_shared(compiler, flags, cache)),
        }
    rows = []
    for name in args.models.split(","):
        print(f"building {name} ...", file=sys.stderr)
        speed.build(name, args.cache / name)
        model = onnx.load(str(args.cache / name / "w2a4.onnx"))
        plan = kernel_plan.build_plan(model, libraries["A"].layout)
        inputs = np.random.default_rng(0).normal(0, 1, (1, 3, 224, 224)).astype(np.float32)
        rows += compare(name, libraries, plan, inputs, args.rounds, args.calls)
    cpu = host_cpu()
    print(f"\nCPU: {cpu['model']}, {cpu['cores']} cores; SIMD: {', '.join(cpu['features']) or 'none of note'}")
    print(
        f"A: kernels of {args.base}; B: this checkout's. "
        f"Fastest of {args.rounds} rounds of {args.calls} calls, one thread (ms)"
    )
    print(f"{'model':<22} {'convolution':<28} {'A':>7} {'B':>7} {'B/A':>6}  same outputs")
    for row in rows:
        print(
            f"{row['model']:<22} {row['layer']:<28} {row['a_ms']:>7.3f} {row['b_ms']:>7.3f} "
            f"{row['b_ms'] / row['a_ms']:>6.2f}  {'yes' if row['same'] else 'NO'}"
        )
    for name in args.models.split(","):
        a = sum(r["a_ms"] for r in rows if r["model"] == name)
        b = sum(r["b_ms"] for r in rows if r["model"] == name)
        print(f"{name:<22} {'all convolutions':<28} {a:>7.3f} {b:>7.3f} {b / a:>6.2f}")
    return 0 if all(row["same"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
