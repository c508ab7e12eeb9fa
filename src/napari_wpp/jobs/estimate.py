"""The operator estimation job: a K×K kernel and a bias from a registered HR/LR pair.

Both images are normalised by
:meth:`~napari_wpp.core.intensity.Normalisation.from_array` of the whole plane (also when
only a region is used), the LR image is HR / scale in size or resampled onto the HR grid, and
the operator JSON records the fit under ``"fit"``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_wpp.core.config import EstimateSpec
from napari_wpp.core.errors import InputError
from napari_wpp.jobs.predict import OutputWritten

__all__ = ["OperatorEstimated", "estimate_job", "fit_record"]

Region = tuple[slice, ...] | None


@dataclass(frozen=True)
class OperatorEstimated:
    """The :class:`~napari_wpp.core.operator_estimation.OperatorEstimate` and its summary numbers.

    ``summary``: ``kernel_sum``, ``bias``, ``residual_rms``, ``kernel_peak`` and
    ``kernel_peak_index`` as plain Python numbers; ``lr_noise_model``: whether the operator
    carries the LR scan's noise model (:mod:`napari_wpp.core.lr_denoise`).
    """

    estimate: Any
    summary: dict[str, Any]


def _shape_text(shape: Any) -> str:
    return "×".join(str(int(s)) for s in shape)


def _summary(estimate: Any) -> dict[str, Any]:
    data = estimate.to_dict()
    return {
        "kernel_sum": float(data["kernel_sum"]),
        "bias": float(data["bias"]),
        "residual_rms": float(data["residual_rms"]),
        "kernel_peak": float(data["kernel_peak"]),
        "kernel_peak_index": [int(i) for i in data["kernel_peak_index"]],
        "lr_noise_model": estimate.operator.noise_variance is not None,
    }


def fit_record(summary: Mapping[str, Any], source: Mapping[str, Any]) -> dict[str, Any]:
    """The ``"fit"`` entry of an estimated operator's JSON: the fit (the operator stores its
    bias) and where the pair came from (``source``: paths, layer names, regions)."""
    return {**{k: v for k, v in summary.items() if k != "bias"}, **source}


def estimate_job(
    spec: EstimateSpec,
    hr: Any,
    lr: Any,
    hr_region: Region = None,
    lr_region: Region = None,
    out: Path | None = None,
    source: Mapping[str, Any] | None = None,
    inputs: Sequence[tuple[str, Path | str | None]] = (),
) -> Iterator[Any]:
    """Estimate the operator of a registered pair (a generator of events).

    Parameters
    ----------
    spec
        Scale and kernel side.
    hr, lr
        The 2D HR and LR planes (any dtype); each is normalised by its whole plane.
    hr_region, lr_region
        The parts of the planes to fit (``None``: all of it).
    out
        Operator JSON to write (atomically), or ``None``.
    source
        What the JSON's ``"fit"`` records about the pair (e.g. ``{"hr": path, "lr": path}``).
    inputs
        ``(what, path)`` of the files read: the output may not be one of them.

    Yields :class:`OperatorEstimated` and, with ``out``, :class:`OutputWritten`.
    """
    from napari_wpp.core.intensity import Normalisation
    from napari_wpp.core.operator_estimation import estimate_operator
    from napari_wpp.core.operators import warn_if_questionable_kernel
    from napari_wpp.io import check_not_an_input, explained_write_errors, write_operator

    check_not_an_input([out], inputs)
    hr, lr = np.asarray(hr), np.asarray(lr)
    hr_part = hr if hr_region is None else hr[hr_region]
    lr_part = lr if lr_region is None else lr[lr_region]
    q = int(spec.scale)
    native = tuple(s // q for s in hr_part.shape)
    if min(native) < 1 or tuple(lr_part.shape) not in (native, tuple(hr_part.shape)):
        raise InputError(
            f"HR {_shape_text(hr_part.shape)} and LR {_shape_text(lr_part.shape)} do not match "
            f"scale {q}: the LR image must be {_shape_text(native)} (HR / {q}) or, resampled "
            f"onto the HR grid, {_shape_text(hr_part.shape)}"
        )
    if spec.kernel_size > min(hr_part.shape):
        raise InputError(
            f"kernel size {spec.kernel_size} exceeds the HR image {_shape_text(hr_part.shape)}: "
            "use a smaller --kernel-size"
        )
    hr_n = Normalisation.from_array(hr).apply(hr_part)
    lr_n = Normalisation.from_array(lr).apply(lr_part)
    estimate = estimate_operator(hr_n, lr_n, q, kernel_size=spec.kernel_size)
    summary = _summary(estimate)
    warn_if_questionable_kernel(estimate.kernel, "the estimated operator")
    yield OperatorEstimated(estimate, summary)
    if out is not None:
        extra = {"fit": fit_record(summary, source or {})}
        with explained_write_errors(out):
            write_operator(out, estimate.operator, extra=extra)
        yield OutputWritten({"operator": out})
