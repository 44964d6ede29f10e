"""What one quantized layer learns during reconstruction, and how it is written back."""

from __future__ import annotations

import torch

from .. import quant
from .activation import LearnedActivation, drop_quantization
from .rounding import AdaRound


class LayerLearning:
    """Attached to a QuantizedLayer (``layer.learning``) while its unit is reconstructed.

    ``rounding``: AdaRound over the layer's weight at its fixed per-channel scales (None keeps
    round-to-nearest). ``activation``: the input quantizer, its step trainable when
    ``learn_act``. ``drop_prob``: QDrop's probability of skipping input quantization.
    """

    def __init__(
        self, layer, *, learn_rounding: bool, learn_act: bool, drop_prob: float, generator: torch.Generator | None
    ):
        # GPTQ's moved weights, when it rounded the layer first: AdaRound then starts at its codes
        start = getattr(layer, "rounding_start", None)
        weight = layer.layer.weight.detach() if start is None else start
        self.rounding = (
            AdaRound(
                weight,
                quant.channel_view(layer.weight_scale, weight),
                *layer.weight_range,
                zero_point=layer.channel_zero_point(),
            )
            if learn_rounding
            else None
        )
        self.activation = LearnedActivation(
            layer.act_scale.item(), int(layer.act_zero_point.item()), layer.act_range[1], learn_scale=learn_act
        )
        self.drop_prob = drop_prob
        self.generator = generator
        self.active = True  # False: hard rounding and no dropping (evaluating the unit as it would be finalized)

    def rounding_parameters(self) -> list[torch.Tensor]:
        return [self.rounding.v] if self.rounding is not None else []

    def step_parameters(self) -> list[torch.Tensor]:
        return [self.activation.scale] if self.activation.scale.requires_grad else []

    def weight(self, layer) -> torch.Tensor:
        if self.rounding is None:
            return layer.dequantized_weight()
        if self.active:
            return self.rounding.soft_weight()
        return self.rounding.hard_weight()

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        quantized = self.activation(x)
        return drop_quantization(x, quantized, self.drop_prob, self.generator) if self.active else quantized

    def to(self, device) -> LayerLearning:
        if self.rounding is not None:
            self.rounding.to(device)
        self.activation.to(device)
        return self

    @torch.no_grad()
    def write_back(self, layer) -> None:
        """Store the hard rounding as the layer's integer codes and the learned step as its scale."""
        if self.rounding is not None:
            layer.weight_int.copy_(self.rounding.hard_codes().to(torch.int8))
        layer.act_scale.fill_(float(self.activation.scale.detach().abs().clamp_min(1e-8)))


class MatMulLearning:
    """Attached to a QuantizedMatMul inside a block being reconstructed: its two operand
    quantizers, steps trainable when ``learn_act``, with QDrop's dropping."""

    def __init__(self, matmul, *, learn_act: bool, drop_prob: float, generator: torch.Generator | None):
        qmax = matmul.act_range[1]
        self.operands = [
            LearnedActivation(
                matmul.act_scale[i].item(), int(matmul.act_zero_point[i].item()), qmax, learn_scale=learn_act
            )
            for i in (0, 1)
        ]
        self.drop_prob = drop_prob
        self.generator = generator
        self.active = True

    def rounding_parameters(self) -> list[torch.Tensor]:
        return []

    def step_parameters(self) -> list[torch.Tensor]:
        return [q.scale for q in self.operands if q.scale.requires_grad]

    def quantize_operands(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for x, quantizer in zip((a, b), self.operands):
            quantized = quantizer(x)
            out.append(drop_quantization(x, quantized, self.drop_prob, self.generator) if self.active else quantized)
        return out[0], out[1]

    def to(self, device) -> MatMulLearning:
        for quantizer in self.operands:
            quantizer.to(device)
        return self

    @torch.no_grad()
    def write_back(self, matmul) -> None:
        for index, quantizer in enumerate(self.operands):
            matmul.act_scale[index] = float(quantizer.scale.detach().abs().clamp_min(1e-8))
