"""Superresolution with a WPPNet: slices, tiles, batches, dask volumes and array targets."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from napari_wpp.core.devices import resolve_device
from napari_wpp.core.errors import InputError
from napari_wpp.core.events import run_to_end
from napari_wpp.core.inference.common import (
    InferenceFinished,
    InferenceProgress,
    ModelSpec,
    _cached_model,
    _check_axis,
    _check_batch_size,
    _check_layout,
    _check_network,
    _check_shape,
    _check_tiling,
    _forward_in_tiles,
    _inference_copy,
    model_scale,
    output_shape,
)
from napari_wpp.core.intensity import Normalisation, check_finite

if TYPE_CHECKING:
    import dask.array


def _check_network_tiling(
    model: nn.Module, tile: int | None, halo: int | None
) -> tuple[int, int | None, int]:
    """The scale of a network (not a flow), the checked ``tile`` and its halo (LR pixels)."""
    _check_network(model)
    scale = model_scale(model)
    return (scale, *_check_tiling(model, tile, halo))


def _tiled_forward(net: nn.Module, x: Tensor, scale: int, tile: int | None, halo: int) -> Tensor:
    """``net(x)`` for ``x`` of shape ``(B, 1, H, W)``, tile by tile when ``tile`` is set."""

    def forward(a0: int, a1: int, b0: int, b1: int) -> Tensor:
        return net(x[:, :, a0:a1, b0:b1])

    return _forward_in_tiles(forward, tuple(x.shape[2:]), scale, tile, halo)


def _run_batch(
    net: nn.Module,
    stack: np.ndarray,
    scale: int,
    tile: int | None,
    halo: int,
    device: torch.device,
    normalisation: Normalisation | None,
    out_dtype: np.dtype,
) -> np.ndarray:
    """Superresolve slices ``stack`` ``(b, h, w)`` in the raw dtype to ``(b, q·h, q·w)``."""
    if normalisation is not None:
        x = np.ascontiguousarray(normalisation.apply(stack))
    else:
        check_finite(stack)
        x = np.ascontiguousarray(stack, dtype=np.float32)
    t = torch.from_numpy(x)[:, None].to(device)
    if device.type == "cpu":
        t = t.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        y = _tiled_forward(net, t, scale, tile, halo)[:, 0]
    y = y.to("cpu").numpy()
    if normalisation is not None:
        return normalisation.invert(y).astype(out_dtype, copy=False)
    return y


def superresolve_slice(
    model: nn.Module,
    image2d: np.ndarray,
    tile: int | None = None,
    halo: int | None = None,
    device: str | torch.device = "auto",
) -> np.ndarray:
    """Superresolve one normalised 2D slice.

    Parameters
    ----------
    model
        Model mapping ``(B, 1, h, w)`` to ``(B, 1, q·h, q·w)`` (e.g. a WPPNet); not modified.
    image2d
        ``(h, w)`` float image, normalised to ``[0, 1]``.
    tile
        ``None``: the whole slice at once. Otherwise square tiles of ``tile`` LR pixels, each
        cut with a halo (clipped at the image border) and cropped after the model.
    halo
        Halo of the tiles in LR pixels, at least the receptive radius (its default).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ...

    Returns
    -------
    numpy.ndarray
        ``(q·h, q·w)`` float32; tiled and whole-slice runs agree to float32 rounding.
    """
    image = np.asarray(image2d)
    if image.ndim != 2 or image.size == 0:
        raise InputError(f"superresolve_slice needs a 2D image, got shape {image.shape}")
    if image.dtype.kind != "f":
        raise InputError(
            f"superresolve_slice needs a normalised float image, got {image.dtype}: use "
            "superresolve(..., normalisation=...) for raw intensities"
        )
    scale, tile, halo_px = _check_network_tiling(model, tile, halo)
    dev = resolve_device(device)
    net = _inference_copy(model, dev)
    return _run_batch(net, image[None], scale, tile, halo_px, dev, None, np.dtype(np.float32))[0]


def superresolve(
    model: nn.Module,
    volume: np.ndarray,
    axis: int = 0,
    tile: int | None = None,
    batch_size: int = 4,
    device: str | torch.device = "auto",
    normalisation: Normalisation | None = None,
    stop: threading.Event | None = None,
    halo: int | None = None,
) -> Iterator[InferenceProgress | InferenceFinished]:
    """Superresolve a 2D image or a 3D volume slice by slice (a generator of events).

    Parameters
    ----------
    model
        Model mapping ``(B, 1, h, w)`` to ``(B, 1, q·h, q·w)``; it is copied to ``device``, the
        caller's model is not modified.
    volume
        ``(H, W)`` image or 3D volume; raw dtype with ``normalisation``, else normalised floats.
        Never modified.
    axis
        Axis of a volume along which it is cut into slices (that axis keeps its size, the two
        others grow ``q`` times). Ignored for 2D images.
    tile, halo
        Tiled processing of every slice (see :func:`superresolve_slice`).
    batch_size
        Slices per forward pass.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    normalisation
        Applied to the input (raw dtype → ``[0, 1]``) and inverted on the output (back to the
        input dtype, rounded and clipped for integers). ``None``: output float32.
    stop
        Checked before every batch; when set the run ends with
        ``InferenceFinished(result=None, stopped_early=True)`` (no partial array).

    Yields
    ------
    InferenceProgress
        After every batch (``done``/``total`` count slices).
    InferenceFinished
        Last event; ``result`` has the input's layout with the superresolved axes ``q`` times
        larger. Bad input raises :class:`InputError` at the first ``next()``.
    """
    start = time.perf_counter()
    vol = np.asarray(volume)
    out_dt, ax = _check_layout(vol.shape, vol.dtype, axis, normalisation)
    scale, tile, halo_px = _check_network_tiling(model, tile, halo)
    bs = _check_batch_size(batch_size)
    dev = resolve_device(device)

    out = np.empty(output_shape(vol.shape, scale, ax), dtype=out_dt)
    if vol.ndim == 2:
        src, dst = vol[None], out[None]
    else:
        src, dst = np.moveaxis(vol, ax, 0), np.moveaxis(out, ax, 0)
    total = src.shape[0]
    net = _inference_copy(model, dev)
    for i in range(0, total, bs):
        if stop is not None and stop.is_set():
            yield InferenceFinished(None, time.perf_counter() - start, True)
            return
        j = min(i + bs, total)
        dst[i:j] = _run_batch(net, src[i:j], scale, tile, halo_px, dev, normalisation, out_dt)
        yield InferenceProgress(j, total, time.perf_counter() - start)
    yield InferenceFinished(out, time.perf_counter() - start, False)


#: :func:`superresolve` run to the end: the superresolved array (same parameters).
run_superresolve = run_to_end(superresolve, InferenceFinished, "run_superresolve")


# --------------------------------------------------------------------------- dask


def _superresolve_block(
    block: np.ndarray,
    spec: ModelSpec,
    *,
    axis: int,
    tile: int | None,
    halo: int,
    normalisation: dict[str, Any] | None,
    device: str,
    out_dtype: str,
) -> np.ndarray:
    """Block function of :func:`superresolve_dask`: superresolve the slices of one chunk."""
    net = _cached_model(spec, device)
    norm = Normalisation.from_dict(normalisation) if normalisation is not None else None
    dev = resolve_device(device)
    scale = int(spec.config["scale"])
    if block.ndim == 2:
        stack = block[None]
    else:
        stack = np.moveaxis(block, axis, 0)
    out = _run_batch(net, stack, scale, tile, halo, dev, norm, np.dtype(out_dtype))
    if block.ndim == 2:
        return out[0]
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def superresolve_dask(
    model: nn.Module,
    array: dask.array.Array,
    axis: int = 0,
    tile: int | None = None,
    normalisation: Normalisation | None = None,
    device: str = "cpu",
    halo: int | None = None,
    slices_per_chunk: int = 1,
) -> dask.array.Array:
    """A lazy dask array of the superresolved volume (one task per chunk of whole slices).

    Parameters
    ----------
    model
        A model from :mod:`napari_wpp.core.models` (it needs ``kind`` and ``config()``). Its
        weights are copied to CPU numpy arrays and rebuilt in each worker process (cached), so
        threaded, process and ``dask.distributed`` schedulers all work.
    array
        2D or 3D dask array (a numpy array is wrapped). It is rechunked to ``slices_per_chunk``
        slices along ``axis`` and the full extent on the other axes (a 2D image is one chunk);
        slices too large for memory at once should use ``tile``.
    axis, tile, halo, normalisation
        As in :func:`superresolve`.
    device
        Device used inside the workers (``"cpu"`` by default, ``"auto"`` picks per worker).
    slices_per_chunk
        Slices per chunk and forward pass.

    Returns
    -------
    dask.array.Array
        Chunks ``q`` times larger on the two superresolved axes; dtype of the input with a
        normalisation, float32 without.
    """
    import dask
    import dask.array as da

    if not isinstance(array, da.Array):
        array = da.asarray(array)
    out_dt, ax = _check_layout(array.shape, array.dtype, axis, normalisation)
    scale, tile, halo_px = _check_network_tiling(model, tile, halo)
    per_chunk = _check_batch_size(slices_per_chunk)
    if str(device) != "auto":
        resolve_device(device)  # fail early on a device this machine lacks
    spec = ModelSpec.from_model(model)
    if spec.config.get("scale") != scale:
        raise InputError(f"model config {spec.config} lacks its scale {scale}: fix config()")

    if array.ndim == 2:
        arr = array.rechunk(-1)
        chunks: tuple[tuple[int, ...], ...] = ((scale * array.shape[0],), (scale * array.shape[1],))
    else:
        arr = array.rechunk({i: (per_chunk if i == ax else -1) for i in range(3)})
        chunks = tuple(
            c if i == ax else tuple(scale * n for n in c) for i, c in enumerate(arr.chunks)
        )
    spec_key = dask.delayed(spec, name=f"napari-wpp-model-{spec.token}", traverse=False)
    return da.map_blocks(
        _superresolve_block,
        arr,
        spec_key,
        chunks=chunks,
        dtype=out_dt,
        meta=np.empty((0,) * arr.ndim, dtype=out_dt),
        axis=ax,
        tile=tile,
        halo=halo_px,
        normalisation=normalisation.to_dict() if normalisation is not None else None,
        device=str(device),
        out_dtype=out_dt.name,
    )


def superresolve_into(
    model: nn.Module,
    source: Any,
    target: Any,
    axis: int = 0,
    tile: int | None = None,
    normalisation: Normalisation | None = None,
    device: str = "cpu",
    stop: threading.Event | None = None,
    scheduler: Any = None,
    halo: int | None = None,
    slices_per_chunk: int = 1,
    chunks_per_step: int = 1,
) -> Iterator[InferenceProgress | InferenceFinished]:
    """Superresolve an out-of-core volume into ``target``, slab by slab (a generator).

    Parameters
    ----------
    model
        As in :func:`superresolve_dask`.
    source
        2D/3D dask array, or an array-like that slices lazily (a zarr array, a memory map):
        it is then read slab by slab, one slab of ``slices_per_chunk`` slices per task.
    target
        Array-like of the output shape (:func:`output_shape`) and dtype (:func:`output_dtype`)
        that supports ``target[region] = values`` (e.g. a zarr array). Slabs are written in
        this process, whatever the scheduler.
    axis, tile, halo, normalisation, device, slices_per_chunk
        As in :func:`superresolve_dask`.
    stop
        Checked before every step; when set the run ends with
        ``InferenceFinished(None, elapsed, stopped_early=True)`` and the slabs written so far
        stay in ``target``.
    scheduler
        Passed to ``dask.compute`` (``None``: dask's default or the active distributed client;
        ``"synchronous"``, ``"threads"``, a ``distributed.Client``, ...).
    chunks_per_step
        Chunks computed together per step (use the number of workers for parallelism); memory
        is bounded by about ``chunks_per_step`` slabs of input and output.

    Yields
    ------
    InferenceProgress
        After every step (``done``/``total`` count slices).
    InferenceFinished
        Last event, with ``result=None`` (the result is in ``target``).
    """
    import dask.array as da

    start = time.perf_counter()
    shape = tuple(int(n) for n in source.shape)
    _check_shape(shape)
    ax = _check_axis(axis, len(shape))
    per_chunk = _check_batch_size(slices_per_chunk)
    step = _check_batch_size(chunks_per_step)
    if isinstance(source, da.Array):
        src = source
    else:
        if len(shape) == 2:
            read_chunks: tuple[int, ...] = shape
        else:
            read_chunks = tuple(per_chunk if i == ax else n for i, n in enumerate(shape))
        src = da.from_array(source, chunks=read_chunks, asarray=True, lock=False)
    result = superresolve_dask(
        model, src, ax, tile, normalisation, device, halo, slices_per_chunk=per_chunk
    )
    target_shape = tuple(int(n) for n in target.shape)
    if target_shape != result.shape:
        raise InputError(
            f"target has shape {target_shape}, the result needs {result.shape}: create the "
            "target with output_shape()"
        )
    target_dtype = np.dtype(target.dtype)
    if target_dtype != result.dtype:
        raise InputError(
            f"target has dtype {target_dtype}, the result is {result.dtype}: create the target "
            "with output_dtype()"
        )
    along = 0 if len(shape) == 2 else ax
    bounds = np.concatenate([[0], np.cumsum(result.chunks[along])]).astype(int)
    total = shape[along] if len(shape) == 3 else 1
    for k in range(0, len(bounds) - 1, step):
        if stop is not None and stop.is_set():
            yield InferenceFinished(None, time.perf_counter() - start, True)
            return
        lo, hi = int(bounds[k]), int(bounds[min(k + step, len(bounds) - 1)])
        region = tuple(slice(lo, hi) if i == along else slice(None) for i in range(len(shape)))
        target[region] = result[region].compute(scheduler=scheduler)
        done = hi if len(shape) == 3 else 1
        yield InferenceProgress(done, total, time.perf_counter() - start)
    yield InferenceFinished(None, time.perf_counter() - start, False)
