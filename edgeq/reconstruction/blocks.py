"""Which parts of a model are reconstructed together.

A *unit* is a module whose output is matched to the full-precision model's: a block
(BRECQ, QDrop) or a single layer (AdaRound, and any layer outside a block). Blocks are
found by module type (``register_block``: ResNet basic and bottleneck blocks, MobileNetV2
inverted residuals, ViT encoder blocks of the zoo, torchvision and timm), with a
structural fallback for unregistered models: a module held by a Sequential or ModuleList
(a stage of repeated blocks) that contains two or more quantized layers.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging

from torch import nn

log = logging.getLogger(__name__)

_BLOCK_TYPES: list[type] = []
# (module, class) of well-known blocks, registered when their library is installed.
_KNOWN_BLOCKS = (
    ("edgeq.zoo.teachers", "BasicBlock"),
    ("edgeq.zoo.teachers", "InvertedResidual"),
    ("edgeq.zoo.teachers", "EncoderBlock"),
    ("torchvision.models.resnet", "BasicBlock"),
    ("torchvision.models.resnet", "Bottleneck"),
    ("torchvision.models.mobilenetv2", "InvertedResidual"),
    ("timm.models.vision_transformer", "Block"),
    ("timm.models.efficientnet_blocks", "InvertedResidual"),
    ("timm.models.efficientnet_blocks", "DepthwiseSeparableConv"),
)
_loaded_known = False


def register_block(cls: type) -> type:
    """Mark a module class as one reconstruction block (usable as a decorator)."""
    if cls not in _BLOCK_TYPES:
        _BLOCK_TYPES.append(cls)
    return cls


def block_types() -> tuple[type, ...]:
    global _loaded_known
    if not _loaded_known:
        for module_name, class_name in _KNOWN_BLOCKS:
            try:
                register_block(getattr(importlib.import_module(module_name), class_name))
            except (ImportError, AttributeError):
                log.debug("block type %s.%s not available", module_name, class_name)
        _loaded_known = True
    return tuple(_BLOCK_TYPES)


@dataclasses.dataclass(frozen=True)
class Unit:
    name: str  # the module's path ("" never: the whole model is not a unit)
    layers: tuple[str, ...]  # the quantized layers inside, by path
    kind: str  # "block" or "layer"


def _quantized_inside(module: nn.Module, prefix: str, layer_names: set[str]) -> list[str]:
    return [
        f"{prefix}.{name}" if name else prefix
        for name, _ in module.named_modules()
        if (f"{prefix}.{name}" if name else prefix) in layer_names
    ]


def is_block(module: nn.Module, parent: nn.Module | None, quantized_count: int) -> bool:
    if isinstance(module, block_types()):
        return True
    containers = (nn.Sequential, nn.ModuleList)
    return (
        parent is not None
        and isinstance(parent, containers)
        and not isinstance(module, containers)
        and quantized_count >= 2
    )


def find_units(model: nn.Module, layer_names: list[str], *, blocks: bool) -> list[Unit]:
    """Units covering every quantized layer once: blocks (when ``blocks``), and single layers for the rest."""
    names = set(layer_names)
    units: list[Unit] = []
    covered: set[str] = set()
    if blocks:

        def visit(module: nn.Module, prefix: str, parent: nn.Module | None) -> None:
            for child_name, child in module.named_children():
                path = f"{prefix}.{child_name}" if prefix else child_name
                if path in names:
                    continue
                inside = _quantized_inside(child, path, names)
                if not inside:
                    continue
                if is_block(child, module, len(inside)):
                    units.append(Unit(path, tuple(inside), "block"))
                    covered.update(inside)
                else:
                    visit(child, path, module)

        visit(model, "", None)
    units.extend(Unit(name, (name,), "layer") for name in layer_names if name not in covered)
    return units
