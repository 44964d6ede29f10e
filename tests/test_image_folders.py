"""Image folders in (ImageFolder layout and flat), preprocessing as the model was trained, and the board's copy."""

import json
import logging
import sys

import numpy as np
import pytest
import torch
from edgeq.cli.main import main
from PIL import Image

from edgeq import assets
from edgeq.data import Preprocess, PreprocessOverrides, list_image_folder, load_image_folder, resolve_dataset, select
from edgeq.errors import EdgeqError
from edgeq.models import load_model
from edgeq.runtime import runner

CIFAR_MODEL = "tests.factories:tiny_cifar"
CLASSES = ("cat", "dog", "eel")


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["edgeq", *args])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def _photo(rng, height, width):
    """A smooth image with some texture, as photos are (pure noise is the worst case of any resize)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """ImageFolder with 10 classes (4 images each, JPEG and PNG, sizes from 20 to 70 pixels), and a flat folder."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in range(10):
        for i in range(4):
            folder = root / "labelled" / f"class{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            image = _photo(rng, 20 + 5 * i + label, 70 - 3 * label)
            Image.fromarray(image).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "flat").mkdir()
    for i in range(5):
        Image.fromarray(_photo(rng, 40, 50 + i)).save(root / "flat" / f"img{i}.jpg")
    return root


def test_image_folder_lists_classes_in_sorted_order_and_interleaves(folders):
    listing = list_image_folder(folders / "labelled")
    assert listing.class_names == tuple(f"class{i:02d}" for i in range(10))
    assert listing.labels[:10] == tuple(range(10))  # the first image of each class, in turn
    assert listing.files[0].parent.name == "class00" and listing.files[10].name == "1.png"
    picked = select(listing, None, per_class=2, seed=3)
    assert sorted(picked.labels) == sorted(list(range(10)) * 2)
    assert select(listing, None, per_class=2, seed=3) == picked  # the seed decides
    assert select(listing, None, per_class=2, seed=4).files != picked.files
    assert len(select(listing, 7, per_class=2, seed=3).files) == 7


def test_folder_images_arrive_at_the_model_size_with_labels(folders):
    pre = Preprocess(3, 16, 16, (0.5,) * 3, (0.5,) * 3, crop_pct=0.875, interpolation="bicubic")
    images = load_image_folder(folders / "labelled", pre, per_class=1, seed=0)
    assert images.images.shape == (10, 16, 16, 3) and images.images.dtype == np.uint8
    assert sorted(images.labels) == list(range(10)) and images.label_kind == "hard"
    flat = resolve_dataset(str(folders / "flat"), preprocess=pre)
    assert len(flat) == 5 and flat.targets is None and flat.label_kind == "none"


def _torchvision_reference(path, pre: Preprocess) -> np.ndarray:
    import torchvision.transforms as T

    mode = T.InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    transform = T.Compose(
        [
            T.Resize(int(pre.height / pre.crop_pct), interpolation=mode),
            T.CenterCrop(pre.height),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ]
    )
    return transform(Image.open(path).convert("RGB")).numpy()


@pytest.mark.parametrize("interpolation,crop_pct", [("bilinear", 0.875), ("bicubic", 0.875), ("bicubic", 1.0)])
def test_preprocess_equals_torchvision_exactly(folders, interpolation, crop_pct):
    """Resize of the shorter side + center crop + ToTensor + Normalize: tolerance 0, both run Pillow's resize and the
    same float32 operations."""
    pre = Preprocess(3, 24, 24, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crop_pct, interpolation)
    listing = list_image_folder(folders / "labelled")
    ours = pre(load_image_folder(folders / "labelled", pre, count=12).images)
    reference = np.stack([_torchvision_reference(path, pre) for path in listing.files[:12]])
    assert np.array_equal(ours, reference)


def test_byte_scaling_is_x_minus_127_over_128_exactly():
    pre = Preprocess(3, 4, 4, (127 / 255,) * 3, (128 / 255,) * 3, scaling="byte")
    pixels = np.arange(48, dtype=np.uint8).reshape(1, 4, 4, 3) * 5
    expected = (pixels.astype(np.float32).transpose(0, 3, 1, 2) - 127) / 128
    assert np.array_equal(pre(pixels), expected)


def test_board_runner_preprocesses_as_the_host(folders):
    """The bundle's runner.py, fed preprocess.json as written (JSON), gives the host's inputs bit for bit with
    Pillow; its NumPy resize (boards without Pillow) is Pillow <= 11's algorithm: 0 levels on these images here,
    allowed 2 since Pillow >= 12 may run the vertical pass first (each pass rounds to 8 bits)."""
    rng = np.random.default_rng(1)
    raw = [_photo(rng, h, w) for h, w in ((40, 57), (63, 31), (24, 24), (90, 120))]
    for pre in (
        Preprocess(3, 24, 24, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875, "bicubic"),
        Preprocess(3, 20, 28, (127 / 255,) * 3, (128 / 255,) * 3, 1.0, "bilinear", "byte"),
        Preprocess(1, 28, 28, (0.5,), (0.5,)),  # stretched, RGB -> luma
    ):
        config = json.loads(json.dumps(pre.to_dict()))
        assert set(config) == {f.name for f in __import__("dataclasses").fields(Preprocess)}
        host = np.concatenate([pre(image[None]) for image in raw])
        assert np.array_equal(runner.preprocess(raw, config), host)
        numpy_only = runner.preprocess(raw, config, use_pillow=False)
        assert np.abs(numpy_only - host).max() * min(pre.std) * 255 <= 2 + 1e-3


def test_manifest_round_trip_and_old_dicts():
    pre = Preprocess(3, 32, 32, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 0.9, "bicubic", "unit", guessed=True)
    assert Preprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    old = Preprocess.from_dict({"channels": 1, "height": 28, "width": 28, "mean": [0.5], "std": [0.5]})
    assert (old.crop_pct, old.interpolation, old.scaling, old.guessed) == (None, "bilinear", "unit", False)
    stretched = old(np.full((1, 56, 30, 1), 200, np.uint8))  # no crop: the whole image, stretched
    assert stretched.shape == (1, 1, 28, 28) and np.allclose(stretched, (200 / 255 - 0.5) / 0.5, atol=1e-6)


def test_overrides_replace_size_crop_and_normalization():
    pre = Preprocess(3, 224, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), guessed=True)
    changed = PreprocessOverrides(input_size=(32, 32), crop_pct=1.0, mean=(127.0,), std=(128.0,)).apply(pre)
    assert (changed.height, changed.width, changed.crop_pct, changed.scaling) == (32, 32, 1.0, "byte")
    assert changed.mean == (127 / 255,) * 3 and not changed.guessed
    assert PreprocessOverrides(interpolation="bicubic").apply(pre).guessed  # the size is still a guess
    with pytest.raises(EdgeqError, match="one per channel"):
        PreprocessOverrides(mean=(0.5, 0.5)).apply(pre)


def test_guessed_preprocessing_is_announced_once_and_recorded(caplog, tmp_path, folders):
    import edgeq.models
    from edgeq.stages import quantize

    edgeq.models._announced.clear()  # other tests may have loaded the model already
    with caplog.at_level(logging.WARNING, logger="edgeq.models"):
        loaded = load_model(CIFAR_MODEL)
        load_model(CIFAR_MODEL)
    warnings = [r for r in caplog.records if "guessed" in r.getMessage()]
    assert len(warnings) == 1 and "3x32x32" in warnings[0].getMessage()  # 10 outputs, 3 channels: CIFAR's size
    assert loaded.preprocess.guessed and "guessed" in loaded.note
    out = quantize.run(CIFAR_MODEL, str(folders / "labelled"), tmp_path / "q", bits="w8a8", num_images=10)
    recorded = json.loads((out / "manifest.json").read_text())["extra"]["model"]["preprocess"]
    assert recorded["guessed"] is True and recorded["height"] == 32
    # a model that runs at one size only is guessed at that size
    assert load_model("tests.factories:fixed_size_rgb").preprocess.height == 64


def test_preprocessing_given_at_quantize_is_what_later_stages_use(caplog, tmp_path, folders):
    """The user's sizes and normalization replace the guess for good: export, eval and verify reload the model
    with what calibration used, and say nothing of a guess."""
    import edgeq.models
    from edgeq import quantized
    from edgeq.stages import quantize

    given = PreprocessOverrides(input_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = quantize.run(
        load_model(CIFAR_MODEL, preprocess=given), str(folders / "labelled"), tmp_path / "q", bits="w8a8", num_images=10
    )
    edgeq.models._announced.clear()
    with caplog.at_level(logging.WARNING, logger="edgeq.models"):
        _, loaded, _, _ = quantized.load(out)
    assert not [r for r in caplog.records if "guessed" in r.getMessage()]
    assert loaded.preprocess.mean == (0.5,) * 3 and not loaded.preprocess.guessed and not loaded.note


def test_timm_models_take_timm_data_config():
    import timm
    from timm.data import resolve_model_data_config

    from edgeq.models import _default_preprocess

    module = timm.create_model("resnet18", pretrained=False, num_classes=10)
    config = resolve_model_data_config(module)
    pre = _default_preprocess(module)
    assert (pre.height, pre.crop_pct, pre.interpolation) == (
        config["input_size"][1],
        config["crop_pct"],
        config["interpolation"],
    )
    assert pre.mean == tuple(config["mean"]) and not pre.guessed


def test_eval_labelled_folder_through_the_cli(monkeypatch, capsys, folders):
    code, out, _ = run_cli(monkeypatch, capsys, "eval", CIFAR_MODEL, "--data", str(folders / "labelled"), "--json")
    result = json.loads(out)
    loaded = load_model(CIFAR_MODEL)
    images = load_image_folder(folders / "labelled", loaded.preprocess)
    with torch.no_grad():
        predictions = loaded.module(torch.from_numpy(loaded.preprocess(images.images))).argmax(1).numpy()
    assert code == 0 and result["images"] == 40 and result["labels"] == "hard"
    assert result["top1"] == pytest.approx(float((predictions == images.labels).mean()))


def test_eval_flat_folder_has_no_top1(monkeypatch, capsys, folders):
    code, out, _ = run_cli(monkeypatch, capsys, "eval", CIFAR_MODEL, "--data", str(folders / "flat"), "--json")
    result = json.loads(out)
    assert code == 0 and result["top1"] is None and result["labels"] == "none" and result["images"] == 5


def test_labels_made_for_other_classes_give_no_top1(monkeypatch, capsys, tmp_path):
    # Fashion-MNIST's labels index its own ten classes; a CIFAR model's ten are others.
    names = tmp_path / "classes.txt"
    names.write_text("airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n")
    command = ["eval", CIFAR_MODEL, "--classes", str(names), "--data", "fashion-mnist:A", "--json"]
    code, out, err = run_cli(monkeypatch, capsys, *command)
    result = json.loads(out)
    assert code == 0 and result["top1"] is None and result["labels"] == "none"
    assert "labelled for other classes" in err
    same = resolve_dataset("fashion-mnist:A", 4, classes=load_model(None).classes)
    assert same.labels is not None  # the built-in model's own classes keep them
    unnamed = resolve_dataset("fashion-mnist:A", 4, classes=tuple(f"class {i}" for i in range(10)))
    assert unnamed.labels is not None  # a model without names takes the data's


def test_quantize_calib_per_class_with_overrides(monkeypatch, capsys, folders, tmp_path):
    args = ["quantize", CIFAR_MODEL, "--calib", str(folders / "labelled"), "--calib-per-class", "2"]
    args += ["--bits", "w8a8", "--method", "rtn", "--input-size", "20", "--crop-pct", "0.9", "-o", str(tmp_path / "q")]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["extra"]["calibration_images"] == 20 and manifest["params"]["calib_per_class"] == 2
    pre = manifest["extra"]["model"]["preprocess"]
    assert (pre["height"], pre["crop_pct"]) == (20, 0.9)
    assert manifest["extra"]["model"]["classes"][0] == "class00"  # folder names for a model without names


@pytest.mark.parametrize("case", ["empty", "mismatch", "unreadable", "empty class"])
def test_bad_folders_give_one_line(monkeypatch, capsys, tmp_path, folders, case):
    root = tmp_path / case.replace(" ", "-")
    root.mkdir()
    if case == "mismatch":
        for name in CLASSES:
            (root / name).mkdir()
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / name / "a.png")
    elif case == "unreadable":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "fine.png")
        (root / "broken.jpg").write_bytes(b"not a jpeg")
    elif case == "empty class":
        (root / "a").mkdir()
        (root / "b").mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "a" / "x.png")
    code, _, err = run_cli(monkeypatch, capsys, "eval", CIFAR_MODEL, "--data", str(root))
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err
    expected = {"empty": "holds no images", "mismatch": "3 class folders but the model has 10 outputs"}
    expected |= {"unreadable": "broken.jpg", "empty class": "holds no images"}
    assert expected[case] in lines[0]


CIFAR_TEST = assets.find("datasets/cifar10/test")


@pytest.mark.skipif(CIFAR_TEST is None, reason="no CIFAR-10 test folder (set EDGEQ_ASSETS or put ../shared beside)")
def test_shared_cifar_folder_reads_a_few_images():
    pre = Preprocess(3, 32, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crop_pct=1.0)
    images = resolve_dataset(str(CIFAR_TEST), preprocess=pre, per_class=2, seed=0, classes=tuple("abcdefghij"))
    assert images.class_names[:3] == ("airplane", "automobile", "bird")
    assert images.images.shape == (20, 32, 32, 3) and np.bincount(images.labels).tolist() == [2] * 10
    listing = list_image_folder(CIFAR_TEST)
    first = Image.open(listing.files[0]).convert("RGB")
    assert np.array_equal(pre.fit(first), np.asarray(first))  # 32x32 at crop_pct 1: taken as it is


def test_one_shot_calibrates_on_a_folder_and_evaluates_with_labels(monkeypatch, capsys, folders, tmp_path):
    folder = str(folders / "labelled")
    args = ["compile", "builtin:tiny-fmnist", "--calib", folder, "--calib-per-class", "1", "--data", folder]
    args += ["--bits", "w4a4", "--method", "rtn", "--eval-images", "20", "--latency-runs", "1", "--json"]
    code, out, err = run_cli(monkeypatch, capsys, *args, "--run-dir", str(tmp_path / "run"))
    summary = json.loads(out)
    assert code == 0, err
    assert "synth" not in summary["stages"] and summary["stage_dirs"]["calibration"] == folder
    assert summary["eval_images"] == 20 and summary["fp_top1"] is not None  # labelled: a top-1, not null
    assert not any("no labelled data" in note for note in summary["notes"])
    quantize = json.loads((tmp_path / "run" / "quantize-w4a4-rtn" / "manifest.json").read_text())
    assert quantize["extra"]["calibration_images"] == 10
