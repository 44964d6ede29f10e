"""A tiny text-to-image pipeline with random weights, saved as a real diffusers folder.

It exercises the exact code path of a real generator (``from_pretrained``, tokenizer,
text encoder, UNet, VAE, scheduler) in about a second on a CPU, so tests and the
out-of-the-box run need no download. Its images are structured noise, not pictures:
it stands in for a trained generator, it is not one.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

MAX_PROMPT_TOKENS = 32
# Whole words for common prompt words, letters and "##" continuations for anything else,
# so every lowercase prompt tokenizes without an [UNK].
_WORDS = [
    "a",
    "an",
    "and",
    "of",
    "the",
    "photo",
    "picture",
    "image",
    "with",
    "shirt",
    "trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "sneaker",
    "bag",
    "ankle",
    "boot",
]
_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list(string.ascii_lowercase)
    + [f"##{c}" for c in string.ascii_lowercase]
    + list(string.digits)
    + list("-/',.")
    + _WORDS
)


def build_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write a random-weight StableDiffusionPipeline to ``folder`` (64x64 images)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(dict.fromkeys(_VOCAB)) + "\n")
    torch.manual_seed(seed)
    tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True, model_max_length=MAX_PROMPT_TOKENS)
    text_encoder = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=MAX_PROMPT_TOKENS,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 32),
        norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=64,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(folder))
    vocab_file.unlink()
    return folder
