"""Synthesis as a long job: resuming after a kill, GenQ-style filtering, the source defaults, and diagnostics."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from edgeq import EdgeqError
from edgeq.bn_inversion import batchnorm_layers, statistics_loss
from edgeq.data import load_synth_images
from edgeq.diagnostics import (
    FilterOptions,
    bn_sensitivity_scores,
    energy_scores,
    inspect_images,
    mean_pairwise_distance,
    select_lowest,
)
from edgeq.manifest import Manifest
from edgeq.models import LoadedModel
from edgeq.prompts import PromptOptions
from edgeq.stages import synth

from .conftest import TINY


def _shard_hashes(folder):
    return {
        o["path"]: o["sha256"] for o in Manifest.load(folder, "synth").outputs if o["path"].endswith(".safetensors")
    }


@pytest.mark.parametrize("strategy, fusion", [("single", "text"), ("mixup", "text"), ("mixup", "embedding")])
def test_every_prompt_strategy_runs_on_a_tiny_pipeline(tmp_path, tiny_generator, builtin_model, strategy, fusion):
    out = synth.run(
        tiny_generator,
        builtin_model.classes,
        tmp_path / "s",
        synth.SynthOptions(
            strategy=strategy, num_images=6, seed=1, steps=2, prompts=PromptOptions(fusion=fusion), shard_size=4
        ),
    )
    images = load_synth_images(out)
    assert images.images.shape == (6, 64, 64, 3) and sorted(_shard_hashes(out)) == [
        "images-00000.safetensors",
        "images-00001.safetensors",
    ]
    per_image = 1 if strategy == "single" else 2
    assert ((images.soft_labels > 0).sum(1) == per_image).all() and np.allclose(images.soft_labels.sum(1), 1.0)


def test_an_interrupted_run_continues_where_it_stopped(tmp_path, tiny_generator, builtin_model, monkeypatch):
    settings = {"num_images": 10, "seed": 7, "steps": 2, "shard_size": 4, "batch_size": 2}
    whole = synth.run(tiny_generator, builtin_model.classes, tmp_path / "whole", synth.SynthOptions(**settings))

    saved = []
    real_save = synth._save_shard

    def save_then_die(path, tensors):
        if len(saved) == 1:
            raise KeyboardInterrupt  # as if killed while making the second shard
        real_save(path, tensors)
        saved.append(path.name)

    monkeypatch.setattr(synth, "_save_shard", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        synth.run(tiny_generator, builtin_model.classes, tmp_path / "resumed", synth.SynthOptions(**settings))
    work = synth.work_folder(tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists() and sorted(p.name for p in work.iterdir()) == [
        "images-00000.safetensors",
        synth.STATE_NAME,
    ]

    monkeypatch.setattr(synth, "_save_shard", real_save)
    made = []
    real_maker = synth._diffusion_maker

    def counting_maker(*args, **kwargs):
        make = real_maker(*args, **kwargs)
        return lambda plans, progress=None: made.append(len(plans)) or make(plans, progress)

    monkeypatch.setattr(synth, "_diffusion_maker", counting_maker)
    resumed = synth.run(tiny_generator, builtin_model.classes, tmp_path / "resumed", synth.SynthOptions(**settings))
    assert made == [4, 2]  # only the two missing shards were made
    assert _shard_hashes(resumed) == _shard_hashes(whole) and not work.exists()
    assert Manifest.load(resumed, "synth").extra["images"] == Manifest.load(whole, "synth").extra["images"]


@pytest.mark.parametrize("strategy", ["noise", "bn-inversion"])
def test_the_planned_fingerprint_is_the_one_a_run_writes(tmp_path, builtin_model, strategy):
    # the one-shot plans a stage to decide whether to reuse it: a plan that differs from the run never reuses
    from edgeq.bn_inversion import InversionSettings

    options = synth.SynthOptions(
        strategy=strategy, num_images=2, seed=1, inversion=InversionSettings(iterations=1)
    )  # size: the model's
    out = synth.run(None, builtin_model.classes, tmp_path / strategy, options, model=builtin_model)
    written = Manifest.load(out, "synth")
    assert written.params["size"] == builtin_model.preprocess.height
    assert synth.plan(None, builtin_model.classes, options, model=builtin_model).fingerprint == written.fingerprint
    assert (
        synth.plan(None, builtin_model.classes, dataclasses.replace(options, seed=2), model=builtin_model).fingerprint
        != written.fingerprint
    )


def test_an_unfinished_run_with_other_settings_is_discarded(tmp_path, builtin_model):
    work = synth.work_folder(tmp_path / "out")
    work.mkdir()
    (work / synth.STATE_NAME).write_text(json.dumps({"fingerprint": "other", "candidates": 4}))
    (work / synth.SHARD_PATTERN.format(0)).write_bytes(b"not a shard")
    (work / ".images-00001.safetensors.partial-1234").write_bytes(b"half")
    out = synth.run(
        None,
        builtin_model.classes,
        tmp_path / "out",
        synth.SynthOptions(strategy="noise", num_images=4, seed=0, size=8),
    )
    assert len(load_synth_images(out)) == 4 and not work.exists()
    # killed again with other settings after the folder was made: the same settings' rerun cleans that up
    work.mkdir()
    (work / synth.STATE_NAME).write_text(json.dumps({"fingerprint": "other", "candidates": 4}))
    synth.run(
        None,
        builtin_model.classes,
        tmp_path / "out",
        synth.SynthOptions(strategy="noise", num_images=4, seed=0, size=8),
    )
    assert not work.exists()


def test_a_killed_command_continues_with_nothing_lost_or_duplicated(tmp_path, tiny_generator):
    command = [
        sys.executable,
        "-m",
        "edgeq.cli.main",
        "synth",
        TINY,
        "--generator",
        tiny_generator,
        "--strategy",
        "single",
        "--num-images",
        "48",
        "--shard-size",
        "4",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--seed",
        "5",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # run from the test's folder: `python -m` puts the working directory first on sys.path, and the checkout's
    # kernels/ folder would stand in for the installed `kernels` package transformers imports
    whole = tmp_path / "whole"
    subprocess.run([*command, "-o", str(whole)], check=True, capture_output=True, env=env, cwd=tmp_path)
    killed = tmp_path / "killed"
    work = synth.work_folder(killed)
    process = subprocess.Popen(
        [*command, "-o", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path
    )
    deadline = time.monotonic() + 120
    while not (work.exists() and list(work.glob("images-*.safetensors"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before_kill = len(list(work.glob("images-*.safetensors")))
    assert not killed.exists() and 1 <= finished_before_kill < 12
    done = subprocess.run(
        [*command, "-o", str(killed)], check=True, capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert "continuing an unfinished run" in done.stderr
    assert _shard_hashes(killed) == _shard_hashes(whole) and len(load_synth_images(killed)) == 48


def test_energy_filter_keeps_the_lowest_energy_candidates(tmp_path, tiny_generator, builtin_model):
    filtering = FilterOptions(method="energy", keep=0.5)
    out = synth.run(
        tiny_generator,
        builtin_model.classes,
        tmp_path / "f",
        synth.SynthOptions(strategy="single", num_images=6, seed=2, steps=2, filtering=filtering, shard_size=4),
        model=builtin_model,
    )
    manifest = Manifest.load(out, "synth")
    kept = manifest.extra["images"]
    assert len(kept) == 6 and manifest.extra["filter"]["candidates"] == 12
    assert manifest.extra["filter"]["kept_score_max"] <= manifest.extra["filter"]["dropped_score_min"]
    assert [r["candidate"] for r in kept] == sorted(r["candidate"] for r in kept)
    images = load_synth_images(out)
    recomputed = energy_scores(builtin_model, images.images)
    assert np.allclose(recomputed, [r["score"] for r in kept], atol=1e-5)
    assert manifest.inputs[-1]["role"] == "model" and not (out / synth.CANDIDATES_DIR).exists()
    unfiltered = load_synth_images(
        synth.run(
            tiny_generator,
            builtin_model.classes,
            tmp_path / "u",
            synth.SynthOptions(strategy="single", num_images=12, seed=2, steps=2, shard_size=4),
        )
    )
    assert np.array_equal(
        unfiltered.images[[r["candidate"] for r in kept]], images.images
    )  # candidates are the unfiltered images


def test_scores_match_their_definitions(builtin_model):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28, 3), dtype=np.uint8)
    x = torch.from_numpy(builtin_model.preprocess(images))
    with torch.no_grad():
        logits = builtin_model.module.eval()(x)
        expected_energy = -torch.logsumexp(logits, 1).numpy()
        # With one image a batch's statistics are the image's own: the inversion loss is the per-image score.
        expected_bn = [
            statistics_loss(builtin_model.module, x[i : i + 1], batchnorm_layers(builtin_model.module)).item()
            for i in range(5)
        ]
    assert np.allclose(energy_scores(builtin_model, images), expected_energy, atol=1e-5)
    assert np.allclose(bn_sensitivity_scores(builtin_model, images), expected_bn, rtol=1e-4)
    assert select_lowest(np.array([3.0, 1.0, 2.0, 1.0, 5.0]), 3).tolist() == [1, 2, 3]
    assert FilterOptions(method="energy", keep=0.3).candidates(9) == 30 and FilterOptions().candidates(9) == 9


def test_filter_options_are_checked(builtin_model):
    with pytest.raises(EdgeqError, match="unknown filter 'best'"):
        FilterOptions(method="best")
    with pytest.raises(EdgeqError, match="filter-keep"):
        FilterOptions(method="energy", keep=1.5)
    with pytest.raises(EdgeqError, match="needs the model"):
        synth.run(
            None,
            builtin_model.classes,
            "unused",
            synth.SynthOptions(strategy="noise", size=8, num_images=2, filtering=FilterOptions(method="energy")),
        )


def test_source_defaults_follow_the_model(builtin_model):
    assert synth.choose_source(builtin_model, None, None) == ("zoo:fmnist-generator", "mixup")
    assert synth.choose_source(builtin_model, "./sd", "single") == ("./sd", "single")
    assert synth.choose_source(builtin_model, "./sd", "noise") == (None, "noise")
    foreign = LoadedModel(builtin_model.module, "model.pt", builtin_model.classes, builtin_model.preprocess)
    assert synth.choose_source(foreign, None, None) == (None, "bn-inversion")
    without_bn = LoadedModel(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)),
        "mlp.pt",
        builtin_model.classes,
        builtin_model.preprocess,
    )
    with pytest.raises(EdgeqError, match="needs a text-to-image generator"):
        synth.choose_source(without_bn, None, None)
    with pytest.raises(EdgeqError, match="needs a text-to-image generator"):
        synth.choose_source(foreign, None, "mixup")


def test_negative_prompt_reaches_the_pipeline(tmp_path, tiny_generator, builtin_model):
    plans = synth.plan_prompts(builtin_model.classes, 2, "single", 0)
    assert synth._conditioning(None, plans, 3.0, "blurry")["negative_prompt"] == ["blurry", "blurry"]
    plain = synth.run(
        tiny_generator,
        builtin_model.classes,
        tmp_path / "a",
        synth.SynthOptions(strategy="single", num_images=2, steps=2),
    )
    steered = synth.run(
        tiny_generator,
        builtin_model.classes,
        tmp_path / "b",
        synth.SynthOptions(strategy="single", num_images=2, steps=2, negative_prompt="blurry"),
    )
    assert _shard_hashes(plain) != _shard_hashes(steered)
    assert Manifest.load(steered, "synth").params["negative_prompt"] == "blurry"
    with pytest.raises(EdgeqError, match="half precision needs a GPU"):
        synth.run(
            tiny_generator, builtin_model.classes, tmp_path / "c", synth.SynthOptions(num_images=2, dtype="float16")
        )


def test_pairwise_distance_matches_a_double_loop():
    features = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pairs = [(i, j) for i in range(7) for j in range(7) if i != j]
    l2 = np.mean([torch.dist(features[i], features[j]).item() for i, j in pairs])
    cosine = np.mean(
        [1 - torch.nn.functional.cosine_similarity(features[i], features[j], dim=0).item() for i, j in pairs]
    )
    assert mean_pairwise_distance(features) == pytest.approx((l2, cosine), rel=1e-9)


def test_inspect_reports_coverage_entropy_and_diversity(builtin_model):
    from edgeq.data import load_fashion_mnist

    real = load_fashion_mnist("test").subset(200)
    report = inspect_images(builtin_model, real)
    assert report.images == 200 and sum(report.predicted_histogram) == 200
    assert report.class_coverage == 1.0 and report.predicted_balance > 0.95  # the test set is balanced
    assert report.top1_in_label > 0.8  # the tiny model's accuracy
    assert 0 < report.mean_entropy_normalized < 0.5 and report.feature_diversity > 0
    same = inspect_images(builtin_model, type(real)(np.repeat(real.images[:1], 4, 0), real.class_names))
    assert same.feature_diversity == pytest.approx(0.0, abs=1e-6) and same.class_coverage == 0.1


def test_a_hub_id_loads_from_the_local_cache(tmp_path, tiny_generator):
    """The same loading code serves hub ids (Stable Diffusion, SD-Turbo): here from a cache laid out as the hub's."""
    import shutil

    commit = "0" * 40
    snapshot = tmp_path / "hub" / "models--edgeq-test--tiny-sd" / "snapshots" / commit
    shutil.copytree(tiny_generator, snapshot)
    (tmp_path / "hub" / "models--edgeq-test--tiny-sd" / "refs").mkdir()
    (tmp_path / "hub" / "models--edgeq-test--tiny-sd" / "refs" / "main").write_text(commit)
    pipeline = synth.load_generator("edgeq-test/tiny-sd", cache_dir=tmp_path / "hub")
    assert type(pipeline).__name__ == "StableDiffusionPipeline" and pipeline.unet.config.sample_size == 16
