"""Single-class vs mixup calibration sets on the zoo generator, as the ResNet teacher sees them.

    python benchmarks/synthesis_compare.py [--num-images 1024] [--threads 1] [--work runs/synthesis-compare]
        [--json docs/synthesis.json]

Makes one synth folder per strategy (single; mixup with text fusion; mixup with embedding
fusion) from zoo:fmnist-generator at edgeq synth's defaults and the same seed, then prints
`edgeq synth inspect`'s diagnostics with zoo:fmnist-resnet for each, beside real
Fashion-MNIST images (split A) as a reference, plus generation time. Folders already
complete in --work are reused, with the generation time their manifest recorded.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from edgeq.data import load_synth_images, resolve_dataset
from edgeq.diagnostics import inspect_images
from edgeq.manifest import Manifest
from edgeq.models import load_model
from edgeq.prompts import PromptOptions
from edgeq.stages import synth

SETS = {
    "single": ("single", PromptOptions()),
    "mixup (text)": ("mixup", PromptOptions(fusion="text")),
    "mixup (embedding)": ("mixup", PromptOptions(fusion="embedding")),
}


def measure(num_images: int, work: Path, seed: int = 0) -> dict:
    teacher = load_model("zoo:fmnist-resnet")
    rows = {}
    for name, (strategy, options) in SETS.items():
        folder = work / name.replace(" (", "-").rstrip(")")
        synth.run(
            "zoo:fmnist-generator",
            teacher.classes,
            folder,
            synth.SynthOptions(strategy=strategy, prompts=options, num_images=num_images, seed=seed, batch_size=16),
        )
        manifest = Manifest.load(folder, "synth")
        rows[name] = inspect_images(teacher, load_synth_images(folder)).to_json() | {
            "seconds": manifest.extra.get("seconds"),
            "folder": str(folder),
        }
    real = resolve_dataset("fashion-mnist:A", num_images)
    rows["real (Fashion-MNIST split A)"] = inspect_images(teacher, real).to_json() | {"seconds": None, "folder": None}
    return {
        "generator": "zoo:fmnist-generator",
        "judge": "zoo:fmnist-resnet",
        "num_images": num_images,
        "seed": seed,
        "steps": synth.DEFAULT_STEPS,
        "guidance_scale": synth.DEFAULT_GUIDANCE,
        "sets": rows,
    }


def table(result: dict) -> str:
    lines = [
        "| set | class coverage | top-1 balance | top-1 in prompted classes | prediction entropy / log C "
        "| feature diversity (L2) | feature diversity (cosine) | mean energy | generation (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["sets"].items():
        in_label = "-" if row["top1_in_label"] is None else f"{row['top1_in_label']:.1%}"
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.0f}"
        lines.append(
            f"| {name} | {row['class_coverage']:.0%} | {row['predicted_balance']:.3f} | {in_label} "
            f"| {row['mean_entropy_normalized']:.3f} | "
            f"{row['feature_diversity']:.2f} | {row['feature_diversity_cosine']:.3f} | {row['mean_energy']:.2f} "
            f"| {seconds} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=1024)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads for generation (the times depend on it)"
    )
    parser.add_argument("--work", type=Path, default=Path("runs/synthesis-compare"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    result = measure(args.num_images, args.work, args.seed) | {
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
    }
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
