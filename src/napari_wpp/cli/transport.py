"""``napari-wpp transport``: move predictions between fidelity and the reference's look (patch
transport).

``fit`` summarises the patches of superresolved images (the source) and of a clean reference
(the target) by Gaussians and writes them to a JSON transport file; ``apply`` transports a
prediction (image, TIFF stack or zarr volume) with such a file and blends it with the input:
α = 1 leaves it unchanged, α = 0 transports it fully.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from napari_wpp.cli import _common
from napari_wpp.core.config import ReadoutSpec, TransportSpec, bounds, help_text
from napari_wpp.core.errors import InputError

_floor_type = _common.number_type(float, 0.0, True, "e.g. --floor 1e-4")
_steps_type = _common.number_type(int, 0, True, "e.g. --data-steps 5")


def alpha_type(text: str) -> float:
    """An α in the spec's bounds (1 unchanged, 0 fully transported)."""
    low, high = bounds(TransportSpec, "alpha")
    value = _common.parsed(float, text, f"expected a number, got {text!r}: e.g. --alpha 0.75")
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(
            f"must lie in [{low:g}, {high:g}], got {text}: 1 leaves the input unchanged, "
            "0 transports it fully"
        )
    return value


alpha_type.__name__ = "float"


def patch_type(text: str) -> int:
    """A patch size within the spec's bounds."""
    low, high = bounds(TransportSpec, "patch_size")
    value = _common.number_type(int, low, True, "e.g. --patch-size 6")(text)
    if value > high:
        raise argparse.ArgumentTypeError(f"must be at most {high}, got {text}: e.g. 6")
    return value


def add_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """The options of ``napari-wpp transport``."""
    actions = p.add_subparsers(dest="action", metavar="<action>", parser_class=_common.Parser)
    actions.required = True
    fit = actions.add_parser(
        "fit",
        parents=[common],
        help="fit a transport file from predictions and a reference",
        description="Fit the Gaussian patch statistics of the --source predictions (2D images "
        "or stacks, every slice along axis 0) and of the --reference, and write them with the "
        "reference's self-distance band to a JSON transport file.",
    )
    fit.add_argument(
        "--source", nargs="+", required=True, metavar="PRED", help="superresolved images/stacks"
    )
    fit.add_argument("--reference", required=True, metavar="REF", help="clean reference image")
    fit.add_argument("--out", required=True, metavar="T.json", help="transport file to write")
    _common.add_spec_option(fit, TransportSpec, "patch_size", type=patch_type, metavar="P")
    _common.add_spec_option(fit, TransportSpec, "floor", type=_floor_type, metavar="F")
    _common.add_json_flag(fit)
    fit.set_defaults(handler=_cmd_fit)

    apply = actions.add_parser(
        "apply",
        parents=[common],
        help="transport a prediction with a transport file",
        description="Transport every patch of PRED (a 2D image, a TIFF stack or a zarr array, "
        "slice by slice along --axis) with the map of --transport and blend: α·PRED + (1 − α)·"
        "transported. The output has PRED's dtype and range; zarr inputs and outputs are "
        "processed one slice at a time.",
    )
    add_apply_flags(apply, positional=True)
    apply.add_argument(
        "--out", required=True, metavar="OUT", help="output .tif/.tiff or .zarr (a zarr array)"
    )
    apply.add_argument("--axis", type=int, default=0, metavar="A", help="slice axis of a stack")
    apply.add_argument("--lr", metavar="LR", help="LR image/stack of PRED (for --data-steps)")
    _common.add_spec_option(apply, TransportSpec, "data_steps", type=_steps_type, metavar="N")
    apply.add_argument(
        "--noise", type=_common.noise_type, metavar="SIGMA", help=help_text(ReadoutSpec, "noise")
    )
    _common.add_operator_flags(apply)
    _common.add_json_flag(apply)
    apply.set_defaults(handler=_cmd_apply)


def add_apply_flags(parser: Any, positional: bool = False) -> None:
    """``[PRED] --transport T.json --alpha A`` (also used by ``predict``)."""
    if positional:
        parser.add_argument("pred", metavar="PRED", help="prediction (TIFF, PNG or .zarr)")
    parser.add_argument(
        "--transport",
        required=positional,
        metavar="T.json",
        help="transport file from 'transport fit'",
    )
    parser.add_argument(
        "--alpha",
        type=alpha_type,
        default=None,
        metavar="A",
        help=help_text(TransportSpec, "alpha"),
    )


def _read_array(path_text: str, what: str) -> tuple[Any, Path | None]:
    """An image (numpy) or a zarr array read lazily, and the zarr path."""
    import numpy as np

    path = Path(path_text).expanduser()
    if path.suffix.lower() == ".zarr" or path.is_dir():
        from napari_wpp.io.zarr_arrays import open_zarr_for_reading

        data = open_zarr_for_reading(path)
        if len(data.shape) not in (2, 3):
            raise InputError(f"{what} {path_text!r} has shape {data.shape}: give a 2D or 3D array")
        return data, path
    return np.asarray(_common.read_input(path_text, what).array), None


def _cmd_fit(args: argparse.Namespace) -> int:
    from napari_wpp.io import check_not_an_input
    from napari_wpp.jobs.notices import JobProgress
    from napari_wpp.jobs.transport import TransportFitted, fit_transport_job

    out = _common.check_output(args.out, "--out", suffixes=(".json",))
    check_not_an_input(
        [out], [("source", s) for s in args.source] + [("reference", args.reference)]
    )
    sources = [_read_array(s, "--source image")[0] for s in args.source]
    reference = _common.read_input(args.reference, "--reference image").array
    spec = TransportSpec(patch_size=args.patch_size, floor=args.floor)
    provenance = {
        "sources": [str(Path(s).expanduser().resolve()) for s in args.source],
        "reference": str(Path(args.reference).expanduser().resolve()),
    }

    def describe(event: Any) -> tuple[float, str] | None:
        if isinstance(event, JobProgress):
            return event.done / event.total, f"{event.what} {event.done}/{event.total}"
        return None

    finished = _common.drive(
        lambda stop: fit_transport_job(spec, sources, reference, out, provenance, stop),
        _common.ProgressBar("transport fit"),
        describe=describe,
        finished=TransportFitted,
    )
    content = finished.content
    band = content.band["gelbrich"]
    _common.emit(
        args,
        {
            "out": str(out),
            "patch_size": spec.patch_size,
            "floor": spec.floor,
            "source_patches": content.transport.source.count,
            "target_patches": content.transport.target.count,
            "distance_from_identity": content.transport.distance_from_identity(),
            "reference_band": content.band,
            "seconds": finished.elapsed_s,
        },
        f"wrote {out} ({spec.patch_size}×{spec.patch_size} patches: "
        f"{content.transport.source.count} source, {content.transport.target.count} reference; "
        f"‖T − I‖ {content.transport.distance_from_identity():.2f}; reference band "
        f"{band['low']:.4f}–{band['high']:.4f}, middle {band['middle']:.4f}) in "
        f"{finished.elapsed_s:.1f} s",
    )
    return _common.EXIT_OK


def run_apply(
    args: argparse.Namespace,
    data: Any,
    out: Path,
    *,
    axis: int,
    lr: Any = None,
    operator: Any = None,
    label: str = "transport",
) -> Any:
    """Run :func:`~napari_wpp.jobs.transport.apply_transport_job` with a progress bar; returns
    the finished event (``None`` when stopped)."""
    from napari_wpp.io.transport import read_transport
    from napari_wpp.jobs.notices import JobProgress
    from napari_wpp.jobs.transport import TransportApplied, apply_transport_job

    content = read_transport(args.transport)
    spec = TransportSpec(
        patch_size=content.transport.patch_size,
        floor=content.transport.floor,
        alpha=args.alpha,
        data_steps=getattr(args, "data_steps", 0) or 0,
    )

    def describe(event: Any) -> tuple[float, str] | None:
        if isinstance(event, JobProgress):
            return event.done / event.total, f"slice {event.done}/{event.total}"
        return None

    noise = getattr(args, "noise", None)
    finished = _common.drive(
        lambda stop: apply_transport_job(
            spec, content, data, out, axis, lr, operator, noise, stop=stop
        ),
        _common.ProgressBar(label),
        describe=describe,
        finished=TransportApplied,
        stopping=f"stopping after this slice; {out} will not be written",
    )
    return None if finished.stopped_early else finished


def _cmd_apply(args: argparse.Namespace) -> int:
    from napari_wpp.io import check_not_an_input

    out, _ = _common.check_array_output(args.out)
    data, zarr_path = _read_array(args.pred, "PRED")
    inputs = [("PRED", args.pred), ("transport file", args.transport), ("LR image", args.lr)]
    check_not_an_input([out], inputs)
    ndim = len(data.shape)
    if not -ndim <= args.axis < ndim or (ndim == 2 and args.axis not in (0, -2)):
        raise InputError(f"--axis {args.axis} is out of range for a {ndim}D PRED: use 0, 1 or 2")
    lr, operator = None, None
    if args.data_steps:
        if args.lr is None:
            raise InputError("--data-steps needs the LR image: give --lr LR and the operator")
        lr = _read_array(args.lr, "--lr image")[0]
        operator = _common.operator_from_args(args)
    elif args.lr is not None:
        raise InputError("--lr is only used with --data-steps N: add --data-steps or drop --lr")
    finished = run_apply(args, data, out, axis=args.axis % max(ndim, 1), lr=lr, operator=operator)
    if finished is None:
        _common.fail(f"interrupted: {out} was not written (no partial output is kept)")
        return _common.EXIT_INTERRUPTED
    _common.emit(
        args,
        {
            "out": str(out),
            "shape": list(data.shape),
            "alpha": finished.alpha,
            "alpha_how": finished.alpha_how,
            "data_steps": args.data_steps,
            "seconds": finished.elapsed_s,
        },
        f"wrote {out} ({_common.shape_text(data.shape)}, α = {finished.alpha:.3f} "
        f"({finished.alpha_how})"
        f") in {finished.elapsed_s:.1f} s",
    )
    return _common.EXIT_OK


__all__ = ["add_apply_flags", "add_arguments", "alpha_type", "patch_type", "run_apply"]
