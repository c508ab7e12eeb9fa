"""``napari-wpp predict``: superresolve an image, stack or zarr volume with a model file."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari_wpp.cli._common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    PROG,
    _check_device,
    _check_output,
    _drive,
    _emit,
    _fail,
    _number,
    _positive,
    _ProgressBar,
    _read,
    _seed,
    _shape_text,
    _write_image,
)
from napari_wpp.cli.train import (
    TRAINABLE_MODELS,
)
from napari_wpp.core.errors import InputError

#: Posterior samples ``predict`` draws with a WPPFlow when ``--samples`` is not given.
DEFAULT_FLOW_SAMPLES = 8


_temperature = _number(float, 0.0, True, "e.g. --temperature 1 (0 gives the mode)")


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``predict`` subcommand to ``sub``."""
    p = sub.add_parser(
        "predict",
        parents=[common],
        help="superresolve an image, stack or zarr volume with a trained model",
        description="Superresolve a 2D image or, slice by slice, a 3D stack (TIFF/PNG) or a "
        "zarr array with a model file written by 'train'. Integer inputs are normalised by "
        "their dtype range; float inputs by the model's recorded float range, else by their "
        "own 0.1/99.9 percentiles. The output has the input's dtype and intensity range. "
        "With a wppflow model, OUT is the pixelwise mean of --samples posterior samples, "
        "<OUT stem>_std<ext> their standard deviation (float32, in the input's intensity "
        "units: grey levels for integer inputs) and, with --save-samples, "
        "<OUT stem>_samples<ext> the samples (sample axis first, the input's dtype).",
    )
    p.add_argument("model", metavar="MODEL", help="model file (.safetensors) from 'train'")
    p.add_argument("input", metavar="INPUT", help="LR image or stack (TIFF, PNG) or a .zarr array")
    p.add_argument(
        "--out", required=True, metavar="OUT", help="output .tif/.tiff or .zarr (a zarr array)"
    )
    p.add_argument(
        "--axis",
        type=int,
        metavar="A",
        help="axis of a 3D input cut into slices; it keeps its size, the two others grow "
        "(default 0)",
    )
    p.add_argument(
        "--tile",
        type=_positive["--tile"],
        metavar="T",
        help="process each slice in tiles of T LR pixels (with a halo; same result, less "
        "memory; default: whole slices)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive["--batch-size"],
        default=4,
        metavar="B",
        help="slices per forward pass; posterior samples per pass for a wppflow (default 4)",
    )
    flow = p.add_argument_group("wppflow models (posterior samples)")
    flow.add_argument(
        "--samples",
        type=_positive["--samples"],
        metavar="K",
        help=f"number of posterior samples per slice (default {DEFAULT_FLOW_SAMPLES}; 1 gives "
        "a std of 0)",
    )
    flow.add_argument(
        "--temperature",
        type=_temperature,
        metavar="T",
        help="latent temperature: samples from T·N(0, I) (default 1; 0: every sample is the mode)",
    )
    flow.add_argument(
        "--seed",
        type=_seed,
        metavar="N",
        help="seed of the latents; the same seed gives the same samples (default 0)",
    )
    flow.add_argument(
        "--save-samples",
        action="store_true",
        help="also write the samples to <OUT stem>_samples<ext> (K times the output's size)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(handler=_cmd_predict)


def _check_predict_output(path_text: str) -> tuple[Path, bool]:
    """The output path of ``predict`` and whether it is a zarr array (checked before work)."""
    path = Path(path_text).expanduser()
    if path.suffix.lower() != ".zarr":
        return _check_output(path_text, suffixes=(".tif", ".tiff", ".zarr")), False
    parent = path.parent
    if not parent.is_dir():
        raise InputError(
            f"output folder {str(parent)!r} does not exist: create it first or choose another path"
        )
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder {str(parent)!r} is not writable: choose another path")
    if path.exists() and not _replaceable_zarr(path):
        raise InputError(
            f"output {path_text!r} exists and is not a zarr array: choose another path"
        )
    return path, True


def _replaceable_zarr(path: Path) -> bool:
    """Whether ``path`` is an empty folder or a zarr array/group (zarr v2 or v3 metadata)."""
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    return any((path / name).is_file() for name in (".zarray", ".zgroup", "zarr.json"))


def _model_for_prediction(path_text: str) -> tuple[dict[str, Any], Any]:
    """Metadata and state of a model file that ``predict`` can run."""
    from napari_wpp.io import load_model, read_model_metadata

    meta = read_model_metadata(path_text)
    kind = meta.get("kind")
    name = Path(path_text).name
    if kind not in TRAINABLE_MODELS:
        raise InputError(
            f"{name} holds a model of unknown kind {kind!r}: update napari-wpp or use a "
            f"{' or '.join(TRAINABLE_MODELS)} model"
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
            f"model (train one with '{PROG} train --model wppflow')"
        )


def _suffixed_path(out: Path, label: str) -> Path:
    """``<OUT stem>_<label><ext>`` next to ``out``."""
    return out.with_name(f"{out.stem}_{label}{out.suffix}")


def _predict_normalisation(dtype: Any, recorded: Any, sample: Callable[[], Any]) -> tuple[Any, str]:
    """The input's normalisation and how it was chosen (see ``predict --help``)."""
    import numpy as np

    from napari_wpp.core.intensity import Normalisation

    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        return Normalisation.from_array(np.zeros(1, dtype)), f"{dtype} range"
    try:
        recorded_kind = np.dtype(str(recorded.get("dtype"))).kind
    except (AttributeError, TypeError):  # no (valid) normalisation recorded
        recorded_kind = None
    if recorded_kind == "f":
        norm = Normalisation.from_dict(recorded)
        return norm, f"model's range [{norm.low:g}, {norm.high:g}]"
    norm = Normalisation.from_array(sample())
    return norm, f"input's percentiles [{norm.low:g}, {norm.high:g}]"


def _sample_slices(array: Any, limit: int = 16) -> Any:
    """Up to ``limit`` evenly spaced slices along axis 0 (all of a 2D array), in memory."""
    import numpy as np

    if len(array.shape) == 2:
        return np.asarray(array[...])
    index = np.unique(np.linspace(0, array.shape[0] - 1, min(limit, array.shape[0])).astype(int))
    return np.stack([np.asarray(array[int(i)]) for i in index])


def _grown_axes(ndim: int, axis: int | None) -> list[bool]:
    """Which axes are superresolved: both of a 2D image, all but ``axis`` of a volume."""
    if ndim == 2:
        return [True, True]
    return [i != axis for i in range(3)]


def _describe_inference(event: Any) -> tuple[float, str] | None:
    from napari_wpp.core.inference import InferenceProgress

    if isinstance(event, InferenceProgress):
        return event.done / max(event.total, 1), f"slice {event.done}/{event.total}"
    return None


def _replace_zarr(tmp: Path, out: Path) -> None:
    """Move the finished zarr array ``tmp`` to ``out`` (replacing a zarr array there)."""
    import shutil

    if out.exists():
        if not _replaceable_zarr(out):
            raise InputError(f"output {str(out)!r} is not a zarr array any more: not replaced")
        shutil.rmtree(out)
    os.replace(tmp, out)


def _cmd_predict(args: argparse.Namespace) -> int:
    import shutil

    import numpy as np

    from napari_wpp.core.inference import (
        InferenceFinished,
        output_shape,
        superresolve,
    )

    out, out_zarr = _check_predict_output(args.out)
    device = _check_device(args.device)
    meta, state = _model_for_prediction(args.model)
    _check_flow_flags(args, str(state.kind), Path(args.model).name)
    flow = state.kind == "wppflow"
    extra_outputs: dict[str, Path] = {}
    if flow:
        extra_outputs["std"] = _suffixed_path(out, "std")
        if args.save_samples:
            extra_outputs["samples"] = _suffixed_path(out, "samples")
        for path in extra_outputs.values():
            _check_predict_output(str(path))
    model = state.model
    q = int(model.scale)

    in_path = Path(args.input).expanduser()
    in_zarr = in_path.suffix.lower() == ".zarr" or in_path.is_dir()
    pixel_size: list[float] | None = None
    unit = None
    if in_zarr:
        from napari_wpp.io import open_zarr_array

        source = open_zarr_array(in_path)
        if out_zarr and out.resolve() == in_path.resolve():
            raise InputError(f"--out {args.out!r} is the input: choose another output path")
        shape, dtype = tuple(int(n) for n in source.shape), np.dtype(source.dtype)
        attrs = dict(source.attrs)
        size = attrs.get("pixel_size")
        if isinstance(size, (list, tuple)) and len(size) == len(shape):
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in size):
                pixel_size = [float(v) for v in size]
                unit = attrs.get("unit") if isinstance(attrs.get("unit"), str) else None
        what = f"zarr array {args.input!r}"
    else:
        data = _read(args.input, "input image", ndims=(2, 3))
        array = np.asarray(data.array)
        shape, dtype = array.shape, array.dtype
        if data.pixel_size is not None:
            pixel_size = [float(v) for v in data.pixel_size]  # (y, x)
        unit = data.unit
        what = f"input image {args.input!r}"
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise InputError(
            f"{what} has shape {tuple(shape)}: give a 2D image or a 3D stack (Z, Y, X)"
        )
    if dtype.kind not in "uif":
        raise InputError(f"{what} has dtype {dtype}: give a grayscale integer or float image")
    ndim = len(shape)
    if ndim == 2:
        if args.axis not in (None, 0):
            raise InputError(f"--axis is for 3D stacks but {what} is 2D: drop --axis")
        axis = None
    else:
        axis = 0 if args.axis is None else args.axis
        if not -3 <= axis < 3:
            raise InputError(f"--axis {args.axis} is out of range for the 3D {what}: use 0, 1 or 2")
        axis %= 3
    recorded = meta.get("normalisation")
    norm, how = _predict_normalisation(
        dtype, recorded, lambda: _sample_slices(source) if in_zarr else array
    )
    if isinstance(recorded, dict) and dtype.kind in "ui" and recorded.get("dtype") != dtype.name:
        sys.stderr.write(
            f"note: the model was trained on {recorded.get('dtype')} data; {what} is {dtype} "
            f"and is normalised by its own dtype range\n"
        )
    grow = _grown_axes(ndim, axis)
    result_shape = output_shape(shape, q, axis or 0)
    slices = 1 if ndim == 2 else shape[axis]
    if flow:
        for path in (out, *extra_outputs.values()):
            if path.resolve() == in_path.resolve():
                raise InputError(f"output {str(path)!r} is the input: choose another --out")
        return _predict_flow(
            args,
            state,
            out,
            extra_outputs,
            out_zarr,
            in_path,
            source if in_zarr else array,
            in_zarr,
            norm,
            how,
            axis,
            tuple(result_shape),
            slices,
            pixel_size,
            unit,
            device,
        )

    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial.zarr") if out_zarr else None
    if tmp is not None and tmp.exists():
        shutil.rmtree(tmp)
    try:
        if in_zarr and out_zarr:
            from napari_wpp.io import superresolve_zarr

            finished = _drive(
                lambda stop: superresolve_zarr(
                    model,
                    in_path,
                    tmp,
                    axis=axis or 0,
                    tile=args.tile,
                    normalisation=norm,
                    device=device,
                    stop=stop,
                    slices_per_chunk=args.batch_size,
                ),
                _ProgressBar("predict"),
                describe=_describe_inference,
                finished=InferenceFinished,
                stopping=f"stopping after this batch; {out} will not be written",
            )
        else:
            volume = np.asarray(source[...]) if in_zarr else array
            finished = _drive(
                lambda stop: superresolve(
                    model,
                    volume,
                    axis=axis or 0,
                    tile=args.tile,
                    batch_size=args.batch_size,
                    device=device,
                    normalisation=norm,
                    stop=stop,
                ),
                _ProgressBar("predict"),
                describe=_describe_inference,
                finished=InferenceFinished,
                stopping=f"stopping after this batch; {out} will not be written",
            )
        if finished.stopped_early:
            _fail(f"interrupted: {out} was not written (no partial output is kept)")
            return EXIT_INTERRUPTED
        if out_zarr:
            if finished.result is not None:  # an in-memory result goes into a new zarr array
                from napari_wpp import __version__
                from napari_wpp.io import create_zarr_array

                attrs: dict[str, Any] = {
                    "napari_wpp": {
                        "scale": q,
                        "axis": axis,
                        "source": str(in_path.resolve()),
                        "model": {"kind": state.kind, "config": state.model_config},
                        "model_file": str(Path(args.model).expanduser().resolve()),
                        "tile": args.tile,
                        "normalisation": norm.to_dict(),
                        "version": __version__,
                        "complete": True,
                        "slices_done": slices,
                    }
                }
                if pixel_size is not None and len(pixel_size) == ndim:
                    attrs["pixel_size"] = [
                        v / q if g else v for v, g in zip(pixel_size, grow, strict=True)
                    ]
                    if unit:
                        attrs["unit"] = unit
                chunks = tuple(
                    1 if ndim == 3 and i == axis else n for i, n in enumerate(result_shape)
                )
                target = create_zarr_array(tmp, result_shape, finished.result.dtype, chunks, attrs)
                target[...] = finished.result
            _replace_zarr(tmp, out)
            tmp = None
            out_dtype = np.dtype(dtype)
        else:
            result = finished.result
            tiff_size = None
            if pixel_size is not None:
                yx, grow_yx = pixel_size[-2:], grow[-2:]
                tiff_size = tuple(v / q if g else v for v, g in zip(yx, grow_yx, strict=True))
            _write_image(out, result, pixel_size=tiff_size, unit=unit)
            out_dtype = result.dtype
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    axes = "both axes" if ndim == 2 else f"the axes other than {axis}"
    _emit(
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
            "normalisation": how,
            "model": str(args.model),
        },
        f"wrote {out} ({_shape_text(result_shape)}, {out_dtype}, ×{q} on {axes}) in "
        f"{finished.elapsed_s:.1f} s on {device} (intensities: {how})",
    )
    return EXIT_OK


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


def _predict_flow(
    args: argparse.Namespace,
    state: Any,
    out: Path,
    extra_outputs: dict[str, Path],
    out_zarr: bool,
    in_path: Path,
    source: Any,
    in_zarr: bool,
    norm: Any,
    how: str,
    axis: int | None,
    result_shape: tuple[int, ...],
    slices: int,
    pixel_size: list[float] | None,
    unit: str | None,
    device: str,
) -> int:
    """``predict`` with a WPPFlow: mean, std and (optionally) samples of K posterior samples."""
    import shutil

    import numpy as np

    from napari_wpp.core.inference import SamplingFinished, sample_volume

    model = state.model
    q = int(model.scale)
    k = args.samples if args.samples is not None else DEFAULT_FLOW_SAMPLES
    temperature = 1.0 if args.temperature is None else float(args.temperature)
    seed = 0 if args.seed is None else int(args.seed)
    ndim = len(result_shape)
    grow = _grown_axes(ndim, axis)
    outputs = {"mean": out, **extra_outputs}
    stopping = f"stopping after this batch; {out} will not be written"
    tmps: dict[str, Path] = {}
    if out_zarr:
        for name, path in outputs.items():
            tmps[name] = path.with_name(f".{path.name}.{os.getpid()}.partial.zarr")
            if tmps[name].exists():
                shutil.rmtree(tmps[name])
    try:
        if in_zarr and out_zarr:
            from napari_wpp.io import sample_zarr

            finished = _drive(
                lambda stop: sample_zarr(
                    model,
                    in_path,
                    tmps["mean"],
                    tmps["std"],
                    k,
                    samples_path=tmps.get("samples"),
                    axis=axis or 0,
                    temperature=temperature,
                    seed=seed,
                    batch_size=args.batch_size,
                    tile=args.tile,
                    normalisation=norm,
                    device=device,
                    stop=stop,
                ),
                _ProgressBar("predict"),
                describe=_describe_sampling,
                finished=SamplingFinished,
                stopping=stopping,
            )
        else:
            volume = np.asarray(source[...]) if in_zarr else source
            finished = _drive(
                lambda stop: sample_volume(
                    model,
                    volume,
                    k,
                    axis=axis or 0,
                    temperature=temperature,
                    seed=seed,
                    batch_size=args.batch_size,
                    tile=args.tile,
                    keep_samples="samples" in outputs,
                    device=device,
                    normalisation=norm,
                    stop=stop,
                ),
                _ProgressBar("predict"),
                describe=_describe_sampling,
                finished=SamplingFinished,
                stopping=stopping,
            )
        if finished.stopped_early:
            _fail(f"interrupted: {out} was not written (no partial output is kept)")
            return EXIT_INTERRUPTED
        result = finished.result
        arrays = (
            {}
            if result is None
            else {
                "mean": result.mean,
                "std": result.std,
                "samples": result.samples,
            }
        )
        if out_zarr:
            if result is not None:
                from napari_wpp import __version__
                from napari_wpp.io import create_zarr_array

                for name in outputs:
                    array = arrays[name]
                    lead = 1 if name == "samples" else 0
                    attrs: dict[str, Any] = {
                        "napari_wpp": {
                            "scale": q,
                            "axis": axis,
                            "source": str(in_path.resolve()),
                            "model": {"kind": state.kind, "config": state.model_config},
                            "model_file": str(Path(args.model).expanduser().resolve()),
                            "statistic": name,
                            "k": k,
                            "temperature": temperature,
                            "seed": seed,
                            "tile": args.tile,
                            "normalisation": norm.to_dict(),
                            "version": __version__,
                            "complete": True,
                            "slices_done": slices,
                        }
                    }
                    if pixel_size is not None and len(pixel_size) == ndim:
                        attrs["pixel_size"] = [1.0] * lead + [
                            v / q if g else v for v, g in zip(pixel_size, grow, strict=True)
                        ]
                        if unit:
                            attrs["unit"] = unit
                    chunks = (1,) * lead + tuple(
                        1 if ndim == 3 and i == axis else n for i, n in enumerate(result_shape)
                    )
                    target = create_zarr_array(tmps[name], array.shape, array.dtype, chunks, attrs)
                    target[...] = array
            for name, path in outputs.items():
                _replace_zarr(tmps.pop(name), path)
        else:
            assert result is not None
            tiff_size = None
            if pixel_size is not None:
                yx, grow_yx = pixel_size[-2:], grow[-2:]
                tiff_size = tuple(v / q if g else v for v, g in zip(yx, grow_yx, strict=True))
            for name, path in outputs.items():
                _write_image(path, arrays[name], pixel_size=tiff_size, unit=unit)
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    mean_dtype = np.dtype(source.dtype)
    std_units = (
        f"grey levels of {mean_dtype}" if mean_dtype.kind in "ui" else "input intensity units"
    )
    written = ", ".join(f"{name} {path}" for name, path in outputs.items())
    axes = "both axes" if ndim == 2 else f"the axes other than {axis}"
    _emit(
        args,
        {
            "out": str(out),
            "std": str(outputs["std"]),
            "samples": str(outputs["samples"]) if "samples" in outputs else None,
            "k": k,
            "temperature": temperature,
            "seed": seed,
            "shape": list(result_shape),
            "dtype": str(mean_dtype),
            "std_dtype": "float32",
            "std_units": std_units,
            "scale": q,
            "axis": axis,
            "slices": slices,
            "seconds": float(finished.elapsed_s),
            "device": device,
            "normalisation": how,
            "model": str(args.model),
            "kind": state.kind,
        },
        f"wrote the mean and std of {k} posterior samples (temperature {temperature:g}, seed "
        f"{seed}): {written} ({_shape_text(result_shape)}, ×{q} on {axes}; std float32 in "
        f"{std_units}) in {finished.elapsed_s:.1f} s on {device} (intensities: {how})",
    )
    return EXIT_OK
