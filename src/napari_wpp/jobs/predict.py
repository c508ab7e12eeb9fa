"""Prediction jobs: superresolution with a WPPNet, posterior sampling with a WPPFlow.

One rule for both faces (``napari-wpp predict`` and the Superresolve/Uncertainty widgets):

* **Normalisation** (:func:`input_normalisation`): integer inputs use their dtype's range;
  float inputs the model's recorded range when it was trained on floats, else the 0.1/99.9
  percentiles of the whole input when it is in memory (a numpy array: a TIFF/PNG file or an
  in-memory layer), of up to :data:`SAMPLE_SLICES` evenly spaced slices along axis 0 when it
  is read lazily (zarr, dask). This is the command line's rule, kept so that its documented
  commands give the same outputs; the percentiles never depend on the slice axis or on which
  part of a volume is run, so a slice superresolved in napari matches the same slice of the
  whole volume on the command line.
* **Outputs**: in memory (``target.path`` ``None``), a TIFF, or a zarr array written to
  ``.<name>.<pid>.partial.zarr`` and moved into place when complete (a stopped run leaves
  nothing). Zarr inputs go zarr-to-zarr slab by slab, lazy (dask) inputs stream into the
  zarr array, numpy inputs are superresolved in memory and then written. Every zarr array
  gets :func:`~napari_wpp.jobs.zarr_layout.slab_chunks`, the provenance under
  ``napari_wpp`` and the source's ``pixel_size`` divided by ``q`` on the grown axes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_wpp import io
from napari_wpp.core.config import PredictSpec
from napari_wpp.core.errors import InputError
from napari_wpp.core.events import forward_until_finished
from napari_wpp.io import PIXEL_SIZE_ATTR, PROVENANCE_ATTR
from napari_wpp.jobs.zarr_layout import (
    grown_axes,
    grown_pixel_size,
    partial_path,
    record_progress,
    replace_zarr,
    sample_zarr,
    slab_chunks,
    superresolve_zarr,
)

__all__ = [
    "SAMPLE_SLICES",
    "NormalisationChosen",
    "OutputWritten",
    "PredictSource",
    "PredictTarget",
    "input_normalisation",
    "percentile_sample",
    "predict_job",
    "suffixed_path",
]

#: Slices whose percentiles normalise a lazily read float input.
SAMPLE_SLICES = 16


# --------------------------------------------------------------------------- inputs, outputs
@dataclass(frozen=True)
class PredictSource:
    """What a prediction reads.

    Attributes
    ----------
    data
        2D image or 3D stack: a numpy array, or a lazy zarr/dask array.
    name
        Its name in the provenance (a resolved path, or a layer's name).
    zarr_path
        The zarr array ``data`` comes from: read slab by slab into a zarr output.
    pixel_size, unit
        Physical size of one pixel (one value per axis, or the last two) and its unit.
    volume
        The whole volume ``data`` is cut from (a slice, a region), whose percentiles
        normalise a float input; ``None``: ``data`` itself.
    """

    data: Any
    name: str
    zarr_path: Path | None = None
    pixel_size: tuple[float, ...] | None = None
    unit: str | None = None
    volume: Any = None

    def normalisation(self, recorded: Mapping[str, Any] | None) -> tuple[Any, str]:
        """:func:`input_normalisation` of this input (of its ``volume`` when given)."""
        whole = self.data if self.volume is None else self.volume
        return input_normalisation(self.data.dtype, recorded, whole)


@dataclass(frozen=True)
class PredictTarget:
    """Where a prediction goes.

    Attributes
    ----------
    path
        ``None`` (in memory: the finished event carries the result), a ``.tif``/``.tiff``
        file or a ``.zarr`` array. A WPPFlow's std (and samples) go next to it, see
        :meth:`paths`.
    provenance
        Extra provenance of zarr outputs (e.g. ``model_file``).
    """

    path: Path | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)

    @property
    def zarr(self) -> bool:
        """Whether the output is a zarr array."""
        return self.path is not None and self.path.suffix.lower() == ".zarr"

    def paths(self, keep_samples: bool, calibrated: bool = False) -> dict[str, Path]:
        """A WPPFlow's outputs: ``mean`` (the path), ``std`` (calibrated with ``calibrated``,
        the raw one then in ``raw_std``) and, if kept, ``samples``."""
        assert self.path is not None
        paths = {"mean": self.path, "std": suffixed_path(self.path, "std")}
        if calibrated:
            paths["raw_std"] = suffixed_path(self.path, "raw_std")
        if keep_samples:
            paths["samples"] = suffixed_path(self.path, "samples")
        return paths


def suffixed_path(out: Path, label: str) -> Path:
    """``<OUT stem>_<label><ext>`` next to ``out``."""
    return out.with_name(f"{out.stem}_{label}{out.suffix}")


@dataclass(frozen=True)
class NormalisationChosen:
    """First event of a job: the input's normalisation (a dict) and how it was chosen."""

    normalisation: dict[str, Any]
    how: str


@dataclass(frozen=True)
class OutputWritten:
    """Last event of a job that wrote files: ``{"result" | "mean" | "std" | ...: path}``."""

    paths: dict[str, Path]


# --------------------------------------------------------------------------- normalisation
def percentile_sample(data: Any) -> np.ndarray:
    """What a float input's percentiles are taken of: the whole of an in-memory array (or of
    a 2D image), up to :data:`SAMPLE_SLICES` evenly spaced slices along axis 0 of a lazy one."""
    if isinstance(data, np.ndarray) or len(data.shape) == 2:
        return np.asarray(data[...])
    count = int(data.shape[0])
    picks = np.unique(np.linspace(0, count - 1, min(SAMPLE_SLICES, count)).astype(int))
    return np.stack([np.asarray(data[int(i)]) for i in picks])


def input_normalisation(
    dtype: Any, recorded: Mapping[str, Any] | None, data: Any
) -> tuple[Any, str]:
    """The normalisation of an input and a short description of how it was chosen.

    Parameters
    ----------
    dtype
        The input's dtype.
    recorded
        The model's recorded normalisation (a dict) or ``None``.
    data
        The input (only read for a float input without a recorded float range).
    """
    from napari_wpp.core.intensity import Normalisation

    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        return Normalisation.from_array(np.zeros(1, dtype)), f"{dtype} range"
    if dtype.kind != "f":
        raise InputError(f"input dtype {dtype} is not supported: use an integer or float image")
    try:
        recorded_kind = np.dtype(str(recorded.get("dtype"))).kind  # type: ignore[union-attr]
    except (AttributeError, TypeError):  # no (valid) normalisation recorded
        recorded_kind = None
    if recorded_kind == "f":
        norm = Normalisation.from_dict(dict(recorded))  # type: ignore[arg-type]
        return norm, f"model's range [{norm.low:g}, {norm.high:g}]"
    norm = Normalisation.from_array(percentile_sample(data))
    return norm, f"input's percentiles [{norm.low:g}, {norm.high:g}]"


# --------------------------------------------------------------------------- helpers
def _provenance(
    model: Any, source: PredictSource, axis: int | None, tile: int | None, norm: Any
) -> dict[str, Any]:
    from napari_wpp import __version__
    from napari_wpp.core.inference import model_scale

    config = getattr(model, "config", None)
    return {
        "scale": model_scale(model),
        "axis": axis,
        "source": source.name,
        "model": {
            "kind": getattr(model, "kind", type(model).__name__),
            "config": config() if callable(config) else None,
        },
        "tile": tile,
        "normalisation": norm.to_dict(),
        "version": __version__,
        "complete": False,
        "slices_done": 0,
    }


def _zarr_attrs(source: PredictSource, scale: int, grow: tuple[bool, ...], lead: int = 0) -> dict:
    """``pixel_size`` (with ``lead`` leading 1s) and ``unit`` of a zarr output."""
    attrs: dict[str, Any] = {}
    size = source.pixel_size
    if size is not None and len(size) == len(grow):
        attrs[PIXEL_SIZE_ATTR] = [1.0] * lead + grown_pixel_size(size, scale, grow)
        if source.unit:
            attrs["unit"] = source.unit
    return attrs


def _write_tiff(path: Path, array: Any, source: PredictSource, scale: int, grow: tuple) -> None:
    size = None
    if source.pixel_size is not None:
        size = tuple(grown_pixel_size(source.pixel_size[-2:], scale, grow[-2:]))
    try:
        io.write_image(path, array, pixel_size=size, unit=source.unit)
    except OSError as exc:
        reason = " ".join(str(exc).split())
        raise InputError(f"cannot write {str(path)!r} ({reason}): check the path") from exc


def _in_memory(data: Any) -> np.ndarray:
    return data if isinstance(data, np.ndarray) else np.asarray(data[...])


def _remove(paths: Mapping[str, Path]) -> None:
    for path in paths.values():
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _partial_zarrs(paths: Mapping[str, Path], zarr: bool) -> Iterator[dict[str, Path]]:
    """The ``.partial.zarr`` path of each output (none unless ``zarr``), removed on the way out.

    A partial array moved into place is popped from the dict, so only unfinished ones go.
    """
    tmps = {name: partial_path(path) for name, path in paths.items()} if zarr else {}
    _remove(tmps)
    try:
        yield tmps
    finally:
        _remove(tmps)


# --------------------------------------------------------------------------- superresolution
def _checked_and_locked(
    outputs: Sequence[Path],
    source: PredictSource,
    inputs: Sequence[tuple[str, Path | str | None]],
    events: Iterator[Any],
) -> Iterator[Any]:
    """``events``, after refusing outputs that are inputs, with the outputs' locks held."""
    from napari_wpp.io import check_not_an_input, output_lock

    check_not_an_input(outputs, [("input", source.zarr_path), *inputs])
    with contextlib.ExitStack() as locks:
        for path in outputs:
            locks.enter_context(output_lock(path))
        yield from events


def predict_job(
    spec: PredictSpec,
    model: Any,
    recorded_normalisation: Mapping[str, Any] | None,
    source: PredictSource,
    target: PredictTarget,
    stop: threading.Event | None = None,
    inputs: Sequence[tuple[str, Path | str | None]] = (),
    calibration: Any = None,
) -> Iterator[Any]:
    """Superresolve (WPPNet) or sample (WPPFlow) ``source`` into ``target`` (a generator of events).

    Both yield :class:`NormalisationChosen` first. A WPPNet then yields the core's
    ``InferenceProgress`` events and ``InferenceFinished``; a WPPFlow draws ``spec.samples``
    samples per slice at ``spec.temperature`` from ``spec.seed`` and yields
    ``SamplingProgress`` and ``SamplingFinished``. The finished event's ``result`` is ``None``
    unless the target is in memory. When files were written, :class:`OutputWritten` follows
    (``result``; for a flow ``mean``, ``std``, ``samples``: the mean and samples in the input's
    dtype, the std float32 in the input's intensity units). Bad input raises ``InputError``.

    A WPPNet that holds an LR noise model denoises its input (``spec.lr_denoise`` ``False``:
    not, on a copy of the model).

    A flow's ``calibration`` (:func:`napari_wpp.jobs.calibration.model_calibration`) makes
    ``std`` the calibrated std and keeps the raw one as ``raw_std`` (not for zarr streamed into
    zarr).

    No output may be an input (``source``'s zarr array or a file of ``inputs``, ``(what,
    path)`` pairs); the outputs' locks are held while they are written.
    """
    from napari_wpp.core.inference import is_flow

    flow = is_flow(model)
    if not spec.lr_denoise and getattr(model, "denoises", False):
        model = copy.deepcopy(model)  # the caller's model keeps its noise model
        model.set_noise_variance(np.zeros_like(model.noise_variance.cpu().numpy()))
    if not flow or (target.zarr and source.zarr_path is not None):
        calibration = None  # streamed slice by slice: the raw std only
    if target.path is None:
        outputs: list[Path] = []
    elif flow:
        outputs = list(target.paths(spec.keep_samples, calibration is not None).values())
    else:
        outputs = [target.path]

    def events() -> Iterator[Any]:
        data = source.data
        ndim = len(data.shape)
        axis = int(spec.axis) % 3 if ndim == 3 else None
        norm, how = source.normalisation(recorded_normalisation)
        yield NormalisationChosen(norm.to_dict(), how)
        grow = grown_axes(ndim, axis)
        run = _PredictRun(spec, model, source, target, stop, data, axis, grow, norm, calibration)
        yield from (_sample_events if flow else _superresolve_events)(run)

    yield from _checked_and_locked(outputs, source, inputs, events())


@dataclass(frozen=True)
class _PredictRun:
    """One prediction run, as its two kinds of event stream read it."""

    spec: PredictSpec
    model: Any
    source: PredictSource
    target: PredictTarget
    stop: threading.Event | None
    data: Any
    axis: int | None
    grow: list[bool]
    norm: Any
    calibration: Any = None


def _superresolve_events(run: _PredictRun) -> Iterator[Any]:
    """A WPPNet's events: superresolution, then the output written."""
    from napari_wpp.core import inference

    spec, model, source, target = run.spec, run.model, run.source, run.target
    data, axis, grow, norm = run.data, run.axis, run.grow, run.norm
    common = {"tile": spec.tile, "normalisation": norm, "device": spec.device, "stop": run.stop}
    if target.path is None:
        yield from inference.superresolve(
            model, data, axis=axis or 0, batch_size=spec.batch_size, **common
        )
        return
    out = target.path
    with _partial_zarrs({"result": out}, target.zarr) as tmps:
        if target.zarr and source.zarr_path is not None:
            events = superresolve_zarr(
                model,
                source.zarr_path,
                tmps["result"],
                axis=axis or 0,
                slices_per_chunk=spec.batch_size,
                extra_provenance=dict(target.provenance),
                **common,
            )
        elif target.zarr and not isinstance(data, np.ndarray):
            events = _stream_into_zarr(
                spec, model, source, tmps["result"], norm, common, extra=target.provenance
            )
        else:
            events = inference.superresolve(
                model, _in_memory(data), axis=axis or 0, batch_size=spec.batch_size, **common
            )
        finished = yield from forward_until_finished(
            events, inference.InferenceFinished, "superresolution"
        )
        if finished.stopped_early:
            yield finished
            return
        scale = inference.model_scale(model)
        if target.zarr:
            if finished.result is not None:  # computed in memory: written now
                provenance = _provenance(model, source, axis, spec.tile, norm)
                slices = 1 if axis is None else int(data.shape[axis])
                provenance.update(target.provenance)
                provenance.update({"complete": True, "slices_done": slices})
                attrs = {**_zarr_attrs(source, scale, grow), PROVENANCE_ATTR: provenance}
                result = finished.result
                chunks = slab_chunks(result.shape, list(grow), result.dtype, spec.batch_size)
                path = tmps["result"]
                io.create_zarr_array(path, result.shape, result.dtype, chunks, attrs)[...] = result
            replace_zarr(tmps.pop("result"), out)
            yield dataclasses.replace(finished, result=None)
        else:
            _write_tiff(out, finished.result, source, scale, grow)
            yield finished
        yield OutputWritten({"result": out})


def _stream_into_zarr(
    spec: PredictSpec,
    model: Any,
    source: PredictSource,
    path: Path,
    norm: Any,
    common: dict[str, Any],
    *,
    extra: Mapping[str, Any],
) -> Iterator[Any]:
    """Superresolve a lazy (non-zarr) input slab by slab into a new zarr array at ``path``."""
    from napari_wpp.core import inference

    data = source.data
    axis = int(spec.axis) % 3 if len(data.shape) == 3 else None
    scale = inference.model_scale(model)
    grow = grown_axes(len(data.shape), axis)
    shape = inference.output_shape(tuple(data.shape), scale, axis or 0)
    dtype = inference.output_dtype(data.dtype, norm)
    provenance = _provenance(model, source, axis, spec.tile, norm)
    provenance.update(extra)
    attrs = _zarr_attrs(source, scale, grow)
    chunks = slab_chunks(shape, list(grow), dtype, spec.batch_size)
    attrs[PROVENANCE_ATTR] = provenance
    target = io.create_zarr_array(path, shape, dtype, chunks, attrs)
    events = inference.superresolve_into(
        model, data, target, axis=axis or 0, slices_per_chunk=spec.batch_size, **common
    )
    yield from record_progress(events, target, provenance)


# --------------------------------------------------------------------------- sampling
def _sample_events(run: _PredictRun) -> Iterator[Any]:
    """A WPPFlow's events: posterior sampling, then the mean, std (and samples) written."""
    from napari_wpp.core import inference
    from napari_wpp.jobs.calibration import calibrated_finished

    spec, model, source, target = run.spec, run.model, run.source, run.target
    data, axis, grow, norm = run.data, run.axis, run.grow, run.norm
    common = {
        "axis": axis or 0,
        "temperature": spec.temperature,
        "seed": spec.seed,
        "batch_size": spec.batch_size,
        "tile": spec.tile,
        "normalisation": norm,
        "device": spec.device,
        "stop": run.stop,
    }
    calibrated = run.calibration is not None
    paths = {} if target.path is None else target.paths(spec.keep_samples, calibrated)
    with _partial_zarrs(paths, target.zarr) as tmps:
        if target.zarr and source.zarr_path is not None:
            events = sample_zarr(
                model,
                source.zarr_path,
                tmps["mean"],
                tmps["std"],
                spec.samples,
                samples_path=tmps.get("samples"),
                extra_provenance=dict(target.provenance),
                **common,
            )
        else:
            keep = spec.keep_samples if target.path is None else "samples" in paths
            events = inference.sample_volume(
                model, _in_memory(data), spec.samples, keep_samples=keep, **common
            )
        finished = yield from forward_until_finished(events, inference.SamplingFinished, "sampling")
        unit = float(norm.high) - float(norm.low)
        finished = calibrated_finished(finished, run.calibration, unit, axis or 0)
        if finished.stopped_early or target.path is None:
            yield finished
            return
        scale = inference.model_scale(model)
        result = finished.result
        arrays = (
            {}
            if result is None
            else {
                "mean": result.mean,
                "std": result.std,
                "samples": result.samples,
                "raw_std": getattr(result, "raw_std", None),
            }
        )
        if target.zarr:
            if result is not None:  # computed in memory: written now
                slices = 1 if axis is None else int(data.shape[axis])
                for name in paths:
                    _write_statistic_zarr(
                        tmps[name],
                        arrays[name],
                        name,
                        spec,
                        model,
                        source,
                        norm,
                        grow,
                        extra={**target.provenance, "slices_done": slices},
                    )
            for name, path in paths.items():
                replace_zarr(tmps.pop(name), path)
            yield dataclasses.replace(finished, result=None)
        else:
            for name, path in paths.items():
                _write_tiff(path, arrays[name], source, scale, grow)
            yield finished
        yield OutputWritten(dict(paths))


def _write_statistic_zarr(
    path: Path,
    array: np.ndarray,
    statistic: str,
    spec: PredictSpec,
    model: Any,
    source: PredictSource,
    norm: Any,
    grow: tuple[bool, ...],
    *,
    extra: Mapping[str, Any],
) -> None:
    """Write one statistic of an in-memory sampling run with the zarr layout of sample_zarr."""
    from napari_wpp.core.inference import model_scale

    scale = model_scale(model)
    axis = None if len(grow) == 2 else grow.index(False)
    lead = 1 if statistic == "samples" else 0
    provenance = _provenance(model, source, axis, spec.tile, norm)
    provenance["model"]["kind"] = "wppflow"
    provenance.update(
        {
            "statistic": statistic,
            "k": spec.samples,
            "temperature": float(spec.temperature),
            "seed": int(spec.seed),
            **extra,
            "complete": True,
        }
    )
    attrs = {**_zarr_attrs(source, scale, grow, lead), PROVENANCE_ATTR: provenance}
    chunks = (1,) * lead + slab_chunks(array.shape[lead:], list(grow), array.dtype, 1)
    io.create_zarr_array(path, array.shape, array.dtype, chunks, attrs)[...] = array
