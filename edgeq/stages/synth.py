"""Stage 1, synth: calibration images from a diffusers text-to-image pipeline.

Prompt strategies (``edgeq.prompts``): ``single`` (GenQ's baseline, one class per
prompt) and ``mixup`` (k classes per image, fused in the prompt text or in the text
encoder's embedding space, arXiv 2507.21947). Each image records its classes and mixing
weights as a soft label.

Generator-free strategies: ``noise`` (Gaussian) and ``bn-inversion`` (inputs optimized to
match the model's BatchNorm statistics). Optional GenQ-style filtering draws extra
candidates and keeps the lowest-scoring ones (``edgeq.diagnostics``).

Output: ``images-00000.safetensors`` shards (uint8 images, float soft labels), a
``preview.png`` grid of the first 64 images, and a manifest listing every image's
prompt, classes, weights and seed. The same seed gives byte-identical shards.

Shards are saved one by one (each under a temporary name, then renamed) into a work
folder beside the output, ``.NAME.unfinished``; the folder is renamed to NAME when every
shard is there. Running the same command after a kill keeps the finished shards and
makes only the missing ones; different settings discard them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from ..diagnostics import FilterOptions, scorer, select_lowest
from ..errors import EdgeqError, one_of
from ..manifest import (
    Manifest,
    atomic_write_bytes,
    claim_output,
    input_entry,
    publish_folder,
    release,
    releases_on_failure,
    reusable,
)
from ..prompts import (
    STRATEGIES,
    PromptOptions,
    PromptPlan,
    image_seeds,
    mixed_embeddings,
    plan_prompts,
)

if TYPE_CHECKING:
    from ..bn_inversion import InversionSettings

log = logging.getLogger(__name__)

SHARD_SIZE = 256
SHARD_PATTERN = "images-{:05d}.safetensors"
PREVIEW_NAME, PREVIEW_COLUMNS, PREVIEW_LIMIT = "preview.png", 8, 64
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0
STATE_NAME = "state.json"  # in the work folder of an unfinished run: which settings its shards belong to
CANDIDATES_DIR = "candidates"  # with filtering: every drawn image, with its score, before selection


def resolve_generator(generator: str) -> str:
    """A generator name as a folder or hub id: ``zoo:fmnist-generator`` becomes its assembled folder."""
    if generator.startswith("zoo:"):
        from .. import zoo

        name = generator.partition(":")[2]
        if zoo.entry(name).kind != "generator":
            raise EdgeqError(
                f"zoo:{name} is not a generator",
                f"use {', '.join(zoo.generator_names())}, a diffusers folder, or a hub id",
            )
        return zoo.generator_folder(name)
    return generator


def native_size(pipeline) -> int:
    """The image side a pipeline was trained at (its UNet's sample size times the VAE's scale)."""
    return int(pipeline.unet.config.sample_size) * int(getattr(pipeline, "vae_scale_factor", 8))


def load_generator(
    generator: str, *, device: str = "cpu", dtype: str = "auto", cache_dir: str | os.PathLike | None = None
):
    """A diffusers pipeline from a local folder or a hub id (from the Hugging Face cache, ``cache_dir``
    or the default, when there; otherwise downloaded)."""
    import diffusers
    import torch
    import transformers
    from diffusers import DiffusionPipeline

    # Component-loading chatter (progress bars, type warnings for non-CLIP text encoders) is not news to users.
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    generator = resolve_generator(generator)
    local = os.path.isdir(generator)
    if not local and ("/" not in generator or generator.startswith((".", "/"))):
        raise EdgeqError(
            f"generator not found: {generator}",
            "pass a diffusers pipeline folder or a hub id such as stabilityai/sd-turbo",
        )
    keywords = {"dtype": getattr(torch, GenerationOptions(dtype=dtype).resolved_dtype(device))}
    if cache_dir is not None:
        keywords["cache_dir"] = str(cache_dir)
    try:
        # A hub id is looked up in the local cache first, so a cached model loads with no network.
        pipeline = DiffusionPipeline.from_pretrained(generator, local_files_only=True, **keywords)
    except Exception as exc:  # noqa: BLE001 - hub and config errors come in many types
        if local:
            raise EdgeqError(
                f"cannot load generator '{generator}': {str(exc).splitlines()[0]}",
                "pass a complete diffusers pipeline folder (with model_index.json)",
            ) from None
        try:
            pipeline = DiffusionPipeline.from_pretrained(generator, **keywords)
        except Exception as exc:  # noqa: BLE001
            raise EdgeqError(
                f"cannot load generator '{generator}': {str(exc).splitlines()[0]}",
                "download it first (huggingface-cli download ID), or pass a local diffusers pipeline folder",
            ) from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def _generator_digest(generator: str) -> str:
    generator = resolve_generator(generator)
    if os.path.isdir(generator):
        from ..manifest import sha256_path

        return sha256_path(generator)
    return f"hub:{generator}"


# Strategies that need no generator: images drawn directly, each with an empty soft label.
NOISE_MEAN, NOISE_STD = 127.5, 64.0


def noise_images(plans: list[PromptPlan], size: int, model=None, inversion=None, progress=None) -> np.ndarray:
    """Gaussian noise images (mean 127.5, std 64 grey levels, clipped), one NumPy generator per image seed."""
    images = np.empty((len(plans), size, size, 3), np.uint8)
    for i, p in enumerate(plans):
        values = np.random.default_rng(p.seed).normal(NOISE_MEAN, NOISE_STD, size=(size, size, 3))
        images[i] = np.clip(np.round(values), 0, 255).astype(np.uint8)
    if progress:
        progress(len(plans))
    return images


def bn_inversion_images(
    plans: list[PromptPlan], size: int, model=None, inversion=None, progress=None, device: str = "cpu"
) -> np.ndarray:
    """Images whose BatchNorm statistics in ``model`` match its running ones (at the model's input size)."""
    from ..bn_inversion import InversionSettings, invert

    return invert(model, [p.seed for p in plans], inversion or InversionSettings(), progress=progress, device=device)


GENERATOR_FREE = {"noise": noise_images, "bn-inversion": bn_inversion_images}
STRATEGY_NAMES = (*STRATEGIES, *GENERATOR_FREE)


def choose_source(model, generator: str | None, strategy: str | None) -> tuple[str | None, str]:
    """The generator and strategy for a run where the user may have left either out.

    A generator-free strategy needs no generator. Otherwise the generator is the one given,
    or the one that knows the model's classes (the zoo's Fashion-MNIST models); a model with
    neither falls back to bn-inversion when it has BatchNorm layers.
    """
    if strategy in GENERATOR_FREE:
        return None, strategy
    generator = generator or (model.generator if model is not None else None)
    if generator is None and strategy is None and model is not None:
        from ..bn_inversion import batchnorm_layers

        if batchnorm_layers(model.module):
            log.info(
                "no generator given for %s: calibration images by bn-inversion (pass --generator for mixup prompting)",
                model.source,
            )
            return None, "bn-inversion"
    if generator is None:
        raise EdgeqError(
            f"--strategy {strategy or 'mixup'} needs a text-to-image generator",
            "pass --generator (a diffusers folder or hub id, e.g. stabilityai/sd-turbo), "
            "or --strategy noise|bn-inversion",
        )
    return generator, strategy or "mixup"


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """How a diffusers pipeline is run (the settings a diffusers user would pass to ``pipeline(...)``)."""

    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    negative_prompt: str | None = None
    dtype: str = "auto"  # auto: float16 on CUDA, float32 on CPU

    def resolved_dtype(self, device: str) -> str:
        if self.dtype == "auto":
            return "float16" if device == "cuda" else "float32"
        if self.dtype not in ("float16", "float32"):
            raise one_of("dtype", self.dtype, ("auto", "float16", "float32"))
        if self.dtype == "float16" and device != "cuda":
            raise EdgeqError("half precision needs a GPU", "pass --device cuda, or --dtype float32 on CPU")
        return self.dtype


@dataclasses.dataclass(frozen=True)
class SynthOptions:
    """A synth run's settings besides its generator, classes, model and output folder: which images to make
    (these make the fingerprint) and how to run the generator (batch size and device: recorded, not fingerprinted)."""

    strategy: str = "mixup"  # one of STRATEGY_NAMES
    num_images: int = 256
    seed: int = 0
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    size: int | None = None  # None: the generator's own; generator-free strategies: the model's input size
    batch_size: int = 16
    device: str = "cpu"
    prompts: PromptOptions = dataclasses.field(default_factory=PromptOptions)
    inversion: InversionSettings | None = None  # bn-inversion's settings (None: its defaults)
    negative_prompt: str | None = None
    dtype: str = "auto"  # auto: float16 on CUDA, float32 on CPU
    filtering: FilterOptions = dataclasses.field(default_factory=FilterOptions)
    shard_size: int = SHARD_SIZE

    def generation(self) -> GenerationOptions:
        return GenerationOptions(self.steps, self.guidance_scale, self.negative_prompt, self.dtype)


def _resolved(generator: str | None, options: SynthOptions, model) -> SynthOptions:
    """``options`` with the image size and dtype a run uses, or the error of settings that cannot run.

    Both :func:`plan` and :func:`run` resolve the same way, so a planned fingerprint is the one a run writes.
    """
    if options.num_images < 1:
        raise EdgeqError(f"--num-images must be at least 1, not {options.num_images}", "pass a positive count")
    if options.shard_size < 1:
        raise EdgeqError(f"--shard-size must be at least 1, not {options.shard_size}", "pass a positive count")
    if options.strategy not in STRATEGY_NAMES:
        raise one_of("synthesis strategy", options.strategy, STRATEGY_NAMES)
    if options.strategy in GENERATOR_FREE:
        size = options.size
        if model is not None and (options.strategy == "bn-inversion" or size is None):
            size = model.preprocess.height  # inversion optimizes the model's own input
        if options.strategy == "bn-inversion" and model is None:
            raise EdgeqError("--strategy bn-inversion needs the model being quantized", "pass MODEL to edgeq synth")
        if size is None:
            raise EdgeqError(
                f"--strategy {options.strategy} needs an image size",
                "pass --size, or a MODEL whose input size edgeq reads",
            )
        return dataclasses.replace(options, size=size, dtype="float32")
    if generator is None:
        raise EdgeqError(
            f"--strategy {options.strategy} needs a text-to-image generator",
            "pass --generator (zoo:fmnist-generator, a diffusers folder or a hub id)",
        )
    return dataclasses.replace(options, dtype=options.generation().resolved_dtype(options.device))


def plan(generator: str | None, class_names, options: SynthOptions = SynthOptions(), *, model=None) -> Manifest:
    """The manifest (so the fingerprint) that :func:`run` writes with these arguments, without making any image."""
    options = _resolved(generator, options, model)
    filtering = options.filtering or FilterOptions()
    common = {
        "strategy": options.strategy,
        "num_images": options.num_images,
        "size": options.size,
        "classes": list(class_names),
        "shard_size": options.shard_size,
    }
    if filtering.enabled:
        common["filter"] = filtering.to_json()
    inputs = []
    if model is not None and (filtering.enabled or options.strategy == "bn-inversion"):
        inputs.append(input_entry("model", model.source, model.digest()))
    if options.strategy in GENERATOR_FREE:
        if options.strategy == "bn-inversion":
            from ..bn_inversion import InversionSettings

            common["inversion"] = dataclasses.asdict(options.inversion or InversionSettings())
            common["preprocess"] = model.preprocess.to_dict()  # the images invert the model's own input
        return Manifest(stage="synth", inputs=inputs, params=common, seed=options.seed)
    params = common | {
        "steps": options.steps,
        "guidance_scale": options.guidance_scale,
        "negative_prompt": options.negative_prompt,
        "dtype": options.dtype,
        "prompts": (options.prompts or PromptOptions()).to_json(),
    }
    return Manifest(
        stage="synth",
        inputs=[input_entry("generator", generator, _generator_digest(generator)), *inputs],
        params=params,
        seed=options.seed,
    )


@releases_on_failure
def run(
    generator: str | None,
    class_names,
    out: str | Path,
    options: SynthOptions = SynthOptions(),
    *,
    model=None,
    force: bool = False,
) -> Path:
    """Generate ``options.num_images`` calibration images into folder ``out``.

    ``model`` (a LoadedModel) is what bn-inversion optimizes against and what filtering scores
    with. Shards are written as they complete, so a run that is killed continues where it
    stopped when run again with the same settings; a complete folder with the same settings
    is left as it is unless ``force``.
    """
    claim_output(out, "synth", inputs=[generator], force=force)
    class_names = tuple(class_names)
    if not class_names:
        raise EdgeqError("no class names to prompt with", "pass --classes file.txt with one class per line")
    options = _resolved(generator, options, model)
    filtering = options.filtering or FilterOptions()
    score = scorer(model, filtering)
    manifest = plan(generator, class_names, options, model=model)
    if not force and reusable(out, manifest.fingerprint):
        log.info(
            "%s already holds these %d images; nothing to do (pass --force to make them again)", out, options.num_images
        )
        # an unfinished run with other settings, killed after this folder was made, will not be continued
        shutil.rmtree(work_folder(Path(out)), ignore_errors=True)
        release(out)
        return Path(out)
    candidates = filtering.candidates(options.num_images)
    if options.strategy in GENERATOR_FREE:
        plans = [PromptPlan("", (), (), s) for s in image_seeds(options.seed, candidates)]
        make = functools.partial(
            GENERATOR_FREE[options.strategy], size=options.size, model=model, inversion=options.inversion
        )
        if options.strategy == "bn-inversion":  # the optimization runs where --device says; noise needs no device
            make = functools.partial(make, device=options.device)
    else:
        plans = plan_prompts(
            class_names, candidates, options.strategy, options.seed, options.prompts or PromptOptions()
        )
        # Batched denoising rounds differently from one image at a time, so the pixels depend on
        # how images were batched; these do not change what the images show, so they are not
        # part of the fingerprint, but are recorded to reproduce the bytes.
        manifest.extra["batching"] = {"batch_size": options.batch_size, "device": options.device}
        make = _diffusion_maker(
            generator, options.device, options.dtype, options.size, options.batch_size, options.generation()
        )
    return _write_resumable(
        out,
        manifest,
        plans,
        make,
        len(class_names),
        shard_size=options.shard_size,
        score=score,
        keep=options.num_images,
        label=options.strategy,
    )


def _diffusion_maker(
    generator: str, device: str, dtype: str, size: int | None, batch_size: int, generation: GenerationOptions
):
    """A function (plans, progress) -> uint8 images that loads the pipeline on first use (a finished run needs none)."""
    import torch

    loaded: dict = {}

    def make(plans: list[PromptPlan], progress=None) -> np.ndarray:
        if "pipeline" not in loaded:
            loaded["pipeline"] = load_generator(generator, device=device, dtype=dtype)
        pipeline = loaded["pipeline"]
        side = size or native_size(pipeline)
        images = np.zeros((len(plans), side, side, 3), np.uint8)
        for start in range(0, len(plans), batch_size):
            batch = plans[start : start + batch_size]
            generators = [torch.Generator(device).manual_seed(p.seed) for p in batch]
            result = pipeline(
                **_conditioning(pipeline, batch, generation.guidance_scale, generation.negative_prompt),
                num_inference_steps=generation.steps,
                guidance_scale=generation.guidance_scale,
                height=side,
                width=side,
                generator=generators,
                output_type="np",
            )
            images[start : start + len(batch)] = np.clip(
                np.round(np.asarray(result.images, dtype=np.float32) * 255.0), 0, 255
            ).astype(np.uint8)
            if progress:
                progress(len(batch))
        return images

    return make


def preview_grid(images: np.ndarray, columns: int = PREVIEW_COLUMNS, limit: int = PREVIEW_LIMIT):
    """The first ``limit`` images tiled ``columns`` wide (a PIL image), to see a set at a glance."""
    from PIL import Image

    shown = images[:limit]
    rows = -(-len(shown) // columns)
    height, width = shown.shape[1:3]
    grid = np.zeros((rows * height, columns * width, 3), np.uint8)
    for i, image in enumerate(shown):
        r, c = divmod(i, columns)
        grid[r * height : (r + 1) * height, c * width : (c + 1) * width] = image
    return Image.fromarray(grid)


def _soft_labels(plans: list[PromptPlan], num_classes: int) -> np.ndarray:
    soft = np.zeros((len(plans), num_classes), np.float32)
    for i, p in enumerate(plans):
        soft[i, list(p.classes)] += p.weights
    return soft


def _save_shard(path: Path, tensors: dict) -> None:
    """Write a shard under a temporary name and rename it: a shard on disk is always complete."""
    from safetensors.numpy import save_file

    tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    save_file(tensors, str(tmp))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the writer creates private files; shards are ordinary outputs
    os.replace(tmp, path)


def _complete_shard(path: Path, count: int) -> bool:
    from safetensors.numpy import load_file

    if not path.is_file():
        return False
    try:
        return len(load_file(str(path))["images"]) == count
    except Exception:  # noqa: BLE001 - any unreadable shard is simply made again
        log.warning("%s is unreadable; making it again", path)
        return False


def work_folder(out: str | Path) -> Path:
    """Where an unfinished run keeps its completed shards until the folder is complete."""
    out = Path(out)
    return out.parent / f".{out.name}.unfinished"


def _write_resumable(
    out: str | Path,
    manifest: Manifest,
    plans: list[PromptPlan],
    make,
    num_classes: int,
    *,
    shard_size: int,
    score,
    keep: int,
    label: str,
) -> Path:
    """Make and save ``plans`` shard by shard into the work folder, skipping shards already there,
    then (with ``score``) keep the ``keep`` lowest-scoring images, and publish the folder."""
    from safetensors.numpy import load_file

    out = Path(out)
    work = work_folder(out)
    state = {"fingerprint": manifest.fingerprint, "candidates": len(plans), "seconds": 0.0}
    if work.exists():
        try:
            previous = json.loads((work / STATE_NAME).read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
        if {k: previous.get(k) for k in ("fingerprint", "candidates")} != {
            k: state[k] for k in ("fingerprint", "candidates")
        }:
            log.warning("discarding %s: an unfinished run with other settings", work)
            shutil.rmtree(work)
        else:
            state["seconds"] = float(previous.get("seconds", 0.0))
    work.mkdir(parents=True, exist_ok=True)
    for leftover in work.rglob(".*.partial-*"):
        leftover.unlink()
    atomic_write_bytes(work / STATE_NAME, json.dumps(state).encode())
    shard_dir = work / CANDIDATES_DIR if score else work
    shard_dir.mkdir(exist_ok=True)
    spans = [
        (i, start, min(start + shard_size, len(plans))) for i, start in enumerate(range(0, len(plans), shard_size))
    ]
    done = {i for i, start, stop in spans if _complete_shard(shard_dir / SHARD_PATTERN.format(i), stop - start)}
    already = sum(stop - start for i, start, stop in spans if i in done)
    if already:
        log.info("continuing an unfinished run: %d of %d images already made", already, len(plans))
    with tqdm(total=len(plans), initial=already, desc=f"synth ({label})", unit="img") as bar:
        for i, start, stop in spans:
            if i in done:
                continue
            began = time.perf_counter()
            images = make(plans[start:stop], progress=bar.update)
            tensors = {"images": images, "soft_labels": _soft_labels(plans[start:stop], num_classes)}
            if score:
                tensors["scores"] = score(images)
            _save_shard(shard_dir / SHARD_PATTERN.format(i), tensors)
            state["seconds"] += time.perf_counter() - began
            atomic_write_bytes(work / STATE_NAME, json.dumps(state).encode())
    records = [dataclasses.asdict(p) for p in plans]
    if score:
        shards = [load_file(str(shard_dir / SHARD_PATTERN.format(i))) for i, _, _ in spans]
        scores = np.concatenate([s["scores"] for s in shards])
        kept = select_lowest(scores, keep)
        images = np.concatenate([s["images"] for s in shards])[kept]
        soft = np.concatenate([s["soft_labels"] for s in shards])[kept]
        records = [records[k] | {"candidate": int(k), "score": float(scores[k])} for k in kept]
        for i, start in enumerate(range(0, keep, shard_size)):
            _save_shard(
                work / SHARD_PATTERN.format(i),
                {"images": images[start : start + shard_size], "soft_labels": soft[start : start + shard_size]},
            )
        shutil.rmtree(shard_dir)
        manifest.extra["filter"] = {
            "candidates": len(plans),
            "kept": keep,
            "kept_score_max": float(scores[kept].max()),
            "dropped_score_min": float(np.delete(scores, kept).min()) if len(plans) > keep else None,
        }
        first = images[:PREVIEW_LIMIT]
    else:
        first = np.concatenate(
            [
                load_file(str(work / SHARD_PATTERN.format(i)))["images"]
                for i, _, _ in spans[: -(-PREVIEW_LIMIT // shard_size)]
            ]
        )
    preview_grid(first).save(work / PREVIEW_NAME)
    # Time spent making (and scoring) images, summed over interrupted runs, loading the generator included.
    manifest.extra["seconds"] = round(state["seconds"], 3)
    manifest.extra["images"] = [
        r | {"index": i, "shard": SHARD_PATTERN.format(i // shard_size)} for i, r in enumerate(records)
    ]
    (work / STATE_NAME).unlink()
    manifest.write(work)
    publish_folder(work, out)
    log.info("%d images written to %s", len(records), out)
    return out


def _conditioning(pipeline, batch: list[PromptPlan], guidance_scale: float, negative_prompt: str | None = None) -> dict:
    """Pipeline keywords for a batch: prompts, or mixed prompt embeddings for embedding fusion."""
    if not any(p.components for p in batch):
        keywords = {"prompt": [p.prompt for p in batch]}
        if negative_prompt:
            keywords["negative_prompt"] = [negative_prompt] * len(batch)
        return keywords
    if not hasattr(pipeline, "encode_prompt"):
        raise EdgeqError(
            f"{type(pipeline).__name__} cannot take prompt embeddings",
            "use --fusion text, or a Stable Diffusion 1.x/2.x pipeline",
        )
    import torch

    guided = guidance_scale > 1.0

    def encode(texts):
        with torch.no_grad():
            return pipeline.encode_prompt(texts, pipeline.device, 1, False)[0]

    embeds = mixed_embeddings(encode, batch)
    keywords = {"prompt_embeds": embeds}
    if guided:
        keywords["negative_prompt_embeds"] = encode([negative_prompt or ""]).expand_as(embeds)
    return keywords
