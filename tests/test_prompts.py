"""Prompt strategies: balance, distinct classes, soft labels, embedding mixing, determinism."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from edgeq import EdgeqError
from edgeq.prompts import (
    ADJECTIVES,
    SINGLE_TEMPLATES,
    Fusion,
    PromptOptions,
    PromptPlan,
    mixed_embeddings,
    plan_prompts,
)

CLASSES = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def test_single_class_prompts_are_balanced_over_templates_and_adjectives():
    plans = plan_prompts(CLASSES, 95, "single", seed=0)
    counts = Counter(p.classes[0] for p in plans)
    assert set(counts) == set(range(10)) and max(counts.values()) - min(counts.values()) <= 1
    possible = {t.format(a + CLASSES[c]) for c in range(10) for t in SINGLE_TEMPLATES for a in ADJECTIVES}
    assert all(p.prompt in possible and CLASSES[p.classes[0]] in p.prompt for p in plans)
    assert len({p.prompt.split(CLASSES[p.classes[0]])[0] for p in plans}) > 5  # templates and adjectives vary
    assert all(p.weights == (1.0,) and not p.components for p in plans)


@pytest.mark.parametrize("k", [2, 3])
def test_text_mixup_classes_are_distinct_balanced_and_soft(k):
    plans = plan_prompts(CLASSES, 101, "mixup", seed=1, options=PromptOptions(mix_k=k))
    assert all(len(set(p.classes)) == k for p in plans)
    counts = Counter(c for p in plans for c in p.classes)
    assert max(counts.values()) - min(counts.values()) <= 1
    names = [CLASSES[c] for c in plans[0].classes]
    expected = (
        f"a photo of a {names[0]} and a {names[1]}"
        if k == 2
        else f"a photo of a {names[0]}, a {names[1]} and a {names[2]}"
    )
    assert plans[0].prompt == expected
    assert all(sum(p.weights) == pytest.approx(1.0) and len(p.weights) == k for p in plans)


def test_custom_mix_template_and_its_validation():
    plans = plan_prompts(CLASSES, 5, "mixup", seed=0, options=PromptOptions(mix_template="a {1} beside a {0}"))
    a, b = plans[0].classes
    assert plans[0].prompt == f"a {CLASSES[b]} beside a {CLASSES[a]}"
    with pytest.raises(EdgeqError, match=r"lacks \{2\}"):
        PromptOptions(mix_k=3, mix_template="a {0} and a {1}")


def test_embedding_mixup_draws_beta_weights_over_single_class_components():
    plans = plan_prompts(CLASSES, 2000, "mixup", seed=3, options=PromptOptions(fusion="embedding", mix_alpha=0.5))
    weights = np.array([p.weights[0] for p in plans])
    assert all(p.components == tuple(f"a photo of a {CLASSES[c]}" for c in p.classes) for p in plans)
    assert all(sum(p.weights) == pytest.approx(1.0) for p in plans)
    # Beta(0.5, 0.5): mean 1/2, variance 1/8, and U-shaped (more mass near 0 and 1 than in the middle fifth).
    assert weights.mean() == pytest.approx(0.5, abs=0.03) and weights.var() == pytest.approx(0.125, abs=0.01)
    assert ((weights < 0.1) | (weights > 0.9)).mean() > ((weights > 0.4) & (weights < 0.6)).mean()


def test_mixed_embeddings_are_the_weighted_sum_of_component_embeddings():
    table = {
        "a photo of a bag": torch.full((4, 3), 2.0),
        "a photo of a coat": torch.arange(12.0).reshape(4, 3),
        "plain": torch.ones(4, 3),
    }
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return torch.stack([table[t] for t in texts])

    plans = [
        PromptPlan("mix", (8, 4), (0.25, 0.75), 0, ("a photo of a bag", "a photo of a coat")),
        PromptPlan("plain", (1,), (1.0,), 0),
    ]
    out = mixed_embeddings(encode, plans)
    assert torch.equal(out[0], 0.25 * table["a photo of a bag"] + 0.75 * table["a photo of a coat"])
    assert torch.equal(out[1], table["plain"])
    assert len(calls) == 1 and len(calls[0]) == 3  # each distinct prompt encoded once per batch


def test_plans_are_deterministic_per_seed():
    options = PromptOptions(fusion=Fusion.EMBEDDING)
    assert plan_prompts(CLASSES, 40, "mixup", seed=7, options=options) == plan_prompts(
        CLASSES, 40, "mixup", seed=7, options=options
    )
    assert plan_prompts(CLASSES, 40, "mixup", seed=7) != plan_prompts(CLASSES, 40, "mixup", seed=8)
    assert len({p.seed for p in plan_prompts(CLASSES, 40, "single", seed=7)}) == 40


def test_options_round_trip_through_json():
    options = PromptOptions(fusion="embedding", mix_k=3, mix_alpha=0.4)
    assert options.fusion is Fusion.EMBEDDING
    assert PromptOptions(**json.loads(json.dumps(options.to_json()))) == options


def test_unknown_names_and_impossible_mixes():
    with pytest.raises(EdgeqError, match="prompt strategy"):
        plan_prompts(CLASSES, 4, "triple", seed=0)
    with pytest.raises(EdgeqError, match="fusion"):
        PromptOptions(fusion="latent")
    with pytest.raises(EdgeqError, match="at least 2 classes"):
        plan_prompts(["cat"], 4, "mixup", seed=0)
    with pytest.raises(EdgeqError, match="mix-k"):
        PromptOptions(mix_k=1)
