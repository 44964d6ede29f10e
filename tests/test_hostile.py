"""Stage folders from elsewhere are untrusted: what a hostile or careless folder must not achieve."""

import json
import pickle

import pytest
import torch

from edgeq.zoo import TinyResNet

from .test_cli import _assert_one_line_error, run_cli


class _Evil:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(path):
    with open(path, "w") as f:
        f.write("code ran")


@pytest.fixture
def pickled_quantize_folder(tmp_path, monkeypatch, capsys):
    """A quantize folder of a fully pickled model, made with --allow-pickle as its owner would."""
    model = tmp_path / "model.pt"
    torch.save(TinyResNet(), model)
    folder = tmp_path / "q"
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "quantize",
        str(model),
        "--allow-pickle",
        "--calib",
        "fashion-mnist:A",
        "--num-images",
        "8",
        "--method",
        "rtn",
        "--bits",
        "w4a4",
        "-o",
        str(folder),
    )
    assert code == 0, err
    return model, folder


def test_a_manifest_cannot_switch_the_pickle_guard_off(pickled_quantize_folder, monkeypatch, capsys, tmp_path):
    model, folder = pickled_quantize_folder
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["params"]["allow_pickle"] is True  # recorded as history, never obeyed
    for command in (
        ["export", str(folder), "-o", str(tmp_path / "e")],
        ["eval", str(folder), "--data", "fashion-mnist:A"],
    ):
        _assert_one_line_error(run_cli(monkeypatch, capsys, *command), "refusing to unpickle", "--allow-pickle")
    assert not (tmp_path / "e").exists()
    code, _, err = run_cli(monkeypatch, capsys, "export", str(folder), "--allow-pickle", "-o", str(tmp_path / "e"))
    assert code == 0, err


def test_a_model_swapped_after_quantization_is_never_unpickled(pickled_quantize_folder, monkeypatch, capsys, tmp_path):
    model, folder = pickled_quantize_folder
    marker = tmp_path / "pwned"
    with open(model, "wb") as f:
        pickle.dump(_Evil(marker), f)
    for command in (
        ["export", str(folder), "--allow-pickle", "-o", str(tmp_path / "e")],
        ["eval", str(folder), "--allow-pickle", "--data", "fashion-mnist:A"],
    ):
        _assert_one_line_error(run_cli(monkeypatch, capsys, *command), "changed since it was quantized")
    assert not marker.exists()

    # A manifest stripped of the file hash cannot vouch for the file: refused before opening it.
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["inputs"]:
        entry.pop("file_sha256", None)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "export", str(folder), "--allow-pickle", "-o", str(tmp_path / "e")),
        "no file hash",
    )
    assert not marker.exists() and not (tmp_path / "e").exists()
