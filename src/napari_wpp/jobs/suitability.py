"""The ground-truth-free checks of a reference: the suitability map and the blur-width search.

Both faces use the same rule: the LR data and the HR reference are each normalised by
:meth:`~napari_wpp.core.intensity.Normalisation.from_array` of the whole array, then compared
by :mod:`napari_wpp.core.suitability`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_wpp.core.config import BlurCheckSpec, SuitabilitySpec
from napari_wpp.jobs.notices import JobProgress
from napari_wpp.jobs.predict import OutputWritten

__all__ = [
    "BlurChecked",
    "SuitabilityMapped",
    "blur_check_job",
    "sigma_warning",
    "suitability_job",
]

#: A typed σ further than this share from the estimated one is warned about.
SIGMA_TOLERANCE = 0.25


@dataclass(frozen=True)
class SuitabilityMapped:
    """The :class:`~napari_wpp.core.suitability.Suitability` and its summary figures."""

    result: Any
    summary: dict[str, Any]


@dataclass(frozen=True)
class BlurChecked:
    """The :class:`~napari_wpp.core.suitability.BlurFit` and its summary figures."""

    fit: Any
    summary: dict[str, Any]


def _normalised(array: Any) -> Any:
    import torch

    from napari_wpp.core.intensity import Normalisation

    array = np.asarray(array)
    return torch.from_numpy(np.ascontiguousarray(Normalisation.from_array(array).apply(array)))


def suitability_job(
    spec: SuitabilitySpec,
    operator: Any,
    lr: Any,
    reference: Any,
    out: Path | None = None,
    inputs: Sequence[tuple[str, Path | str | None]] = (),
) -> Iterator[Any]:
    """Map how well ``reference`` explains every LR patch of ``lr`` (a generator of events).

    Yields :class:`JobProgress` per LR slice, :class:`SuitabilityMapped` and, with ``out``,
    :class:`OutputWritten` (the float32 score map on the LR grid, shaped like ``lr``).
    """
    from napari_wpp.core.suitability import suitability
    from napari_wpp.io import check_not_an_input, explained_write_errors, write_image

    check_not_an_input([out], inputs)
    lr = np.asarray(lr)
    data, ref = _normalised(lr), _normalised(reference)
    events: list[JobProgress] = []

    def progress(done: int, total: int) -> None:
        events.append(JobProgress(done, total, "LR slices"))

    result = suitability(data, ref, operator, spec, progress=progress)
    yield from events
    summary = {**result.summary(), "noise_std": spec.noise_std, "patch_size": spec.patch_size}
    yield SuitabilityMapped(result, summary)
    if out is not None:
        score_map = result.score_map if lr.ndim == 3 else result.score_map[0]
        with explained_write_errors(out):
            write_image(out, score_map)
        yield OutputWritten({"map": out})


def blur_check_job(spec: BlurCheckSpec, lr: Any, reference: Any) -> Iterator[Any]:
    """Search the blur σ under which ``reference`` degraded best matches ``lr``'s patches.

    Yields :class:`JobProgress` per σ tried, then :class:`BlurChecked`.
    """
    from napari_wpp.core.suitability import estimate_blur_sigma

    events: list[JobProgress] = []

    def progress(done: int, total: int) -> None:
        events.append(JobProgress(done, total, "σ values"))

    fit = estimate_blur_sigma(_normalised(lr), _normalised(reference), spec, progress=progress)
    yield from events
    summary = {
        "sigma": fit.sigma,
        "at_bound": fit.at_bound,
        "scale": spec.scale,
        "kernel_size": spec.kernel_size,
        "sigmas": list(fit.sigmas),
        "residuals": list(fit.residuals),
    }
    yield BlurChecked(fit, summary)


def sigma_warning(typed: float, estimated: float) -> str | None:
    """A one-line warning when the typed σ is far (> 25 %) from the estimated one, else ``None``."""
    if abs(typed - estimated) <= SIGMA_TOLERANCE * estimated:
        return None
    return (
        f"the typed blur σ {typed:g} px is far from the {estimated:.2f} px under which the "
        "reference best matches the LR data: check σ (or the reference)"
    )
