"""Self-calibration of a WPPFlow's std: the fit on toys with a known error law, the held-out
strip, the train job storing it in the model file and predict applying it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_wpp import io
from napari_wpp.core.calibration import (
    StdCalibration,
    fit_std_calibration,
    gradient_magnitude,
    heldout_errors,
    heldout_min_size,
    split_heldout,
)
from napari_wpp.core.config import PredictSpec, TrainSpec
from napari_wpp.core.errors import InputError
from napari_wpp.core.models.wppflow import WPPFlow
from napari_wpp.core.operators import GaussianDownsampling
from napari_wpp.core.uncertainty import gaussian_coverage
from napari_wpp.jobs.calibration import (
    CalibratedSampleResult,
    CalibrationFitted,
    calibrate_std,
    model_calibration,
)
from napari_wpp.jobs.notices import JobWarning
from napari_wpp.jobs.predict import OutputWritten, PredictSource, PredictTarget, predict_job
from napari_wpp.jobs.train import TrainSource, train_job

GAUSS = [gaussian_coverage(k) for k in (1, 2, 3)]
TINY_FLOW = {"steps": 1, "hidden": 8, "cond_features": 4, "mean_features": 8, "mean_blocks": 2}


def _toy(n: int = 40000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    std = rng.uniform(0.005, 0.05, n)
    grad = rng.uniform(0.0, 0.3, n)
    return std, grad


def test_a_std_too_small_by_a_known_factor_is_scaled_by_it() -> None:
    std, grad = _toy()
    error = 2.5 * std * np.random.default_rng(1).standard_normal(std.size)
    fitted = fit_std_calibration(std, grad, error)
    effective = fitted.coverage_scale * fitted.std_scale
    assert effective == pytest.approx(2.5, rel=0.05)
    assert fitted.gradient_scale * 0.3 < 0.1 * 2.5 * 0.005  # negligible where none is
    for measured, expected in zip(fitted.coverage, GAUSS, strict=True):
        assert measured == pytest.approx(expected, abs=0.015)
    assert fitted.raw_coverage[0] == pytest.approx(math.erf(0.4 / math.sqrt(2)), abs=0.015)
    assert fitted.pixels == std.size // 2


def test_errors_that_grow_with_the_gradient_are_calibrated_only_with_the_gradient() -> None:
    std, grad = _toy(seed=2)
    scale = np.sqrt((1.2 * std) ** 2 + (0.2 * grad) ** 2)
    error = scale * np.random.default_rng(3).standard_normal(std.size)
    with_grad = fit_std_calibration(std, grad, error)
    assert with_grad.gradient_scale * with_grad.coverage_scale == pytest.approx(0.2, rel=0.1)
    strong = grad > 0.2
    calibrated = with_grad.coverage_scale * np.sqrt(
        (with_grad.std_scale * std) ** 2 + (with_grad.gradient_scale * grad) ** 2
    )
    within = np.mean(np.abs(error[strong]) <= calibrated[strong])
    assert within == pytest.approx(GAUSS[0], abs=0.03)  # edges too, not only overall
    scale_only = fit_std_calibration(std, grad, error, use_gradient=False)
    assert scale_only.gradient_scale == 0.0
    plain = scale_only.coverage_scale * np.sqrt(
        (scale_only.std_scale * std) ** 2 + scale_only.floor**2
    )
    assert np.mean(np.abs(error[strong]) <= plain[strong]) < within - 0.05


def test_heavy_tailed_errors_are_matched_at_one_and_two_std() -> None:
    std, grad = _toy(seed=4)
    error = 3.0 * std * np.random.default_rng(5).laplace(size=std.size)
    fitted = fit_std_calibration(std, grad, error)
    assert 0.60 < fitted.coverage[0] < 0.76 and 0.88 < fitted.coverage[1] < 0.98


def test_the_fit_mask_decides_which_pixels_are_checked() -> None:
    std, grad = _toy(n=1000)
    error = std * np.random.default_rng(6).standard_normal(std.size)
    fit = np.zeros(std.size, bool)
    fit[:800] = True
    assert fit_std_calibration(std, grad, error, fit=fit).pixels == 200
    with pytest.raises(InputError, match="too few pixels"):
        fit_std_calibration(std, grad, error, fit=np.ones(std.size, bool))
    with pytest.raises(InputError, match="NaN"):
        fit_std_calibration(np.full(100, np.nan), grad[:100], error[:100])


def test_a_calibration_survives_its_dict_and_rejects_damage() -> None:
    calibration = StdCalibration(1.5, 0.1, 0.002, 1.1, (0.7, 0.94, 0.99), (0.4, 0.7, 0.8), 99, 16)
    assert StdCalibration.from_dict(calibration.to_dict()) == calibration
    with pytest.raises(InputError, match="damaged"):
        StdCalibration.from_dict({"std_scale": 1.0})
    with pytest.raises(InputError, match="invalid"):
        StdCalibration.from_dict({**calibration.to_dict(), "floor": -1.0})
    assert "68.3 / 95.4 / 99.7" in calibration.promise_text()


def test_the_calibrated_std_scales_with_the_intensity_unit() -> None:
    calibration = StdCalibration(1.5, 0.1, 0.002, 1.1)
    rng = np.random.default_rng(7)
    mean, std = rng.random((24, 24)), 0.02 * rng.random((24, 24))
    normalised = calibration.calibrated_std(std, mean)
    in_units = calibration.calibrated_std(std * 255.0, mean * 255.0, unit=255.0)
    np.testing.assert_allclose(in_units, 255.0 * normalised, rtol=1e-5)
    expected = 1.1 * np.sqrt((1.5 * std) ** 2 + (0.1 * gradient_magnitude(mean)) ** 2 + 0.002**2)
    np.testing.assert_allclose(normalised, expected, rtol=1e-5)
    volume_mean, volume_std = np.stack([mean, mean]), np.stack([std, std])
    along = calibrate_std(
        calibration, np.moveaxis(volume_std, 0, 2), np.moveaxis(volume_mean, 0, 2), axis=2
    )
    np.testing.assert_allclose(along[:, :, 1], normalised, rtol=1e-5)


def test_the_right_most_columns_are_held_out_of_every_image() -> None:
    image = np.arange(40 * 100, dtype=np.float32).reshape(40, 100)
    before = image.copy()
    kept, strips = split_heldout(image, 0.2)
    assert kept.shape == (40, 80) and [s.shape for s in strips] == [(40, 20)]
    np.testing.assert_array_equal(np.concatenate([kept, strips[0]], axis=1), image)
    np.testing.assert_array_equal(image, before)
    kept, strips = split_heldout(np.stack([image, image]), 0.2)
    assert kept.shape == (2, 40, 80) and len(strips) == 2
    kept, strips = split_heldout([image, image[:, :50]], 0.2, min_size=15)
    assert [k.shape for k in kept] == [(40, 80), (40, 50)] and len(strips) == 1
    assert split_heldout(image, 0.0)[1] == []
    with pytest.raises(InputError, match="held-out share"):
        split_heldout(image, 1.0)


def _flow(scale: int = 2) -> WPPFlow:
    torch.manual_seed(0)
    return WPPFlow(scale=scale, **TINY_FLOW).eval()


def _operator(scale: int = 2) -> GaussianDownsampling:
    return GaussianDownsampling(scale, sigma=1.0, kernel_size=8, padding="circular")


def test_held_out_errors_split_bands_between_fit_and_check() -> None:
    strip = np.random.default_rng(8).random((96, 48)).astype(np.float32)
    before = strip.copy()
    operator = _operator()
    errors = heldout_errors(_flow(), [strip], operator, 0.01, samples=3, margin=8, band=16)
    assert errors.std.shape == errors.error.shape == ((96 - 16) * (48 - 16),)
    assert 0.4 <= errors.fit.mean() <= 0.6 and np.all(errors.std >= 0)
    np.testing.assert_array_equal(strip, before)
    with pytest.raises(InputError, match="too small"):
        heldout_errors(_flow(), [strip[:10]], operator, 0.01, samples=2, margin=8)


#: The smallest flow training that still runs every part of the train job (tiny model, no
#: warm-up, no checkpoints, one ψ pass over 200 reference patches).
FAST_FLOW = dict(
    model="wppflow", mean_warmup=0.0, steps=2, checkpoint_every=None, device="cpu",
    batch_size=2, crop_size=12, n_reference_patches=200, psi_passes=1, model_options=TINY_FLOW,
)  # fmt: skip


def _flow_spec(**overrides) -> TrainSpec:
    return TrainSpec(**{**FAST_FLOW, **overrides})


@pytest.fixture(scope="module")
def calibrated_model(tmp_path_factory) -> tuple[Path, list]:
    rng = np.random.default_rng(9)
    reference = (rng.random((96, 200)) * 255).astype(np.uint8)
    lr = (rng.random((4, 24, 24)) * 255).astype(np.uint8)
    out = tmp_path_factory.mktemp("calibrated") / "flow.safetensors"
    spec = _flow_spec(calibration_holdout=0.25)
    events = list(train_job(spec, TrainSource(lr, reference), _operator(), out))
    return out, events


def test_the_train_job_fits_the_calibration_and_stores_it(calibrated_model) -> None:
    out, events = calibrated_model
    fitted = [e for e in events if isinstance(e, CalibrationFitted)]
    assert len(fitted) == 1 and fitted[0].seconds > 0
    calibration = model_calibration(io.load_model(out))
    assert calibration == fitted[0].calibration and calibration.samples == 16
    assert calibration.pixels > 0 and io.read_model_metadata(out)["calibration"]
    assert "held-out pixels" in fitted[0].text()


def test_a_reference_too_small_to_hold_out_warns_and_stays_whole(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    reference = (rng.random((40, 40)) * 255).astype(np.uint8)
    lr = (rng.random((2, 16, 16)) * 255).astype(np.uint8)
    out = tmp_path / "flow.safetensors"
    events = list(train_job(_flow_spec(steps=1), TrainSource(lr, reference), _operator(), out))
    warnings = [e.message for e in events if isinstance(e, JobWarning)]
    assert any("too small to hold out" in m for m in warnings)
    assert not any(isinstance(e, CalibrationFitted) for e in events)
    assert model_calibration(io.load_model(out)) is None
    assert heldout_min_size(2) > 40 * 0.15


def test_predict_writes_the_calibrated_and_the_raw_std(calibrated_model, tmp_path: Path) -> None:
    out, _ = calibrated_model
    state = io.load_model(out)
    calibration = model_calibration(state)
    lr = (np.random.default_rng(11).random((20, 20)) * 255).astype(np.uint8)
    target = PredictTarget(tmp_path / "mean.tif")
    spec = PredictSpec(samples=3, device="cpu")
    source = PredictSource(lr, "lr")
    events = list(
        predict_job(spec, state.model, state.normalisation, source, target, calibration=calibration)
    )
    written = [e for e in events if isinstance(e, OutputWritten)][0].paths
    assert set(written) == {"mean", "std", "raw_std"}
    mean, std, raw = (tifffile.imread(written[k]) for k in ("mean", "std", "raw_std"))
    expected = calibration.calibrated_std(raw, mean.astype(np.float64), unit=255.0)
    np.testing.assert_allclose(std, expected, rtol=1e-4, atol=1e-4)
    in_memory = list(
        predict_job(
            spec, state.model, state.normalisation, source, PredictTarget(), calibration=calibration
        )
    )[-1].result
    assert isinstance(in_memory, CalibratedSampleResult) and in_memory.raw_std is not None
    plain = list(predict_job(spec, state.model, state.normalisation, source, PredictTarget()))
    assert not isinstance(plain[-1].result, CalibratedSampleResult)
