"""Layer costs: exact bytes, measured kernel time for targets this machine runs, estimated time for boards not at
hand, cached per shape."""

import dataclasses
import json
import shutil

import pytest
import torch
from edgeq.targets import get_target, host_target

from edgeq.errors import EdgeqError
from edgeq.layer_costs import ByteCosts, EstimatedCosts, LatencyCosts, LayerShape, costs_for_target, layer_shapes

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


def test_kernel_threads_change_for_a_while_and_come_back():
    library = LatencyCosts(host_target()).library
    before = library.lib.edgeq_threads()
    with library.threads(before + 2):
        assert library.lib.edgeq_threads() == before + 2
        with library.threads(1):
            assert library.lib.edgeq_threads() == 1
        assert library.lib.edgeq_threads() == before + 2
    assert library.lib.edgeq_threads() == before


def test_a_target_of_another_architecture_cannot_be_timed_here():
    with pytest.raises(EdgeqError, match="cannot be measured on this") as caught:
        LatencyCosts(get_target("rpi4"))
    assert "--budget-mb" in caught.value.hint


requires_estimate_tools = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("llvm-mca", "aarch64-linux-gnu-gcc", "qemu-aarch64")),
    reason="needs llvm-mca, the aarch64 cross compiler and qemu-aarch64 (scripts/setup.sh installs them)",
)


@requires_estimate_tools
def test_boards_not_at_hand_are_priced_by_estimate_once_per_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path))
    costs = costs_for_target(get_target("rpi4"))
    assert isinstance(costs, EstimatedCosts) and "1.5 GHz" in costs.describe()
    wide = LayerShape("conv", 64, 128, (3, 3), (1, 1), (1, 1), 1, (14, 14))
    low, high = costs.cost(wide, 2, 4), costs.cost(wide, 8, 8)
    # a floor: the A72 does at most 32 multiply-adds a cycle, whatever the kernel
    macs = 14 * 14 * 9 * 64 * 128
    assert low > macs / 32 / 1.5e6
    assert low < high  # the table-lookup kernel beats the 8-bit one on a wide 3x3 layer (docs/kernels.md)
    # a grouped convolution costs its groups, one after another
    grouped = costs.cost(LayerShape("conv", 64, 128, (3, 3), (1, 1), (1, 1), 2, (14, 14)), 8, 8)
    half = costs.cost(LayerShape("conv", 32, 64, (3, 3), (1, 1), (1, 1), 1, (14, 14)), 8, 8)
    assert grouped == pytest.approx(2 * half)
    assert costs.cost(LayerShape("linear", 64, 10, (1, 1), (1, 1), (0, 0), 1, ()), 8, 8) > 0
    again = costs_for_target(get_target("rpi4"))
    monkeypatch.setattr(again, "_estimate", lambda *_args: pytest.fail("estimated again"))
    assert again.cost(wide, 2, 4) == low  # read back from the cache file


def test_an_estimate_needs_the_boards_clock():
    board = dataclasses.replace(get_target("rpi4"), clock_ghz=None)
    with pytest.raises(EdgeqError, match="records no core clock") as caught:
        EstimatedCosts(board)
    assert "clock_ghz" in caught.value.hint
