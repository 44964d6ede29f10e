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
    code, _, err = _quantize(monkeypatch, capsys, folder, str(model), "--allow-pickle")
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


def _quantize(monkeypatch, capsys, out, *extra):
    return run_cli(
        monkeypatch,
        capsys,
        "quantize",
        "--calib",
        "fashion-mnist:A",
        "--num-images",
        "8",
        "--method",
        "rtn",
        "--bits",
        "w4a4",
        "-o",
        str(out),
        *extra,
    )


def test_output_folders_replace_only_what_the_stage_wrote(monkeypatch, capsys, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    _assert_one_line_error(_quantize(monkeypatch, capsys, mine), "not an edgeq folder", "--force")
    assert (mine / "notes.txt").read_text() == "x"

    quantized = tmp_path / "q"
    assert _quantize(monkeypatch, capsys, quantized)[0] == 0
    assert _quantize(monkeypatch, capsys, quantized)[0] == 0  # its own output: replaced
    before = sorted(p.name for p in quantized.iterdir())
    _assert_one_line_error(run_cli(monkeypatch, capsys, "export", str(quantized), "-o", str(quantized)), "input")
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "export", str(quantized), "-o", str(tmp_path), "--force"), "holds an input"
    )
    assert sorted(p.name for p in quantized.iterdir()) == before
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "export", str(quantized), "-o", str(mine)), "not an edgeq folder"
    )
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "export", str(quantized), "-o", str(quantized)), "destroy that input"
    )
    _assert_one_line_error(_quantize(monkeypatch, capsys, mine / "notes.txt" / "q"), "is a file")
    monkeypatch.chdir(mine)
    _assert_one_line_error(_quantize(monkeypatch, capsys, "."), "working directory")
    assert (mine / "notes.txt").read_text() == "x"

    monkeypatch.chdir(tmp_path)
    assert _quantize(monkeypatch, capsys, mine, "--force")[0] == 0  # the user said so
    assert not (mine / "notes.txt").exists() and (mine / "manifest.json").is_file()


@pytest.fixture(scope="module")
def stage_chain(tmp_path_factory, quantized_dirs):
    """quantize -> export -> compile folders of the built-in model, copied so that tests may damage them."""
    import shutil

    from edgeq.stages import compile as compile_stage
    from edgeq.stages import export as export_stage

    root = tmp_path_factory.mktemp("chain")
    exported = export_stage.run(quantized_dirs("w2a4"), root / "export")
    compiled = compile_stage.run(exported, root / "compile", target="x86")

    def fresh(tmp_path):
        """A copy of the chain whose manifests point at the copies."""
        quantize_copy = shutil.copytree(quantized_dirs("w2a4"), tmp_path / "q")
        export_copy = shutil.copytree(exported, tmp_path / "e")
        compile_copy = shutil.copytree(compiled, tmp_path / "c")
        for folder, role, target in ((export_copy, "quantized", quantize_copy), (compile_copy, "export", export_copy)):
            manifest = json.loads((folder / "manifest.json").read_text())
            for entry in manifest["inputs"]:
                if entry["role"] == role:
                    entry["path"] = str(target)
            (folder / "manifest.json").write_text(json.dumps(manifest))
        return quantize_copy, export_copy, compile_copy

    return fresh


def test_tampered_or_truncated_artifacts_are_never_used(stage_chain, monkeypatch, capsys, tmp_path):
    quantized, exported, compiled = stage_chain(tmp_path)
    module = compiled / "module.so"
    intact = module.read_bytes()
    module.write_bytes(intact[: len(intact) // 3])  # an interrupted copy: loading it would crash the process
    for command in (
        ["verify", str(compiled), "--data", "fashion-mnist:A", "--num-images", "4", "-o", str(tmp_path / "v")],
        ["bundle", str(compiled), "-o", str(tmp_path / "b")],
    ):
        _assert_one_line_error(run_cli(monkeypatch, capsys, *command), "module.so", "sha256")
    elsewhere = tmp_path / "local-secret.so"
    elsewhere.write_bytes(intact)
    module.unlink()
    module.symlink_to(elsewhere)  # the right bytes, but a link: a bundle must not follow it
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "bundle", str(compiled), "-o", str(tmp_path / "b")), "not a regular file"
    )
    assert not (tmp_path / "v").exists() and not (tmp_path / "b").exists()

    manifest = json.loads((exported / "manifest.json").read_text())
    for output in manifest["outputs"]:
        output["sha256"] = "0" * 64  # zeroed hashes vouch for nothing
    (exported / "manifest.json").write_text(json.dumps(manifest))
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "compile", str(exported), "--target", "x86", "-o", str(tmp_path / "c2")),
        "model.onnx",
        "sha256",
    )

    weights = quantized / "quantized.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "export", str(quantized), "-o", str(tmp_path / "e2")), "quantized.safetensors"
    )


def test_a_tampered_folder_is_not_reused(stage_chain, tmp_path):
    from edgeq.manifest import Manifest, reusable

    _, _, compiled = stage_chain(tmp_path)
    fingerprint = Manifest.load(compiled).fingerprint
    assert reusable(compiled, fingerprint)
    (compiled / "module.so").write_bytes(b"\x7fELF not the module")
    assert not reusable(compiled, fingerprint)


def test_a_tampered_synth_shard_is_refused(synth_dir, tmp_path):
    import shutil

    from edgeq.data import load_synth_images
    from edgeq.errors import EdgeqError

    copy = shutil.copytree(synth_dir, tmp_path / "synth")
    shard = sorted(copy.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(EdgeqError, match="sha256"):
        load_synth_images(copy)


def test_a_folder_being_written_is_not_written_by_a_second_run(monkeypatch, capsys, tmp_path):
    import fcntl

    out = tmp_path / "q"
    with open(tmp_path / ".q.lock", "w") as held:  # what a running 'edgeq quantize -o q' holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("'edgeq quantize' (pid 4242 on board, since 2026-01-01T00:00:00+00:00)\n")
        held.flush()
        _assert_one_line_error(_quantize(monkeypatch, capsys, out), "being written by 'edgeq quantize' (pid 4242")
    assert not out.exists()
    assert _quantize(monkeypatch, capsys, out)[0] == 0  # released: the next run goes ahead
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no lock or partial folder left behind


def test_a_stage_that_fails_lets_its_output_folder_go(tmp_path):
    from edgeq.errors import EdgeqError
    from edgeq.manifest import _held_locks
    from edgeq.stages import synth

    out = tmp_path / "s"
    options = synth.SynthOptions(strategy="noise", size=8, num_images=2)
    with pytest.raises(EdgeqError, match="no class names"):
        synth.run(None, (), out, options)  # fails after it locked the folder
    assert out.resolve() not in _held_locks and list(tmp_path.iterdir()) == []
    assert synth.run(None, ("a", "b"), out, options) == out  # a second try in the same process goes ahead
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_manifests_of_a_newer_edgeq_or_with_wrong_types(quantized_dirs, monkeypatch, capsys, tmp_path):
    import shutil

    from edgeq.errors import EdgeqError
    from edgeq.manifest import Manifest

    folder = shutil.copytree(quantized_dirs("w4a4"), tmp_path / "q")
    capsys.readouterr()  # the fixture's progress bars
    original = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(original | {"provenance": {"signed": "later"}}))
    assert Manifest.load(folder, "quantize").stage == "quantize"  # an unknown field of the same schema: ignored
    (folder / "manifest.json").write_text(json.dumps(original | {"schema": "edgeq.manifest/2"}))
    with pytest.raises(EdgeqError, match="edgeq.manifest/2"):
        Manifest.load(folder)
    for field, value in (("inputs", {"model": "x"}), ("params", []), ("outputs", ["quantized.safetensors"])):
        (folder / "manifest.json").write_text(json.dumps(original | {field: value}))
        _assert_one_line_error(
            run_cli(monkeypatch, capsys, "export", str(folder), "-o", str(tmp_path / "e")), "not a valid", field
        )


def test_stage_outputs_have_the_permissions_of_the_umask(monkeypatch, capsys, tmp_path):
    import os
    import stat

    os.umask(old := os.umask(0o022))
    assert _quantize(monkeypatch, capsys, tmp_path / "q")[0] == 0
    for path in (tmp_path / "q").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~old, path.name


def test_debris_of_killed_runs_is_cleaned_by_the_next_successful_one(monkeypatch, capsys, tmp_path):
    for debris in (".q.partial-0123abcd", ".q.old-89abcdef"):
        (tmp_path / debris).mkdir()
        (tmp_path / debris / "half.bin").write_bytes(b"x")
    (tmp_path / ".q.partial-notours").mkdir()  # not a name edgeq makes: left alone
    assert _quantize(monkeypatch, capsys, tmp_path / "q")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".q.partial-notours", "q"]


def _checkpoint(path, **changes):
    from edgeq.data import Preprocess

    model = TinyResNet()
    record = {
        "arch": "edgeq.tiny_resnet",
        "arch_kwargs": {},
        "classes": [f"c{i}" for i in range(10)],
        "preprocess": Preprocess(1, 28, 28, (0.5,), (0.5,)).to_dict(),
        "state_dict": model.state_dict(),
    }
    for key, value in changes.items():
        if key == "preprocess_changes":
            record["preprocess"] = {**record["preprocess"], **value}
        else:
            record[key] = value
    torch.save(record, path)
    return str(path)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"preprocess_changes": {"height": None}}, "preprocessing is incomplete or malformed"),
        ({"preprocess": {"channels": 1}}, "preprocessing is incomplete or malformed"),
        ({"preprocess_changes": {"height": 0, "width": 0}}, "not an image size"),
        ({"preprocess_changes": {"channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}}, "does not run on its input"),
        ({"arch_kwargs": {"depth": 3}}, "does not take arch_kwargs"),
        ({"arch_kwargs": [1]}, "not an object"),
    ],
)
def test_bad_model_metadata_is_one_line_at_load(monkeypatch, capsys, tmp_path, changes, words):
    path = _checkpoint(tmp_path / "model.pt", **changes)
    _assert_one_line_error(run_cli(monkeypatch, capsys, "eval", path, "--data", "fashion-mnist:A"), words)


def test_a_wrong_shape_checkpoint_names_the_key_and_both_shapes(monkeypatch, capsys, tmp_path):
    state = TinyResNet().state_dict()
    key = next(k for k, v in state.items() if v.dim() == 4)
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 2)
    path = _checkpoint(tmp_path / "model.pt", state_dict=state)
    code, _, err = run_cli(monkeypatch, capsys, "eval", path, "--data", "fashion-mnist:A")
    _assert_one_line_error((code, _, err), key, "shape")


def test_a_full_disk_is_one_line_and_leaves_nothing(monkeypatch, capsys, tmp_path):
    import errno

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, err = _quantize(monkeypatch, capsys, tmp_path / "q")
    last = err.strip().splitlines()[-1]  # after the progress of the work done before the write
    assert code != 0 and "Traceback" not in err
    assert last.startswith("error: No space left on device") and "disk" in last
    assert list(tmp_path.iterdir()) == []


def test_one_broken_target_file_leaves_the_others_usable(monkeypatch, tmp_path):
    import shutil
    from importlib import resources

    from edgeq import targets

    for path in resources.files(targets.__name__).iterdir():
        if path.name.endswith(".json"):
            shutil.copy(str(path), tmp_path / path.name)
    (tmp_path / "my-board.json").write_text('{"name": "my-board", "arch": ')
    (tmp_path / "other-board.json").write_text('{"name": "other-board"}')
    monkeypatch.setattr(targets.resources, "files", lambda _name: tmp_path)
    targets._load_all.cache_clear()
    try:
        assert targets.get_target("rpi4").arch == "aarch64"
        with pytest.raises(Exception, match="my-board"):
            targets.get_target("my-board")  # an unknown name: the valid ones are listed
    finally:
        targets._load_all.cache_clear()


def test_two_one_shots_do_not_share_a_run_folder(monkeypatch, capsys, tmp_path):
    import fcntl

    with open(tmp_path / ".run.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("'edgeq compile' (pid 99 on ci, since 2026-01-01T00:00:00+00:00)\n")
        held.flush()
        _assert_one_line_error(
            run_cli(monkeypatch, capsys, "compile", "--run-dir", str(tmp_path / "run"), "--bits", "w4a4"),
            "being written by 'edgeq compile' (pid 99",
        )
    assert not (tmp_path / "run").exists()


def test_class_names_that_do_not_match_the_outputs(monkeypatch, capsys, tmp_path):
    path = _checkpoint(tmp_path / "model.pt", classes=["a", "b"])
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "eval", path, "--data", "fashion-mnist:A"), "names 2 classes but has 10 outputs"
    )


def test_options_that_would_be_ignored_are_errors(stage_chain, monkeypatch, capsys, tmp_path):
    _, exported, _ = stage_chain(tmp_path)
    command = ["compile", str(exported), "--bits", "w8a8", "--method", "qdrop", "-o", str(tmp_path / "new")]
    _assert_one_line_error(run_cli(monkeypatch, capsys, *command), "--bits", "--method", "export folder")
    _assert_one_line_error(run_cli(monkeypatch, capsys, "compile", "-o", str(tmp_path / "new")), "--run-dir")
    assert not (tmp_path / "new").exists()


def test_calibration_images_made_for_another_model_are_announced(synth_dir, monkeypatch, capsys, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("".join(f"thing {i}\n" for i in range(10)))
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "quantize",
        "tests.factories:tiny_cifar",
        "--classes",
        str(names),
        "--calib",
        str(synth_dir),
        "--method",
        "rtn",
        "-o",
        str(tmp_path / "q"),
    )
    assert code == 0, err
    assert "labelled for other classes" in err and "not the model's input 32x32" in err, err


def test_a_bundle_archive_name_taken_by_a_folder(stage_chain, monkeypatch, capsys, tmp_path):
    _, _, compiled = stage_chain(tmp_path)
    (tmp_path / "b.tar.gz").mkdir()
    _assert_one_line_error(
        run_cli(monkeypatch, capsys, "bundle", str(compiled), "--tar", "-o", str(tmp_path / "b")), "is a folder"
    )
    assert not (tmp_path / "b").exists()
