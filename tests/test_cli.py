"""The command line: help with examples, and one-line errors with non-zero exits."""

import sys

import pytest
import torch
from edgeq.cli.main import main

from edgeq.zoo import TinyResNet


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["edgeq", *args])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["synth"],
        ["synth", "inspect"],
        ["quantize"],
        ["export"],
        ["compile"],
        ["verify"],
        ["regress"],
        ["bundle"],
        ["sweep"],
        ["mixed"],
    ],
)
def test_help_explains_with_an_example(monkeypatch, capsys, command):
    code, out, _ = run_cli(monkeypatch, capsys, *command, "--help")
    assert code == 0 and "Example" in out


def _assert_one_line_error(result, *needles):
    code, _, err = result
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_bad_bits(monkeypatch, capsys):
    _assert_one_line_error(run_cli(monkeypatch, capsys, "compile", "--bits", "w9a4"), "w9a4", "wWaA")


@pytest.mark.parametrize("levels, needle", [("0.98,abc", "'abc' is not a number"), ("1.5", "in (0, 1]")])
def test_bad_auto_mixed_agreement(monkeypatch, capsys, levels, needle):
    _assert_one_line_error(run_cli(monkeypatch, capsys, "sweep", "--auto-mixed", levels), needle)


def test_unknown_target(monkeypatch, capsys):
    _assert_one_line_error(run_cli(monkeypatch, capsys, "compile", "--target", "pi4"), "pi4", "rpi4")


def test_missing_model_file(monkeypatch, capsys, tmp_path):
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "quantize", "missing.pt", "--calib", "fashion-mnist:A", "-o", str(tmp_path / "q")),
        "not found",
    )
    assert not (tmp_path / "q").exists()


def test_corrupt_model_file(monkeypatch, capsys, tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"PK\x03\x04 truncated zip")
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "quantize", str(path), "--calib", "fashion-mnist:A", "-o", str(tmp_path / "q")),
        "cannot read",
    )
    assert not (tmp_path / "q").exists()


def test_pickle_without_opt_in(monkeypatch, capsys, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(TinyResNet(), path)
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "quantize", str(path), "--calib", "fashion-mnist:A", "-o", str(tmp_path / "q")),
        "--allow-pickle",
    )


def test_pickle_with_opt_in_quantizes(monkeypatch, capsys, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(TinyResNet(), path)
    code, _out, _ = run_cli(
        monkeypatch,
        capsys,
        "quantize",
        str(path),
        "--allow-pickle",
        "--calib",
        "fashion-mnist:A",
        "--num-images",
        "8",
        "--method",
        "qdrop",
        "--iters",
        "5",
        "--lr-rounding",
        "0.03",
        "-o",
        str(tmp_path / "q"),
    )
    assert code == 0 and (tmp_path / "q" / "manifest.json").is_file()
    assert '"lr_rounding": 0.03' in (tmp_path / "q" / "manifest.json").read_text()


def test_bias_correction_is_recorded_and_changes_the_biases(monkeypatch, capsys, tmp_path):
    from safetensors.torch import load_file

    from edgeq.manifest import Manifest

    common = ["quantize", "zoo:fmnist-resnet", "--calib", "fashion-mnist:A", "--num-images", "16", "--bits", "w2a4"]
    assert run_cli(monkeypatch, capsys, *common, "--method", "rtn", "-o", str(tmp_path / "plain"))[0] == 0
    assert (
        run_cli(monkeypatch, capsys, *common, "--method", "rtn", "--bias-correction", "-o", str(tmp_path / "bc"))[0]
        == 0
    )
    assert Manifest.load(tmp_path / "bc", "quantize").params["bias_correction"] is True
    assert "bias_correction" not in Manifest.load(tmp_path / "plain", "quantize").params
    plain, corrected = (load_file(str(tmp_path / name / "quantized.safetensors")) for name in ("plain", "bc"))
    biases = [key for key in plain if key.endswith("layer.bias")]
    assert biases and any(not torch.equal(plain[key], corrected[key]) for key in biases)
    assert all(torch.equal(plain[key], corrected[key]) for key in plain if not key.endswith("bias"))


def test_gptq_rounding_is_recorded_and_moves_the_codes(monkeypatch, capsys, tmp_path):
    from safetensors.torch import load_file

    from edgeq.manifest import Manifest

    common = ["quantize", "zoo:fmnist-resnet", "--calib", "fashion-mnist:A", "--num-images", "16", "--bits", "w2a4"]
    assert run_cli(monkeypatch, capsys, *common, "--method", "rtn", "-o", str(tmp_path / "plain"))[0] == 0
    argv = [*common, "--method", "rtn", "--initial-rounding", "gptq", "-o", str(tmp_path / "gptq")]
    assert run_cli(monkeypatch, capsys, *argv)[0] == 0
    assert Manifest.load(tmp_path / "gptq", "quantize").params["initial_rounding"] == "gptq"
    assert "initial_rounding" not in Manifest.load(tmp_path / "plain", "quantize").params
    plain, gptq = (load_file(str(tmp_path / name / "quantized.safetensors")) for name in ("plain", "gptq"))
    codes = [key for key in plain if key.endswith("weight_int")]
    assert sum(not torch.equal(plain[key], gptq[key]) for key in codes) >= len(codes) - 2  # all but 8-bit ends
    assert all(torch.equal(plain[key], gptq[key]) for key in plain if key.endswith(("scale", "zero_point")))
    code, _, err = run_cli(monkeypatch, capsys, *common, "--initial-rounding", "best", "-o", str(tmp_path / "x"))
    assert code != 0 and "gptq" in err


def test_missing_calibration_folder(monkeypatch, capsys, tmp_path):
    _assert_one_line_error(
        run_cli(
            monkeypatch,
            capsys,
            "quantize",
            "builtin:tiny-fmnist",
            "--calib",
            str(tmp_path / "nowhere"),
            "-o",
            str(tmp_path / "q"),
        ),
        "not found",
    )


def test_targets_lists_boards(monkeypatch, capsys):
    from edgeq.targets import host_target

    code, out, _ = run_cli(monkeypatch, capsys, "targets")
    assert code == 0 and "rpi4" in out and "jetson-orin" in out
    assert out.splitlines()[0].split()[:3] == ["host", "->", host_target().name]


def test_unknown_sweep_target_lists_choices_with_host(monkeypatch, capsys, tmp_path):
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "sweep", "--targets", "x86,pi4", "-o", str(tmp_path / "s")), "pi4", "rpi4", "host"
    )


def test_synth_inspect_reports_json_and_draws_a_chart(monkeypatch, capsys, tmp_path, synth_dir):
    import json

    from PIL import Image

    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        "synth",
        "inspect",
        str(synth_dir),
        "--model",
        "builtin:tiny-fmnist",
        "--json",
        "--png",
        str(tmp_path / "i.png"),
    )
    report = json.loads(out)
    assert (
        code == 0
        and report["images"] == 16
        and report["strategy"] == "mixup"
        and sum(report["predicted_histogram"]) == 16
    )
    assert 0 <= report["mean_entropy_normalized"] <= 1 and report["feature_diversity"] > 0
    assert Image.open(tmp_path / "i.png").size == (720, 300)
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "synth", "inspect", str(synth_dir)), "records no model", "--model"
    )
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "synth", "inspect", str(tmp_path), "--model", "builtin:tiny-fmnist"),
        "manifest.json",
    )


def test_synth_without_a_generator_for_the_model(monkeypatch, capsys, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    _assert_one_line_error(
        run_cli(
            monkeypatch, capsys, "synth", "--strategy", "mixup", "--classes", str(classes), "-o", str(tmp_path / "o")
        ),
        "needs a text-to-image generator",
        "--generator",
    )
    # Class names alone say nothing of which generator knows them: no default model or generator is assumed.
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "synth", "--classes", str(classes), "-o", str(tmp_path / "o")),
        "needs a text-to-image generator",
    )
    assert not (tmp_path / "o").exists()


def test_json_stdout_holds_only_the_object(monkeypatch, capsys):
    import json

    # The factory prints while it loads; under --json that line must reach stderr, and stdout must parse as JSON.
    command = ["eval", "tests.factories:chatty_tiny", "--data", "fashion-mnist:A", "--num-images", "16"]
    code, out, err = run_cli(monkeypatch, capsys, *command, "--json")
    result = json.loads(out)
    assert code == 0 and result["images"] == 16 and 0 <= result["top1"] <= 1
    assert "Loaded pretrained weights for chatty_tiny" in err and "Loaded" not in out
    # the progress bar counts images on stderr (how far it was drawn before it closed depends on timing)
    assert "evaluating" in err and "/16" in err
    # Without --json the printed line stays where the model put it.
    code, out, _ = run_cli(monkeypatch, capsys, *command)
    assert code == 0 and out.startswith("Loaded pretrained weights for chatty_tiny")


def test_one_shot_and_sweep_pass_the_reconstruction_settings_on(monkeypatch, capsys, tmp_path):
    import edgeq.pipeline
    from edgeq.stages import sweep as sweep_stage

    seen = {}

    def capture(name):
        def record(model, *args, options=None, **kwargs):
            seen[name] = options if options is not None else args[-1]
            raise SystemExit(0)

        return record

    monkeypatch.setattr(edgeq.pipeline, "run", capture("compile"))
    monkeypatch.setattr(sweep_stage, "run", capture("sweep"))
    run_cli(monkeypatch, capsys, "compile", "--time-budget", "90", "--iters", "500", "--window", "32")
    run_cli(monkeypatch, capsys, "sweep", "--time-budget", "45", "--bias-correction", "-o", str(tmp_path / "s"))
    compile_options, sweep_options = seen["compile"], seen["sweep"]
    assert (compile_options.time_budget, compile_options.iters, compile_options.window) == (90.0, 500, 32)
    assert not compile_options.bias_correction
    assert (sweep_options.time_budget, sweep_options.window, sweep_options.bias_correction) == (45.0, None, True)
    run_cli(monkeypatch, capsys, "compile", "--bias-correction")
    assert seen["compile"].bias_correction and seen["compile"].initial_rounding == "nearest"
    run_cli(monkeypatch, capsys, "compile", "--initial-rounding", "gptq")
    run_cli(monkeypatch, capsys, "sweep", "--initial-rounding", "gptq", "-o", str(tmp_path / "s"))
    assert seen["compile"].initial_rounding == seen["sweep"].initial_rounding == "gptq"
    code, _, err = run_cli(monkeypatch, capsys, "compile", "--time-budget", "0")
    assert code != 0 and "--time-budget" in err
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--window", "4")
    assert code != 0 and "--window" in err
