"""``napari-wpp reconstruct``: variational WPP superresolution of one LR image."""

from __future__ import annotations

import argparse
from typing import Any

from napari_wpp.cli._common import (
    EXIT_OK,
    _add_operator_flags,
    _check_device,
    _check_output,
    _drive,
    _emit,
    _iterations,
    _lambda,
    _minutes,
    _operator_from_args,
    _ProgressBar,
    _read,
    _scaled_pixel_size,
    _seed,
    _shape_text,
    _write_image,
)
from napari_wpp.core.errors import InputError


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``reconstruct`` subcommand to ``sub``."""
    p = sub.add_parser(
        "reconstruct",
        parents=[common],
        help="variational WPP superresolution of one LR image",
        description="Superresolve one 2D LR image with the variational Wasserstein Patch "
        "Prior, using an HR reference of the same material. The output TIFF has the LR "
        "image's dtype and intensity range.",
    )
    p.add_argument(
        "--lr", required=True, metavar="LR", help="LR image (2D, or a 3D stack with --slice)"
    )
    p.add_argument(
        "--slice",
        type=int,
        metavar="Z",
        help="index of the slice to reconstruct when LR is a 3D stack",
    )
    p.add_argument("--reference", required=True, metavar="REF", help="HR reference image or stack")
    _add_operator_flags(p)
    p.add_argument(
        "--lambda",
        dest="lam",
        type=_lambda,
        metavar="L",
        help="weight λ of the patch prior, mean data term (default 0.008)",
    )
    p.add_argument(
        "--minutes",
        type=_minutes,
        metavar="M",
        help="time budget in minutes (with --iterations: whichever ends first)",
    )
    p.add_argument(
        "--iterations",
        type=_iterations,
        metavar="N",
        help="iteration budget (with neither budget: the library default iterations)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--out", required=True, metavar="OUT.tif", help="output TIFF")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(handler=_cmd_reconstruct)


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_wpp.core.intensity import Normalisation

    out = _check_output(args.out)
    device = _check_device(args.device)
    operator = _operator_from_args(args)
    lr_data = _read(args.lr, "LR image", ndims=(2, 3))
    ref_data = _read(args.reference, "reference", ndims=(2, 3))
    lr, ref = np.asarray(lr_data.array), np.asarray(ref_data.array)
    if lr.ndim == 3:
        if args.slice is None:
            raise InputError(
                f"LR image {args.lr!r} is a {_shape_text(lr.shape)} stack: choose the slice to "
                "reconstruct with --slice Z"
            )
        if not -lr.shape[0] <= args.slice < lr.shape[0]:
            raise InputError(
                f"--slice {args.slice} is outside the stack of {lr.shape[0]} slices: "
                f"use 0 to {lr.shape[0] - 1}"
            )
        lr = lr[args.slice]
    elif args.slice is not None:
        raise InputError(f"--slice is for 3D stacks but {args.lr!r} is 2D: drop --slice")

    from napari_wpp.core.reconstruct import (
        DEFAULT_LAMBDA,
        VariationalConfig,
        reconstruct_variational,
    )

    config = VariationalConfig(
        lam=args.lam,
        iterations=args.iterations,
        minutes=args.minutes,
        seed=args.seed,
        device=args.device,
    )
    p = config.patch_size  # a reference smaller than a patch is refused by the core
    q = int(operator.scale)
    if min(lr.shape) * q < p:
        raise InputError(
            f"LR image {_shape_text(lr.shape)} at ×{q} is smaller than the {p}×{p} patch: "
            "give a larger LR image"
        )
    norm = Normalisation.from_array(lr)
    lr_n = np.asarray(norm.apply(lr), dtype=np.float32)
    ref_n = np.asarray(Normalisation.from_array(ref).apply(ref), dtype=np.float32)
    finished = _drive(
        lambda stop: reconstruct_variational(lr_n, ref_n, operator, config, stop=stop),
        _ProgressBar("reconstruct"),
    )
    image = np.asarray(finished.image, dtype=np.float32)
    if lr.dtype.kind in "ui":
        image = np.clip(image, 0.0, 1.0)
    result = np.asarray(norm.invert(image)).astype(lr.dtype, copy=False)
    pixel_size = _scaled_pixel_size(lr_data.pixel_size, 1.0 / q, 2)
    _write_image(out, result, pixel_size=pixel_size, unit=lr_data.unit)
    lam = args.lam if args.lam is not None else DEFAULT_LAMBDA
    stopped = bool(getattr(finished, "stopped_early", False))
    _emit(
        args,
        {
            "out": str(out),
            "shape": list(result.shape),
            "scale": q,
            "iterations": int(finished.iterations),
            "seconds": float(finished.elapsed_s),
            "lambda": lam,
            "device": device,
            "stopped_early": stopped,
        },
        f"wrote {out} ({_shape_text(result.shape)}, {result.dtype}) after "
        f"{finished.iterations} iterations in {finished.elapsed_s:.1f} s (λ = {lam:g}, {device})"
        + (" [stopped early]" if stopped else ""),
    )
    return EXIT_OK
