"""``napari-wpp estimate-operator``: estimate blur kernel and bias from a registered HR/LR pair (or
the blur σ from an unregistered HR reference).

Estimate y ≈ S(k * x + b) from a registered pair: a K×K kernel k, a bias b and Fourier
downsampling S by the scale. The LR image is either HR/scale in size or registered and resampled
onto the HR grid (same size as HR). Without --hr, give --reference: the blur σ of a Gaussian
blur + subsampling operator is searched under which the degraded reference's LR patches best
match the LR data's.
"""

from __future__ import annotations

import argparse

from napari_wpp.cli import _common
from napari_wpp.core.config import BlurCheckSpec, EstimateSpec, help_of, spec_from
from napari_wpp.core.errors import InputError


def add_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """The options of ``napari-wpp estimate-operator``."""
    p.add_argument("--hr", metavar="HR", help="HR image (2D) registered with LR")
    p.add_argument(
        "--reference",
        metavar="REF",
        help="without --hr: an HR reference of the same material (2D or 3D), not registered",
    )
    p.add_argument("--lr", required=True, metavar="LR", help="LR image (2D; 3D without --hr)")
    p.add_argument(
        "--scale",
        required=True,
        type=_common.scale_type,
        metavar="Q",
        help=help_of(EstimateSpec, "scale"),
    )
    _common.add_spec_option(p, EstimateSpec, "kernel_size", type=_common.kernel_type, metavar="K")
    p.add_argument("--out", metavar="OP.json", help="operator JSON to write (with --hr)")
    _common.add_json_flag(p)


def spec_from_args(args: argparse.Namespace) -> EstimateSpec:
    """The :class:`EstimateSpec` of the parsed options."""
    return spec_from(args, EstimateSpec)


def run(args: argparse.Namespace) -> int:
    from napari_wpp.jobs.estimate import OperatorEstimated, estimate_job

    if args.hr is None:
        return _cmd_blur_check(args)
    if args.reference is not None or args.out is None:
        raise InputError(
            "with --hr give --out OP.json and no --reference (--reference is for the σ search "
            "without a registered pair)"
        )
    out = _common.check_output(args.out, "operator file", suffixes=(".json",))
    hr_data = _common.read_input(args.hr, "HR image", ndims=(2,))
    lr_data = _common.read_input(args.lr, "LR image", ndims=(2,))
    spec = spec_from_args(args)
    source = {"hr": args.hr, "lr": args.lr}
    inputs = [("HR image", args.hr), ("LR image", args.lr)]
    events = list(
        estimate_job(spec, hr_data.array, lr_data.array, out=out, source=source, inputs=inputs)
    )
    results = next(e.summary for e in events if isinstance(e, OperatorEstimated))
    _common.emit(
        args,
        {**results, "scale": spec.scale, "kernel_size": spec.kernel_size, "out": str(out)},
        f"kernel sum    {results['kernel_sum']:.4f}\n"
        f"kernel peak   {results['kernel_peak']:.4f} at {tuple(results['kernel_peak_index'])}\n"
        f"bias          {results['bias']:.5f}\n"
        f"residual rms  {results['residual_rms']:.4f}\n"
        + (
            "LR noise model kept (a wppnet trained with it denoises its LR input)\n"
            if results["lr_noise_model"]
            else ""
        )
        + f"wrote {out}",
    )
    return _common.EXIT_OK


def _cmd_blur_check(args: argparse.Namespace) -> int:
    """``--lr --reference --scale`` without ``--hr``: the blur σ that best matches the data."""
    from napari_wpp.jobs.suitability import BlurChecked, blur_check_job

    if args.reference is None:
        raise InputError(
            "give --hr HR (a registered pair: kernel and bias) or --reference REF (the blur σ "
            "without a registered pair)"
        )
    if args.out is not None:
        raise InputError(
            "--out writes the operator of a registered pair (--hr); the σ search prints σ: "
            "use it with --scale Q --sigma S"
        )
    lr = _common.read_input(args.lr, "LR image")
    reference = _common.read_input(args.reference, "reference")
    spec = spec_from(args, BlurCheckSpec)
    events = list(blur_check_job(spec, lr.array, reference.array))
    summary = next(e.summary for e in events if isinstance(e, BlurChecked))
    bound = " (at the end of the searched range: only a bound)" if summary["at_bound"] else ""
    _common.emit(
        args,
        summary,
        f"sigma         {summary['sigma']:.3f} HR px{bound}\n"
        f"(Gaussian blur + ×{spec.scale} subsampling, kernel {spec.kernel_size}: the σ under "
        "which the degraded reference's LR patches best match the data's)",
    )
    return _common.EXIT_OK
