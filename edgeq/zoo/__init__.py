"""Architectures edgeq knows by name, and the models it ships.

A checkpoint names its architecture (``{"arch": "edgeq.tiny_resnet", "arch_kwargs": {...},
"state_dict": ...}``), so it loads with ``torch.load(weights_only=True)``: no code runs
from the file. Torchvision and timm architectures are known as ``torchvision:NAME`` and
``timm:NAME``.
"""
from __future__ import annotations

from importlib import resources

import torch
from torch import nn

from ..errors import EdgeqError, one_of


class TinyResNet(nn.Module):
    """A small residual CNN: the built-in default model until the trained zoo ships.

    stem 3x3 -> one basic residual block -> two stride-2 3x3 convs -> global pool -> linear.
    Small enough to compile and emulate in seconds, yet it has every pattern the
    pipeline must handle: conv+BN+ReLU, a residual add, strided convs and a classifier.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()

        def conv_bn(cin, cout, stride=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))

        self.stem = conv_bn(in_channels, width)
        self.block_conv1 = conv_bn(width, width)
        self.block_conv2 = conv_bn(width, width)
        self.down1 = conv_bn(width, 2 * width, stride=2)
        self.down2 = conv_bn(2 * width, 4 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.block_conv2(torch.relu(self.block_conv1(x))))
        x = torch.relu(self.down1(x))
        x = torch.relu(self.down2(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


ARCHITECTURES = {"edgeq.tiny_resnet": TinyResNet}

# name -> weights file in this package (safetensors, metadata in its header)
BUILTIN_MODELS = {"tiny-fmnist": "tiny_fmnist.safetensors"}
DEFAULT_MODEL = "tiny-fmnist"
DEFAULT_MODEL_NOTE = (
    "built-in default: edgeq's tiny residual CNN trained on Fashion-MNIST split A "
    "(a small placeholder until the trained model zoo ships)"
)


def build_architecture(arch: str, arch_kwargs: dict | None = None) -> nn.Module:
    """Instantiate a known architecture with random weights."""
    kwargs = dict(arch_kwargs or {})
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch](**kwargs)
    family, _, name = arch.partition(":")
    if family == "torchvision" and name:
        import torchvision

        try:
            return torchvision.models.get_model(name, weights=None, **kwargs)
        except ValueError:
            raise one_of("torchvision architecture", name, torchvision.models.list_models()) from None
    if family == "timm" and name:
        import timm

        if not timm.is_model(name):
            raise EdgeqError(f"unknown timm architecture '{name}'", "see timm.list_models() for the valid names")
        return timm.create_model(name, pretrained=False, **kwargs)
    raise one_of("architecture", arch, list(ARCHITECTURES) + ["torchvision:NAME", "timm:NAME"])


def builtin_weights_path(name: str):
    if name not in BUILTIN_MODELS:
        raise one_of("built-in model", name, BUILTIN_MODELS)
    return resources.files(__name__).joinpath(BUILTIN_MODELS[name])
