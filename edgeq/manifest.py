"""Stage folders and their manifests.

Every stage writes one folder holding its artifacts and a ``manifest.json`` that
records what went in (paths with sha256), the settings (spec, target, seed, stage
parameters), the tool versions, and what came out (files with sha256). A folder is
written under a temporary name and renamed when complete, so an interrupted stage
leaves nothing that looks finished. The manifest's ``fingerprint`` (a hash of the
inputs and settings) lets a later run reuse the folder instead of redoing the work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import platform
import shutil
import uuid
from pathlib import Path

from .errors import EdgeqError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SCHEMA = "edgeq.manifest/1"
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """A file's sha256, or for a folder a hash over its files' relative paths and hashes.

    For a stage folder only the manifest is hashed: it already lists every output's hash.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if (path / MANIFEST_NAME).is_file():
        return sha256_file(path / MANIFEST_NAME)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    """Versions of the packages that decide a stage's numbers (only those already imported or cheap)."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("edgeq", "torch", "numpy", "onnx", "onnxruntime", "apache-tvm", "diffusers", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


@dataclasses.dataclass
class Manifest:
    stage: str
    inputs: list[dict]  # [{"role": ..., "path": ..., "sha256": ...}]
    params: dict  # stage-specific settings that change the result
    spec: dict | None = None
    target: str | None = None
    seed: int | None = None
    outputs: list[dict] = dataclasses.field(default_factory=list)  # [{"path": relative, "sha256": ...}]
    extra: dict = dataclasses.field(default_factory=dict)  # results and notes that do not change reuse
    versions: dict = dataclasses.field(default_factory=tool_versions)
    created: str = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )
    schema: str = SCHEMA

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.stage, self.inputs, self.params, self.spec, self.target, self.seed)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["fingerprint"] = self.fingerprint
        return data

    def input(self, role: str) -> dict:
        for item in self.inputs:
            if item["role"] == role:
                return item
        raise KeyError(role)

    @classmethod
    def load(cls, folder: str | os.PathLike, stage: str | None = None) -> "Manifest":
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            want = f"an output folder of 'edgeq {stage}'" if stage else "an edgeq stage folder"
            raise EdgeqError(f"{folder} has no {MANIFEST_NAME}", f"expected {want}")
        try:
            data = json.loads(path.read_text())
            data.pop("fingerprint", None)
            manifest = cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise EdgeqError(f"{path} is not a valid edgeq manifest ({exc})", "re-run the stage that made it") from None
        if stage is not None and manifest.stage != stage:
            raise EdgeqError(
                f"{folder} is the output of '{manifest.stage}', not '{stage}'",
                f"pass an output folder of 'edgeq {stage}'",
            )
        return manifest

    def write(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        self.outputs = [
            {"path": p.relative_to(folder).as_posix(), "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME
        ]
        (folder / MANIFEST_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def fingerprint(stage, inputs, params, spec, target, seed) -> str:
    key = {
        "stage": stage,
        "inputs": sorted((i["role"], i["sha256"]) for i in inputs),
        "params": params,
        "spec": spec,
        "target": target,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def input_entry(role: str, path: str | os.PathLike, sha256: str | None = None) -> dict:
    """An input record; paths on disk are made absolute so later stages find them from anywhere."""
    location = str(Path(path).resolve()) if Path(path).exists() else str(path)
    return {"role": role, "path": location, "sha256": sha256 or sha256_path(path)}


def reusable(folder: str | os.PathLike, expected_fingerprint: str) -> bool:
    """True when ``folder`` holds a complete stage output made from the same inputs and settings."""
    try:
        manifest = Manifest.load(folder)
    except EdgeqError:
        return False
    if manifest.fingerprint != expected_fingerprint:
        return False
    folder = Path(folder)
    return all((folder / o["path"]).is_file() for o in manifest.outputs)


@contextlib.contextmanager
def staged_folder(final: str | os.PathLike, overwrite: bool = True):
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise EdgeqError(f"{final} already exists", "choose another output folder or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, final)


def publish_folder(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the complete folder ``tmp`` to ``final``, replacing what was there, by renames only."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    log.debug("wrote %s", final)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
