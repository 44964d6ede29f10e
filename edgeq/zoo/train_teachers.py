"""Train the zoo's Fashion-MNIST teachers on split A (30k images) with fixed seeds.

    python -m edgeq.zoo.train_teachers [resnet mobilenet vit] [--threads 1]

Recipes (inputs scaled to [-1, 1]; augmentation: random 2-pixel shifts with zero padding
and horizontal flips; batch 128; seed 0):

* resnet:    SGD, Nesterov momentum 0.9, weight decay 5e-4, one-cycle lr peak 0.1, 15 epochs
* mobilenet: SGD, Nesterov momentum 0.9, weight decay 4e-5, one-cycle lr peak 0.1, 12 epochs
* vit:       AdamW, weight decay 0.05, one-cycle lr peak 2e-3, label smoothing 0.1, 40 epochs

Weights are written to edgeq/zoo/ as safetensors with their metadata, and the measured
test top-1 to the zoo registry (edgeq/zoo/zoo.json).
"""

from __future__ import annotations

import argparse
import logging
import time
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

from ..data import FASHION_MNIST_CLASSES, Preprocess, load_fashion_mnist
from ..models import save_checkpoint
from . import registry

log = logging.getLogger(__name__)
PREPROCESS = Preprocess(1, 28, 28, (0.5,), (0.5,))
SEED = 0
RECIPES = {
    "fmnist-resnet": dict(
        arch="edgeq.fmnist_resnet", optimizer="sgd", lr=0.1, weight_decay=5e-4, epochs=15, smoothing=0.0
    ),
    "fmnist-mobilenet": dict(
        arch="edgeq.fmnist_mobilenetv2", optimizer="sgd", lr=0.1, weight_decay=4e-5, epochs=12, smoothing=0.0
    ),
    "fmnist-vit": dict(
        arch="edgeq.fmnist_vit", optimizer="adamw", lr=2e-3, weight_decay=0.05, epochs=40, smoothing=0.1
    ),
}


def evaluate(model, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(torch.from_numpy(PREPROCESS(images[start : start + batch_size])))
            correct += int((logits.argmax(1).numpy() == labels[start : start + batch_size]).sum())
    return correct / len(images)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    batch = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)  # background is black: -1 after scaling
    dx, dy = torch.randint(0, 5, (2, batch), generator=generator)
    rows = (torch.arange(28).view(1, 28) + dy.view(-1, 1)).view(batch, 1, 28, 1).expand(-1, 1, 28, 32)
    shifted = padded.gather(2, rows)
    cols = (torch.arange(28).view(1, 28) + dx.view(-1, 1)).view(batch, 1, 1, 28).expand(-1, 1, 28, 28)
    shifted = shifted.gather(3, cols)
    flip = torch.rand(batch, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), shifted.flip(3), shifted)


def train(name: str) -> tuple[torch.nn.Module, float]:
    from . import build_architecture

    recipe = RECIPES[name]
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    train_set, test_set = load_fashion_mnist("A"), load_fashion_mnist("test")
    inputs, labels = torch.from_numpy(PREPROCESS(train_set.images)), torch.from_numpy(train_set.labels)
    model = build_architecture(recipe["arch"])
    steps_per_epoch = len(inputs) // 128
    total = recipe["epochs"] * steps_per_epoch
    if recipe["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(
            model.parameters(), lr=recipe["lr"], momentum=0.9, nesterov=True, weight_decay=recipe["weight_decay"]
        )
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe["lr"], total_steps=total, pct_start=0.15)
    started = time.time()
    for epoch in range(recipe["epochs"]):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        for step in range(steps_per_epoch):
            pick = order[step * 128 : (step + 1) * 128]
            loss = F.cross_entropy(
                model(_augment(inputs[pick], generator)), labels[pick], label_smoothing=recipe["smoothing"]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        log.info(
            "%s epoch %d/%d loss %.3f (%.1f min)",
            name,
            epoch + 1,
            recipe["epochs"],
            loss.item(),
            (time.time() - started) / 60,
        )
    accuracy = evaluate(model, test_set.images, test_set.labels)
    log.info("%s test top-1 %.4f", name, accuracy)
    return model.eval(), accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "names", nargs="*", default=list(RECIPES), help=f"teachers to train (default: all): {', '.join(RECIPES)}"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    unknown = sorted(set(args.names) - set(RECIPES))
    if unknown:
        parser.error(f"unknown teacher {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    for name in args.names:
        model, accuracy = train(name)
        filename = f"{name}.safetensors"
        save_checkpoint(
            resources.files("edgeq.zoo").joinpath(filename),
            model,
            RECIPES[name]["arch"],
            FASHION_MNIST_CLASSES,
            PREPROCESS,
        )
        registry.record_training(
            name,
            filename,
            accuracy,
            script="python -m edgeq.zoo.train_teachers " + name,
            seed=SEED,
            data="fashion-mnist:A",
        )


if __name__ == "__main__":
    main()
