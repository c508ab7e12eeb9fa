"""The Uncertainty job: posterior mean, std and samples of a WPPFlow over one LR region.

:func:`uncertainty_job` normalises a 2D region as ``napari-wpp predict`` does (the job's one
rule, :func:`napari_wpp.jobs.predict.input_normalisation` of the whole layer), draws the
posterior samples with :func:`napari_wpp.core.inference.sample` and gives back
:class:`UncertaintyMaps`: the mean and samples in the input's dtype, the std in its intensity
units and, against a ground truth, the calibration figures of :mod:`napari_wpp.core.
uncertainty`. :func:`region_statistics` gives the figures the Uncertainty widget shows.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_wpp.core.config import PredictSpec
from napari_wpp.core.errors import InputError
from napari_wpp.jobs.predict import input_normalisation

__all__ = [
    "SamplingRegion",
    "UncertaintyFinished",
    "UncertaintyMaps",
    "region_statistics",
    "share_above",
    "statistics_texts",
    "uncertainty_job",
]


def share_above(std: np.ndarray, threshold: float) -> float:
    """Share (0..1) of the pixels of ``std`` strictly above ``threshold`` (0 when empty)."""
    values = np.asarray(std)
    if values.size == 0:
        return 0.0
    return float(np.count_nonzero(values > threshold)) / float(values.size)


@dataclass(frozen=True, eq=False)
class UncertaintyMaps:
    """What a finished run gives the widget.

    Attributes
    ----------
    mean
        Pixelwise mean of the samples, ``(q·h, q·w)`` in the input's dtype and range.
    std
        Pixelwise standard deviation (``ddof=1``), float32, in the input's intensity units.
    samples
        ``(k, q·h, q·w)`` samples in the input's dtype, or ``None``.
    normalisation
        The :class:`~napari_wpp.core.intensity.Normalisation` dict of the input.
    normalisation_from
        How it was chosen (shown in the provenance).
    intensity_range
        ``high − low`` of the normalisation (the std of a sample spread over the whole range).
    max_std
        Largest std of the region (intensity units).
    figures
        Calibration figures against the ground truth (:func:`~napari_wpp.core.uncertainty.
        calibration` and :func:`~napari_wpp.core.uncertainty.edge_flat_std_ratio`, on the
        [0, 1] scale of the normalisation), or ``None`` without a ground truth.
    figures_error
        Why the figures could not be computed (one line), or ``None``.
    raw_std
        With a calibration: the samples' own std (``std`` is then calibrated), else ``None``.
    calibration
        The model's :class:`~napari_wpp.core.calibration.StdCalibration`, or ``None``.
    """

    mean: np.ndarray
    std: np.ndarray
    samples: np.ndarray | None
    normalisation: dict[str, Any]
    normalisation_from: str
    intensity_range: float
    max_std: float
    figures: dict[str, float] | None
    figures_error: str | None
    raw_std: np.ndarray | None = None
    calibration: Any = None


@dataclass(frozen=True, eq=False)
class UncertaintyFinished:
    """Last item of a job: the maps, or ``None`` when the run was cancelled."""

    maps: UncertaintyMaps | None
    elapsed_s: float
    stopped_early: bool


def _figures(
    truth: np.ndarray, mean01: np.ndarray, std01: np.ndarray, norm: Any
) -> dict[str, float]:
    """Calibration and edge/flat figures on the normalisation's [0, 1] scale."""
    from napari_wpp.core.uncertainty import calibration, edge_flat_std_ratio

    truth = np.asarray(truth)
    if truth.dtype.kind not in "uif":
        raise InputError(f"ground truth has dtype {truth.dtype}: use a greyscale image")
    truth01 = norm.apply(truth, clip=False)
    figures = dict(calibration(truth01, mean01, std01))
    figures.update(edge_flat_std_ratio(truth01, std01))
    return figures


@dataclass(frozen=True, eq=False)
class SamplingRegion:
    """The part of an LR layer an Uncertainty run samples.

    Attributes
    ----------
    region
        The 2D LR region (array-like, read in the worker).
    volume
        The whole LR layer the region comes from (its percentiles normalise a float input,
        as for ``napari-wpp predict`` of that layer).
    slice_index
        Random stream of the seed (the slice's index, as ``sample_volume`` uses).
    truth
        The ground truth under the region on the output grid (array-like) or ``None``.
    """

    region: Any
    volume: Any
    slice_index: int = 0
    truth: Any = None


def uncertainty_job(
    spec: PredictSpec,
    model: Any,
    recorded_normalisation: dict[str, Any] | None,
    where: SamplingRegion,
    stop: threading.Event,
    calibration: Any = None,
) -> Iterator[Any]:
    """Worker body: normalise the region, draw the samples, compute the statistics.

    Parameters
    ----------
    spec
        ``samples``, ``temperature``, ``seed``, ``batch_size``, ``tile``, ``device`` and
        ``keep_samples`` as :func:`napari_wpp.core.inference.sample` takes them.
    model
        A WPPFlow.
    recorded_normalisation
        The model's normalisation (used for float inputs when it was trained on floats).
    where
        The region, its layer, its slice and its ground truth.
    stop
        Set to cancel after the current batch of samples.
    calibration
        The model's std calibration (:func:`napari_wpp.jobs.calibration.model_calibration`):
        ``std`` and the figures are then of the calibrated std, ``raw_std`` keeps the raw one.

    Yields
    ------
    SamplingProgress, then UncertaintyFinished
    """
    from napari_wpp.core.inference import SamplingFinished, sample

    region, truth = where.region, where.truth
    lr = np.asarray(region)
    norm, how = input_normalisation(lr.dtype, recorded_normalisation, where.volume)
    lr01 = norm.apply(lr)
    for event in sample(
        model,
        lr01,
        spec.samples,
        temperature=spec.temperature,
        seed=spec.seed,
        batch_size=spec.batch_size,
        tile=spec.tile,
        keep_samples=spec.keep_samples,
        device=spec.device,
        stop=stop,
        slice_index=where.slice_index,
    ):
        if not isinstance(event, SamplingFinished):
            yield event
            continue
        if event.stopped_early or event.result is None:
            yield UncertaintyFinished(None, event.elapsed_s, True)
            return
        result = event.result
        spread = norm.high - norm.low
        std01 = result.std
        raw_std = None
        if calibration is not None:
            std01 = calibration.calibrated_std(result.std, result.mean)
            raw_std = (result.std.astype(np.float64) * spread).astype(np.float32)
        std = (std01.astype(np.float64) * spread).astype(np.float32)
        figures = figures_error = None
        if truth is not None:
            try:
                figures = _figures(np.asarray(truth), result.mean, std01, norm)
            except InputError as exc:
                figures_error = str(exc)
        samples = None if result.samples is None else norm.invert(result.samples)
        maps = UncertaintyMaps(
            mean=norm.invert(result.mean),
            std=std,
            samples=samples,
            normalisation=norm.to_dict(),
            normalisation_from=how,
            intensity_range=float(spread),
            max_std=float(std.max()) if std.size else 0.0,
            figures=figures,
            figures_error=figures_error,
            raw_std=raw_std,
            calibration=calibration,
        )
        yield UncertaintyFinished(maps, event.elapsed_s, False)


def region_statistics(maps: UncertaintyMaps, threshold_percent: float) -> dict[str, float]:
    """The figures of a finished run.

    Parameters
    ----------
    maps
        The run's maps.
    threshold_percent
        Threshold of the "share above" statistic, in percent of the intensity range.

    Returns
    -------
    dict
        ``max_std`` (intensity units), ``threshold`` (intensity units), ``share_above``
        (0..1) and, with a ground truth, the calibration figures (``coverage_1sd`` ...,
        ``std_error_pearson``, ``edge_flat_ratio``, ...).
    """
    threshold = float(threshold_percent) / 100.0 * maps.intensity_range
    figures: dict[str, float] = {
        "max_std": maps.max_std,
        "threshold": threshold,
        "share_above": share_above(maps.std, threshold),
    }
    figures.update(maps.figures or {})
    return figures


def statistics_texts(
    figures: dict[str, float], maps: UncertaintyMaps, truth_name: str
) -> dict[str, str]:
    """How the Uncertainty widget shows :func:`region_statistics` (one text per figure).

    Returns
    -------
    dict
        ``max_std`` and ``share_above``; with a ground truth also ``coverage_1sd`` ...
        ``coverage_3sd``, ``correlation``, ``edge_flat`` and ``note`` (only ``note``, the
        reason, when the calibration figures could not be computed).
    """
    spread = maps.intensity_range
    texts = {
        "max_std": f"{figures['max_std']:.4g} ({100 * figures['max_std'] / spread:.1f} % of range)",
        "share_above": f"{100 * figures['share_above']:.1f} % of the region (std > "
        f"{figures['threshold']:.4g})",
    }
    if maps.figures_error:
        return {**texts, "note": maps.figures_error}
    f = maps.figures
    if f is None:
        return texts

    def number(value: float) -> str:
        return f"{value:.3f}" if math.isfinite(value) else "n/a"

    for k in (1, 2, 3):
        texts[f"coverage_{k}sd"] = (
            f"{100 * f[f'coverage_{k}sd']:.1f} % (Gaussian {100 * f[f'expected_{k}sd']:.1f} %)"
        )
    texts["correlation"] = (
        f"Pearson {number(f['std_error_pearson'])} · Spearman {number(f['std_error_spearman'])}"
    )
    texts["edge_flat"] = f"{number(f['edge_flat_ratio'])} (useful maps: ≥ 2)"
    texts["note"] = (
        f"Against {truth_name}, [0, 1] scale; mean |error| {f['mean_abs_error']:.4f}, "
        f"mean std {f['mean_std']:.4f}."
    )
    return texts
