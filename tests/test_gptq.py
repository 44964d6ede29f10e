"""GPTQ rounding against a plain reference and against round-to-nearest."""

import numpy as np
import pytest
import torch
from torch import nn

from edgeq import quantized
from edgeq.reconstruction import ReconstructionConfig, Rounding
from edgeq.reconstruction.gptq import DAMPENING, round_columns
from edgeq.reconstruction.layer import LayerLearning


def _problem(groups=1, rows=6, features=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(groups, rows, features, generator=generator, dtype=torch.float64)
    # correlated inputs, as neighbouring pixels and channels are: that is where feeding errors forward pays
    mixing = torch.randn(groups, features, features, generator=generator, dtype=torch.float64)
    x = mixing @ torch.randn(groups, features, 200, generator=generator, dtype=torch.float64)
    hessian = x @ x.transpose(1, 2)
    scale = weight.abs().amax(2) / 1.5
    return weight, hessian, scale, torch.zeros_like(scale)


def _reference(weight, hessian, scale, qmin, qmax):
    """Optimal Brain Quantizer one column at a time, in NumPy, by Gaussian elimination of the inverse
    Hessian (no Cholesky), columns in order of decreasing Hessian diagonal, as GPTQ orders them."""
    weight, hessian, scale = (np.array(t, dtype=np.float64) for t in (weight, hessian, scale))
    features = weight.shape[1]
    order = np.argsort(-np.diag(hessian), kind="stable")
    weight, hessian = weight[:, order], hessian[np.ix_(order, order)]
    hessian = hessian + DAMPENING * np.mean(np.diag(hessian)) * np.eye(features)
    inverse = np.linalg.inv(hessian)
    codes = np.zeros_like(weight)
    for i in range(features):
        codes[:, i] = np.clip(np.round(weight[:, i] / scale), qmin, qmax)
        error = (weight[:, i] - codes[:, i] * scale) / inverse[i, i]
        weight[:, i + 1 :] -= np.outer(error, inverse[i, i + 1 :])
        inverse = inverse - np.outer(inverse[:, i], inverse[i, :]) / inverse[i, i]
    restored = np.empty_like(codes)
    restored[:, order] = codes
    return restored


def _output_error(codes, weight, hessian, scale):
    delta = codes * scale[..., None] - weight
    return float(torch.einsum("grd,gde,gre->", delta, hessian, delta))


def test_gptq_codes_equal_the_one_column_at_a_time_reference():
    weight, hessian, scale, zero = _problem()
    codes, moved = round_columns(weight, hessian, scale, zero, -2, 1)
    expected = _reference(weight[0], hessian[0], scale[0], -2, 1)
    assert np.array_equal(codes[0].numpy(), expected)
    # each column was rounded to nearest as it stood when its turn came
    assert torch.equal(codes, torch.clamp(torch.round(moved / scale[..., None]), -2, 1))


def test_gptq_lowers_the_output_error_of_nearest_and_keeps_the_range():
    weight, hessian, scale, zero = _problem(rows=32, features=27, seed=3)
    codes, _ = round_columns(weight, hessian, scale, zero, -2, 1)
    nearest = torch.clamp(torch.round(weight / scale[..., None]), -2, 1)
    assert codes.min() >= -2 and codes.max() <= 1
    assert _output_error(codes, weight, hessian, scale) < 0.8 * _output_error(nearest, weight, hessian, scale)


def test_uncorrelated_inputs_leave_nothing_to_feed_forward():
    weight, _, scale, zero = _problem(rows=8, features=10, seed=1)
    diagonal = torch.diag_embed(torch.rand(1, 10, dtype=torch.float64) + 0.5)
    codes, _ = round_columns(weight, diagonal, scale, zero, -2, 1)
    assert torch.equal(codes, torch.clamp(torch.round(weight / scale[..., None]), -2, 1))


def test_groups_are_solved_each_on_its_own():
    weight, hessian, scale, zero = _problem(groups=3, rows=2, features=9, seed=2)
    together, _ = round_columns(weight, hessian, scale, zero, -8, 7)
    for g in range(3):
        alone, _ = round_columns(weight[g : g + 1], hessian[g : g + 1], scale[g : g + 1], zero[g : g + 1], -8, 7)
        assert torch.equal(together[g], alone[0])


def test_an_input_that_is_always_zero_does_not_break_the_solve():
    weight, hessian, scale, zero = _problem(features=6, seed=4)
    hessian[:, 2, :] = 0
    hessian[:, :, 2] = 0
    codes, _ = round_columns(weight, hessian, scale, zero, -2, 1)
    assert torch.isfinite(codes).all()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise: one 9x9 Hessian per channel
        nn.ReLU(),
        nn.Conv2d(16, 24, 1),
        nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(24 * 8 * 8, 10),
    )


def _images(count=64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(count, 3, 10, 10, generator=generator), 3, 1)
    return smooth.numpy()  # neighbouring pixels correlate, as in images


@torch.no_grad()
def _logit_error(model, quantized_model, inputs) -> float:
    x = torch.from_numpy(inputs)
    return float((quantized_model(x) - model(x)).pow(2).mean())


def test_gptq_in_a_model_lowers_the_output_error_and_reconstruction_starts_from_it():
    model, inputs = _model(), _images()
    rtn = quantized.quantize_module(model, inputs, "w2a8")
    config = ReconstructionConfig(method="rtn", initial_rounding="gptq")
    gptq = quantized.quantize_module(model, inputs, "w2a8", reconstruction=config)
    error_rtn, error_gptq = (_logit_error(model, q, inputs) for q in (rtn, gptq))
    assert error_gptq < 0.3 * error_rtn  # measured: about 0.05x (these inputs correlate strongly)
    changed = [
        name
        for name in ("2", "4", "6")
        if not torch.equal(rtn.get_submodule(name).weight_int, gptq.get_submodule(name).weight_int)
    ]
    assert changed == ["2", "4", "6"]  # the middle layers (the first and last keep 8 bits) all moved
    for name in ("0", "2", "4", "6", "9"):
        assert gptq.get_submodule(name).rounding_start is None  # nothing of it stays behind

    # AdaRound begins with its hard codes at GPTQ's
    layers = {n: m for n, m in gptq.named_modules() if isinstance(m, quantized.QuantizedLayer)}
    layer = layers["4"]
    layer.rounding_start = layer.dequantized_weight()
    learning = LayerLearning(layer, learn_rounding=True, learn_act=False, drop_prob=0.0, generator=None)
    assert torch.equal(learning.rounding.hard_codes(), layer.weight_int.float())
    layer.rounding_start = None


def test_gptq_then_reconstruction_is_deterministic_and_recorded():
    model = _model()
    inputs = _images(32)
    config = ReconstructionConfig(method="qdrop", iters=20, initial_rounding=Rounding.GPTQ)
    first = quantized.quantize_module(model, inputs, "w2a4", reconstruction=config)
    second = quantized.quantize_module(model, inputs, "w2a4", reconstruction=config)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert config.to_json()["initial_rounding"] == "gptq"
    assert "initial_rounding" not in ReconstructionConfig().to_json()
    with pytest.raises(Exception, match="nearest, gptq|gptq"):
        ReconstructionConfig(initial_rounding="optimal")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("padding", ["same", "valid", 1])
def test_the_input_columns_are_the_convolutions_own(padding):
    """H is built from im2col columns: the convolution is the weight times them, whatever the padding."""
    from edgeq.reconstruction.gptq import _input_columns

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 2), padding=padding, groups=2)
    layer = quantized.QuantizedLayer(conv, 4, 8)
    x = torch.randn(2, 4, 7, 6)
    columns = _input_columns(layer, x)  # (groups, features, batch * positions)
    weight = conv.weight.detach().reshape(2, 3, -1)
    out = (weight @ columns).reshape(2, 3, 2, -1).permute(2, 0, 1, 3).reshape(2, 6, -1)
    expected = torch.nn.functional.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, 2)
    assert torch.allclose(out, expected.flatten(2), atol=1e-5)
