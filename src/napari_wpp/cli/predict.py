"""``napari-wpp predict``: superresolve an image, stack or zarr volume with a trained model.

Superresolve a 2D image or, slice by slice, a 3D stack (TIFF/PNG) or a zarr array with a model
file written by 'train'. Integer inputs are normalised by their dtype range; float inputs by the
model's recorded float range, else by their own 0.1/99.9 percentiles. The output has the input's
dtype and intensity range. With a wppflow model, OUT is the pixelwise mean of --samples
posterior samples, <OUT stem>_std<ext> their standard deviation (float32, in the input's
intensity units: grey levels for integer inputs; calibrated when the model carries a std
calibration from training, the samples' own std then in <OUT stem>_raw_std<ext>) and, with
--save-samples, <OUT stem>_samples<ext> the samples (sample axis first, the input's dtype).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_wpp.cli import _common
from napari_wpp.cli.transport import add_apply_flags, run_apply
from napari_wpp.core.config import PredictSpec, help_text
from napari_wpp.core.config.training import PREDICTION_MODELS
from napari_wpp.core.errors import InputError

_temperature = _common.number_type(float, 0.0, True, "e.g. --temperature 1 (0 gives the mode)")


def _help(name: str) -> str:
    return help_text(PredictSpec, name)


def add_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """The options of ``napari-wpp predict``."""
    p.add_argument("model", metavar="MODEL", help="model file (.safetensors) from 'train'")
    p.add_argument("input", metavar="INPUT", help="LR image or stack (TIFF, PNG) or a .zarr array")
    p.add_argument(
        "--out", required=True, metavar="OUT", help="output .tif/.tiff or .zarr (a zarr array)"
    )
    p.add_argument("--axis", type=int, metavar="A", help=_help("axis"))
    positive = _common.positive_types
    p.add_argument("--tile", type=positive["--tile"], metavar="T", help=_help("tile"))
    p.add_argument(
        "--batch-size",
        type=positive["--batch-size"],
        default=PredictSpec.batch_size,
        metavar="B",
        help=_help("batch_size"),
    )
    flow = p.add_argument_group("wppflow models (posterior samples)")
    flow.add_argument("--samples", type=positive["--samples"], metavar="K", help=_help("samples"))
    flow.add_argument("--temperature", type=_temperature, metavar="T", help=_help("temperature"))
    flow.add_argument("--seed", type=_common.seed_type, metavar="N", help=_help("seed"))
    flow.add_argument(
        "--save-samples",
        action="store_true",
        help="also write the samples to <OUT stem>_samples<ext> (K times the output's size)",
    )
    p.add_argument("--device", default=PredictSpec.device, help=_help("device"))
    p.add_argument(
        "--no-lr-denoise",
        dest="lr_denoise",
        action="store_false",
        help="superresolve the LR input as it is, even with a model that holds an LR noise "
        "model (to compare)",
    )
    moved = p.add_argument_group(
        "perception ↔ fidelity (patch transport of the result; of the mean for a wppflow)"
    )
    add_apply_flags(moved)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _model_for_prediction(path_text: str) -> tuple[dict[str, Any], Any]:
    """Metadata and state of a model file that ``predict`` can run."""
    from napari_wpp.io import load_model, read_model_metadata

    meta = read_model_metadata(path_text)
    kind = meta.get("kind")
    name = Path(path_text).name
    if kind == "patchnr":
        raise InputError(
            f"{name} is a PatchNR prior, not a superresolution network: use it with "
            f"`napari-wpp reconstruct --prior {name}`"
        )
    if kind not in PREDICTION_MODELS:
        raise InputError(
            f"{name} holds a model of unknown kind {kind!r}: update napari-wpp or use a "
            f"{' or '.join(PREDICTION_MODELS)} model"
        )
    return meta, load_model(path_text, device="cpu")


def _check_flow_flags(args: argparse.Namespace, kind: str, name: str) -> None:
    """Refuse the sampling flags of ``predict`` for a model that draws no samples."""
    if kind == "wppflow":
        return
    given = [
        flag
        for flag, value in (
            ("--samples", args.samples),
            ("--temperature", args.temperature),
            ("--seed", args.seed),
            ("--save-samples", args.save_samples or None),
        )
        if value is not None
    ]
    if given:
        raise InputError(
            f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for wppflow models but "
            f"{name} is a {kind}, which draws no samples: drop {given[0]} or use a wppflow "
            f"model (train one with '{_common.PROG} train --model wppflow')"
        )


def _describe_inference(event: Any) -> tuple[float, str] | None:
    from napari_wpp.core.inference import InferenceProgress

    if isinstance(event, InferenceProgress):
        return event.done / max(event.total, 1), f"slice {event.done}/{event.total}"
    return None


def _predict_source(args: argparse.Namespace, out: Path, out_zarr: bool) -> Any:
    """The checked input of ``predict`` as a :class:`~napari_wpp.jobs.predict.PredictSource`."""
    import numpy as np

    from napari_wpp.jobs.predict import PredictSource

    in_path = Path(args.input).expanduser()
    in_zarr = in_path.suffix.lower() == ".zarr" or in_path.is_dir()
    pixel_size: tuple[float, ...] | None = None
    unit = None
    if in_zarr:
        from napari_wpp.io.zarr_arrays import open_zarr_for_reading

        data = open_zarr_for_reading(in_path)  # a damaged chunk names the array
        if out_zarr and out.resolve() == in_path.resolve():
            raise InputError(f"--out {args.out!r} is the input: choose another output path")
        attrs = dict(data.attrs)
        size = attrs.get("pixel_size")
        if isinstance(size, (list, tuple)) and len(size) == len(data.shape):
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in size):
                pixel_size = tuple(float(v) for v in size)
                unit = attrs.get("unit") if isinstance(attrs.get("unit"), str) else None
        what = f"zarr array {args.input!r}"
    else:
        image = _common.read_input(args.input, "input image", ndims=(2, 3))
        data = np.asarray(image.array)
        if image.pixel_size is not None:
            pixel_size = tuple(float(v) for v in image.pixel_size)  # (y, x)
        unit = image.unit
        what = f"input image {args.input!r}"
    shape, dtype = tuple(int(n) for n in data.shape), np.dtype(data.dtype)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise InputError(
            f"{what} has shape {tuple(shape)}: give a 2D image or a 3D stack (Z, Y, X)"
        )
    if dtype.kind not in "uif":
        raise InputError(f"{what} has dtype {dtype}: give a grayscale integer or float image")
    return PredictSource(
        data=data,
        name=str(in_path.resolve()),
        zarr_path=in_path if in_zarr else None,
        pixel_size=pixel_size,
        unit=unit,
    ), what


def _predict_spec(args: argparse.Namespace, ndim: int, what: str) -> Any:
    """The :class:`~napari_wpp.core.config.PredictSpec` of ``predict``'s flags."""
    from napari_wpp.core.config import PredictSpec

    if ndim == 2:
        if args.axis not in (None, 0):
            raise InputError(f"--axis is for 3D stacks but {what} is 2D: drop --axis")
        axis = PredictSpec.axis
    else:
        axis = PredictSpec.axis if args.axis is None else args.axis
        if not -3 <= axis < 3:
            raise InputError(f"--axis {args.axis} is out of range for the 3D {what}: use 0, 1 or 2")
        axis %= 3
    given = {
        "samples": args.samples,
        "temperature": None if args.temperature is None else float(args.temperature),
        "seed": None if args.seed is None else int(args.seed),
    }
    return PredictSpec(
        axis=axis,
        tile=args.tile,
        batch_size=args.batch_size,
        device=_common.check_device(args.device),
        keep_samples=bool(args.save_samples),
        lr_denoise=bool(getattr(args, "lr_denoise", True)),
        **{name: value for name, value in given.items() if value is not None},
    )


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_wpp.core.inference import InferenceFinished, SamplingFinished, output_shape
    from napari_wpp.jobs.calibration import model_calibration
    from napari_wpp.jobs.predict import (
        NormalisationChosen,
        PredictTarget,
        predict_job,
    )

    out, out_zarr = _common.check_array_output(args.out)
    device = _common.check_device(args.device)
    meta, state = _model_for_prediction(args.model)
    _check_flow_flags(args, str(state.kind), Path(args.model).name)
    _check_transport_flags(args)
    flow = state.kind == "wppflow"
    target = PredictTarget(
        path=out, provenance={"model_file": str(Path(args.model).expanduser().resolve())}
    )
    calibration = model_calibration(state) if flow else None
    outputs = target.paths(bool(args.save_samples), calibration is not None) if flow else {}
    outputs = outputs or {"result": out}
    for path in list(outputs.values())[1:]:
        _common.check_array_output(str(path))
    source, what = _predict_source(args, out, out_zarr)
    if out_zarr and source.zarr_path is not None and outputs.pop("raw_std", None):
        calibration = None  # streamed into zarr slice by slice: the raw std only
        sys.stderr.write("note: the std calibration is not applied when zarr streams into zarr\n")
    shape, dtype = tuple(int(n) for n in source.data.shape), np.dtype(source.data.dtype)
    ndim = len(shape)
    spec = _predict_spec(args, ndim, what)
    axis = spec.axis if ndim == 3 else None
    recorded = meta.get("normalisation")
    if isinstance(recorded, dict) and dtype.kind in "ui" and recorded.get("dtype") != dtype.name:
        sys.stderr.write(
            f"note: the model was trained on {recorded.get('dtype')} data; {what} is {dtype} "
            f"and is normalised by its own dtype range\n"
        )
    q = int(state.model.scale)
    result_shape = output_shape(shape, q, axis or 0)
    slices = 1 if ndim == 2 else shape[axis]
    chosen: dict[str, str] = {}
    inputs = [("input image", args.input), ("model file", args.model)]
    describe_run = _describe_sampling if flow else _describe_inference

    def describe(event: Any) -> tuple[float, str] | None:
        if isinstance(event, NormalisationChosen):
            chosen["how"] = event.how
        return describe_run(event)

    finished = _common.drive(
        lambda stop: predict_job(
            spec, state.model, recorded, source, target, stop, inputs, calibration
        ),
        _common.ProgressBar("predict"),
        describe=describe,
        finished=SamplingFinished if flow else InferenceFinished,
        stopping=f"stopping after this batch; {out} will not be written",
    )
    if finished.stopped_early:
        _common.fail(f"interrupted: {out} was not written (no partial output is kept)")
        return _common.EXIT_INTERRUPTED
    alpha = _transport_output(args, out if not flow else outputs["mean"], spec, ndim)
    if alpha is None:
        return _common.EXIT_INTERRUPTED
    run = _PredictRun(
        spec, state, outputs, tuple(result_shape), slices, chosen["how"], device, dtype
    )
    if flow:
        return _report_flow(args, run, finished)
    axes = "both axes" if ndim == 2 else f"the axes other than {axis}"
    out_dtype = dtype if out_zarr else finished.result.dtype
    _common.emit(
        args,
        {
            "out": str(out),
            "shape": list(result_shape),
            "dtype": str(out_dtype),
            "scale": q,
            "axis": axis,
            "slices": slices,
            "seconds": float(finished.elapsed_s),
            "device": device,
            "normalisation": run.how,
            "model": str(args.model),
            "transport": args.transport,
            "alpha": alpha if args.transport else None,
        },
        f"wrote {out} ({_common.shape_text(result_shape)}, {out_dtype}, ×{q} on {axes}) in "
        f"{finished.elapsed_s:.1f} s on {device} (intensities: {run.how})",
    )
    return _common.EXIT_OK


def _check_transport_flags(args: argparse.Namespace) -> None:
    """Refuse --alpha without --transport; read the transport file before any work."""
    if args.transport is None:
        if args.alpha is not None:
            raise InputError("--alpha needs --transport T.json: add it or drop --alpha")
        return
    from napari_wpp.io import check_not_an_input
    from napari_wpp.io.transport import read_transport

    read_transport(args.transport)
    check_not_an_input([args.out], [("transport file", args.transport)])


def _transport_output(args: argparse.Namespace, path: Path, spec: Any, ndim: int) -> float | None:
    """Transport the written prediction ``path`` in place with --transport at --alpha.

    Returns the α used (NaN without --transport), ``None`` when interrupted (the output then
    stays as predicted, untransported: the transported file replaces it only when complete).
    """
    import math

    if args.transport is None:
        return math.nan

    if path.suffix.lower() == ".zarr":
        from napari_wpp.io.zarr_arrays import open_zarr_for_reading

        data = open_zarr_for_reading(path)
    else:
        import numpy as np

        data = np.asarray(_common.read_input(str(path), "prediction").array)
    axis = spec.axis if ndim == 3 else 0
    finished = run_apply(args, data, path, axis=axis, label="transport")
    if finished is None:
        _common.fail(f"interrupted: {path} was not transported and is left untransported")
        return None
    return float(finished.alpha)


def _describe_sampling(event: Any) -> tuple[float, str] | None:
    from napari_wpp.core.inference import SamplingProgress

    if isinstance(event, SamplingProgress):
        per_slice = max(event.total // max(event.slices_total, 1), 1)
        detail = f"sample {event.done}/{event.total}"
        if event.slices_total > 1:
            current = min(event.slices_done + 1, event.slices_total)
            done_here = event.done - (current - 1) * per_slice
            detail = f"slice {current}/{event.slices_total} sample {done_here}/{per_slice}"
        return event.done / max(event.total, 1), detail
    return None


@dataclass(frozen=True)
class _PredictRun:
    """What the report of a finished ``predict`` needs."""

    spec: Any
    state: Any
    outputs: dict[str, Path]
    result_shape: tuple[int, ...]
    slices: int
    how: str
    device: str
    input_dtype: Any


def _report_flow(args: argparse.Namespace, run: _PredictRun, finished: Any) -> int:
    """Report ``predict`` with a WPPFlow: mean, std and (optionally) samples of K samples."""
    import numpy as np

    spec, outputs = run.spec, run.outputs
    ndim = len(run.result_shape)
    axis = spec.axis if ndim == 3 else None
    q = int(run.state.model.scale)
    mean_dtype = np.dtype(run.input_dtype)
    std_units = (
        f"grey levels of {mean_dtype}" if mean_dtype.kind in "ui" else "input intensity units"
    )
    from napari_wpp.jobs.calibration import model_calibration

    written = ", ".join(f"{name} {path}" for name, path in outputs.items())
    calibration = model_calibration(run.state) if "raw_std" in outputs else None
    promise = "" if calibration is None else f"; {calibration.promise_text()}"
    axes = "both axes" if ndim == 2 else f"the axes other than {axis}"
    _common.emit(
        args,
        {
            "out": str(outputs["mean"]),
            "std": str(outputs["std"]),
            "samples": str(outputs["samples"]) if "samples" in outputs else None,
            "k": spec.samples,
            "temperature": spec.temperature,
            "seed": spec.seed,
            "shape": list(run.result_shape),
            "dtype": str(mean_dtype),
            "std_dtype": "float32",
            "std_units": std_units,
            "scale": q,
            "axis": axis,
            "slices": run.slices,
            "seconds": float(finished.elapsed_s),
            "device": run.device,
            "normalisation": run.how,
            "model": str(args.model),
            "kind": run.state.kind,
            "raw_std": str(outputs["raw_std"]) if "raw_std" in outputs else None,
            "calibration": None if calibration is None else calibration.to_dict(),
        },
        f"wrote the mean and std of {spec.samples} posterior samples (temperature "
        f"{spec.temperature:g}, seed {spec.seed}): {written} "
        f"({_common.shape_text(run.result_shape)}, "
        f"×{q} on {axes}; std float32 in {std_units}) in {finished.elapsed_s:.1f} s on "
        f"{run.device} (intensities: {run.how}){promise}",
    )
    return _common.EXIT_OK
