"""Images in and out: the Fashion-MNIST files, synth folders, preprocessing to a model's input, and image sets.

Images travel between stages as uint8 arrays (N, H, W, C), the way a generator or a
camera makes them; each model's :class:`Preprocess` turns them into its float input.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from pathlib import Path

import numpy as np

from .errors import EdgeqError
from .manifest import Manifest

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


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How a model wants its input: channels, size, and per-channel normalization."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

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
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocess":
        return cls(
            int(data["channels"]),
            int(data["height"]),
            int(data["width"]),
            tuple(map(float, data["mean"])),
            tuple(map(float, data["std"])),
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, H, W[, C]) -> float32 model input (N, C, height, width)."""
        import torch
        import torch.nn.functional as F

        x = np.asarray(images)
        if x.ndim == 3:
            x = x[..., None]
        x = torch.from_numpy(np.array(x, copy=True)).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[1] != self.channels:
            if self.channels == 1:  # ITU-R BT.601 luma, as PIL's convert("L")
                x = (x[:, :3] * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
            elif x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1)
            else:
                raise EdgeqError(
                    f"cannot convert {x.shape[1]}-channel images to {self.channels} channels",
                    "provide RGB or grayscale images",
                )
        if x.shape[2:] != (self.height, self.width):
            x = F.interpolate(x, size=(self.height, self.width), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous().numpy()


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
        if self.soft_labels is not None:
            return self.soft_labels.argmax(1)
        return None


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


def resolve_dataset(source: str, count: int | None = None) -> ImageSet:
    """A data source by name: ``fashion-mnist:test`` (or ``:A``, ``:B``, ``:train``; ``fmnist-test`` for short),
    ``photos`` (unlabelled real photos), or a synth folder."""
    source = DATA_ALIASES.get(source, source)
    if source.startswith("fashion-mnist"):
        split = source.partition(":")[2] or "test"
        return load_fashion_mnist(split).subset(count)
    if source == "photos":
        return load_photos().subset(count)
    return load_synth_images(source).subset(count)


def load_synth_images(folder: str | Path) -> ImageSet:
    """The images and soft labels of a synth folder."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not folder.exists():
        raise EdgeqError(
            f"data folder not found: {folder}", "pass an output folder of 'edgeq synth', or fashion-mnist:test"
        )
    manifest = Manifest.load(folder, "synth")
    shards = [load_file(str(folder / o["path"])) for o in manifest.outputs if o["path"].endswith(".safetensors")]
    if not shards:
        raise EdgeqError(f"{folder} holds no image shards", "re-run 'edgeq synth'")
    return ImageSet(
        np.concatenate([s["images"] for s in shards]),
        tuple(manifest.params["classes"]),
        soft_labels=np.concatenate([s["soft_labels"] for s in shards]),
    )
