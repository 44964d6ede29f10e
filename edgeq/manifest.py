"""Stage folders and their manifests.

Every stage writes one folder holding its artifacts and a ``manifest.json`` that
records what went in (paths with sha256), the settings (spec, target, seed, stage
parameters), the tool versions, and what came out (files with sha256). A folder is
written under a temporary name and renamed when complete, so an interrupted stage
leaves nothing that looks finished. The manifest's ``fingerprint`` (a hash of the
inputs and settings) lets a later run reuse the folder instead of redoing the work.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import functools
import glob
import hashlib
import json
import logging
import os
import platform
import re
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

    def __post_init__(self):
        # A manifest read from disk is untrusted: wrong types would otherwise fail deep inside a stage.
        def entries(value) -> bool:
            return isinstance(value, list) and all(isinstance(e, dict) for e in value)

        problems = [
            name
            for name, ok in (
                ("stage", isinstance(self.stage, str)),
                ("inputs", entries(self.inputs) and all(isinstance(e.get("role"), str) for e in self.inputs)),
                ("params", isinstance(self.params, dict)),
                ("spec", self.spec is None or isinstance(self.spec, dict)),
                ("outputs", entries(self.outputs) and all(isinstance(e.get("path"), str) for e in self.outputs)),
                ("extra", isinstance(self.extra, dict)),
            )
            if not ok
        ]
        if problems:
            raise TypeError(f"field(s) {', '.join(problems)} of the wrong type")

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
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EdgeqError(f"{path} is not a valid edgeq manifest ({exc})", "re-run the stage that made it") from None
        if not isinstance(data, dict):
            raise EdgeqError(f"{path} is not a valid edgeq manifest (not an object)", "re-run the stage that made it")
        if data.get("schema", SCHEMA) != SCHEMA:
            raise EdgeqError(
                f"{path} has schema {data.get('schema')!r}, which this edgeq does not read (it reads {SCHEMA})",
                "use the edgeq that made the folder, or re-run the stage with this one",
            )
        # A later edgeq of the same schema may record more; what this one does not know it ignores.
        known = {field.name for field in dataclasses.fields(cls)}
        try:
            manifest = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise EdgeqError(f"{path} is not a valid edgeq manifest ({exc})", "re-run the stage that made it") from None
        if stage is not None and manifest.stage != stage:
            raise EdgeqError(
                f"{folder} is the output of '{manifest.stage}', not '{stage}'",
                f"pass an output folder of 'edgeq {stage}'",
            )
        return manifest

    def checked_output(self, folder: str | os.PathLike, name: str) -> Path:
        """``folder/name``, after checking it is the file this manifest recorded: a regular file (not a link) with
        the recorded sha256. A file edited, swapped or truncated since the stage wrote it is never used."""
        folder = Path(folder)
        path = folder / name
        recorded = next((o.get("sha256") for o in self.outputs if isinstance(o, dict) and o.get("path") == name), None)
        if recorded is None:
            raise EdgeqError(f"the manifest of {folder} records no {name}", f"re-run 'edgeq {self.stage}'")
        if path.is_symlink() or not path.is_file():
            raise EdgeqError(f"{path} is missing or not a regular file", f"re-run 'edgeq {self.stage}'")
        if sha256_file(path) != recorded:
            raise EdgeqError(
                f"{path} is not the file 'edgeq {self.stage}' wrote (its sha256 differs from the manifest's: edited, "
                "swapped or truncated)",
                f"re-run 'edgeq {self.stage}', or copy the folder again",
            )
        return path

    def write(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        _shareable(folder)
        self.outputs = [
            {"path": p.relative_to(folder).as_posix(), "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME
        ]
        (folder / MANIFEST_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _shareable(folder: Path) -> None:
    """Give every file in ``folder`` the permissions the user's umask gives new files (some writers, such as
    safetensors, create theirs 0600), so that a stage folder copied or shared is readable as a whole."""
    mask = _umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            executable = path.stat().st_mode & 0o111
            path.chmod((0o777 if executable else 0o666) & ~mask)


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
    try:
        for output in manifest.outputs:
            manifest.checked_output(folder, output["path"])
    except (EdgeqError, KeyError, TypeError):
        log.warning("%s does not hold what its manifest records: making it again", folder)
        return False
    return True


def _stage_of(folder: Path) -> str | None:
    """The edgeq stage that wrote ``folder``, from its manifest (or a sweep's report), else None."""
    try:
        return json.loads((folder / MANIFEST_NAME).read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        return "sweep" if json.loads((folder / "report.json").read_text()).get("schema") == "edgeq.sweep/1" else None
    except (OSError, ValueError, AttributeError):
        return None


def claim_output(final: str | os.PathLike, stage: str, *, inputs=(), force: bool = False) -> Path:
    """Check, before any work, that ``stage`` may write its output folder ``final``; returns it.

    A stage replaces its output folder when it finishes, so the folder must not hold what
    edgeq did not write: an existing non-empty folder is replaced only when its manifest
    says it is this stage's output, or with ``force``. Never an input of the command (or a
    folder that holds one), the working directory, or a path under a file. The folder is
    locked against other runs from here until it is published (:func:`release`); a stage
    function wrapped in :func:`releases_on_failure` lets it go when it fails.
    """
    final = Path(final)
    resolved = final.resolve()
    for source in inputs:
        if source is None or not Path(source).exists():
            continue
        held = Path(source).resolve()
        if held == resolved or resolved in held.parents:
            raise EdgeqError(
                f"output folder {final} {'is' if held == resolved else 'holds'} an input of this command ({source}); "
                "writing it would destroy that input",
                "choose another -o folder",
            )
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise EdgeqError(f"output folder {final} is the working directory (or holds it)", "choose a new -o folder")
    if resolved.exists() and not resolved.is_dir():
        raise EdgeqError(f"output folder {final} is a file", "choose another -o folder")
    for parent in resolved.parents:
        if parent.exists():
            if not parent.is_dir():
                raise EdgeqError(
                    f"output folder {final} cannot be made: {parent} is a file", "choose an -o folder outside of files"
                )
            if not os.access(parent, os.W_OK):
                raise EdgeqError(f"cannot write in {parent}", "choose an -o folder you can write to")
            break
    _lock(resolved, stage)
    if resolved.is_dir() and any(resolved.iterdir()) and not force:
        found = _stage_of(resolved)
        if found != stage:
            release(resolved)
            what = f"an edgeq {found} folder" if found else "not an edgeq folder"
            raise EdgeqError(
                f"{final} already exists and is {what}, not the output of 'edgeq {stage}': refusing to replace it",
                "choose another -o folder, or pass --force to replace it",
            )
    return final


# Output folders this process is writing: the open lock file of each (see _lock).
_held_locks: dict[Path, object] = {}


def _lock_path(resolved: Path) -> Path:
    return resolved.parent / f".{resolved.name}.lock"


def _lock(resolved: Path, stage: str) -> None:
    """Hold an exclusive lock on ``resolved`` until it is published, its stage fails, or this process ends.

    Two runs writing one folder would each replace the other's work, or mix two runs' files
    in one folder; the second stops at once and says which run holds the folder. The lock
    is an ``flock`` on ``.<name>.lock`` beside the folder, so the kernel releases it when
    its process dies: a killed run leaves no lock that blocks the next.
    """
    import fcntl

    if resolved in _held_locks:
        return
    resolved.parent.mkdir(parents=True, exist_ok=True)
    path = _lock_path(resolved)
    handle = open(path, "a+")  # noqa: SIM115 - held until release()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another edgeq run"
        handle.close()
        raise EdgeqError(
            f"{resolved} is being written by {holder}", "wait for that run to finish, or choose another -o folder"
        ) from None
    handle.seek(0)
    handle.truncate()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    handle.write(f"'edgeq {stage}' (pid {os.getpid()} on {platform.node()}, since {started})\n")
    handle.flush()
    _held_locks[resolved] = handle


@contextlib.contextmanager
def holding(folder: str | os.PathLike, what: str):
    """Hold ``folder`` against other runs for the duration (as :func:`claim_output` does until publication)."""
    resolved = Path(folder).resolve()
    if resolved in _held_locks:
        yield
        return
    _lock(resolved, what)
    try:
        yield
    finally:
        release(resolved)


def releases_on_failure(stage_function):
    """Wrap a stage function so that the output folders it locked are let go if it fails.

    Without it a failed stage would hold its folder (and leave ``.<name>.lock`` beside it)
    until its process ends: a notebook or a test that carries on after the error could not
    write there again.
    """

    @functools.wraps(stage_function)
    def run(*args, **kwargs):
        held_before = set(_held_locks)
        try:
            return stage_function(*args, **kwargs)
        except BaseException:
            for folder in set(_held_locks) - held_before:
                release(folder)
            raise

    return run


def _release_all() -> None:
    for held in list(_held_locks):
        release(held)


atexit.register(_release_all)  # what a run still holds when its process ends (no stage function to release it)


def release(final: str | os.PathLike) -> None:
    """Let other runs write ``final`` again (after it is published, or when the stage failed)."""
    resolved = Path(final).resolve()
    handle = _held_locks.pop(resolved, None)
    if handle is not None:
        _lock_path(resolved).unlink(missing_ok=True)
        handle.close()


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
        release(final)
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
    if final.resolve() in _held_locks:
        # While this run holds the folder's lock no other run writes beside it: what is left there
        # (.partial-* of a run that was killed, .old-* a crash kept) is debris of earlier runs.
        for leftover in final.parent.glob(f".{glob.escape(final.name)}.*"):
            if leftover.is_dir() and re.fullmatch(r"\.(partial|old)-[0-9a-f]{8}", leftover.name[len(final.name) + 1 :]):
                shutil.rmtree(leftover, ignore_errors=True)
    release(final)
    log.debug("wrote %s", final)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
