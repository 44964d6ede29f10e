"""Real models on real data: full precision, then W4A4, W3A3 and W2A4 calibrated on real images or data-free.

    python benchmarks/real.py [--quick] [--out docs] [--models cifar10-resnet20,cifar10-resnet56,efficientnet-lite0]
        [--bits w4a4,w3a3,w2a4,w2a4-dw8] [--sources real,bn-inversion,noise] [--num-images N] [--eval-images N]
        [--method qdrop] [--iters 200] [--lr-rounding 1e-2] [--time-budget S] [--window PIXELS]
        [--bias-correction on|off] [--inversion-iters 200] [--inversion-labels W] [--inversion-jitter PIXELS]
        [--workers N] [--fp-only] [--report-only]

Models and data come from the assets folder (``$EDGEQ_ASSETS``, default ``../shared`` beside the
checkout): the CIFAR-10 ResNets are measured on the 10,000 CIFAR-10 test images (JPEG), EfficientNet-Lite0
on the 1,000 ImageNet sample images (one per class), each with its labels from the class folders. Every
cell quantizes the model (first and last layer at 8 bits, the spec's default) calibrated by one source.
A mixed variant (``w2a4-dw8``: EfficientNet-Lite0's depthwise convolutions at 8-bit weights) is a separate
row beside the pure widths, its layers named in ``VARIANTS``. The sources:

- ``real``: real images. CIFAR-10: the training folder, balanced over the classes (drawn with the seed).
  ImageNet: the sample is all there is, so two folds: calibrate on images of the odd classes and evaluate
  on the even ones, then the other way round; the two halves' per-image results are combined, so no image
  calibrates the model that evaluates it.
- ``bn-inversion``: images optimized to match the model's BatchNorm statistics (data-free).
- ``noise``: Gaussian pixels (data-free; the floor a calibration source should beat).

Each cell records its method, calibration images, iterations, wall time and which test images it gets
right (a bit string), from which sources are compared pairwise with McNemar's exact test. Every finished
cell is written to ``OUT/results-real.json`` at once, so a stopped run resumes; a cell measured with other
settings (method, iterations, images) is measured again. ``OUT/results-real.md`` is written from the JSON,
conclusions included, and names every planned cell not yet measured. Data-free calibration sets are cached
under ``--work``.

``--quick``: ResNet-20 at W4A4, 40 test images, 10 calibration images, round-to-nearest, 4 inversion steps:
seconds, for the test suite; its figures say only that the path runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgeq import assets
from edgeq.bn_inversion import InversionSettings
from edgeq.data import load_synth_images, resolve_dataset
from edgeq.evaluate import predict
from edgeq.models import load_model
from edgeq.quantized import quantizable_layers, quantize_module
from edgeq.reconstruction import ReconstructionConfig
from edgeq.spec import QuantSpec, apply_layer_bits
from edgeq.stages import synth
from edgeq.stats import mcnemar, pack, unpack

log = logging.getLogger("real")
SOURCES = ("real", "bn-inversion", "noise")
DATA_FREE = ("bn-inversion", "noise")
# Mixed variants beside the pure widths: a model's sensitive layers kept wider through the recorded spec
# (--layer-bits), never silently; the pure widths are always on the page beside them. name -> variant ->
# (base bits, --layer-bits, what it keeps wider)
VARIANTS = {
    "efficientnet-lite0": {
        "w2a4-dw8": (
            "w2a4",
            "_blocks.*._depthwise_conv=w8a4",
            "the 16 depthwise convolutions at 8-bit weights (4% of the weights: +12% on a pure W2A4 model's "
            "weight bytes); their inputs stay 4-bit",
        ),
        "w4a4-early8": (
            "w4a4",
            "_blocks.0.*=8,_blocks.1.*=8,_blocks.2.*=8",
            "every layer of the first three blocks (the 112- and 56-pixel ones, where `edgeq debug` finds the "
            "largest gains from 8 bits) at W8A8: 0.3% of the weights",
        ),
    }
}
BITS = ("w4a4", "w3a3", "w2a4", "w2a4-dw8", "w4a4-early8")
JSON_NAME, PAGE_NAME = "results-real.json", "results-real.md"
ALPHA = 0.05  # McNemar: a difference counts as beyond the test's noise below this p-value


class Setup:
    """Where a model's evaluation and real calibration images are, and how to describe them."""

    def __init__(self, evaluation: str, describe: str, calibration: str | None, calib_images: int):
        self.evaluation = evaluation  # relative to the assets folder
        self.describe = describe
        self.calibration = calibration  # None: two folds over the evaluation images
        self.calib_images = calib_images  # default calibration images per cell (per fold for two folds)


CIFAR = Setup("datasets/cifar10/test", "CIFAR-10 test images (JPEG quality 75)", "datasets/cifar10/train", 256)
MODELS = {
    "cifar10-resnet20": CIFAR,
    "cifar10-resnet56": CIFAR,
    "efficientnet-lite0": Setup(
        "datasets/imagenet-sample", "ImageNet sample images (one per class, probably from the training split)", None, 64
    ),
}
# The targets: top-1 drop from full precision, in points, with data-free calibration
TARGETS = {
    "cifar10-resnet20": {"w4a4": 1.0, "w2a4": 4.0},
    "cifar10-resnet56": {"w4a4": 1.0, "w2a4": 4.0},
    "efficientnet-lite0": {"w4a4": 4.0, "w2a4": 20.0},
}
TIME_TARGET = {"efficientnet-lite0": 1800.0}  # seconds of calibration + quantization, on two cores
# Within it, unless --time-budget and --inversion-iters say otherwise: 50 inversion steps for 64 images at 224
# pixels (about 6 s a step for a batch of 32 on two cores: 10 minutes), then 1200 s of rounding (GPTQ + reconstruction)
DEFAULT_TIME_BUDGET = {"efficientnet-lite0": 1200.0}
DEFAULT_INVERSION_ITERS = {"efficientnet-lite0": 50}


# Its 112- and 56-pixel blocks learn on 32-pixel windows: about ten times the iterations in the same budget
# (W4A4 from BatchNorm inversion: 57.2% on whole inputs, 65.0% on windows, McNemar p = 3e-8; docs/quantization.md)
DEFAULT_WINDOW = {"efficientnet-lite0": 32}
# Rounding its 4-bit depthwise weights shifts EfficientNet-Lite0's channel means enough to take it to chance
# (round-to-nearest W4A8: 0.5% top-1 on 200 sample images); correcting the biases on the 64 calibration images
# gives 76% (W4A4: 67.5%) in one forward pass (docs/quantization.md)
DEFAULT_BIAS_CORRECTION = {"efficientnet-lite0": True}
# ResNet-20 from BatchNorm inversion at W2A4 (QDrop, 1000 iterations, three draws; docs/quantization.md): GPTQ's
# start took the mean drop from 5.99 to 4.39 points, per-channel weight zero points on top of it to 3.15
# EfficientNet-Lite0 W4A4 from BatchNorm inversion (QDrop in 1200 s, windows, bias correction): 67.9% from nearest,
# 75.6% from GPTQ with a zero point per channel (146 / 69 images, McNemar p = 2e-7). Its W3A3 and W2A4 rows keep
# nearest: GPTQ did not move W2A4 off chance (0.8% against 0.3%), and re-measuring them costs hours of CPU.
# Keys: a model (every width) or "model/bits" (one row).
DEFAULT_INITIAL_ROUNDING = {"cifar10-resnet20": "gptq", "efficientnet-lite0/w4a4": "gptq"}
DEFAULT_ASYMMETRIC_WEIGHTS = {"cifar10-resnet20": True, "efficientnet-lite0/w4a4": True}


def _default(table: dict, name: str, bits: str | None, fallback):
    if bits is not None and f"{name}/{bits}" in table:
        return table[f"{name}/{bits}"]
    return table.get(name, fallback)


def time_budget(name: str, given: float | None) -> float | None:
    return given if given is not None else DEFAULT_TIME_BUDGET.get(name)


def bias_correction(name: str, given: str | None) -> bool:
    return DEFAULT_BIAS_CORRECTION.get(name, False) if given is None else given == "on"


def initial_rounding(name: str, given: str | None, bits: str | None = None) -> str:
    return given if given is not None else _default(DEFAULT_INITIAL_ROUNDING, name, bits, "nearest")


def asymmetric_weights(name: str, given: str | None, bits: str | None = None) -> bool:
    return _default(DEFAULT_ASYMMETRIC_WEIGHTS, name, bits, False) if given is None else given == "on"


def window(name: str, given: int | None) -> int | None:
    """Reconstruction windows in pixels (0 given: whole inputs)."""
    chosen = given if given is not None else DEFAULT_WINDOW.get(name)
    return chosen or None


# -- arithmetic the page is computed from ------------------------------------------------------------------------


def drop(fp_top1: float, top1: float) -> float:
    """Points of top-1 lost from full precision (positive: worse)."""
    return round((fp_top1 - top1) * 100, 4)


def two_fold(labels: np.ndarray, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(calibration indices, evaluation indices) of the two folds: odd classes calibrate and even classes are
    evaluated, then the reverse. ``count`` calibration images per fold are drawn with ``seed``; together the
    evaluation halves cover every image exactly once."""
    labels = np.asarray(labels)
    folds = []
    for calibrate_parity in (1, 0):
        pool = np.flatnonzero(labels % 2 == calibrate_parity)
        chosen = np.random.default_rng(seed).choice(len(pool), min(count, len(pool)), replace=False)
        folds.append((np.sort(pool[chosen]), np.flatnonzero(labels % 2 != calibrate_parity)))
    return folds


def cpu_description() -> str:
    """The processor's model name and the vector extensions that matter to quantized kernels."""
    from edgeq.targets import host_cpu

    cpu = host_cpu()
    present = [f for f in ("avx512_vnni", "avx2") if f in cpu["features"]]
    return f"{cpu['model']} ({', '.join(present) if present else 'neither avx512_vnni nor avx2'}), {cpu['cores']} cores"


# -- measuring ---------------------------------------------------------------------------------------------------

_LOADED: dict = {}  # per process: model name -> the zoo model, loaded once
_MODELS: dict = {}  # per process: (model name, evaluation count) -> (model, evaluation images, model inputs)


def _loaded(name: str):
    if name not in _LOADED:
        _LOADED[name] = load_model(f"zoo:{name}")
    return _LOADED[name]


def _model(name: str, eval_images: int | None):
    key = (name, eval_images)
    if key not in _MODELS:
        loaded = _loaded(name)
        folder = assets.require(MODELS[name].evaluation, f"the evaluation images of {name}")
        images = resolve_dataset(str(folder), eval_images, preprocess=loaded.preprocess, classes=loaded.classes)
        _MODELS[key] = (loaded, images, loaded.preprocess(images.images))
    return _MODELS[key]


def _scores(module, inputs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: top-1 correct, top-5 correct."""
    with torch.no_grad():
        logits = predict(module, inputs)
    top5 = np.argsort(-logits, axis=1)[:, : min(5, logits.shape[1])]
    return top5[:, 0] == labels, (top5 == labels[:, None]).any(1)


def synthetic_folder(source: str, name: str, count: int, seed: int, work: Path, inversion: InversionSettings) -> Path:
    if source == "noise":
        return work / f"noise-{name}-n{count}-s{seed}"
    how = f"i{inversion.iterations}-l{inversion.label_weight:g}-j{inversion.jitter}"
    return work / f"bn-inversion-{name}-{how}-n{count}-s{seed}"


def make_synthetic(source: str, name: str, count: int, seed: int, work: Path, inversion: InversionSettings) -> float:
    """Make (or find) a data-free calibration set; the seconds it took are kept beside it."""
    loaded = _loaded(name)
    folder = synthetic_folder(source, name, count, seed, work, inversion)
    timing = folder.with_name(folder.name + ".seconds")
    began = time.perf_counter()
    options = synth.SynthOptions(strategy=source, num_images=count, seed=seed, size=loaded.preprocess.height)
    if source == "bn-inversion":
        options = synth.SynthOptions(strategy=source, num_images=count, seed=seed, inversion=inversion)
    synth.run(None, loaded.classes, folder, options, model=loaded)
    if not timing.exists():
        timing.write_text(f"{time.perf_counter() - began:.1f}\n")
    return float(timing.read_text())


def cell_spec(name: str, bits: str, module) -> QuantSpec:
    """The spec of a cell: the short form, or a model's mixed variant resolved on its layer names."""
    variant = VARIANTS.get(name, {}).get(bits)
    if variant is None:
        return QuantSpec.load(bits)
    base, layer_bits, _ = variant
    return apply_layer_bits(QuantSpec.load(base), layer_bits, quantizable_layers(module))


def has_bits(name: str, bits: str) -> bool:
    """Whether cells of ``bits`` exist for model ``name`` (a mixed variant belongs to one model)."""
    return bits in VARIANTS.get(name, {}) or not any(bits in variants for variants in VARIANTS.values())


def measure_cell(name: str, bits: str, source: str, settings: dict, work: Path) -> dict:
    """One cell: quantize ``name`` at ``bits`` calibrated by ``source``; per-image correctness on the test images."""
    loaded, images, inputs = _model(name, settings["eval_images"])
    labels = images.labels
    seed, count = settings["seed"], settings["num_images"][name]
    corrects = bias_correction(name, settings["bias_correction"])
    gptq = initial_rounding(name, settings.get("initial_rounding"), bits)
    asymmetric = asymmetric_weights(name, settings.get("asymmetric_weights"), bits)
    config = (
        (
            ReconstructionConfig(method="rtn", bias_correction=corrects, initial_rounding=gptq)
            if corrects or gptq != "nearest"
            else None
        )
        if settings["method"] == "rtn"
        else ReconstructionConfig(
            method=settings["method"],
            iters=settings["iters"],
            lr_rounding=settings["lr_rounding"],
            time_budget=time_budget(name, settings["time_budget"]),
            window=window(name, settings["window"]),
            bias_correction=corrects,
            initial_rounding=gptq,
        )
    )
    spec = cell_spec(name, bits, loaded.module)
    if asymmetric:
        spec = dataclasses.replace(spec, weight_symmetric=False)
    top1, top5 = np.zeros(len(labels), bool), np.zeros(len(labels), bool)
    quantize_seconds, eval_seconds, synthesis_seconds, folds = 0.0, 0.0, None, None

    def quantize_and_score(calibration: np.ndarray, evaluated) -> None:
        nonlocal quantize_seconds, eval_seconds
        began = time.perf_counter()
        module = quantize_module(loaded.module, calibration, spec, seed=seed, reconstruction=config)
        quantize_seconds += time.perf_counter() - began
        began = time.perf_counter()
        top1[evaluated], top5[evaluated] = _scores(module, inputs[evaluated], labels[evaluated])
        eval_seconds += time.perf_counter() - began

    if source == "real" and MODELS[name].calibration is None:
        folds = two_fold(labels, count, seed)
        for calibrate, evaluated in folds:
            quantize_and_score(inputs[calibrate], evaluated)
        calibration = f"two folds over the evaluation folder: {len(folds[0][0])} + {len(folds[1][0])} real images"
        used = len(folds[0][0])
    elif source == "real":
        folder = assets.require(MODELS[name].calibration, f"the real calibration images of {name}")
        per_class = math.ceil(count / len(loaded.classes))
        chosen = resolve_dataset(
            str(folder), count, preprocess=loaded.preprocess, per_class=per_class, seed=seed, classes=loaded.classes
        )
        quantize_and_score(loaded.preprocess(chosen.images), slice(None))
        calibration = f"{len(chosen)} real images of {MODELS[name].calibration}, balanced over the classes"
        used = len(chosen)
    else:
        inversion = InversionSettings(**settings["inversion"][name])
        synthesis_seconds = make_synthetic(source, name, count, seed, work, inversion)
        made = load_synth_images(synthetic_folder(source, name, count, seed, work, inversion))
        quantize_and_score(loaded.preprocess(made.images), slice(None))
        calibration = f"{len(made)} {source} images" + (
            f" ({inversion.iterations} steps"
            + (f", soft-label weight {inversion.label_weight:g}" if inversion.label_weight else "")
            + (f", jitter {inversion.jitter} px" if inversion.jitter else "")
            + ")"
            if source == "bn-inversion"
            else ""
        )
        used = len(made)
    return {
        "model": name,
        "bits": bits,
        "source": source,
        "method": settings["method"],
        "iters": None if settings["method"] == "rtn" else settings["iters"],
        "lr_rounding": None if settings["method"] == "rtn" else settings["lr_rounding"],
        "time_budget": time_budget(name, settings["time_budget"]),
        "window": None if settings["method"] == "rtn" else window(name, settings["window"]),
        "bias_correction": corrects,
        **({"initial_rounding": gptq} if gptq != "nearest" else {}),  # absent in cells made before it existed
        **({"asymmetric_weights": True} if asymmetric else {}),
        "calibration_images": used,
        "calibration": calibration,
        "eval_images": len(labels),
        "top1": float(top1.mean()),
        "top5": float(top5.mean()),
        "correct": pack(top1),
        "quantize_seconds": round(quantize_seconds, 1),
        "synthesis_seconds": synthesis_seconds,
        "eval_seconds": round(eval_seconds, 1),
        "threads": torch.get_num_threads(),
        "cpu": cpu_description(),
        "seed": seed,
        "inversion": settings["inversion"][name] if source == "bn-inversion" else None,
    }


def measure_fp(name: str, eval_images: int | None) -> dict:
    loaded, images, inputs = _model(name, eval_images)
    began = time.perf_counter()
    top1, top5 = _scores(loaded.module.eval(), inputs, images.labels)
    return {
        "model": name,
        "bits": "fp",
        "source": "fp",
        "eval_images": len(images),
        "evaluation": MODELS[name].evaluation,
        "top1": float(top1.mean()),
        "top5": float(top5.mean()),
        "correct": pack(top1),
        "eval_seconds": round(time.perf_counter() - began, 1),
    }


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    logging.getLogger().setLevel(logging.WARNING)


class _InProcess:
    """The executor's interface for one worker: a call runs when its result is asked for, so each cell is saved
    as soon as it is measured, as with a pool."""

    def submit(self, function, *args):
        return _Deferred(function, args)

    def shutdown(self, **_):
        pass


class _Deferred:
    def __init__(self, function, args):
        self.function, self.args = function, args

    def result(self):
        return self.function(*self.args)


def _completed(executor, futures):
    """Futures as they finish (a pool), or in order, each run when reached (in process)."""
    if isinstance(executor, _InProcess):
        return iter(futures)
    return concurrent.futures.as_completed(futures)


def cell_key(name: str, bits: str, source: str) -> str:
    return f"{name}/{bits}/{source}"


def _same_settings(entry: dict, settings: dict) -> bool:
    learned = settings["method"] != "rtn"
    return (
        entry.get("method") == settings["method"]
        and entry.get("eval_images") == (settings["eval_count"][entry["model"]])
        and entry.get("seed") == settings["seed"]
        and (
            not learned
            or (entry.get("iters"), entry.get("lr_rounding")) == (settings["iters"], settings["lr_rounding"])
        )
        and entry.get("time_budget") == time_budget(entry["model"], settings["time_budget"])
        and entry.get("window") == (window(entry["model"], settings["window"]) if learned else None)
        and entry.get("bias_correction", False) == bias_correction(entry["model"], settings["bias_correction"])
        and entry.get("initial_rounding", "nearest")
        == initial_rounding(entry["model"], settings["initial_rounding"], entry.get("bits"))
        and entry.get("asymmetric_weights", False)
        == asymmetric_weights(entry["model"], settings.get("asymmetric_weights"), entry.get("bits"))
        and entry.get("inversion")
        == (settings["inversion"][entry["model"]] if entry["source"] == "bn-inversion" else None)
        and _requested_images(entry, settings)
    )


def _requested_images(entry: dict, settings: dict) -> bool:
    wanted = settings["num_images"][entry["model"]]
    return entry.get("requested_images", entry.get("calibration_images")) == wanted


def measure(args, out: Path) -> dict:
    """Every missing cell, ``args.workers`` at a time (data-free sets first); each is saved when it finishes."""
    path = out / JSON_NAME
    results = json.loads(path.read_text()) if path.exists() else {"entries": {}}
    settings = {
        "method": args.method,
        "iters": args.iters,
        "lr_rounding": args.lr_rounding,
        "time_budget": args.time_budget,
        "window": args.window,
        "bias_correction": args.bias_correction,
        "initial_rounding": args.initial_rounding,
        "asymmetric_weights": args.asymmetric_weights,
        "inversion": {
            name: dataclasses.asdict(
                InversionSettings(
                    iterations=args.inversion_iters or DEFAULT_INVERSION_ITERS.get(name, 200),
                    label_weight=args.inversion_labels,
                    jitter=args.inversion_jitter,
                )
            )
            for name in MODELS
        },
        "seed": args.seed,
        "eval_images": args.eval_images,
        "num_images": {name: args.num_images or MODELS[name].calib_images for name in MODELS},
    }
    results["planned"] = [cell_key(*cell) for cell in planned(args)]
    if args.report_only:  # the evaluation counts of the full-precision cells stand in for the folders'
        settings["eval_count"] = {
            name: results["entries"][f"{name}/fp"]["eval_images"]
            for name in MODELS
            if f"{name}/fp" in results["entries"]
        }
        results["stale"] = _stale(results, settings)
        return results
    results["settings"] = {
        **{k: v for k, v in settings.items() if k != "num_images"},
        "num_images": {name: settings["num_images"][name] for name in args.models},
        "workers": args.workers,
        "threads_per_worker": args.threads_per_worker,
    }

    def save() -> None:
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(results, indent=1) + "\n")
        partial.replace(path)

    settings["eval_count"] = {}
    for name in args.models:
        fp = results["entries"].get(f"{name}/fp")
        count = len(_model(name, args.eval_images)[1])
        settings["eval_count"][name] = count
        if fp is None or fp["eval_images"] != count:
            results["entries"][f"{name}/fp"] = fp = measure_fp(name, args.eval_images)
            save()
        print(f"{name}/fp: top-1 {fp['top1']:.2%}, top-5 {fp['top5']:.2%} on {fp['eval_images']} images", flush=True)
    pending = [
        cell
        for cell in ([] if args.fp_only else planned(args))
        if cell_key(*cell) not in results["entries"]
        or not _same_settings(results["entries"][cell_key(*cell)], settings)
    ]
    save()
    log.info("%d cells to measure", len(pending))
    if not pending:
        results["stale"] = []
        return results
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.workers > 1:
        os.environ["TQDM_DISABLE"] = "1"  # the workers' progress bars would interleave
    executor = (
        concurrent.futures.ProcessPoolExecutor(
            args.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(args.threads_per_worker,),
        )
        if args.workers > 1
        else _InProcess()
    )
    try:
        sets = {(s, n) for n, _, s in pending if s in DATA_FREE}
        made = [
            executor.submit(
                make_synthetic,
                s,
                n,
                settings["num_images"][n],
                args.seed,
                work,
                InversionSettings(**settings["inversion"][n]),
            )
            for s, n in sorted(sets)
        ]
        for future in _completed(executor, made):
            future.result()
        futures = {executor.submit(measure_cell, *cell, settings, work): cell for cell in pending}
        for future in _completed(executor, futures):
            entry = future.result()
            entry["requested_images"] = settings["num_images"][entry["model"]]
            key = cell_key(*futures[future])
            results["entries"][key] = entry
            save()
            fp = results["entries"][f"{entry['model']}/fp"]["top1"]
            print(
                f"{key}: top-1 {entry['top1']:.2%} (drop {drop(fp, entry['top1']):.2f} points, "
                f"quantized in {entry['quantize_seconds']:.0f} s)",
                flush=True,
            )
    finally:
        executor.shutdown(cancel_futures=True)
    results["stale"] = _stale(results, settings)
    return results


def _stale(results: dict, settings: dict) -> list[str]:
    """Planned cells on the page that were measured with other settings than the command's (it measures them
    again)."""
    return [
        key
        for key in results["planned"]
        if key in results["entries"]
        and results["entries"][key]["model"] in settings["eval_count"]
        and not _same_settings(results["entries"][key], settings)
    ]


def planned(args) -> list[tuple[str, str, str]]:
    return [
        (name, bits, source)
        for name in args.models
        for bits in args.bits
        if has_bits(name, bits)
        for source in args.sources
    ]


# -- the page ----------------------------------------------------------------------------------------------------


def comparisons(results: dict, models, bits_list) -> list[dict]:
    """McNemar's test between every two measured sources of the same model and bits, on the same images."""
    entries, found = results["entries"], []
    for name in models:
        for bits in bits_list:
            measured = [s for s in SOURCES if cell_key(name, bits, s) in entries]
            for i, a in enumerate(measured):
                for b in measured[i + 1 :]:
                    first, second = entries[cell_key(name, bits, a)], entries[cell_key(name, bits, b)]
                    if first["eval_images"] != second["eval_images"]:
                        continue
                    n = first["eval_images"]
                    test = mcnemar(unpack(first["correct"], n), unpack(second["correct"], n))
                    found.append(
                        {
                            "model": name,
                            "bits": bits,
                            "a": a,
                            "b": b,
                            "difference": (first["top1"] - second["top1"]) * 100,
                        }
                        | test
                    )
    return found


def conclusions(results: dict, models, bits_list) -> list[str]:
    """Statements computed from the JSON: best source, real against data-free, the targets."""
    entries, lines = results["entries"], []
    tests = {(t["model"], t["bits"], t["a"], t["b"]): t for t in comparisons(results, models, bits_list)}
    for name in models:
        fp = entries.get(f"{name}/fp")
        if fp is None:
            lines.append(f"{name}: full precision not measured yet, so no drop can be computed.")
            continue
        for bits in bits_list:
            here = {s: entries[cell_key(name, bits, s)] for s in SOURCES if cell_key(name, bits, s) in entries}
            if not here:
                continue
            label = f"{name} {bits.upper()}"
            best = max(here, key=lambda s: here[s]["top1"])
            text = (
                f"{label}, on {fp['eval_images']} test images: best source {best} ({here[best]['top1']:.2%}, drop "
                f"{drop(fp['top1'], here[best]['top1']):.2f} points)"
                + (f" of {len(here)} measured" if len(here) < len(SOURCES) else "")
                + "."
            )
            methods = {(e["method"], e["iters"]) for e in here.values()}
            if len(methods) > 1:
                text += (
                    " The sources were quantized with different settings: "
                    + ", ".join(
                        f"{s} {e['method']}" + (f" {e['iters']} iterations" if e["iters"] else "")
                        for s, e in here.items()
                    )
                    + "."
                )
            for other in DATA_FREE:
                test = tests.get((name, bits, "real", other))
                if test is None:
                    continue
                verdict = (
                    "within the test's noise"
                    if test["p"] >= ALPHA
                    else "real images better beyond noise"
                    if test["difference"] > 0
                    else f"{other} better beyond noise: real calibration loses to data-free here"
                )
                text += (
                    f" Real against {other}: {test['difference']:+.2f} points "
                    f"(images only real gets right: {test['a_only']}, only {other}: {test['b_only']}; "
                    f"McNemar p = {test['p']:.3g}), {verdict}."
                )
            lines.append(text)
            # a mixed variant is reported beside the pure widths' target, never as meeting it
            target = TARGETS.get(name, {}).get(bits)
            free = {s: e for s, e in here.items() if s in DATA_FREE}
            variant = VARIANTS.get(name, {}).get(bits)
            base_target = TARGETS.get(name, {}).get(variant[0]) if variant else None
            if base_target is not None and free:
                chosen = max(free, key=lambda s: free[s]["top1"])
                lost = drop(fp["top1"], free[chosen]["top1"])
                lines.append(
                    f"{label} is mixed ({variant[2]}), so it cannot meet the pure {variant[0].upper()} target; beside "
                    f"it: best data-free source {chosen}, drop {lost:.2f} points against the "
                    f"{base_target:g}-point target ({'within' if lost <= base_target else 'over'} it)."
                )
            if target is not None and free:
                chosen = max(free, key=lambda s: free[s]["top1"])
                lost = drop(fp["top1"], free[chosen]["top1"])
                verdict = "meets" if lost <= target else f"misses by {lost - target:.2f} points"
                text = (
                    f"{label} target (data-free drop at most {target:g} point{'s' * (target != 1)}): "
                    f"best data-free source {chosen}, drop {lost:.2f}: {verdict}"
                )
                limit = TIME_TARGET.get(name)
                if limit is not None:
                    spent = free[chosen]["quantize_seconds"] + (free[chosen]["synthesis_seconds"] or 0)
                    text += (
                        f"; {spent:.0f} s of synthesis and quantization on {free[chosen]['threads']} "
                        f"thread{'' if free[chosen]['threads'] == 1 else 's'}, "
                        f"{'within' if spent <= limit else 'over'} the {limit / 60:.0f}-minute budget"
                    )
                missing = [s for s in DATA_FREE if s not in free]
                lines.append(text + (f" ({', '.join(missing)} not measured)" if missing else "") + ".")
    return lines


def _seconds(entry: dict) -> str:
    def shown(seconds: float) -> str:
        return f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"

    text = shown(entry["quantize_seconds"])
    if entry.get("synthesis_seconds") is not None:
        text += f" (+{shown(entry['synthesis_seconds'])} synthesis)"
    return text


def write_page(results: dict, out: Path, command: str, models, bits_list, sources) -> Path:
    entries = results["entries"]
    missing = [key for key in results["planned"] if key not in entries] + [
        f"{name}/fp" for name in models if f"{name}/fp" not in entries
    ]
    lines = [
        "# Real models on real data",
        "",
        f"Made by `{command}` from `{JSON_NAME}` (raw figures, per-image correctness as hex bit strings). "
        "Every quantized model keeps its first and last layer at 8 bits (the spec's default). Top-1 and top-5 "
        "are against the real labels of the evaluation folder (class index = sorted folder order); a drop is "
        "full precision minus the quantized model, in points, on the same images. Data-free sources see no "
        "real image and no label; real calibration uses images only, never their labels.",
        "",
        "Wall times: "
        + "; ".join(
            f"{cpu}, {threads} torch thread(s) per cell"
            for cpu, threads in sorted({(e["cpu"], e["threads"]) for e in entries.values() if "cpu" in e})
        )
        + " (none measured yet)" * (not any("cpu" in e for e in entries.values()))
        + ". Quantization seconds exclude evaluation; the seconds that made a data-free calibration set are "
        "shown beside them. Cells on one thread ran beside other work (two cells at once, `--workers 2`), so "
        "their seconds overstate a quiet machine's, and a cell with a time budget got fewer iterations than it "
        "would alone.",
        "",
    ]
    if missing:
        lines += [
            f"**Incomplete:** {len(missing)} planned cell(s) are missing: {', '.join(missing)}. The command above "
            "measures them (it resumes from the JSON).",
            "",
        ]
    stale = results.get("stale", [])
    if stale:
        lines += [
            f"**Measured with other settings:** {len(stale)} cell(s) predate a change of the command's settings "
            f"(their columns say how they were made): {', '.join(stale)}. The command above measures them again.",
            "",
        ]
    for name in models:
        fp = entries.get(f"{name}/fp")
        setup = MODELS[name]
        lines += [f"## {name}", ""]
        if fp is None:
            lines += [f"Full precision: missing (not measured yet) on the {setup.describe}.", ""]
        else:
            lines += [
                f"Full precision on {fp['eval_images']} {setup.describe} (`$EDGEQ_ASSETS/{setup.evaluation}`, "
                f"real labels): top-1 **{fp['top1']:.2%}**, top-5 {fp['top5']:.2%}.",
                "",
            ]
        lines += [
            "| bits | calibration | top-1 | drop (points) | top-5 | method | calibration images | iterations "
            "| test images | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for bits in [b for b in bits_list if has_bits(name, b)]:
            for source in sources:
                entry = entries.get(cell_key(name, bits, source))
                if entry is None:
                    lines.append(f"| {bits.upper()} | {source} | missing | missing | | | | | | |")
                    continue
                lost = f"{drop(fp['top1'], entry['top1']):.2f}" if fp else "no fp"
                budget = f", budget {entry['time_budget']:g} s" if entry.get("time_budget") else ""
                budget += f", {entry['window']}-px windows" if entry.get("window") else ""
                budget += ", bias correction" if entry.get("bias_correction") else ""
                budget += ", GPTQ start" if entry.get("initial_rounding") == "gptq" else ""
                budget += ", asymmetric weights" if entry.get("asymmetric_weights") else ""
                lines.append(
                    f"| {bits.upper()} | {source} | {entry['top1']:.2%} | {lost} | {entry['top5']:.2%} "
                    f"| {entry['method']} | {entry['calibration']} | {entry['iters'] or '-'}{budget} "
                    f"| {entry['eval_images']} | {_seconds(entry)} |"
                )
        if any(
            entries.get(cell_key(name, b, source), {}).get("asymmetric_weights")
            for b in bits_list
            for source in sources
        ):
            lines.append(
                "\nRows whose method names a GPTQ start or asymmetric weights (a zero point per output channel) use "
                "them where they measured better (docs/quantization.md); the other rows start from round-to-nearest "
                "with symmetric weights. Compiled, asymmetric weights run on the kernels as fast as symmetric ones "
                "(zero points folded into the stored weights or subtracted in the epilogue, whichever is faster on "
                "the target: docs/kernels.md)."
            )
        for bits, (base, layer_bits, kept) in VARIANTS.get(name, {}).items():
            if bits in bits_list:
                lines.append(
                    f"\n{bits.upper()} is mixed: {base.upper()} with `--layer-bits '{layer_bits}'`, {kept}; pure "
                    f"{base.upper()} is in the rows above."
                )
        lines.append("")
    tests = comparisons(results, models, bits_list)
    if tests:
        lines += [
            "## Paired tests between calibration sources",
            "",
            "McNemar's exact test on the same test images: images only A gets right, only B gets right, and the "
            f"two-sided p-value of the binomial test on those discordant pairs (below {ALPHA:g}: beyond noise).",
            "",
            "| model | bits | A | B | A - B (points) | only A right | only B right | p |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {t['model']} | {t['bits'].upper()} | {t['a']} | {t['b']} | {t['difference']:+.2f} | {t['a_only']} "
            f"| {t['b_only']} | {t['p']:.3g} |"
            for t in tests
        ]
        lines.append("")
    lines += ["## What the numbers say", ""]
    lines += [f"- {line}" for line in conclusions(results, models, bits_list)] or ["- Nothing measured yet."]
    lines += [
        "",
        "Limits: CIFAR-10 here is JPEG (quality 75), which costs the ResNets about 10 points of full precision, "
        "so compare drops, not absolute figures, with papers. The ImageNet sample is one image per class and "
        "probably from the training split: one image is 0.1 point, and only paired differences say much. Each "
        "cell is one calibration draw: McNemar's test says two quantized models differ on these images, not how "
        "far another draw would move either (on ResNet-20 W2A4, two 256-image BatchNorm-inversion draws scored "
        "74.00% and 77.22%; docs/quantization.md), so a difference of a point or two between sources is within "
        "the spread of draws.",
        "",
    ]
    target = out / PAGE_NAME
    target.write_text("\n".join(lines))
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ResNet-20, W4A4, 40 test images, rtn: seconds")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--work", type=Path, default=Path("runs/real-work"), help="cache of data-free calibration sets")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--bits", default=",".join(BITS))
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument(
        "--num-images",
        type=int,
        help="calibration images per cell (per fold for ImageNet's real images) [default: CIFAR 256, ImageNet 64]",
    )
    parser.add_argument("--eval-images", type=int, help="the first N evaluation images, balanced [default: all]")
    parser.add_argument("--method", default="qdrop", choices=["rtn", "adaround", "brecq", "qdrop"])
    parser.add_argument("--iters", type=int, default=200, help="reconstruction iterations per unit")
    parser.add_argument(
        "--lr-rounding", type=float, default=1e-2, help="Adam learning rate of the rounding (1e-2 suits 200 iterations)"
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        help="seconds of reconstruction per cell (caps the iterations) [default: 1200 for EfficientNet-Lite0, none "
        "for the CIFAR ResNets]",
    )
    parser.add_argument(
        "--window",
        type=int,
        help="reconstruct high-resolution blocks on random windows of this many pixels (0: whole inputs) "
        "[default: 32 for EfficientNet-Lite0, whole inputs for the CIFAR ResNets]",
    )
    parser.add_argument(
        "--initial-rounding",
        choices=["nearest", "gptq"],
        help="where weight rounding starts: nearest, or GPTQ (reconstruction then refines it) "
        "[default: gptq for ResNet-20, nearest for the others]",
    )
    parser.add_argument(
        "--asymmetric-weights",
        choices=["on", "off"],
        help="per-channel weight zero points instead of symmetric weights [default: on for ResNet-20, off for the "
        "others]",
    )
    parser.add_argument(
        "--bias-correction",
        choices=["on", "off"],
        help="correct each layer's bias for its rounding's mean output shift [default: on for EfficientNet-Lite0, "
        "off for the CIFAR ResNets]",
    )
    parser.add_argument(
        "--inversion-iters",
        type=int,
        help="Adam steps per bn-inversion batch [default: 200, 50 for EfficientNet-Lite0 (its budget)]",
    )
    parser.add_argument(
        "--inversion-labels", type=float, default=0.0, help="bn-inversion's soft-label weight (0: statistics only)"
    )
    parser.add_argument("--inversion-jitter", type=int, default=0, help="bn-inversion's random shift in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp-only", action="store_true", help="measure full precision only (the page lists the rest)")
    parser.add_argument(
        "--report-only", action="store_true", help="write the page from the JSON as it is, measuring nothing"
    )
    parser.add_argument("--workers", type=int, default=1, help="cells measured at once, each in its own process")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores / workers)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.bits, args.method, args.inversion_iters = "cifar10-resnet20", "w4a4", "rtn", 4
        args.num_images, args.eval_images = args.num_images or 10, args.eval_images or 40
    args.models, args.bits, args.sources = (
        [m for m in args.models.split(",") if m],
        [b for b in args.bits.split(",") if b],
        [s for s in args.sources.split(",") if s],
    )
    for kind, given, known in (
        ("model", args.models, MODELS),
        ("bits", args.bits, BITS),
        ("source", args.sources, SOURCES),
    ):
        unknown = [g for g in given if g not in known]
        if unknown:
            raise SystemExit(f"unknown {kind} {', '.join(unknown)}: choose from {', '.join(known)}")
    if args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    if args.num_images is not None and args.num_images < 1:
        raise SystemExit("--num-images must be at least 1")
    args.threads_per_worker = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    torch.set_num_threads(args.threads_per_worker)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    results = measure(args, args.out)
    given = sys.argv[1:] if argv is None else argv
    skip = {"--report-only", "--fp-only"}
    command = " ".join(["python benchmarks/real.py", *(a for a in given if a not in skip)])
    print(f"written to {write_page(results, args.out, command, args.models, args.bits, args.sources)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
