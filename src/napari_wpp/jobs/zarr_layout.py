"""Zarr layout of superresolved volumes: chunks, ``pixel_size``, provenance, atomic replace.

:func:`superresolve_zarr` and :func:`sample_zarr` run the core's zarr-to-zarr generators with
the layout every face writes; :func:`partial_path` and :func:`replace_zarr` make a finished
zarr array appear at its path in one step (a stopped run leaves nothing behind).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_wpp import io
from napari_wpp.core.errors import InputError
from napari_wpp.io import PIXEL_SIZE_ATTR, PROVENANCE_ATTR
from napari_wpp.io.zarr_arrays import open_zarr_for_reading

__all__ = [
    "ZARR_CHUNK_BYTES",
    "grown_axes",
    "grown_pixel_size",
    "partial_path",
    "record_progress",
    "replace_zarr",
    "replaceable_zarr",
    "sample_zarr",
    "slab_chunks",
    "superresolve_zarr",
    "superresolved_attrs",
]

#: Largest output chunk of a superresolved zarr array (bytes, about).
ZARR_CHUNK_BYTES = 32 * 2**20


def grown_axes(ndim: int, axis: int | None = 0) -> tuple[bool, ...]:
    """Which axes a superresolution grows: both of a 2D image, all but ``axis`` of a volume.

    Parameters
    ----------
    ndim
        2 or 3.
    axis
        Slice axis of a volume (ignored for 2D).
    """
    if ndim == 2:
        return (True, True)
    if ndim != 3:
        raise InputError(f"cannot superresolve {ndim}D data: use a 2D image or a 3D stack")
    if axis is None or not -3 <= int(axis) < 3:
        raise InputError(f"slice axis {axis!r} is out of range for a 3D stack: use 0, 1 or 2")
    ax = int(axis) % 3
    return tuple(i != ax for i in range(3))


def grown_pixel_size(pixel_size: Sequence[float], scale: int, grow: Sequence[bool]) -> list[float]:
    """``pixel_size`` divided by ``scale`` on the ``grow`` axes (the trailing ones)."""
    grow = list(grow)[len(grow) - len(pixel_size) :]
    return [float(v) / scale if g else float(v) for v, g in zip(pixel_size, grow, strict=True)]


def partial_path(out: Path) -> Path:
    """The temporary path a zarr array is written to before it replaces ``out``."""
    return out.with_name(f".{out.name}.{os.getpid()}.partial.zarr")


def replaceable_zarr(path: Path) -> bool:
    """Whether ``path`` is an empty folder or a zarr array/group (zarr v2 or v3 metadata)."""
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    return any((path / name).is_file() for name in (".zarray", ".zgroup", "zarr.json"))


def replace_zarr(tmp: Path, out: Path) -> None:
    """Move the finished zarr array ``tmp`` to ``out`` (replacing a zarr array there)."""
    if out.exists():
        if not replaceable_zarr(out):
            raise InputError(f"output {str(out)!r} is not a zarr array any more: not replaced")
        shutil.rmtree(out)
    os.replace(tmp, out)


def superresolved_attrs(source: Any, scale: int, grow: list[bool]) -> dict[str, Any]:
    """``pixel_size`` (divided by ``scale`` on the ``grow`` axes) and ``unit`` of a source."""
    attrs: dict[str, Any] = {}
    src_attrs = dict(source.attrs)
    size = src_attrs.get(PIXEL_SIZE_ATTR)
    if (
        isinstance(size, (list, tuple))
        and len(size) == len(grow)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in size)
    ):
        attrs[PIXEL_SIZE_ATTR] = grown_pixel_size(size, scale, grow)
        if isinstance(src_attrs.get("unit"), str):
            attrs["unit"] = src_attrs["unit"]
    return attrs


def slab_chunks(
    shape: tuple[int, ...], grow: list[bool], dtype: np.dtype, per_chunk: int
) -> tuple[int, ...]:
    """Output chunks: slabs of ``per_chunk`` slices, halved on a superresolved axis while
    above about :data:`ZARR_CHUNK_BYTES`."""
    chunks = [n if g else per_chunk for n, g in zip(shape, grow)]
    while math.prod(chunks) * dtype.itemsize > ZARR_CHUNK_BYTES:
        i = max((i for i in range(len(shape)) if grow[i]), key=lambda i: chunks[i])
        if chunks[i] == 1:
            break
        chunks[i] = -(-chunks[i] // 2)
    return tuple(chunks)


def superresolve_zarr(
    model: Any,
    in_path: str | Path,
    out_path: str | Path,
    axis: int = 0,
    tile: int | None = None,
    normalisation: Any = None,
    device: str = "cpu",
    stop: Any = None,
    scheduler: Any = None,
    halo: int | None = None,
    slices_per_chunk: int = 1,
    chunks_per_step: int = 1,
    overwrite: bool = True,
    extra_provenance: dict[str, Any] | None = None,
) -> Iterator[Any]:
    """Superresolve a zarr volume into a new zarr array, slab by slab (a generator of events).

    The input is read lazily, one slab of ``slices_per_chunk`` slices along ``axis`` per dask
    task; memory stays bounded by about ``chunks_per_step`` slabs (see
    :func:`napari_wpp.core.inference.superresolve_into`, whose events this yields: progress
    after every step, then ``InferenceFinished(result=None, ...)``). The output gets chunks of
    ``slices_per_chunk`` along ``axis`` and ``q`` times the input chunks elsewhere, the
    attribute ``pixel_size`` of the input divided by ``q`` on the superresolved axes (with
    ``unit`` copied), and provenance under ``napari_wpp`` (scale, axis, source, model, tile,
    normalisation, version, ``complete`` and ``slices_done``, updated after every step, so a
    stopped or interrupted run is recognisable), plus ``extra_provenance``. Bad input raises
    ``InputError`` at the first ``next()``.
    """
    from napari_wpp import __version__
    from napari_wpp.core import inference

    source = open_zarr_for_reading(in_path)  # a damaged chunk names the array
    in_path, out_path = Path(in_path).expanduser(), Path(out_path).expanduser()
    if out_path.resolve() == in_path.resolve():
        raise InputError(f"output {out_path} is the input: choose another output path")
    scale = inference.model_scale(model)
    ndim = len(source.shape)
    out_shape = inference.output_shape(source.shape, scale, axis)
    out_dtype = inference.output_dtype(source.dtype, normalisation)
    ax = int(axis) % 3 if ndim == 3 else None
    grow = list(grown_axes(ndim, ax))
    attrs = superresolved_attrs(source, scale, grow)
    config = getattr(model, "config", None)
    provenance: dict[str, Any] = {
        "scale": scale,
        "axis": ax,
        "source": str(in_path.resolve()),
        "model": {
            "kind": getattr(model, "kind", type(model).__name__),
            "config": config() if callable(config) else None,
        },
        "tile": tile,
        "normalisation": normalisation.to_dict() if normalisation is not None else None,
        "version": __version__,
        "complete": False,
        "slices_done": 0,
        **(extra_provenance or {}),
    }
    attrs[PROVENANCE_ATTR] = provenance
    per_chunk = max(1, int(slices_per_chunk))
    out_chunks = slab_chunks(out_shape, grow, out_dtype, per_chunk)
    target = io.create_zarr_array(out_path, out_shape, out_dtype, out_chunks, attrs, overwrite)
    events = inference.superresolve_into(
        model,
        source,
        target,
        axis=axis,
        tile=tile,
        normalisation=normalisation,
        device=device,
        stop=stop,
        scheduler=scheduler,
        halo=halo,
        slices_per_chunk=per_chunk,
        chunks_per_step=chunks_per_step,
    )
    yield from record_progress(events, target, provenance)


def record_progress(
    events: Iterator[Any], target: Any, provenance: dict[str, Any]
) -> Iterator[Any]:
    """Pass on the events of a run into the zarr array ``target``, recording in its provenance
    attribute how far it got (``slices_done``, ``elapsed_s``) and whether it completed."""
    from napari_wpp.core import inference

    for event in events:
        if isinstance(event, inference.InferenceProgress):
            provenance["slices_done"] = event.done
        else:
            provenance["complete"] = not event.stopped_early
        provenance["elapsed_s"] = round(event.elapsed_s, 3)
        target.attrs[PROVENANCE_ATTR] = provenance
        yield event


def sample_zarr(
    model: Any,
    in_path: str | Path,
    out_path: str | Path,
    std_path: str | Path,
    k: int,
    samples_path: str | Path | None = None,
    axis: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 4,
    tile: int | None = None,
    normalisation: Any = None,
    device: str = "cpu",
    stop: Any = None,
    halo: int | None = None,
    overwrite: bool = True,
    extra_provenance: dict[str, Any] | None = None,
) -> Iterator[Any]:
    """Posterior mean and std of a zarr volume with a WPPFlow, into new zarr arrays.

    A generator of the events of :func:`napari_wpp.core.inference.sample_into`: the input is
    read one slice at a time, the mean goes to ``out_path`` (the input's dtype with a
    normalisation, else float32), the std to ``std_path`` (float32, in the input's intensity
    units) and, when ``samples_path`` is given, the ``k`` samples to a ``(k, *output shape)``
    array there (sample axis first, the mean's dtype). Every array gets chunks of one slice
    along ``axis`` (and one sample), the input's ``pixel_size`` divided by ``q`` on the
    superresolved axes, and provenance under ``napari_wpp`` (scale, axis, source, model,
    ``statistic`` (``"mean"``, ``"std"`` or ``"samples"``), ``k``, ``temperature``, ``seed``,
    tile, normalisation, version, ``complete`` and ``slices_done``, updated after every
    slice), plus ``extra_provenance``. Bad input raises ``InputError`` at the first ``next()``.
    """
    from napari_wpp import __version__
    from napari_wpp.core import inference
    from napari_wpp.core.inference import common as inference_common
    from napari_wpp.core.inference import sampling as inference_sampling
    from napari_wpp.core.inference import superresolution as inference_superresolution

    source = open_zarr_for_reading(in_path)  # a damaged chunk names the array
    in_path = Path(in_path).expanduser()
    paths = {"mean": Path(out_path).expanduser(), "std": Path(std_path).expanduser()}
    if samples_path is not None:
        paths["samples"] = Path(samples_path).expanduser()
    resolved = [p.resolve() for p in paths.values()]
    if in_path.resolve() in resolved or len(set(resolved)) != len(resolved):
        raise InputError(
            "the mean, std and samples outputs must be distinct and differ from the input: "
            "choose other output paths"
        )
    inference_common._check_flow(model)
    scale = inference.model_scale(model)
    ndim = len(source.shape)
    out_shape = inference.output_shape(source.shape, scale, axis)
    out_dtype = inference.output_dtype(source.dtype, normalisation)
    k = inference_sampling._check_count(k)
    temperature = inference_sampling._check_temperature(temperature)
    seed = inference_sampling._check_seed(seed)
    inference_superresolution._check_batch_size(batch_size)
    if inference_common._check_tile(tile) is not None or halo is not None:
        inference.model_halo(model, halo)
    ax = int(axis) % 3 if ndim == 3 else None
    grow = list(grown_axes(ndim, ax))
    config = getattr(model, "config", None)
    provenance: dict[str, Any] = {
        "scale": scale,
        "axis": ax,
        "source": str(in_path.resolve()),
        "model": {"kind": "wppflow", "config": config() if callable(config) else None},
        "k": k,
        "temperature": float(temperature),
        "seed": int(seed),
        "tile": tile,
        "normalisation": normalisation.to_dict() if normalisation is not None else None,
        "version": __version__,
        "complete": False,
        "slices_done": 0,
        **(extra_provenance or {}),
    }
    targets: dict[str, Any] = {}
    for statistic, path in paths.items():
        dtype = np.dtype(np.float32) if statistic == "std" else out_dtype
        chunks = slab_chunks(out_shape, grow, dtype, 1)
        shape = out_shape
        if statistic == "samples":
            shape, chunks = (k, *out_shape), (1, *chunks)
        attrs = superresolved_attrs(source, scale, grow)
        if statistic == "samples" and PIXEL_SIZE_ATTR in attrs:
            attrs[PIXEL_SIZE_ATTR] = [1.0, *attrs[PIXEL_SIZE_ATTR]]
        attrs[PROVENANCE_ATTR] = {**provenance, "statistic": statistic}
        targets[statistic] = io.create_zarr_array(path, shape, dtype, chunks, attrs, overwrite)
    events = inference.sample_into(
        model,
        source,
        targets["mean"],
        targets["std"],
        k,
        samples_target=targets.get("samples"),
        axis=axis,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        tile=tile,
        normalisation=normalisation,
        device=device,
        stop=stop,
        halo=halo,
    )
    slices_done = 0
    for event in events:
        update = isinstance(event, inference.SamplingFinished)
        if isinstance(event, inference.SamplingProgress) and event.slices_done != slices_done:
            slices_done, update = event.slices_done, True
        if update:
            provenance["slices_done"] = slices_done
            if isinstance(event, inference.SamplingFinished):
                provenance["complete"] = not event.stopped_early
            provenance["elapsed_s"] = round(event.elapsed_s, 3)
            for statistic, target in targets.items():
                target.attrs[PROVENANCE_ATTR] = {**provenance, "statistic": statistic}
        yield event
