"""Where the real data and pretrained weights live that edgeq never ships.

Benchmark weights (``models/``) and image sets (``datasets/``) are large and carry their own
licences, so they stay outside the package, in a folder laid out like this::

    ASSETS/models/cifar10-resnet20.safetensors
    ASSETS/datasets/cifar10/test/<class>/<image>

``EDGEQ_ASSETS`` names that folder. Without it, ``../shared`` beside a source checkout is used
when it exists (the checkout is the folder holding ``edgeq/`` and ``setup.py``). An installed
wheel has no checkout, so there ``EDGEQ_ASSETS`` must be set; the current directory is never
searched, so a command means the same thing wherever it is run.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import EdgeqError

ENV = "EDGEQ_ASSETS"


def checkout_default() -> Path | None:
    """``../shared`` beside the source checkout this package runs from, or None outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "setup.py").is_file():
        return None
    return (root.parent / "shared").resolve()


def assets_dir() -> Path | None:
    """The assets folder: ``$EDGEQ_ASSETS`` when set, else the checkout's ``../shared`` when it exists."""
    value = os.environ.get(ENV)
    if value:
        return Path(value).expanduser()
    default = checkout_default()
    return default if default is not None and default.is_dir() else None


def find(relative: str) -> Path | None:
    """``ASSETS/relative`` if that exists, else None."""
    root = assets_dir()
    if root is None:
        return None
    path = root / relative
    return path if path.exists() else None


def require(relative: str, what: str) -> Path:
    """``ASSETS/relative``, or an error saying where it was looked for and what to set."""
    path = find(relative)
    if path is not None:
        return path
    root = assets_dir()
    where = f"{root / relative}" if root is not None else f"no ${ENV} set and no ../shared beside the checkout"
    raise EdgeqError(
        f"{what} not found ({where})",
        f"set {ENV} to a folder holding {relative}",
    )
