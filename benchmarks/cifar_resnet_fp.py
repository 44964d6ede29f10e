"""Full-precision top-1 of the zoo's CIFAR-10 ResNets on the CIFAR-10 test folder.

    python benchmarks/cifar_resnet_fp.py [--models cifar10-resnet20 cifar10-resnet56] [--data DIR] [--record]

The weights and images come from the assets folder (``$EDGEQ_ASSETS``, default ``../shared``
beside the checkout): ``models/cifar10-resnet{20,56}.safetensors`` and
``datasets/cifar10/test/<class>/*.jpg`` (ImageFolder layout, class index = sorted folder
order). Images are read with PIL in batches and normalized with the model's own
preprocessing; nothing else of edgeq's data path is used, so the figure checks the
architecture and weights alone. --record writes the zoo registry's provenance record.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edgeq import assets
from edgeq.manifest import sha256_path
from edgeq.models import load_model
from edgeq.zoo import entry, registry

BATCH = 500


def top1(source: str, folder: Path) -> tuple[float, int]:
    loaded = load_model(source)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if tuple(classes) != loaded.classes:
        raise SystemExit(f"{folder}: class folders {classes} differ from the model's {loaded.classes}")
    files = [(f, label) for label, name in enumerate(classes) for f in sorted((folder / name).iterdir())]
    pre = loaded.preprocess
    mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(files), BATCH):
            chunk = files[start : start + BATCH]
            pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in chunk])
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
            labels = torch.tensor([label for _, label in chunk])
            correct += int((loaded.module((x - mean) / std).argmax(1) == labels).sum())
    return correct / len(files), len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cifar10-resnet20", "cifar10-resnet56"])
    parser.add_argument("--data", type=Path, help="the CIFAR-10 test folder [default: from the assets folder]")
    parser.add_argument(
        "--record", action="store_true", help="store the figures in the zoo registry (edgeq/zoo/zoo.json)"
    )
    args = parser.parse_args()
    folder = args.data or assets.require("datasets/cifar10/test", "the CIFAR-10 test folder")
    for name in args.models:
        start = time.perf_counter()
        accuracy, count = top1(f"zoo:{name}", folder)
        print(
            f"zoo:{name}: full-precision top-1 {100 * accuracy:.2f}% on {count} images of {folder} "
            f"({time.perf_counter() - start:.0f} s)"
        )
        if args.record:
            records = registry.load()
            records[name] = {
                "file": f"$EDGEQ_ASSETS/{entry(name).asset} (not shipped)",
                "sha256": sha256_path(assets.require(entry(name).asset, f"weights of zoo:{name}")),
                "script": "python benchmarks/cifar_resnet_fp.py --record (measures; weights pretrained upstream)",
                "seed": None,
                "source": "akamaster/pytorch_resnet_cifar10 pretrained_models (BSD-2-Clause), 'module.' prefix removed",
                "data": "CIFAR-10 (trained upstream); measured on the 10,000 test images as JPEG (quality 75)",
                "metrics": {"cifar10 test (JPEG) top1": round(accuracy, 4)},
            }
            registry.save(records)


if __name__ == "__main__":
    main()
