"""``napari-wpp degrade``: apply a forward operator (and noise) to an HR image or stack."""

from __future__ import annotations

import argparse
from typing import Any

from napari_wpp.cli._common import (
    EXIT_OK,
    _add_operator_flags,
    _check_output,
    _emit,
    _noise,
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
    """Add the ``degrade`` subcommand to ``sub``."""
    p = sub.add_parser(
        "degrade",
        parents=[common],
        help="blur, downsample and add noise to an HR image or stack",
        description="Apply a forward operator (and noise) to a 2D image or, slice by slice, "
        "to a 3D stack. The output TIFF has the input's dtype; the pixel size is multiplied "
        "by the scale.",
    )
    p.add_argument("input", metavar="INPUT", help="HR image or stack (TIFF, PNG, ...)")
    p.add_argument("--out", required=True, metavar="OUT.tif", help="output TIFF")
    _add_operator_flags(p)
    p.add_argument(
        "--noise",
        type=_noise,
        default=0.0,
        metavar="SIGMA",
        help="Gaussian noise std on the [0, 1] intensity scale (default 0)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="noise seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(handler=_cmd_degrade)


def _cmd_degrade(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from napari_wpp.core.intensity import Normalisation
    from napari_wpp.core.operators import add_noise

    out = _check_output(args.out)
    operator = _operator_from_args(args)
    data = _read(args.input, "input image")
    array = np.asarray(data.array)
    q = int(operator.scale)
    if min(array.shape[-2:]) < q:
        raise InputError(
            f"input image {_shape_text(array.shape[-2:])} is smaller than the scale {q}: "
            "give a larger image or a smaller --scale"
        )
    norm = Normalisation.from_array(array)
    slices = array[None] if array.ndim == 2 else array
    results = []
    bar = _ProgressBar("degrade") if len(slices) > 1 else None
    for i, hr_slice in enumerate(slices):
        hr = torch.from_numpy(np.ascontiguousarray(norm.apply(hr_slice), dtype=np.float32))
        with torch.no_grad():
            lr = operator(hr)
            if args.noise > 0:
                lr = add_noise(lr, args.noise, seed=args.seed + i)
        results.append(lr.detach().cpu().numpy())
        if bar is not None:
            bar.update((i + 1) / len(slices), f"slice {i + 1}/{len(slices)}")
    if bar is not None:
        bar.close()
    low = np.stack(results) if array.ndim == 3 else results[0]
    if array.dtype.kind in "ui":
        low = np.clip(low, 0.0, 1.0)
    low = np.asarray(norm.invert(low)).astype(array.dtype, copy=False)
    pixel_size = _scaled_pixel_size(data.pixel_size, q, array.ndim)
    _write_image(out, low, pixel_size=pixel_size, unit=data.unit)
    _emit(
        args,
        {"out": str(out), "shape": list(low.shape), "scale": q, "noise": args.noise},
        f"wrote {out} ({_shape_text(low.shape)}, {low.dtype}, ×{q} down"
        + (f", noise {args.noise:g})" if args.noise else ")"),
    )
    return EXIT_OK
