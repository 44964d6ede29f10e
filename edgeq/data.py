"""Images in and out: the Fashion-MNIST files, synth folders, preprocessing to a model's input, and image sets.

Images travel between stages as uint8 arrays (N, H, W, C), the way a generator or a
camera makes them; each model's :class:`Preprocess` turns them into its float input.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import struct
from pathlib import Path

import numpy as np

from .errors import EdgeqError
from .manifest import MANIFEST_NAME, Manifest

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path(os.environ.get("EDGEQ_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_INSTALL = (
    "sudo apt-get install dataset-fashion-mnist (Debian/Ubuntu), "
    "or set EDGEQ_FASHION_MNIST_DIR to a folder with the four IDX .gz files"
)
# Names as a prompt would say them (the dataset's own labels are "T-shirt/top", "Trouser", ...).
FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# Split A trains the teachers and is the "real data" reference; split B trains the
# generator, which stands in for a public text-to-image model trained on other data.
SPLIT_SEED = 20260101
DATA_ALIASES = {"fmnist-test": "fashion-mnist:test", "fmnist-A": "fashion-mnist:A", "fmnist-B": "fashion-mnist:B"}
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


INTERPOLATIONS = ("bilinear", "bicubic")
SCALINGS = ("unit", "byte")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How a model wants its input: channels, size, resize and crop, and per-channel normalization.

    ``mean`` and ``std`` are per channel, of pixels scaled to [0, 1], whatever ``scaling`` says.
    The geometry is torchvision's and timm's evaluation transform on PIL images: with ``crop_pct``,
    the shorter side is resized to ``int(max(height, width) / crop_pct)`` (aspect kept) and the
    center ``height`` x ``width`` is cropped; without it (the behaviour before resize-and-crop, and
    of manifests that do not record it) the image is stretched to ``height`` x ``width``. An image
    already at ``height`` x ``width`` is taken as it is: image folders are read through
    :meth:`fit` at decode time, so they arrive at the model's size, and so do synth images.
    """

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float | None = None
    interpolation: str = "bilinear"
    # "unit": (pixel / 255 - mean) / std, as torchvision's ToTensor and Normalize compute it; "byte": (pixel - 255 mean)
    # / (255 std) on 0..255 values, as TF Lite models compute (x - 127) / 128, exactly in float32
    scaling: str = "unit"
    guessed: bool = False  # size or normalization inferred, not read from the model or the user

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise EdgeqError(
                f"unknown interpolation '{self.interpolation}'", f"choose one of: {', '.join(INTERPOLATIONS)}"
            )
        if self.scaling not in SCALINGS:
            raise EdgeqError(f"unknown scaling '{self.scaling}'", f"choose one of: {', '.join(SCALINGS)}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise EdgeqError(f"crop_pct must be in (0, 1], not {self.crop_pct}", "pass e.g. 0.875, or 1 for no margin")
        if self.channels not in (1, 3) or self.height < 1 or self.width < 1:
            raise EdgeqError(
                f"input {self.channels}x{self.height}x{self.width} is not an image size (1 or 3 channels, at least "
                "1x1 pixels)",
                "record the model's input size, or pass --input-size",
            )
        if any(s <= 0 for s in self.std):
            raise EdgeqError(f"std must be positive, not {self.std}", "pass one positive value per channel")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise EdgeqError(
                f"mean and std need {self.channels} values (one per channel), not {len(self.mean)} and {len(self.std)}",
                "pass one value per input channel",
            )

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        return {
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "scaling": self.scaling,
            "guessed": self.guessed,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocess":
        """Also reads dicts written before resize-and-crop (no ``crop_pct``: stretched, bilinear, unit scaling)."""
        crop_pct = data.get("crop_pct")
        return cls(
            int(data["channels"]),
            int(data["height"]),
            int(data["width"]),
            tuple(map(float, data["mean"])),
            tuple(map(float, data["std"])),
            crop_pct=None if crop_pct is None else float(crop_pct),
            interpolation=str(data.get("interpolation", "bilinear")),
            scaling=str(data.get("scaling", "unit")),
            guessed=bool(data.get("guessed", False)),
        )

    def describe(self) -> str:
        """One line, e.g. '3x224x224, resize 256 bicubic + center crop, mean (...) std (...)'."""
        geometry = (
            f"resize {self.resize_size} {self.interpolation} + center crop"
            if self.crop_pct is not None
            else f"stretched ({self.interpolation})"
        )
        values = "(x - 127) / 128" if self.scaling == "byte" else f"mean {self.mean} std {self.std}"
        return f"{self.channels}x{self.height}x{self.width}, {geometry}, {values}"

    @property
    def resize_size(self) -> int | None:
        """What the shorter side is resized to before the center crop (timm: int(size / crop_pct))."""
        return None if self.crop_pct is None else int(max(self.height, self.width) / self.crop_pct)

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an image of this size after the resize (before the crop)."""
        if self.crop_pct is None:
            return self.height, self.width
        short = self.resize_size
        if width <= height:  # torchvision: the long side is int(short * long / shorter side)
            return int(short * height / width), short
        return short, int(short * width / height)

    def fit(self, image) -> np.ndarray:
        """An image (PIL, or uint8 (H, W[, C])) -> uint8 (height, width, C): the resize and center crop.

        The resize is Pillow's algorithm (torchvision's Resize on PIL images) written in NumPy in
        ``edgeq/runtime/runner.py``, the code the board runs, so host and board agree bit for bit.
        """
        from .runtime import runner

        array = np.asarray(image)
        if array.ndim == 2:
            array = array[..., None]
        return runner.fit(array, self.to_dict())

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, H, W[, C]) -> float32 model input (N, C, height, width).

        Images not at the model's size are resized and cropped one by one (:meth:`fit`); the
        board runner (``edgeq/runtime/runner.py``) computes the same values in NumPy.
        """
        x = np.asarray(images)
        if x.ndim == 3:
            x = x[..., None]
        if x.shape[1:3] != (self.height, self.width):
            x = np.stack([self.fit(image) for image in x])
        x = x.astype(np.float32)
        if x.shape[-1] != self.channels:
            if self.channels == 1:  # ITU-R BT.601 luma, as PIL's convert("L")
                r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
                x = r * np.float32(0.299) + g * np.float32(0.587) + b * np.float32(0.114)
            elif x.shape[-1] == 1:
                x = np.repeat(x, self.channels, axis=-1)
            else:
                raise EdgeqError(
                    f"cannot convert {x.shape[-1]}-channel images to {self.channels} channels",
                    "provide RGB or grayscale images",
                )
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        if self.scaling == "byte":
            mean = np.asarray([m * 255.0 for m in self.mean], np.float32).reshape(1, -1, 1, 1)
            std = np.asarray([s * 255.0 for s in self.std], np.float32).reshape(1, -1, 1, 1)
        else:
            x = x / np.float32(255.0)
            mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
            std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        return ((x - mean) / std).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PreprocessOverrides:
    """What the user said on the command line (--input-size, --crop-pct, --interpolation, --mean, --std)."""

    input_size: tuple[int, int] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))

    def apply(self, pre: Preprocess) -> Preprocess:
        if not self:
            return pre
        changes: dict = {}
        if self.input_size is not None:
            changes["height"], changes["width"] = self.input_size
        if self.crop_pct is not None:
            changes["crop_pct"] = self.crop_pct
        if self.interpolation is not None:
            changes["interpolation"] = self.interpolation
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None:
                changes[name] = tuple(values) * pre.channels if len(values) == 1 else tuple(values)
        if self.mean is not None or self.std is not None:
            # values above 1 are on 0..255 pixels, as in (x - 127) / 128
            byte = any(v > 1 for v in (*(self.mean or ()), *(self.std or ())))
            changes["scaling"] = "byte" if byte else "unit"
            for name in ("mean", "std"):
                values = changes.get(name, getattr(pre, name))
                if byte and getattr(self, name) is not None:
                    changes[name] = tuple(v / 255.0 for v in values)
        # the guess is gone once the user gave both the size and the normalization
        given_all = self.input_size is not None and self.mean is not None and self.std is not None
        return dataclasses.replace(pre, **changes, guessed=pre.guessed and not given_all)


@dataclasses.dataclass
class ImageSet:
    """uint8 images (N, H, W, C) with hard labels and/or soft labels over ``class_names``."""

    images: np.ndarray
    class_names: tuple[str, ...]
    labels: np.ndarray | None = None  # (N,) int64
    soft_labels: np.ndarray | None = None  # (N, num_classes) float32, rows sum to 1
    names: tuple[str, ...] | None = None  # where each image came from, when known

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, count: int | None) -> "ImageSet":
        if count is None or count >= len(self):
            return self
        pick = slice(0, count)
        return ImageSet(
            self.images[pick],
            self.class_names,
            None if self.labels is None else self.labels[pick],
            None if self.soft_labels is None else self.soft_labels[pick],
            None if self.names is None else self.names[pick],
        )

    @property
    def targets(self) -> np.ndarray | None:
        """Hard labels, or the argmax of the soft labels."""
        if self.labels is not None:
            return self.labels
        # noise and bn-inversion images carry all-zero soft labels: no class, so no accuracy to measure
        if self.soft_labels is not None and self.soft_labels.size and (self.soft_labels.sum(1) > 0).all():
            return self.soft_labels.argmax(1)
        return None

    @property
    def label_kind(self) -> str:
        """What the targets are: "hard", "argmax of soft labels", or "none" (only agreement can be measured)."""
        if self.labels is not None:
            return "hard"
        return "none" if self.targets is None else "argmax of soft labels"


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        magic, count = struct.unpack(">II", f.read(8))
        dims = magic & 0xFF
        shape = (count,) + struct.unpack(">" + "I" * (dims - 1), f.read(4 * (dims - 1)))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def load_fashion_mnist(split: str = "test") -> ImageSet:
    """Fashion-MNIST as an ImageSet. ``split``: "train", "test", "A" or "B" (the halves of train)."""
    if split not in ("train", "test", "A", "B"):
        raise EdgeqError(f"unknown Fashion-MNIST split '{split}'", "choose one of: train, test, A, B")
    file_split = "test" if split == "test" else "train"
    image_file, label_file = (FASHION_MNIST_DIR / name for name in _FILES[file_split])
    if not image_file.is_file() or not label_file.is_file():
        raise EdgeqError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}", FASHION_MNIST_INSTALL)
    try:
        images, labels = _read_idx(image_file), _read_idx(label_file).astype(np.int64)
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise EdgeqError(f"cannot read Fashion-MNIST from {FASHION_MNIST_DIR}: {exc}", FASHION_MNIST_INSTALL) from None
    if split in ("A", "B"):
        keep = split_indices(split, len(images))
        images, labels = images[keep], labels[keep]
    return ImageSet(images[..., None], FASHION_MNIST_CLASSES, labels=labels)


def split_indices(split: str, count: int = 60000) -> np.ndarray:
    """Indices into the 60k training images of half A or B: a fixed-seed permutation cut in two, each half sorted."""
    order = np.random.default_rng(SPLIT_SEED).permutation(count)
    return np.sort(order[: count // 2] if split == "A" else order[count // 2 :])


PHOTO_SIZE = 256
OPENCV_SAMPLES = Path("/usr/share/doc/opencv-doc/examples/data")
_SKIMAGE_PHOTOS = ("astronaut", "camera", "chelsea", "clock", "coffee", "coins", "hubble_deep_field", "moon", "rocket")


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """Center-crop to a square and resize to size x size, as uint8 RGB."""
    from PIL import Image

    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).astype(np.uint8) if image.max() <= 1.0 else image.astype(np.uint8)
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(np.ascontiguousarray(image[top : top + side, left : left + side]))
    return np.asarray(crop.resize((size, size), Image.BICUBIC))


def load_photos(size: int = PHOTO_SIZE) -> ImageSet:
    """Real photos shipped offline: scikit-image's data, scikit-learn's samples, Debian opencv-doc's samples.

    There are no labels: these photos measure agreement between a model and its quantized
    version, not accuracy. Center-cropped to squares of ``size`` pixels, in a fixed order.
    """
    photos, names = [], []
    try:
        import skimage.data

        for name in _SKIMAGE_PHOTOS:
            try:
                photos.append(_square(getattr(skimage.data, name)(), size))
                names.append(f"skimage:{name}")
            except Exception:  # noqa: BLE001 - an image that needs a download is skipped offline
                continue
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        for name, image in zip(("china", "flower"), load_sample_images().images):
            photos.append(_square(image, size))
            names.append(f"sklearn:{name}")
    except ImportError:
        pass
    if OPENCV_SAMPLES.is_dir():
        from PIL import Image

        for path in sorted(OPENCV_SAMPLES.glob("*.jpg")):
            if path.name.startswith(("left", "right")):  # chessboard calibration shots, not scenes
                continue
            photos.append(_square(np.asarray(Image.open(path).convert("RGB")), size))
            names.append(f"opencv:{path.name}")
    if not photos:
        raise EdgeqError(
            "no real photos found", "pip install scikit-image scikit-learn, and apt-get install opencv-doc"
        )
    return ImageSet(np.stack(photos), class_names=(), names=tuple(names))


def resolve_dataset(
    source: str,
    count: int | None = None,
    *,
    preprocess: Preprocess | None = None,
    per_class: int | None = None,
    seed: int = 0,
    classes: tuple[str, ...] | None = None,
) -> ImageSet:
    """A data source by name: ``fashion-mnist:test`` (or ``:A``, ``:B``, ``:train``; ``fmnist-test`` for short),
    ``photos`` (unlabelled real photos), a synth folder, or a folder of images (:func:`load_image_folder`, which
    needs ``preprocess`` and takes ``per_class``, ``seed`` and the model's ``classes``)."""
    source = DATA_ALIASES.get(source, source)
    if source.startswith("fashion-mnist"):
        split = source.partition(":")[2] or "test"
        return _labels_for(load_fashion_mnist(split).subset(count), classes, source)
    if source == "photos":
        return load_photos().subset(count)
    folder = Path(source)
    if folder.is_dir() and not (folder / MANIFEST_NAME).is_file():
        return load_image_folder(folder, preprocess, count=count, per_class=per_class, seed=seed, classes=classes)
    return _labels_for(load_synth_images(source).subset(count), classes, source)


def _labels_for(images: ImageSet, classes: tuple[str, ...] | None, source: str) -> ImageSet:
    """``images`` without labels when they were made for another class list than the model's: a label index means
    nothing for a model whose class at that index is another, and a top-1 against it would be a wrong figure."""
    if classes is None or images.targets is None or tuple(images.class_names) == tuple(classes):
        return images
    unnamed = tuple(classes) == tuple(f"class {i}" for i in range(len(classes)))
    if unnamed and len(classes) == len(images.class_names):
        return images  # a model without class names: the data's names stand for its numbers
    log.warning(
        "%s is labelled for other classes (%s) than the model's (%s): its labels are not used (no top-1, only "
        "agreement; as calibration, images of other classes); pass --classes with the data's class names if they "
        "are the same classes",
        source,
        ", ".join(images.class_names[:3]) + (", ..." if len(images.class_names) > 3 else ""),
        ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else ""),
    )
    return dataclasses.replace(images, labels=None, soft_labels=None)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
DECODE_BATCH = 256
FOLDER_HINT = "pass ROOT/<class>/<image> (labelled) or a folder of JPEG/PNG images (unlabelled)"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """The image files of a folder, before any is decoded: labels from class folders, or none (a flat folder)."""

    root: Path
    files: tuple[Path, ...]
    labels: tuple[int, ...] | None
    class_names: tuple[str, ...]


def list_image_folder(root: str | Path) -> FolderListing:
    """ImageFolder layout (``ROOT/<class>/<image>``, class index = sorted folder order, as torchvision), else a flat
    folder of images. Files are ordered class by class in turn (the first image of each class, then the second...),
    so that the first N of a listing are balanced over the classes."""
    root = Path(root)
    if not root.is_dir():
        raise EdgeqError(f"image folder not found: {root}", FOLDER_HINT)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_dirs:
        per_class = [_images_in(d) for d in class_dirs]
        if not any(per_class):
            raise EdgeqError(f"{root} holds no images in its {len(class_dirs)} class folders", FOLDER_HINT)
        empty = [d.name for d, files in zip(class_dirs, per_class) if not files]
        if empty:
            raise EdgeqError(
                f"class folder {root / empty[0]} holds no images ({len(empty)} of {len(class_dirs)} are empty)",
                "remove empty class folders, or add JPEG/PNG images to them",
            )
        order = [
            (per_class[label][i], label)
            for i in range(max(map(len, per_class)))
            for label in range(len(per_class))
            if i < len(per_class[label])
        ]
        return FolderListing(
            root, tuple(f for f, _ in order), tuple(label for _, label in order), tuple(d.name for d in class_dirs)
        )
    files = _images_in(root)
    if not files:
        raise EdgeqError(f"{root} holds no images (JPEG or PNG)", FOLDER_HINT)
    return FolderListing(root, tuple(files), None, ())


def select(listing: FolderListing, count: int | None, per_class: int | None, seed: int) -> FolderListing:
    """At most ``per_class`` files of each class drawn with ``seed`` (balanced few-shot), then the first ``count``."""
    files, labels = list(listing.files), None if listing.labels is None else list(listing.labels)
    if per_class is not None:
        rng = np.random.default_rng(seed)
        if labels is None:  # a flat folder is one class
            keep = sorted(rng.choice(len(files), min(per_class, len(files)), replace=False))
        else:
            keep = []
            for label in range(len(listing.class_names)):
                members = [i for i, lab in enumerate(labels) if lab == label]
                keep.extend(members[i] for i in rng.choice(len(members), min(per_class, len(members)), replace=False))
            keep.sort()
        files = [files[i] for i in keep]
        labels = None if labels is None else [labels[i] for i in keep]
    if count is not None:
        files, labels = files[:count], None if labels is None else labels[:count]
    return dataclasses.replace(listing, files=tuple(files), labels=None if labels is None else tuple(labels))


def load_image_folder(
    root: str | Path,
    preprocess: Preprocess | None,
    *,
    count: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    classes: tuple[str, ...] | None = None,
) -> ImageSet:
    """Decode the selected images of a folder, each resized and cropped to the model's size as it is read.

    Only the selected files are opened, in batches of DECODE_BATCH with a progress bar; memory holds
    images at the model's resolution only. ``classes``: the model's class names; a labelled folder
    with another number of classes is refused.
    """
    from PIL import Image, UnidentifiedImageError
    from tqdm.auto import tqdm

    if preprocess is None:
        raise EdgeqError(f"reading images from {root} needs the model's preprocessing", "pass the model")
    listing = list_image_folder(root)
    if listing.labels is not None and classes and len(classes) != len(listing.class_names):
        raise EdgeqError(
            f"{listing.root} has {len(listing.class_names)} class folders but the model has {len(classes)} outputs",
            "pass a folder with one subfolder per class of the model (sorted order = class index), "
            "or a flat folder of images to measure agreement only",
        )
    listing = select(listing, count, per_class, seed)
    mode = "L" if preprocess.channels == 1 else "RGB"
    images = np.empty((len(listing.files), preprocess.height, preprocess.width, preprocess.channels), np.uint8)
    with tqdm(total=len(listing.files), desc=f"reading {listing.root.name}", unit="img", leave=False) as bar:
        for start in range(0, len(listing.files), DECODE_BATCH):
            for i, path in enumerate(listing.files[start : start + DECODE_BATCH], start):
                try:
                    with Image.open(path) as image:
                        images[i] = preprocess.fit(image.convert(mode))
                except (UnidentifiedImageError, OSError, ValueError) as exc:
                    raise EdgeqError(
                        f"cannot read image {path}: {str(exc).splitlines()[0]}", "remove or replace the file"
                    ) from None
            bar.update(min(DECODE_BATCH, len(listing.files) - start))
    log.info("read %d images from %s (%s)", len(images), listing.root, preprocess.describe())
    return ImageSet(
        images,
        listing.class_names,
        labels=None if listing.labels is None else np.asarray(listing.labels, np.int64),
        names=tuple(str(p.relative_to(listing.root)) for p in listing.files),
    )


def dataset_digest(source: str) -> str:
    """What identifies a data source's content for fingerprints: built-in sets by name, synth folders by manifest,
    image folders by their listing (relative paths and sizes: hashing every file of a large folder would read it)."""
    import hashlib

    from .manifest import sha256_path

    source = DATA_ALIASES.get(source, source)
    if source.startswith("fashion-mnist") or source == "photos":
        return f"builtin:{source}"
    folder = Path(source)
    if folder.is_dir() and not (folder / MANIFEST_NAME).is_file():
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
            digest.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\n".encode())
        return f"listing:{digest.hexdigest()}"
    return sha256_path(source)


def load_synth_images(folder: str | Path) -> ImageSet:
    """The images and soft labels of a synth folder."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not folder.exists():
        raise EdgeqError(
            f"data folder not found: {folder}", "pass an output folder of 'edgeq synth', or fashion-mnist:test"
        )
    manifest = Manifest.load(folder, "synth")
    shards = [
        load_file(str(manifest.checked_output(folder, o["path"])))
        for o in manifest.outputs
        if o["path"].endswith(".safetensors")
    ]
    if not shards:
        raise EdgeqError(f"{folder} holds no image shards", "re-run 'edgeq synth'")
    return ImageSet(
        np.concatenate([s["images"] for s in shards]),
        tuple(manifest.params["classes"]),
        soft_labels=np.concatenate([s["soft_labels"] for s in shards]),
    )
