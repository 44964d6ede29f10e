"""Prompt strategies for calibration synthesis: what each generated image is asked to show.

A strategy turns class names into one :class:`PromptPlan` per image. Registered by name
(``STRATEGIES``); each is a small pure function of the class names, the count, a NumPy
generator and :class:`PromptOptions`, so it is tested without a diffusion model.

* ``single`` (GenQ's baseline): one class per prompt, over several templates and adjectives.
* ``mixup`` (arXiv 2507.21947): k classes per image (``mix_k``, default 2), drawn so every
  class fills the same number of slots, fused either in the prompt text ("a photo of a {A}
  and a {B}") or in the text encoder's embedding space (λ·E(A) + (1-λ)·E(B), λ ~ Beta(α, α);
  Dirichlet(α) for k > 2). Every plan records its classes and weights: the soft label.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence

import numpy as np

from .errors import EdgeqError, one_of

SINGLE_TEMPLATE = "a photo of a {0}"
# The templates and adjectives a GenQ-style single-class prompt draws from. The first
# template with no adjective is the canonical prompt (the generator's quality gate uses it).
SINGLE_TEMPLATES = (
    SINGLE_TEMPLATE,
    "a picture of a {0}",
    "an image of a {0}",
    "a product photo of a {0}",
    "a black and white photo of a {0}",
)
ADJECTIVES = ("", "small ", "large ", "plain ", "patterned ")


class Fusion(str, enum.Enum):
    """How the classes of a mixup prompt are fused."""

    TEXT = "text"
    EMBEDDING = "embedding"


@dataclasses.dataclass(frozen=True)
class PromptOptions:
    """Settings of the prompt strategies (JSON-friendly: every field is a plain value)."""

    fusion: Fusion = Fusion.TEXT
    mix_k: int = 2
    mix_alpha: float = 1.0
    # Text fusion of k classes: {0}..{k-1} are the class names; None builds
    # "a photo of a {0} and a {1}" (k=2) or "a photo of a {0}, a {1} and a {2}".
    mix_template: str | None = None

    def __post_init__(self):
        object.__setattr__(
            self, "fusion", Fusion(self.fusion) if self.fusion in {f.value for f in Fusion} else self.fusion
        )
        if not isinstance(self.fusion, Fusion):
            raise one_of("fusion", self.fusion, [f.value for f in Fusion])
        if self.mix_k < 2:
            raise EdgeqError(
                f"--mix-k must be at least 2, not {self.mix_k}", "mix two or more classes, or use --strategy single"
            )
        if not self.mix_alpha > 0:
            raise EdgeqError(
                f"--mix-alpha must be positive, not {self.mix_alpha}",
                "use 1.0 for uniform mixing weights, smaller for weights near 0 or 1",
            )
        if self.mix_template is not None:
            missing = [i for i in range(self.mix_k) if f"{{{i}}}" not in self.mix_template]
            if missing:
                raise EdgeqError(
                    f"mix template {self.mix_template!r} lacks {', '.join(f'{{{i}}}' for i in missing)}",
                    f"write one placeholder per mixed class, e.g. 'a photo of a {{0}} and a {{1}}' "
                    f"for --mix-k {self.mix_k}",
                )

    def text_template(self) -> str:
        if self.mix_template:
            return self.mix_template
        names = [f"a {{{i}}}" for i in range(self.mix_k)]
        return "a photo of " + ", ".join(names[:-1]) + " and " + names[-1]

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"fusion": self.fusion.value}


@dataclasses.dataclass(frozen=True)
class PromptPlan:
    """One image to generate.

    ``prompt`` is what the pipeline is given, or, for embedding fusion, a readable account
    of the mix; then ``components`` holds the single-class prompts whose embeddings are
    mixed with ``weights``.
    """

    prompt: str
    classes: tuple[int, ...]
    weights: tuple[float, ...]
    seed: int
    components: tuple[str, ...] = ()


Strategy = Callable[[Sequence[str], int, np.random.Generator, PromptOptions], list[PromptPlan]]
STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str):
    def register(function: Strategy) -> Strategy:
        STRATEGIES[name] = function
        return function

    return register


@register_strategy("single")
def single_class_prompts(class_names, count, rng, options):
    """Classes in a shuffled round-robin (each count/num_classes times, ±1), random template and adjective."""
    order = balanced_slots(len(class_names), count, rng)
    templates = rng.integers(len(SINGLE_TEMPLATES), size=count)
    adjectives = rng.integers(len(ADJECTIVES), size=count)
    return [
        PromptPlan(SINGLE_TEMPLATES[t].format(ADJECTIVES[a] + class_names[c]), (int(c),), (1.0,), 0)
        for c, t, a in zip(order, templates, adjectives)
    ]


@register_strategy("mixup")
def mixup_prompts(class_names, count, rng, options):
    """k distinct classes per image, each class filling count*k/num_classes slots (±1)."""
    k = options.mix_k
    if len(class_names) < k:
        raise EdgeqError(
            f"mixup of {k} classes needs at least {k} classes, the model has {len(class_names)}",
            "pass more class names, lower --mix-k, or use --strategy single",
        )
    slots = distinct_rows(balanced_slots(len(class_names), k * count, rng).reshape(count, k), rng)
    plans = []
    for row in slots:
        classes = tuple(int(c) for c in row)
        names = [class_names[c] for c in classes]
        if options.fusion is Fusion.TEXT:
            plans.append(PromptPlan(options.text_template().format(*names), classes, (1.0 / k,) * k, 0))
        else:
            weights = tuple(float(w) for w in rng.dirichlet([options.mix_alpha] * k))
            components = tuple(SINGLE_TEMPLATE.format(name) for name in names)
            account = " + ".join(f"{w:.3f}*[{p}]" for w, p in zip(weights, components))
            plans.append(PromptPlan(account, classes, weights, 0, components))
    return plans


def balanced_slots(num_classes: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` class indices, each class appearing count/num_classes times (±1), shuffled."""
    repeats = -(-count // num_classes)
    pool = np.concatenate([rng.permutation(num_classes) for _ in range(repeats)])[:count]
    return rng.permutation(pool)


def distinct_rows(slots: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Repair rows that repeat a class by swapping within a column with another row.

    Swaps within a column keep every class's count, so the balance survives.
    """
    slots = slots.copy()
    count, k = slots.shape
    for i in range(count):
        for col in range(k):
            if list(slots[i]).count(slots[i, col]) == 1:
                continue
            for j in rng.permutation(count):
                a, b = slots[i, col], slots[j, col]
                row_i = [slots[i, c] for c in range(k) if c != col]
                row_j = [slots[j, c] for c in range(k) if c != col]
                if j != i and b not in row_i and a not in row_j:
                    slots[i, col], slots[j, col] = b, a
                    break
    if any(len(set(row)) < k for row in slots):
        raise EdgeqError(
            "could not draw distinct classes for every mixup prompt", "generate more images or lower --mix-k"
        )
    return slots


def plan_prompts(
    class_names, count: int, strategy: str, seed: int, options: PromptOptions | None = None
) -> list[PromptPlan]:
    """One plan per image; the same arguments give the same plans and image seeds."""
    if strategy not in STRATEGIES:
        raise one_of("prompt strategy", strategy, STRATEGIES)
    options = options or PromptOptions()
    rng = np.random.default_rng(seed)
    plans = STRATEGIES[strategy](list(class_names), count, rng, options)
    return [dataclasses.replace(p, seed=s) for p, s in zip(plans, image_seeds(seed, count))]


def image_seeds(seed: int, count: int) -> list[int]:
    """One generator seed per image, derived from the run's seed (independent of the strategy)."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(count, dtype=np.uint64) % (2**63)]


def mixed_embeddings(encode, plans: Sequence[PromptPlan]):
    """Prompt embeddings for a batch: each plan's components encoded, then mixed by its weights.

    ``encode(prompts)`` returns a (len(prompts), tokens, dims) tensor. Plans without
    components (text fusion, single class) are encoded from their prompt directly.
    """
    unique = sorted({c for p in plans for c in (p.components or (p.prompt,))})
    table = encode(unique)
    index = {prompt: i for i, prompt in enumerate(unique)}
    rows = []
    for plan in plans:
        if not plan.components:
            rows.append(table[index[plan.prompt]])
            continue
        mixed = sum(w * table[index[c]] for w, c in zip(plan.weights, plan.components))
        rows.append(mixed)
    import torch

    return torch.stack(rows)
