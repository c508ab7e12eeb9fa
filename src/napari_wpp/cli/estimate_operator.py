"""``napari-wpp estimate-operator``: kernel and bias from a registered HR/LR pair."""

from __future__ import annotations

import argparse
from typing import Any

from napari_wpp.cli._common import (
    EXIT_OK,
    _check_output,
    _emit,
    _kernel,
    _one_line,
    _read,
    _scale,
    _shape_text,
)
from napari_wpp.core.errors import InputError


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
    p.add_argument("--scale", required=True, type=_scale, metavar="Q", help="integer factor ≥ 2")
    p.add_argument(
        "--kernel-size", type=_kernel, default=15, metavar="K", help="kernel side (default 15)"
    )
    p.add_argument("--out", required=True, metavar="OP.json", help="operator JSON to write")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(handler=_cmd_estimate_operator)


def _cmd_estimate_operator(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_wpp.core.intensity import Normalisation
    from napari_wpp.core.operators import estimate_operator
    from napari_wpp.io import write_operator

    out = _check_output(args.out, "operator file", suffixes=(".json",))
    hr_data = _read(args.hr, "HR image", ndims=(2,))
    lr_data = _read(args.lr, "LR image", ndims=(2,))
    hr, lr = np.asarray(hr_data.array), np.asarray(lr_data.array)
    q = args.scale
    native = tuple(s // q for s in hr.shape)
    if min(native) < 1 or tuple(lr.shape) not in (native, tuple(hr.shape)):
        raise InputError(
            f"HR {_shape_text(hr.shape)} and LR {_shape_text(lr.shape)} do not match scale {q}: "
            f"the LR image must be {_shape_text(native)} (HR / {q}) or, resampled onto the HR "
            f"grid, {_shape_text(hr.shape)}"
        )
    if args.kernel_size > min(hr.shape):
        raise InputError(
            f"kernel size {args.kernel_size} exceeds the HR image {_shape_text(hr.shape)}: "
            "use a smaller --kernel-size"
        )
    hr_n = Normalisation.from_array(hr).apply(hr)
    lr_n = Normalisation.from_array(lr).apply(lr)
    estimate = estimate_operator(hr_n, lr_n, q, kernel_size=args.kernel_size)
    summary = estimate.to_dict()
    results = {
        "kernel_sum": float(summary["kernel_sum"]),
        "bias": float(summary["bias"]),
        "residual_rms": float(summary["residual_rms"]),
        "kernel_peak": float(summary["kernel_peak"]),
        "kernel_peak_index": [int(i) for i in summary["kernel_peak_index"]],
    }
    fit = {k: v for k, v in results.items() if k != "bias"}  # the operator stores its bias
    try:
        write_operator(out, estimate.operator, extra={"fit": {**fit, "hr": args.hr, "lr": args.lr}})
    except OSError as exc:
        raise InputError(
            f"cannot write {str(out)!r} ({_one_line(str(exc))}): check the path"
        ) from exc
    _emit(
        args,
        {**results, "scale": q, "kernel_size": args.kernel_size, "out": str(out)},
        f"kernel sum    {results['kernel_sum']:.4f}\n"
        f"kernel peak   {results['kernel_peak']:.4f} at {tuple(results['kernel_peak_index'])}\n"
        f"bias          {results['bias']:.5f}\n"
        f"residual rms  {results['residual_rms']:.4f}\n"
        f"wrote {out}",
    )
    return EXIT_OK
