"""Patch transport jobs: fit the statistics, apply them to an image or a volume, and the
readouts without ground truth.

One rule for both faces (``napari-wpp transport``/``evaluate``/``predict --transport`` and the
perception ↔ fidelity panel of the widgets):

* **Intensities** (:func:`transport_normalisation`): integer images use their dtype's range;
  float images the float range recorded in the transport file, else [0, 1] when they lie
  there, else their own 0.1/99.9 percentiles. Statistics live on that [0, 1] scale.
* **Slices**: a 3D stack is transported slice by slice along ``axis`` with one map; ``alpha``
  ``None`` chooses α on its middle slice (:func:`auto_alpha`) and uses it for every slice.
* **Outputs**: in memory, a TIFF, or a zarr array written slab by slab to
  ``.<name>.<pid>.partial.zarr`` and moved into place when complete (zarr inputs are read
  one slab at a time: the volume never has to fit in memory).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_wpp.core.config import ReadoutSpec, TransportSpec
from napari_wpp.core.errors import InputError
from napari_wpp.io import PROVENANCE_ATTR
from napari_wpp.jobs.notices import JobProgress

__all__ = [
    "TransportApplied",
    "TransportFitted",
    "apply_transport_job",
    "auto_alpha",
    "fit_transport_job",
    "lr_normalisation",
    "measure_readouts",
    "transport_normalisation",
    "transport_slice",
]

#: α values on which the automatic α is searched (the blend distance is exact on each).
ALPHA_GRID = np.linspace(0.0, 1.0, 41)


@dataclass(frozen=True)
class TransportFitted:
    """Last event of a fit: the :class:`~napari_wpp.io.transport.TransportFile` (and where
    it was written, ``None`` when kept in memory)."""

    content: Any
    path: Path | None
    elapsed_s: float


@dataclass(frozen=True)
class TransportApplied:
    """Last event of an application: the result (in memory only), the α used and how."""

    result: np.ndarray | None
    alpha: float
    alpha_how: str
    path: Path | None
    elapsed_s: float
    stopped_early: bool = False


# --------------------------------------------------------------------------- intensities
def transport_normalisation(data: Any, recorded: Mapping[str, Any] | None = None) -> Any:
    """The :class:`~napari_wpp.core.intensity.Normalisation` of an image for a transport."""
    from napari_wpp.core.intensity import Normalisation
    from napari_wpp.jobs.predict import percentile_sample

    dtype = np.dtype(data.dtype)
    if dtype.kind in "ui":
        return Normalisation.from_array(np.zeros(1, dtype))
    if dtype.kind != "f":
        raise InputError(f"image dtype {dtype} is not supported: use an integer or float image")
    if isinstance(recorded, Mapping) and np.dtype(str(recorded.get("dtype"))).kind == "f":
        return Normalisation(float(recorded["low"]), float(recorded["high"]), dtype.name)
    sample = percentile_sample(data)
    if float(sample.min()) >= 0.0 and float(sample.max()) <= 1.0:
        return Normalisation(0.0, 1.0, dtype.name)
    return Normalisation.from_array(sample)


def _slices(data: Any, axis: int) -> Iterator[np.ndarray]:
    """The 2D slices of a 2D image (one) or a 3D stack along ``axis``, read one at a time."""
    if len(data.shape) == 2:
        yield np.asarray(data[...])
        return
    index: list[Any] = [slice(None)] * 3
    for i in range(int(data.shape[axis])):
        index[axis] = i
        yield np.asarray(data[tuple(index)])


# --------------------------------------------------------------------------- fit
def fit_transport_job(
    spec: TransportSpec,
    sources: Sequence[Any],
    reference: Any,
    out: Path | None = None,
    provenance: Mapping[str, Any] | None = None,
    stop: threading.Event | None = None,
    axis: int = 0,
) -> Iterator[Any]:
    """Fit the source (``sources``: images or stacks, any dtype) and target (``reference``)
    patch statistics; write them to ``out`` when given (a generator of events).

    Yields :class:`JobProgress` per slice, then :class:`TransportFitted`.
    """
    from napari_wpp.core.patch_distance import reference_band
    from napari_wpp.core.transport import GaussianTransport, PatchMoments
    from napari_wpp.io.transport import TransportFile, write_transport

    start = time.perf_counter()
    if not sources:
        raise InputError("no source images: give at least one superresolved image (--source)")
    norm = transport_normalisation(sources[0])
    total = sum(1 if len(s.shape) == 2 else int(s.shape[axis]) for s in sources)
    moments = PatchMoments(spec.patch_size)
    done = 0
    for source in sources:
        for image in _slices(source, axis):
            if stop is not None and stop.is_set():
                raise InputError("the fit was stopped: nothing was written")
            moments.add(norm.apply(image))
            done += 1
            yield JobProgress(done, total, "source slices")
    ref_norm = transport_normalisation(reference)
    ref01 = ref_norm.apply(np.asarray(reference[...]))
    target = PatchMoments(spec.patch_size).add(ref01).statistics()
    transport = GaussianTransport.fit(moments.statistics(), target, spec.floor)
    band = reference_band(ref01, spec.patch_size)
    from napari_wpp import __version__

    content = TransportFile(
        transport,
        normalisation=norm.to_dict(),
        band=band.to_dict(),
        provenance={
            **dict(provenance or {}),
            "source_patches": transport.source.count,
            "target_patches": transport.target.count,
            "distance_from_identity": transport.distance_from_identity(),
            "version": __version__,
        },
    )
    if out is not None:
        from napari_wpp.io import explained_write_errors

        with explained_write_errors(out):
            write_transport(out, content)
    yield TransportFitted(content, out, time.perf_counter() - start)


# --------------------------------------------------------------------------- apply
def transport_slice(content: Any, image01: np.ndarray) -> np.ndarray:
    """The fully transported (α = 0) float32 version of one [0, 1] slice."""
    return content.transport.apply(image01)


def auto_alpha(content: Any, image01: np.ndarray, transported01: np.ndarray) -> float:
    """The largest α in [0, 1] whose patch distance to the target meets the middle of the
    reference's band (recorded in the transport file); 0.75 when the file has no band."""
    from napari_wpp.core.patch_distance import blend_distances, default_alpha

    band = content.band or {}
    middle = (band.get("gelbrich") or {}).get("middle")
    if not isinstance(middle, (int, float)):
        return 0.75
    target = content.transport.target
    curve = blend_distances(image01, transported01, target, ALPHA_GRID)
    return default_alpha(ALPHA_GRID, curve, float(middle))


def finish_slice(
    image01: np.ndarray,
    transported01: np.ndarray,
    alpha: float,
    lr01: np.ndarray | None = None,
    operator: Any = None,
    data_steps: int = 0,
    noise: float | None = None,
) -> np.ndarray:
    """Blend at ``alpha``, then (with an LR slice and steps) the data-consistency steps,
    clipped to [0, 1]."""
    from napari_wpp.core.transport import blend, data_consistency

    out = blend(image01, transported01, alpha)
    if data_steps and lr01 is not None and operator is not None:
        out = data_consistency(out, lr01, operator, data_steps, noise)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def apply_transport_job(
    spec: TransportSpec,
    content: Any,
    data: Any,
    out: Path | None = None,
    axis: int = 0,
    lr: Any = None,
    operator: Any = None,
    noise: float | None = None,
    attrs: Mapping[str, Any] | None = None,
    stop: threading.Event | None = None,
) -> Iterator[Any]:
    """Transport ``data`` (a 2D image or a 3D stack, any dtype; numpy, zarr or dask) at
    ``spec.alpha`` into memory (``out`` ``None``), a TIFF or a zarr array.

    With ``lr`` (the LR image or stack, same slicing) and ``operator``, ``spec.data_steps``
    data-consistency steps follow the blend, stopped at ``noise``. Yields
    :class:`JobProgress` per slice, then :class:`TransportApplied`. The output has the
    input's dtype and intensity range.
    """
    from napari_wpp.core.transport import check_alpha

    start = time.perf_counter()
    ndim = len(data.shape)
    if ndim not in (2, 3):
        raise InputError(f"input has shape {tuple(data.shape)}: give a 2D image or a 3D stack")
    axis = int(axis) % 3 if ndim == 3 else 0
    if lr is not None and ndim == 3 and int(lr.shape[axis]) != int(data.shape[axis]):
        raise InputError(
            f"the LR stack has {lr.shape[axis]} slices along axis {axis} but the input has "
            f"{data.shape[axis]}: give the LR stack of this prediction"
        )
    norm = transport_normalisation(data, content.normalisation)
    count = 1 if ndim == 2 else int(data.shape[axis])
    if spec.alpha is None:
        middle = count // 2
        probe = norm.apply(_slice_at(data, axis, middle))
        alpha = auto_alpha(content, probe, transport_slice(content, probe))
        how = "auto: patch distance at the middle of the reference's band"
    else:
        alpha, how = check_alpha(spec.alpha), "given"
    kept = dict(getattr(data, "attrs", None) or {})  # a zarr input's pixel size, provenance
    record = {
        "alpha": alpha,
        "alpha_how": how,
        "data_steps": spec.data_steps,
        "reference": content.provenance.get("reference"),
    }
    provenance = dict(kept.get(PROVENANCE_ATTR) or {})
    provenance["transport"] = record
    writer = _Writer(
        out, data, norm, axis, {**kept, **dict(attrs or {}), PROVENANCE_ATTR: provenance}
    )
    try:
        for i in range(count):
            if stop is not None and stop.is_set():
                writer.discard()
                yield TransportApplied(None, alpha, how, None, time.perf_counter() - start, True)
                return
            image01 = norm.apply(_slice_at(data, axis, i))
            lr01 = None if lr is None else _lr_slice(lr, axis, i, ndim, norm)
            moved = finish_slice(
                image01,
                transport_slice(content, image01),
                alpha,
                lr01,
                operator,
                spec.data_steps,
                noise,
            )
            writer.put(i, norm.invert(moved))
            yield JobProgress(i + 1, count, "slices")
        result = writer.finish()
    except BaseException:
        writer.discard()
        raise
    yield TransportApplied(result, alpha, how, out, time.perf_counter() - start)


def _slice_at(data: Any, axis: int, i: int) -> np.ndarray:
    if len(data.shape) == 2:
        return np.asarray(data[...])
    index: list[Any] = [slice(None)] * 3
    index[axis] = i
    return np.asarray(data[tuple(index)])


def _lr_slice(lr: Any, axis: int, i: int, ndim: int, norm: Any) -> np.ndarray:
    """LR slice ``i`` on the [0, 1] scale (:func:`lr_normalisation`)."""
    image = _slice_at(lr, axis, i) if ndim == 3 else np.asarray(lr[...])
    return lr_normalisation(image, norm).apply(image, clip=False)


def lr_normalisation(lr: Any, prediction: Any) -> Any:
    """The normalisation of an LR image beside a prediction normalised by ``prediction``.

    Integers use their dtype's range; floats share the prediction's range when it is a float
    one (a prediction has its input's intensities), else they are taken as [0, 1] when they
    lie there and on the prediction's integer scale otherwise.
    """
    from napari_wpp.core.intensity import Normalisation

    dtype = np.dtype(lr.dtype)
    if dtype.kind != "f":
        return Normalisation.from_array(np.zeros(1, dtype))
    if np.dtype(prediction.dtype).kind == "f":
        return Normalisation(prediction.low, prediction.high, dtype.name)
    sample = np.asarray(lr)
    if float(sample.min()) >= 0.0 and float(sample.max()) <= 1.0:
        return Normalisation(0.0, 1.0, dtype.name)
    return Normalisation(prediction.low, prediction.high, dtype.name)


class _Writer:
    """Where the transported slices go: memory (then a TIFF) or a zarr array slab by slab."""

    def __init__(
        self, out: Path | None, data: Any, norm: Any, axis: int, attrs: Mapping[str, Any] | None
    ) -> None:
        from napari_wpp.jobs.zarr_layout import partial_path

        self.out, self.axis = out, axis
        self.zarr = out is not None and out.suffix.lower() == ".zarr"
        dtype = np.dtype(norm.dtype)
        self.shape = tuple(int(n) for n in data.shape)
        if self.zarr:
            from napari_wpp import io
            from napari_wpp.jobs.zarr_layout import slab_chunks

            assert out is not None
            self.tmp = partial_path(out)
            grow = [i != axis for i in range(len(self.shape))] if len(self.shape) == 3 else None
            chunks = slab_chunks(self.shape, grow, dtype, 1) if grow else self.shape
            self.array = io.create_zarr_array(
                self.tmp, self.shape, dtype, chunks, dict(attrs or {})
            )
        else:
            self.array = np.empty(self.shape, dtype)

    def put(self, i: int, image: np.ndarray) -> None:
        if len(self.shape) == 2:
            self.array[...] = image
            return
        index: list[Any] = [slice(None)] * 3
        index[self.axis] = i
        self.array[tuple(index)] = image

    def finish(self) -> np.ndarray | None:
        if self.zarr:
            from napari_wpp.jobs.zarr_layout import replace_zarr

            assert self.out is not None
            replace_zarr(self.tmp, self.out)
            return None
        if self.out is not None:
            from napari_wpp import io

            with io.explained_write_errors(self.out):
                io.write_image(self.out, self.array)
            return None
        return self.array

    def discard(self) -> None:
        if self.zarr and self.tmp.exists():
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------- readouts
def measure_readouts(
    spec: ReadoutSpec,
    image01: np.ndarray,
    lr01: np.ndarray | None = None,
    operator: Any = None,
    reference01: np.ndarray | None = None,
) -> dict[str, Any]:
    """Readouts of an estimate ([0, 1] scale) without ground truth.

    Returns a dict with ``data_rms``, ``noise`` and ``noise_source`` (with ``lr01`` and
    ``operator``) and ``patch_distance`` (``gelbrich``, ``sliced``) and ``reference_band``
    (``ReferenceBand.to_dict()``) (with ``reference01``); absent parts are ``None``.
    """
    from napari_wpp.core.patch_distance import (
        data_rms,
        estimate_noise,
        gelbrich_distance,
        reference_band,
        sample_patches,
        sliced_wasserstein,
    )
    from napari_wpp.core.transport import patch_statistics

    out: dict[str, Any] = {
        "data_rms": None,
        "noise": None,
        "noise_source": None,
        "patch_distance": None,
        "reference_band": None,
        "patch_size": spec.patch_size,
    }
    if lr01 is not None and operator is not None:
        out["data_rms"] = data_rms(image01, lr01, operator)
        if spec.noise is None:
            out["noise"], out["noise_source"] = estimate_noise(lr01), "estimated from LR"
        else:
            out["noise"], out["noise_source"] = float(spec.noise), "given"
    if reference01 is not None:
        p = spec.patch_size
        stats = patch_statistics(image01, p), patch_statistics(reference01, p)
        picked = (
            sample_patches(image01, p, spec.samples, spec.seed),
            sample_patches(reference01, p, spec.samples, spec.seed + 1),
        )
        out["patch_distance"] = {
            "gelbrich": gelbrich_distance(*stats),
            "sliced": sliced_wasserstein(*picked, spec.projections, seed=spec.seed),
        }
        band = reference_band(reference01, p, spec.projections, spec.samples, spec.seed)
        out["reference_band"] = band.to_dict()
    return out
