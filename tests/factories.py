"""Model factories for tests, loaded as ``tests.factories:NAME``. Seeded: a factory must give the same model every
call."""

import torch

FMNIST_META = {
    "classes": [f"class {i}" for i in range(10)],
    "preprocess": {"channels": 1, "height": 28, "width": 28, "mean": [0.5], "std": [0.5]},
}


def tiny_vit():
    """A two-block timm ViT on 28x28 grayscale (random weights): Q/K/V and MLP linears on 3-D tensors."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=28,
        patch_size=7,
        in_chans=1,
        num_classes=10,
        depth=2,
        embed_dim=64,
        num_heads=2,
    )
    return model, FMNIST_META


def tiny_zoo_vit():
    """The zoo's ViT architecture at a toy size (random weights): attention matmuls as MatMul modules."""
    from edgeq.zoo.teachers import FmnistViT

    torch.manual_seed(0)
    return FmnistViT(dim=16, depth=1, heads=2, mlp_ratio=2), FMNIST_META


def chatty_tiny():
    """The built-in tiny model's architecture (random weights) that prints to stdout while it is built, as some model
    packages do when they load weights."""
    from edgeq.zoo import TinyResNet

    torch.manual_seed(0)
    print("Loaded pretrained weights for chatty_tiny")
    return TinyResNet(), FMNIST_META


def tiny_cifar():
    """A 3-channel, 10-class convolutional model without metadata (random weights): its preprocessing is guessed."""
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def fixed_size_rgb():
    """A 3-channel model that runs at 64x64 only (a flatten before its classifier), without metadata."""
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(4 * 32 * 32, 7))
