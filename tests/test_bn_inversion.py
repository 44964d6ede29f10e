"""BatchNorm inversion: optimized images match the running statistics far better than noise, deterministically."""

import numpy as np
import pytest
import torch

from edgeq import EdgeqError
from edgeq.bn_inversion import InversionSettings, batchnorm_layers, invert, statistics_loss
from edgeq.manifest import Manifest
from edgeq.models import load_model
from edgeq.stages import synth


def _loss(model, images):
    x = torch.from_numpy(model.preprocess(images))
    with torch.no_grad():
        return statistics_loss(model.module.eval(), x, batchnorm_layers(model.module)).item()


def test_inversion_lowers_the_batchnorm_statistics_gap(builtin_model):
    settings = InversionSettings(iterations=60, batch_size=16)
    images = invert(builtin_model, list(range(16)), settings)
    noise = synth.noise_images([synth.PromptPlan("", (), (), s) for s in range(16)], builtin_model.preprocess.height)
    assert images.shape == (16, 28, 28, 3) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], images[..., 2])  # a grayscale model's images stay gray
    assert _loss(builtin_model, images) < 0.1 * _loss(builtin_model, noise)  # measured: about 0.014
    assert all(p.requires_grad for p in builtin_model.module.parameters())  # the model is left trainable as found


def test_bn_inversion_strategy_is_deterministic_and_records_the_model(tmp_path, builtin_model):
    settings = InversionSettings(iterations=5, batch_size=8)
    first = synth.run(
        "unused",
        builtin_model.classes,
        tmp_path / "a",
        synth.SynthOptions(strategy="bn-inversion", num_images=12, seed=2, inversion=settings),
        model=builtin_model,
    )
    again = synth.run(
        "unused",
        builtin_model.classes,
        tmp_path / "b",
        synth.SynthOptions(strategy="bn-inversion", num_images=12, seed=2, inversion=settings),
        model=builtin_model,
    )
    shard = synth.SHARD_PATTERN.format(0)
    assert (first / shard).read_bytes() == (again / shard).read_bytes()
    manifest = Manifest.load(first, "synth")
    assert manifest.inputs[0]["role"] == "model" and manifest.params["inversion"]["iterations"] == 5
    with pytest.raises(EdgeqError, match="needs the model"):
        synth.run(
            "unused", builtin_model.classes, tmp_path / "c", synth.SynthOptions(strategy="bn-inversion", num_images=4)
        )


def test_a_model_without_batchnorm_is_refused(tmp_path):
    vit = load_model("zoo:fmnist-vit")
    with pytest.raises(EdgeqError, match="no BatchNorm"):
        synth.run(
            "unused", vit.classes, tmp_path / "v", synth.SynthOptions(strategy="bn-inversion", num_images=4), model=vit
        )
    assert not (tmp_path / "v").exists()


def test_inversion_shows_progress_per_optimization_step(builtin_model, monkeypatch):
    from edgeq import bn_inversion

    bars = []

    class Recording(bn_inversion.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(bn_inversion, "tqdm", Recording)
    invert(builtin_model, list(range(10)), InversionSettings(iterations=7, batch_size=4), progress=lambda count: None)
    # One bar per batch (4 + 4 + 2 images), each advanced once per Adam step; the caller's progress counts images.
    steps = [bar for bar in bars if bar.unit == "step"]
    assert [(bar.total, bar.n) for bar in steps] == [(7, 7)] * 3
    assert [bar.desc for bar in steps] == [f"bn-inversion batch {i}/3" for i in (1, 2, 3)]


def _exported_bn_cnn(path):
    """A small 3-channel CNN with BatchNorm, exported as a user would: torch.export, dynamic batch, no metadata."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 4),
    )
    # Running statistics of smooth, tinted images (reachable by inversion, far from what pixel noise produces).
    for bn in (model[1], model[4]):
        bn.momentum = None  # a plain average over the batches below
    with torch.no_grad():
        for _ in range(4):
            smooth = torch.nn.functional.interpolate(torch.rand(32, 3, 4, 4), size=16, mode="bilinear")
            model(smooth * torch.tensor([1.0, 0.6, 0.2]).view(1, 3, 1, 1) * 2 - 1)
    program = torch.export.export(
        model.eval(), (torch.rand(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, path)
    return path


def test_bn_inversion_on_an_exported_program(tmp_path, monkeypatch):
    import sys

    from edgeq.cli.main import main

    from edgeq.data import load_synth_images

    path = _exported_bn_cnn(tmp_path / "model.pt2")
    model = load_model(str(path))
    assert model.module.eval() is model.module and not model.module.training  # as for any other model
    with pytest.raises(NotImplementedError, match="no training mode"):
        model.module.train()
    monkeypatch.setattr(
        sys,
        "argv",
        ["edgeq", "synth", str(path), "--strategy", "bn-inversion", "--num-images", "8", "--inversion-iters", "40"]
        + ["-o", str(tmp_path / "calib")],
    )
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0
    images = load_synth_images(tmp_path / "calib").images
    noise = synth.noise_images([synth.PromptPlan("", (), (), s) for s in range(8)], 16)
    assert images.shape == (8, 16, 16, 3)
    assert _loss(model, images) < 0.1 * _loss(model, noise)  # measured: about 0.0005 against 0.2


def test_soft_targets_mix_two_distinct_classes():
    from edgeq.bn_inversion import soft_targets

    targets = soft_targets(500, 10, torch.Generator().manual_seed(0))
    assert torch.allclose(targets.sum(1), torch.ones(500))
    assert ((targets > 0).sum(1) <= 2).all() and (targets.max(1).values >= 0.5).all()
    assert len(set(targets.argmax(1).tolist())) == 10  # every class is a target somewhere


def test_soft_labels_pull_images_toward_their_targets(builtin_model):
    """With the label term the model calls an image one of its two target classes; without, by chance only."""
    from edgeq.bn_inversion import soft_targets

    seeds = list(range(16))
    targets = soft_targets(16, 10, torch.Generator().manual_seed(seeds[0] + 1))
    hits = []
    for weight in (0.0, 1.0):
        settings = InversionSettings(iterations=60, batch_size=16, label_weight=weight, jitter=1)
        images = invert(builtin_model, seeds, settings)
        with torch.no_grad():
            predicted = builtin_model.module.eval()(torch.from_numpy(builtin_model.preprocess(images))).argmax(1)
        hits.append(float((targets[torch.arange(16), predicted] > 0).float().mean()))
    assert hits[1] >= 0.9 and hits[1] > hits[0]  # two classes of ten: about 0.2 by chance


def test_inversion_settings_are_checked_and_the_cli_defaults_match():
    import click
    from edgeq.cli.main import synth as synth_command

    with pytest.raises(EdgeqError, match="cannot be negative"):
        InversionSettings(jitter=-1)
    with pytest.raises(EdgeqError, match="positive"):
        InversionSettings(iterations=0)
    defaults = {p.name: p.default for p in synth_command.params if isinstance(p, click.Option)}
    settings = InversionSettings()
    assert (defaults["inversion_iters"], defaults["inversion_labels"], defaults["inversion_jitter"]) == (
        settings.iterations,
        settings.label_weight,
        settings.jitter,
    )
