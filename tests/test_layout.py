"""The house rule: only the pipeline, the sweep and the CLI import stage modules (``edgeq.stages.*``).

What stages share (the quantized model, the QDQ ONNX helpers, stage folder names, the
synth folder reader) lives in library modules, so a stage can change without reaching
into the modules that read its output. Every library file is parsed, imports inside
functions and relative imports included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Folders that install into the edgeq namespace (setup.py's package_dir); cli/ is left out, as it may import stages.
LIBRARY = {"edgeq": "edgeq", "kernels": "edgeq.kernels", "targets": "edgeq.targets"}
STAGE_IMPORTERS = {"edgeq/pipeline.py", "edgeq/stages/sweep.py"}
STAGES = "edgeq.stages"


def _package(relative: str) -> str:
    """The dotted package a file's relative imports start from: its folder, mapped into the edgeq namespace."""
    folder, *rest = Path(relative).parent.parts
    return ".".join([LIBRARY[folder], *rest])


def _is_stage(name: str) -> bool:
    return name == STAGES or name.startswith(STAGES + ".")


def _called_name(call: ast.Call) -> str | None:
    return getattr(call.func, "attr", getattr(call.func, "id", None))


def stage_imports(source: str, relative: str) -> list[tuple[int, str]]:
    """(line, module) for every import of a stage module in ``source``, the file at ``relative``."""
    package = _package(relative).split(".")
    found = []
    for node in ast.walk(ast.parse(source, filename=relative)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if _is_stage(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 >= len(package):
                    continue  # beyond the top of the namespace: Python rejects it anyway
                base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # from edgeq.stages import quantize / from edgeq import stages: the name is the module;
                # from edgeq.stages.quantize import load: the module is the base
                module = base if _is_stage(base) and base != STAGES else f"{base}.{alias.name}"
                if _is_stage(module):
                    found.append((node.lineno, module))
        elif isinstance(node, ast.Call) and node.args and _called_name(node) == "import_module":
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and _is_stage(first.value):
                found.append((node.lineno, first.value))
    return list(dict.fromkeys(found))  # one entry per module and line


def _library_files() -> list[str]:
    return sorted(str(path.relative_to(ROOT)) for folder in LIBRARY for path in (ROOT / folder).rglob("*.py"))


def test_only_the_pipeline_sweep_and_cli_import_stages():
    files = _library_files()
    assert "edgeq/stages/export.py" in files and "kernels/native.py" in files  # the walk sees the tree
    offences = [
        f"{relative}:{line}: imports {module}"
        for relative in files
        if relative not in STAGE_IMPORTERS
        for line, module in stage_imports((ROOT / relative).read_text(), relative)
    ]
    hint = "move what they share into a library module (edgeq.quantized, edgeq.qdq, edgeq.folders, edgeq.data)"
    assert not offences, "library modules import stage modules:\n" + "\n".join(offences) + "\n" + hint


@pytest.mark.parametrize(
    "relative, source, expected",
    [
        ("edgeq/mixed.py", "from .stages import quantize\n", [(1, "edgeq.stages.quantize")]),
        ("edgeq/mixed.py", "from .stages.quantize import load\n", [(1, "edgeq.stages.quantize")]),
        ("edgeq/mixed.py", "from . import stages\n", [(1, "edgeq.stages")]),
        ("edgeq/stages/export.py", "from . import quantize as q\n", [(1, "edgeq.stages.quantize")]),
        ("edgeq/stages/verify.py", "from .compile import MODULE_FILE\n", [(1, "edgeq.stages.compile")]),
        ("edgeq/reconstruction/cache.py", "from ..stages import synth\n", [(1, "edgeq.stages.synth")]),
        ("edgeq/data.py", "def f():\n    from edgeq.stages.synth import run\n", [(2, "edgeq.stages.synth")]),
        ("kernels/plan.py", "import edgeq.stages.compile as c\n", [(1, "edgeq.stages.compile")]),
        (
            "edgeq/reports.py",
            "import importlib\nimportlib.import_module('edgeq.stages.verify')\n",
            [(2, "edgeq.stages.verify")],
        ),
        ("edgeq/stages/export.py", "from .. import quant, quantized\nfrom ..folders import MODEL_FILE\n", []),
        ("edgeq/stages/quantize.py", "from ..quantized import QuantizedLayer\n", []),
        ("kernels/plan.py", "from . import native\nfrom edgeq.kernels.packing import pack\n", []),
        ("edgeq/data.py", "from edgeq import stagesque\n", []),
    ],
)
def test_stage_imports_finds_every_form(relative, source, expected):
    assert stage_imports(source, relative) == expected
