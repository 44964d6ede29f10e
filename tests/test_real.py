"""benchmarks/real.py: the arithmetic its page is computed from (McNemar, drops, the two-fold split, bit strings),
the page from hand-made figures, and --quick on the real CIFAR-10 ResNet-20 (skipped without the assets)."""

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeq import assets

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "real.py"
NEEDED = ("models/cifar10-resnet20.safetensors", "datasets/cifar10/test", "datasets/cifar10/train")


def _real():
    spec = importlib.util.spec_from_file_location("edgeq_real_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mcnemar_exact_binomial_on_the_discordant_pairs():
    real = _real()
    # 8 images only A gets right, 2 only B, 5 both, 3 neither: p = 2 (C(10,0) + C(10,1) + C(10,2)) / 2^10
    a = np.array([1] * 8 + [0] * 2 + [1] * 5 + [0] * 3, bool)
    b = np.array([0] * 8 + [1] * 2 + [1] * 5 + [0] * 3, bool)
    test = real.mcnemar(a, b)
    assert (test["a_only"], test["b_only"]) == (8, 2)
    assert test["p"] == pytest.approx(112 / 1024)
    assert real.mcnemar(b, a)["p"] == pytest.approx(112 / 1024)  # symmetric
    assert real.mcnemar(np.ones(10, bool), np.zeros(10, bool))["p"] == pytest.approx(2 / 1024)
    assert real.mcnemar(a, a) == {"a_only": 0, "b_only": 0, "p": 1.0}  # no discordant pair: no evidence
    assert real.mcnemar(np.array([1, 0], bool), np.array([0, 1], bool))["p"] == 1.0  # capped at 1
    with pytest.raises(ValueError, match="same images"):
        real.mcnemar(a, b[:-1])


def test_drop_and_bit_strings():
    real = _real()
    assert real.drop(0.8100, 0.7925) == pytest.approx(1.75)
    assert real.drop(0.80, 0.81) == pytest.approx(-1.0)  # better than full precision: a negative drop
    correct = np.random.default_rng(0).random(1003) < 0.8
    packed = real.pack(correct)
    assert len(packed) == 2 * 126  # 1003 images in 126 bytes, as hex
    assert (real.unpack(packed, 1003) == correct).all()
    assert real.pack([1, 0, 0, 0, 0, 0, 0, 1, 1]) == "8180"  # first image in the high bit


def test_two_fold_split_is_disjoint_and_covers_every_image():
    real = _real()
    labels = np.repeat(np.arange(1000), 2)  # two images per class
    folds = real.two_fold(labels, 64, seed=3)
    assert len(folds) == 2
    (calib_a, eval_a), (calib_b, eval_b) = folds
    assert len(calib_a) == len(calib_b) == 64
    assert (labels[calib_a] % 2 == 1).all() and (labels[eval_a] % 2 == 0).all()  # odd classes calibrate first
    assert (labels[calib_b] % 2 == 0).all() and (labels[eval_b] % 2 == 1).all()
    for calibrate, evaluated in folds:
        assert not set(calibrate) & set(evaluated)  # no image calibrates the model that evaluates it
    assert sorted([*eval_a, *eval_b]) == list(range(len(labels)))  # combined, every image evaluated once
    again = real.two_fold(labels, 64, seed=3)
    assert all((x == y).all() for fold, other in zip(folds, again) for x, y in zip(fold, other))
    assert not (real.two_fold(labels, 64, seed=4)[0][0] == calib_a).all()
    assert len(real.two_fold(np.arange(10), 64, seed=0)[0][0]) == 5  # capped at the classes of one parity


def _entry(source, top1_bits, method="qdrop"):
    n = len(top1_bits)
    return {
        "model": "cifar10-resnet20",
        "bits": "w4a4",
        "source": source,
        "method": method,
        "iters": 200,
        "time_budget": None,
        "calibration_images": 256,
        "calibration": f"256 {source} images",
        "eval_images": n,
        "top1": float(np.mean(top1_bits)),
        "top5": 1.0,
        "correct": _real().pack(np.asarray(top1_bits, bool)),
        "quantize_seconds": 12.0,
        "synthesis_seconds": None if source == "real" else 30.0,
        "threads": 2,
        "cpu": "Test CPU (avx2), 2 cores",
    }


def test_page_and_conclusions_from_hand_made_figures(tmp_path):
    real = _real()
    fp_bits = [1] * 80 + [0] * 20  # 80.0%
    real_bits = [1] * 80 + [0] * 20  # 80.0%: drop 0
    inversion_bits = [1] * 60 + [0] * 20 + [0] * 20  # 60.0%: 20 images lost, all where real is right
    noise_bits = [1] * 79 + [0] + [1] + [0] * 19  # 80.0%: one image each way
    results = {
        "entries": {
            "cifar10-resnet20/fp": {
                "model": "cifar10-resnet20",
                "bits": "fp",
                "eval_images": 100,
                "top1": 0.8,
                "top5": 0.99,
                "correct": real.pack(fp_bits),
            },
            "cifar10-resnet20/w4a4/real": _entry("real", real_bits),
            "cifar10-resnet20/w4a4/bn-inversion": _entry("bn-inversion", inversion_bits),
            "cifar10-resnet20/w4a4/noise": _entry("noise", noise_bits, method="rtn"),
        },
        "planned": [f"cifar10-resnet20/{b}/{s}" for b in ("w4a4", "w2a4") for s in real.SOURCES],
    }
    lines = real.conclusions(results, ["cifar10-resnet20"], ["w4a4", "w2a4"])
    best = next(line for line in lines if line.startswith("cifar10-resnet20 W4A4, on 100 test images: best"))
    assert "best source real (80.00%, drop 0.00 points)" in best
    # real against bn-inversion: 20 discordant pairs all one way, p = 2 / 2^20
    assert "Real against bn-inversion: +20.00 points" in best and "p = 1.91e-06" in best
    assert "real images better beyond noise" in best
    assert "Real against noise: +0.00 points (images only real gets right: 1, only noise: 1; McNemar p = 1)" in best
    assert "different settings" in best and "noise rtn" in best
    target = next(line for line in lines if "target" in line)
    assert "best data-free source noise, drop 0.00: meets" in target and "at most 1 point)" in target
    page = real.write_page(
        results, tmp_path, "python benchmarks/real.py", ["cifar10-resnet20"], ["w4a4", "w2a4"], list(real.SOURCES)
    ).read_text()
    assert "top-1 **80.00%**" in page and "| W4A4 | bn-inversion | 60.00% | 20.00 |" in page
    assert page.count("| W2A4 |") == 3 and page.count("| missing | missing |") == 3
    assert "**Incomplete:** 3 planned cell(s) are missing: cifar10-resnet20/w2a4/real" in page
    assert "Test CPU (avx2), 2 cores, 2 torch thread(s) per cell" in page
    assert "| 12 (+30 synthesis) |" in page
    # a data-free source beating real beyond noise is called out against the target that it never should
    results["entries"]["cifar10-resnet20/w4a4/real"] = _entry("real", inversion_bits)
    results["entries"]["cifar10-resnet20/w4a4/bn-inversion"] = _entry("bn-inversion", real_bits)
    flipped = next(line for line in real.conclusions(results, ["cifar10-resnet20"], ["w4a4"]) if "best" in line)
    assert "bn-inversion better beyond noise: real calibration loses to data-free here" in flipped
    # EfficientNet's target includes the time budget; a model without full precision says so
    results["entries"] = {
        "efficientnet-lite0/fp": {
            "model": "efficientnet-lite0",
            "bits": "fp",
            "eval_images": 100,
            "top1": 0.8,
            "top5": 0.9,
            "correct": real.pack(fp_bits),
        },
        "efficientnet-lite0/w2a4/bn-inversion": _entry("bn-inversion", [1] * 50 + [0] * 50)
        | {"model": "efficientnet-lite0", "bits": "w2a4", "quantize_seconds": 1700.0, "synthesis_seconds": 200.0},
    }
    lines = real.conclusions(results, ["efficientnet-lite0", "cifar10-resnet56"], ["w2a4"])
    assert any(
        "drop 30.00: misses by 10.00 points; 1900 s" in line
        and "over the 30-minute budget" in line
        and "(noise not measured)" in line
        for line in lines
    )
    assert "cifar10-resnet56: full precision not measured yet, so no drop can be computed." in lines


@pytest.mark.skipif(
    any(assets.find(path) is None for path in NEEDED),
    reason="the CIFAR-10 ResNet-20 weights and CIFAR-10 folders are not in the assets folder "
    "(set EDGEQ_ASSETS to a folder like ../shared)",
)
def test_quick_mode_on_resnet20_and_resume(tmp_path):
    real = _real()
    out, work = tmp_path / "out", tmp_path / "work"
    assert real.main(["--quick", "--out", str(out), "--work", str(work)]) == 0
    results = json.loads((out / "results-real.json").read_text())
    assert set(results["entries"]) == {"cifar10-resnet20/fp", *(f"cifar10-resnet20/w4a4/{s}" for s in real.SOURCES)}
    fp = results["entries"]["cifar10-resnet20/fp"]
    assert fp["eval_images"] == 40 and 0.6 <= fp["top1"] <= fp["top5"] <= 1.0
    page = (out / "results-real.md").read_text()
    for source in real.SOURCES:
        entry = results["entries"][f"cifar10-resnet20/w4a4/{source}"]
        assert entry["method"] == "rtn" and entry["calibration_images"] == 10 and entry["eval_images"] == 40
        correct = real.unpack(entry["correct"], 40)
        assert entry["top1"] == pytest.approx(correct.mean())
        # the page's drop is full precision minus this cell, on the same 40 images
        assert f"| W4A4 | {source} | {entry['top1']:.2%} | {(fp['top1'] - entry['top1']) * 100:.2f} |" in page
        assert entry["top1"] > 0.3  # W4A4 with 8-bit ends keeps a CIFAR ResNet far above chance even at rtn
    assert results["entries"]["cifar10-resnet20/w4a4/bn-inversion"]["synthesis_seconds"] >= 0
    assert "Incomplete" not in page and "cifar10-resnet20 W4A4, on 40 test images: best source" in page
    assert "Measured with other settings" not in page
    began = time.perf_counter()
    assert real.main(["--quick", "--out", str(out), "--work", str(work)]) == 0  # all measured: only the page
    assert time.perf_counter() - began < 30
    assert json.loads((out / "results-real.json").read_text())["entries"] == results["entries"]
    # the full grid from the same JSON: every cell not measured is named missing, nothing is measured
    assert real.main(["--out", str(out), "--report-only"]) == 0
    page = (out / "results-real.md").read_text()
    assert "Full precision: missing (not measured yet)" in page and "| W2A4 | real | missing |" in page
    grid = [
        real.cell_key(name, bits, source)
        for name in real.MODELS
        for bits in real.BITS
        if real.has_bits(name, bits)
        for source in real.SOURCES
    ]
    not_measured = [key for key in grid if key not in results["entries"]]
    not_measured += [f"{name}/fp" for name in real.MODELS if f"{name}/fp" not in results["entries"]]
    assert len(not_measured) > 20  # the grid is every model x width x source, not the quick one
    assert f"**Incomplete:** {len(not_measured)} planned cell(s) are missing" in page and "--report-only" not in page
    # the quick cells used rtn; this command's settings (qdrop) would measure them again, and the page says so
    assert "**Measured with other settings:** 3 cell(s)" in page
    assert json.loads((out / "results-real.json").read_text())["entries"] == results["entries"]


@pytest.mark.skipif(
    any(assets.find(path) is None for path in NEEDED),
    reason="the CIFAR-10 ResNet-20 weights and CIFAR-10 folders are not in the assets folder",
)
def test_an_interrupted_run_keeps_every_cell_measured_before(tmp_path, monkeypatch):
    real = _real()
    measured = real.measure_cell
    calls = []

    def stop_at_the_second(*args):
        calls.append(args[:3])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measured(*args)

    monkeypatch.setattr(real, "measure_cell", stop_at_the_second)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        real.main(["--quick", "--sources", "noise,real", "--out", str(out), "--work", str(tmp_path / "work")])
    entries = json.loads((out / "results-real.json").read_text())["entries"]
    assert set(entries) == {"cifar10-resnet20/fp", "cifar10-resnet20/w4a4/noise"}  # measured before the stop


def test_the_mixed_variant_names_its_layers_and_belongs_to_its_model():
    from edgeq.models import load_model

    real = _real()
    module = load_model("zoo:efficientnet-lite0").module
    spec = real.cell_spec("efficientnet-lite0", "w2a4-dw8", module)
    depthwise = [name for name, m in module.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 16 and spec.layers == tuple(sorted((name, 8, 4) for name in depthwise))
    assert (spec.weight_bits, spec.act_bits) == (2, 4) and str(spec).startswith("w2a4-mixed-")
    assert real.cell_spec("efficientnet-lite0", "w2a4", module).layers == ()
    assert real.has_bits("efficientnet-lite0", "w2a4-dw8") and not real.has_bits("cifar10-resnet20", "w2a4-dw8")
    assert real.has_bits("cifar10-resnet20", "w2a4")


def test_defaults_for_one_row_override_the_models_and_a_flag_overrides_both():
    real = _real()
    # EfficientNet-Lite0's W4A4 row starts from GPTQ with per-channel zero points; its other rows do not
    assert real.initial_rounding("efficientnet-lite0", None, "w4a4") == "gptq"
    assert real.asymmetric_weights("efficientnet-lite0", None, "w4a4") is True
    for bits in ("w2a4", "w3a3", "w4a4-early8", None):
        assert real.initial_rounding("efficientnet-lite0", None, bits) == "nearest"
        assert real.asymmetric_weights("efficientnet-lite0", None, bits) is False
    # a model-wide default holds for every width
    assert real.initial_rounding("cifar10-resnet20", None, "w3a3") == "gptq"
    assert real.initial_rounding("efficientnet-lite0", "nearest", "w4a4") == "nearest"
    assert real.asymmetric_weights("efficientnet-lite0", "off", "w4a4") is False
    # a cell made with the row's own defaults is not stale; one made with the model's would be
    settings = {
        "method": "rtn",
        "eval_count": {"efficientnet-lite0": 10},
        "seed": 0,
        "time_budget": None,
        "window": None,
        "bias_correction": None,
        "initial_rounding": None,
        "asymmetric_weights": None,
        "inversion": {"efficientnet-lite0": None},
        "num_images": {"efficientnet-lite0": 64},
    }
    cell = {
        "model": "efficientnet-lite0",
        "bits": "w4a4",
        "source": "noise",
        "method": "rtn",
        "eval_images": 10,
        "seed": 0,
        "time_budget": real.time_budget("efficientnet-lite0", None),
        "window": None,
        "bias_correction": True,
        "initial_rounding": "gptq",
        "asymmetric_weights": True,
        "requested_images": 64,
    }
    assert real._same_settings(cell, settings)
    assert not real._same_settings({**cell, "initial_rounding": "nearest", "asymmetric_weights": False}, settings)
    assert real._same_settings(
        {**cell, "bits": "w2a4", "initial_rounding": "nearest", "asymmetric_weights": False}, settings
    )
