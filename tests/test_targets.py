import pytest
from edgeq.targets import get_target, list_targets

from edgeq import EdgeqError

REQUIRED = {"x86": "x86_64", "x86-avx2": "x86_64", "x86-avx512": "x86_64", "arm64": "aarch64", "rpi4": "aarch64", "rpi5": "aarch64", "jetson-orin": "aarch64"}


def test_required_targets_exist():
    names = {t.name for t in list_targets()}
    assert set(REQUIRED) <= names


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_target_is_consistent_data(name):
    target = get_target(name)
    assert target.arch == REQUIRED[name]
    assert isinstance(target.tvm_target, dict) and target.tvm_target["kind"] == "llvm"
    assert target.tvm_target["mtriple"].startswith(target.arch)
    built = target.tvm()  # TVM accepts the dict form
    assert built.attrs["mtriple"] == target.tvm_target["mtriple"]
    if target.arch == "aarch64":
        assert target.cross_compiler == "aarch64-linux-gnu-gcc"
        assert target.qemu_cpu in ("cortex-a72", "cortex-a76")
    else:
        assert target.cross_compiler is None and target.qemu_cpu is None


def test_board_cpus():
    assert get_target("rpi4").tvm_target["mcpu"] == "cortex-a72"
    assert get_target("rpi5").tvm_target["mcpu"] == "cortex-a76"
    assert get_target("jetson-orin").tvm_target["mcpu"] == "cortex-a78ae"
    assert "+dotprod" in get_target("rpi5").tvm_target["mattr"]
    assert "+dotprod" not in get_target("rpi4").tvm_target["mattr"]


def test_unknown_target_lists_choices():
    with pytest.raises(EdgeqError) as info:
        get_target("raspberry")
    assert "rpi4" in info.value.hint and "x86" in info.value.hint
