import numpy as np
import pytest
import torch

from edgeq import Observer, quant


def test_rounding_is_half_to_even_like_onnx():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    assert quant.quantize(x, torch.tensor(1.0), 0, -8, 7).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


def test_quantize_saturates_and_dequantize_inverts_on_grid():
    scale, zero_point = torch.tensor(0.25), 3
    codes = torch.arange(0, 16, dtype=torch.float32)
    values = quant.dequantize(codes, scale, zero_point)
    assert torch.equal(quant.quantize(values, scale, zero_point, 0, 15), codes)
    assert quant.quantize(torch.tensor([100.0, -100.0]), scale, zero_point, 0, 15).tolist() == [15.0, 0.0]


def test_fake_quant_error_is_at_most_half_a_step_inside_the_range():
    torch.manual_seed(0)
    scale, zero_point = 0.1, 8
    x = (torch.rand(10000) * 15 - zero_point) * scale
    error = (quant.fake_quantize(x, scale, zero_point, 0, 15) - x).abs() / scale
    assert error.max() <= 0.5 + 1e-5


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_scales_mse_beats_minmax(bits):
    torch.manual_seed(bits)
    weight = torch.randn(16, 3, 3, 3)
    weight[0, 0, 0, 0] = 8.0  # an outlier: MSE should clip it
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def error(scale):
        return (
            (quant.fake_quantize(weight, quant.channel_view(scale, weight), 0, qmin, qmax) - weight).pow(2).sum().item()
        )

    mse, minmax = quant.weight_scales(weight, bits, Observer.MSE), quant.weight_scales(weight, bits, Observer.MINMAX)
    assert mse.shape == (16,) and (mse > 0).all()
    assert error(mse) <= error(minmax) + 1e-6
    if bits <= 4:
        assert error(mse) < 0.9 * error(minmax)


def test_zero_channel_gets_positive_scale():
    weight = torch.zeros(2, 4)
    weight[1] = 1.0
    assert (quant.weight_scales(weight, 4, Observer.MSE) > 0).all()


@pytest.mark.parametrize("observer", [Observer.MSE, Observer.MINMAX])
def test_activation_qparams_keep_zero_exact(observer):
    samples = torch.relu(torch.randn(5000)) * 3 - 0.7
    scale, zero_point = quant.activation_qparams(samples, samples.min(), samples.max(), 4, observer)
    assert 0 <= zero_point <= 15 and isinstance(zero_point, int)
    assert quant.fake_quantize(torch.tensor(0.0), scale, zero_point, 0, 15).item() == 0.0


def test_activation_minmax_covers_the_range():
    samples = torch.linspace(-1, 3, 101)
    scale, zero_point = quant.activation_qparams(samples, -1, 3, 8, Observer.MINMAX)
    np.testing.assert_allclose(scale, 4 / 255, rtol=1e-6)
    assert (quant.fake_quantize(samples, scale, zero_point, 0, 255) - samples).abs().max() <= scale / 2 + 1e-6


def test_asymmetric_weights_use_every_level_on_lopsided_channels():
    weight = (
        torch.rand(16, 32, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 2.0, 16)[:, None]
    )  # all positive
    qmin, qmax = -2, 1
    errors = {}
    for symmetric in (True, False):
        scale, zero_point = quant.weight_qparams(weight, 2, Observer.MSE, symmetric)
        assert ((zero_point >= qmin) & (zero_point <= qmax)).all() and torch.equal(zero_point, torch.round(zero_point))
        fake = quant.fake_quantize(weight, scale[:, None], zero_point[:, None], qmin, qmax)
        errors[symmetric] = (fake - weight).pow(2).sum().item()
        if symmetric:
            assert torch.all(zero_point == 0)
    assert errors[False] < 0.5 * errors[True]  # measured: about 0.2x
