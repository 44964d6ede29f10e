"""benchmarks/paper.py --quick: every calibration source through the same quantizer, the
table, plot and conclusions written into results.md between its markers, and resumable."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "paper.py"


def _paper():
    spec = importlib.util.spec_from_file_location("edgeq_paper_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_quick_mode_writes_the_table_and_resumes(tmp_path):
    paper = _paper()
    (tmp_path / "results.md").write_text("# Results\n\n## Quantization methods\n\nkept as it is\n")
    assert paper.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results-paper.json").read_text())
    sources = {e["source"] for e in results["entries"].values()}
    assert sources == {"fp", *paper.SOURCES}
    for entry in results["entries"].values():
        assert 0.0 <= entry["top1"] <= 1.0
    fp = results["entries"]["fmnist-resnet/fp"]["top1"]
    real = results["entries"]["fmnist-resnet/w4a4/real/0"]["top1"]
    assert fp > 0.9 and real > fp - 0.05  # W4A4 on real calibration images stays near full precision
    text = (tmp_path / "results.md").read_text()
    assert "kept as it is" in text and text.count(paper.BEGIN) == 1 and text.count(paper.END) == 1
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in paper.SOURCES]
    assert len(rows) == len(paper.SOURCES)
    assert (
        "mixup-embedding against single-class prompts" in text
        and (tmp_path / "results-paper.png").stat().st_size > 10_000
    )
    began = time.perf_counter()
    assert paper.main(["--quick", "--out", str(tmp_path)]) == 0  # everything measured: only the document is rewritten
    assert time.perf_counter() - began < 60
    assert (tmp_path / "results.md").read_text().count(paper.BEGIN) == 1
    assert "Incomplete" not in (tmp_path / "results.md").read_text()
    # A stopped run's document says which cells are missing; --report-only measures nothing.
    assert (
        paper.main(
            [
                "--teachers",
                "fmnist-resnet",
                "--bits",
                "w4a4",
                "--seeds",
                "0,1",
                "--num-images",
                "128",
                "--iters",
                "50",
                "--inversion-iters",
                "50",
                "--out",
                str(tmp_path),
                "--report-only",
            ]
        )
        == 0
    )
    text = (tmp_path / "results.md").read_text()
    assert "**Incomplete:** 6 of 12 planned cells" in text and "fmnist-resnet/w4a4/real (seed 1)" in text
    assert "--report-only" not in text


def test_workers_fill_the_same_table_in_parallel(tmp_path):
    """--workers 2: cells run in worker processes, each calibration set made once, every cell saved."""
    command = [
        sys.executable,
        str(SCRIPT),
        "--workers",
        "2",
        "--teachers",
        "fmnist-resnet",
        "--bits",
        "w4a4",
        "--sources",
        "real,noise",
        "--seeds",
        "0,1",
        "--num-images",
        "16",
        "--iters",
        "2",
        "--out",
        str(tmp_path),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    results = json.loads((tmp_path / "results-paper.json").read_text())
    assert set(results["entries"]) == {
        "fmnist-resnet/fp",
        *(f"fmnist-resnet/w4a4/{s}/{seed}" for s in ("real", "noise") for seed in (0, 1)),
    }
    assert results["settings"]["workers"] == 2 and results["settings"]["threads_per_worker"] >= 1
    assert sorted(p.name for p in (tmp_path / "paper-work").iterdir()) == ["noise-28-n16-s0", "noise-28-n16-s1"]
    assert results["entries"]["fmnist-resnet/w4a4/real/0"]["top1"] > 0.85  # W4A4 barely moves a teacher on real images


def test_conclusions_are_computed_from_the_figures():
    """Mean differences, standard errors and the two-standard-error screen, on figures chosen by hand."""
    paper = _paper()

    def entry(source, seed, top1):
        return {"teacher": "fmnist-resnet", "bits": "w2a4", "source": source, "seed": seed, "top1": top1}

    entries = {}
    for seed, (single, text, embedding) in enumerate([(0.80, 0.70, 0.81), (0.82, 0.72, 0.79), (0.84, 0.74, 0.80)]):
        for source, top1 in (("single", single), ("mixup-text", text), ("mixup-embedding", embedding)):
            entries[f"fmnist-resnet/w2a4/{source}/{seed}"] = entry(source, seed, top1)
    efficientnet = {
        "w4a4/rtn": {"bits": "w4a4", "method": "rtn", "images": 32, "top1_agreement": 0.025, "top5_agreement": 0.1},
        "w4a4/qdrop": {"bits": "w4a4", "method": "qdrop", "images": 32, "top1_agreement": 0.4, "top5_agreement": 0.65},
    }
    lines = paper.conclusions({"entries": entries, "efficientnet": efficientnet})
    text_line = next(line for line in lines if line.startswith("**mixup-text"))
    # text: -10 points, standard error sqrt(2 * 0.02**2 / 3) * 100 = 1.63 -> beyond two standard errors
    assert "higher mean top-1 in 0 of 1 cells" in text_line and "resnet W2A4 -10.00 ± 1.63" in text_line
    assert "Beyond two standard errors: resnet W2A4 (-10.00)" in text_line
    embedding_line = next(line for line in lines if line.startswith("**mixup-embedding"))
    # embedding: -2 points, standard error sqrt((0.02**2 + 0.01**2) / 3) * 100 = 1.29 -> noise; its spread is lower
    assert "resnet W2A4 -2.00 ± 1.29" in embedding_line and "None of the differences exceeds" in embedding_line
    assert "spread over seeds is lower in 1 of 1 cells" in embedding_line
    assert any(
        line.startswith("EfficientNet-Lite0 W4A4: qdrop agrees with full precision on 40.0%")
        and "round-to-nearest on 2.5%" in line
        for line in lines
    )


def test_mixup_and_single_prompts_are_paired_seed_by_seed_with_mcnemar():
    """Per-image results of the same test images give McNemar's exact test for each seed both sources measured."""
    import numpy as np

    from edgeq.stats import pack

    paper = _paper()
    single = np.zeros(16, bool)
    single[:8] = True  # right on the first 8
    mixup = np.zeros(16, bool)
    mixup[:6] = mixup[8:14] = True  # loses 2 of those, gains 6 others: 6 / 2 discordant
    entries = {
        f"cifar10-resnet20/w2a4/{source}/0": {
            "teacher": "cifar10-resnet20",
            "bits": "w2a4",
            "source": source,
            "seed": 0,
            "top1": float(correct.mean()),
            "correct": pack(correct),
        }
        for source, correct in (("single", single), ("mixup-text", mixup))
    }
    entries["cifar10-resnet20/w2a4/mixup-text/1"] = dict(entries["cifar10-resnet20/w2a4/mixup-text/0"], seed=1)
    lines = paper.conclusions({"entries": entries})
    paired = next(line for line in lines if "McNemar" in line)
    # 6 against 2 discordant pairs: p = 2 * (1 + 8 + 28) / 256; seed 1 has no single-prompt partner
    assert paired.startswith("mixup-text against single-class prompts")
    assert "resnet20 W2A4 seed 0: 6 / 2, p = 0.29" in paired and "seed 1" not in paired


def test_cifar10_teachers_use_their_own_data_generator_and_section(tmp_path):
    from edgeq import assets

    if assets.find("models/cifar10-resnet20.safetensors") is None or assets.find("datasets/cifar10/train") is None:
        import pytest

        pytest.skip("CIFAR-10 ResNet-20 weights or CIFAR-10 folders not in the assets folder (set EDGEQ_ASSETS)")
    paper = _paper()
    teacher, test_inputs, labels = paper._teacher("cifar10-resnet20")
    assert paper.domain_of([teacher.name]).name == "cifar10" and test_inputs.shape == (10000, 3, 32, 32)
    real_images = paper.calibration_images("real", teacher, 0, 20, tmp_path)
    assert real_images.shape == (20, 32, 32, 3)  # CIFAR-10 training images, not another data set's
    (tmp_path / "results.md").write_text("# Results\n\n<!-- paper:begin -->\nFashion-MNIST kept\n<!-- paper:end -->\n")
    arguments = ["--teachers", "cifar10-resnet20", "--bits", "w4a4", "--sources", "real,noise", "--seeds", "0"]
    arguments += ["--num-images", "20", "--method", "rtn", "--asymmetric-weights", "--out", str(tmp_path)]
    assert paper.main(arguments) == 0
    results = json.loads((tmp_path / "results-paper-cifar10.json").read_text())
    assert results["settings"]["generator"] == "zoo:cifar10-generator" and results["settings"]["asymmetric_weights"]
    fp = results["entries"]["cifar10-resnet20/fp"]
    assert abs(fp["top1"] - 0.8103) < 1e-4  # the zoo's recorded figure on the 10,000 JPEG test images
    real = results["entries"]["cifar10-resnet20/w4a4/real/0"]
    # W4A4 from 20 real images with round-to-nearest stays within a few points of full precision
    assert len(bytes.fromhex(real["correct"])) * 8 == 10000 and real["top1"] > fp["top1"] - 0.05
    text = (tmp_path / "results.md").read_text()
    assert "Fashion-MNIST kept" in text and text.count("<!-- paper-cifar10:begin -->") == 1
    assert "CIFAR-10 test images" in text and "a zero point per output channel" in text
    assert (tmp_path / "results-paper-cifar10.png").exists()
    assert sorted(p.name for p in (tmp_path / "paper-work").iterdir()) == ["noise-32-n20-s0"]


def test_a_table_resumes_only_with_the_settings_its_cells_were_measured_with(tmp_path):
    paper = _paper()
    stored = {"method": "qdrop", "iters": 100, "lr_rounding": 0.03, "num_images": 256, "inversion_iters": 200}
    stored["generator"] = "zoo:fmnist-generator"  # a file from before GPTQ starts and zero points were recorded
    entries = {"fmnist-resnet/fp": {"top1": 0.9}, "fmnist-resnet/w2a4/single/0": {"top1": 0.8}}
    (tmp_path / "results-paper.json").write_text(json.dumps({"settings": stored, "entries": entries}))
    arguments = ["--teachers", "fmnist-resnet", "--bits", "w2a4", "--sources", "single", "--seeds", "0"]
    arguments += ["--num-images", "256", "--lr-rounding", "0.03", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="iters 100 there, 200 now"):
        paper.main([*arguments, "--iters", "200"])
    with pytest.raises(SystemExit, match="^error: [^;]*initial_rounding 'nearest' there, 'gptq' now[^;]*$"):
        paper.main([*arguments, "--iters", "100", "--initial-rounding", "gptq"])
    assert json.loads((tmp_path / "results-paper.json").read_text())["settings"] == stored  # untouched
