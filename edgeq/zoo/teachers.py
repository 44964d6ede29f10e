"""The zoo's Fashion-MNIST teachers: a ResNet-style CNN, a MobileNetV2-style CNN and a small ViT.

All take (N, 1, 28, 28) inputs scaled to [-1, 1] and are traceable by torch.fx and
exportable by torch.export, so BatchNorm folding and QDQ export work on them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import MatMul


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm, and a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class FmnistResNet(nn.Module):
    """ResNet-style: 3x3 stem, then stages of basic blocks at 28, 14 and 7 pixels."""

    def __init__(self, widths=(16, 32, 64), blocks=(2, 2, 2), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for index in range(count):
                layers.append(BasicBlock(cin, width, stride=2 if stage > 0 and index == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_residual else out


class FmnistMobileNetV2(nn.Module):
    """MobileNetV2-style: a stride-2 stem, then depthwise-separable inverted residuals at 14 and 7 pixels.

    STAGES lists (expansion, width, count, stride) per stage.
    """

    STAGES = ((1, 16, 1, 1), (4, 24, 2, 1), (4, 48, 3, 2), (4, 64, 2, 1))

    def __init__(self, num_classes: int = 10, head: int = 192):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        layers, cin = [], 16
        for expansion, width, count, stride in self.STAGES:
            for index in range(count):
                layers.append(InvertedResidual(cin, width, stride if index == 0 else 1, expansion))
                cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Conv2d(cin, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.head(self.features(self.stem(x)))), 1))


class Attention(nn.Module):
    """Multi-head self-attention with separate Q/K/V linears and an output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.scores, self.context = MatMul(), MatMul()  # modules, so that their inputs can be quantized

    def _split(self, x, batch, tokens):
        return x.reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = (self._split(f(x), batch, tokens) for f in (self.q, self.k, self.v))
        weights = torch.softmax(self.scores(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim)), dim=-1)
        return self.proj(self.context(weights, v).transpose(1, 2).reshape(batch, tokens, dim))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: LayerNorm -> attention -> residual, LayerNorm -> GELU MLP -> residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class FmnistViT(nn.Module):
    """A small ViT: 4x4 patches (49 tokens) plus a class token, pre-norm encoder blocks, linear head."""

    def __init__(
        self,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
        patch: int = 4,
        image: int = 28,
    ):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, patch, patch)
        tokens = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])
