"""Layer costs: exact bytes, measured kernel time for targets this machine runs, cached per shape."""

import json

import pytest
import torch
from edgeq.targets import get_target, host_target

from edgeq.errors import EdgeqError
from edgeq.layer_costs import ByteCosts, LatencyCosts, LayerShape, layer_shapes

SMALL = LayerShape("conv", 8, 8, (3, 3), (1, 1), (1, 1), 1, (8, 8))
LARGE = LayerShape("conv", 64, 64, (3, 3), (1, 1), (1, 1), 1, (32, 32))


def test_shapes_are_read_from_a_forward_pass_and_bytes_are_exact():
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
        torch.nn.Conv2d(8, 8, 3, groups=8),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 14 * 14, 10),
    )
    shapes = layer_shapes(module, torch.zeros(1, 3, 32, 32))
    assert shapes["0"] == LayerShape("conv", 3, 8, (3, 3), (2, 2), (1, 1), 1, (32, 32))
    assert shapes["1"] == LayerShape("conv", 8, 8, (3, 3), (1, 1), (0, 0), 8, (16, 16)) and shapes["1"].weights == 72
    assert shapes["3"].kind == "linear" and shapes["3"].weights == 8 * 14 * 14 * 10
    assert ByteCosts().cost(shapes["3"], 2, 4) == pytest.approx(8 * 14 * 14 * 10 * 2 / 8 / 1e6)


def test_kernel_time_is_measured_once_per_shape_and_grows_with_the_work(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path))
    costs = LatencyCosts(host_target())
    small, large = costs.cost(SMALL, 2, 4), costs.cost(LARGE, 2, 4)
    assert 0 < small < large  # 512 times the multiply-adds
    cached = json.loads((tmp_path / "layer-costs.json").read_text())
    assert len(cached) == 2 and any(SMALL.key() in key and key.endswith("w2a4") for key in cached)

    def never(*_args):
        raise AssertionError("measured again")

    again = LatencyCosts(host_target())
    monkeypatch.setattr(again, "_measure", never)
    assert again.cost(SMALL, 2, 4) == small  # read back from the cache file
    assert LatencyCosts(host_target()).cost(LayerShape("linear", 64, 32, (1, 1), (1, 1), (0, 0), 1, (5,)), 4, 4) > 0


def test_a_target_of_another_architecture_cannot_be_timed_here():
    with pytest.raises(EdgeqError, match="cannot be measured on this") as caught:
        LatencyCosts(get_target("rpi4"))
    assert "--budget-mb" in caught.value.hint
