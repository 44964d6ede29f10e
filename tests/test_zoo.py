"""The offline zoo: shipped teachers reach their accuracy, EfficientNet-Lite0 sees real photos, entries are listed."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeq import EdgeqError
from edgeq.data import load_fashion_mnist, load_photos
from edgeq.evaluate import evaluate, predict
from edgeq.models import load_model
from edgeq.zoo import ZOO, registry

THRESHOLDS = {"fmnist-resnet": 0.91, "fmnist-mobilenet": 0.89, "fmnist-vit": 0.88}


@pytest.mark.parametrize("name", sorted(THRESHOLDS))
def test_teacher_accuracy_from_shipped_weights(name):
    result = evaluate(f"zoo:{name}", "fmnist-test")
    assert result["images"] == 10000
    assert result["top1"] >= THRESHOLDS[name]
    assert result["top1"] == pytest.approx(registry.load()[name]["metrics"]["fashion-mnist:test top1"], abs=5e-4)


def test_registry_hashes_match_the_shipped_files():
    from importlib import resources

    from edgeq.manifest import sha256_path

    for name in THRESHOLDS:
        record = registry.load()[name]
        assert record["sha256"] == sha256_path(resources.files("edgeq.zoo").joinpath(record["file"]))
        assert record["data"] == "fashion-mnist:A" and record["seed"] == 0


def test_teachers_are_traceable_for_batchnorm_folding():
    from torch import nn

    from edgeq.graph import fold_batchnorm

    for name in ("fmnist-resnet", "fmnist-mobilenet"):
        folded = fold_batchnorm(load_model(f"zoo:{name}").module)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_efficientnet_lite0_sees_the_cat():
    model = load_model("zoo:efficientnet-lite0")
    photos = load_photos()
    assert len(photos) >= 20
    chelsea = photos.names.index("skimage:chelsea")
    logits = predict(model.module, model.preprocess(photos.images[chelsea : chelsea + 1]))
    top5 = {model.classes[i] for i in np.argsort(-logits[0])[:5]}
    assert top5 & {"tabby", "tiger cat", "Egyptian cat"}
    assert len(model.classes) == 1000 and model.preprocess.input_shape == (1, 3, 224, 224)


def test_zoo_list_shows_every_entry(monkeypatch, capsys):
    from edgeq.cli.main import main

    monkeypatch.setattr(sys, "argv", ["edgeq", "zoo", "list", "--json"])
    with pytest.raises(SystemExit) as info:
        main()
    rows = json.loads(capsys.readouterr().out)
    assert info.value.code == 0
    assert [r["name"] for r in rows] == [f"zoo:{n}" for n in ZOO] and len(rows) == 8
    from edgeq.zoo import generator_shipped

    for row in rows:
        name = row["name"].removeprefix("zoo:")
        if ZOO[name].kind == "generator" and not generator_shipped(name):
            assert row["weights"].startswith("not in this installation"), name
            continue
        assert {"script", "seed", "data", "sha256"} <= set(row), row["name"]


def _cifar_assets(name: str):
    from edgeq import assets

    weights, test = assets.find(ZOO[name].asset), assets.find("datasets/cifar10/test")
    if weights is None or test is None:
        pytest.skip(f"{ZOO[name].asset} or datasets/cifar10/test not in the assets folder (set EDGEQ_ASSETS)")
    return test


def test_cifar_resnet_option_a_shortcut_pads_channels_around_the_subsampled_identity():
    import torch

    from edgeq.zoo.cifar_resnet import CifarResNet

    model = CifarResNet(20)
    shortcut = model.layer2[0].shortcut
    x = torch.randn(2, 16, 32, 32)
    y = shortcut(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()
    # He et al. 2016, table 6: ResNet-20 has 0.27M parameters, ResNet-56 0.85M (the shortcuts have none).
    assert sum(p.numel() for p in model.parameters()) == 269722
    assert sum(p.numel() for p in CifarResNet(56).parameters()) == 853018
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["cifar10-resnet20", "cifar10-resnet56"])
def test_cifar_resnet_loads_shared_weights_and_classifies_test_images(name):
    from PIL import Image

    test = _cifar_assets(name)
    model = load_model(f"zoo:{name}")
    assert model.classes == tuple(sorted(p.name for p in test.iterdir() if p.is_dir()))
    assert model.preprocess.input_shape == (1, 3, 32, 32) and model.eval_data == str(test)
    # The first image of each of the first eight classes: the models score 81-83% on this JPEG copy.
    files = [sorted((test / c).iterdir())[0] for c in model.classes[:8]]
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    predicted = predict(model.module, model.preprocess(images)).argmax(1)
    assert (predicted == np.arange(8)).sum() >= 6, [model.classes[i] for i in predicted]


def test_cifar_resnet_without_weights_says_what_to_set(monkeypatch, tmp_path, capsys):
    from edgeq.cli.main import main

    monkeypatch.setenv("EDGEQ_ASSETS", str(tmp_path))
    with pytest.raises(EdgeqError) as info:
        load_model("zoo:cifar10-resnet20")
    assert "EDGEQ_ASSETS" in str(info.value) and "models/cifar10-resnet20.safetensors" in str(info.value)
    monkeypatch.setattr(sys, "argv", ["edgeq", "eval", "zoo:cifar10-resnet20", "--data", "fmnist-test"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0 and len(err.splitlines()) == 1 and "set EDGEQ_ASSETS" in err
    monkeypatch.setattr(sys, "argv", ["edgeq", "zoo", "list", "--json"])
    with pytest.raises(SystemExit):
        main()
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["zoo:cifar10-resnet56"]["weights"].startswith("not found, set EDGEQ_ASSETS")
    assert "weights" not in rows["zoo:fmnist-resnet"]


def test_assets_default_to_shared_beside_the_checkout(monkeypatch):
    from pathlib import Path

    from edgeq import assets

    monkeypatch.delenv("EDGEQ_ASSETS", raising=False)
    checkout = Path(assets.__file__).resolve().parent.parent
    assert assets.checkout_default() == (checkout.parent / "shared").resolve()
    assert assets.assets_dir() == (assets.checkout_default() if assets.checkout_default().is_dir() else None)


def test_eval_prints_top1_json(monkeypatch, capsys):
    from edgeq.cli.main import main

    monkeypatch.setattr(
        sys, "argv", ["edgeq", "eval", "builtin:tiny-fmnist", "--data", "fmnist-test", "--num-images", "500", "--json"]
    )
    with pytest.raises(SystemExit) as info:
        main()
    result = json.loads(capsys.readouterr().out)
    assert info.value.code == 0 and 0.8 < result["top1"] <= 1.0 and result["images"] == 500


def test_eval_of_a_quantized_folder_reports_agreement(quantized_dirs):
    result = evaluate(str(quantized_dirs("w8a8")), "fmnist-test", num_images=300)
    assert result["bits"] == "w8a8"
    assert (
        result["agreement_with_fp"]["top1"] > 0.9
        and result["agreement_with_fp"]["top5"] >= result["agreement_with_fp"]["top1"]
    )


def test_generator_is_not_a_model():
    with pytest.raises(EdgeqError, match="generator"):
        load_model("zoo:fmnist-generator")


def test_fashion_mnist_splits_are_disjoint_halves():
    from edgeq.data import split_indices

    a, b = split_indices("A"), split_indices("B")
    assert len(a) == len(b) == 30000 and not set(a) & set(b)
    assert np.array_equal(load_fashion_mnist("A").labels, load_fashion_mnist("train").labels[a])


def test_missing_fashion_mnist_names_the_package(monkeypatch, tmp_path):
    import edgeq.data as data

    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(EdgeqError) as info:
        data.load_fashion_mnist("test")
    assert "apt-get install dataset-fashion-mnist" in info.value.hint


def _gate():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "generator_gate", Path(__file__).parents[1] / "benchmarks" / "generator_gate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_loads_from_zoo_and_draws_recognizable_classes():
    """A small sample of the quality gate (the full gate: benchmarks/generator_gate.py, 50 images per class)."""
    result = _gate().measure(per_class=8)
    assert result["overall"] >= 0.6
    assert sum(rate > 0 for rate in result["per_class"].values()) >= 8


@pytest.mark.slow
def test_generator_quality_gate():
    result = _gate().measure(per_class=50)
    assert result["overall"] >= 0.80


def test_a_generator_missing_from_the_installation_names_its_training_command(monkeypatch):
    import edgeq.zoo as zoo
    from edgeq.stages import synth

    monkeypatch.setattr(zoo, "generator_shipped", lambda name: False)
    with pytest.raises(EdgeqError) as info:
        synth.resolve_generator("zoo:cifar10-generator")
    assert "zoo:cifar10-generator" in info.value.message
    assert info.value.hint == "train it: python -m edgeq.zoo.train_generator --dataset cifar10"
    with pytest.raises(EdgeqError, match="not a generator") as info:
        synth.resolve_generator("zoo:cifar10-resnet20")
    assert "zoo:fmnist-generator, zoo:cifar10-generator" in info.value.hint


def test_vae_check_measures_what_the_judge_recognizes_after_reconstruction():
    """The shipped Fashion-MNIST VAE: the judge loses a few points to its blur (86.9% against 91.9% on 1,000)."""
    from edgeq.zoo import generator_folder

    check = _gate().reconstructions(str(Path(generator_folder()) / "vae"), "zoo:fmnist-generator", count=200)
    assert check["images"] == 200 and check["top1_originals"] >= 0.85
    assert check["top1_originals"] - 0.15 < check["top1_reconstructions"] < check["top1_originals"] + 0.03
    assert 25 < check["psnr_db"] < 35
