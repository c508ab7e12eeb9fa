"""``napari-wpp estimate-operator``: kernel and bias from a registered HR/LR pair."""

from __future__ import annotations

import argparse
from typing import Any

from napari_wpp.cli._common import (
    EXIT_OK,
    add_json_flag,
    add_output_flag,
    add_spec_option,
    check_output,
    emit,
    kernel_type,
    read_input,
    scale_type,
)
from napari_wpp.core.config import EstimateSpec, help_of, spec_from


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``estimate-operator`` subcommand to ``sub``."""
    p = sub.add_parser(
        "estimate-operator",
        parents=[common],
        help="estimate blur kernel and bias from a registered HR/LR pair",
        description="Estimate y ≈ S(k * x + b) from a registered pair: a K×K kernel k, a "
        "bias b and Fourier downsampling S by the scale. The LR image is either HR/scale in "
        "size or registered and resampled onto the HR grid (same size as HR).",
    )
    p.add_argument("--hr", required=True, metavar="HR", help="HR image (2D)")
    p.add_argument("--lr", required=True, metavar="LR", help="registered LR image (2D)")
    p.add_argument(
        "--scale",
        required=True,
        type=scale_type,
        metavar="Q",
        help=help_of(EstimateSpec, "scale"),
    )
    add_spec_option(p, EstimateSpec, "kernel_size", type=kernel_type, metavar="K")
    add_output_flag(p, "OP.json", "operator JSON to write")
    add_json_flag(p)
    p.set_defaults(handler=_cmd_estimate_operator)


def spec_from_args(args: argparse.Namespace) -> EstimateSpec:
    """The :class:`EstimateSpec` of the parsed options."""
    return spec_from(args, EstimateSpec)


def _cmd_estimate_operator(args: argparse.Namespace) -> int:
    from napari_wpp.jobs.estimate import OperatorEstimated, estimate_job

    out = check_output(args.out, "operator file", suffixes=(".json",))
    hr_data = read_input(args.hr, "HR image", ndims=(2,))
    lr_data = read_input(args.lr, "LR image", ndims=(2,))
    spec = spec_from_args(args)
    source = {"hr": args.hr, "lr": args.lr}
    inputs = [("HR image", args.hr), ("LR image", args.lr)]
    events = list(
        estimate_job(spec, hr_data.array, lr_data.array, out=out, source=source, inputs=inputs)
    )
    results = next(e.summary for e in events if isinstance(e, OperatorEstimated))
    emit(
        args,
        {**results, "scale": spec.scale, "kernel_size": spec.kernel_size, "out": str(out)},
        f"kernel sum    {results['kernel_sum']:.4f}\n"
        f"kernel peak   {results['kernel_peak']:.4f} at {tuple(results['kernel_peak_index'])}\n"
        f"bias          {results['bias']:.5f}\n"
        f"residual rms  {results['residual_rms']:.4f}\n"
        f"wrote {out}",
    )
    return EXIT_OK
