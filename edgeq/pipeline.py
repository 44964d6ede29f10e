"""The one-shot run: every missing stage, from a model to a verified module, in one run folder.

    runs/<model>/synth/                    calibration images (shared by every bit width)
    runs/<model>/quantize-<bits>-<method>/           fake-quantized model
    runs/<model>/export-<bits>-<method>/             QDQ ONNX
    runs/<model>/compile-<bits>-<method>-<target>/   module.so
    runs/<model>/verify-<bits>-<method>-<target>/    report.json

A stage whose folder already holds the output of the same inputs and settings (the
manifest fingerprint) is reused, so re-running after changing only the target rebuilds
only compile and verify.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

from . import emulation, zoo
from .data import PreprocessOverrides
from .folders import MODULE_FILE
from .manifest import holding, reusable
from .models import load_model
from .reconstruction import ReconstructionConfig
from .spec import LayerOverride, QuantSpec
from .stages import compile as compile_stage
from .stages import export as export_stage
from .stages import quantize as quantize_stage
from .stages import synth as synth_stage
from .stages import verify as verify_stage
from .targets import Target, host_target

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """The settings of a one-shot run, already parsed: user text becomes a QuantSpec and a Target once, at the edge
    (the CLI's option callbacks, ``QuantSpec.load``, ``edgeq.targets.get_target``)."""

    target: Target = dataclasses.field(default_factory=host_target)  # the best target this CPU runs
    spec: QuantSpec = dataclasses.field(default_factory=lambda: QuantSpec(2, 4))  # w2a4
    run_dir: str | None = None
    generator: str | None = None  # None: the model's own generator, else bn-inversion (see synth.choose_source)
    strategy: str | None = None
    method: str = "qdrop"  # how weights round (edgeq.reconstruction.Method)
    iters: int = 2000  # reconstruction iterations per block or layer
    time_budget: float | None = None  # seconds for GPTQ and reconstruction together (caps iters per unit)
    window: int | None = None  # reconstruct large convolutional inputs on windows of this many pixels
    bias_correction: bool = False  # correct biases for the mean shift of the final rounding
    initial_rounding: str = "nearest"  # or "gptq": where rounding starts (edgeq.reconstruction.Rounding)
    # edgeq's low-bit kernels: auto (when the graph allows), on (required), off (TVM's generic code)
    kernels: str = "auto"
    num_images: int = 256
    seed: int = 0
    eval_data: str | None = None
    eval_images: int = 1000
    latency_runs: int = 100
    allow_pickle: bool = False
    classes_file: str | None = None
    force: bool = False
    calib: str | None = None  # real calibration images (a folder, fashion-mnist:A, real) instead of synth
    calib_per_class: int | None = None  # a balanced subset of an image folder, drawn with the seed
    preprocess: PreprocessOverrides | None = None  # command-line overrides of the model's preprocessing
    layer_bits: tuple[LayerOverride, ...] = ()  # per-layer bit widths by module-name glob (edgeq.spec)

    def __post_init__(self):
        if not isinstance(self.spec, QuantSpec):
            raise TypeError(
                f"RunOptions.spec must be a QuantSpec, not {self.spec!r} (QuantSpec.load parses wWaA or a spec file)"
            )
        if not isinstance(self.target, Target):
            raise TypeError(
                f"RunOptions.target must be a Target, not {self.target!r} (edgeq.targets.get_target looks one up)"
            )


def spec_folder_name(spec: QuantSpec) -> str:
    """The spec's part of a stage folder name: ``str(spec)`` (``w2a4``, or mixed with a digest), plus a digest of the
    whole spec when it differs from the defaults of its widths (observers, first/last bits...), so that two specs
    with the same widths never take turns overwriting one folder."""
    if spec == dataclasses.replace(QuantSpec(spec.weight_bits, spec.act_bits), layers=spec.layers):
        return str(spec)
    return f"{spec}-{hashlib.sha256(spec.to_json().encode()).hexdigest()[:6]}"


def run(model: str | None = None, options: RunOptions | None = None) -> dict:
    """Run the pipeline for ``model`` (None: the built-in default) and return the summary."""
    options = options or RunOptions()
    loaded = load_model(
        model, allow_pickle=options.allow_pickle, classes_file=options.classes_file, preprocess=options.preprocess
    )
    run_dir = Path(options.run_dir or Path("runs") / loaded.name)
    # Two one-shots in one run folder would replace each other's stages mid-chain.
    with holding(run_dir, "'edgeq compile'"):
        return _run_in(run_dir, model, loaded, options)


def _run_in(run_dir: Path, model: str | None, loaded, options: RunOptions) -> dict:
    spec = quantize_stage.resolve_layer_bits(options.spec, options.layer_bits, loaded)
    target = options.target
    spec_name = spec_folder_name(spec)
    notes = [loaded.note] if loaded.note else []
    if model is None:
        notes.insert(
            0,
            f"no model given: using the default {zoo.DEFAULT_MODEL} "
            f"({zoo.entry(zoo.DEFAULT_MODEL.partition(':')[2]).description})",
        )
    stages: dict[str, str] = {}

    def stage(name: str, folder: Path, planned_fingerprint: str, make) -> Path:
        if not options.force and reusable(folder, planned_fingerprint):
            stages[name] = "reused"
            log.info("%s: reusing %s", name, folder)
            return folder
        log.info("%s: running into %s", name, folder)
        make()
        stages[name] = "ran"
        return folder

    if options.calib is not None:
        synth_dir = quantize_stage.resolve_calibration(options.calib, loaded)
        notes.append(f"calibrated on {options.calib} (no synthesis)")
    else:
        generator, strategy = synth_stage.choose_source(loaded, options.generator, options.strategy)
        if generator is None:
            notes.append(
                f"calibration images by {strategy} "
                "(no text-to-image generator for this model; pass --generator for mixup prompting)"
            )
        synth_options = synth_stage.SynthOptions(strategy=strategy, num_images=options.num_images, seed=options.seed)
        synth_dir = stage(
            "synth",
            run_dir / "synth",
            synth_stage.plan(generator, loaded.classes, synth_options, model=loaded).fingerprint,
            lambda: synth_stage.run(
                generator, loaded.classes, run_dir / "synth", synth_options, model=loaded, force=True
            ),
        )

    quant_dir = run_dir / f"quantize-{spec_name}-{options.method}"
    reconstruction = ReconstructionConfig(
        method=options.method,
        iters=options.iters,
        time_budget=options.time_budget,
        window=options.window,
        bias_correction=options.bias_correction,
        initial_rounding=options.initial_rounding,
    )
    quant_params = {
        "num_images": options.num_images,
        "seed": options.seed,
        "allow_pickle": options.allow_pickle,
        "reconstruction": reconstruction,
        "calib_per_class": options.calib_per_class,
    }
    stage(
        "quantize",
        quant_dir,
        quantize_stage.plan(loaded, synth_dir, spec, **quant_params).fingerprint,
        lambda: quantize_stage.run(loaded, synth_dir, quant_dir, bits=spec, **quant_params),
    )

    export_dir = run_dir / f"export-{spec_name}-{options.method}"
    stage(
        "export",
        export_dir,
        export_stage.plan(quant_dir).fingerprint,
        lambda: export_stage.run(quant_dir, export_dir, allow_pickle=options.allow_pickle),
    )

    compile_dir = run_dir / f"compile-{spec_name}-{options.method}-{target.name}"
    stage(
        "compile",
        compile_dir,
        compile_stage.plan(export_dir, target, options.kernels).fingerprint,
        lambda: compile_stage.run(export_dir, compile_dir, target=target, kernels=options.kernels),
    )

    eval_data = options.eval_data or loaded.eval_data or str(synth_dir)
    if not options.eval_data and not loaded.eval_data:
        notes.append("accuracy measured on the calibration images (no labelled data given; pass --data)")
    elif eval_data == "photos":
        notes.append("top-1 figures are agreement with the full-precision model on real photos (no labels)")
    if not target.is_native_arch:
        emulation.setup()
    verify_dir = run_dir / f"verify-{spec_name}-{options.method}-{target.name}"
    latency_runs = options.latency_runs if target.is_native_arch else 0
    verify_params = {"data": eval_data, "num_images": options.eval_images, "latency_runs": latency_runs}
    stage(
        "verify",
        verify_dir,
        verify_stage.plan(compile_dir, **verify_params).fingerprint,
        lambda: verify_stage.run(compile_dir, verify_dir, **verify_params, allow_pickle=options.allow_pickle),
    )
    report = verify_stage.load_report(verify_dir)
    if report.get("agreement_with_reference") not in (None, 1.0):
        log.error(
            "compiled module differs from the bit-exact reference on %.1f%% of images: a compiler or kernel defect",
            100 * (1 - report["agreement_with_reference"]),
        )
    if report["agreement_with_onnxruntime"] < 0.99:
        log.warning(
            "compiled module agrees with onnxruntime on only %.1f%% of images",
            100 * report["agreement_with_onnxruntime"],
        )
    return {
        "model": loaded.source,
        "target": target.name,
        "bits": str(spec),
        "method": options.method,
        "fp_top1": report["fp_top1"],
        "quant_top1": report["quant_top1"],
        "compiled_top1": report["compiled_top1"],
        "agreement_with_fp": report["agreement_with_fp"],
        "agreement_with_reference": report.get("agreement_with_reference"),
        "agreement_with_onnxruntime": report["agreement_with_onnxruntime"],
        "latency_ms": report["latency_ms"],
        "latency_p90_ms": report["latency_p90_ms"],
        "latency_note": report["latency_note"],
        "ran": report["ran"],
        "eval_data": report["data"],
        "eval_images": report["images"],
        "artifact": str((compile_dir / MODULE_FILE).resolve()),  # this run's folder, wherever it was verified from
        "run_dir": str(run_dir.resolve()),
        "stage_dirs": {
            "synth": str(synth_dir) if options.calib is None else None,
            "calibration": str(synth_dir),
            "quantize": str(quant_dir),
            "export": str(export_dir),
            "compile": str(compile_dir),
            "verify": str(verify_dir),
        },
        "stages": stages,
        "notes": notes,
    }
