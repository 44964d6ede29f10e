"""Stage 2, quantize: a fake-quantized model at a spec, calibrated on a synth folder.

The model itself (``QuantizedLayer``, ``QuantizedMatMul``, calibration, the folder's
weights file and its loader) lives in :mod:`edgeq.quantized`; this stage resolves the
calibration set, quantizes the model on it (round-to-nearest, or rounding learned by
``edgeq.reconstruction``: AdaRound, BRECQ, QDrop) and writes the folder with its manifest.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..data import dataset_digest, resolve_dataset
from ..errors import EdgeqError
from ..manifest import Manifest, claim_output, input_entry, releases_on_failure, sha256_file
from ..models import LoadedModel, adopt_folder_classes, load_model
from ..quantized import (
    QuantizedLayer,
    quantizable_layers,
    quantize_module,
    quantized_layer_names,
    quantized_matmuls,
    save,
)
from ..reconstruction import Method, ReconstructionConfig, Rounding
from ..spec import QuantSpec, apply_layer_bits

log = logging.getLogger(__name__)


def plan(
    loaded: LoadedModel,
    calib: str | Path,
    spec: QuantSpec,
    *,
    num_images: int,
    seed: int,
    allow_pickle: bool,
    reconstruction: ReconstructionConfig | None = None,
    calib_per_class: int | None = None,
) -> Manifest:
    """The manifest a run with these inputs and settings writes (its fingerprint decides reuse)."""
    reconstruction = reconstruction or ReconstructionConfig(method=Method.RTN)
    params = {
        "num_images": num_images,
        "method": reconstruction.method.value,
        "allow_pickle": allow_pickle,
        "preprocess": loaded.preprocess.to_dict(),
    }
    if calib_per_class is not None:
        params["calib_per_class"] = calib_per_class
    if reconstruction.learns:
        params["reconstruction"] = reconstruction.to_json()
    if reconstruction.bias_correction:  # recorded only when on: folders made before it existed stay reusable
        params["bias_correction"] = True
    if reconstruction.initial_rounding is not Rounding.NEAREST:
        params["initial_rounding"] = reconstruction.initial_rounding.value
    return Manifest(
        stage="quantize",
        inputs=[_model_entry(loaded), _calib_entry(calib)],
        params=params,
        spec=spec.to_dict(),
        seed=seed,
    )


def resolve_layer_bits(spec: QuantSpec, layer_bits, loaded: LoadedModel) -> QuantSpec:
    """``spec`` with per-layer overrides applied to ``loaded``'s quantizable layers (logged, one line)."""
    if not layer_bits:
        return spec
    resolved = apply_layer_bits(spec, layer_bits, quantizable_layers(loaded.module))
    changed = sorted(set(resolved.layers) - set(spec.layers))
    log.info(
        "--layer-bits: %d layer(s) set (%s%s)",
        len(changed),
        ", ".join(f"{name}=w{w}a{a}" for name, w, a in changed[:4]),
        ", ..." if len(changed) > 4 else "",
    )
    return resolved


@releases_on_failure
def run(
    model: str | LoadedModel | None,
    calib: str | Path,
    out: str | Path,
    *,
    bits: QuantSpec | str = "w4a4",
    num_images: int = 256,
    seed: int = 0,
    allow_pickle: bool = False,
    classes_file=None,
    reconstruction: ReconstructionConfig | None = None,
    device: str = "cpu",
    calib_per_class: int | None = None,
    preprocess=None,
    force: bool = False,
    layer_bits=(),
) -> Path:
    """Quantize ``model`` calibrated on ``calib`` (a synth folder, fashion-mnist:A, real, or a folder of images)
    into folder ``out``.

    ``reconstruction`` None: round-to-nearest. ``calib_per_class``: a balanced subset of an image folder, drawn
    with ``seed``, before ``num_images`` caps it. ``preprocess``: command-line overrides
    (:class:`edgeq.data.PreprocessOverrides`) when ``model`` is not loaded yet. ``force``: replace ``out`` even
    when it is not a quantize folder. ``layer_bits``: per-layer overrides (:func:`edgeq.spec.parse_layer_bits`
    or its text), resolved on the model's layer names into the spec the manifest records.
    """
    source = model.source if isinstance(model, LoadedModel) else model
    claim_output(out, "quantize", inputs=[source, calib], force=force)
    spec = QuantSpec.load(bits) if isinstance(bits, str) else bits
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, allow_pickle=allow_pickle, classes_file=classes_file, preprocess=preprocess)
    )
    spec = resolve_layer_bits(spec, layer_bits, loaded)
    calib = resolve_calibration(calib, loaded)
    images = resolve_dataset(
        str(calib),
        num_images,
        preprocess=loaded.preprocess,
        per_class=calib_per_class,
        seed=seed,
        classes=loaded.classes,
    )
    adopt_folder_classes(loaded, images)
    manifest = plan(
        loaded,
        calib,
        spec,
        num_images=num_images,
        seed=seed,
        allow_pickle=allow_pickle,
        reconstruction=reconstruction,
        calib_per_class=calib_per_class,
    )
    if len(images) == 0:
        raise EdgeqError(f"the calibration set {calib} is empty", "run 'edgeq synth' with --num-images > 0")
    pre = loaded.preprocess
    made = images.images.shape[1:3]
    if Path(str(calib)).is_dir() and made != (pre.height, pre.width):
        # a synth folder made for another model: resizing changes what the images show to this one
        log.warning(
            "calibration images of %s are %dx%d, not the model's input %dx%d: they are resized to it (made for "
            "another model?)",
            calib,
            made[1],
            made[0],
            pre.width,
            pre.height,
        )
    inputs = loaded.preprocess(images.images)
    method = reconstruction.method if reconstruction else Method.RTN
    log.info("quantizing %s at %s (%s) on %d images from %s", loaded.source, spec, method, len(inputs), calib)
    began = time.perf_counter()
    units: list = []
    quantized = quantize_module(
        loaded.module, inputs, spec, seed=seed, reconstruction=reconstruction, device=device, report=units
    )
    manifest.extra = {
        "model": {
            "source": loaded.source,
            "arch": loaded.arch,
            "classes": list(loaded.classes),
            "preprocess": loaded.preprocess.to_dict(),
            "note": loaded.note,
        },
        "layers": quantized_layer_names(quantized),
        "layer_bits": {
            name: [m.weight_bits, m.act_bits] for name, m in quantized.named_modules() if isinstance(m, QuantizedLayer)
        },
        "matmuls": list(quantized_matmuls(quantized)),
        "calibration_images": len(inputs),
        "seconds": round(time.perf_counter() - began, 2),
        "reconstruction": units,
    }
    return save(quantized, manifest, out)


REAL_CALIBRATION = "real"  # 1024 images of the training split the zoo's Fashion-MNIST models were trained on


def resolve_calibration(calib: str | Path, loaded: LoadedModel) -> str | Path:
    """``real`` names the model's own real calibration data (split A for the zoo's Fashion-MNIST models)."""
    if str(calib) != REAL_CALIBRATION:
        return calib
    if loaded.eval_data == "fashion-mnist:test":
        return "fashion-mnist:A"
    raise EdgeqError(
        f"--calib real: no real calibration images are known for {loaded.source}", "pass an 'edgeq synth' folder"
    )


def _calib_entry(calib) -> dict:
    calib = str(calib)
    if calib.startswith("fashion-mnist"):
        from ..data import FASHION_MNIST_DIR

        return input_entry("calibration", calib, _dataset_digest(FASHION_MNIST_DIR, calib))
    return input_entry("calibration", calib, dataset_digest(calib))


def _model_entry(loaded) -> dict:
    """The model by its weights' digest, and a file by its bytes too: later stages check those before unpickling."""
    entry = input_entry("model", loaded.source, loaded.digest())
    if Path(loaded.source).is_file():
        entry["file_sha256"] = sha256_file(loaded.source)
    return entry


def _dataset_digest(folder, name) -> str:
    import hashlib

    digest = hashlib.sha256(name.encode())
    for file in sorted(Path(folder).glob("*.gz")):
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()
