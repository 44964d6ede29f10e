"""Accuracy of a model (full precision, or a quantize folder's fake-quant model) on a data source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import resolve_dataset
from .manifest import MANIFEST_NAME, Manifest
from .models import load_model

BATCH = 256


@torch.no_grad()
def predict(module: torch.nn.Module, inputs: np.ndarray, desc: str | None = None) -> np.ndarray:
    """Logits for every input, BATCH at a time; with ``desc``, a progress bar over the images (a fake-quant
    EfficientNet takes minutes for a thousand)."""
    outputs = []
    with tqdm(total=len(inputs), desc=desc, unit="img", leave=False, disable=desc is None) as bar:
        for start in range(0, len(inputs), BATCH):
            outputs.append(module(torch.from_numpy(inputs[start : start + BATCH])))
            bar.update(len(outputs[-1]))
    return torch.cat(outputs).numpy()


def topk_accuracy(logits: np.ndarray, targets: np.ndarray, k: int) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return float((top == targets[:, None]).any(1).mean())


def agreement(logits: np.ndarray, reference_logits: np.ndarray) -> dict:
    """Top-1 agreement (same argmax) and top-5 agreement (the reference's top-1 within the top 5)."""
    reference = reference_logits.argmax(1)
    return {
        "top1": float((logits.argmax(1) == reference).mean()),
        "top5": topk_accuracy(logits, reference, min(5, logits.shape[1])),
    }


def evaluate(
    model: str | None,
    data: str,
    *,
    num_images: int | None = None,
    allow_pickle: bool = False,
    preprocess=None,
    classes_file=None,
) -> dict:
    """``{"top1", "top5"}`` on labelled data (null without labels, or labels for other classes than the model's);
    for a quantize folder also agreement with its float model. ``preprocess`` and ``classes_file``: command-line
    overrides for a model (a quantize folder keeps what it recorded)."""
    is_quantized = (
        model is not None and (Path(model) / MANIFEST_NAME).is_file() and Manifest.load(model).stage == "quantize"
    )
    if is_quantized:
        from .quantized import load as load_quantized
        from .quantized import load_recorded_model

        module, loaded, spec, manifest = load_quantized(model, allow_pickle=allow_pickle)
    else:
        loaded = load_model(model, allow_pickle=allow_pickle, preprocess=preprocess, classes_file=classes_file)
        module, spec = loaded.module, None
    images = resolve_dataset(data, num_images, preprocess=loaded.preprocess, classes=loaded.classes)
    logits = predict(module, loaded.preprocess(images.images), desc="evaluating")
    result = {
        "model": loaded.source if not is_quantized else str(model),
        "bits": str(spec) if spec else "fp32",
        "data": data,
        "images": len(images),
        "labels": images.label_kind,
    }
    targets = images.targets
    result["top1"] = topk_accuracy(logits, targets, 1) if targets is not None else None
    result["top5"] = topk_accuracy(logits, targets, min(5, logits.shape[1])) if targets is not None else None
    if is_quantized:
        float_module = load_recorded_model(manifest, allow_pickle=allow_pickle, preprocess=loaded.preprocess).module
        float_logits = predict(float_module, loaded.preprocess(images.images), desc="full precision")
        result["agreement_with_fp"] = agreement(logits, float_logits)
    return result
