"""Does mixup-class prompting beat single-class prompting for data-free quantization here?

    python benchmarks/paper.py [--quick] [--out DIR] [--teachers fmnist-resnet,fmnist-mobilenet,fmnist-vit]
        [--bits w4a4,w3a3,w2a4] [--sources real,single,mixup-text,mixup-embedding,noise,bn-inversion]
        [--seeds 0,1,2] [--num-images 1024] [--method qdrop] [--iters 500] [--ablations] [--efficientnet]

For each zoo Fashion-MNIST teacher x bit width x calibration source x seed: the teacher is
quantized (same method, iterations and spec for every source) on the same number of
calibration images, and its top-1 is measured on the 10000 test images. Sources:

- ``real``: Fashion-MNIST split A (the teachers' training half), a seed-dependent subset;
- ``single``: GenQ-style single-class prompts to the zoo's text-to-image generator;
- ``mixup-text`` / ``mixup-embedding``: mixup-class prompts (two classes fused in the
  prompt text, or their text embeddings mixed with Beta weights);
- ``noise``: Gaussian pixels; ``bn-inversion``: images optimized to match the teacher's
  BatchNorm statistics (CNNs only).

``--ablations`` adds mixup with three classes and embedding mixes at Beta(0.4) and
Beta(4); ``--efficientnet`` adds EfficientNet-Lite0 (ImageNet) at W4A4 and W2A4 calibrated
by bn-inversion, measured by agreement with full precision on the real photos.

Every measurement is stored in ``OUT/results-paper.json`` as soon as it finishes, so a run
can be stopped and resumed; calibration sets are cached under ``OUT/paper-work``. The
script writes the table, plots and conclusions into ``OUT/results.md`` between the
markers ``<!-- paper:begin -->`` and ``<!-- paper:end -->``, keeping the rest of the file.
``--quick``: one teacher (ResNet), W4A4, one seed, 128 images, 50 iterations (and 50
for bn-inversion): a few minutes, for CI; its figures say little beyond "it runs".
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgeq.bn_inversion import InversionSettings
from edgeq.data import resolve_dataset
from edgeq.evaluate import predict
from edgeq.models import load_model
from edgeq.prompts import PromptOptions
from edgeq.reconstruction import ReconstructionConfig
from edgeq.spec import QuantSpec
from edgeq.stages import quantize, synth

BEGIN, END = "<!-- paper:begin -->", "<!-- paper:end -->"
GENERATOR = "zoo:fmnist-generator"
SOURCES = ("real", "single", "mixup-text", "mixup-embedding", "noise", "bn-inversion")
ABLATIONS = ("mixup-text-k3", "mixup-embedding-k3", "mixup-embedding-a0.4", "mixup-embedding-a4")
CNN_ONLY = {"bn-inversion"}
PROMPTS = {
    "single": ("single", PromptOptions()),
    "mixup-text": ("mixup", PromptOptions(fusion="text")),
    "mixup-embedding": ("mixup", PromptOptions(fusion="embedding")),
    "mixup-text-k3": ("mixup", PromptOptions(fusion="text", mix_k=3)),
    "mixup-embedding-k3": ("mixup", PromptOptions(fusion="embedding", mix_k=3)),
    "mixup-embedding-a0.4": ("mixup", PromptOptions(fusion="embedding", mix_alpha=0.4)),
    "mixup-embedding-a4": ("mixup", PromptOptions(fusion="embedding", mix_alpha=4.0)),
}


def calibration_images(source: str, teacher, seed: int, count: int, work: Path, inversion_iters: int = 200) -> np.ndarray:
    """uint8 images (N, H, W, C) of one calibration source, cached under ``work``."""
    if source == "real":
        real = resolve_dataset("fashion-mnist:A")
        picked = np.random.default_rng(seed).choice(len(real), size=count, replace=False)
        return real.images[np.sort(picked)]
    if source in PROMPTS:
        strategy, options = PROMPTS[source]
        folder = work / f"{source}-n{count}-s{seed}"  # the generator's images serve every Fashion-MNIST teacher
        synth.run(GENERATOR, teacher.classes, folder, strategy=strategy, prompts=options, num_images=count, seed=seed)
    elif source == "noise":
        folder = work / f"noise-{teacher.preprocess.height}-n{count}-s{seed}"
        synth.run(None, teacher.classes, folder, strategy="noise", num_images=count, seed=seed, size=teacher.preprocess.height)
    elif source == "bn-inversion":
        folder = work / f"bn-inversion-{teacher.name}-i{inversion_iters}-n{count}-s{seed}"
        synth.run(None, teacher.classes, folder, strategy="bn-inversion", num_images=count, seed=seed, model=teacher,
                  inversion=InversionSettings(iterations=inversion_iters))
    else:
        raise SystemExit(f"unknown source {source!r}; choose from {', '.join(SOURCES + ABLATIONS)}")
    return synth.load_images(folder).images


def measure(args, out: Path) -> dict:
    path = out / "results-paper.json"
    results = json.loads(path.read_text()) if path.exists() else {"entries": {}}
    results["settings"] = {"method": args.method, "iters": args.iters, "num_images": args.num_images, "generator": GENERATOR,
                           "evaluation": "fashion-mnist:test, 10000 images", "threads": torch.get_num_threads(), "cpu": platform.machine()}
    test = resolve_dataset("fashion-mnist:test")
    sources = list(args.sources) + (list(ABLATIONS) if args.ablations else [])
    for name in args.teachers:
        teacher = load_model(f"zoo:{name}")
        test_inputs = teacher.preprocess(test.images)

        def top1(module) -> float:
            with torch.no_grad():
                return float((predict(module, test_inputs).argmax(1) == test.labels).mean())

        if f"{name}/fp" not in results["entries"]:
            results["entries"][f"{name}/fp"] = {"teacher": name, "bits": "fp", "source": "fp", "seed": 0, "top1": top1(teacher.module.eval())}
        has_batchnorm = any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.module.modules())
        for bits in args.bits:
            for source in sources:
                if source in CNN_ONLY and not has_batchnorm:
                    continue
                for seed in args.seeds:
                    key = f"{name}/{bits}/{source}/{seed}"
                    if key in results["entries"]:
                        continue
                    began = time.perf_counter()
                    images = calibration_images(source, teacher, seed, args.num_images, out / "paper-work", args.inversion_iters)
                    config = None if args.method == "rtn" else ReconstructionConfig(method=args.method, iters=args.iters)
                    module = quantize.quantize_module(teacher.module, teacher.preprocess(images), QuantSpec.load(bits), seed=seed, reconstruction=config)
                    entry = {"teacher": name, "bits": bits, "source": source, "seed": seed, "top1": top1(module), "seconds": round(time.perf_counter() - began, 1)}
                    results["entries"][key] = entry
                    print(f"{key}: top-1 {entry['top1']:.2%} ({entry['seconds']:.0f} s)", flush=True)
                    partial = path.with_name(path.name + ".partial")
                    partial.write_text(json.dumps(results, indent=2) + "\n")
                    partial.replace(path)
    if args.efficientnet:
        results["efficientnet"] = efficientnet(args, out)
        path.write_text(json.dumps(results, indent=2) + "\n")
    return results


def efficientnet(args, out: Path) -> dict:
    """EfficientNet-Lite0 at W4A4 and W2A4 (first/last at 8 bits), calibrated by bn-inversion: agreement with fp on the photos."""
    from edgeq.evaluate import evaluate

    teacher = load_model("zoo:efficientnet-lite0")
    folder = out / "paper-work" / f"bn-inversion-efficientnet-n{args.num_images}"
    synth.run(None, teacher.classes, folder, strategy="bn-inversion", num_images=args.num_images, seed=0, model=teacher,
              inversion=InversionSettings(iterations=args.inversion_iters))
    figures = {}
    for bits in ("w4a4", "w2a4"):
        quantized = quantize.run("zoo:efficientnet-lite0", str(folder), out / "paper-work" / f"efficientnet-{bits}", bits=bits, num_images=args.num_images,
                                 reconstruction=ReconstructionConfig(method=args.method, iters=args.iters) if args.method != "rtn" else None)
        result = evaluate(str(quantized), "photos")
        figures[bits] = {"top1_agreement": result["agreement_with_fp"]["top1"], "top5_agreement": result["agreement_with_fp"]["top5"]}
        print(f"efficientnet-lite0 {bits}: {figures[bits]}", flush=True)
    return figures


def cells(entries: dict) -> dict:
    """(teacher, bits, source) -> list of top-1 over seeds."""
    grouped: dict[tuple, list[float]] = {}
    for entry in entries.values():
        if entry["source"] != "fp":
            grouped.setdefault((entry["teacher"], entry["bits"], entry["source"]), []).append(entry["top1"])
    return grouped


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def table(results: dict) -> str:
    grouped = cells(results["entries"])
    teachers = list(dict.fromkeys(key[0] for key in grouped))
    bits_list = [b for b in ("w8a8", "w4a4", "w3a3", "w2a4", "w2a2") if any(key[1] == b for key in grouped)]
    sources = [s for s in SOURCES + ABLATIONS if any(key[2] == s for key in grouped)]
    columns = [(t, b) for t in teachers for b in bits_list]
    lines = ["| source | " + " | ".join(f"{t.removeprefix('fmnist-')} {b.upper()}" for t, b in columns) + " |", "|---|" + "---|" * len(columns)]
    fp = {t: results["entries"].get(f"{t}/fp", {}).get("top1") for t in teachers}
    lines.append("| full precision | " + " | ".join("-" if fp[t] is None else f"{fp[t]:.2%}" for t, _ in columns) + " |")
    for source in sources:
        row = []
        for teacher, bits in columns:
            values = grouped.get((teacher, bits, source))
            if not values:
                row.append("-")
                continue
            mean, std = mean_std(values)
            row.append(f"{mean * 100:.2f} ± {std * 100:.2f}" if len(values) > 1 else f"{mean * 100:.2f}")
        lines.append(f"| {source} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def conclusions(results: dict) -> list[str]:
    """Statements computed from the table (no judgement beyond the numbers)."""
    grouped = cells(results["entries"])
    lines = []
    for mixup in ("mixup-text", "mixup-embedding"):
        wins, total, deltas, lower_spread, spread_total = 0, 0, [], 0, 0
        for (teacher, bits, source), values in grouped.items():
            if source != mixup or (teacher, bits, "single") not in grouped:
                continue
            single = grouped[(teacher, bits, "single")]
            delta = (np.mean(values) - np.mean(single)) * 100
            deltas.append((teacher, bits, delta))
            total += 1
            wins += delta > 0
            if len(values) > 1 and len(single) > 1:
                spread_total += 1
                lower_spread += np.std(values, ddof=1) < np.std(single, ddof=1)
        if not total:
            continue
        detail = ", ".join(f"{t.removeprefix('fmnist-')} {b.upper()} {d:+.2f}" for t, b, d in deltas)
        lines.append(f"**{mixup} against single-class prompts:** higher mean top-1 in {wins} of {total} cells ({detail} points)."
                     + (f" Its spread over seeds is lower in {lower_spread} of {spread_total}." if spread_total else " (One seed: no spread to compare.)"))
        w2 = [d for t, b, d in deltas if b == "w2a4"]
        if w2:
            lines.append(f"At W2A4 the mean difference is {np.mean(w2):+.2f} points over {len(w2)} teacher(s); at W4A4 "
                         f"{np.mean([d for t, b, d in deltas if b == 'w4a4'] or [math.nan]):+.2f}.")
    for (teacher, bits, source), values in sorted(grouped.items()):
        if source == "real" and (teacher, bits, "mixup-embedding") in grouped:
            gap = (np.mean(values) - np.mean(grouped[(teacher, bits, "mixup-embedding")])) * 100
            lines.append(f"{teacher.removeprefix('fmnist-')} {bits.upper()}: real images against mixup (embedding): {gap:+.2f} points.")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = cells(results["entries"])
    teachers = list(dict.fromkeys(key[0] for key in grouped))
    fig, axes = plt.subplots(1, len(teachers), figsize=(5.5 * len(teachers), 4.2), dpi=110, squeeze=False)
    for ax, teacher in zip(axes[0], teachers):
        bits_list = [b for b in ("w8a8", "w4a4", "w3a3", "w2a4") if any(k[0] == teacher and k[1] == b for k in grouped)]
        sources = [s for s in SOURCES + ABLATIONS if any(k[0] == teacher and k[2] == s for k in grouped)]
        width = 0.8 / max(len(sources), 1)
        for i, source in enumerate(sources):
            stats = [mean_std(grouped.get((teacher, b, source), [math.nan])) for b in bits_list]
            ax.bar(np.arange(len(bits_list)) + i * width, [m * 100 for m, _ in stats], width, yerr=[s * 100 for _, s in stats], capsize=2, label=source)
        ax.set_xticks(np.arange(len(bits_list)) + width * (len(sources) - 1) / 2, [b.upper() for b in bits_list])
        ax.set_title(teacher)
        ax.set_ylabel("top-1 on Fashion-MNIST test (%)")
        low = min((m for k, v in grouped.items() if k[0] == teacher for m in v), default=0.0) * 100
        ax.set_ylim(max(0, low - 5), 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_markdown(results: dict, out: Path, command: str) -> Path:
    plot_path = out / "results-paper.png"
    plot(results, plot_path)
    settings = results["settings"]
    section = [BEGIN, "## Calibration sources: mixup-class against single-class prompts", "",
               f"Made by `{command}`. Every source gives the same number of images ({settings['num_images']}) to the same quantizer "
               f"({settings['method']}, {settings['iters']} iterations, first and last layer at 8 bits); top-1 on the 10000 Fashion-MNIST test "
               "images, mean ± standard deviation over seeds (the seed changes the calibration images and the quantizer's). Raw figures: "
               "`results-paper.json`.", "", table(results), "", f"![top-1 by calibration source]({plot_path.name})", ""]
    if results.get("efficientnet"):
        section += ["EfficientNet-Lite0 (ImageNet weights), bn-inversion calibration, agreement with full precision on the real photos: "
                    + "; ".join(f"{b.upper()} top-1 {v['top1_agreement']:.2%}, top-5 {v['top5_agreement']:.2%}" for b, v in results["efficientnet"].items()), ""]
    section += ["### What the numbers say", ""] + [f"- {line}" for line in conclusions(results)] + [
        "",
        "What limits the comparison: the generator is a small latent diffusion model trained on the other half of Fashion-MNIST, "
        "not Stable Diffusion; it learned from captions of the ten class names only, so polysemy (a class word meaning something "
        "else, the failure mixup prompts address) barely arises, and mixed prompts can only blend those ten classes. Teachers, "
        "images and test set are small, so differences under about one standard deviation are noise.",
        END]
    target = out / "results.md"
    text = target.read_text() if target.exists() else "# Results\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + "\n".join(section) + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(section) + "\n"
    target.write_text(text)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one teacher, W4A4, one seed, 128 images, 50 iterations")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--teachers", default="fmnist-resnet,fmnist-mobilenet,fmnist-vit")
    parser.add_argument("--bits", default="w4a4,w3a3,w2a4")
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--num-images", type=int, default=1024)
    parser.add_argument("--method", default="qdrop")
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--inversion-iters", type=int, default=200, help="Adam steps per bn-inversion batch")
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--efficientnet", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.quick:
        args.teachers, args.bits, args.seeds, args.num_images, args.iters, args.inversion_iters = "fmnist-resnet", "w4a4", "0", 128, 50, 50
    args.teachers, args.bits, args.sources = args.teachers.split(","), args.bits.split(","), args.sources.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = measure(args, args.out)
    command = "python benchmarks/paper.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(table(results))
    print(f"written to {write_markdown(results, args.out, command.strip())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
