"""Loading models safely, with the metadata the pipeline needs (class names, preprocessing).

Accepted sources:

* nothing, or ``builtin:NAME``: a model edgeq ships;
* ``model.pt`` / ``model.safetensors``: a checkpoint that names a known architecture
  (``{"arch": ..., "arch_kwargs": ..., "state_dict": ..., "classes": ..., "preprocess": ...}``),
  read with ``torch.load(weights_only=True)`` or safetensors, so no code runs from the file;
* ``model.pt2``: a ``torch.export`` program, after checking that loading it unpickles nothing;
* ``timm:NAME``: a timm model with its pretrained weights (from the local cache when offline);
* ``package.module:function``: a factory in the user's own code, returning an ``nn.Module``
  (or a ``(module, metadata)`` pair);
* a fully pickled ``nn.Module``, only with ``allow_pickle=True``: unpickling runs whatever
  code the file names, so it is refused unless the user says the file is trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from . import zoo
from .data import Preprocess, PreprocessOverrides
from .errors import EdgeqError
from .graph import eval_mode

log = logging.getLogger(__name__)

PICKLE_HINT = (
    "it is a full pickle, and unpickling can run arbitrary code; re-run with --allow-pickle "
    "only if you trust the file, or save it safely with edgeq.save_checkpoint() or torch.export.save()"
)
IMAGENET_PREPROCESS = Preprocess(3, 224, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclasses.dataclass
class LoadedModel:
    module: nn.Module
    source: str  # what names the model, as a later run can load it again
    classes: tuple[str, ...]
    preprocess: Preprocess
    arch: str | None = None
    note: str | None = None  # shown to the user, e.g. how a figure should be read
    eval_data: str | None = None  # labelled data the model is known to be measured on
    generator: str | None = None  # a text-to-image generator that knows the model's classes

    @property
    def name(self) -> str:
        """A short name for run folders: the file stem, or the source with ':' made filename-safe."""
        if self.source.startswith("builtin:"):
            return self.source.partition(":")[2]
        if Path(self.source).suffix in (".pt", ".pt2", ".pth", ".safetensors"):
            return Path(self.source).stem
        return self.source.replace(":", "-").replace("/", "-")

    def digest(self) -> str:
        """A hash of the weights, names and shapes: equal digests mean the same model."""
        digest = hashlib.sha256(str(self.arch).encode())
        for key, tensor in sorted(self.module.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def save_checkpoint(
    path, module: nn.Module, arch: str, classes, preprocess: Preprocess, arch_kwargs: dict | None = None
) -> None:
    """Save a model so that edgeq (and anyone) can load it without unpickling code."""
    path = Path(path)
    meta = {
        "arch": arch,
        "arch_kwargs": arch_kwargs or {},
        "classes": list(classes),
        "preprocess": preprocess.to_dict(),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_name(f".{path.name}.partial")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata={"edgeq": json.dumps(meta)})
    else:
        torch.save({**meta, "state_dict": state}, tmp)
    os.replace(tmp, path)


def load_model(
    source: str | None = None,
    *,
    allow_pickle: bool = False,
    classes_file: str | os.PathLike | None = None,
    preprocess: PreprocessOverrides | Preprocess | None = None,
) -> LoadedModel:
    """Load a model from any accepted source (see the module docstring).

    ``preprocess``: the user's overrides, or a whole :class:`Preprocess` an earlier stage recorded (it replaces
    the model's own, so a guess the user already corrected is not announced again).
    """
    source = source or zoo.DEFAULT_MODEL
    if source.startswith("builtin:"):
        loaded = _load_builtin(source.partition(":")[2])
    elif source.startswith("zoo:"):
        loaded = _load_zoo(source.partition(":")[2])
    elif Path(source).exists():
        loaded = _load_file(Path(source), allow_pickle)
    elif source.startswith("timm:"):
        loaded = _load_timm(source.partition(":")[2])
    elif ":" in source and not source.startswith(("/", ".")):
        loaded = _load_factory(source)
    else:
        raise EdgeqError(
            f"model file not found: {source}",
            "pass a .pt/.pt2/.safetensors path, timm:NAME, package.module:function, "
            "or nothing for the built-in default",
        )
    if classes_file is not None:
        loaded.classes = read_classes(classes_file)
    if isinstance(preprocess, Preprocess):
        loaded.preprocess = preprocess
    elif preprocess:
        loaded.preprocess = preprocess.apply(loaded.preprocess)
    if loaded.preprocess.guessed:
        _announce_guess(loaded)
    eval_mode(loaded.module)
    _check_runs(loaded)
    return loaded


def _check_runs(loaded: LoadedModel) -> None:
    """One forward pass of a zero image: metadata that does not fit the model fails here, in one line, and not
    deep inside a stage after minutes of work."""
    shape = loaded.preprocess.input_shape
    try:
        with torch.no_grad():
            out = loaded.module(torch.zeros(shape))
    except Exception as exc:  # noqa: BLE001 - any failure means the recorded input does not fit
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgeqError(
            f"{loaded.source} does not run on its input {'x'.join(map(str, shape[1:]))} "
            f"({type(exc).__name__}: {first[:200]})",
            "pass --input-size (and --mean/--std for other channels), or record the right preprocessing",
        ) from None
    outputs = out.shape[-1] if isinstance(out, torch.Tensor) and out.dim() == 2 else None
    if outputs is not None and loaded.classes and len(loaded.classes) != outputs:
        raise EdgeqError(
            f"{loaded.source} names {len(loaded.classes)} classes but has {outputs} outputs",
            f"pass --classes with a file of {outputs} class names, one per line",
        )


def read_classes(path) -> tuple[str, ...]:
    path = Path(path)
    if not path.is_file():
        raise EdgeqError(f"classes file not found: {path}", "pass a text file with one class name per line")
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names:
        raise EdgeqError(f"classes file {path} is empty", "write one class name per line")
    return names


def _load_builtin(name: str) -> LoadedModel:
    with zoo.resources.as_file(zoo.builtin_weights_path(name)) as path:
        loaded = _load_safetensors(Path(path))
    loaded.source = f"builtin:{name}"
    loaded.eval_data = "fashion-mnist:test"
    loaded.generator = zoo.DEFAULT_GENERATOR
    return loaded


# TF Lite's EfficientNet-Lite: shorter side to 256 (bicubic), center crop 224, (x - 127) / 128 on 0..255 values
EFFICIENTNET_LITE_PREPROCESS = Preprocess(
    3, 224, 224, (127.0 / 255,) * 3, (128.0 / 255,) * 3, crop_pct=0.875, interpolation="bicubic", scaling="byte"
)
# The pretrained CIFAR-10 ResNets were trained on 32x32 inputs normalized with ImageNet's mean and std.
CIFAR_RESNET_PREPROCESS = Preprocess(3, 32, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _load_zoo(name: str) -> LoadedModel:
    entry = zoo.entry(name)
    if entry.kind != "classifier":
        raise EdgeqError(
            f"zoo:{name} is a {entry.kind}, not a model to quantize",
            "pass it as --generator, or pick a classifier from 'edgeq zoo list'",
        )
    if name == "efficientnet-lite0":
        return LoadedModel(
            zoo.load_efficientnet_lite0(),
            "zoo:efficientnet-lite0",
            zoo.imagenet_classes(),
            EFFICIENTNET_LITE_PREPROCESS,
            arch="efficientnet-lite0",
            note="no ImageNet here: accuracy figures are agreement with full precision on real photos",
            eval_data=entry.eval_data,
        )
    if name.startswith("cifar10-resnet"):
        from . import assets

        test_folder = assets.find("datasets/cifar10/test")
        return LoadedModel(
            zoo.load_cifar_resnet(name),
            f"zoo:{name}",
            zoo.CIFAR10_CLASSES,
            CIFAR_RESNET_PREPROCESS,
            arch="edgeq.cifar_resnet",
            eval_data=str(test_folder) if test_folder else None,
        )
    with zoo.resources.as_file(zoo.weights_path(name)) as path:
        loaded = _load_safetensors(Path(path))
    loaded.source = f"zoo:{name}"
    loaded.eval_data = entry.eval_data
    loaded.generator = zoo.DEFAULT_GENERATOR if entry.eval_data == "fashion-mnist:test" else None
    return loaded


def _from_metadata(meta: dict, state_dict: dict, source: str) -> LoadedModel:
    if "arch" not in meta:
        raise EdgeqError(
            f"{source} does not name its architecture", "save it with edgeq.save_checkpoint(path, model, arch=...)"
        )
    arch_kwargs = meta.get("arch_kwargs")
    if arch_kwargs is not None and not isinstance(arch_kwargs, dict):
        raise EdgeqError(f"{source}: arch_kwargs is {arch_kwargs!r}, not an object", "record keyword arguments or none")
    try:
        module = zoo.build_architecture(meta["arch"], arch_kwargs)
    except TypeError as exc:
        raise EdgeqError(
            f"{source}: architecture {meta['arch']} does not take arch_kwargs {arch_kwargs}: {exc}",
            "record the keyword arguments the architecture takes",
        ) from None
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        # torch's first line only says that loading failed; the next names the key (and both shapes)
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise EdgeqError(
            f"{source}: weights do not fit architecture {meta['arch']}: {detail}",
            "check the checkpoint's arch and arch_kwargs",
        ) from None
    classes = tuple(meta.get("classes") or ())
    try:
        preprocess = Preprocess.from_dict(meta["preprocess"]) if meta.get("preprocess") else _default_preprocess(module)
    except (KeyError, TypeError, ValueError) as exc:
        raise EdgeqError(
            f"{source}: its recorded preprocessing is incomplete or malformed ({type(exc).__name__}: {exc})",
            "record channels, height, width, mean and std (edgeq.save_checkpoint does), or pass --input-size, "
            "--mean and --std",
        ) from None
    return LoadedModel(module, source, classes or _default_classes(module), preprocess, arch=meta["arch"])


def _load_safetensors(path: Path) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("edgeq", "{}"))
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise EdgeqError(
            f"cannot read {path}: not a valid safetensors file ({exc})", "check the file is complete"
        ) from None
    return _from_metadata(meta, state, str(path))


def _load_file(path: Path, allow_pickle: bool) -> LoadedModel:
    if path.is_dir():
        raise EdgeqError(f"{path} is a folder, not a model file", "pass the .pt, .pt2 or .safetensors file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if zipfile.is_zipfile(path) and any(n.endswith("/archive_format") for n in zipfile.ZipFile(path).namelist()):
        return _load_exported(path, allow_pickle)
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":  # neither torch's zip format nor a pickle
        raise EdgeqError(
            f"cannot read {path}: not a PyTorch checkpoint",
            "check the file is complete and was written by torch.save or torch.export.save",
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise EdgeqError(f"refusing to unpickle {path}", PICKLE_HINT) from None
        log.warning("unpickling %s because --allow-pickle was given (%s)", path, str(exc).splitlines()[0])
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise EdgeqError(
            f"cannot read {path}: not a PyTorch checkpoint ({str(exc).splitlines()[0]})",
            "check the file is complete and was written by torch.save or torch.export.save",
        ) from None
    if isinstance(obj, nn.Module):
        return LoadedModel(obj, str(path), _default_classes(obj), _default_preprocess(obj), arch=None)
    if isinstance(obj, dict) and "state_dict" in obj:
        return _from_metadata(obj, obj["state_dict"], str(path))
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EdgeqError(
            f"{path} holds a bare state_dict without its architecture",
            "save it with edgeq.save_checkpoint(path, model, arch=...), "
            "or pass a package.module:function that builds the model",
        )
    raise EdgeqError(
        f"{path} holds a {type(obj).__name__}, not a model",
        "pass a checkpoint saved by edgeq.save_checkpoint() or torch.export.save()",
    )


def _export_archive_unpickles(path: Path) -> str | None:
    """Name what in a torch.export archive would be unpickled on load, or None if nothing."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith(("weights/model_weights_config.json", "constants/model_constants_config.json")):
                config = json.loads(archive.read(name)).get("config", {})
                for fqn, payload in config.items():
                    if payload.get("use_pickle") or str(payload.get("path_name", "")).startswith(
                        ("custom_obj", "opaque_obj")
                    ):
                        return f"tensor or object '{fqn}'"
            if "/sample_inputs/" in name:
                import io

                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except pickle.UnpicklingError:
                    return "its sample inputs"
    return None


def _load_exported(path: Path, allow_pickle: bool) -> LoadedModel:
    unsafe = _export_archive_unpickles(path)
    if unsafe and not allow_pickle:
        raise EdgeqError(f"refusing to load {path}: {unsafe} is pickled", PICKLE_HINT)
    extra = {"edgeq.json": ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - the archive format raises many kinds
        raise EdgeqError(
            f"cannot read torch.export program {path}: {str(exc).splitlines()[0]}",
            "re-create it with torch.export.save()",
        ) from None
    meta = json.loads(extra["edgeq.json"] or "{}")
    from .graph import modules_from_exported

    module = modules_from_exported(program)
    placeholder = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    shape = None
    if placeholder:
        for node in program.graph.nodes:
            if node.op == "placeholder" and node.name == placeholder[0].arg.name:
                shape = tuple(node.meta["val"].shape)
    if shape and isinstance(shape[0], int):
        raise EdgeqError(
            f"{path} was exported with a fixed batch size of {shape[0]}; edgeq calibrates and evaluates in batches",
            "re-export with dynamic_shapes=({0: torch.export.Dim('batch')},)",
        )
    shape = tuple(int(d) for d in shape[1:]) if shape else None
    preprocess = Preprocess.from_dict(meta["preprocess"]) if meta.get("preprocess") else _preprocess_for_shape(shape)
    classes = tuple(meta.get("classes") or ()) or _numbered_classes(module)
    return LoadedModel(module, str(path), classes, preprocess, arch="torch.export")


def _load_timm(name: str) -> LoadedModel:
    import timm

    if not timm.is_model(name):
        raise EdgeqError(f"unknown timm model '{name}'", "see timm.list_models() for the valid names")
    try:
        module = timm.create_model(name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise EdgeqError(
            f"cannot get pretrained weights for timm:{name} ({type(exc).__name__})",
            "put them in the Hugging Face cache first, "
            "or save the model with edgeq.save_checkpoint() and pass the file",
        ) from None
    return LoadedModel(module, f"timm:{name}", _default_classes(module), _timm_preprocess(module), arch=f"timm:{name}")


def _load_factory(spec: str) -> LoadedModel:
    module_name, _, function_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise EdgeqError(
            f"cannot import model factory '{spec}': {exc}",
            "pass package.module:function importable from the current environment",
        ) from None
    result = factory()
    meta = {}
    if isinstance(result, tuple) and len(result) == 2:
        result, meta = result
    if not isinstance(result, nn.Module):
        raise EdgeqError(
            f"model factory '{spec}' returned {type(result).__name__}, not an nn.Module",
            "return the model, or (model, {'classes': [...], 'preprocess': {...}})",
        )
    classes = tuple(meta.get("classes") or ()) or _default_classes(result)
    preprocess = Preprocess.from_dict(meta["preprocess"]) if meta.get("preprocess") else _default_preprocess(result)
    return LoadedModel(result, spec, classes, preprocess, arch=f"factory:{spec}")


_GUESS_HINT = (
    "pass --input-size, --mean and --std (and --crop-pct, --interpolation) as the model was trained, "
    "or save it with edgeq.save_checkpoint(..., preprocess=Preprocess(...))"
)
_announced: set[str] = set()


def _announce_guess(loaded: LoadedModel) -> None:
    """One warning per model and process (stages reload the model), and a note for the one-shot summary."""
    line = f"preprocessing of {loaded.source} is guessed: {loaded.preprocess.describe()}"
    loaded.note = f"{loaded.note}; {line}" if loaded.note else line
    if loaded.source not in _announced:
        _announced.add(loaded.source)
        log.warning("%s (%s)", line, _GUESS_HINT)


def _timm_preprocess(module: nn.Module) -> Preprocess:
    """timm's own evaluation transform for the model: input size, crop_pct, interpolation, mean and std."""
    try:
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(module)
    except Exception:  # noqa: BLE001 - an old timm or a model without a config: fall back to the guess
        return _default_preprocess(module)
    c, h, w = cfg["input_size"]
    interpolation = cfg.get("interpolation", "bilinear")
    return Preprocess(
        int(c),
        int(h),
        int(w),
        tuple(float(v) for v in cfg.get("mean", (0.5,) * c)),
        tuple(float(v) for v in cfg.get("std", (0.5,) * c)),
        crop_pct=float(cfg.get("crop_pct") or 1.0),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bicubic",
    )


def _default_preprocess(module: nn.Module) -> Preprocess:
    """A model without metadata: timm's config when it has one, else a guess (``guessed=True``) from its first
    convolution and output count, checked by running the model at the guessed size."""
    cfg = getattr(module, "pretrained_cfg", None)
    if cfg and "input_size" in cfg:
        return _timm_preprocess(module)
    first_conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else 3
    if channels == 1:
        return Preprocess(1, 28, 28, (0.5,), (0.5,), guessed=True)
    if channels != 3:
        return Preprocess(channels, 224, 224, (0.5,) * channels, (0.5,) * channels, guessed=True)
    # 10 or 100 outputs: most likely CIFAR (32x32); the common CIFAR normalizations are near ImageNet's
    size = 32 if _num_classes(module) in (10, 100) else 224
    size = _runnable_size(module, channels, size)
    return dataclasses.replace(IMAGENET_PREPROCESS, height=size, width=size, crop_pct=1.0, guessed=True)


_PROBE_SIZES = (224, 32, 28, 64, 96, 128, 160, 192, 256, 299, 384)


def _runnable_size(module: nn.Module, channels: int, first: int) -> int:
    """``first`` if the model runs on it, else the first probe size it runs on (a model with a flatten before its
    classifier runs at one size only); ``first`` when none does (the failure then shows where it belongs)."""
    training = {sub: sub.training for sub in module.modules()}
    eval_mode(module)  # a forward pass in training mode would move BatchNorm's running statistics
    try:
        for size in (first, *(s for s in _PROBE_SIZES if s != first)):
            try:
                with torch.no_grad():
                    module(torch.zeros(1, channels, size, size))
                return size
            except Exception:  # noqa: BLE001 - a shape error of any kind means "not this size"
                continue
        return first
    finally:
        for sub, mode in training.items():
            sub.training = mode


def _preprocess_for_shape(shape) -> Preprocess:
    """A guess from the input shape (C, H, W): inputs scaled to [-1, 1]."""
    if shape is None or len(shape) != 3:
        return dataclasses.replace(IMAGENET_PREPROCESS, guessed=True)
    c, h, w = shape
    return Preprocess(int(c), int(h), int(w), (0.5,) * int(c), (0.5,) * int(c), guessed=True)


def adopt_folder_classes(loaded: LoadedModel, images) -> None:
    """Class names from an image folder's class folders when the model has none of its own (only numbers)."""
    names = tuple(images.class_names or ())
    if names and len(names) == len(loaded.classes) and loaded.classes == tuple(f"class {i}" for i in range(len(names))):
        loaded.classes = names


def _default_classes(module: nn.Module) -> tuple[str, ...]:
    num_classes = _num_classes(module)
    if num_classes == 1000:  # ImageNet-1k in practice; --classes overrides
        try:
            from timm.data import ImageNetInfo

            return tuple(ImageNetInfo().label_descriptions(as_dict=False)[i].split(",")[0] for i in range(1000))
        except Exception:  # noqa: BLE001 - optional nicety
            pass
    return _numbered_classes(module)


def _numbered_classes(module: nn.Module) -> tuple[str, ...]:
    return tuple(f"class {i}" for i in range(_num_classes(module) or 0))


def _num_classes(module: nn.Module) -> int | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None
