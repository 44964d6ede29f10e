import itertools
import platform

import pytest
from edgeq.targets import HOST_PREFERENCE, get_target, host_target, host_target_name, list_targets

from edgeq import EdgeqError

REQUIRED = {
    "x86": "x86_64",
    "x86-avx2": "x86_64",
    "x86-avx512": "x86_64",
    "arm64": "aarch64",
    "rpi4": "aarch64",
    "rpi5": "aarch64",
    "jetson-orin": "aarch64",
}


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
    assert "rpi4" in info.value.hint and "x86" in info.value.hint and "host" in info.value.hint


# /proc/cpuinfo flag lines, cut down: a Haswell, an Ice Lake server, an early AVX-512 part without VNNI, a Pi 4, a Pi 5
HASWELL = ["fpu", "sse", "sse2", "ssse3", "sse4_1", "sse4_2", "avx", "fma", "avx2", "bmi2"]
ICE_LAKE = [*HASWELL, "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni"]
SKYLAKE_X = [*HASWELL, "avx512f", "avx512dq", "avx512bw", "avx512vl"]
PI4 = ["fp", "asimd", "evtstrm", "crc32", "cpuid"]
PI5 = [*PI4, "aes", "pmull", "sha1", "sha2", "atomics", "fphp", "asimdhp", "asimdrdm", "lrcpc", "dcpop", "asimddp"]


@pytest.mark.parametrize(
    "arch, flags, expected",
    [
        ("x86_64", ICE_LAKE, "x86-avx512"),
        ("x86_64", SKYLAKE_X, "x86-avx2"),  # AVX-512 without VNNI: the VNNI target would not run
        ("x86_64", HASWELL, "x86-avx2"),
        ("x86_64", [f for f in HASWELL if f != "fma"], "x86"),  # AVX2 without FMA (x86-avx2 is x86-64-v3)
        ("x86_64", ["fpu", "sse", "sse2"], "x86"),
        ("x86_64", [], "x86"),
        ("AMD64", HASWELL, "x86-avx2"),
        ("aarch64", PI5, "jetson-orin"),
        ("aarch64", PI4, "arm64"),
        ("arm64", PI5, "jetson-orin"),  # macOS spelling
    ],
)
def test_host_resolves_to_the_best_target_the_flags_allow(arch, flags, expected):
    assert host_target_name(arch, flags) == expected
    target = get_target(expected)
    assert set(target.cpu_features) <= set(flags) and target.arch in ("x86_64", "aarch64")


def test_host_preference_names_real_targets_best_first():
    names = {t.name: t for t in list_targets()}
    for arch, order in HOST_PREFERENCE.items():
        assert all(names[name].arch == arch for name in order)
        # each later choice needs a subset of the features of the one before: the order is best first
        assert all(set(names[b].cpu_features) <= set(names[a].cpu_features) for a, b in itertools.pairwise(order))
        assert names[order[-1]].cpu_features in ((), ("asimd",))  # a last resort every CPU of that arch has


def test_host_on_an_unknown_architecture_is_an_error_listing_targets():
    with pytest.raises(EdgeqError) as info:
        host_target_name("riscv64", ["rv64imafdc"])
    assert "riscv64" in info.value.message and "x86-avx2" in info.value.hint


def test_host_is_a_concrete_target_this_machine_runs():
    target = get_target("host")
    assert target.name != "host" and target == host_target()
    assert target.arch == platform.machine() and target.missing_host_features() == []


@pytest.mark.parametrize(
    "name, layout",
    [("x86", "portable"), ("x86-avx2", "avx2"), ("x86-avx512", "vnni"), ("arm64", "neon"), ("jetson-orin", "sdot")],
)
def test_each_host_choice_gets_the_kernels_its_features_allow(name, layout):
    from edgeq.kernels import layouts, toolchain

    target = get_target(name)
    assert layouts.layout_for(target.arch, target.cpu_features).name == layout
    flags = set(toolchain.compile_flags(target.arch, target.cpu_features, target.tvm_target.get("mcpu")))
    if layout in ("avx2", "vnni"):
        assert {"-mavx2", "-mfma"} <= flags
    assert ("-mavx512vnni" in flags) == (layout == "vnni")


def test_host_cpu_records_the_simd_features_benchmarks_depend_on():
    from edgeq.targets import SIMD_FEATURES, host_cpu, host_cpu_flags

    cpu = host_cpu()
    assert cpu["model"] and cpu["cores"] >= 1
    assert cpu["features"] == [f for f in SIMD_FEATURES if f in host_cpu_flags()]
    if platform.machine() == "x86_64" and "avx2" in host_cpu_flags():
        assert "avx2" in cpu["features"]
