from collections import Counter

import pytest

from edgeq import EdgeqError
from edgeq.stages.synth import plan_prompts

CLASSES = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def test_single_class_prompts_are_balanced():
    plans = plan_prompts(CLASSES, 95, "single", seed=0)
    counts = Counter(p.classes[0] for p in plans)
    assert set(counts) == set(range(10)) and max(counts.values()) - min(counts.values()) <= 1
    assert plans[0].prompt == f"a photo of a {CLASSES[plans[0].classes[0]]}"
    assert all(p.weights == (1.0,) for p in plans)


def test_mixup_pairs_are_distinct_balanced_and_soft():
    plans = plan_prompts(CLASSES, 101, "mixup", seed=1)
    assert all(len(set(p.classes)) == 2 for p in plans)
    counts = Counter(c for p in plans for c in p.classes)
    assert max(counts.values()) - min(counts.values()) <= 1
    a, b = plans[0].classes
    assert plans[0].prompt == f"a photo of a {CLASSES[a]} and a {CLASSES[b]}"
    assert all(sum(p.weights) == 1.0 for p in plans)


def test_plans_are_deterministic_per_seed():
    assert plan_prompts(CLASSES, 40, "mixup", seed=7) == plan_prompts(CLASSES, 40, "mixup", seed=7)
    assert plan_prompts(CLASSES, 40, "mixup", seed=7) != plan_prompts(CLASSES, 40, "mixup", seed=8)
    assert len({p.seed for p in plan_prompts(CLASSES, 40, "single", seed=7)}) == 40


def test_unknown_strategy_and_too_few_classes():
    with pytest.raises(EdgeqError, match="prompt strategy"):
        plan_prompts(CLASSES, 4, "triple", seed=0)
    with pytest.raises(EdgeqError, match="two classes"):
        plan_prompts(["cat"], 4, "mixup", seed=0)
