"""Run a compiled edgeq module on a batch of inputs: needs only NumPy and the TVM runtime.

This file is self-contained on purpose: it runs on boards and under qemu-aarch64, where
neither torch nor edgeq is installed. Usage::

    python runner.py MODULE.so INPUTS.npy OUTPUTS.npy [--latency-runs N] [--timings FILE.json]

INPUTS.npy holds (N, C, H, W) float32; the module takes one image at a time, and the
outputs are stacked to (N, classes). With ``--latency-runs`` the first input is also
timed N times after warm-up, and the per-run milliseconds go to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

PROGRESS_PREFIX = "edgeq-progress "


def load(module_path: str):
    import tvm
    from tvm import relax

    library = tvm.runtime.load_module(module_path)
    return relax.VirtualMachine(library, tvm.cpu())


def _to_numpy(result) -> np.ndarray:
    while not hasattr(result, "numpy"):
        result = result[0]
    return result.numpy()


def predict(machine, inputs: np.ndarray, progress=None) -> np.ndarray:
    """Outputs for every input, one image per call; ``progress(done)`` is called every 25 images."""
    import tvm

    main = machine["main"]
    outputs = []
    for i in range(len(inputs)):
        outputs.append(_to_numpy(main(tvm.runtime.tensor(np.ascontiguousarray(inputs[i : i + 1])))))
        if progress and ((i + 1) % 25 == 0 or i + 1 == len(inputs)):
            progress(i + 1)
    return np.concatenate(outputs)


def _report_progress(done: int) -> None:
    # Read by the host when this runs under qemu: one line per update on stderr.
    sys.stderr.write(f"{PROGRESS_PREFIX}{done}\n")
    sys.stderr.flush()


def time_runs(machine, sample: np.ndarray, runs: int, warmup: int = 5) -> list[float]:
    """Milliseconds per call of the module on ``sample`` (1, C, H, W), after ``warmup`` calls."""
    import tvm

    main = machine["main"]
    data = tvm.runtime.tensor(np.ascontiguousarray(sample))
    for _ in range(warmup):
        _to_numpy(main(data))
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        _to_numpy(main(data))
        timings.append((time.perf_counter() - start) * 1e3)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module")
    parser.add_argument("inputs")
    parser.add_argument("outputs")
    parser.add_argument("--latency-runs", type=int, default=0)
    parser.add_argument("--timings", default=None)
    args = parser.parse_args()
    machine = load(args.module)
    inputs = np.load(args.inputs)
    np.save(args.outputs, predict(machine, inputs, progress=_report_progress))
    if args.latency_runs and args.timings:
        with open(args.timings, "w") as f:
            json.dump(time_runs(machine, inputs[:1], args.latency_runs), f)


if __name__ == "__main__":
    main()
