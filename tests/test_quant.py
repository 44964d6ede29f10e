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


def _layer_inputs(model, inputs: np.ndarray) -> dict:
    """What each quantized layer of ``model`` receives when it runs on ``inputs``."""
    from edgeq.quantized import QuantizedLayer

    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0]))
        for name, m in model.named_modules()
        if isinstance(m, QuantizedLayer)
    ]
    try:
        with torch.no_grad():
            model(torch.from_numpy(inputs))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _shift_left(corrected_layer, plain_layer, x) -> tuple[float, torch.Tensor]:
    """(what is left of the layer's mean output shift after its bias change, the shift its rounding made)."""
    from edgeq.quantized import layer_output_error

    moved = layer_output_error(corrected_layer, x)
    return (moved + corrected_layer.layer.bias - plain_layer.layer.bias).abs().max().item(), moved


def test_bias_correction_removes_each_layers_mean_rounding_error_and_helps():
    """Nagel et al.'s empirical bias correction on a small BatchNorm CNN at W2A8: every corrected
    layer's mean output shift (on the calibration images) goes to zero, and the quantized
    model's outputs on other images get closer to the float model's."""
    from torch import nn

    from edgeq.quantized import quantize_module
    from edgeq.reconstruction import ReconstructionConfig

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    with torch.no_grad():  # BatchNorm statistics that make the folded weights uneven, as trained ones are
        for bn in (m for m in model if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.05, 2), bn.weight.uniform_(0.5, 2)
    model.eval()
    rng = np.random.default_rng(0)
    calibration = rng.normal(0, 1, (64, 3, 16, 16)).astype(np.float32)
    held_out = torch.from_numpy(rng.normal(0, 1, (64, 3, 16, 16)).astype(np.float32))
    plain = quantize_module(model, calibration, "w2a8")
    corrected = quantize_module(
        model, calibration, "w2a8", reconstruction=ReconstructionConfig(method="rtn", bias_correction=True)
    )

    # each layer's shift, measured on the inputs the corrected model gives it
    inputs = _layer_inputs(corrected, calibration)
    layers = dict(corrected.named_modules())
    before = dict(plain.named_modules())
    with torch.no_grad():
        shifts_before = []
        for name, x in inputs.items():
            shift, moved = _shift_left(layers[name], before[name], x)
            assert shift < 1e-4, (name, shift)
            shifts_before.append(moved.abs().max().item())
        assert sorted(shifts_before)[-2] > 1e-2  # the 2-bit layers' rounding did shift them (the edges are 8-bit)
        reference = model(held_out)
        error_plain = (plain(held_out) - reference).pow(2).mean().item()
        error_corrected = (corrected(held_out) - reference).pow(2).mean().item()
    assert error_corrected < 0.8 * error_plain, (error_corrected, error_plain)


def test_bias_correction_after_reconstruction_corrects_once_and_leaves_the_rounding_alone():
    """Reconstruction learns against the float layers' own biases, so the correction comes after
    it, once: the same rounding as without it, and each bias moved by exactly its layer's shift."""
    from torch import nn

    from edgeq.quantized import quantize_module
    from edgeq.reconstruction import ReconstructionConfig

    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip
    calibration = np.random.default_rng(1).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    learned = dict(method="adaround", iters=5, batch_size=8)
    plain = quantize_module(model, calibration, "w2a8", reconstruction=ReconstructionConfig(**learned))
    corrected = quantize_module(
        model, calibration, "w2a8", reconstruction=ReconstructionConfig(**learned, bias_correction=True)
    )
    before, after = dict(plain.named_modules()), dict(corrected.named_modules())
    with torch.no_grad():
        for name, x in _layer_inputs(corrected, calibration).items():
            assert torch.equal(after[name].weight_int, before[name].weight_int), name  # the same rounding learned
            left, _ = _shift_left(after[name], before[name], x)
            assert left < 1e-4, (name, left)
