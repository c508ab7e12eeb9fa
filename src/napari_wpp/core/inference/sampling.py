"""Posterior sampling with a WPPFlow: streaming mean and std of slices and volumes."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from napari_wpp.core.devices import resolve_device
from napari_wpp.core.errors import InputError
from napari_wpp.core.events import RunFinished, run_to_end
from napari_wpp.core.inference.common import (
    _check_batch_size,
    _check_flow,
    _check_layout,
    _check_tiling,
    _forward_in_tiles,
    _inference_copy,
    model_scale,
    output_shape,
)
from napari_wpp.core.intensity import Normalisation, check_finite


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
class SamplingFinished(RunFinished):
    """End of a sampling run: ``result`` is a :class:`SampleResult`, or ``None``.

    ``None`` when the run was stopped early or wrote its output into target arrays
    (:func:`sample_into`).
    """


#: Events yielded by the sampling generators.
SamplingEvent = SamplingProgress | SamplingFinished


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
    q = scale

    def forward(a0: int, a1: int, b0: int, b1: int) -> Tensor:
        return net(z[:, :, q * a0 : q * a1, q * b0 : q * b1], lr[:, :, a0:a1, b0:b1])[0]

    return _forward_in_tiles(forward, tuple(lr.shape[2:]), scale, tile, halo)


@dataclass
class _FlowRun:
    """A checked WPPFlow run: the inference copy and the settings of every slice.

    Slice ``i`` of the run draws its latents from the random stream ``first_stream + i`` of
    ``seed`` (:func:`slice_generator`).
    """

    net: nn.Module
    scale: int
    k: int
    temperature: float
    seed: int
    batch_size: int
    tile: int | None
    halo: int
    device: torch.device
    first_stream: int = 0

    @classmethod
    def prepare(
        cls,
        model: nn.Module,
        k: int,
        temperature: float = 1.0,
        seed: int = 0,
        batch_size: int = 4,
        tile: int | None = None,
        halo: int | None = None,
        device: str | torch.device = "auto",
    ) -> _FlowRun:
        _check_flow(model)
        k = _check_count(k)
        temperature = _check_temperature(temperature)
        seed = _check_seed(seed)
        batch_size = _check_batch_size(batch_size)
        tile, halo_px = _check_tiling(model, tile, halo)
        dev = resolve_device(device)
        net = _inference_copy(model, dev)
        return cls(net, model_scale(model), k, temperature, seed, batch_size, tile, halo_px, dev)

    def batches(self, image: np.ndarray, slice_index: int) -> Iterator[tuple[int, int, Tensor]]:
        """``(j0, j1, samples j0..j1 of the slice)`` as ``(j1 − j0, q·h, q·w)`` float32 tensors."""
        generator = slice_generator(self.seed, self.first_stream + slice_index)
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
            f"sample needs a 2D image (h, w), got shape {image.shape}: use sample_volume for stacks"
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
    model: nn.Module, lr: np.ndarray, k: int, *, slice_index: int = 0, **options: Any
) -> Iterator[SamplingProgress | SamplingFinished]:
    """Draw ``k`` posterior samples of a WPPFlow for one 2D image (a generator of events).

    ``lr`` is an ``(h, w)`` float image normalised to ``[0, 1]`` (never modified); the
    ``options`` (``temperature``, ``seed``, ``batch_size``, ``tile``, ``halo``,
    ``keep_samples``, ``device``, ``stop``) and the events are those of
    :func:`sample_volume`, whose result this is for a normalised image, with float32 ``mean``
    and ``std`` of shape ``(q·h, q·w)`` in normalised units. ``slice_index`` chooses the
    random stream of ``seed``: slice ``i`` of :func:`sample_volume` uses stream ``i``, so
    ``sample(volume[i], …, slice_index=i)`` reproduces it.
    """
    start = time.perf_counter()
    image = _check_image2d(lr)
    slice_index = _check_seed(slice_index)
    keep_samples = bool(options.pop("keep_samples", False))
    stop = options.pop("stop", None)
    run = replace(_FlowRun.prepare(model, k, **options), first_stream=slice_index)
    dtype = np.dtype(np.float32)
    yield from _sample_in_memory(run, image, 0, None, dtype, keep_samples, stop, start)


#: :func:`sample` run to the end: its :class:`SampleResult` (same parameters).
run_sample = run_to_end(sample, SamplingFinished, "run_sample")


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
        samples_target[(slice(j0, j1), *region(i))] = _to_input_units(batch, normalisation, out_dt)

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


def _sample_in_memory(
    run: _FlowRun,
    vol: np.ndarray,
    ax: int,
    normalisation: Normalisation | None,
    out_dt: np.dtype,
    keep_samples: bool,
    stop: threading.Event | None,
    start: float,
) -> Iterator[SamplingProgress | SamplingFinished]:
    """Sample ``vol`` into new arrays; the last event carries them as a :class:`SampleResult`."""
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


def sample_volume(
    model: nn.Module, volume: np.ndarray, k: int, *, keep_samples: bool = False, **options: Any
) -> Iterator[SamplingProgress | SamplingFinished]:
    """Posterior mean and std of a 2D image or, slice by slice, a 3D volume (a generator).

    :func:`sample_into` into new in-memory arrays: ``model``, ``k`` and the ``options``
    (``axis``, ``normalisation``, ``temperature``, ``seed``, ``batch_size``, ``tile``,
    ``halo``, ``device``, ``stop``) are its own. ``volume`` is an ``(H, W)`` image or a 3D
    volume (raw dtype with ``normalisation``, else normalised floats; never modified);
    ``keep_samples`` also returns all samples, ``(k, *output shape)`` (sample axis first).

    Yields
    ------
    SamplingProgress
        After every batch of samples.
    SamplingFinished
        Last event with a :class:`SampleResult` of the input's layout (superresolved axes
        ``q`` times larger), or ``None`` when stopped early. Bad input raises
        :class:`InputError` at the first ``next()``.
    """
    start = time.perf_counter()
    vol = np.asarray(volume)
    axis = options.pop("axis", 0)
    normalisation = options.pop("normalisation", None)
    stop = options.pop("stop", None)
    out_dt, ax = _check_layout(vol.shape, vol.dtype, axis, normalisation)
    run = _FlowRun.prepare(model, k, **options)
    yield from _sample_in_memory(run, vol, ax, normalisation, out_dt, keep_samples, stop, start)


#: :func:`sample_volume` run to the end: its :class:`SampleResult` (same parameters).
run_sample_volume = run_to_end(sample_volume, SamplingFinished, "run_sample_volume")


def sample_into(
    model: nn.Module,
    source: Any,
    mean_target: Any,
    std_target: Any,
    k: int,
    samples_target: Any = None,
    *,
    axis: int = 0,
    normalisation: Normalisation | None = None,
    stop: threading.Event | None = None,
    **options: Any,
) -> Iterator[SamplingProgress | SamplingFinished]:
    """Posterior mean and std of a volume, slice by slice into targets (a generator of events).

    Out of core: one slice of ``source`` is read at a time, and each is written to the
    targets when its samples are drawn.

    Parameters
    ----------
    model
        A WPPFlow (not modified).
    source
        2D/3D array-like that slices lazily (a zarr array, a memory map, a dask array); raw
        dtype with ``normalisation``, else normalised floats. Never modified.
    mean_target, std_target
        Array-likes of the output shape (:func:`output_shape`) supporting
        ``target[region] = values``: the mean in :func:`output_dtype`, the std in float32
        (intensity units with ``normalisation``).
    k
        Number of samples (≥ 1; the std is 0 for one sample).
    samples_target
        Optional array-like of shape ``(k, *output shape)`` and the mean's dtype: samples are
        written batch by batch, so memory stays bounded by one batch of samples of a slice.
    axis
        Axis of a volume cut into slices (it keeps its size, the two others grow ``q`` times).
    normalisation
        Applied to the input; ``mean`` and ``samples`` go back to the input's dtype and range
        (rounded and clipped for integers), ``std`` becomes float32 in the input's intensity
        units. ``None``: everything float32 in normalised units.
    options
        ``temperature`` (default 1.0): latent ``temperature · N(0, I)`` (1: the trained
        posterior; 0: every sample is the mode). ``seed`` (default 0): seed of the latents;
        the same seed on the same device gives the same samples, whatever ``batch_size`` and
        ``tile``; slice ``i`` along ``axis`` uses the random stream ``i`` of ``seed`` (a 2D
        image is slice 0). ``batch_size`` (default 4): samples per forward pass. ``tile``,
        ``halo``: ``None`` (default), the whole slice at once; otherwise square tiles of
        ``tile`` LR pixels, cut with a halo (default :func:`flow_receptive_radius`) from the
        slice and its latent, which is drawn for the whole slice first (results agree with
        untiled runs to float32 rounding). ``device``: ``"auto"`` (default), ``"cpu"``,
        ``"cuda"``, ...
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
    out_dt, ax = _check_layout(shape, source.dtype, axis, normalisation)
    run = _FlowRun.prepare(model, k, **options)
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
