"""What a calibration set looks like to the model being quantized: scores, filters and diagnostics.

Filtering (GenQ, Li et al. 2023) draws more candidate images than needed and keeps the
ones the model finds most in-distribution, by either score (lower is better):

* ``energy``: the free energy -T·logsumexp(logits/T). Confident, in-distribution inputs
  have low energy (Liu et al. 2020, energy-based out-of-distribution detection).
* ``bn-sensitivity``: how far the image's own per-channel feature statistics at every
  BatchNorm layer sit from the layer's running statistics (CNNs with BatchNorm only).

Diagnostics (``edgeq synth inspect``) compare calibration sets at a glance: class coverage
of the model's top-1 predictions, mean prediction entropy, and feature diversity (mean
pairwise distance of the penultimate features, the input of the last Linear layer).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math

import numpy as np

from .errors import EdgeqError, one_of

log = logging.getLogger(__name__)

_BATCH = 64


class FilterMethod(str, enum.Enum):
    NONE = "none"
    ENERGY = "energy"
    BN_SENSITIVITY = "bn-sensitivity"


@dataclasses.dataclass(frozen=True)
class FilterOptions:
    """Which score filters candidates, and the fraction of candidates kept (``keep``)."""

    method: FilterMethod = FilterMethod.NONE
    keep: float = 0.5
    temperature: float = 1.0  # energy only

    def __post_init__(self):
        try:
            object.__setattr__(self, "method", FilterMethod(self.method))
        except ValueError:
            raise one_of("filter", str(self.method), [m.value for m in FilterMethod]) from None
        if not 0.0 < self.keep <= 1.0:
            raise EdgeqError(
                f"--filter-keep must be in (0, 1], not {self.keep}", "pass the fraction of candidates to keep, e.g. 0.5"
            )
        if self.temperature <= 0:
            raise EdgeqError(f"--energy-temperature must be positive, not {self.temperature}", "pass e.g. 1.0")

    @property
    def enabled(self) -> bool:
        return self.method is not FilterMethod.NONE

    def candidates(self, num_images: int) -> int:
        """How many images to draw so that ``keep`` of them is ``num_images``."""
        return math.ceil(num_images / self.keep - 1e-9) if self.enabled else num_images

    def to_json(self) -> dict:
        return {"method": self.method.value, "keep": self.keep, "temperature": self.temperature}


def _inputs(loaded, images: np.ndarray):
    import torch

    for start in range(0, len(images), _BATCH):
        yield torch.from_numpy(loaded.preprocess(images[start : start + _BATCH]))


def energy_scores(loaded, images: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Free energy -T·logsumexp(logits/T) per image (lower: more in-distribution)."""
    import torch

    from .graph import eval_mode

    module = eval_mode(loaded.module)
    out = []
    with torch.no_grad():
        for x in _inputs(loaded, images):
            out.append((-temperature * torch.logsumexp(module(x).float() / temperature, dim=1)).numpy())
    return np.concatenate(out).astype(np.float32)


def bn_sensitivity_scores(loaded, images: np.ndarray) -> np.ndarray:
    """Per image, the sum over BatchNorm layers of the mean squared gap between the image's
    per-channel mean/std and the layer's running mean/std (lower: closer to training data)."""
    import torch

    from .bn_inversion import batchnorm_layers
    from .graph import eval_mode

    module = eval_mode(loaded.module)
    layers = batchnorm_layers(module)
    if not layers:
        raise EdgeqError(
            f"{loaded.source} has no BatchNorm layers", "use --filter energy, which works for any classifier"
        )
    total: list = []

    def hook(layer, inputs, _output):
        value = inputs[0].float()
        dims = list(range(2, value.dim()))
        mean = value.mean(dims)
        std = torch.sqrt(value.var(dims, unbiased=False) + layer.eps)
        gap = ((mean - layer.running_mean) ** 2).mean(1) + (
            (std - torch.sqrt(layer.running_var + layer.eps)) ** 2
        ).mean(1)
        total[-1] += gap

    handles = [layer.register_forward_hook(hook) for layer in layers]
    out = []
    try:
        with torch.no_grad():
            for x in _inputs(loaded, images):
                total.append(torch.zeros(len(x)))
                module(x)
                out.append(total[-1].numpy())
    finally:
        for handle in handles:
            handle.remove()
    return np.concatenate(out).astype(np.float32)


def scorer(loaded, options: FilterOptions):
    """A function uint8 images -> scores for ``options`` (None when filtering is off)."""
    if not options.enabled:
        return None
    if loaded is None:
        raise EdgeqError(
            f"--filter {options.method.value} needs the model being quantized", "pass MODEL to edgeq synth"
        )
    if options.method is FilterMethod.ENERGY:
        return lambda images: energy_scores(loaded, images, options.temperature)
    from .bn_inversion import batchnorm_layers

    if not batchnorm_layers(loaded.module):
        raise EdgeqError(
            f"--filter bn-sensitivity needs a model with BatchNorm; {loaded.source} has none", "use --filter energy"
        )
    return lambda images: bn_sensitivity_scores(loaded, images)


def select_lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` lowest scores, in their original order (ties: earlier index wins)."""
    order = np.argsort(scores, kind="stable")[:count]
    return np.sort(order)


# --- diagnostics --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    images: int
    classes: tuple[str, ...]
    predicted_histogram: tuple[int, ...]  # top-1 predictions per class
    prompted_mass: tuple[float, ...] | None  # soft-label mass per class (None: no labels)
    class_coverage: float  # fraction of classes that are some image's top-1
    predicted_balance: float  # entropy of the top-1 histogram / log(num_classes): 1 is uniform
    mean_entropy: float  # mean softmax entropy per image, nats
    mean_entropy_normalized: float  # ... / log(num_classes)
    top1_in_label: float | None  # top-1 is one of the image's prompted classes
    feature_diversity: float  # mean pairwise L2 distance of penultimate features
    feature_diversity_cosine: float  # mean pairwise cosine distance, scale-free
    mean_energy: float
    entropy_histogram: tuple[int, ...]  # per-image entropy, 10 bins over [0, log C]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _penultimate_and_logits(loaded, images: np.ndarray):
    """The input of the last Linear layer called in a forward pass, and the logits."""
    import torch
    from torch import nn

    from .graph import eval_mode

    module = eval_mode(loaded.module)
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EdgeqError(
            f"{loaded.source} has no Linear layer to read penultimate features from",
            "inspect with a classifier that ends in a Linear layer",
        )
    seen: list = []

    def hook(_layer, inputs, _output):
        seen.append(inputs[0])

    handles = [m.register_forward_hook(hook) for m in linears]
    features, logits = [], []
    try:
        with torch.no_grad():
            for x in _inputs(loaded, images):
                seen.clear()
                logits.append(module(x).float())
                feature = seen[-1]
                features.append(
                    feature.reshape(len(x), -1).float()
                    if feature.dim() == 2
                    else feature[:, 0].reshape(len(x), -1).float()
                )
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(features), torch.cat(logits)


def mean_pairwise_distance(features, max_points: int = 2048) -> tuple[float, float]:
    """Mean L2 and cosine distance over all pairs of distinct rows (the first ``max_points`` rows)."""
    import torch

    f = features[:max_points].double()
    n = len(f)
    if n < 2:
        return 0.0, 0.0
    pairs = n * (n - 1)
    l2 = torch.cdist(f, f).sum().item() / pairs
    unit = torch.nn.functional.normalize(f, dim=1)
    cosine = (1.0 - unit @ unit.T).fill_diagonal_(0).sum().item() / pairs
    return l2, cosine


def inspect_images(loaded, image_set) -> Diagnostics:
    """Diagnostics of ``image_set`` (an ImageSet) through the eyes of ``loaded``."""
    import torch

    features, logits = _penultimate_and_logits(loaded, image_set.images)
    num_classes = logits.shape[1]
    log_c = math.log(num_classes)
    probs = torch.softmax(logits.double(), dim=1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum(1)
    top1 = logits.argmax(1).numpy()
    histogram = np.bincount(top1, minlength=num_classes)
    share = histogram / histogram.sum()
    balance = float(-(share[share > 0] * np.log(share[share > 0])).sum() / log_c)
    prompted = top1_in_label = None
    soft = image_set.soft_labels
    if soft is not None and soft.shape[1] == num_classes and soft.sum() > 0:
        prompted = tuple(float(v) for v in soft.sum(0))
        labelled = soft.sum(1) > 0
        top1_in_label = float((soft[np.arange(len(top1)), top1] > 0)[labelled].mean())
    elif image_set.labels is not None:
        top1_in_label = float((image_set.labels == top1).mean())
    l2, cosine = mean_pairwise_distance(features)
    energy = -torch.logsumexp(logits.double(), dim=1)
    return Diagnostics(
        images=len(top1),
        classes=tuple(image_set.class_names) if len(image_set.class_names) == num_classes else tuple(loaded.classes),
        predicted_histogram=tuple(int(v) for v in histogram),
        prompted_mass=prompted,
        class_coverage=float((histogram > 0).mean()),
        predicted_balance=balance,
        mean_entropy=float(entropy.mean()),
        mean_entropy_normalized=float(entropy.mean() / log_c),
        top1_in_label=top1_in_label,
        feature_diversity=l2,
        feature_diversity_cosine=cosine,
        mean_energy=float(energy.mean()),
        entropy_histogram=tuple(int(v) for v in np.histogram(entropy.numpy(), bins=10, range=(0.0, log_c))[0]),
    )


def diagnostics_png(diagnostics: Diagnostics, path, title: str = "") -> None:
    """Two bar charts side by side: top-1 predictions per class, and per-image entropy."""
    from PIL import Image, ImageDraw

    width, height, margin = 720, 300, 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 6), title or f"{diagnostics.images} images", fill="black")

    def bars(values, labels, left, right, caption, colour, marks=None):
        top, bottom = margin + 14, height - margin - 20
        peak = max(max(values), max(marks) if marks else 0, 1)
        step = (right - left) / len(values)
        for i, value in enumerate(values):
            x0 = left + i * step + 2
            draw.rectangle([x0, bottom - (bottom - top) * value / peak, x0 + step - 4, bottom], fill=colour)
            if marks:  # the share the prompts asked for, as a black tick
                y = bottom - (bottom - top) * marks[i] / peak
                draw.line([x0, y, x0 + step - 4, y], fill="black", width=2)
            draw.text((x0, bottom + 2), labels[i][: max(1, int(step / 6.5))], fill="black")
        draw.text((left, height - margin + 6), caption, fill="black")

    half = width // 2
    prompted = diagnostics.prompted_mass
    marks = [m * diagnostics.images / sum(prompted) for m in prompted] if prompted and sum(prompted) > 0 else None
    bars(
        diagnostics.predicted_histogram,
        list(diagnostics.classes),
        margin,
        half - margin,
        f"top-1 per class (coverage {diagnostics.class_coverage:.0%}, balance {diagnostics.predicted_balance:.2f})"
        + ("; ticks: prompted" if marks else ""),
        (70, 110, 180),
        marks,
    )
    bars(
        diagnostics.entropy_histogram,
        [f"{i / 10:.1f}" for i in range(10)],
        half + margin,
        width - margin,
        f"entropy / log C (mean {diagnostics.mean_entropy_normalized:.2f}); "
        f"diversity {diagnostics.feature_diversity:.2f}",
        (200, 120, 60),
    )
    image.save(path)
