"""BatchNorm-statistics inversion: calibration images from the model alone (ZeroQ, Genie).

A model trained with BatchNorm remembers, in each BatchNorm layer's running mean and
variance, the statistics its training data produced there. Starting from noise, the
input pixels are optimized so that every BatchNorm layer sees a batch whose per-channel
mean and standard deviation match the running ones. The images need no generator and no
data.

Two options from DeepInversion (Yin et al. 2020), off by default: with ``label_weight``
above zero each image also pulls the model's output toward a target drawn with its seed,
a soft label mixing two classes (weights drawn from Beta(1, 1)) as mixup-class prompting
does for generated images; ``jitter`` shifts the batch by a random offset of up to that
many pixels (and flips it) at each step. Statistics alone already give images the model
classifies confidently (mean top probability 0.87 on CIFAR-10 ResNet-20), and on that
model the two options together lowered W2A4 accuracy by 5 points (docs/quantization.md).

Pixels are optimized in [0, 1] (projected after each step), so rounding to uint8 for the
synth folder changes them by at most half a grey level.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from tqdm.auto import tqdm

from .errors import EdgeqError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class InversionSettings:
    """How hard to optimize: Adam steps per batch, learning rate (in pixel units), batch size;
    the weight of the soft-label term (0: statistics only) and the random shift in pixels at each step."""

    iterations: int = 200
    lr: float = 0.05
    batch_size: int = 32
    label_weight: float = 0.0
    jitter: int = 0

    def __post_init__(self):
        if self.iterations < 1 or self.batch_size < 1 or self.lr <= 0:
            raise EdgeqError(
                "bn-inversion needs positive iterations, batch size and learning rate",
                "pass e.g. --inversion-iters 200",
            )
        if self.label_weight < 0 or self.jitter < 0:
            raise EdgeqError("bn-inversion's label weight and jitter cannot be negative", "pass 0 to switch them off")


def batchnorm_layers(module) -> list:
    from torch import nn

    return [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def statistics_loss(module, x, layers, *, outputs: list | None = None):
    """Sum over BatchNorm layers of the mean squared gap in per-channel mean and std, batch vs running.

    ``outputs``, when given, receives the model's output of the same forward pass.
    """
    import torch

    losses = []

    def hook(layer, inputs, _output):
        value = inputs[0]
        dims = [0] + list(range(2, value.dim()))
        mean = value.mean(dims)
        std = torch.sqrt(value.var(dims, unbiased=False) + layer.eps)
        losses.append(
            ((mean - layer.running_mean) ** 2).mean() + ((std - torch.sqrt(layer.running_var + layer.eps)) ** 2).mean()
        )

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        out = module(x)
    finally:
        for handle in handles:
            handle.remove()
    if outputs is not None:
        outputs.append(out)
    return torch.stack(losses).sum()


def soft_targets(count: int, classes: int, generator):
    """Per image, a probability vector over ``classes`` mixing two distinct classes with a Beta(1, 1) weight."""
    import torch

    first = torch.randint(classes, (count,), generator=generator)
    second = (first + torch.randint(1, max(classes, 2), (count,), generator=generator)) % classes
    weight = torch.rand(count, generator=generator)
    targets = torch.zeros(count, classes)
    rows = torch.arange(count)
    targets[rows, first] += weight
    targets[rows, second] += 1 - weight
    return targets


def _shifted(x, generator, jitter: int):
    """``x`` rolled by a random offset of up to ``jitter`` pixels each way and flipped half the time (one draw for
    the batch, as in DeepInversion)."""
    import torch

    dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=generator))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if bool(torch.rand((), generator=generator) < 0.5):
        x = torch.flip(x, dims=(3,))
    return x


def invert(
    loaded, seeds: list[int], settings: InversionSettings = InversionSettings(), progress=None, device: str = "cpu"
) -> np.ndarray:
    """uint8 RGB images (len(seeds), H, W, 3) at the model's input size; one batch per ``batch_size`` seeds.

    ``progress(count)`` is called after each batch; without it a progress bar of its own is shown. A batch takes
    ``iterations`` forward and backward passes (minutes on a large input), so a bar of its own counts them.
    ``device`` (``cuda``) runs the optimization there; the starting pixels are drawn on the CPU either way, so a
    seed starts from the same image on every device.
    """
    import contextlib

    import torch

    from .graph import eval_mode

    module = eval_mode(loaded.module)
    home = next(module.parameters()).device
    module.to(device)
    layers = batchnorm_layers(module)
    if not layers:
        raise EdgeqError(
            f"{loaded.source} has no BatchNorm layers to invert",
            "use --strategy noise, or a generator with --strategy mixup",
        )
    pre = loaded.preprocess
    mean = torch.tensor(pre.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    images = np.empty((len(seeds), pre.height, pre.width, 3), np.uint8)
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with (
            contextlib.nullcontext()
            if progress
            else tqdm(total=len(seeds), desc="synth (bn-inversion)", unit="img") as bar
        ):
            batches = range(0, len(seeds), settings.batch_size)
            for number, start in enumerate(batches, 1):
                count = len(seeds[start : start + settings.batch_size])
                generator = torch.Generator().manual_seed(seeds[start])
                pixels = (
                    (0.5 + 0.25 * torch.randn((count, pre.channels, pre.height, pre.width), generator=generator))
                    .clamp(0, 1)
                    .to(device)
                    .requires_grad_(True)
                )
                optimizer = torch.optim.Adam([pixels], lr=settings.lr)
                label_draws = torch.Generator().manual_seed(seeds[start] + 1)
                shift_draws = torch.Generator().manual_seed(seeds[start] + 2)
                targets = None
                desc = f"bn-inversion batch {number}/{len(batches)}"
                steps = tqdm(range(settings.iterations), desc=desc, unit="step", leave=False)
                for step in steps:
                    x = (pixels - mean) / std
                    if settings.jitter:
                        x = _shifted(x, shift_draws, settings.jitter)
                    outputs: list = []
                    loss = statistics_loss(module, x, layers, outputs=outputs)
                    if settings.label_weight:
                        log_probs = torch.log_softmax(outputs[0].reshape(count, -1), dim=1)
                        if targets is None:
                            targets = soft_targets(count, log_probs.shape[1], label_draws).to(device)
                        loss = loss - settings.label_weight * (targets * log_probs).sum(1).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    with torch.no_grad():
                        pixels.clamp_(0, 1)
                    if step % 20 == 0:
                        steps.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
                log.debug("bn-inversion batch at %d: statistics loss %.4f", start, loss.item())
                rgb = pixels.detach().expand(-1, 3, -1, -1) if pre.channels == 1 else pixels.detach()
                images[start : start + count] = (
                    (rgb * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                )
                (progress or bar.update)(count)
    finally:
        for p in trainable:
            p.requires_grad_(True)
        module.to(home)
    return images
