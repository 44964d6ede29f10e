"""Sweeps: one model through the pipeline at several bit widths and targets, into one report.

Each configuration is an ordinary pipeline run (``edgeq compile``'s stages, in the same
run folder), so stages a configuration shares with an earlier run (the calibration
images; the quantized model for a second target) are reused, and a repeated sweep only
rebuilds what changed. The report (``edgeq.sweep/1``) gathers the verify reports with
the per-layer quantization error of each quantized model; see :mod:`edgeq.reports`.

With ``auto_mixed`` agreement targets, each target also gets a spec chosen by
:func:`edgeq.mixed.search_to_target` (layers raised up ``ladder`` by agreement bought per unit
of the layer's cost on that target) on the sweep's own calibration images, split into images
that calibrate the search and held-out ones that check it. That spec then runs through the
pipeline like the uniform ones, and its entry records what the search chose and reached.
"""

from __future__ import annotations

import dataclasses
import json
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
DEFAULT_LADDER = ("w2a4", "w4a4", "w8a8")
LAYER_ERROR_IMAGES = 64
# the search's held-out share of the calibration images, at most this many (the rest calibrate the search)
AUTO_HELD_OUT = 128


@releases_on_failure
def run(
    model: str | None,
    out: str | Path,
    *,
    specs: Sequence[QuantSpec] | None = None,
    targets: Sequence[Target] | None = None,
    options: pipeline.RunOptions | None = None,
    layer_error_images: int = LAYER_ERROR_IMAGES,
    auto_mixed: Sequence[float] = (),
    ladder: Sequence[QuantSpec] | None = None,
    force: bool = False,
) -> dict:
    """Run every (spec, target) configuration and write the report folder ``out``; returns the report.

    ``specs`` default to :data:`DEFAULT_BITS`, ``targets`` to the host's; a configuration named twice runs once.
    For each agreement in ``auto_mixed`` (shares of held-out images, 0-1) and each target, a mixed spec is searched
    up ``ladder`` (default :data:`DEFAULT_LADDER`) and run too; its spec file is written beside the report.
    """
    options = options or pipeline.RunOptions()
    claim_output(out, "sweep", inputs=[options.run_dir, model], force=force)
    specs = list(dict.fromkeys(specs if specs is not None else [QuantSpec.parse(b) for b in DEFAULT_BITS]))
    targets = list({t.name: t for t in (targets if targets is not None else [host_target()])}.values())
    if not specs or not targets:
        raise EdgeqError(
            "a sweep needs at least one bit width and one target", "for example --bits w4a4,w2a4 --targets x86"
        )
    auto_mixed = list(dict.fromkeys(float(level) for level in auto_mixed))
    if any(not 0 < level <= 1 for level in auto_mixed):
        raise EdgeqError(
            f"agreement targets must lie in (0, 1], not {auto_mixed}", "for example --auto-mixed 0.98,0.95"
        )
    ladder = list(ladder if ladder is not None else [QuantSpec.parse(b) for b in DEFAULT_LADDER])
    if auto_mixed and len(ladder) < 2:
        raise EdgeqError("the ladder of a mixed search needs at least two bit widths", "for example w2a4,w4a4,w8a8")
    if auto_mixed and options.calib is None and options.num_images < 4:
        raise EdgeqError(
            f"{options.num_images} calibration images cannot be split between a mixed search and its check",
            "raise --num-images (64 or more)",
        )
    loaded = load_model(
        model, allow_pickle=options.allow_pickle, classes_file=options.classes_file, preprocess=options.preprocess
    )
    entries, layer_errors, spec_files = [], {}, {}

    def run_configuration(spec: QuantSpec, target: Target, extra: dict | None = None) -> dict:
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
                **(extra or {}),
            }
        )
        return summary

    calibration_dir = None
    for spec in specs:
        for target in targets:
            calibration_dir = run_configuration(spec, target)["stage_dirs"]["calibration"]
    # one search per target, to the highest agreement: a lower target's search is a prefix of it
    searches = {}
    for level in auto_mixed:
        for target in targets:
            if target.name not in searches:
                searches[target.name] = _search_mixed(loaded, calibration_dir, ladder, max(auto_mixed), target, options)
            search = searches[target.name].stopped_at(level)
            name = f"auto-mixed-{target.name}-{_percent_name(level)}.json"
            spec_files[name] = search.spec.to_dict() | {"allocation": search.to_dict()}
            run_configuration(search.spec, target, {"auto_mixed": _auto_record(search, name)})
    title = f"{entries[0]['model']}: {', '.join(map(str, specs))} on {', '.join(t.name for t in targets)}"
    if auto_mixed:
        title += f", and mixed to {', '.join(f'{level:.0%}' for level in auto_mixed)} agreement"
    with staged_folder(out) as tmp:
        for name, record in spec_files.items():
            (tmp / name).write_text(json.dumps(record, indent=2) + "\n")
        report = reports.write(entries, tmp, title=title)
    return report


def _percent_name(level: float) -> str:
    return f"{100 * level:g}".replace(".", "_")


def _search_mixed(loaded, calibration_dir: str, ladder: list[QuantSpec], level: float, target: Target, options):
    """The mixed spec that reaches ``level`` agreement on held-out calibration images, priced for ``target``."""
    from ..layer_costs import costs_for_target
    from ..mixed import search_to_target

    images = resolve_dataset(calibration_dir, options.num_images, preprocess=loaded.preprocess, seed=options.seed)
    inputs = loaded.preprocess(images.images)
    held_out = min(AUTO_HELD_OUT, len(inputs) // 2)
    if held_out < 2:
        raise EdgeqError(
            f"{calibration_dir} has {len(inputs)} images: too few to split between a mixed search and its check",
            "raise --num-images (64 or more)",
        )
    log.info(
        "sweep: searching a mixed spec to %.1f%% agreement for %s (%d images calibrate, %d check)",
        100 * level,
        target.name,
        len(inputs) - held_out,
        held_out,
    )
    return search_to_target(
        loaded.module,
        inputs[:-held_out],
        inputs[-held_out:],
        ladder,
        costs_for_target(target),
        min_agreement=level,
        seed=options.seed,
        bias_correction=options.bias_correction,
    )


def _auto_record(search, spec_file: str) -> dict:
    return {
        "min_agreement": search.target,
        "reached": search.reached,
        "held_out_agreement": search.final_metric,
        "held_out_images": search.held_out_images,
        "cost": search.cost,
        "unit": search.unit,
        "cost_model": search.cost_model,
        "uniform_costs": search.uniform_costs,
        "uniform_agreement": search.uniform_metrics,
        "raised": [promotion.layer for promotion in search.promotions],
        "spec_file": spec_file,
    }
