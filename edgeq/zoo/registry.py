"""The zoo's provenance records (edgeq/zoo/zoo.json): how each entry was made and what it measured."""

from __future__ import annotations

import json
from importlib import resources

from ..manifest import sha256_path

REGISTRY_FILE = "zoo.json"


def _path():
    return resources.files("edgeq.zoo").joinpath(REGISTRY_FILE)


def load() -> dict:
    path = _path()
    return json.loads(path.read_text()) if path.is_file() else {}


def save(records: dict) -> None:
    _path().write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")


def record_training(name: str, filename: str, test_top1: float, *, script: str, seed: int, data: str) -> None:
    records = load()
    records[name] = {
        "file": filename,
        "sha256": sha256_path(resources.files("edgeq.zoo").joinpath(filename)),
        "script": script,
        "seed": seed,
        "data": data,
        "metrics": {"fashion-mnist:test top1": round(float(test_top1), 4)},
    }
    save(records)
