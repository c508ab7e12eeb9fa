"""``napari-wpp degrade``: blur, downsample and add noise to an HR image or stack.

Apply a forward operator (and noise) to a 2D image or, slice by slice, to a 3D stack. The output
TIFF has the input's dtype; the pixel size is multiplied by the scale.
"""

from __future__ import annotations

import argparse

from napari_wpp.cli._common import (
    EXIT_OK,
    ProgressBar,
    add_json_flag,
    add_operator_flags,
    add_output_flag,
    add_spec_option,
    check_output,
    emit,
    noise_type,
    operator_from_args,
    read_input,
    seed_type,
    shape_text,
)
from napari_wpp.core.config import DegradeSpec, spec_from

NAME = "degrade"


def add_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """The options of ``napari-wpp degrade``."""
    p.add_argument("input", metavar="INPUT", help="HR image or stack (TIFF, PNG, ...)")
    add_output_flag(p)
    add_operator_flags(p)
    add_spec_option(p, DegradeSpec, "noise", type=noise_type, metavar="SIGMA")
    add_spec_option(p, DegradeSpec, "seed", type=seed_type)
    add_json_flag(p)


def spec_from_args(args: argparse.Namespace) -> DegradeSpec:
    """The :class:`DegradeSpec` of the parsed options."""
    return spec_from(args, DegradeSpec)


def run(args: argparse.Namespace) -> int:
    from napari_wpp.jobs.degrade import DegradeResult, SliceDegraded, degrade_job

    out = check_output(args.out)
    operator = operator_from_args(args)
    data = read_input(args.input, "input image")
    spec = spec_from_args(args)
    bar = ProgressBar("degrade") if data.array.ndim == 3 and len(data.array) > 1 else None
    result = None
    for event in degrade_job(spec, operator, data, out=out):
        if isinstance(event, SliceDegraded) and bar is not None:
            bar.update(event.done / event.total, f"slice {event.done}/{event.total}")
        elif isinstance(event, DegradeResult):
            result = event
    if bar is not None:
        bar.close()
    assert result is not None
    low, q = result.image, result.scale
    emit(
        args,
        {"out": str(out), "shape": list(low.shape), "scale": q, "noise": spec.noise},
        f"wrote {out} ({shape_text(low.shape)}, {low.dtype}, ×{q} down"
        + (f", noise {spec.noise:g})" if spec.noise else ")"),
    )
    return EXIT_OK
