"""End to end on the tiny built-in model: stages, manifests, reuse, x86 natively and arm64 under qemu."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from edgeq.targets import get_target

from edgeq import EdgeqError
from edgeq.data import load_synth_images
from edgeq.folders import MODULE_FILE
from edgeq.manifest import MANIFEST_NAME, Manifest, staged_folder
from edgeq.pipeline import RunOptions, run, spec_folder_name
from edgeq.spec import QuantSpec
from edgeq.stages import compile as compile_stage
from edgeq.stages import export as export_stage
from edgeq.stages import quantize as quantize_stage
from edgeq.stages import synth as synth_stage
from edgeq.stages import verify as verify_stage

from .conftest import TINY, requires_emulator


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, synth_dir):
    root = tmp_path_factory.mktemp("stages")
    quantize_stage.run(TINY, synth_dir, root / "quantized", bits="w2a4", num_images=16)
    return export_stage.run(root / "quantized", root / "exported")


def test_synth_is_deterministic_and_records_every_image(tmp_path, tiny_generator, builtin_model, synth_dir):
    again = synth_stage.run(
        tiny_generator,
        builtin_model.classes,
        tmp_path / "again",
        synth_stage.SynthOptions(num_images=16, seed=3, steps=4),
    )
    other = synth_stage.run(
        tiny_generator,
        builtin_model.classes,
        tmp_path / "other",
        synth_stage.SynthOptions(num_images=16, seed=4, steps=4),
    )
    shard = synth_stage.SHARD_PATTERN.format(0)
    assert (synth_dir / shard).read_bytes() == (again / shard).read_bytes()
    assert (synth_dir / shard).read_bytes() != (other / shard).read_bytes()
    manifest = Manifest.load(synth_dir, "synth")
    assert len(manifest.extra["images"]) == 16
    first = manifest.extra["images"][0]
    assert first["prompt"].startswith("a photo of a ") and len(first["classes"]) == 2 and first["weights"] == [0.5, 0.5]
    images = load_synth_images(synth_dir)
    assert images.images.shape == (16, 64, 64, 3) and images.images.dtype == np.uint8
    from PIL import Image

    preview = np.asarray(Image.open(synth_dir / synth_stage.PREVIEW_NAME))
    assert preview.shape == (2 * 64, 8 * 64, 3)
    assert np.array_equal(preview[64:128, 64:128], images.images[9])  # row 1, column 1
    assert np.allclose(images.soft_labels.sum(1), 1.0)


def test_embedding_fusion_generates_from_mixed_text_embeddings(tmp_path, tiny_generator, builtin_model):
    from edgeq.prompts import PromptOptions, PromptPlan

    options = PromptOptions(fusion="embedding", mix_k=3)
    out = synth_stage.run(
        tiny_generator,
        builtin_model.classes,
        tmp_path / "embedding",
        synth_stage.SynthOptions(num_images=4, seed=1, steps=2, prompts=options),
    )
    manifest = Manifest.load(out, "synth")
    assert manifest.params["prompts"]["fusion"] == "embedding"
    record = manifest.extra["images"][0]
    assert len(record["components"]) == 3 and len(set(record["classes"])) == 3
    soft = load_synth_images(out).soft_labels[0]
    assert np.allclose(soft[record["classes"]], record["weights"])

    # A mix that puts all weight on one class conditions exactly as that class's own prompt does.
    pipeline = synth_stage.load_generator(tiny_generator)
    one_hot = PromptPlan("mix", (0, 1), (1.0, 0.0), 0, ("a photo of a t-shirt", "a photo of a trousers"))
    mixed = synth_stage._conditioning(pipeline, [one_hot], guidance_scale=3.0)
    direct = pipeline.encode_prompt(["a photo of a t-shirt"], pipeline.device, 1, True, negative_prompt=[""])
    assert torch.equal(mixed["prompt_embeds"], direct[0]) and torch.equal(mixed["negative_prompt_embeds"], direct[1])


def test_noise_strategy_needs_no_generator_and_is_deterministic(tmp_path, builtin_model):
    first = synth_stage.run(
        "no-such-generator",
        builtin_model.classes,
        tmp_path / "a",
        synth_stage.SynthOptions(strategy="noise", num_images=300, seed=5, size=28),
    )
    again = synth_stage.run(
        "no-such-generator",
        builtin_model.classes,
        tmp_path / "b",
        synth_stage.SynthOptions(strategy="noise", num_images=300, seed=5, size=28),
    )
    shard = synth_stage.SHARD_PATTERN.format(1)
    assert (first / shard).read_bytes() == (again / shard).read_bytes()
    images = load_synth_images(first)
    assert images.images.shape == (300, 28, 28, 3) and not images.soft_labels.any()
    pixels = images.images.astype(np.float64)
    # Clipping at 0 and 255 (about 2.3% of draws each side at 2 sigma) pulls the std a little under 64.
    assert pixels.mean() == pytest.approx(synth_stage.NOISE_MEAN, abs=0.5) and 58 < pixels.std() < 64
    assert Manifest.load(first, "synth").inputs == [] and Manifest.load(first, "synth").params["size"] == 28
    with pytest.raises(EdgeqError, match="image size"):
        synth_stage.run(
            "x", builtin_model.classes, tmp_path / "c", synth_stage.SynthOptions(strategy="noise", num_images=4)
        )
    with pytest.raises(EdgeqError, match="synthesis strategy"):
        synth_stage.run(
            "x", builtin_model.classes, tmp_path / "d", synth_stage.SynthOptions(strategy="uniform", num_images=4)
        )
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_manifests_record_inputs_and_versions(export_dir):
    manifest = json.loads((export_dir / MANIFEST_NAME).read_text())
    assert manifest["stage"] == "export" and manifest["spec"]["bits"] == "w2a4"
    assert len(manifest["inputs"][0]["sha256"]) == 64
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["versions"])
    assert manifest["outputs"][0]["path"] == "model.onnx"


@pytest.mark.skipif(bool(get_target("x86-avx512").missing_host_features()), reason="this CPU lacks AVX-512 with VNNI")
def test_x86_avx512_module_runs_the_vnni_kernel_and_matches_onnxruntime(tmp_path, export_dir):
    # what 'host' resolves to on an AVX-512 VNNI machine, so what the default one-shot builds there
    compiled = compile_stage.run(export_dir, tmp_path / "compiled", target="x86-avx512")
    manifest = Manifest.load(compiled, "compile")
    assert (
        manifest.target == "x86-avx512"
        and manifest.extra["build"]["path"] == "kernels"
        and manifest.extra["build"]["layout"] == "vnni"
        and set(manifest.extra["build"]["weight_layouts"]) == {"vnni"}  # 8-bit edge layers too
    )
    report = verify_stage.run(
        compiled, tmp_path / "verified", data="fashion-mnist:test", num_images=200, latency_runs=5
    )
    assert report["target"] == "x86-avx512" and report["ran"] == "native" and report["agreement_with_reference"] == 1.0
    assert report["agreement_with_onnxruntime"] >= 0.99 and report["max_abs_diff_vs_onnxruntime"] < 1e-3
    assert report["latency_ms"] > 0


def test_stage_folders_tell_apart_specs_with_the_same_widths():
    assert spec_folder_name(QuantSpec.parse("w2a4")) == "w2a4"
    mixed = QuantSpec(4, 4, layers=(("layer1", 2, 4),))
    assert spec_folder_name(mixed) == str(mixed)
    uniform_edges = QuantSpec(2, 4, first_last_bits=2)
    assert spec_folder_name(uniform_edges).startswith("w2a4-") and spec_folder_name(uniform_edges) != spec_folder_name(
        QuantSpec(2, 4, act_observer="minmax")
    )


def test_run_options_take_parsed_settings():
    with pytest.raises(TypeError, match="QuantSpec"):
        RunOptions(spec="w2a4")
    with pytest.raises(TypeError, match="Target"):
        RunOptions(target="x86")
    assert RunOptions().target.name == get_target("host").name != "host"


def test_x86_compiled_module_matches_onnxruntime(tmp_path, export_dir):
    compiled = compile_stage.run(export_dir, tmp_path / "compiled", target="x86")
    assert (compiled / MODULE_FILE).is_file()
    report = verify_stage.run(
        compiled, tmp_path / "verified", data="fashion-mnist:test", num_images=200, latency_runs=5
    )
    assert report["agreement_with_reference"] == 1.0 and report["reference_images"] == 100  # every bit, every output
    assert report["agreement_with_onnxruntime"] >= 0.99
    assert report["max_abs_diff_vs_onnxruntime"] < 1e-3
    assert report["compiled_top1"] == pytest.approx(report["onnxruntime_top1"], abs=0.01)
    assert report["quant_top1"] == pytest.approx(report["onnxruntime_top1"], abs=0.01)
    assert report["latency_ms"] > 0 and report["latency_p90_ms"] >= report["latency_ms"]
    assert report["fp_top1"] > 0.8  # the float model is good; W2A4 round-to-nearest is not (yet)


@pytest.mark.qemu
@requires_emulator
@pytest.mark.parametrize(
    "target, qemu_cpu", [("rpi4", "cortex-a72"), ("rpi5", "cortex-a76"), ("jetson-orin", "cortex-a76")]
)
def test_arm64_module_under_qemu_equals_the_reference(tmp_path, export_dir, target, qemu_cpu):
    compiled = compile_stage.run(export_dir, tmp_path / "compiled", target=target)
    build = Manifest.load(compiled, "compile").extra["build"]
    assert build["path"] == "kernels"
    # the A72 has no dot product: its 2-bit layers with 4-bit inputs run on table lookups
    assert ("neon-lut" in build["weight_layouts"]) == (target == "rpi4"), build["weight_layouts"]
    assert (compiled / MODULE_FILE).read_bytes()[:4] == b"\x7fELF"
    assert (compiled / MODULE_FILE).read_bytes()[18] == 183  # e_machine EM_AARCH64
    report = verify_stage.run(
        compiled, tmp_path / "verified", data="fashion-mnist:test", num_images=100, latency_runs=5
    )
    assert report["ran"] == f"qemu-aarch64 -cpu {qemu_cpu}"
    assert report["agreement_with_reference"] == 1.0  # the same bits as the NumPy reference computed on x86
    assert report["agreement_with_onnxruntime"] >= 0.99
    assert report["max_abs_diff_vs_onnxruntime"] < 1e-3
    assert report["latency_ms"] is None and "not measured" in report["latency_note"]


def test_one_shot_reuses_unchanged_stages(tmp_path, tiny_generator):
    options = RunOptions(
        target=get_target("x86"),
        spec=QuantSpec.parse("w4a4"),
        run_dir=str(tmp_path / "run"),
        generator=tiny_generator,
        num_images=16,
        eval_images=50,
        latency_runs=3,
        iters=20,
    )
    first = run(TINY, options)
    assert set(first["stages"].values()) == {"ran"}
    for key in (
        "model",
        "target",
        "bits",
        "fp_top1",
        "quant_top1",
        "compiled_top1",
        "agreement_with_onnxruntime",
        "latency_ms",
        "artifact",
    ):
        assert key in first
    assert first["agreement_with_reference"] == 1.0
    assert first["agreement_with_onnxruntime"] >= 0.99 and first["latency_ms"] > 0
    assert Path(first["artifact"]).is_file()
    second = run(TINY, options)
    assert set(second["stages"].values()) == {"reused"}
    assert second["compiled_top1"] == first["compiled_top1"]
    third = run(TINY, dataclasses.replace(options, target=get_target("x86-avx2")))
    assert third["stages"] == {
        "synth": "reused",
        "quantize": "reused",
        "export": "reused",
        "compile": "ran",
        "verify": "ran",
    }
    budgeted = run(TINY, dataclasses.replace(options, time_budget=30.0, window=16, bias_correction=True))
    assert budgeted["stages"]["synth"] == "reused" and budgeted["stages"]["quantize"] == "ran"
    quant_dir = Path(budgeted["stage_dirs"]["quantize"])
    params = Manifest.load(quant_dir, "quantize").params
    recorded = params["reconstruction"]
    assert (recorded["time_budget"], recorded["window"], params["bias_correction"]) == (30.0, 16, True)


def test_interrupted_stage_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(tmp_path / "stage") as partial:
            (partial / "half.bin").write_bytes(b"x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
