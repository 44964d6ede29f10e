"""Modules that expose a model's operations to quantization: timm's ViT attention gets MatMul modules for its
two products without changing what the float model computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeq.errors import EdgeqError
from edgeq.layers import MatMul, expose_timm_attention
from edgeq.quantized import QuantizedMatMul, quantize_module


def _timm_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10
    ).eval()


def test_exposed_timm_attention_computes_what_timm_does():
    model = _timm_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        names = [name for name, _ in model.named_parameters()]
        assert expose_timm_attention(model) == 2
        after = model(x)
    assert [name for name, _ in model.named_parameters()] == names  # layer names (and --layer-bits) unchanged
    assert sum(isinstance(m, MatMul) for m in model.modules()) == 4
    assert torch.allclose(before, after, atol=1e-5)  # fused attention against timm's unfused form
    assert expose_timm_attention(model) == 0  # already exposed


def test_timm_attention_products_are_quantized_at_attention_bits():
    model = _timm_vit()
    calibration = np.random.default_rng(0).normal(0, 1, (4, 3, 32, 32)).astype(np.float32)
    quantized = quantize_module(model, calibration, "w4a4")
    matmuls = [m for m in quantized.modules() if isinstance(m, QuantizedMatMul)]
    assert len(matmuls) == 4 and {m.act_bits for m in matmuls} == {8}
    assert all(m.act_scale.min() > 0 and m.act_scale.max() < 1 for m in matmuls)  # calibrated, not the 1.0 default
    assert not any(isinstance(m, MatMul) and not isinstance(m, QuantizedMatMul) for m in model.modules())


def test_masked_timm_attention_is_refused_in_one_line():
    model = _timm_vit()
    expose_timm_attention(model)
    attention = model.blocks[0].attn
    with pytest.raises(EdgeqError, match="mask"):
        attention(torch.randn(1, 17, 192), attn_mask=torch.zeros(17, 17))
