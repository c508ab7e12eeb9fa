"""``napari-wpp reconstruct``: variational superresolution of one LR image (WPP or PatchNR).

Superresolve one 2D LR image with the variational Wasserstein Patch Prior, using an HR reference
of the same material, or with a learned PatchNR prior (--prior, from `napari-wpp train --model
patchnr`). The output TIFF has the LR image's dtype and intensity range.
"""

from __future__ import annotations

import argparse
import dataclasses

from napari_wpp.cli import _common
from napari_wpp.core.config import ReconstructSpec, help_of, spec_from
from napari_wpp.core.errors import InputError

_patch_count = _common.number_type(int, 0, True, "e.g. --patchnr-patches 40000 (0: all patches)")
_step = _common.number_type(float, 0.0, False, "e.g. --patchnr-step 0.03")


def add_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """The options of ``napari-wpp reconstruct``."""
    p.add_argument(
        "--lr", required=True, metavar="LR", help="LR image (2D, or a 3D stack with --slice)"
    )
    p.add_argument(
        "--slice",
        type=int,
        metavar="Z",
        help="index of the slice to reconstruct when LR is a 3D stack",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--reference", metavar="REF", help="HR reference image or stack (WPP)")
    source.add_argument(
        "--prior",
        metavar="PRIOR.safetensors",
        help="a trained PatchNR prior (`napari-wpp train --model patchnr`) instead of the WPP",
    )
    _common.add_operator_flags(p)
    _common.add_spec_option(
        p, ReconstructSpec, "lam", "--lambda", type=_common.lambda_type, metavar="L"
    )
    _common.add_patch_distance_flags(p, ReconstructSpec)
    _common.add_spec_option(
        p, ReconstructSpec, "patchnr_lam", "--patchnr-lambda", type=_common.lambda_type, metavar="L"
    )
    _common.add_spec_option(p, ReconstructSpec, "patchnr_patches", type=_patch_count, metavar="N")
    _common.add_spec_option(p, ReconstructSpec, "patchnr_step", type=_step, metavar="S")
    _common.add_spec_option(
        p,
        ReconstructSpec,
        "minutes",
        type=_common.minutes_type,
        metavar="M",
        help=help_of(ReconstructSpec, "minutes"),
    )
    _common.add_spec_option(
        p, ReconstructSpec, "iterations", type=_common.iterations_type, metavar="N"
    )
    _common.add_spec_option(p, ReconstructSpec, "seed", type=_common.seed_type)
    _common.add_device_flag(p, ReconstructSpec)
    _common.add_output_flag(p)
    _common.add_json_flag(p)


def spec_from_args(args: argparse.Namespace) -> ReconstructSpec:
    """The :class:`ReconstructSpec` of the parsed options."""
    return spec_from(args, ReconstructSpec)


def run(args: argparse.Namespace) -> int:
    from napari_wpp.jobs.reconstruct import ReconstructResult, load_prior, reconstruct_job

    out = _common.check_output(args.out)
    device = _common.check_device(args.device)
    operator = _common.operator_from_args(args)
    lr_data = _common.read_input(args.lr, "LR image", ndims=(2, 3))
    prior = None if args.prior is None else load_prior(args.prior)
    reference = None
    if args.reference is not None:
        reference = _common.read_input(args.reference, "reference", ndims=(2, 3)).array
    lr = lr_data.array
    if lr.ndim == 3:
        if args.slice is None:
            raise InputError(
                f"LR image {args.lr!r} is a {_common.shape_text(lr.shape)} stack: choose the "
                "slice to "
                "reconstruct with --slice Z"
            )
        if not -lr.shape[0] <= args.slice < lr.shape[0]:
            raise InputError(
                f"--slice {args.slice} is outside the stack of {lr.shape[0]} slices: "
                f"use 0 to {lr.shape[0] - 1}"
            )
        lr_data = dataclasses.replace(lr_data, array=lr[args.slice])
    elif args.slice is not None:
        raise InputError(f"--slice is for 3D stacks but {args.lr!r} is 2D: drop --slice")
    spec = spec_from_args(args)
    inputs = [
        ("reference", args.reference),
        ("prior", args.prior),
        ("operator file", args.operator),
    ]
    result = _common.drive(
        lambda stop: reconstruct_job(
            spec, operator, lr_data, reference, out, stop=stop, inputs=inputs, prior=prior
        ),
        _common.ProgressBar("reconstruct"),
        finished=ReconstructResult,
    )
    image = result.image
    _common.emit(
        args,
        {
            "out": str(out),
            "shape": list(image.shape),
            "scale": result.scale,
            "iterations": result.iterations,
            "seconds": result.elapsed_s,
            "lambda": result.lam,
            "prior": "patchnr" if prior is not None else "wpp",
            "device": device,
            "stopped_early": result.stopped_early,
        },
        f"wrote {out} ({_common.shape_text(image.shape)}, {image.dtype}) after "
        f"{result.iterations} iterations in {result.elapsed_s:.1f} s (λ = {result.lam:g}, "
        f"{device})" + (" [stopped early]" if result.stopped_early else ""),
    )
    return _common.EXIT_OK
