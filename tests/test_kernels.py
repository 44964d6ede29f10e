"""The C kernels: bit-exact against the NumPy references, natively (property-based) and under
qemu for Cortex-A72 (NEON) and Cortex-A76 (dot product); kernel plans and compiled modules
against onnxruntime's QDQ model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from edgeq.kernels import execute, layouts, reference, selfcheck, toolchain
from edgeq.kernels import plan as kernel_plan
from edgeq.targets import get_target
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax

from edgeq import emulation
from edgeq.errors import EdgeqError
from edgeq.folders import MODEL_FILE, MODULE_FILE
from edgeq.manifest import Manifest
from edgeq.qdq import onnxruntime_session
from edgeq.quantized import quantize_module
from edgeq.stages import compile as compile_stage
from edgeq.stages import export as export_stage
from edgeq.stages import quantize as quantize_stage

from .conftest import requires_emulator


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), groups=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_packed_fields_unpack_to_the_same_values(bits, groups, seed):
    rng = np.random.default_rng(seed)
    low = -(2 ** (bits - 1))
    values = rng.integers(low, 2 ** (bits - 1), 32 * (8 // bits) * groups).astype(np.int8)
    packed = layouts.pack_fields(values, bits, low)
    assert packed.size == values.size * bits // 8
    assert np.array_equal(layouts.unpack_fields(packed, values.size, bits, low), values)


def test_two_bit_fields_are_laid_out_as_documented():
    values = np.zeros(128, np.int8)
    values[[0, 32, 64, 96]] = [-2, -1, 0, 1]  # codes 0, 1, 2, 3 with low = -2
    packed = layouts.pack_fields(values, 2, -2)
    assert packed[0] == (0 | 1 << 2 | 2 << 4 | 3 << 6)
    assert packed[1] == 0b10101010  # four zeros: code 2 in every field


@pytest.mark.parametrize("layout", list(layouts.LAYOUTS.values()), ids=list(layouts.LAYOUTS))
def test_panel_places_each_weight_where_the_microkernel_reads_it(layout):
    rng = np.random.default_rng(0)
    n, k = 37, 50
    weights = rng.integers(-2, 2, (n, k)).astype(np.int8)
    values = layouts.panel(weights, layout)
    k_padded = layouts.round_up(k, layouts.K_ALIGN)
    for row, col in [(0, 0), (5, 17), (n - 1, k - 1), (layout.block, 3)]:
        block, within = divmod(row, layout.block)
        index = (
            block * layout.block * k_padded
            + (col // layout.group) * layout.block * layout.group
            + within * layout.group
            + col % layout.group
        )
        assert values[index] == weights[row, col]
    assert values.size == layouts.round_up(n, layout.block) * k_padded


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 30),
    k=st.integers(1, 600),
    n=st.integers(1, 70),
    bits=st.sampled_from([2, 4, 8]),
    seed=st.integers(0, 2**31 - 1),
    which=st.sampled_from(["host", "avx2", "portable"]),
)
def test_microkernel_accumulators_equal_the_integer_gemm(libraries, m, k, n, bits, seed, which):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 16, (m, k)).astype(np.uint8)
    w = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k))
    lib = libraries.get(which, libraries["host"])  # no AVX2 build off x86: the host's again
    expected = reference.int_gemm(a, w)
    for layout in layouts.candidate_layouts(lib.layout, 15, w):  # AVX2 2-bit: vpmaddubsw panel and table lookup
        assert np.array_equal(lib.gemm_raw(a, layouts.pack_weights(w, layout)), expected), layout.name


def test_eight_bit_weights_are_read_in_place_wherever_they_lie(libraries):
    """8-bit weights are stored as their two's complement bytes, which the kernels use as the panel without a
    copy when 64-byte aligned, and copy otherwise: both give the integer GEMM."""
    import dataclasses

    rng = np.random.default_rng(5)
    a = rng.integers(0, 16, (9, 200)).astype(np.uint8)
    w = rng.integers(-128, 128, (40, 200))
    expected = reference.int_gemm(a, w)
    for lib in libraries.values():
        packed = layouts.pack_weights(w, lib.layout)
        assert (packed.bits, packed.low) == (8, 0)
        buffer = np.zeros(packed.data.size + 128, np.uint8)
        start = (-buffer.ctypes.data) % 64
        for offset in (start, start + 1):  # aligned: in place; one byte off: the unpacking copy
            placed = buffer[offset : offset + packed.data.size]
            placed[:] = packed.data
            got = lib.gemm_raw(a, dataclasses.replace(packed, data=placed))
            assert np.array_equal(got, expected), (lib.layout.name, offset - start)


def test_int16_accumulation_survives_the_worst_case(libraries):
    """All codes at their extremes for a long reduction: the chunked int16 sums must not overflow."""
    k = 4096
    for bits in (2, 4, 8):
        a = np.full((7, k), 15, np.uint8)
        w = np.full((33, k), -(2 ** (bits - 1)))
        for lib in libraries.values():
            for layout in layouts.candidate_layouts(lib.layout, 15, w):
                got = lib.gemm_raw(a, layouts.pack_weights(w, layout))
                assert np.array_equal(got, reference.int_gemm(a, w)), (bits, layout.name)


def test_table_lookup_layout_stores_two_bits_per_weight_and_is_chosen_for_wide_layers():
    rng = np.random.default_rng(0)
    weights = rng.integers(-2, 2, (512, 576))
    lut = layouts.LAYOUTS["avx2-lut"]
    packed = layouts.pack_weights(weights, lut)
    assert packed.data.size == 512 * 576 // 4 and packed.layout == lut.id
    assert layouts.conv_layout(layouts.LAYOUTS["avx2"], 15, weights, rows=196) == lut
    assert (
        layouts.conv_layout(layouts.LAYOUTS["avx2"], 15, weights[:64], rows=196).name == "avx2"
    )  # tables cost more than they save
    assert layouts.conv_layout(layouts.LAYOUTS["avx2"], 15, weights[:, :96], rows=196).name == "avx2"  # short k too
    assert layouts.conv_layout(layouts.LAYOUTS["avx2"], 255, weights, rows=196).name == "avx2-wide"
    assert layouts.conv_layout(layouts.LAYOUTS["avx2"], 15, weights * 2, rows=196).name == "avx2"  # not 2-bit
    with pytest.raises(ValueError, match="2-bit"):
        layouts.pack_weights(weights * 2, lut)
    # NEON without dot product: the same bytes, chosen from a tile's rows on
    neon, neon_lut = layouts.LAYOUTS["neon"], layouts.LAYOUTS["neon-lut"]
    assert np.array_equal(layouts.pack_weights(weights, neon_lut).data, packed.data)
    assert layouts.conv_layout(neon, 15, weights[:16], rows=4) == neon_lut
    assert layouts.conv_layout(neon, 15, weights, rows=2) == neon  # a tile of 4 rows would be mostly empty
    assert layouts.conv_layout(neon, 255, weights, rows=196) == neon  # 8-bit inputs
    assert layouts.conv_layout(layouts.LAYOUTS["sdot"], 15, weights, rows=196).name == "sdot"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), which=st.sampled_from(["host", "avx2", "portable"]))
def test_convolutions_with_fused_epilogue_match_the_reference(libraries, seed, which):
    """Random geometry (kernel 1/3/5, stride, padding, depthwise), 4- and 8-bit inputs, residual and ReLU."""
    assert selfcheck.check_conv(libraries.get(which, libraries["host"]), np.random.default_rng(seed)) is None


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), which=st.sampled_from(["host", "avx2", "portable"]))
def test_convolutions_read_in_place_match_the_reference_and_im2col(libraries, seed, which):
    """Multiples of 16 input channels: kernel rows read in place from the (padded) input at any stride and padding,
    and the same layer through im2col rows."""
    assert selfcheck.check_in_place_conv(libraries.get(which, libraries["host"]), np.random.default_rng(seed)) is None


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), which=st.sampled_from(["host", "avx2", "portable"]))
def test_depthwise_convolutions_match_the_reference(libraries, seed, which):
    """Depthwise layers of 16 to 272 channels, kernel 1/3/5, any stride and padding: AVX2 multiplies two taps per
    instruction with padding read as zero-point codes and the centring subtracted once per channel."""
    assert selfcheck.check_depthwise_conv(libraries.get(which, libraries["host"]), np.random.default_rng(seed)) is None


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), which=st.sampled_from(["host", "avx2", "portable"]))
def test_short_pointwise_convolutions_match_the_reference(libraries, seed, which):
    """1x1 layers of 8-40 input channels, read in place at their own stride (k stepped in pairs, not padded to 16),
    16 outputs or a ragged last block on 8-row tiles, codes straight from the registers."""
    library = libraries.get(which, libraries["host"])
    assert selfcheck.check_short_pointwise_conv(library, np.random.default_rng(seed)) is None


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), which=st.sampled_from(["host", "avx2", "portable"]))
def test_single_pixel_layers_match_the_reference(libraries, seed, which):
    """A classifier on one image: a 1x1 layer on one pixel, 4- and 8-bit inputs (AVX2: a one-row wide kernel that
    sign-extends the 8-bit panel as it reads it)."""
    library = libraries.get(which, libraries["host"])
    assert selfcheck.check_classifier_conv(library, np.random.default_rng(seed)) is None


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), which=st.sampled_from(["avx2", "portable"]))
def test_winograd_convolutions_match_the_reference(libraries, seed, which):
    """3x3 stride-1 layers of 4-bit codes as Winograd F(2x2, 3x3) in integers: every output as the direct sum's,
    odd and even feature maps, any padding, residuals and the codes-only epilogues (the Arm builds: the
    self-check under qemu)."""
    library = libraries.get(which)
    if library is None:
        pytest.skip("no AVX2 build on this machine")
    assert library.layout.name in layouts.WINOGRAD_LAYOUTS
    assert selfcheck.check_winograd_conv(library, np.random.default_rng(seed)) is None


@pytest.fixture(scope="session")
def amx_library(libraries):
    library = libraries["host"]
    if not library.amx:
        pytest.skip("needs AMX-INT8 (Sapphire Rapids or later) with tile state granted by the OS")
    return library


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(64, 150),
    k=st.integers(1, 700),
    n=st.integers(1, 70),
    bits=st.sampled_from([2, 4, 8]),
    seed=st.integers(0, 2**31 - 1),
)
def test_amx_tiles_equal_the_integer_gemm_and_the_vnni_kernel(amx_library, m, k, n, bits, seed):
    """Row counts that leave partial tiles, k that is no multiple of the tiles' 64 (zero-padded panel)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 16, (m, k)).astype(np.uint8)
    w = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k))
    packed = layouts.pack_weights(w, amx_library.layout)
    on_tiles = amx_library.gemm_raw(a, packed)
    with amx_library.amx_allowed(False):
        assert not amx_library.amx
        on_vectors = amx_library.gemm_raw(a, packed)
    assert amx_library.amx
    assert np.array_equal(on_tiles, reference.int_gemm(a, w))
    assert np.array_equal(on_vectors, on_tiles)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_amx_convolutions_with_fused_epilogue_match_the_reference(amx_library, seed):
    """Feature maps of 64 output pixels and more (the layers that run on tiles), 4- and 8-bit inputs; with 64 or
    128 input channels, stride-1 layers read the padded input in place (no im2col)."""
    assert selfcheck.check_conv(amx_library, np.random.default_rng(seed), min_size=14) is None
    assert selfcheck.check_conv(amx_library, np.random.default_rng(seed), min_size=10, wide_inputs=True) is None


def test_epilogue_rounds_like_the_division_next_to_every_tie(libraries):
    """The vector epilogues round y * (1 / scale) and fall back to y / scale near half-integers: outputs placed on,
    and a few ulps either side of, (k + 0.5) * scale must get the division's codes (round half to even). Every input
    code sits at the zero point, so acc = 0 and y is exactly the bias (codes-only epilogue, one pixel a call) or the
    residual (the general epilogue)."""
    from edgeq.kernels import native

    channels = 40  # a block of 32 (16- and 8-lane loops) and one of 8
    weights = np.ones((channels, 1), np.int8)
    for scale in (0.07, 0.1, 0.3, 1 / 3, 0.0123):
        ties = np.float32((np.arange(-3, 250) + 0.5) * scale)
        near = np.concatenate([ties + ulps * np.spacing(ties) for ulps in range(-3, 4)]).astype(np.float32)
        values = np.resize(near, (-(-near.size // channels), channels)).astype(np.float32)
        rows = values.shape[0]
        _, expected = reference.epilogue(
            np.zeros(values.shape), np.full(channels, 0.5), np.zeros(channels), values, (-3.0e38, 3.0e38), scale, 3, 255
        )
        for library in libraries.values():
            packed = layouts.pack_weights(weights, layouts.conv_layout(library.layout, 15, weights, rows))

            def run(pixels, bias, residual, library=library, packed=packed):
                params = native.conv_params(
                    in_h=pixels, in_w=1, in_c=1, out_h=pixels, out_w=1, out_c=channels, kernel_h=1, kernel_w=1,
                    stride_h=1, stride_w=1, x_zero=7, x_max=15, w_bits=packed.bits, w_low=packed.low,
                    w_absmax=packed.absmax, k_padded=packed.k_padded, w_layout=packed.layout, out_zero=3, out_qmin=0,
                    out_qmax=255, out_scale=scale, clamp_min=-3.0e38, clamp_max=3.0e38,
                )  # fmt: skip
                x = np.full((pixels, 1), 7, np.uint8)
                multiplier = np.full(channels, 0.5, np.float32)
                wsum = weights.sum(1).astype(np.int32)
                _, codes = library.conv2d(
                    params, x, packed, wsum, multiplier, bias, residual, want_float=residual is not None
                )
                return codes.reshape(pixels, channels)

            codes_only = np.concatenate([run(1, row, None) for row in values])
            general = run(rows, np.zeros(channels, np.float32), values)
            assert np.array_equal(codes_only, expected), (library.layout.name, scale)
            assert np.array_equal(general, expected), (library.layout.name, scale)
            quantized = np.zeros(values.size, np.uint8)  # edgeq_quantize (float tensors to codes) rounds alike
            library.lib.edgeq_quantize(
                library._ptr(values),
                channels,
                rows,
                0,
                native.ctypes.c_float(scale),
                3,
                0,
                255,
                library._ptr(quantized),
            )
            assert np.array_equal(quantized.reshape(rows, channels), expected), (library.layout.name, scale)


def test_selfcheck_script_passes_natively(libraries):
    result = subprocess.run(
        [sys.executable, str(Path(selfcheck.__file__)), str(libraries["host"].path), "--cases", "10"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["failures"] == []


@pytest.mark.qemu
@requires_emulator
@pytest.mark.parametrize(
    "target_name, qemu_cpu, layout", [("rpi4", "cortex-a72", "neon"), ("jetson-orin", "cortex-a76", "sdot")]
)
def test_arm64_kernels_are_bit_exact_under_qemu(tmp_path, target_name, qemu_cpu, layout):
    target = get_target(target_name)
    c_compiler, _, flags = compile_stage.kernel_toolchain(target)
    library = toolchain.build_shared(c_compiler, flags, tmp_path)
    command, env = emulation.python_command(qemu_cpu)
    result = subprocess.run(
        [*command, str(Path(selfcheck.__file__)), str(library), "--cases", "12", "--seed", "1"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"layout": layout, "cases": 12, "failures": []}


@pytest.mark.skipif(
    shutil.which("llvm-mca") is None or shutil.which("aarch64-linux-gnu-gcc") is None,
    reason="needs llvm-mca and the aarch64 cross compiler",
)
def test_arm_estimate_puts_the_a72_table_lookup_loop_ahead_of_int8():
    """The instruction mix the A72 kernel choice rests on (benchmarks/arm_estimate.py, LLVM's scheduling model)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "arm_estimate.py"
    result = subprocess.run([sys.executable, str(script), "--json"], capture_output=True, text=True, check=True)
    a72 = json.loads(result.stdout)["cortex-a72"]
    lookup = a72["table_lookup_loop"]
    assert lookup["macs"] % 1024 == 0  # 32 lookups of 32 multiply-adds per two group pairs of 4 rows
    assert lookup["ratio"] > 1.0 > a72["ratio"]  # measured 1.33 and 0.75
    assert json.loads(result.stdout)["cortex-a76"]["table_lookup_loop"] is None  # dot-product builds keep sdot


@pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("llvm-mca", "aarch64-linux-gnu-gcc", "qemu-aarch64")),
    reason="needs llvm-mca, the aarch64 cross compiler and qemu-aarch64",
)
def test_layer_estimate_counts_whole_layers_and_checks_its_int8_baseline():
    """benchmarks/layer_estimate.py on ResNet-18's first two layers for the A72: every block that ran is
    estimated, the int8 baseline computed the kernels' outputs (the script compares them and fails otherwise),
    and the table-lookup kernel's 3x3 layer costs fewer cycles than the int8 baseline's."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "layer_estimate.py"
    result = subprocess.run(
        [sys.executable, str(script), "--models", "resnet18", "--cores", "a72", "--layers", "2", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    stem, layer1 = json.loads(result.stdout)["models"]["resnet18"]["a72"]
    for row in (stem, layer1):
        assert row["share_estimated"] > 0.99
        # no core does more than 32 multiply-adds a cycle here: a floor that catches lost blocks
        assert min(row["w2a4_cycles"], row["int8_cycles"]) > row["macs"] / 32
    assert layer1["count"] == 4 and layer1["macs"] == 56 * 56 * 9 * 64 * 64
    assert layer1["w2a4_cycles"] < layer1["int8_cycles"]  # 15.1 vs 35.0 Mcycles when written


@pytest.mark.qemu
@requires_emulator
def test_dot_product_build_does_not_run_on_cortex_a72(tmp_path):
    """A real check that the A72 build avoids sdot: the A78AE build dies there with SIGILL."""
    c_compiler, _, flags = compile_stage.kernel_toolchain(get_target("jetson-orin"))
    library = toolchain.build_shared(c_compiler, flags, tmp_path)
    command, env = emulation.python_command("cortex-a72")
    result = subprocess.run(
        [*command, str(Path(selfcheck.__file__)), str(library), "--cases", "2"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode in (132, -4)


# ---------------------------------------------------------------------------------------
# Plans and compiled modules


@pytest.fixture(scope="session")
def exports(tmp_path_factory, quantized_dirs, tiny_zoo_vit_export):
    root = tmp_path_factory.mktemp("kernel-exports")
    made = {"tiny": export_stage.run(quantized_dirs("w2a4"), root / "tiny"), "vit": tiny_zoo_vit_export}
    mobilenet = quantize_stage.run(
        "zoo:fmnist-mobilenet", "fashion-mnist:A", root / "mobilenet-q", bits="w2a4", num_images=16
    )
    made["mobilenet"] = export_stage.run(mobilenet, root / "mobilenet")
    return made


@pytest.fixture(scope="session")
def timm_vit_model(tmp_path_factory) -> onnx.ModelProto:
    """A two-block timm ViT at W2A4: its attention's two products quantized at 8 bits (attention_bits)."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10
    ).eval()
    calibration = np.random.default_rng(0).normal(0, 1, (4, 3, 32, 32)).astype(np.float32)
    quantized = quantize_module(model, calibration, "w2a4")
    qdq, _ = export_stage.build_qdq_model(quantized, torch.from_numpy(calibration[:1]))
    return qdq


def _inputs(model: onnx.ModelProto, count: int):
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    return [rng.normal(0, 1, dims).astype(np.float32) for _ in range(count)]


def _assert_plan_reproduces_onnxruntime(model: onnx.ModelProto, plan: kernel_plan.Plan, lib) -> None:
    """On three inputs: every value the reference's, every activation code onnxruntime's, the logits to float
    rounding (integer layers only: no layer norm, softmax or GELU)."""
    session = onnxruntime_session(model)
    for x in _inputs(model, 3):
        env = execute.run_plan(plan, lib, x)
        _assert_equals_reference(plan, env, x)
        assert _code_disagreement(model, plan, env, x) == (0, 0.0)
        theirs = session.run(None, {model.graph.input[0].name: x})[0]
        assert np.abs(env[plan.output_name].reshape(plan.output_shape) - theirs).max() < 1e-4


def _code_disagreement(model: onnx.ModelProto, plan: kernel_plan.Plan, env: dict, x: np.ndarray) -> tuple[int, float]:
    """(largest difference in LSB, share of codes that differ) between the plan's activation codes and onnxruntime's.

    onnxruntime returns no 4- or 2-bit tensors, so its codes are read back from the
    DequantizeLinear after each QuantizeLinear: (code - zero) * scale, exactly invertible.
    """
    dequantized = {node.input[0]: node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    quantized = [
        node.output[0]
        for node in model.graph.node
        if node.op_type == "QuantizeLinear" and node.output[0] in env and node.output[0] in dequantized
    ]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend([onnx.helper.make_empty_tensor_value_info(dequantized[name]) for name in quantized])
    theirs = onnxruntime_session(probe).run(None, {model.graph.input[0].name: x})
    worst, differing, total = 0, 0, 0
    for name, values in zip(quantized, theirs):
        value = plan.values[name]
        reference_codes = np.rint(values / np.float32(value.scale)).astype(np.int32) + value.zero
        ours = env[name]
        if value.layout == "nhwc":
            ours = ours.transpose(2, 0, 1)[None]
        delta = np.abs(ours.astype(np.int32).reshape(reference_codes.shape) - reference_codes)
        worst, differing, total = max(worst, int(delta.max())), differing + int((delta > 0).sum()), total + delta.size
    assert total > 0
    return worst, differing / total


def _assert_equals_reference(plan: kernel_plan.Plan, env: dict, x: np.ndarray) -> None:
    """Every value the kernels computed, codes and floats, has the bits of the NumPy reference's."""
    expected = reference.run_plan(plan, x)
    for step in plan.steps:
        ours, theirs = np.asarray(env[step.output]).reshape(expected[step.output].shape), expected[step.output]
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), (
            f"{step.kernel} {step.output}: differs from the reference"
        )


def test_kernel_ab_compares_two_builds_layer_by_layer(libraries, exports, tmp_path):
    """benchmarks/kernel_ab.py: a revision's kernels against this checkout's on every convolution of a plan; the
    same build agrees with itself, a base whose depthwise centring is off in one channel is reported."""
    import importlib.util

    from edgeq.kernels import native

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_ab.py"
    spec = importlib.util.spec_from_file_location("edgeq_kernel_ab", script)
    kernel_ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_ab)
    model = onnx.load(str(exports["mobilenet"] / MODEL_FILE))
    lib = libraries["host"]
    plan = kernel_plan.build_plan(model, lib.layout)
    x = _inputs(model, 1)[0]
    rows = kernel_ab.compare("mobilenet", {"A": lib, "B": lib}, plan, x, rounds=1, calls=1)
    assert len(rows) == sum(step.kernel == "conv2d" for step in plan.steps)
    assert all(row["same"] and row["a_ms"] > 0 and row["b_ms"] > 0 for row in rows)
    broken = tmp_path / "csrc"
    shutil.copytree(toolchain.SOURCE_DIR, broken)
    source = (broken / "edgeq_kernels.c").read_text()
    assert "correction[ch] = p->x_zero * total;" in source
    (broken / "edgeq_kernels.c").write_text(
        source.replace("correction[ch] = p->x_zero * total;", "correction[ch] = p->x_zero * total + 1000 * (ch == 1);")
    )
    compiler, flags = toolchain.host_flags()
    if "-mavx2" not in flags:
        pytest.skip("the depthwise centring constant is AVX2's")
    base = native.Library(toolchain.build_shared(compiler, flags, tmp_path / "build", source_dir=broken))
    rows = kernel_ab.compare("mobilenet", {"A": base, "B": lib}, plan, x, rounds=1, calls=1)
    assert not all(row["same"] for row in rows if row["layer"].startswith("dw "))
    assert all(row["same"] for row in rows if not row["layer"].startswith("dw "))


@pytest.mark.parametrize("name", ["tiny", "mobilenet", "vit"])
def test_plan_matches_onnxruntime_qdq_model(libraries, exports, name):
    model = onnx.load(str(exports[name] / MODEL_FILE))
    lib = libraries["host"]
    plan = kernel_plan.build_plan(model, lib.layout)
    kernels = plan.summary()["kernels"]
    assert kernels["conv2d"] >= 3 and "quantize" in kernels
    if name == "mobilenet":
        assert any(step.params.get("depthwise") for step in plan.steps if step.kernel == "conv2d")
    if name == "vit":
        # attention's two quantized operands multiply as codes: no dequantized copies, no float product
        assert {"layer_norm", "softmax", "gelu", "matmul_codes"} <= set(kernels) and "dequantize" not in kernels
    session = onnxruntime_session(model)
    input_name = model.graph.input[0].name
    for x in _inputs(model, 5):
        env = execute.run_plan(plan, lib, x)
        _assert_equals_reference(plan, env, x)
        ours = env[plan.output_name].reshape(plan.output_shape)
        theirs = session.run(None, {input_name: x})[0]
        # Same integers; the float epilogue differs from onnxruntime's float conv only in rounding.
        assert np.abs(ours - theirs).max() < 1e-4
        worst, share = _code_disagreement(model, plan, env, x)
        if (
            name == "vit"
        ):  # layer norm, softmax and GELU round differently: a code on a rounding boundary may move one step
            assert worst <= 1 and share < 1e-3
        else:  # integer layers only: every code equal
            assert (worst, share) == (0, 0.0)


@pytest.mark.parametrize("build", ["host", "portable"])
def test_timm_vit_plan_is_within_one_step_of_onnxruntime(libraries, timm_vit_model, build):
    """Layer norm, softmax and GELU round differently from onnxruntime's (order of sums,
    polynomial exp/erf), so a code that lands on a rounding boundary may move by one step."""
    lib = libraries[build]
    plan = kernel_plan.build_plan(timm_vit_model, lib.layout)
    kernels = plan.summary()["kernels"]
    assert kernels["conv2d"] == 1 + 2 * 4 + 1 and {"layer_norm", "softmax", "gelu", "copy"} <= set(kernels)
    assert kernels["matmul_codes"] == 2 * 2 and "matmul" not in kernels  # Q·Kᵀ and weights·V of both blocks
    # per block Q, Kᵀ and V straight from the QKV output and the heads merged back; the class token's row;
    # the patch grid's NHWC -> NCHW -> tokens round trip is no copy at all
    assert kernels["copy"] == 2 * 4 + 1
    session = onnxruntime_session(timm_vit_model)
    for x in _inputs(timm_vit_model, 3):
        env = execute.run_plan(plan, lib, x)
        _assert_equals_reference(plan, env, x)
        worst, share = _code_disagreement(timm_vit_model, plan, env, x)
        assert worst <= 1 and share < 0.01
        ours = env[plan.output_name].reshape(plan.output_shape)
        theirs = session.run(None, {timm_vit_model.graph.input[0].name: x})[0]
        assert np.abs(ours - theirs).max() < 0.05 * np.abs(theirs).max()


@pytest.fixture(scope="session")
def option_a_resnet_model() -> onnx.ModelProto:
    """A CIFAR ResNet-8 at W2A4 whose downsampling shortcuts slice and zero-pad channels (ONNX Slice + Pad)."""
    import torch

    from edgeq.zoo.cifar_resnet import CifarResNet

    torch.manual_seed(0)
    model = CifarResNet(depth=8).eval()
    calibration = np.random.default_rng(0).normal(0, 1, (4, 3, 32, 32)).astype(np.float32)
    quantized = quantize_module(model, calibration, "w2a4")
    qdq, _ = export_stage.build_qdq_model(quantized, torch.from_numpy(calibration[:1]))
    return qdq


@pytest.mark.parametrize("build", ["host", "portable"])
def test_channel_padding_shortcuts_run_on_the_kernels(libraries, option_a_resnet_model, build):
    """Slice and Pad of a feature map stay NHWC, so the shortcut feeds the residual add without layout copies."""
    model = option_a_resnet_model
    assert {"Pad", "Slice"} <= {node.op_type for node in model.graph.node}
    lib = libraries[build]
    plan = kernel_plan.build_plan(model, lib.layout)
    assert plan.summary()["kernels"]["concat"] == 2 * 2  # zeros before and after, two shortcuts
    session = onnxruntime_session(model)
    for x in _inputs(model, 3):
        env = execute.run_plan(plan, lib, x)
        _assert_equals_reference(plan, env, x)
        assert _code_disagreement(model, plan, env, x) == (0, 0.0)
        ours = env[plan.output_name].reshape(plan.output_shape)
        theirs = session.run(None, {model.graph.input[0].name: x})[0]
        assert np.abs(ours - theirs).max() < 1e-4


def test_winograd_layers_agree_with_onnxruntime_code_for_code(libraries, option_a_resnet_model, tmp_path):
    """The AVX2 build runs the 3x3 stride-1 layers of 32 and 64 channels as Winograd F(2x2, 3x3): every activation
    code as onnxruntime's, and the compiled module equals the reference bit for bit."""
    library = libraries.get("avx2")
    if library is None:
        pytest.skip("needs an AVX2 CPU: the module is compiled for x86-avx2 and run here")
    model = option_a_resnet_model
    plan = kernel_plan.build_plan(model, library.layout)
    winograd = [step for step in plan.steps if step.kernel == "conv2d" and step.params.get("winograd")]
    assert len(winograd) == 2 and plan.summary()["weight_layouts"]["avx2 winograd"] == 2  # second convs, stages 2, 3
    direct = kernel_plan.build_plan(model, library.layout, winograd=False)
    assert "avx2 winograd" not in direct.summary()["weight_layouts"]
    _assert_plan_reproduces_onnxruntime(model, plan, library)
    target = get_target("x86-avx2")
    out = tmp_path / MODULE_FILE
    compile_stage.build(model, target, model.graph.input[0].name, [1, 3, 32, 32], out, kernels="auto")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out)), tvm.cpu())
    for x in _inputs(model, 2):
        ours = vm["main"](tvm.runtime.tensor(x)).numpy()
        assert np.array_equal(ours, reference.run_plan(plan, x)[plan.output_name].reshape(ours.shape))


def test_pad_modes_without_a_kernel_are_named():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 10, 10])],
        [helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 1, 1, 0, 0, 1, 1])],
    )
    with pytest.raises(kernel_plan.Unsupported, match="mode 'reflect'"):
        kernel_plan.build_plan(helper.make_model(graph), layouts.LAYOUTS["portable"])


@pytest.mark.parametrize(
    "name, target_name",
    [("tiny", "x86"), ("tiny", "x86-avx2"), ("mobilenet", "x86-avx2"), ("vit", "x86-avx2"), ("vit", "x86")],
)
def test_compiled_module_equals_the_reference_and_matches_onnxruntime(tmp_path, exports, name, target_name):
    target = get_target(target_name)
    if target.missing_host_features():
        pytest.skip(f"this CPU lacks {target.missing_host_features()} for {target_name}")
    compiled = compile_stage.run(exports[name], tmp_path / "compiled", target=target, kernels="on")
    build = Manifest.load(compiled, "compile").extra["build"]
    assert build["path"] == "kernels" and build["kernels"]["conv2d"] >= 3
    model = onnx.load(str(exports[name] / MODEL_FILE))
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(compiled / MODULE_FILE)), tvm.cpu())
    session = onnxruntime_session(model)
    plan = kernel_plan.build_plan(model, layouts.layout_for(target.arch, target.cpu_features))
    for x in _inputs(model, 3):
        ours = vm["main"](tvm.runtime.tensor(x)).numpy()
        assert np.array_equal(ours, reference.run_plan(plan, x)[plan.output_name].reshape(ours.shape))  # bit for bit
        theirs = session.run(None, {model.graph.input[0].name: x})[0]
        assert np.abs(ours - theirs).max() < 1e-4


@pytest.mark.qemu
@requires_emulator
@pytest.mark.parametrize("target_name", ["rpi4", "rpi5"])
def test_arm64_vit_module_under_qemu_equals_the_reference(tmp_path, exports, target_name):
    """Layer norm, softmax, GELU and the float matmuls too: an Arm module computes the x86 reference's bits."""
    from edgeq.stages import verify as verify_stage

    compiled = compile_stage.run(exports["vit"], tmp_path / "compiled", target=target_name, kernels="on")
    report = verify_stage.run(compiled, tmp_path / "verified", data="fashion-mnist:test", num_images=4, latency_runs=0)
    assert report["ran"].startswith("qemu-aarch64")
    assert report["agreement_with_reference"] == 1.0 and report["reference_images"] == 4


@pytest.fixture(scope="session")
def negated_export(tmp_path_factory, exports):
    """The tiny model with its logits negated twice: Neg has no kernel."""
    export = tmp_path_factory.mktemp("negated") / "export"
    shutil.copytree(exports["tiny"], export)
    model = onnx.load(str(export / MODEL_FILE))
    logits = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{name}/before" if name == logits else name for name in node.output]
    model.graph.node.extend(
        [
            onnx.helper.make_node("Neg", [f"{logits}/before"], [f"{logits}/negated"], name="negate"),
            onnx.helper.make_node("Neg", [f"{logits}/negated"], [logits], name="negate_back"),
        ]
    )
    onnx.save(model, str(export / MODEL_FILE))
    Manifest.load(export).write(export)  # record the edited model, as if export had written it
    return export


def test_operators_without_a_kernel_run_as_generic_code_in_the_same_module(tmp_path, negated_export):
    # those two nodes (and only they) run as TVM's generated code while every layer stays on the kernels
    export = negated_export
    model = onnx.load(str(export / MODEL_FILE))
    compiled = compile_stage.run(export, tmp_path / "auto", target="x86")
    build = Manifest.load(compiled, "compile").extra["build"]
    assert build["path"] == "kernels" and build["generic"] == ["Neg negate", "Neg negate_back"]
    assert build["kernels"]["conv2d"] >= 3
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(compiled / MODULE_FILE)), tvm.cpu())
    session = onnxruntime_session(model)
    for x in _inputs(model, 2):
        theirs = session.run(None, {model.graph.input[0].name: x})[0]
        assert np.abs(vm["main"](tvm.runtime.tensor(x)).numpy() - theirs).max() < 1e-4
    with pytest.raises(EdgeqError, match="cannot run on edgeq's kernels.*Neg"):
        compile_stage.run(export, tmp_path / "on", target="x86", kernels="on")
    assert not (tmp_path / "on").exists()


def test_graph_the_plan_cannot_take_falls_back_to_generic_code_whole(tmp_path, exports):
    # a second graph output: the plan takes one input and one output, so the whole model is TVM's
    export = tmp_path / "export"
    shutil.copytree(exports["tiny"], export)
    model = onnx.load(str(export / MODEL_FILE))
    graph_input = model.graph.input[0]
    model.graph.node.append(onnx.helper.make_node("Identity", [graph_input.name], ["input_copy"]))
    copy = model.graph.output.add()
    copy.CopyFrom(graph_input)
    copy.name = "input_copy"
    onnx.save(model, str(export / MODEL_FILE))
    Manifest.load(export).write(export)
    compiled = compile_stage.run(export, tmp_path / "auto", target="x86")
    build = Manifest.load(compiled, "compile").extra["build"]
    assert build["path"] == "generic" and "one output" in build["reason"]


@pytest.mark.qemu
@requires_emulator
def test_arm64_module_with_generic_steps_under_qemu_equals_the_reference(tmp_path, negated_export):
    """TVM's code for the generic nodes is cross-compiled and linked with the Arm kernels in one module.
    Negation is exact, so the module still computes the reference's bits."""
    from edgeq.stages import verify as verify_stage

    compiled = compile_stage.run(negated_export, tmp_path / "compiled", target="rpi4")
    assert Manifest.load(compiled, "compile").extra["build"]["generic"] == ["Neg negate", "Neg negate_back"]
    report = verify_stage.run(compiled, tmp_path / "verified", data="fashion-mnist:test", num_images=4, latency_runs=0)
    assert report["ran"].startswith("qemu-aarch64")
    assert report["agreement_with_reference"] == 1.0 and report["reference_images"] == 4


@pytest.fixture(scope="session")
def timm_style_cnn_model() -> onnx.ModelProto:
    """A W2A4 CNN with operators the kernels lack: SiLU (Sigmoid * x), reflection padding and HardSwish,
    ending in x.mean((2, 3)) (ReduceMean without keepdims)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.norm = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.pad, self.conv, self.act = nn.ReflectionPad2d(1), nn.Conv2d(16, 16, 3), nn.Hardswish()
            self.down, self.head = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Linear(32, 10)

        def forward(self, x):
            x = nn.functional.silu(self.norm(self.stem(x)))
            x = self.act(self.conv(self.pad(x)))
            return self.head(torch.relu(self.down(x)).mean((2, 3)))

    torch.manual_seed(0)
    calibration = np.random.default_rng(0).normal(0, 1, (4, 3, 16, 16)).astype(np.float32)
    quantized = quantize_module(Net().eval(), calibration, "w2a4")
    qdq, _ = export_stage.build_qdq_model(quantized, torch.from_numpy(calibration[:1]))
    return qdq


@pytest.mark.parametrize("build", ["host", "portable"])
def test_generic_steps_keep_feature_maps_nhwc_between_kernels(libraries, timm_style_cnn_model, build):
    model = timm_style_cnn_model
    lib = libraries[build]
    with pytest.raises(kernel_plan.Unsupported, match="reflect"):
        kernel_plan.build_plan(model, lib.layout)
    plan = kernel_plan.build_plan(model, lib.layout, generic=True)
    summary = plan.summary()
    assert [name.split()[0] for name in summary["generic"]] == ["Pad"]
    kernels = summary["kernels"]
    assert (kernels["conv2d"], kernels["global_average_pool"], kernels["activation"], kernels["binary"]) == (4, 1, 2, 1)
    assert "copy" not in kernels  # SiLU's multiply and the activations keep feature maps NHWC
    session = onnxruntime_session(model)
    for x in _inputs(model, 3):
        env = execute.run_plan(plan, lib, x)
        _assert_equals_reference(plan, env, x)
        # the polynomial exp of Sigmoid rounds apart from onnxruntime's: a code on a boundary may move one step
        worst, share = _code_disagreement(model, plan, env, x)
        assert worst <= 1 and share < 0.01
        ours = env[plan.output_name].reshape(plan.output_shape)
        theirs = session.run(None, {model.graph.input[0].name: x})[0]
        assert np.abs(ours - theirs).max() < 1e-4


@pytest.mark.parametrize("build", ["host", "portable"])
def test_channel_concatenation_of_feature_maps_stays_nhwc(libraries, build):
    """GhostNet's ghost module: two convolutions' outputs joined along channels, then sliced; in NHWC memory a
    channel concatenation is one concat over pixels, so no feature map is copied to NCHW and back."""
    import torch
    from torch import nn

    class Ghost(nn.Module):
        def __init__(self):
            super().__init__()
            self.primary, self.cheap = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.out = nn.Conv2d(12, 10, 3, padding=1)

        def forward(self, x):
            a = torch.relu(self.primary(x))
            return self.out(torch.cat([a, torch.relu(self.cheap(a))], 1)[:, :12]).mean((2, 3))

    torch.manual_seed(0)
    calibration = np.random.default_rng(0).normal(0, 1, (4, 3, 12, 12)).astype(np.float32)
    model, _ = export_stage.build_qdq_model(
        quantize_module(Ghost().eval(), calibration, "w4a4"), torch.from_numpy(calibration[:1])
    )
    assert "Concat" in {node.op_type for node in model.graph.node}
    lib = libraries[build]
    plan = kernel_plan.build_plan(model, lib.layout)
    kernels = plan.summary()["kernels"]
    assert (kernels["concat"], kernels["copy"]) == (1, 1)  # the one copy is the channel slice, itself NHWC
    assert all(v.layout == "nhwc" for v in plan.values.values() if v.kind == "float" and len(v.shape) == 3)
    _assert_plan_reproduces_onnxruntime(model, plan, lib)


@pytest.fixture(scope="session")
def resnet_stem_model() -> onnx.ModelProto:
    """An ImageNet ResNet's stem at W2A4: 7x7 stride-2 convolution of RGB (8-bit inputs), ReLU, 3x3 stride-2 max
    pool."""
    import torch

    class Stem(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 7, stride=2, padding=3)
            self.pool = torch.nn.MaxPool2d(3, stride=2, padding=1)
            self.body = torch.nn.Conv2d(16, 16, 3, padding=1)
            self.head = torch.nn.Linear(16, 10)

        def forward(self, x):
            x = self.pool(torch.relu(self.conv(x)))
            return self.head(torch.relu(self.body(x)).mean((2, 3)))

    torch.manual_seed(0)
    calibration = np.random.default_rng(0).normal(0, 1, (4, 3, 30, 30)).astype(np.float32)
    model, _ = export_stage.build_qdq_model(
        quantize_module(Stem().eval(), calibration, "w2a4"), torch.from_numpy(calibration[:1])
    )
    return model


@pytest.mark.parametrize("build", ["host", "portable"])
def test_convolution_writes_codes_through_a_max_pool(libraries, resnet_stem_model, tmp_path, build):
    """conv -> max pool -> quantize: the convolution writes the codes and the pool takes their maxima, which equal
    the codes of the float maxima (quantization is monotone): every code as onnxruntime's, the compiled module's
    logits the reference's bit for bit."""
    model = resnet_stem_model
    lib = libraries[build]
    plan = kernel_plan.build_plan(model, lib.layout)
    stem = plan.steps[:4]
    assert [(step.kernel, step.out_kind) for step in stem] == [
        ("quantize", "codes"),  # the image
        ("conv2d", "codes"),
        ("max_pool", "codes"),
        ("conv2d", "float"),  # reads the pooled codes: no quantization between
    ]
    _assert_plan_reproduces_onnxruntime(model, plan, lib)
    if build == "host":
        target = get_target("x86")
        out = tmp_path / MODULE_FILE
        how = compile_stage.build(model, target, model.graph.input[0].name, [1, 3, 30, 30], out, kernels="auto")
        assert how["path"] == "kernels"
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(out)), tvm.cpu())
        reference_plan = kernel_plan.build_plan(model, layouts.layout_for(target.arch, target.cpu_features))
        for x in _inputs(model, 2):
            ours = vm["main"](tvm.runtime.tensor(x)).numpy()
            expected = reference.run_plan(reference_plan, x)[reference_plan.output_name].reshape(ours.shape)
            assert np.array_equal(ours, expected)


def test_compiled_module_with_generic_steps_matches_the_reference(tmp_path, timm_style_cnn_model):
    """TVM's generated reflection padding against onnxruntime's (the reference's): a move of values, so the
    module still computes the reference's bits."""
    model = timm_style_cnn_model
    target = get_target("x86")
    out = tmp_path / MODULE_FILE
    how = compile_stage.build(model, target, model.graph.input[0].name, [1, 3, 16, 16], out, kernels="auto")
    assert how["path"] == "kernels" and len(how["generic"]) == 1
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out)), tvm.cpu())
    plan = kernel_plan.build_plan(model, layouts.layout_for(target.arch, target.cpu_features), generic=True)
    for x in _inputs(model, 3):
        ours = vm["main"](tvm.runtime.tensor(x)).numpy()
        expected = reference.run_plan(plan, x)[plan.output_name].reshape(ours.shape)
        assert np.array_equal(ours, expected)


@pytest.fixture(scope="session")
def tiny_zoo_vit_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit-export")
    quantized = quantize_stage.run("zoo:fmnist-vit", "fashion-mnist:A", root / "q", bits="w4a4", num_images=8)
    return export_stage.run(quantized, root / "x")


def test_conv_params_struct_has_one_layout(libraries):
    """ConvParams (Python) and edgeq_conv_params (C) list the same fields in the same order, with the same size."""
    import re

    from edgeq.kernels import native

    header = (toolchain.SOURCE_DIR / "edgeq_kernels.h").read_text()
    body = re.search(r"typedef struct \{(.*?)\} edgeq_conv_params;", header, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    c_fields = [name for line in body.split(";") if line.strip() for name in re.findall(r"\w+", line.split(None, 1)[1])]
    assert c_fields == [name for name, _ in native.ConvParams._fields_]
    for build in libraries.values():
        assert build.lib.edgeq_conv_params_size() == native.ctypes.sizeof(native.ConvParams)
    with pytest.raises(TypeError, match="no field"):
        native.conv_params(kernel_size=3)
