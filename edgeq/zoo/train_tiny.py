"""Train the built-in tiny model: ``python -m edgeq.zoo.train_tiny [--epochs N] [--out FILE]``.

Recipe: TinyResNet(width 16) on Fashion-MNIST split A (30k images), inputs scaled to
[-1, 1], SGD with momentum 0.9 and Nesterov, lr 0.1 with one-cycle cosine schedule,
weight decay 5e-4, batch 128, random horizontal flips, seed 0.
"""

from __future__ import annotations

import argparse
import logging
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

from ..data import FASHION_MNIST_CLASSES, Preprocess, load_fashion_mnist
from ..models import save_checkpoint
from . import BUILTIN_MODELS, TinyResNet

log = logging.getLogger(__name__)
PREPROCESS = Preprocess(1, 28, 28, (0.5,), (0.5,))


def evaluate(model, images, labels, batch_size=500) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(torch.from_numpy(PREPROCESS(images[start : start + batch_size])))
            correct += (logits.argmax(1).numpy() == labels[start : start + batch_size]).sum()
    return correct / len(images)


def train(epochs: int, seed: int = 0) -> tuple[TinyResNet, float]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_set, test_set = load_fashion_mnist("A"), load_fashion_mnist("test")
    inputs = torch.from_numpy(PREPROCESS(train_set.images))
    labels = torch.from_numpy(train_set.labels)
    model = TinyResNet()
    steps_per_epoch = len(inputs) // 128
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(inputs)))
        for step in range(steps_per_epoch):
            pick = order[step * 128 : (step + 1) * 128]
            x = inputs[pick]
            flip = torch.from_numpy(rng.random(len(pick)) < 0.5)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            loss = F.cross_entropy(model(x), labels[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        accuracy = evaluate(model, test_set.images, test_set.labels)
        log.info("epoch %d: loss %.3f, test top-1 %.4f", epoch + 1, loss.item(), accuracy)
    return model, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", default=None, help="output .safetensors (default: the packaged weights file)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, accuracy = train(args.epochs)
    out = args.out or str(resources.files("edgeq.zoo").joinpath(BUILTIN_MODELS["tiny-fmnist"]))
    save_checkpoint(out, model.eval(), "edgeq.tiny_resnet", FASHION_MNIST_CLASSES, PREPROCESS)
    print(f"wrote {out}: test top-1 {accuracy:.4f}")


if __name__ == "__main__":
    main()
