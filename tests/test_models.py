"""Loading models: safe by default, with the metadata the pipeline needs."""

import os
import pickle

import pytest
import torch
from torch import nn

from edgeq import EdgeqError
from edgeq.data import FASHION_MNIST_CLASSES, Preprocess
from edgeq.models import load_model, save_checkpoint
from edgeq.zoo import TinyResNet

PRE = Preprocess(1, 28, 28, (0.5,), (0.5,))


def _same_outputs(a, b):
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-5)


def test_builtin_model_has_metadata(builtin_model):
    assert builtin_model.source == "builtin:tiny-fmnist"
    assert builtin_model.classes == FASHION_MNIST_CLASSES
    assert builtin_model.preprocess.input_shape == (1, 1, 28, 28)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_round_trip(tmp_path, suffix, builtin_model):
    path = tmp_path / f"model{suffix}"
    save_checkpoint(
        path, builtin_model.module, "edgeq.tiny_resnet", ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"], PRE
    )
    loaded = load_model(str(path))
    assert loaded.classes[0] == "a" and loaded.preprocess == PRE
    assert loaded.digest() == builtin_model.digest()
    assert _same_outputs(loaded.module, builtin_model.module)


def test_missing_file():
    with pytest.raises(EdgeqError, match="not found"):
        load_model("no/such/model.pt")


def test_corrupt_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(EdgeqError, match="cannot read"):
        load_model(str(path))


def test_truncated_safetensors(tmp_path, builtin_model):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, builtin_model.module, "edgeq.tiny_resnet", FASHION_MNIST_CLASSES, PRE)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(EdgeqError, match="cannot read"):
        load_model(str(path))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_needs_opt_in(tmp_path):
    path = tmp_path / "full.pt"
    torch.save(TinyResNet(), path)
    with pytest.raises(EdgeqError, match="refusing to unpickle") as info:
        load_model(str(path))
    assert "--allow-pickle" in info.value.hint
    assert isinstance(load_model(str(path), allow_pickle=True).module, TinyResNet)


def test_malicious_pickle_is_not_run(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(EdgeqError, match="refusing|cannot read"):
        load_model(str(path))


def test_bare_state_dict_is_explained(tmp_path, builtin_model):
    path = tmp_path / "weights.pt"
    torch.save(builtin_model.module.state_dict(), path)
    with pytest.raises(EdgeqError, match="bare state_dict"):
        load_model(str(path))


def test_exported_program_loads_with_modules(tmp_path, builtin_model):
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        builtin_model.module.eval(), (torch.randn(2, 1, 28, 28),), dynamic_shapes=({0: batch},)
    )
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    loaded = load_model(str(path), classes_file=None)
    convs = [n for n, m in loaded.module.named_modules() if isinstance(m, nn.Conv2d)]
    assert "stem.0" in convs and len(convs) == 5
    assert loaded.preprocess.input_shape == (1, 1, 28, 28)
    assert _same_outputs(loaded.module, builtin_model.module)


def tiny_factory():
    return TinyResNet(), {"classes": list("abcdefghij"), "preprocess": PRE.to_dict()}


def test_factory_and_classes_file(tmp_path):
    loaded = load_model("tests.test_models:tiny_factory")
    assert loaded.classes[0] == "a"
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(f"thing {i}" for i in range(10)) + "\n")
    assert load_model("tests.test_models:tiny_factory", classes_file=classes).classes[9] == "thing 9"


def test_bad_factory():
    with pytest.raises(EdgeqError, match="cannot import"):
        load_model("tests.no_such_module:make")


def test_exported_program_with_fixed_batch_is_explained(tmp_path, builtin_model):
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(builtin_model.module.eval(), (torch.randn(1, 1, 28, 28),)), path)
    with pytest.raises(EdgeqError, match="fixed batch size") as info:
        load_model(str(path))
    assert "dynamic_shapes" in info.value.hint
