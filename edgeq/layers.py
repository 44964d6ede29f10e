"""Modules that make a model's operations visible to edgeq.

edgeq quantizes the inputs of modules it can see. Convolutions and linears are modules
already; a matrix product of two activations (attention's Q·Kᵀ and weights·V) is usually a
bare ``torch.matmul`` call. Writing it as a :class:`MatMul` module lets edgeq quantize
both of its inputs, as BRECQ/QDrop-style ViT quantization does; the numbers of the float
model do not change.
"""

from __future__ import annotations

import torch
from torch import nn


class MatMul(nn.Module):
    """``torch.matmul(a, b)`` as a module."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


_QUANTIZABLE_TIMM_ATTENTION: type | None = None


def _quantizable_timm_attention(base: type) -> type:
    """timm's ViT attention computing its two products through :class:`MatMul` modules (a subclass, so that
    the module keeps its children, parameters and names)."""

    class QuantizableTimmAttention(base):
        def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
            if attn_mask is not None or is_causal:
                from .errors import EdgeqError

                raise EdgeqError(
                    "timm attention with a mask or causal attention cannot have its products quantized",
                    "pass a ViT that attends without masks",
                )
            batch, tokens, _ = x.shape
            gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            # timm's unfused path, operation for operation: the scale on q, then the product
            weights = self.attn_drop(self.scores(q * self.scale, k.transpose(-2, -1)).softmax(dim=-1))
            x = self.context(weights, v).transpose(1, 2).reshape(batch, tokens, -1)
            x = getattr(self, "norm", nn.Identity())(x)
            if gate is not None:
                x = x * gate
            return self.proj_drop(self.proj(x))

    QuantizableTimmAttention.__qualname__ = QuantizableTimmAttention.__name__
    return QuantizableTimmAttention


def expose_timm_attention(model: nn.Module) -> int:
    """Give each timm ViT attention module (``timm.models.vision_transformer.Attention``, exactly that class:
    a subclass may compute otherwise) :class:`MatMul` modules for Q·Kᵀ and weights·V, in place, so that a spec's
    ``attention_bits`` quantizes them as it does edgeq's own ViT. timm's fused ``scaled_dot_product_attention``
    gives way to its unfused form, the same numbers to float rounding. Returns how many modules changed."""
    global _QUANTIZABLE_TIMM_ATTENTION
    try:
        from timm.models.vision_transformer import Attention
    except ImportError:  # timm absent or reorganized: nothing of its can be in the model
        return 0
    if _QUANTIZABLE_TIMM_ATTENTION is None:
        _QUANTIZABLE_TIMM_ATTENTION = _quantizable_timm_attention(Attention)
    count = 0
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = _QUANTIZABLE_TIMM_ATTENTION
            module.scores, module.context = MatMul(), MatMul()
            count += 1
    return count
