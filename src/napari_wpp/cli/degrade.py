"""``napari-wpp degrade``: blur, downsample and add noise to an HR image or stack.

Apply a forward operator (and noise) to a 2D image or, slice by slice, to a 3D stack. The output
TIFF has the input's dtype; the pixel size is multiplied by the scale.
"""

from __future__ import annotations

import argparse

from napari_wpp.cli import _common
from napari_wpp.core.config import DegradeSpec, spec_from


def add_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """The options of ``napari-wpp degrade``."""
    p.add_argument("input", metavar="INPUT", help="HR image or stack (TIFF, PNG, ...)")
    _common.add_output_flag(p)
    _common.add_operator_flags(p)
    _common.add_spec_option(p, DegradeSpec, "noise", type=_common.noise_type, metavar="SIGMA")
    _common.add_spec_option(p, DegradeSpec, "seed", type=_common.seed_type)
    _common.add_json_flag(p)


def spec_from_args(args: argparse.Namespace) -> DegradeSpec:
    """The :class:`DegradeSpec` of the parsed options."""
    return spec_from(args, DegradeSpec)


def run(args: argparse.Namespace) -> int:
    from napari_wpp.jobs.degrade import DegradeResult, degrade_job
    from napari_wpp.jobs.notices import JobProgress

    out = _common.check_output(args.out)
    operator = _common.operator_from_args(args)
    data = _common.read_input(args.input, "input image")
    spec = spec_from_args(args)
    bar = _common.ProgressBar("degrade") if data.array.ndim == 3 and len(data.array) > 1 else None
    result = None
    for event in degrade_job(spec, operator, data, out=out):
        if isinstance(event, JobProgress) and bar is not None:
            bar.update(event.done / event.total, f"slice {event.done}/{event.total}")
        elif isinstance(event, DegradeResult):
            result = event
    if bar is not None:
        bar.close()
    assert result is not None
    low, q = result.image, result.scale
    _common.emit(
        args,
        {"out": str(out), "shape": list(low.shape), "scale": q, "noise": spec.noise},
        f"wrote {out} ({_common.shape_text(low.shape)}, {low.dtype}, ×{q} down"
        + (f", noise {spec.noise:g})" if spec.noise else ")"),
    )
    return _common.EXIT_OK
