"""Does mixup-class prompting beat single-class prompting for data-free quantization here?

    python benchmarks/paper.py [--quick] [--out DIR] [--teachers fmnist-resnet,fmnist-mobilenet,fmnist-vit]
        [--bits w4a4,w3a3,w2a4] [--sources real,single,mixup-text,mixup-embedding,noise,bn-inversion]
        [--seeds 0,1,2] [--num-images 1024] [--method qdrop] [--iters 100] [--initial-rounding gptq]
        [--asymmetric-weights] [--ablations] [--efficientnet] [--workers N]
    python benchmarks/paper.py --teachers cifar10-resnet20,cifar10-resnet56 --num-images 256 --iters 1000 \
        --lr-rounding 1e-2 --initial-rounding gptq --asymmetric-weights

For each zoo teacher x bit width x calibration source x seed: the teacher is quantized
(same method, iterations and spec for every source) on the same number of calibration
images, and its top-1 is measured on the 10000 test images of its data set. The teachers
of one run share a data set: the Fashion-MNIST ones (zoo:fmnist-generator, the
Fashion-MNIST test set) or the CIFAR-10 ResNets (zoo:cifar10-generator, the CIFAR-10 test
folder of ``$EDGEQ_ASSETS``, whose results go to ``results-paper-cifar10.json`` and their
own section of results.md). Sources:

- ``real``: the teachers' training images (Fashion-MNIST split A; the CIFAR-10 training
  folder, balanced over the classes), a seed-dependent subset;
- ``single``: GenQ-style single-class prompts to the data set's text-to-image generator;
- ``mixup-text`` / ``mixup-embedding``: mixup-class prompts (two classes fused in the
  prompt text, or their text embeddings mixed with Beta weights);
- ``noise``: Gaussian pixels; ``bn-inversion``: images optimized to match the teacher's
  BatchNorm statistics (CNNs only).

``--ablations`` adds mixup with three classes and embedding mixes at Beta(0.4) and
Beta(4); ``--efficientnet`` adds EfficientNet-Lite0 (ImageNet) at W4A4 and W2A4 calibrated
by bn-inversion, measured by agreement with full precision on the real photos.

Every measurement (with which test images it gets right, for McNemar's paired test) is
stored in ``OUT/results-paper.json`` as soon as it finishes, so a run can be stopped and
resumed; calibration sets are cached under ``OUT/paper-work``. The script writes the
table, plots and conclusions into ``OUT/results.md`` between the markers
``<!-- paper:begin -->`` and ``<!-- paper:end -->`` (``paper-cifar10`` for CIFAR-10),
keeping the rest of the file.
``--quick``: one teacher (ResNet), W4A4, one seed, 128 images, 50 iterations (and 50
for bn-inversion): a few minutes, for CI; its figures say little beyond "it runs".
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
import platform
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
from edgeq.prompts import PromptOptions
from edgeq.quantized import quantize_module
from edgeq.reconstruction import ReconstructionConfig
from edgeq.spec import QuantSpec
from edgeq.stages import quantize, synth
from edgeq.stats import mcnemar, pack, unpack

log = logging.getLogger("paper")
BEGIN, END = "<!-- paper:begin -->", "<!-- paper:end -->"


@dataclasses.dataclass(frozen=True)
class Domain:
    """The data set a run's teachers share: its generator, real images, test images and where results go."""

    name: str
    generator: str
    real: str  # resolve_dataset source, or a folder relative to the assets folder
    test: str
    test_description: str
    prefix: str  # of generator calibration folders (Fashion-MNIST's keep their old names)
    results: str  # JSON file name
    markers: tuple[str, str]
    limits: str

    @property
    def from_assets(self) -> bool:
        return self.name == "cifar10"


DOMAINS = {
    "fashion-mnist": Domain(
        name="fashion-mnist",
        generator="zoo:fmnist-generator",
        real="fashion-mnist:A",
        test="fashion-mnist:test",
        test_description="the 10000 Fashion-MNIST test images",
        prefix="",
        results="results-paper.json",
        markers=(BEGIN, END),
        limits=(
            "the generator is a small latent diffusion model trained on the other half of Fashion-MNIST, not "
            "Stable Diffusion; it learned from captions of the ten class names only, so polysemy (a class word "
            "meaning something else, the failure mixup prompts address) barely arises, and mixed prompts can only "
            "blend those ten classes. Teachers, images and test set are small"
        ),
    ),
    "cifar10": Domain(
        name="cifar10",
        generator="zoo:cifar10-generator",
        real="datasets/cifar10/train",
        test="datasets/cifar10/test",
        test_description="the 10000 CIFAR-10 test images (JPEG)",
        prefix="cifar10-",
        results="results-paper-cifar10.json",
        markers=("<!-- paper-cifar10:begin -->", "<!-- paper-cifar10:end -->"),
        limits=(
            "the generator is a small latent diffusion model trained on the CIFAR-10 training images themselves: "
            "a proxy for the web-scale knowledge of Stable Diffusion, not the paper's setting (its images are "
            "in-domain, and it knows only the ten class names, so polysemy barely arises and mixed prompts can "
            "only blend those ten classes)"
        ),
    ),
}


def domain_of(teachers) -> Domain:
    """The one data set of ``teachers`` (a run compares teachers of one data set)."""
    # Zoo names ("cifar10-resnet20"), as given or as a loaded model names itself ("zoo-cifar10-resnet20").
    names = {"cifar10" if t.removeprefix("zoo-").startswith("cifar10-") else "fashion-mnist" for t in teachers}
    if len(names) != 1:
        raise SystemExit(f"--teachers mixes data sets ({', '.join(sorted(names))}); run each data set on its own")
    return DOMAINS[names.pop()]


SOURCES = ("real", "single", "mixup-text", "mixup-embedding", "noise", "bn-inversion")
ABLATIONS = ("mixup-text-k3", "mixup-embedding-k3", "mixup-embedding-a0.4", "mixup-embedding-a4")
CNN_ONLY = {"bn-inversion"}
BITS_ORDER = ("w2a4", "w2a2", "w3a3", "w4a4", "w8a8")
PROMPTS = {
    "single": ("single", PromptOptions()),
    "mixup-text": ("mixup", PromptOptions(fusion="text")),
    "mixup-embedding": ("mixup", PromptOptions(fusion="embedding")),
    "mixup-text-k3": ("mixup", PromptOptions(fusion="text", mix_k=3)),
    "mixup-embedding-k3": ("mixup", PromptOptions(fusion="embedding", mix_k=3)),
    "mixup-embedding-a0.4": ("mixup", PromptOptions(fusion="embedding", mix_alpha=0.4)),
    "mixup-embedding-a4": ("mixup", PromptOptions(fusion="embedding", mix_alpha=4.0)),
}


def _source_path(domain: Domain, source: str) -> str:
    return str(assets.require(source, f"{source} of the {domain.name} comparison")) if domain.from_assets else source


def calibration_images(
    source: str, teacher, seed: int, count: int, work: Path, inversion_iters: int = 200
) -> np.ndarray:
    """uint8 images (N, H, W, C) of one calibration source, cached under ``work``."""
    domain = domain_of([teacher.name])
    if source == "real":
        if domain.from_assets:  # only the drawn images are decoded, balanced over the classes
            return resolve_dataset(
                _source_path(domain, domain.real),
                count,
                preprocess=teacher.preprocess,
                per_class=math.ceil(count / len(teacher.classes)),
                seed=seed,
                classes=teacher.classes,
            ).images
        real = resolve_dataset(domain.real)
        picked = np.random.default_rng(seed).choice(len(real), size=count, replace=False)
        return real.images[np.sort(picked)]
    folder = calibration_folder(source, teacher.name, teacher.preprocess.height, seed, count, work, inversion_iters)
    if source in PROMPTS:
        strategy, options = PROMPTS[source]
        synth.run(
            domain.generator,
            teacher.classes,
            folder,
            synth.SynthOptions(strategy=strategy, prompts=options, num_images=count, seed=seed),
        )
    elif source == "noise":
        synth.run(
            None,
            teacher.classes,
            folder,
            synth.SynthOptions(strategy="noise", num_images=count, seed=seed, size=teacher.preprocess.height),
        )
    else:
        synth.run(
            None,
            teacher.classes,
            folder,
            synth.SynthOptions(
                strategy="bn-inversion",
                num_images=count,
                seed=seed,
                inversion=InversionSettings(iterations=inversion_iters),
            ),
            model=teacher,
        )
    return load_synth_images(folder).images


def calibration_folder(
    source: str, teacher_name: str, height: int, seed: int, count: int, work: Path, inversion_iters: int
) -> Path | None:
    """Where ``calibration_images`` caches a source's images (None for ``real``, which needs no making)."""
    if source == "real":
        return None
    if source in PROMPTS:  # the generator's images serve every teacher of its data set
        return work / f"{domain_of([teacher_name]).prefix}{source}-n{count}-s{seed}"
    if source == "noise":
        return work / f"noise-{height}-n{count}-s{seed}"
    if source != "bn-inversion":
        raise SystemExit(f"unknown source {source!r}; choose from {', '.join(SOURCES + ABLATIONS)}")
    return work / f"bn-inversion-{teacher_name}-i{inversion_iters}-n{count}-s{seed}"


_TEACHERS: dict = {}  # per process: the zoo teachers, their preprocessed test set and its labels, loaded once


def _teacher(name: str):
    if name not in _TEACHERS:
        teacher = load_model(f"zoo:{name}")
        domain = domain_of([name])
        test = resolve_dataset(
            _source_path(domain, domain.test), preprocess=teacher.preprocess, classes=teacher.classes
        )
        _TEACHERS[name] = (teacher, teacher.preprocess(test.images), np.asarray(test.labels))
    return _TEACHERS[name]


def _correct(module, inputs: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """Per test image: whether the top-1 class is the label."""
    with torch.no_grad():
        return predict(module, inputs).argmax(1) == labels


def make_calibration_set(
    source: str, teacher_name: str, seed: int, count: int, work: Path, inversion_iters: int
) -> str:
    teacher, _, _ = _teacher(teacher_name)
    calibration_images(source, teacher, seed, count, work, inversion_iters)
    return source


@dataclasses.dataclass(frozen=True)
class Quantizer:
    """The one quantizer every source of a run goes through."""

    method: str
    iters: int
    lr_rounding: float
    initial_rounding: str = "nearest"
    asymmetric_weights: bool = False

    def config(self) -> ReconstructionConfig | None:
        if self.method == "rtn":
            gptq = self.initial_rounding != "nearest"
            return ReconstructionConfig(method="rtn", initial_rounding=self.initial_rounding) if gptq else None
        return ReconstructionConfig(
            method=self.method,
            iters=self.iters,
            lr_rounding=self.lr_rounding,
            initial_rounding=self.initial_rounding,
        )

    def spec(self, bits: str) -> QuantSpec:
        spec = QuantSpec.load(bits)
        return dataclasses.replace(spec, weight_symmetric=False) if self.asymmetric_weights else spec


def quantize_and_score(
    teacher_name: str,
    bits: str,
    source: str,
    seed: int,
    count: int,
    work: Path,
    inversion_iters: int,
    quantizer: Quantizer,
) -> dict:
    """One cell of the table: quantize the teacher on one source's images, top-1 on the test set."""
    began = time.perf_counter()
    teacher, test_inputs, labels = _teacher(teacher_name)
    images = calibration_images(source, teacher, seed, count, work, inversion_iters)
    module = quantize_module(
        teacher.module,
        teacher.preprocess(images),
        quantizer.spec(bits),
        seed=seed,
        reconstruction=quantizer.config(),
    )
    correct = _correct(module, test_inputs, labels)
    return {
        "teacher": teacher_name,
        "bits": bits,
        "source": source,
        "seed": seed,
        "top1": float(correct.mean()),
        "correct": pack(correct),
        "seconds": round(time.perf_counter() - began, 1),
    }


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    logging.getLogger().setLevel(logging.WARNING)


class _InProcess:
    """The executor's interface, run at submission: one worker needs no processes."""

    def submit(self, function, *args):
        future = concurrent.futures.Future()
        try:
            future.set_result(function(*args))
        except BaseException as error:  # noqa: BLE001 - handed to the caller through the future, as a pool would
            future.set_exception(error)
        return future

    def shutdown(self, **_):
        pass


# What a cell's figure depends on besides its teacher, bits, source and seed; files made before a setting was
# recorded were made with its default.
CELL_SETTINGS = ("method", "iters", "lr_rounding", "initial_rounding", "asymmetric_weights", "num_images")
SETTING_DEFAULTS = {"initial_rounding": "nearest", "asymmetric_weights": False, "lr_rounding": 1e-3}


def _refuse_other_settings(previous: dict, current: dict, path: Path) -> None:
    """A resumed run must measure its missing cells as the stored ones were measured, or the table mixes recipes."""
    keys = list(CELL_SETTINGS) + ["inversion_iters", "generator"]
    differ = [
        f"{key} {previous.get(key, SETTING_DEFAULTS.get(key))!r} there, {current[key]!r} now"
        for key in keys
        if key in current and previous.get(key, SETTING_DEFAULTS.get(key)) != current[key]
    ]
    if differ:
        raise SystemExit(
            f"error: {path} holds cells measured with other settings ({'; '.join(differ)}): pass the same settings "
            "to resume it, or --out another folder for a new table"
        )


def measure(args, out: Path) -> dict:
    """Every missing cell, ``args.workers`` at a time; each finished cell is saved at once.

    Cells run in table order (W2A4 first: the widths where sources differ most), a
    calibration set being made when the first cell needing it is reached; a cell waits
    only for its own set.
    """
    domain = domain_of(args.teachers)
    path = out / domain.results
    work = out / "paper-work"
    results = json.loads(path.read_text()) if path.exists() else {"entries": {}}
    previous = results.get("settings")
    results["settings"] = {
        "method": args.method,
        "iters": args.iters,
        "lr_rounding": args.lr_rounding,
        "initial_rounding": args.initial_rounding,
        "asymmetric_weights": args.asymmetric_weights,
        "num_images": args.num_images,
        "inversion_iters": args.inversion_iters,
        "generator": domain.generator,
        "domain": domain.name,
        "evaluation": domain.test_description,
        "workers": args.workers,
        "threads_per_worker": args.threads_per_worker,
        "cpu": platform.machine(),
    }
    if previous is not None and any(key.count("/") == 3 for key in results["entries"]):
        _refuse_other_settings(previous, results["settings"], path)

    def save() -> None:
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(results, indent=2) + "\n")
        partial.replace(path)

    sources = list(args.sources)
    cells_to_run = []
    for name in args.teachers:
        teacher, test_inputs, labels = _teacher(name)
        if f"{name}/fp" not in results["entries"]:
            correct = _correct(teacher.module.eval(), test_inputs, labels)
            results["entries"][f"{name}/fp"] = {
                "teacher": name,
                "bits": "fp",
                "source": "fp",
                "seed": 0,
                "top1": float(correct.mean()),
                "correct": pack(correct),
            }
        has_batchnorm = any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.module.modules())
        for bits in sorted(args.bits, key=lambda b: BITS_ORDER.index(b) if b in BITS_ORDER else len(BITS_ORDER)):
            for source in sources:
                if not (source in CNN_ONLY and not has_batchnorm):
                    cells_to_run += [(name, bits, source, seed) for seed in args.seeds]
    if args.ablations:  # on the first teacher at the lowest width: where the choice of mix can matter
        bits = min(args.bits, key=lambda b: BITS_ORDER.index(b) if b in BITS_ORDER else -1)
        cells_to_run += [(args.teachers[0], bits, source, seed) for source in ABLATIONS for seed in args.seeds]
    results["planned"] = ["/".join(map(str, cell)) for cell in cells_to_run]
    pending = [cell for cell in cells_to_run if "/".join(map(str, cell)) not in results["entries"]]
    save()
    if args.report_only:
        return results
    log.info("%d cells to measure (%d already in %s)", len(pending), len(cells_to_run) - len(pending), path)
    if args.workers > 1:
        os.environ["TQDM_DISABLE"] = (
            "1"  # the workers' progress bars would interleave; each finished cell is printed instead
        )
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
    quantizer = Quantizer(args.method, args.iters, args.lr_rounding, args.initial_rounding, args.asymmetric_weights)
    ready: set[Path | None] = {None}
    making: dict = {}  # future -> calibration folder being made
    measuring: dict = {}  # future -> cell
    heights = {name: _teacher(name)[0].preprocess.height for name in args.teachers}

    def folder_of(cell) -> Path | None:
        name, _, source, seed = cell
        return calibration_folder(source, name, heights[name], seed, args.num_images, work, args.inversion_iters)

    try:
        while pending or making or measuring:
            while len(making) + len(measuring) < args.workers:
                chosen = None
                for cell in pending:
                    folder = folder_of(cell)
                    if folder in ready or (folder is not None and folder.exists()):
                        ready.add(folder)
                        chosen = ("measure", cell)
                        break
                    if folder not in making.values():
                        chosen = ("make", cell)
                        break
                if chosen is None:
                    break
                kind, cell = chosen
                name, bits, source, seed = cell
                if kind == "measure":
                    pending.remove(cell)
                    measuring[
                        executor.submit(
                            quantize_and_score,
                            name,
                            bits,
                            source,
                            seed,
                            args.num_images,
                            work,
                            args.inversion_iters,
                            quantizer,
                        )
                    ] = cell
                else:
                    making[
                        executor.submit(
                            make_calibration_set, source, name, seed, args.num_images, work, args.inversion_iters
                        )
                    ] = folder_of(cell)
            done, _ = concurrent.futures.wait([*making, *measuring], return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                if future in making:
                    ready.add(making.pop(future))
                    future.result()
                    continue
                cell = measuring.pop(future)
                entry = future.result()
                key = "/".join(map(str, cell))
                results["entries"][key] = entry
                save()
                print(f"{key}: top-1 {entry['top1']:.2%} ({entry['seconds']:.0f} s)", flush=True)
    finally:
        executor.shutdown(cancel_futures=True)
    if args.efficientnet and not args.report_only:
        efficientnet(args, out, results.setdefault("efficientnet", {}), save)
    return results


def efficientnet(args, out: Path, figures: dict, save) -> dict:
    """EfficientNet-Lite0 at W4A4 and W2A4 (first/last at 8 bits), calibrated by bn-inversion: agreement with fp
    on the photos.

    Round-to-nearest beside the learned rounding, on the same images, shows what
    reconstruction adds. ``figures``: what an earlier run measured (kept), filled in and
    ``save``d one measurement at a time.
    """
    from edgeq.evaluate import evaluate

    teacher = load_model("zoo:efficientnet-lite0")
    count = args.efficientnet_images
    folder = out / "paper-work" / f"bn-inversion-efficientnet-i{args.inversion_iters}-n{count}"
    synth.run(
        None,
        teacher.classes,
        folder,
        synth.SynthOptions(
            strategy="bn-inversion",
            num_images=count,
            seed=0,
            inversion=InversionSettings(iterations=args.inversion_iters),
        ),
        model=teacher,
    )
    for bits in ("w4a4", "w2a4"):
        for method in ("rtn", args.method):
            key = f"{bits}/{method}"
            if key in figures:
                continue
            began = time.perf_counter()
            config = (
                None
                if method == "rtn"
                else ReconstructionConfig(method=method, iters=args.iters, lr_rounding=args.lr_rounding)
            )
            quantized = quantize.run(
                teacher,
                str(folder),
                out / "paper-work" / f"efficientnet-{bits}-{method}",
                bits=bits,
                num_images=count,
                reconstruction=config,
            )
            result = evaluate(str(quantized), "photos")
            figures[key] = {
                "bits": bits,
                "method": method,
                "images": count,
                "top1_agreement": result["agreement_with_fp"]["top1"],
                "top5_agreement": result["agreement_with_fp"]["top5"],
                "seconds": round(time.perf_counter() - began, 1),
            }
            save()
            print(f"efficientnet-lite0 {key}: {figures[key]}", flush=True)
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
    lines = [
        "| source | " + " | ".join(f"{t.removeprefix('fmnist-')} {b.upper()}" for t, b in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    fp = {t: results["entries"].get(f"{t}/fp", {}).get("top1") for t in teachers}
    lines.append(
        "| full precision | " + " | ".join("-" if fp[t] is None else f"{fp[t]:.2%}" for t, _ in columns) + " |"
    )
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


def _difference(values: list[float], baseline: list[float]) -> tuple[float, float | None]:
    """Mean difference in points and its standard error (None with fewer than two seeds on a side)."""
    delta = (np.mean(values) - np.mean(baseline)) * 100
    if len(values) < 2 or len(baseline) < 2:
        return float(delta), None
    return float(delta), float(
        math.sqrt(np.var(values, ddof=1) / len(values) + np.var(baseline, ddof=1) / len(baseline)) * 100
    )


def _short(teacher: str, bits: str) -> str:
    return f"{teacher.removeprefix('fmnist-').removeprefix('cifar10-')} {bits.upper()}"


def _paired_tests(entries: dict, teacher: str, bits: str, source: str, baseline: str) -> str:
    """McNemar's test of ``source`` against ``baseline`` for each seed both measured with per-image results."""
    found = []
    for entry in entries.values():
        if (entry["teacher"], entry["bits"], entry["source"]) != (teacher, bits, source) or "correct" not in entry:
            continue
        other = entries.get(f"{teacher}/{bits}/{baseline}/{entry['seed']}")
        if other is None or "correct" not in other:
            continue
        count = len(bytes.fromhex(entry["correct"])) * 8
        test = mcnemar(unpack(entry["correct"], count), unpack(other["correct"], count))
        found.append((entry["seed"], test))
    return ", ".join(
        f"seed {seed}: {t['a_only']} / {t['b_only']}, p = {t['p']:.2g}" for seed, t in sorted(found, key=lambda f: f[0])
    )


def conclusions(results: dict) -> list[str]:
    """Statements computed from the table (no judgement beyond the numbers).

    A difference counts as "beyond noise" when it exceeds two standard errors of the
    difference of the means over seeds; with three seeds that is a rough screen, not a test.
    """
    entries = results["entries"]
    grouped = cells(entries)
    lines = []
    for mixup in ("mixup-text", "mixup-embedding"):
        compared, tests = [], []
        for (teacher, bits, source), values in sorted(
            grouped.items(), key=lambda item: (item[0][0], BITS_ORDER.index(item[0][1]))
        ):
            if source == mixup and (teacher, bits, "single") in grouped:
                single = grouped[(teacher, bits, "single")]
                delta, error = _difference(values, single)
                lower = np.std(values, ddof=1) < np.std(single, ddof=1) if len(values) > 1 and len(single) > 1 else None
                compared.append((teacher, bits, delta, error, lower))
                paired = _paired_tests(entries, teacher, bits, mixup, "single")
                if paired:
                    tests.append(f"{_short(teacher, bits)} {paired}")
        if not compared:
            continue
        if tests:
            lines.append(
                f"{mixup} against single-class prompts, McNemar's exact test on the same test images, seed by seed "
                f"({mixup} only / single only, p): " + "; ".join(tests) + "."
            )
        wins = sum(delta > 0 for _, _, delta, _, _ in compared)
        beyond = [(t, b, d) for t, b, d, e, _ in compared if e is not None and abs(d) > 2 * e]
        detail = ", ".join(
            f"{_short(t, b)} {d:+.2f}" + (f" ± {e:.2f}" if e is not None else "") for t, b, d, e, _ in compared
        )
        spreads = [lower for *_, lower in compared if lower is not None]
        lines.append(
            f"**{mixup} against single-class prompts:** higher mean top-1 in {wins} of {len(compared)} cells "
            f"(difference ± its standard error, in points: {detail}). "
            + (
                f"Beyond two standard errors: {', '.join(f'{_short(t, b)} ({d:+.2f})' for t, b, d in beyond)}. "
                if beyond
                else "None of the differences exceeds two standard errors. "
                if any(e is not None for *_, e, _ in compared)
                else ""
            )
            + (
                f"Its spread over seeds is lower in {sum(spreads)} of {len(spreads)} cells."
                if spreads
                else "(One seed: no spread to compare.)"
            )
        )
        by_bits = {}
        for _, bits, delta, _, _ in compared:
            by_bits.setdefault(bits, []).append(delta)
        lines.append(
            f"{mixup}, mean difference over teachers by width: "
            + ", ".join(f"{b.upper()} {np.mean(by_bits[b]):+.2f}" for b in BITS_ORDER if b in by_bits)
            + " points."
        )
    ablation_cells = sorted({(t, b) for t, b, s in grouped if s in ABLATIONS})
    for teacher, bits in ablation_cells:
        row = {
            s: grouped[(teacher, bits, s)]
            for s in (
                "mixup-text",
                "mixup-text-k3",
                "mixup-embedding",
                "mixup-embedding-k3",
                "mixup-embedding-a0.4",
                "mixup-embedding-a4",
                "single",
            )
            if (teacher, bits, s) in grouped
        }
        text = ", ".join(
            f"{s} {np.mean(v) * 100:.2f}" + (f" ± {np.std(v, ddof=1) * 100:.2f}" if len(v) > 1 else "")
            for s, v in row.items()
        )
        lines.append(f"**Ablations** ({_short(teacher, bits)}; two classes and Beta(1) unless named): {text}.")
        pairs = [
            ("mixup-text-k3", "mixup-text"),
            ("mixup-embedding-k3", "mixup-embedding"),
            ("mixup-embedding-a0.4", "mixup-embedding"),
            ("mixup-embedding-a4", "mixup-embedding"),
        ]
        moved = []
        for variant, base in pairs:
            if variant in row and base in row:
                delta, error = _difference(row[variant], row[base])
                moved.append(f"{variant} vs {base} {delta:+.2f}" + (f" ± {error:.2f}" if error is not None else ""))
        if moved:
            lines.append("Against the two-class, Beta(1) mix: " + "; ".join(moved) + " points.")
    for teacher, bits in sorted({(t, b) for t, b, _ in grouped}, key=lambda tb: (tb[0], BITS_ORDER.index(tb[1]))):
        here = {s: np.mean(v) * 100 for (t, b, s), v in grouped.items() if (t, b) == (teacher, bits) and s in SOURCES}
        if "real" in here and len(here) > 1:
            synthetic = {s: m for s, m in here.items() if s != "real"}
            best = max(synthetic, key=synthetic.get)
            lines.append(
                f"{_short(teacher, bits)}: real images {here['real']:.2f}; "
                f"best other source {best} {synthetic[best]:.2f} "
                f"({synthetic[best] - here['real']:+.2f}); noise {here.get('noise', math.nan):.2f}"
                + (f"; bn-inversion {here['bn-inversion']:.2f}" if "bn-inversion" in here else "")
                + "."
            )
    efficientnet = results.get("efficientnet", {})
    for bits in dict.fromkeys(row["bits"] for row in efficientnet.values()):
        rows = {row["method"]: row for row in efficientnet.values() if row["bits"] == bits}
        learned = [m for m in rows if m != "rtn"]
        if "rtn" in rows and learned:
            rtn, other = rows["rtn"], rows[learned[0]]
            lines.append(
                f"EfficientNet-Lite0 {bits.upper()}: {other['method']} agrees with full precision on "
                f"{other['top1_agreement']:.1%} "
                f"of the photos (top-5 {other['top5_agreement']:.1%}), round-to-nearest on {rtn['top1_agreement']:.1%} "
                f"(top-5 {rtn['top5_agreement']:.1%}), from the same {other['images']} bn-inversion images."
            )
    return lines


def plot(results: dict, path: Path, domain: Domain) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = cells(results["entries"])
    teachers = list(dict.fromkeys(key[0] for key in grouped))
    every_source = [s for s in SOURCES + ABLATIONS if any(k[2] == s for k in grouped)]
    colors = {source: plt.get_cmap("tab10")(i % 10) for i, source in enumerate(every_source)}
    fig, axes = plt.subplots(1, len(teachers), figsize=(5.5 * len(teachers), 4.2), dpi=110, squeeze=False)
    for ax, teacher in zip(axes[0], teachers):
        bits_list = [b for b in ("w8a8", "w4a4", "w3a3", "w2a4") if any(k[0] == teacher and k[1] == b for k in grouped)]
        sources = [s for s in SOURCES + ABLATIONS if any(k[0] == teacher and k[2] == s for k in grouped)]
        width = 0.8 / max(len(sources), 1)
        for i, source in enumerate(sources):
            stats = [mean_std(grouped.get((teacher, b, source), [math.nan])) for b in bits_list]
            ax.bar(
                np.arange(len(bits_list)) + i * width,
                [m * 100 for m, _ in stats],
                width,
                yerr=[s * 100 for _, s in stats],
                capsize=2,
                label=source,
                color=colors[source],
            )
        ax.set_xticks(np.arange(len(bits_list)) + width * (len(sources) - 1) / 2, [b.upper() for b in bits_list])
        ax.set_title(teacher)
        ax.set_ylabel(f"top-1 on {domain.test_description.removeprefix('the ')} (%)")
        low = min((m for k, v in grouped.items() if k[0] == teacher for m in v), default=0.0) * 100
        ax.set_ylim(max(0, low - 5), 100)
        ax.grid(axis="y", alpha=0.3)
    handles = {
        label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())
    }  # every source once, same colour everywhere
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def _missing(results: dict) -> list[str]:
    """A paragraph naming the planned cells a stopped run has not measured yet (none when complete)."""
    missing = [key for key in results.get("planned", []) if key not in results["entries"]]
    if not missing:
        return []
    groups: dict[str, list[str]] = {}
    for key in missing:
        cell, _, seed = key.rpartition("/")
        groups.setdefault(cell, []).append(seed)
    listed = "; ".join(f"{cell} (seed {', '.join(seeds)})" for cell, seeds in groups.items())
    return [
        f"**Incomplete:** {len(results['planned']) - len(missing)} of {len(results['planned'])} "
        "planned cells are measured; "
        f"the same command measures the rest (it resumes from the JSON). Missing: {listed}.",
        "",
    ]


def write_markdown(results: dict, out: Path, command: str) -> Path:
    settings = results["settings"]
    domain = DOMAINS[settings.get("domain", "fashion-mnist")]
    begin, end = domain.markers
    plot_path = out / Path(domain.results).with_suffix(".png").name
    plot(results, plot_path, domain)
    extras = [
        *(["GPTQ start"] if settings.get("initial_rounding", "nearest") != "nearest" else []),
        *(["a zero point per output channel"] if settings.get("asymmetric_weights") else []),
    ]
    section = [
        begin,
        "## Calibration sources: mixup-class against single-class prompts"
        + (" (CIFAR-10)" if domain.name == "cifar10" else ""),
        "",
        f"Made by `{command}`. Every source gives the same number of images ({settings['num_images']}) "
        f"to the same quantizer ({settings['method']}, {settings['iters']} iterations per unit at batch 32 "
        f"with rounding learning rate {settings.get('lr_rounding', 1e-3):g}"
        + "".join(f", {extra}" for extra in extras)
        + ", first and last layer at 8 bits); "
        f"top-1 on {domain.test_description}, mean ± standard deviation over seeds (the seed changes "
        f"the calibration images and the quantizer's). Raw figures: `{domain.results}`.",
        "",
        *_missing(results),
        table(results),
        "",
        f"![top-1 by calibration source]({plot_path.name})",
        "",
    ]
    if results.get("efficientnet"):
        rows = list(results["efficientnet"].values())
        section += [
            "EfficientNet-Lite0 (ImageNet weights, first and last layer at 8 bits), "
            f"calibrated on {rows[0]['images']} bn-inversion "
            "images (no ImageNet data here): agreement of its predictions with full precision on the real photos "
            "(`edgeq eval --data photos`).",
            "",
            "| bits | method | top-1 agreement | top-5 agreement | seconds |",
            "|---|---|---|---|---|",
        ]
        section += [
            f"| {r['bits'].upper()} | {r['method']} | {r['top1_agreement']:.1%} | {r['top5_agreement']:.1%} "
            f"| {r.get('seconds', '-')} |"
            for r in rows
        ] + [""]
    section += (
        ["### What the numbers say", ""]
        + [f"- {line}" for line in conclusions(results)]
        + [
            "",
            f"What limits the comparison: {domain.limits}; "
            f"{settings['num_images']} calibration images and {settings['iters']} iterations per unit are far from "
            "the papers' settings (thousands of images, 20000 iterations), and three seeds give only a rough "
            "standard error, so differences under about two standard errors are noise.",
            end,
        ]
    )
    target = out / "results.md"
    text = target.read_text() if target.exists() else "# Results\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + "\n".join(section) + text[text.index(end) + len(end) :]
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
    parser.add_argument("--iters", type=int, default=100, help="reconstruction iterations per unit")
    parser.add_argument(
        "--lr-rounding",
        type=float,
        default=3e-2,
        help=(
            "Adam learning rate of the rounding variables (the papers' 1e-3 is for 20000 iterations; "
            "short schedules need more)"
        ),
    )
    parser.add_argument(
        "--initial-rounding",
        choices=("nearest", "gptq"),
        default="nearest",
        help="where learned rounding starts (gptq: each layer's GPTQ solution on the calibration images)",
    )
    parser.add_argument(
        "--asymmetric-weights",
        action="store_true",
        help="a zero point per output channel for the weights (what the CIFAR-10 ResNets' W2A4 needs)",
    )
    parser.add_argument("--inversion-iters", type=int, default=200, help="Adam steps per bn-inversion batch")
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="mixup of three classes and Beta(0.4) / Beta(4) embedding mixes, on the first teacher at the lowest width",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="write the document from the JSON as it is, measuring nothing"
    )
    parser.add_argument("--efficientnet", action="store_true")
    parser.add_argument(
        "--efficientnet-images",
        type=int,
        default=64,
        help="bn-inversion images for EfficientNet-Lite0 (224 px: slow on a CPU)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="cells measured at once, each in its own process (1: in this process)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per worker (0: the cores divided among the workers)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.teachers, args.bits, args.seeds, args.num_images, args.iters, args.inversion_iters = (
            "fmnist-resnet",
            "w4a4",
            "0",
            128,
            50,
            50,
        )
    args.teachers, args.bits, args.sources = args.teachers.split(","), args.bits.split(","), args.sources.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    args.threads_per_worker = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    torch.set_num_threads(args.threads_per_worker)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    results = measure(args, args.out)
    given = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/paper.py " + " ".join(
        a for a in given if a != "--report-only"
    )  # the command that measures it all
    print(table(results))
    print(f"written to {write_markdown(results, args.out, command.strip())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
