"""Quality gate of a zoo generator: does a ResNet judge see the prompted class?

    python benchmarks/generator_gate.py [--generator zoo:cifar10-generator] [--per-class 50]
                                        [--json docs/generator_gate.json] [--record]

Generates --per-class images for each class with single-class prompts ("a photo of a
{class}") at edgeq synth's default sampler settings, classifies them with the generator's
judge, and prints the per-class and overall fraction classified as prompted.
zoo:fmnist-generator is judged by zoo:fmnist-resnet (gate 80%), zoo:cifar10-generator by
zoo:cifar10-resnet56 (gate 70%; its weights come from $EDGEQ_ASSETS/models). --record
stores the figures in the zoo registry (edgeq/zoo/zoo.json).

    python benchmarks/generator_gate.py --generator zoo:cifar10-generator --vae FOLDER [--images 2000]

checks an autoencoder instead (a training run's ``vae`` or ``vae-decoder`` folder): the
judge's top-1 on test images and on the VAE's reconstructions of them, and their PSNR. The
VAE's blur caps what the generator can reach. ``--pipeline FOLDER`` judges a training run's
snapshot (``python -m edgeq.zoo.train_generator --stages snapshot``) before it ships.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from edgeq.data import FASHION_MNIST_CLASSES
from edgeq.evaluate import predict
from edgeq.models import load_model
from edgeq.prompts import SINGLE_TEMPLATE
from edgeq.stages import synth
from edgeq.zoo import CIFAR10_CLASSES

# generator -> (judge, classes in the judge's order, gate)
JUDGES = {
    "zoo:fmnist-generator": ("zoo:fmnist-resnet", FASHION_MNIST_CLASSES, 0.80),
    "zoo:cifar10-generator": ("zoo:cifar10-resnet56", CIFAR10_CLASSES, 0.70),
}
TEST_IMAGES = {"zoo:fmnist-generator": "fashion-mnist:test", "zoo:cifar10-generator": "datasets/cifar10/test"}


def reconstructions(vae_folder: str, generator: str, count: int = 2000) -> dict:
    """The judge's top-1 on ``count`` test images and on the VAE's reconstructions, after the same resizing."""
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from edgeq import assets
    from edgeq.data import resolve_dataset

    judge = load_model(JUDGES[generator][0])
    source = TEST_IMAGES[generator]
    if not source.startswith("fashion-mnist"):
        source = str(assets.require(source, "the judge's test images"))
    per_class = -(-count // len(judge.classes))
    test = resolve_dataset(source, count, preprocess=judge.preprocess, per_class=per_class, classes=judge.classes)
    vae = AutoencoderKL.from_pretrained(vae_folder).eval()
    side = int(vae.config.sample_size)
    mode = "L" if judge.preprocess.channels == 1 else "RGB"

    def to_vae(image: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(image.squeeze()).convert("RGB").resize((side, side), Image.BILINEAR))

    def to_judge(image: np.ndarray) -> np.ndarray:
        size = (judge.preprocess.width, judge.preprocess.height)
        fitted = np.asarray(Image.fromarray(image).convert(mode).resize(size, Image.BILINEAR))
        return fitted.reshape(size[1], size[0], -1)

    originals = np.stack([to_vae(x) for x in test.images])
    x = torch.from_numpy(originals).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        batches = [x[i : i + 250] for i in range(0, len(x), 250)]
        decoded = torch.cat([vae.decode(vae.encode(batch).latent_dist.mean).sample for batch in batches])
    rebuilt = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def top1(images: np.ndarray) -> float:
        inputs = judge.preprocess(np.stack([to_judge(image) for image in images]))
        return float((predict(judge.module, inputs).argmax(1) == test.labels).mean())

    error = ((rebuilt.astype(np.float64) - originals) ** 2).mean()
    return {
        "judge": JUDGES[generator][0],
        "images": len(originals),
        "top1_originals": top1(originals),
        "top1_reconstructions": top1(rebuilt),
        "psnr_db": float(10 * np.log10(255**2 / max(error, 1e-12))),
    }


def measure(per_class: int, seed: int = 0, generator: str = "zoo:fmnist-generator", pipeline_folder=None) -> dict:
    """``pipeline_folder`` judges that folder (a training run's snapshot) in place of the shipped generator."""
    judge, classes, gate = JUDGES[generator]
    teacher = load_model(judge)
    pipeline = synth.load_generator(str(pipeline_folder or generator))
    size = synth.native_size(pipeline)
    prompts = [SINGLE_TEMPLATE.format(name) for name in classes for _ in range(per_class)]
    labels = np.repeat(np.arange(len(classes)), per_class)
    import torch

    images = []
    started = time.time()
    for start in range(0, len(prompts), 50):
        batch = prompts[start : start + 50]
        generators = [torch.Generator().manual_seed(seed * 100003 + start + i) for i in range(len(batch))]
        result = pipeline(
            batch,
            num_inference_steps=synth.DEFAULT_STEPS,
            guidance_scale=synth.DEFAULT_GUIDANCE,
            height=size,
            width=size,
            generator=generators,
            output_type="np",
        )
        images.append(np.clip(np.round(result.images * 255), 0, 255).astype(np.uint8))
    images = np.concatenate(images)
    predictions = predict(teacher.module, teacher.preprocess(images)).argmax(1)
    per_class_rate = {name: float((predictions[labels == i] == i).mean()) for i, name in enumerate(classes)}
    return {
        "generator": str(pipeline_folder or generator),
        "judge": judge,
        "images_per_class": per_class,
        "steps": synth.DEFAULT_STEPS,
        "guidance_scale": synth.DEFAULT_GUIDANCE,
        "seed": seed,
        "overall": float((predictions == labels).mean()),
        "per_class": per_class_rate,
        "seconds": round(time.time() - started, 1),
        "gate": gate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", choices=sorted(JUDGES), default="zoo:fmnist-generator")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument(
        "--record", action="store_true", help="store the figures in the generator's zoo registry record"
    )
    parser.add_argument("--vae", help="check this autoencoder folder's reconstructions instead of generating")
    parser.add_argument("--images", type=int, default=2000, help="test images for --vae")
    parser.add_argument(
        "--pipeline",
        help="judge this diffusers folder (a training run's snapshot: train_generator --stages snapshot) "
        "in place of the shipped generator, with --generator's judge",
    )
    args = parser.parse_args()
    if args.record and args.pipeline:
        parser.error("--record stores the shipped generator's figures; drop --pipeline")
    if args.vae:
        check = reconstructions(args.vae, args.generator, args.images)
        print(
            f"{check['judge']} on {check['images']} test images: originals {100 * check['top1_originals']:.1f}%, "
            f"reconstructions {100 * check['top1_reconstructions']:.1f}% (PSNR {check['psnr_db']:.1f} dB)"
        )
        return
    result = measure(args.per_class, args.seed, args.generator, args.pipeline)
    gate = result["gate"]
    print(f"{'class':<12} classified as prompted")
    for name, rate in result["per_class"].items():
        print(f"{name:<12} {100 * rate:6.1f}%")
    print(
        f"{'overall':<12} {100 * result['overall']:6.1f}%   (gate {100 * gate:.0f}%, "
        f"{result['images_per_class']} images per class, "
        f"{result['steps']} steps, guidance {result['guidance_scale']})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    if args.record:
        from edgeq.zoo import registry

        records = registry.load()
        records[args.generator.removeprefix("zoo:")]["metrics"] = {
            f"quality gate: share of {result['images_per_class']}/class single-class images "
            f"{result['judge']} classifies as prompted": result["overall"],
        }
        registry.save(records)
    sys.exit(0 if result["overall"] >= gate else 1)


if __name__ == "__main__":
    main()
