"""Stage 1, synth: calibration images from a diffusers text-to-image pipeline.

Prompt strategies (``edgeq.prompts``): ``single`` (GenQ's baseline, one class per
prompt) and ``mixup`` (k classes per image, fused in the prompt text or in the text
encoder's embedding space, arXiv 2507.21947). Each image records its classes and mixing
weights as a soft label.

Output: ``images-00000.safetensors`` shards (uint8 images, float soft labels), a
``preview.png`` grid of the first 64 images, and a manifest listing every image's
prompt, classes, weights and seed. The same seed gives the same images.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data import ImageSet
from ..errors import EdgeqError, one_of
from ..manifest import Manifest, input_entry, staged_folder
from ..prompts import SINGLE_TEMPLATE, STRATEGIES, PromptOptions, PromptPlan, image_seeds, mixed_embeddings, plan_prompts  # noqa: F401 - SINGLE_TEMPLATE re-exported

log = logging.getLogger(__name__)

SHARD_SIZE = 256
SHARD_PATTERN = "images-{:05d}.safetensors"
PREVIEW_NAME, PREVIEW_COLUMNS, PREVIEW_LIMIT = "preview.png", 8, 64
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0


def resolve_generator(generator: str) -> str:
    """A generator name as a folder or hub id: ``zoo:fmnist-generator`` becomes its assembled folder."""
    if generator.startswith("zoo:"):
        from .. import zoo

        name = generator.partition(":")[2]
        if zoo.entry(name).kind != "generator":
            raise EdgeqError(f"zoo:{name} is not a generator", "use zoo:fmnist-generator, a diffusers folder, or a hub id")
        return zoo.generator_folder()
    return generator


def native_size(pipeline) -> int:
    """The image side a pipeline was trained at (its UNet's sample size times the VAE's scale)."""
    return int(pipeline.unet.config.sample_size) * int(getattr(pipeline, "vae_scale_factor", 8))


def load_generator(generator: str, *, device: str = "cpu"):
    """A diffusers pipeline from a local folder or a hub id (offline: from the local cache)."""
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
        raise EdgeqError(f"generator not found: {generator}", "pass a diffusers pipeline folder or a hub id such as stabilityai/sd-turbo")
    try:
        pipeline = DiffusionPipeline.from_pretrained(generator, local_files_only=local, dtype=torch.float16 if device == "cuda" else torch.float32)
    except Exception as exc:  # noqa: BLE001 - hub and config errors come in many types
        raise EdgeqError(f"cannot load generator '{generator}': {str(exc).splitlines()[0]}", "pass a complete diffusers pipeline folder (with model_index.json), or a hub id that is cached locally") from None
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


def noise_images(plans: list[PromptPlan], size: int, model=None, inversion=None) -> np.ndarray:
    """Gaussian noise images (mean 127.5, std 64 grey levels, clipped), one NumPy generator per image seed."""
    images = np.empty((len(plans), size, size, 3), np.uint8)
    for i, p in enumerate(plans):
        values = np.random.default_rng(p.seed).normal(NOISE_MEAN, NOISE_STD, size=(size, size, 3))
        images[i] = np.clip(np.round(values), 0, 255).astype(np.uint8)
    return images


def bn_inversion_images(plans: list[PromptPlan], size: int, model=None, inversion=None) -> np.ndarray:
    """Images whose BatchNorm statistics in ``model`` match its running ones (at the model's input size)."""
    from ..bn_inversion import InversionSettings, invert

    return invert(model, [p.seed for p in plans], inversion or InversionSettings())


GENERATOR_FREE = {"noise": noise_images, "bn-inversion": bn_inversion_images}
STRATEGY_NAMES = (*STRATEGIES, *GENERATOR_FREE)


def plan(generator: str, class_names, *, strategy: str, num_images: int, seed: int, steps: int, guidance_scale: float, size: int | None,
         prompts: PromptOptions | None = None, model=None, inversion=None) -> Manifest:
    if strategy in GENERATOR_FREE:
        params = {"strategy": strategy, "num_images": num_images, "size": size, "classes": list(class_names)}
        if strategy == "bn-inversion" and model is not None:
            from ..bn_inversion import InversionSettings

            params["inversion"] = dataclasses.asdict(inversion or InversionSettings())
            return Manifest(stage="synth", inputs=[input_entry("model", model.source, model.digest())], params=params, seed=seed)
        return Manifest(stage="synth", inputs=[], params=params, seed=seed)
    return Manifest(
        stage="synth",
        inputs=[input_entry("generator", generator, _generator_digest(generator))],
        params={"strategy": strategy, "num_images": num_images, "steps": steps, "guidance_scale": guidance_scale, "size": size, "classes": list(class_names),
                "prompts": (prompts or PromptOptions()).to_json()},
        seed=seed,
    )


def run(generator: str, class_names, out: str | Path, *, strategy: str = "mixup", num_images: int = 256, seed: int = 0, steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE, size: int | None = None, batch_size: int = 16, device: str = "cpu",
        prompts: PromptOptions | None = None, model=None, inversion=None) -> Path:
    """Generate ``num_images`` calibration images into folder ``out`` (``size`` None: the generator's own).

    ``model`` (a LoadedModel) is what bn-inversion optimizes against; ``inversion`` its settings.
    """
    import torch

    class_names = tuple(class_names)
    if not class_names:
        raise EdgeqError("no class names to prompt with", "pass --classes file.txt with one class per line")
    if num_images < 1:
        raise EdgeqError(f"--num-images must be at least 1, not {num_images}", "pass a positive count")
    if strategy not in STRATEGY_NAMES:
        raise one_of("synthesis strategy", strategy, STRATEGY_NAMES)
    options = prompts or PromptOptions()
    if strategy in GENERATOR_FREE:
        if model is not None and (strategy == "bn-inversion" or size is None):
            size = model.preprocess.height  # inversion optimizes the model's own input
        if strategy == "bn-inversion" and model is None:
            raise EdgeqError("--strategy bn-inversion needs the model being quantized", "pass MODEL to edgeq synth")
        if size is None:
            raise EdgeqError(f"--strategy {strategy} needs an image size", "pass --size, or a MODEL whose input size edgeq reads")
    manifest = plan(generator, class_names, strategy=strategy, num_images=num_images, seed=seed, steps=steps, guidance_scale=guidance_scale, size=size,
                    prompts=options, model=model, inversion=inversion)
    if strategy in GENERATOR_FREE:
        prompts = [PromptPlan("", (), (), s) for s in image_seeds(seed, num_images)]
        return _write(out, manifest, prompts, GENERATOR_FREE[strategy](prompts, size, model, inversion), len(class_names))
    prompts = plan_prompts(class_names, num_images, strategy, seed, options)
    pipeline = load_generator(generator, device=device)
    size = size or native_size(pipeline)
    images = np.zeros((num_images, size, size, 3), np.uint8)
    with tqdm(total=num_images, desc=f"synth ({strategy})", unit="img") as bar:
        for start in range(0, num_images, batch_size):
            batch = prompts[start : start + batch_size]
            generators = [torch.Generator(device).manual_seed(p.seed) for p in batch]
            result = pipeline(**_conditioning(pipeline, batch, guidance_scale), num_inference_steps=steps, guidance_scale=guidance_scale,
                              height=size, width=size, generator=generators, output_type="np")
            images[start : start + len(batch)] = np.clip(np.round(np.asarray(result.images) * 255.0), 0, 255).astype(np.uint8)
            bar.update(len(batch))
    return _write(out, manifest, prompts, images, len(class_names))


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


def _write(out: str | Path, manifest: Manifest, prompts: list[PromptPlan], images: np.ndarray, num_classes: int) -> Path:
    from safetensors.numpy import save_file

    num_images = len(images)
    soft = np.zeros((num_images, num_classes), np.float32)
    for i, p in enumerate(prompts):
        soft[i, list(p.classes)] += p.weights
    manifest.extra = {"images": [dataclasses.asdict(p) | {"index": i, "shard": SHARD_PATTERN.format(i // SHARD_SIZE)} for i, p in enumerate(prompts)]}
    with staged_folder(out) as tmp:
        for shard, start in enumerate(range(0, num_images, SHARD_SIZE)):
            save_file({"images": images[start : start + SHARD_SIZE], "soft_labels": soft[start : start + SHARD_SIZE]}, str(tmp / SHARD_PATTERN.format(shard)))
        preview_grid(images).save(tmp / PREVIEW_NAME)
        manifest.write(tmp)
    log.info("%d images written to %s", num_images, out)
    return Path(out)


def _conditioning(pipeline, batch: list[PromptPlan], guidance_scale: float) -> dict:
    """Pipeline keywords for a batch: prompts, or mixed prompt embeddings for embedding fusion."""
    if not any(p.components for p in batch):
        return {"prompt": [p.prompt for p in batch]}
    if not hasattr(pipeline, "encode_prompt"):
        raise EdgeqError(f"{type(pipeline).__name__} cannot take prompt embeddings", "use --fusion text, or a Stable Diffusion 1.x/2.x pipeline")
    import torch

    guided = guidance_scale > 1.0

    def encode(texts):
        with torch.no_grad():
            return pipeline.encode_prompt(texts, pipeline.device, 1, False)[0]

    embeds = mixed_embeddings(encode, batch)
    keywords = {"prompt_embeds": embeds}
    if guided:
        keywords["negative_prompt_embeds"] = encode([""]).expand_as(embeds)
    return keywords


def load_images(folder: str | Path) -> ImageSet:
    """The images and soft labels of a synth folder."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not folder.exists():
        raise EdgeqError(f"data folder not found: {folder}", "pass an output folder of 'edgeq synth', or fashion-mnist:test")
    manifest = Manifest.load(folder, "synth")
    shards = [load_file(str(folder / o["path"])) for o in manifest.outputs if o["path"].endswith(".safetensors")]
    if not shards:
        raise EdgeqError(f"{folder} holds no image shards", "re-run 'edgeq synth'")
    return ImageSet(
        np.concatenate([s["images"] for s in shards]),
        tuple(manifest.params["classes"]),
        soft_labels=np.concatenate([s["soft_labels"] for s in shards]),
    )
