"""``napari-wpp suitability``: map how well an HR reference explains LR data (no ground truth
needed).

Degrade the reference with the forward operator at several sampling offsets and score every LR
patch of the data by its squared distance to the nearest degraded reference patch, divided by
p²σ² (σ: the data's noise std). About 1: explained up to the noise. The summary is the median
score: ≤ 4 suits, ≤ 8 partly, above: does not suit.
"""

from __future__ import annotations

import argparse
from typing import Any

from napari_wpp.cli import _common
from napari_wpp.core.config import SuitabilitySpec, spec_from

noise_std_type = _common.number_type(float, 0.0, False, "the data's noise std on the [0, 1] scale")
_count_type = _common.number_type(int, 1, True, "a positive integer, e.g. 2")


def add_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """The options of ``napari-wpp suitability``."""
    p.add_argument("--lr", required=True, metavar="LR", help="LR data (2D image or 3D stack)")
    p.add_argument("--reference", required=True, metavar="REF", help="HR reference (2D or 3D)")
    _common.add_operator_flags(p)
    _common.add_spec_option(p, SuitabilitySpec, "noise_std", type=noise_std_type, metavar="SIGMA")
    for name in ("patch_size", "phases", "reference_patches"):
        _common.add_spec_option(p, SuitabilitySpec, name, type=_count_type, metavar="N")
    _common.add_spec_option(p, SuitabilitySpec, "seed", type=_common.seed_type)
    p.add_argument(
        "--out", metavar="MAP.tif", help="score map to write (float32, LR grid, shaped like LR)"
    )
    _common.add_json_flag(p)


def run(args: argparse.Namespace) -> int:
    from napari_wpp.jobs.notices import JobProgress
    from napari_wpp.jobs.suitability import SuitabilityMapped, suitability_job

    out = None if args.out is None else _common.check_output(args.out, "score map")
    operator = _common.operator_from_args(args)
    lr = _common.read_input(args.lr, "LR data")
    reference = _common.read_input(args.reference, "reference")
    spec = spec_from(args, SuitabilitySpec)
    inputs = [("LR data", args.lr), ("reference", args.reference)]
    bar = _common.ProgressBar("suitability") if lr.array.ndim == 3 and len(lr.array) > 1 else None
    summary: dict[str, Any] = {}
    for event in suitability_job(spec, operator, lr.array, reference.array, out, inputs):
        if isinstance(event, JobProgress) and bar is not None:
            bar.update(event.done / event.total, f"slice {event.done}/{event.total}")
        elif isinstance(event, SuitabilityMapped):
            summary = event.summary
    if bar is not None:
        bar.close()
    text = (
        f"median score  {summary['median_score']:.2f} ({summary['verdict']}; ≤ 4 suits, "
        "≤ 8 partly)\n"
        f"unexplained   {100 * summary['unexplained']:.1f} % of LR pixels score > 8\n"
        f"(score = nearest-patch distance² / (p² σ²), p = {spec.patch_size}, "
        f"σ = {spec.noise_std:g}; {summary['reference_patches']} reference patches)"
    )
    if out is not None:
        text += f"\nwrote {out}"
    _common.emit(args, {**summary, "out": None if out is None else str(out)}, text)
    return _common.EXIT_OK
