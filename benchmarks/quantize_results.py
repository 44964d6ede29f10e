"""Top-1 of the zoo teachers quantized by each method: round-to-nearest, AdaRound, BRECQ, QDrop.

    python benchmarks/quantize_results.py [--models fmnist-resnet,fmnist-mobilenet,fmnist-vit]
        [--bits w4a4,w2a4] [--methods rtn,adaround,brecq,qdrop] [--iters 2000] [--threads 1]
        [--json docs/results.json]
    python benchmarks/quantize_results.py --table docs/results.json [more.json ...]

Calibration: 1024 real images of Fashion-MNIST split A (the teachers' training half), seed 0.
Top-1 on the 10000 test images. The first and last layer keep 8 bits (edgeq's default).
Each finished measurement is stored in --json at once (existing entries for other
settings are kept), so the runs can be split over processes and resumed; --table prints
the markdown table of one or more such files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from edgeq.data import resolve_dataset
from edgeq.evaluate import predict
from edgeq.models import load_model
from edgeq.quantized import quantize_module
from edgeq.reconstruction import ReconstructionConfig
from edgeq.spec import QuantSpec

METHOD_NAMES = {
    "fp": "full precision",
    "rtn": "round-to-nearest",
    "adaround": "AdaRound (layer by layer)",
    "brecq": "BRECQ (blocks, LSQ steps)",
    "qdrop": "QDrop (BRECQ + drop 0.5)",
}


def _key(model: str, bits: str, method: str) -> str:
    return f"{model}/{bits}/{method}"


def spec_for(bits: str, attention_at_act_bits: bool) -> QuantSpec:
    spec = QuantSpec.load(bits)
    return dataclasses.replace(spec, attention_bits=None) if attention_at_act_bits else spec


def measure(
    models, bits_list, methods, iters: int, calib_images: int, path: Path | None, attention_at_act_bits: bool = False
) -> dict:
    results = json.loads(path.read_text()) if path and path.exists() else {"entries": {}}
    calibration = resolve_dataset("fashion-mnist:A").subset(calib_images)
    test = resolve_dataset("fashion-mnist:test")
    for name in models:
        loaded = load_model(f"zoo:{name}")
        test_inputs = loaded.preprocess(test.images)
        calib_inputs = loaded.preprocess(calibration.images)

        def top1(module, inputs=test_inputs) -> float:
            with torch.no_grad():
                return float((predict(module, inputs).argmax(1) == test.labels).mean())

        results["entries"][_key(name, "fp", "fp")] = {
            "model": name,
            "bits": "fp",
            "method": "fp",
            "top1": top1(loaded.module.eval()),
            "seconds": 0.0,
        }
        for bits in bits_list:
            for method in methods:
                began = time.perf_counter()
                config = None if method == "rtn" else ReconstructionConfig(method=method, iters=iters)
                spec = spec_for(bits, attention_at_act_bits)
                module = quantize_module(loaded.module, calib_inputs, spec, seed=0, reconstruction=config)
                entry = {
                    "model": name,
                    "bits": bits,
                    "method": method,
                    "top1": top1(module),
                    "seconds": round(time.perf_counter() - began, 1),
                    "iters": 0 if method == "rtn" else iters,
                    "spec": spec.to_dict(),
                }
                results["entries"][_key(name, bits, method)] = entry
                print(f"{name} {bits} {method}: top-1 {entry['top1']:.2%} ({entry['seconds']:.0f} s)", flush=True)
                if path:
                    results |= {
                        "calibration": f"fashion-mnist:A, {calib_images} images",
                        "evaluation": "fashion-mnist:test, 10000 images",
                        "threads": torch.get_num_threads(),
                        "cpu": platform.machine(),
                    }
                    path.write_text(json.dumps(results, indent=2) + "\n")
    return results


def table(entries: dict) -> str:
    models = list(dict.fromkeys(e["model"] for e in entries.values()))
    bits_list = [b for b in ("w8a8", "w4a4", "w3a3", "w2a4", "w2a2") if any(e["bits"] == b for e in entries.values())]
    columns = [(model, bits) for model in models for bits in bits_list]
    lines = ["| method | " + " | ".join(f"{m} {b.upper()}" for m, b in columns) + " |", "|---|" + "---|" * len(columns)]
    fp = {m: entries.get(_key(m, "fp", "fp")) for m in models}
    lines.append(
        "| full precision | " + " | ".join(f"{fp[m]['top1']:.2%}" if fp[m] else "-" for m, _ in columns) + " |"
    )
    for method in ("rtn", "adaround", "brecq", "qdrop"):
        cells = []
        for model, bits in columns:
            entry = entries.get(_key(model, bits, method))
            cells.append("-" if entry is None else f"{entry['top1']:.2%}")
        lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(cells) + " |")
    seconds = [
        f"{e['model']} {e['bits']} {e['method']} {e['seconds']:.0f}"
        for e in entries.values()
        if e["method"] not in ("fp", "rtn")
    ]
    return "\n".join(lines) + "\n\nseconds per run: " + "; ".join(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fmnist-resnet,fmnist-mobilenet,fmnist-vit")
    parser.add_argument("--bits", default="w4a4,w2a4")
    parser.add_argument("--methods", default="rtn,adaround,brecq,qdrop")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--calib-images", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--attention-at-act-bits",
        action="store_true",
        help="quantize attention matmul inputs at the activation bits, not 8",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--table", type=Path, nargs="+", help="print the table of these result files and exit")
    args = parser.parse_args()
    if args.table:
        entries = {}
        for path in args.table:
            entries |= json.loads(path.read_text())["entries"]
        print(table(entries))
        return
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    results = measure(
        args.models.split(","),
        args.bits.split(","),
        args.methods.split(","),
        args.iters,
        args.calib_images,
        args.json,
        args.attention_at_act_bits,
    )
    print(table(results["entries"]))


if __name__ == "__main__":
    main()
