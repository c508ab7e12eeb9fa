"""Tests of ``napari-wpp evaluate --std/--samples`` (posterior calibration and sample quality)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from cli_helpers import assert_bad_input, run_cli
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from napari_wpp.core.uncertainty import gaussian_coverage

CROP = 4


def _write(folder: Path, name: str, array: np.ndarray) -> Path:
    path = folder / name
    tifffile.imwrite(path, array, photometric="minisblack")
    return path


def _gaussian_case(
    seed: int = 0, size: int = 64, lo: float = 100.0, hi: float = 1100.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GT in [lo, hi] (float), PRED = GT + Gaussian error whose std (in GT units) is known."""
    rng = np.random.default_rng(seed)
    gt = rng.uniform(lo, hi, (size, size))
    gt[0, 0], gt[-1, -1] = lo, hi  # so GT's min/max are exactly lo and hi
    std = rng.uniform(10.0, 40.0, (size, size))
    pred = gt + rng.normal(size=(size, size)) * std
    return gt.astype(np.float32), pred.astype(np.float32), std.astype(np.float32)


def test_std_is_calibrated_on_prediction_scale(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    gt, pred, std = _gaussian_case()
    paths = [_write(tmp_path, f"{n}.tif", a) for n, a in (("gt", gt), ("pred", pred), ("std", std))]
    code, out, err = run_cli(
        capsys, "evaluate", paths[1], paths[0], "--std", paths[2], "--crop", CROP, "--json"
    )
    assert code == 0, err
    figures = json.loads(out)["uncertainty"]
    for k in (1, 2, 3):
        assert figures[f"expected_{k}sd"] == pytest.approx(gaussian_coverage(k))
        assert figures[f"coverage_{k}sd"] == pytest.approx(gaussian_coverage(k), abs=0.04)
    inner = (slice(CROP, -CROP), slice(CROP, -CROP))
    # GT min/max is [100, 1100]: the std is divided by the range 1000, never shifted by 100
    assert figures["mean_std"] == pytest.approx(std[inner].astype(np.float64).mean() / 1000.0)
    assert figures["pixels"] == (64 - 2 * CROP) ** 2
    assert figures["std_error_pearson"] > 0.2


def test_overconfident_std_has_low_coverage(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    gt, pred, std = _gaussian_case(seed=1)
    args = [_write(tmp_path, "pred.tif", pred), _write(tmp_path, "gt.tif", gt)]
    std_path = _write(tmp_path, "std.tif", std / 4)
    code, out, err = run_cli(capsys, "evaluate", *args, "--std", std_path, "--crop", CROP, "--json")
    assert code == 0, err
    coverage = json.loads(out)["uncertainty"]["coverage_1sd"]
    assert coverage == pytest.approx(gaussian_coverage(0.25), abs=0.04)


def _stripes_uint8(size: int = 48) -> np.ndarray:
    columns = ((np.arange(size) // 8) % 2) * 200 + 20
    return np.tile(columns, (size, 1)).astype(np.uint8)


def test_edge_std_gives_edge_flat_ratio_and_text(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    gt = _stripes_uint8()
    step = gt[:, 1:] != gt[:, :-1]
    on_edge = np.zeros(gt.shape, bool)
    on_edge[:, 1:] |= step
    on_edge[:, :-1] |= step
    std = np.where(on_edge, 25.5, 5.1).astype(np.float32)  # uint8 units: 0.1 and 0.02
    args = [_write(tmp_path, "pred.tif", gt), _write(tmp_path, "gt.tif", gt)]
    std_path = _write(tmp_path, "std.tif", std)
    code, out, err = run_cli(capsys, "evaluate", *args, "--std", std_path, "--crop", 2, "--json")
    assert code == 0, err
    figures = json.loads(out)["uncertainty"]
    assert figures["edge_flat_ratio"] == pytest.approx(5.0)
    assert figures["edge_mean_std"] == pytest.approx(0.1, rel=1e-5)
    assert figures["flat_mean_std"] == pytest.approx(0.02, rel=1e-5)
    assert figures["coverage_1sd"] == 1.0  # PRED is exact
    code, text, err = run_cli(capsys, "evaluate", *args, "--std", std_path, "--crop", 2)
    assert code == 0, err
    assert "coverage" in text and "edge/flat    std ratio 5.00" in text
    assert "Spearman" in text and "PSNR" in text


def test_samples_report_mean_single_sample_quality(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    gt, pred, _ = _gaussian_case(seed=2)
    rng = np.random.default_rng(3)
    samples = (gt + rng.normal(0.0, 30.0, (3,) + gt.shape)).astype(np.float32)
    args = [_write(tmp_path, "pred.tif", pred), _write(tmp_path, "gt.tif", gt)]
    path = _write(tmp_path, "samples.tif", samples)
    code, out, err = run_cli(capsys, "evaluate", *args, "--samples", path, "--crop", CROP, "--json")
    assert code == 0, err
    report = json.loads(out)["samples"]
    lo, hi = float(gt.min()), float(gt.max())
    inner = (slice(CROP, -CROP), slice(CROP, -CROP))
    truth = ((gt.astype(np.float64) - lo) / (hi - lo))[inner]
    expected_psnr, expected_ssim = [], []
    for sample in samples:
        s = np.clip((sample.astype(np.float64) - lo) / (hi - lo), 0, 1)[inner]
        expected_psnr.append(peak_signal_noise_ratio(truth, s, data_range=1.0))
        expected_ssim.append(structural_similarity(truth, s, data_range=1.0))
    assert report["count"] == 3
    assert report["psnr_mean"] == pytest.approx(np.mean(expected_psnr), abs=1e-3)
    assert report["ssim_mean"] == pytest.approx(np.mean(expected_ssim), abs=1e-3)
    assert report["psnr"] == pytest.approx(expected_psnr, abs=1e-3)


def test_integer_samples_use_their_dtype_range(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    gt = _stripes_uint8()
    samples = np.stack([gt, np.clip(gt.astype(int) + 10, 0, 255).astype(np.uint8)])
    args = [_write(tmp_path, "pred.tif", gt), _write(tmp_path, "gt.tif", gt)]
    std_path = _write(tmp_path, "std.tif", np.full(gt.shape, 2.0, np.float32))
    path = _write(tmp_path, "samples.tif", samples)
    code, out, err = run_cli(
        capsys, "evaluate", *args, "--samples", path, "--std", std_path, "--crop", 2, "--json"
    )
    assert code == 0, err
    payload = json.loads(out)
    assert payload["samples"]["psnr"][0] is None  # identical sample: infinite PSNR
    assert payload["samples"]["psnr"][1] == pytest.approx(20 * np.log10(255 / 10), abs=1e-3)
    assert payload["uncertainty"]["mean_std"] == pytest.approx(2.0 / 255.0, rel=1e-5)
    assert payload["uncertainty"]["std_error_pearson"] is None  # constant std: undefined
    code, text, err = run_cli(
        capsys, "evaluate", *args, "--samples", path, "--std", std_path, "--crop", 2
    )
    assert code == 0, err
    assert "mean of 2 single samples" in text and "Pearson n/a" in text


def test_plain_evaluate_has_no_uncertainty_keys(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    gt = _stripes_uint8()
    args = [_write(tmp_path, "pred.tif", gt), _write(tmp_path, "gt.tif", gt)]
    code, out, err = run_cli(capsys, "evaluate", *args, "--crop", 2, "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert "uncertainty" not in payload and "samples" not in payload


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    gt = _stripes_uint8(32)
    return _write(tmp_path, "pred.tif", gt), _write(tmp_path, "gt.tif", gt)


def test_std_shape_mismatch(capsys: pytest.CaptureFixture, tmp_path: Path, pair) -> None:
    std = _write(tmp_path, "std.tif", np.ones((32, 30), np.float32))
    assert_bad_input(*run_cli(capsys, "evaluate", *pair, "--std", std, "--crop", 2), "shape")


def test_negative_std(capsys: pytest.CaptureFixture, tmp_path: Path, pair) -> None:
    values = np.ones((32, 32), np.float32)
    values[3, 3] = -0.5
    std = _write(tmp_path, "std.tif", values)
    assert_bad_input(*run_cli(capsys, "evaluate", *pair, "--std", std, "--crop", 2), "negative")


def test_nan_std(capsys: pytest.CaptureFixture, tmp_path: Path, pair) -> None:
    values = np.ones((32, 32), np.float32)
    values[3, 3] = np.nan
    std = _write(tmp_path, "std.tif", values)
    assert_bad_input(*run_cli(capsys, "evaluate", *pair, "--std", std, "--crop", 2), "nan")


def test_missing_std_file(capsys: pytest.CaptureFixture, tmp_path: Path, pair) -> None:
    missing = tmp_path / "nope.tif"
    assert_bad_input(
        *run_cli(capsys, "evaluate", *pair, "--std", missing, "--crop", 2), "does not exist"
    )


@pytest.mark.parametrize("shape", [(3, 32, 30), (32, 32)])
def test_samples_shape_mismatch(
    capsys: pytest.CaptureFixture, tmp_path: Path, pair, shape: tuple[int, ...]
) -> None:
    samples = _write(tmp_path, "samples.tif", np.zeros(shape, np.float32))
    assert_bad_input(
        *run_cli(capsys, "evaluate", *pair, "--samples", samples, "--crop", 2), "first axis"
    )


def test_nan_samples(capsys: pytest.CaptureFixture, tmp_path: Path, pair) -> None:
    values = np.zeros((2, 32, 32), np.float32)
    values[1, 0, 0] = np.nan
    samples = _write(tmp_path, "samples.tif", values)
    assert_bad_input(*run_cli(capsys, "evaluate", *pair, "--samples", samples, "--crop", 2), "nan")


def test_samples_of_a_stack_are_refused(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    stack = np.stack([_stripes_uint8(32)] * 2)
    pred, gt = _write(tmp_path, "pred.tif", stack), _write(tmp_path, "gt.tif", stack)
    samples = _write(tmp_path, "samples.tif", stack)
    assert_bad_input(
        *run_cli(capsys, "evaluate", pred, gt, "--samples", samples, "--crop", 2), "2D"
    )
