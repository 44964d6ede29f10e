"""Run a compiled edgeq module on a batch of inputs: needs only NumPy and the TVM runtime.

This file is self-contained on purpose: it runs on boards and under qemu-aarch64, where
neither torch nor edgeq is installed. Usage::

    python runner.py MODULE.so INPUTS.npy OUTPUTS.npy [--latency-runs N] [--timings FILE.json]

INPUTS.npy holds (N, C, H, W) float32 model inputs; or, with ``--preprocess preprocess.json``
(the bundle's), uint8 images (N, H, W, C) of any size, or a folder or list of image files
(decoded with Pillow, the one step that needs it), which :func:`preprocess` resizes, crops
and normalizes as the host did. The module takes one image at a time, and the outputs are
stacked to (N, classes). With ``--latency-runs`` the first input is also timed N times after
warm-up, and the per-run milliseconds go to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

PROGRESS_PREFIX = "edgeq-progress "


# Pillow's resampling (libImaging/Resample.c), which torchvision's Resize runs on PIL images, in NumPy for boards
# without Pillow: coefficients in double, normalized, then fixed point with 22 fraction bits; a horizontal pass,
# then a vertical one, each rounded to uint8. Pillow up to 11 orders the passes so and equals this bit for bit;
# later versions may run the vertical pass first, which moves some pixels by a few levels.
_PRECISION_BITS = 32 - 8 - 2


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


_FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}


def _coefficients(in_size: int, out_size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and fixed-point weights (out_size, taps) of one resampling pass."""
    kernel, base_support = _FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    inverse = 1.0 / filterscale
    taps = int(-(-support // 1)) * 2 + 1
    index = np.zeros((out_size, taps), np.int64)
    weight = np.zeros((out_size, taps), np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - xmin
        values = [kernel((x + xmin - center + 0.5) * inverse) for x in range(count)]
        total = 0.0
        for value in values:  # summed in order, as the C loop does (Python's sum() compensates rounding)
            total += value
        for x, value in enumerate(values):
            value = value / total if total != 0.0 else value
            fixed = value * (1 << _PRECISION_BITS)
            weight[xx, x] = int(fixed - 0.5) if value < 0 else int(fixed + 0.5)
            index[xx, x] = xmin + x
    return index, weight


def _resample(image: np.ndarray, axis: int, out_size: int, interpolation: str) -> np.ndarray:
    """One pass over ``axis`` (0: rows, 1: columns) of a uint8 (H, W, C) image, in integers as Pillow computes it."""
    index, weight = _coefficients(image.shape[axis], out_size, interpolation)
    pixels = image.astype(np.int64)
    shape = [1] * image.ndim
    shape[axis] = out_size
    total = np.full(pixels.take(index[:, 0], axis=axis).shape, 1 << (_PRECISION_BITS - 1), np.int64)
    for tap in range(index.shape[1]):
        total += pixels.take(index[:, tap], axis=axis) * weight[:, tap].reshape(shape)
    return np.clip(total >> _PRECISION_BITS, 0, 255).astype(np.uint8)


def _resize_pillow(image: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    from PIL import Image

    resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
    resized = np.asarray(
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).resize((width, height), resample)
    )
    return resized[..., None] if resized.ndim == 2 else resized


def _resize_numpy(image: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    if width != image.shape[1]:
        image = _resample(image, 1, width, interpolation)
    if height != image.shape[0]:
        image = _resample(image, 0, height, interpolation)
    return image


def resize(image: np.ndarray, height: int, width: int, interpolation: str, use_pillow: bool | None = None):
    """uint8 (H, W, C) resized to (height, width): with Pillow where it is installed (exactly what torchvision
    computes), else with the NumPy version of its algorithm."""
    if use_pillow is None:
        try:
            import PIL  # noqa: F401

            use_pillow = image.shape[-1] in (1, 3)
        except ImportError:
            use_pillow = False
    return (_resize_pillow if use_pillow else _resize_numpy)(image, height, width, interpolation)


def fit(image: np.ndarray, config: dict, use_pillow: bool | None = None) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (height, width, C): the resize and center crop of ``config`` (preprocess.json)."""
    height, width = int(config["height"]), int(config["width"])
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    crop_pct = config.get("crop_pct")
    interpolation = config.get("interpolation", "bilinear")
    if crop_pct is None:
        new_h, new_w = height, width
    else:
        short = int(max(height, width) / crop_pct)
        new_h, new_w = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
    if (new_h, new_w) != (h, w):
        image = resize(image, new_h, new_w, interpolation, use_pillow)
    top, left = int(round((new_h - height) / 2.0)), int(round((new_w - width) / 2.0))
    return image[top : top + height, left : left + width]


def preprocess(images, config: dict, use_pillow: bool | None = None) -> np.ndarray:
    """uint8 images (a list of (H, W[, C]) arrays, any sizes, or one (N, H, W[, C]) array) -> float32 model input
    (N, C, height, width), as edgeq's Preprocess computes it on the host."""
    channels = int(config["channels"])
    fitted = []
    for image in images:
        image = np.asarray(image, np.uint8)
        fitted.append(fit(image[..., None] if image.ndim == 2 else image, config, use_pillow))
    x = np.stack(fitted).astype(np.float32)
    if x.shape[-1] != channels:
        if channels == 1:  # ITU-R BT.601 luma
            x = x[..., 0:1] * np.float32(0.299) + x[..., 1:2] * np.float32(0.587) + x[..., 2:3] * np.float32(0.114)
        elif x.shape[-1] == 1:
            x = np.repeat(x, channels, axis=-1)
        else:
            raise ValueError(f"cannot convert {x.shape[-1]}-channel images to {channels} channels")
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if config.get("scaling", "unit") == "byte":
        mean = np.asarray([m * 255.0 for m in config["mean"]], np.float32).reshape(1, -1, 1, 1)
        std = np.asarray([s * 255.0 for s in config["std"]], np.float32).reshape(1, -1, 1, 1)
    else:
        x = x / np.float32(255.0)
        mean = np.asarray(config["mean"], np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(config["std"], np.float32).reshape(1, -1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def read_images(paths: list[str], channels: int) -> list[np.ndarray]:
    """Decode image files (a folder is expanded to its images, sorted) as uint8 arrays; needs Pillow."""
    from PIL import Image

    files = []
    for path in paths:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
            files.extend(os.path.join(path, n) for n in names)
        else:
            files.append(path)
    images = []
    for path in files:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("L" if channels == 1 else "RGB")))
    return images


def load_inputs(paths: list[str], preprocess_file: str | None) -> np.ndarray:
    """Model inputs from a float32 .npy, or from images (uint8 .npy or image files) and the bundle's preprocess.json."""
    if len(paths) == 1 and paths[0].endswith(".npy"):
        array = np.load(paths[0])
        if array.dtype != np.uint8:
            return array
        if preprocess_file is None:
            raise SystemExit(f"{paths[0]} holds uint8 images: pass --preprocess preprocess.json")
        with open(preprocess_file) as f:
            return preprocess(array, json.load(f))
    if preprocess_file is None:
        raise SystemExit("image files need --preprocess preprocess.json (the bundle's)")
    with open(preprocess_file) as f:
        config = json.load(f)
    return preprocess(read_images(paths, int(config["channels"])), config)


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
    parser.add_argument("inputs", nargs="+", help="a .npy file, or image files and folders (with --preprocess)")
    parser.add_argument("outputs")
    parser.add_argument("--preprocess", default=None, help="the bundle's preprocess.json, for images")
    parser.add_argument("--latency-runs", type=int, default=0)
    parser.add_argument("--timings", default=None)
    args = parser.parse_args()
    inputs = load_inputs(args.inputs, args.preprocess)
    machine = load(args.module)
    np.save(args.outputs, predict(machine, inputs, progress=_report_progress))
    if args.latency_runs and args.timings:
        with open(args.timings, "w") as f:
            json.dump(time_runs(machine, inputs[:1], args.latency_runs), f)


if __name__ == "__main__":
    main()
