"""Superresolution of images and volumes with a trained model, slice by slice.

A model maps one LR slice ``(B, 1, h, w)`` to ``(B, 1, q·h, q·w)``. Volumes are cut into
slices along one ``axis`` (that axis keeps its size; the two others grow ``q`` times), slices
are batched through the model in float32 under :func:`torch.inference_mode`, and each slice may
be processed in *tiles* of ``tile`` LR pixels. A tile is cut from the image with a halo of at
least the model's receptive radius (clipped at the image border, where the network's own zero
padding then applies exactly as in a whole-slice run), and only its central part is kept, so
tiled and whole-slice results agree to float32 rounding.

Three ways to run:

* :func:`superresolve` (generator of :class:`InferenceProgress` / :class:`InferenceFinished`)
  and :func:`run_superresolve` for numpy arrays in memory; :func:`superresolve_slice` for one
  normalised 2D slice;
* :func:`superresolve_dask` builds a lazy ``dask.array`` (one task per slab of slices; the
  model travels as plain weights and is rebuilt once per worker process), so a
  ``dask.distributed`` cluster runs it unchanged;
* :func:`superresolve_into` computes such an array slab by slab into any array-like target
  (a zarr array, a memory map, ...), with progress events and stop checks between slabs.
  :func:`napari_wpp.jobs.zarr_layout.superresolve_zarr` wraps it for zarr paths.

A WPPFlow draws posterior samples instead: :func:`sample` (generator) and :func:`run_sample`
give the pixelwise mean and standard deviation of ``k`` samples of one normalised 2D image
(streaming moments; the samples themselves only when asked), :func:`sample_volume` does the
same slice by slice for volumes in memory and :func:`sample_into` for out-of-core volumes
(:func:`napari_wpp.jobs.zarr_layout.sample_zarr` for zarr paths). The latent of every sample
is drawn for
the whole slice from ``(seed, slice index)`` first, so results do not depend on batch size or
tiling; tiles get a halo of :func:`flow_receptive_radius`.

With a :class:`~napari_wpp.core.intensity.Normalisation`, inputs of the raw dtype are mapped to
``[0, 1]`` and outputs go back to the input dtype (rounded and clipped for integers); without
one, inputs must already be normalised floats and outputs are float32. ``dask`` is imported only
by the dask functions (optional dependency).
"""

from __future__ import annotations

import copy
import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from napari_wpp.core.devices import resolve_device
from napari_wpp.core.errors import InputError
from napari_wpp.core.events import final_result
from napari_wpp.core.intensity import Normalisation, check_finite

if TYPE_CHECKING:
    import dask.array

__all__ = [
    "InferenceProgress",
    "InferenceFinished",
    "InferenceEvent",
    "ModelSpec",
    "model_scale",
    "model_halo",
    "output_shape",
    "output_dtype",
    "superresolve_slice",
    "superresolve",
    "run_superresolve",
    "superresolve_dask",
    "superresolve_into",
    "SamplingProgress",
    "SamplingFinished",
    "SamplingEvent",
    "SampleResult",
    "is_flow",
    "flow_receptive_radius",
    "slice_generator",
    "sample",
    "run_sample",
    "sample_volume",
    "run_sample_volume",
    "sample_into",
]


@dataclass(frozen=True)
class InferenceProgress:
    """Slices done so far.

    Attributes
    ----------
    done, total
        Slices superresolved and slices in all.
    elapsed_s
        Seconds since the run started.
    """

    done: int
    total: int
    elapsed_s: float


@dataclass(frozen=True, eq=False)
class InferenceFinished:
    """End of a run (always the last event).

    Attributes
    ----------
    result
        The superresolved array, or ``None`` when the run was stopped early (a partial array
        is never returned) or wrote its output elsewhere (:func:`superresolve_into`).
    elapsed_s
        Seconds the run took.
    stopped_early
        ``True`` when the ``stop`` event ended the run before the last slice.
    """

    result: np.ndarray | None
    elapsed_s: float
    stopped_early: bool


#: Events yielded by the inference generators.
InferenceEvent = InferenceProgress | InferenceFinished

# --------------------------------------------------------------------------- model helpers


def model_scale(model: nn.Module) -> int:
    """Superresolution factor ``q`` of ``model`` (its ``scale`` attribute)."""
    scale = getattr(model, "scale", None)
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise InputError(
            f"{type(model).__name__} has no integer 'scale' attribute: use a WPPNet or give the "
            "model a scale"
        )
    return int(scale)


def model_halo(model: nn.Module, halo: int | None = None) -> int:
    """Halo (LR pixels) for tiled inference: ``halo`` checked against the receptive radius.

    Parameters
    ----------
    model
        A WPPNet, or any model with a ``receptive_radius()`` method.
    halo
        Requested halo; ``None`` gives exactly the receptive radius.

    Raises
    ------
    InputError
        When ``halo`` is smaller than the receptive radius (tiles would not match the whole-slice
        result), negative, or not given for a model whose radius is unknown.
    """
    radius = _receptive_radius(model)
    if halo is None:
        if radius is None:
            raise InputError(
                f"receptive radius of {type(model).__name__} unknown: pass halo (LR pixels)"
            )
        return radius
    if isinstance(halo, bool) or not isinstance(halo, (int, np.integer)) or halo < 0:
        raise InputError(f"halo must be a non-negative integer (LR pixels), got {halo!r}")
    if radius is not None and halo < radius:
        raise InputError(
            f"halo {halo} is smaller than the model's receptive radius {radius}: use halo >= "
            f"{radius} (or leave it unset)"
        )
    return int(halo)


def _receptive_radius(model: nn.Module) -> int | None:
    from napari_wpp.core.models.wppnet import WPPNet, receptive_radius

    if isinstance(model, WPPNet):
        return receptive_radius(model)
    method = getattr(model, "receptive_radius", None)
    if callable(method):
        return int(method())
    return flow_receptive_radius(model) if is_flow(model) else None


def _check_tile(tile: int | None) -> int | None:
    if tile is None:
        return None
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise InputError(f"tile must be a positive integer (LR pixels) or None, got {tile!r}")
    return int(tile)


def _inference_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``model`` in eval mode on ``device`` (the caller's model is never touched).

    On CPU the copy uses the channels-last memory format (oneDNN's fast path for these
    convolutions: about twice the speed of the default layout, same float32 arithmetic).
    """
    net = copy.deepcopy(model).to(device=device, dtype=torch.float32)
    if device.type == "cpu":
        net = net.to(memory_format=torch.channels_last)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A model as plain data: kind, constructor config and weights as numpy arrays.

    This is what travels to dask workers (it pickles without torch objects); :meth:`build`
    rebuilds the model there. ``token`` identifies the weights (a SHA-1 of kind, config and
    every tensor).
    """

    kind: str
    config: dict[str, Any]
    state: dict[str, np.ndarray] = field(repr=False)
    token: str = ""

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelSpec:
        """Spec of a model with a ``kind`` attribute and a ``config()`` method (e.g. WPPNet)."""
        kind = getattr(model, "kind", None)
        config = getattr(model, "config", None)
        if not isinstance(kind, str) or not callable(config):
            raise InputError(
                f"{type(model).__name__} cannot be sent to dask workers: it needs a 'kind' and a "
                "config() method (use a model from napari_wpp.core.models)"
            )
        cfg = dict(config())
        state = {k: v.detach().to("cpu", copy=True).numpy() for k, v in model.state_dict().items()}
        digest = hashlib.sha1(f"{kind}{sorted(cfg.items())}".encode())
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(state[name]).tobytes())
        return cls(kind, cfg, state, digest.hexdigest())

    def build(self, device: str | torch.device = "cpu") -> nn.Module:
        """The model in eval mode on ``device`` (float32, no gradients)."""
        from napari_wpp.core.models import build_model

        net = build_model(self.kind, **self.config)
        net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.state.items()})
        return _inference_copy(net, resolve_device(device))


_MODEL_CACHE: OrderedDict[tuple[str, str], nn.Module] = OrderedDict()
_MODEL_CACHE_LOCK = threading.Lock()
_MODEL_CACHE_SIZE = 2


def _cached_model(spec: ModelSpec, device: str) -> nn.Module:
    """The model of ``spec`` on ``device``, rebuilt at most once per process (small LRU)."""
    key = (spec.token, str(device))
    with _MODEL_CACHE_LOCK:
        net = _MODEL_CACHE.get(key)
        if net is None:
            net = spec.build(device)
            _MODEL_CACHE[key] = net
            while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
                _MODEL_CACHE.popitem(last=False)
        else:
            _MODEL_CACHE.move_to_end(key)
    return net


# --------------------------------------------------------------------------- array helpers


def output_dtype(dtype: Any, normalisation: Normalisation | None) -> np.dtype:
    """Dtype of the result for an input of ``dtype``.

    The input dtype with a normalisation (an integer input must have the normalisation's own
    dtype, otherwise its range would be wrong), float32 without one (then the input must be
    floating point, already normalised to ``[0, 1]``).
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "uif":
        raise InputError(
            f"unsupported image dtype {dtype}: use an integer or floating point greyscale image"
        )
    if normalisation is None:
        if dtype.kind != "f":
            raise InputError(
                f"image has integer dtype {dtype} but no normalisation was given: pass the "
                "model's normalisation (or Normalisation.from_array(image))"
            )
        return np.dtype(np.float32)
    norm_dtype = np.dtype(normalisation.dtype)
    if dtype != norm_dtype and (dtype.kind in "ui" or norm_dtype.kind in "ui"):
        raise InputError(
            f"image dtype {dtype} differs from the normalisation's {norm_dtype}: convert the "
            f"image to {norm_dtype} or use Normalisation.from_array(image)"
        )
    return dtype


def _check_axis(axis: int, ndim: int) -> int:
    if ndim == 2:
        return 0
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -3 <= axis < 3:
        raise InputError(f"axis must be 0, 1 or 2 (or -3..-1) for a volume, got {axis!r}")
    return int(axis) % 3


def _check_shape(shape: tuple[int, ...]) -> None:
    if len(shape) not in (2, 3) or any(n == 0 for n in shape):
        raise InputError(
            f"cannot superresolve an array of shape {tuple(shape)}: need a 2D image (Y, X) or "
            "a 3D volume (Z, Y, X)"
        )


def output_shape(shape: tuple[int, ...], scale: int, axis: int = 0) -> tuple[int, ...]:
    """Shape of the result: ``scale`` times larger on every axis except ``axis`` (for 3D)."""
    shape = tuple(int(n) for n in shape)
    _check_shape(shape)
    ax = _check_axis(axis, len(shape))
    if len(shape) == 2:
        return (scale * shape[0], scale * shape[1])
    return tuple(n if i == ax else scale * n for i, n in enumerate(shape))


# --------------------------------------------------------------------------- the forward pass


def _tiled_forward(net: nn.Module, x: Tensor, scale: int, tile: int | None, halo: int) -> Tensor:
    """``net(x)`` for ``x`` of shape ``(B, 1, H, W)``, tile by tile when ``tile`` is set."""
    _, _, height, width = x.shape
    if tile is None or (tile >= height and tile >= width):
        return net(x)
    q = scale
    out: Tensor | None = None
    for y0 in range(0, height, tile):
        y1 = min(y0 + tile, height)
        a0, a1 = max(0, y0 - halo), min(height, y1 + halo)
        for x0 in range(0, width, tile):
            x1 = min(x0 + tile, width)
            b0, b1 = max(0, x0 - halo), min(width, x1 + halo)
            pred = net(x[:, :, a0:a1, b0:b1])
            if out is None:
                out = pred.new_empty((x.shape[0], pred.shape[1], q * height, q * width))
            out[:, :, q * y0 : q * y1, q * x0 : q * x1] = pred[
                :, :, q * (y0 - a0) : q * (y1 - a0), q * (x0 - b0) : q * (x1 - b0)
            ]
    assert out is not None
    return out


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
    _check_network(model)
    scale = model_scale(model)
    tile = _check_tile(tile)
    halo_px = model_halo(model, halo) if (tile is not None or halo is not None) else 0
    dev = resolve_device(device)
    net = _inference_copy(model, dev)
    return _run_batch(net, image[None], scale, tile, halo_px, dev, None, np.dtype(np.float32))[0]


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


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
    _check_shape(vol.shape)
    out_dt = output_dtype(vol.dtype, normalisation)
    ax = _check_axis(axis, vol.ndim)
    _check_network(model)
    scale = model_scale(model)
    tile = _check_tile(tile)
    halo_px = model_halo(model, halo) if (tile is not None or halo is not None) else 0
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


def run_superresolve(
    model: nn.Module,
    volume: np.ndarray,
    axis: int = 0,
    tile: int | None = None,
    batch_size: int = 4,
    device: str | torch.device = "auto",
    normalisation: Normalisation | None = None,
    halo: int | None = None,
) -> np.ndarray:
    """Run :func:`superresolve` to the end and return its result (same parameters)."""
    events = superresolve(model, volume, axis, tile, batch_size, device, normalisation, None, halo)
    return final_result(events, InferenceFinished)


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
    _check_shape(array.shape)
    out_dt = output_dtype(array.dtype, normalisation)
    ax = _check_axis(axis, array.ndim)
    _check_network(model)
    scale = model_scale(model)
    tile = _check_tile(tile)
    halo_px = model_halo(model, halo) if (tile is not None or halo is not None) else 0
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


# --------------------------------------------------------------------------- WPPFlow sampling


@dataclass(frozen=True)
class SamplingProgress:
    """Posterior samples drawn so far (after every batch of samples).

    Attributes
    ----------
    done, total
        Samples drawn and samples in all (``k`` per slice times the number of slices).
    slices_done, slices_total
        Slices whose mean and standard deviation are complete, and slices in all.
    elapsed_s
        Seconds since the run started.
    """

    done: int
    total: int
    slices_done: int
    slices_total: int
    elapsed_s: float


@dataclass(frozen=True, eq=False)
class SampleResult:
    """Pixelwise statistics of ``k`` posterior samples of a WPPFlow.

    Attributes
    ----------
    mean
        Pixelwise mean of the samples: float32 in normalised units, or the input's dtype and
        range when a normalisation was given (volumes).
    std
        Pixelwise sample standard deviation (``ddof=1``; zeros for ``k = 1``), float32, in
        normalised units or, with a normalisation, in the input's intensity units (normalised
        std times ``high − low``).
    samples
        ``(k, *mean.shape)`` samples (same units and dtype as ``mean``) when ``keep_samples``
        was asked, else ``None``.
    k, temperature, seed
        How the samples were drawn.
    """

    mean: np.ndarray
    std: np.ndarray
    samples: np.ndarray | None
    k: int
    temperature: float
    seed: int


@dataclass(frozen=True, eq=False)
class SamplingFinished:
    """End of a sampling run (always the last event).

    Attributes
    ----------
    result
        The statistics, or ``None`` when the run was stopped early or wrote its output into
        target arrays (:func:`sample_into`).
    elapsed_s
        Seconds the run took.
    stopped_early
        ``True`` when the ``stop`` event ended the run before the last sample.
    """

    result: SampleResult | None
    elapsed_s: float
    stopped_early: bool


#: Events yielded by the sampling generators.
SamplingEvent = SamplingProgress | SamplingFinished


def is_flow(model: nn.Module) -> bool:
    """Whether ``model`` is a conditional flow (a WPPFlow) rather than a network."""
    from napari_wpp.core.models.wppflow import WPPFlow

    return isinstance(model, WPPFlow)


def _check_network(model: nn.Module) -> None:
    if is_flow(model):
        raise InputError(
            f"{type(model).__name__} is a conditional flow, not a network: draw samples with "
            "napari_wpp.core.inference.sample (or sample_volume)"
        )


def _check_flow(model: nn.Module) -> None:
    if not is_flow(model):
        raise InputError(
            f"{type(model).__name__} is not a WPPFlow and cannot draw samples: use "
            "superresolve for a WPPNet, or train a WPPFlow"
        )


def _conv_radius(module: nn.Module) -> int:
    """Receptive radius (pixels of its own grid) of a chain of convolutions, summed."""
    radius = 0
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            kernel = max(layer.kernel_size)
            dilation = max(layer.dilation)
            radius += (kernel - 1) // 2 * dilation
    return radius


def flow_receptive_radius(model: nn.Module) -> int:
    """A safe bound of a WPPFlow's receptive radius in LR pixels (for tile halos).

    Every output pixel depends on the latent and on the LR image only within this distance
    (measured from the LR pixel it belongs to). The bound follows the flow's structure: the
    condition (the LR feature CNN, the bilinear upsampling and the operator's sampling
    offset), at every level the coupling and injector subnets (each convolution adds one
    pixel of that level's grid, ``1 / 2^l`` LR pixels) and the squeeze cells, then the mean
    WPPNet and the final affine step, then the edge steps (the Sobel pattern of the mean, their
    subnet, and the tile each output pixel shares); one LR pixel is added for the HR-to-LR
    assignment.
    """
    from napari_wpp.core.models.flow_blocks import (
        ActNorm,
        AffineCoupling,
        ConditionalAffineInjector,
        FixedPermutation,
        FlowSequence,
        InvertibleConv1x1,
    )
    from napari_wpp.core.models.wppnet import receptive_radius

    _check_flow(model)
    q = int(model.scale)
    cond = _conv_radius(model.encoder) + 1.0 + abs(float(model.sampling_offset)) / q + 1.0

    def leaves(block: nn.Module) -> Iterator[nn.Module]:
        if isinstance(block, FlowSequence):
            for child in block.blocks:
                yield from leaves(child)
        else:
            yield block

    latent = 0.0
    for level, steps in enumerate(model.level_steps):
        spacing = 1.0 / 2**level
        for block in leaves(steps):
            if isinstance(block, AffineCoupling):
                reach = _conv_radius(block.subnet) * spacing
                latent = max(latent, cond) + reach
            elif isinstance(block, ConditionalAffineInjector):
                latent = max(latent, cond + _conv_radius(block.subnet) * spacing)
            elif not isinstance(block, (ActNorm, InvertibleConv1x1, FixedPermutation)):
                raise InputError(
                    f"unknown flow block {type(block).__name__}: pass halo (LR pixels) "
                    "explicitly for tiled sampling"
                )
        latent += spacing  # the squeeze cell of this level
    mean = float(receptive_radius(model.mean_net))
    final = max(cond, mean) + _conv_radius(model.final.subnet) / q
    sample = max(latent, final)
    for step in model.edge_steps:
        tile = (step.block - 1) / q
        stretch = max(cond, mean) + (1 + _conv_radius(step.subnet)) / q + 2 * tile
        sample = max(sample, stretch) + tile
    return math.ceil(max(sample, mean) + 1.0)


def _check_count(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"number of samples k must be a positive integer, got {k!r}: e.g. 8")
    return int(k)


def _check_temperature(temperature: float) -> float:
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(temperature, bool) or not math.isfinite(value) or value < 0:
        raise InputError(
            f"temperature must be a finite number ≥ 0, got {temperature!r}: e.g. 1.0 (0 gives "
            "the mode)"
        )
    return value


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}: e.g. 0")
    return int(seed)


def slice_generator(seed: int, slice_index: int = 0) -> torch.Generator:
    """The CPU generator of the latents of one slice: a function of ``(seed, slice_index)``.

    Sample ``j`` of a slice is the ``j``-th ``randn`` draw of the slice's HR shape from it, so
    samples do not depend on batch size, tiling or device.
    """
    state = np.random.SeedSequence([_check_seed(seed), _check_seed(slice_index)])
    value = int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    return torch.Generator().manual_seed(value)


def _tiled_flow_forward(
    net: nn.Module, z: Tensor, lr: Tensor, scale: int, tile: int | None, halo: int
) -> Tensor:
    """``net(z, lr)[0]`` for ``lr`` ``(B, 1, H, W)``, tile by tile when ``tile`` is set.

    Tile origins are whole LR pixels, so each tile's latent ``z[…, q·a0:q·a1, q·b0:q·b1]`` keeps
    the squeeze grid of the whole slice; the latent comes from the whole slice, so tiled and
    whole-slice samples agree to float32 rounding.
    """
    _, _, height, width = lr.shape
    if tile is None or (tile >= height and tile >= width):
        return net(z, lr)[0]
    q = scale
    out: Tensor | None = None
    for y0 in range(0, height, tile):
        y1 = min(y0 + tile, height)
        a0, a1 = max(0, y0 - halo), min(height, y1 + halo)
        for x0 in range(0, width, tile):
            x1 = min(x0 + tile, width)
            b0, b1 = max(0, x0 - halo), min(width, x1 + halo)
            pred = net(
                z[:, :, q * a0 : q * a1, q * b0 : q * b1], lr[:, :, a0:a1, b0:b1]
            )[0]
            if out is None:
                out = pred.new_empty((z.shape[0], 1, q * height, q * width))
            out[:, :, q * y0 : q * y1, q * x0 : q * x1] = pred[
                :, :, q * (y0 - a0) : q * (y1 - a0), q * (x0 - b0) : q * (x1 - b0)
            ]
    assert out is not None
    return out


@dataclass
class _FlowRun:
    """A checked WPPFlow run: the inference copy and the settings of every slice."""

    net: nn.Module
    scale: int
    k: int
    temperature: float
    seed: int
    batch_size: int
    tile: int | None
    halo: int
    device: torch.device

    @classmethod
    def prepare(
        cls,
        model: nn.Module,
        k: int,
        temperature: float,
        seed: int,
        batch_size: int,
        tile: int | None,
        halo: int | None,
        device: str | torch.device,
    ) -> _FlowRun:
        _check_flow(model)
        k = _check_count(k)
        temperature = _check_temperature(temperature)
        seed = _check_seed(seed)
        batch_size = _check_batch_size(batch_size)
        tile = _check_tile(tile)
        halo_px = model_halo(model, halo) if (tile is not None or halo is not None) else 0
        dev = resolve_device(device)
        net = _inference_copy(model, dev)
        return cls(net, model_scale(model), k, temperature, seed, batch_size, tile, halo_px, dev)

    def batches(self, image: np.ndarray, slice_index: int) -> Iterator[tuple[int, int, Tensor]]:
        """``(j0, j1, samples j0..j1 of the slice)`` as ``(j1 − j0, q·h, q·w)`` float32 tensors."""
        generator = slice_generator(self.seed, slice_index)
        lr = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        lr = lr.to(self.device)
        q = self.scale
        hr_shape = (1, 1, q * image.shape[0], q * image.shape[1])
        for j0 in range(0, self.k, self.batch_size):
            j1 = min(j0 + self.batch_size, self.k)
            z = torch.cat([torch.randn(hr_shape, generator=generator) for _ in range(j1 - j0)])
            if self.temperature != 1.0:
                z = z * self.temperature
            with torch.inference_mode():
                x = _tiled_flow_forward(
                    self.net,
                    z.to(self.device),
                    lr.expand(j1 - j0, -1, -1, -1),
                    q,
                    self.tile,
                    self.halo,
                )
            yield j0, j1, x[:, 0]


def _moments_out(moments: Any) -> tuple[np.ndarray, np.ndarray]:
    mean = moments.mean.to("cpu", torch.float32).numpy()
    std = moments.std.to("cpu", torch.float32).numpy()
    return mean, std


def _check_image2d(lr: np.ndarray) -> np.ndarray:
    image = np.asarray(lr)
    if image.ndim != 2 or image.size == 0:
        raise InputError(
            f"sample needs a 2D image (h, w), got shape {image.shape}: use sample_volume for "
            "stacks"
        )
    if image.dtype.kind != "f":
        raise InputError(
            f"sample needs a normalised float image, got {image.dtype}: normalise it first "
            "(Normalisation.from_array(image).apply(image)) or use sample_volume(..., "
            "normalisation=...)"
        )
    check_finite(image)
    return image


def sample(
    model: nn.Module,
    lr: np.ndarray,
    k: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 4,
    tile: int | None = None,
    keep_samples: bool = False,
    device: str | torch.device = "auto",
    stop: threading.Event | None = None,
    halo: int | None = None,
    slice_index: int = 0,
) -> Iterator[SamplingProgress | SamplingFinished]:
    """Draw ``k`` posterior samples of a WPPFlow for one 2D image (a generator of events).

    Samples are drawn in batches and folded into streaming moments
    (:class:`~napari_wpp.core.uncertainty.RunningMoments`), so the ``k`` samples are held
    in memory only with ``keep_samples``.

    Parameters
    ----------
    model
        A WPPFlow; it is copied to ``device``, the caller's model is not modified.
    lr
        ``(h, w)`` float image normalised to ``[0, 1]``; never modified.
    k
        Number of samples (≥ 1; the std is 0 for one sample).
    temperature
        Latent ``temperature · N(0, I)`` (1: the trained posterior; 0: every sample is the
        mode).
    seed
        Seed of the latents; the same seed on the same device gives the same samples,
        whatever ``batch_size`` and ``tile``.
    batch_size
        Samples per forward pass.
    tile, halo
        ``None``: the whole slice at once. Otherwise square tiles of ``tile`` LR pixels, cut
        with a halo (default :func:`flow_receptive_radius`) from the slice and its latent,
        which is drawn for the whole slice first; results agree with untiled runs to float32
        rounding.
    keep_samples
        Also return the ``(k, q·h, q·w)`` samples.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    stop
        Checked before every batch; when set the run ends with
        ``SamplingFinished(result=None, stopped_early=True)``.
    slice_index
        Which random stream of ``seed`` to use: slice ``i`` of :func:`sample_volume` uses
        stream ``i``, so ``sample(volume[i], …, slice_index=i)`` reproduces it.

    Yields
    ------
    SamplingProgress
        After every batch (``done``/``total`` count samples).
    SamplingFinished
        Last event; ``result`` is a :class:`SampleResult` with float32 ``mean`` and ``std``
        of shape ``(q·h, q·w)`` in normalised units. Bad input raises :class:`InputError` at
        the first ``next()``.
    """
    from napari_wpp.core.uncertainty import RunningMoments

    start = time.perf_counter()
    image = _check_image2d(lr)
    slice_index = _check_seed(slice_index)
    run = _FlowRun.prepare(model, k, temperature, seed, batch_size, tile, halo, device)
    q = run.scale
    kept = None
    if keep_samples:
        kept = np.empty((run.k, q * image.shape[0], q * image.shape[1]), np.float32)
    moments = RunningMoments()
    batches = run.batches(image, slice_index)
    while True:
        if stop is not None and stop.is_set():
            yield SamplingFinished(None, time.perf_counter() - start, True)
            return
        item = next(batches, None)
        if item is None:
            break
        j0, j1, x = item
        moments.update(x)
        if kept is not None:
            kept[j0:j1] = x.to("cpu").numpy()
        yield SamplingProgress(j1, run.k, int(j1 == run.k), 1, time.perf_counter() - start)
    mean, std = _moments_out(moments)
    result = SampleResult(mean, std, kept, run.k, run.temperature, run.seed)
    yield SamplingFinished(result, time.perf_counter() - start, False)


def run_sample(
    model: nn.Module,
    lr: np.ndarray,
    k: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 4,
    tile: int | None = None,
    keep_samples: bool = False,
    device: str | torch.device = "auto",
    halo: int | None = None,
    slice_index: int = 0,
) -> SampleResult:
    """Run :func:`sample` to the end and return its :class:`SampleResult` (same parameters)."""
    events = sample(
        model,
        lr,
        k,
        temperature,
        seed,
        batch_size,
        tile,
        keep_samples,
        device,
        None,
        halo,
        slice_index,
    )
    return final_result(events, SamplingFinished)


def _std_units(std: np.ndarray, normalisation: Normalisation | None) -> np.ndarray:
    """A normalised std in the input's intensity units (float32)."""
    if normalisation is None:
        return std.astype(np.float32, copy=False)
    return (std.astype(np.float64) * (normalisation.high - normalisation.low)).astype(np.float32)


def _to_input_units(
    normalised: np.ndarray, normalisation: Normalisation | None, out_dtype: np.dtype
) -> np.ndarray:
    if normalisation is None:
        return normalised.astype(np.float32, copy=False)
    return normalisation.invert(normalised).astype(out_dtype, copy=False)


def _sample_slices(
    run: _FlowRun,
    n_slices: int,
    read: Any,
    write_stats: Any,
    write_samples: Any,
    normalisation: Normalisation | None,
    stop: threading.Event | None,
    start: float,
) -> Iterator[SamplingProgress | bool]:
    """Sample every slice: ``read(i)`` gives slice ``i`` (raw dtype), ``write_stats(i, mean,
    std)`` and ``write_samples(i, j0, j1, batch)`` store results (normalised floats). Yields
    progress, and ``True`` last when stopped early.
    """
    from napari_wpp.core.uncertainty import RunningMoments

    total = run.k * n_slices
    for i in range(n_slices):
        raw = np.asarray(read(i))
        if normalisation is not None:
            image = normalisation.apply(raw)
        else:
            check_finite(raw)
            image = np.asarray(raw, dtype=np.float32)
        moments = RunningMoments()
        batches = run.batches(image, i)
        while True:
            if stop is not None and stop.is_set():
                yield True
                return
            item = next(batches, None)
            if item is None:
                break
            j0, j1, x = item
            moments.update(x)
            if write_samples is not None:
                write_samples(i, j0, j1, x.to("cpu").numpy())
            done = i * run.k + j1
            yield SamplingProgress(
                done, total, i + int(j1 == run.k), n_slices, time.perf_counter() - start
            )
        mean, std = _moments_out(moments)
        write_stats(i, mean, std)


def _check_sampling_volume(shape: tuple[int, ...], dtype: Any, normalisation: Any) -> np.dtype:
    _check_shape(shape)
    return output_dtype(dtype, normalisation)


def _sample_into_targets(
    run: _FlowRun,
    source: Any,
    targets: tuple[Any, Any, Any],
    ax: int,
    normalisation: Normalisation | None,
    out_dt: np.dtype,
    stop: threading.Event | None,
    start: float,
) -> Iterator[SamplingProgress | SamplingFinished]:
    """Sample ``source`` slice by slice along ``ax`` into the checked ``(mean, std, samples)``
    targets (``samples`` may be ``None``); ends with ``SamplingFinished(None, ...)``."""
    mean_target, std_target, samples_target = targets
    shape = tuple(int(n) for n in source.shape)
    ndim = len(shape)
    along = 0 if ndim == 2 else ax

    def region(i: int) -> tuple[Any, ...]:
        if ndim == 2:
            return (slice(None), slice(None))
        return tuple(i if d == along else slice(None) for d in range(ndim))

    def write_stats(i: int, mean: np.ndarray, std: np.ndarray) -> None:
        mean_target[region(i)] = _to_input_units(mean, normalisation, out_dt)
        std_target[region(i)] = _std_units(std, normalisation)

    def write_samples(i: int, j0: int, j1: int, batch: np.ndarray) -> None:
        samples_target[(slice(j0, j1), *region(i))] = _to_input_units(
            batch, normalisation, out_dt
        )

    n_slices = 1 if ndim == 2 else shape[ax]
    for event in _sample_slices(
        run,
        n_slices,
        lambda i: source[region(i)],
        write_stats,
        write_samples if samples_target is not None else None,
        normalisation,
        stop,
        start,
    ):
        if event is True:
            yield SamplingFinished(None, time.perf_counter() - start, True)
            return
        yield event
    yield SamplingFinished(None, time.perf_counter() - start, False)


def sample_volume(
    model: nn.Module,
    volume: np.ndarray,
    k: int,
    axis: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 4,
    tile: int | None = None,
    keep_samples: bool = False,
    device: str | torch.device = "auto",
    normalisation: Normalisation | None = None,
    stop: threading.Event | None = None,
    halo: int | None = None,
) -> Iterator[SamplingProgress | SamplingFinished]:
    """Posterior mean and std of a 2D image or, slice by slice, a 3D volume (a generator).

    Parameters
    ----------
    model
        A WPPFlow (not modified).
    volume
        ``(H, W)`` image or 3D volume; raw dtype with ``normalisation``, else normalised
        floats. Never modified.
    k, temperature, seed, batch_size, tile, halo, device
        As in :func:`sample`; slice ``i`` along ``axis`` uses the random stream ``i`` of
        ``seed`` (a 2D image is slice 0).
    axis
        Axis of a volume cut into slices (it keeps its size, the two others grow ``q`` times).
    keep_samples
        Also return all samples, ``(k, *output shape)`` (sample axis first).
    normalisation
        Applied to the input; ``mean`` and ``samples`` go back to the input's dtype and range
        (rounded and clipped for integers), ``std`` becomes float32 in the input's intensity
        units. ``None``: everything float32 in normalised units.
    stop
        Checked before every batch; when set the run ends with
        ``SamplingFinished(result=None, stopped_early=True)``.

    Yields
    ------
    SamplingProgress
        After every batch of samples.
    SamplingFinished
        Last event with a :class:`SampleResult` of the input's layout (superresolved axes
        ``q`` times larger). Bad input raises :class:`InputError` at the first ``next()``.
    """
    start = time.perf_counter()
    vol = np.asarray(volume)
    out_dt = _check_sampling_volume(vol.shape, vol.dtype, normalisation)
    ax = _check_axis(axis, vol.ndim)
    run = _FlowRun.prepare(model, k, temperature, seed, batch_size, tile, halo, device)
    shape = output_shape(vol.shape, run.scale, ax)
    mean_out = np.empty(shape, out_dt)
    std_out = np.empty(shape, np.float32)
    samples_out = np.empty((run.k, *shape), out_dt) if keep_samples else None
    targets = (mean_out, std_out, samples_out)
    for event in _sample_into_targets(run, vol, targets, ax, normalisation, out_dt, stop, start):
        if isinstance(event, SamplingFinished) and not event.stopped_early:
            result = SampleResult(mean_out, std_out, samples_out, run.k, run.temperature, run.seed)
            event = SamplingFinished(result, event.elapsed_s, False)
        yield event

def run_sample_volume(
    model: nn.Module,
    volume: np.ndarray,
    k: int,
    axis: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 4,
    tile: int | None = None,
    keep_samples: bool = False,
    device: str | torch.device = "auto",
    normalisation: Normalisation | None = None,
    halo: int | None = None,
) -> SampleResult:
    """Run :func:`sample_volume` to the end and return its result (same parameters)."""
    events = sample_volume(
        model,
        volume,
        k,
        axis,
        temperature,
        seed,
        batch_size,
        tile,
        keep_samples,
        device,
        normalisation,
        None,
        halo,
    )
    return final_result(events, SamplingFinished)


def sample_into(
    model: nn.Module,
    source: Any,
    mean_target: Any,
    std_target: Any,
    k: int,
    samples_target: Any = None,
    axis: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 4,
    tile: int | None = None,
    normalisation: Normalisation | None = None,
    device: str | torch.device = "auto",
    stop: threading.Event | None = None,
    halo: int | None = None,
) -> Iterator[SamplingProgress | SamplingFinished]:
    """Posterior mean and std of an out-of-core volume, slice by slice into targets.

    Parameters
    ----------
    model
        A WPPFlow (not modified).
    source
        2D/3D array-like that slices lazily (a zarr array, a memory map, a dask array); one
        slice is read at a time.
    mean_target, std_target
        Array-likes of the output shape (:func:`output_shape`) supporting
        ``target[region] = values``: the mean in :func:`output_dtype`, the std in float32
        (intensity units with ``normalisation``).
    k, axis, temperature, seed, batch_size, tile, halo, normalisation, device
        As in :func:`sample_volume` (the results are identical).
    samples_target
        Optional array-like of shape ``(k, *output shape)`` and the mean's dtype: samples are
        written batch by batch, so memory stays bounded by one batch of samples of a slice.
    stop
        Checked before every batch; when set the run ends with
        ``SamplingFinished(None, elapsed, stopped_early=True)``; the slices completed so far
        stay in the targets.

    Yields
    ------
    SamplingProgress
        After every batch.
    SamplingFinished
        Last event with ``result=None`` (the results are in the targets).
    """
    start = time.perf_counter()
    shape = tuple(int(n) for n in source.shape)
    out_dt = _check_sampling_volume(shape, source.dtype, normalisation)
    ax = _check_axis(axis, len(shape))
    run = _FlowRun.prepare(model, k, temperature, seed, batch_size, tile, halo, device)
    out_shape = output_shape(shape, run.scale, ax)
    expected = (
        ("mean target", mean_target, out_shape, out_dt),
        ("std target", std_target, out_shape, np.dtype(np.float32)),
    )
    if samples_target is not None:
        expected += (("samples target", samples_target, (run.k, *out_shape), out_dt),)
    for name, target, target_shape, dtype in expected:
        if tuple(int(n) for n in target.shape) != target_shape:
            raise InputError(
                f"{name} has shape {tuple(target.shape)}, the result needs {target_shape}: "
                "create it with output_shape()"
            )
        if np.dtype(target.dtype) != dtype:
            raise InputError(f"{name} has dtype {target.dtype}, the result is {dtype}: use {dtype}")
    targets = (mean_target, std_target, samples_target)
    yield from _sample_into_targets(run, source, targets, ax, normalisation, out_dt, stop, start)
