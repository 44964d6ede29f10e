"""Sweeps: one model through the pipeline at several bit widths and targets, into one report.

Each configuration is an ordinary pipeline run (``edgeq compile``'s stages, in the same
run folder), so stages a configuration shares with an earlier run (the calibration
images; the quantized model for a second target) are reused, and a repeated sweep only
rebuilds what changed. The report (``edgeq.sweep/1``) gathers the verify reports with
the per-layer quantization error of each quantized model; see :mod:`edgeq.reports`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from .. import pipeline, reports
from ..data import resolve_dataset
from ..errors import EdgeqError
from ..folders import MODULE_FILE
from ..manifest import claim_output, releases_on_failure, staged_folder
from ..models import load_model
from ..spec import QuantSpec
from ..targets import Target, host_target
from . import verify as verify_stage

log = logging.getLogger(__name__)

DEFAULT_BITS = ("w8a8", "w4a8", "w4a4", "w3a3", "w2a4")
LAYER_ERROR_IMAGES = 64


@releases_on_failure
def run(
    model: str | None,
    out: str | Path,
    *,
    specs: Sequence[QuantSpec] | None = None,
    targets: Sequence[Target] | None = None,
    options: pipeline.RunOptions | None = None,
    layer_error_images: int = LAYER_ERROR_IMAGES,
    force: bool = False,
) -> dict:
    """Run every (spec, target) configuration and write the report folder ``out``; returns the report.

    ``specs`` default to :data:`DEFAULT_BITS`, ``targets`` to the host's; a configuration named twice runs once.
    """
    options = options or pipeline.RunOptions()
    claim_output(out, "sweep", inputs=[options.run_dir, model], force=force)
    specs = list(dict.fromkeys(specs if specs is not None else [QuantSpec.parse(b) for b in DEFAULT_BITS]))
    targets = list({t.name: t for t in (targets if targets is not None else [host_target()])}.values())
    if not specs or not targets:
        raise EdgeqError(
            "a sweep needs at least one bit width and one target", "for example --bits w4a4,w2a4 --targets x86"
        )
    loaded = load_model(model, allow_pickle=options.allow_pickle, classes_file=options.classes_file)
    entries, layer_errors = [], {}
    for spec in specs:
        for target in targets:
            log.info("sweep: %s for %s", spec, target.name)
            summary = pipeline.run(model, dataclasses.replace(options, spec=spec, target=target))
            dirs = summary["stage_dirs"]
            report = verify_stage.load_report(dirs["verify"])
            if dirs["quantize"] not in layer_errors:
                images = resolve_dataset(report["data"], layer_error_images, preprocess=loaded.preprocess)
                layer_errors[dirs["quantize"]] = reports.layer_sqnr(dirs["quantize"], loaded.preprocess(images.images))
            entries.append(
                {
                    **report,
                    "method": summary["method"],
                    "module_bytes": (Path(dirs["compile"]) / MODULE_FILE).stat().st_size,
                    "layer_sqnr_db": layer_errors[dirs["quantize"]],
                    "stages": summary["stages"],
                }
            )
    title = f"{entries[0]['model']}: {', '.join(map(str, specs))} on {', '.join(t.name for t in targets)}"
    with staged_folder(out) as tmp:
        report = reports.write(entries, tmp, title=title)
    return report
