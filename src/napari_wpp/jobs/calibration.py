"""The std calibration of a WPPFlow: fitted at the end of training, applied by predict.

* :func:`calibrated_training` wraps the events of a WPPFlow training run: it keeps the
  held-out strips of the reference out of the patch prior and, on the final event, fits a
  :class:`~napari_wpp.core.calibration.StdCalibration` on them (yielding
  :class:`CalibrationFitted`) and stores it in the final state, so it lands in the model file.
* :func:`model_calibration` reads it back from a loaded model file's state;
  :func:`calibrate_std` turns a written raw std into the calibrated one.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_wpp.core.errors import InputError
from napari_wpp.core.inference.sampling import SampleResult
from napari_wpp.jobs.notices import JobWarning

__all__ = [
    "CalibratedSampleResult",
    "CalibrationFitted",
    "calibrate_std",
    "calibrated_finished",
    "calibrated_training",
    "fit_model_calibration",
    "model_calibration",
]


@dataclass(frozen=True, eq=False)
class CalibratedSampleResult(SampleResult):
    """A sampling result whose ``std`` is calibrated; ``raw_std`` is the samples' own std."""

    raw_std: np.ndarray | None = None
    calibration: Any = None


@dataclass(frozen=True)
class CalibrationFitted:
    """The std calibration fitted on the held-out reference, and the seconds it took."""

    calibration: Any
    seconds: float

    def text(self) -> str:
        """One line for a log or a status bar."""
        c = self.calibration
        return (
            f"std calibration ({self.seconds:.1f} s, {c.pixels} held-out pixels): "
            f"σ_cal = {c.coverage_scale:.3g}·√(({c.std_scale:.3g}·σ)² + "
            f"({c.gradient_scale:.3g}·|∇|)² + {c.floor:.3g}²); {c.promise_text()}"
        )


def fit_model_calibration(
    model: Any,
    strips: list[np.ndarray],
    operator: Any,
    noise_std: float,
    samples: int,
    seed: int = 0,
    device: str = "cpu",
    stop: threading.Event | None = None,
) -> CalibrationFitted:
    """Fit the std calibration of ``model`` on held-out reference ``strips`` (normalised)."""
    from napari_wpp.core.calibration import fit_std_calibration, heldout_errors

    start = time.perf_counter()
    errors = heldout_errors(
        model, strips, operator, noise_std, samples, seed=seed, device=device, stop=stop
    )
    calibration = fit_std_calibration(
        errors.std, errors.gradient, errors.error, fit=errors.fit, samples=samples
    )
    return CalibrationFitted(calibration, time.perf_counter() - start)


def calibrated_training(
    events: Iterator[Any],
    strips: list[np.ndarray],
    operator: Any,
    noise_std: float,
    seed: int,
    device: str,
    stop: threading.Event | None,
) -> Iterator[Any]:
    """Forward a WPPFlow run's ``events``; fit the calibration before the final one.

    Nothing is fitted without strips or when the run was stopped; the final event then
    goes on unchanged.
    """
    from napari_wpp.core.config.training import CALIBRATION_SAMPLES
    from napari_wpp.core.training import TrainingFinished

    for event in events:
        if isinstance(event, TrainingFinished) and strips and not (stop and stop.is_set()):
            try:
                fitted = fit_model_calibration(
                    event.state.model,
                    strips,
                    operator,
                    noise_std,
                    CALIBRATION_SAMPLES,
                    seed=seed,
                    device=device,
                    stop=stop,
                )
            except InputError as exc:
                yield JobWarning(f"std calibration skipped: {exc}")
            else:
                yield fitted
                record = fitted.calibration.to_dict()
                event = dataclasses.replace(
                    event, state=dataclasses.replace(event.state, calibration=record)
                )
        yield event


def model_calibration(state: Any) -> Any:
    """The :class:`~napari_wpp.core.calibration.StdCalibration` of a loaded model state,
    ``None`` when it has none (a WPPNet, a flow trained without a held-out reference)."""
    from napari_wpp.core.calibration import StdCalibration

    record = getattr(state, "calibration", None)
    return None if not record else StdCalibration.from_dict(record)


def calibrate_std(
    calibration: Any, std: np.ndarray, mean: np.ndarray, unit: float = 1.0, axis: int = 0
) -> np.ndarray:
    """The calibrated std of a raw ``std`` and ``mean`` (2D, or 3D sampled slice by slice
    along ``axis``) in intensity units of which ``unit`` make one normalised unit."""
    std = np.asarray(std)
    mean = np.asarray(mean)
    if std.ndim == 3:
        out = calibration.calibrated_std(
            np.moveaxis(std, axis, 0), np.moveaxis(mean, axis, 0), unit
        )
        return np.moveaxis(out, 0, axis)
    return calibration.calibrated_std(std, mean, unit)


def calibrated_finished(finished: Any, calibration: Any, unit: float, axis: int = 0) -> Any:
    """``finished`` (a ``SamplingFinished``) with its result's std calibrated.

    The result becomes a :class:`CalibratedSampleResult` (the raw std kept as ``raw_std``);
    without a calibration or a result ``finished`` is returned as it is.
    """
    result = getattr(finished, "result", None)
    if calibration is None or result is None:
        return finished
    std = calibrate_std(calibration, result.std, result.mean, unit, axis)
    calibrated = CalibratedSampleResult(
        **{f.name: getattr(result, f.name) for f in dataclasses.fields(result)},
        raw_std=result.std,
        calibration=calibration,
    )
    return dataclasses.replace(finished, result=dataclasses.replace(calibrated, std=std))
