"""Tests of the posterior-sample statistics: running moments, calibration, edge/flat ratio."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_wpp.core.errors import InputError
from napari_wpp.core.uncertainty import (
    RunningMoments,
    calibration,
    edge_flat_std_ratio,
    gaussian_coverage,
)

# --------------------------------------------------------------------------- running moments


def _random_splits(rng: np.random.Generator, total: int) -> list[int]:
    cuts = np.sort(rng.choice(np.arange(1, total), size=rng.integers(1, 5), replace=False))
    return list(np.diff(np.concatenate([[0], cuts, [total]])))


@pytest.mark.parametrize("seed", range(5))
def test_batches_match_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    samples = rng.normal(rng.random((6, 7)), 0.3, size=(13, 6, 7)).astype(np.float32)
    moments = RunningMoments()
    start = 0
    for size in _random_splits(rng, len(samples)):
        moments.update(samples[start : start + size])
        start += size
    assert moments.count == len(samples)
    np.testing.assert_allclose(moments.mean, samples.astype(np.float64).mean(0), atol=1e-6)
    np.testing.assert_allclose(moments.std, samples.astype(np.float64).std(0, ddof=1), atol=1e-6)
    np.testing.assert_allclose(
        moments.variance, samples.astype(np.float64).var(0, ddof=1), atol=1e-6
    )


def test_add_update_and_merge_agree() -> None:
    rng = np.random.default_rng(7)
    samples = rng.random((10, 5, 4))
    one_by_one = RunningMoments()
    for sample in samples:
        one_by_one.add(sample)
    first, second = RunningMoments().update(samples[:3]), RunningMoments().update(samples[3:])
    merged = first.merge(second)
    expected_std = samples.std(0, ddof=1)
    for moments in (one_by_one, merged):
        assert moments.count == 10
        np.testing.assert_allclose(moments.mean, samples.mean(0), atol=1e-12)
        np.testing.assert_allclose(moments.std, expected_std, atol=1e-12)
    assert second.count == 7  # merge leaves the other accumulator alone
    np.testing.assert_allclose(second.mean, samples[3:].mean(0), atol=1e-12)


def test_merge_with_empty_accumulators() -> None:
    samples = np.random.default_rng(1).random((4, 3, 3))
    filled = RunningMoments().update(samples)
    assert filled.merge(RunningMoments()).count == 4
    fresh = RunningMoments().merge(filled)
    np.testing.assert_allclose(fresh.std, samples.std(0, ddof=1), atol=1e-12)
    with pytest.raises(InputError, match="RunningMoments"):
        fresh.merge(samples)  # type: ignore[arg-type]


def test_large_offset_is_stable() -> None:
    rng = np.random.default_rng(3)
    noise = rng.normal(0.0, 1e-3, size=(200, 8, 8))
    samples = (1e4 + noise).astype(np.float64)
    moments = RunningMoments()
    for start in range(0, 200, 37):
        moments.update(samples[start : start + 37])
    expected = noise.std(0, ddof=1)  # exact reference without the offset
    np.testing.assert_allclose(moments.std, expected, rtol=1e-6)
    single = RunningMoments()
    for sample in samples:
        single.add(sample)
    np.testing.assert_allclose(single.std, expected, rtol=1e-6)


def test_single_sample_has_zero_std_and_empty_raises() -> None:
    moments = RunningMoments()
    with pytest.raises(InputError, match="no samples"):
        _ = moments.mean
    assert moments.shape is None
    sample = np.arange(6.0).reshape(2, 3)
    moments.add(sample)
    np.testing.assert_array_equal(moments.std, np.zeros((2, 3)))
    np.testing.assert_array_equal(moments.mean, sample)
    moments.update(sample[None][:0])  # empty batch: nothing changes
    assert moments.count == 1 and moments.shape == (2, 3)


def test_shape_mismatch_and_bad_dtype() -> None:
    moments = RunningMoments().update(np.zeros((2, 4, 4)))
    with pytest.raises(InputError, match="shape"):
        moments.update(np.zeros((2, 4, 5)))
    with pytest.raises(InputError, match="shape"):
        moments.add(np.zeros((3, 4, 4)))
    with pytest.raises(InputError, match="shape"):
        moments.merge(RunningMoments().add(np.zeros((5, 5))))
    with pytest.raises(InputError, match="dtype"):
        RunningMoments().add(np.array([["a"]]))
    with pytest.raises(InputError, match="add"):
        RunningMoments().update(np.float64(1.0))


def test_inputs_not_modified_and_outputs_not_shared() -> None:
    rng = np.random.default_rng(2)
    array = rng.random((3, 4, 4))
    tensor = torch.from_numpy(rng.random((3, 4, 4)))
    array_copy, tensor_copy = array.copy(), tensor.clone()
    for data in (array, tensor):
        moments = RunningMoments()
        moments.add(data[0])
        mean_after_one = moments.mean
        kept = mean_after_one.copy() if isinstance(data, np.ndarray) else mean_after_one.clone()
        moments.add(data[1])
        moments.update(data)
        assert np.array_equal(np.asarray(mean_after_one), np.asarray(kept))
    np.testing.assert_array_equal(array, array_copy)
    assert torch.equal(tensor, tensor_copy)


def test_torch_in_torch_out() -> None:
    samples = torch.rand(5, 3, 3, dtype=torch.float32)
    moments = RunningMoments().update(samples)
    assert isinstance(moments.mean, torch.Tensor) and moments.mean.dtype == torch.float64
    assert isinstance(moments.std, torch.Tensor)
    expected = samples.double().std(dim=0, unbiased=True)
    assert torch.allclose(moments.std, expected, atol=1e-12)
    # numpy batches can follow; the output kind stays that of the first input
    moments.update(samples.numpy())
    assert isinstance(moments.mean, torch.Tensor) and moments.count == 10
    assert isinstance(RunningMoments().add(np.zeros((2, 2))).mean, np.ndarray)


# --------------------------------------------------------------------------- calibration


def _gaussian_case(
    seed: int = 0, shape: tuple[int, ...] = (256, 256)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truth, mean and std where the error is Gaussian with exactly the given std."""
    rng = np.random.default_rng(seed)
    truth = rng.random(shape)
    std = rng.uniform(0.01, 0.1, size=shape)
    mean = truth + rng.normal(size=shape) * std
    return truth, mean, std


def test_gaussian_errors_are_calibrated() -> None:
    truth, mean, std = _gaussian_case()
    result = calibration(truth, mean, std)
    for k, expected in ((1, 0.6827), (2, 0.9545), (3, 0.9973)):
        assert result[f"expected_{k}sd"] == pytest.approx(expected, abs=1e-4)
        assert result[f"coverage_{k}sd"] == pytest.approx(expected, abs=0.01)
    # |error| grows with std by construction: clearly positive correlations
    assert result["std_error_pearson"] > 0.3
    assert result["std_error_spearman"] > 0.3
    assert result["mean_std"] == pytest.approx(std.mean())
    assert result["mean_abs_error"] == pytest.approx(np.abs(truth - mean).mean())
    assert result["pixels"] == truth.size and result["zero_std_fraction"] == 0.0


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_mis_scaled_std_changes_coverage_as_predicted(factor: float) -> None:
    truth, mean, std = _gaussian_case(seed=1)
    result = calibration(truth, mean, std * factor)
    for k in (1, 2, 3):
        # |error| <= k * factor * std has Gaussian probability erf(k * factor / sqrt 2)
        assert result[f"coverage_{k}sd"] == pytest.approx(gaussian_coverage(k * factor), abs=0.01)
    if factor < 1:
        assert result["coverage_1sd"] < result["expected_1sd"] - 0.2  # over-confident
    else:
        assert result["coverage_1sd"] > result["expected_1sd"] + 0.2  # under-confident


def test_zero_std_covers_only_exact_pixels() -> None:
    truth = np.zeros((4, 4))
    mean = truth.copy()
    mean[0, :] = 0.5  # 4 wrong pixels out of 16
    std = np.zeros((4, 4))
    result = calibration(truth, mean, std)
    for k in (1, 2, 3):
        assert result[f"coverage_{k}sd"] == pytest.approx(12 / 16)
    assert result["zero_std_fraction"] == 1.0
    assert math.isnan(result["std_error_pearson"]) and math.isnan(result["std_error_spearman"])


def test_perfect_std_error_ranking() -> None:
    rng = np.random.default_rng(4)
    truth = rng.random((32, 32))
    error = rng.random((32, 32))
    result = calibration(truth, truth + error, error)
    assert result["std_error_pearson"] == pytest.approx(1.0)
    assert result["std_error_spearman"] == pytest.approx(1.0)
    assert result["coverage_2sd"] == 1.0  # |error| == std up to rounding


def test_crop_removes_border() -> None:
    truth, mean, std = _gaussian_case(seed=2, shape=(2, 64, 64))
    mean = mean.copy()
    mean[..., :4, :] += 100.0  # hopeless errors only in the top border
    cropped = calibration(truth, mean, std, crop=4)
    assert cropped["pixels"] == 2 * 56 * 56
    assert cropped["coverage_3sd"] > 0.98
    assert calibration(truth, mean, std)["coverage_3sd"] < 0.95


def test_calibration_accepts_tensors_and_keeps_inputs() -> None:
    truth, mean, std = _gaussian_case(seed=3, shape=(32, 32))
    copies = [a.copy() for a in (truth, mean, std)]
    from_numpy = calibration(truth, mean, std, crop=2)
    from_torch = calibration(*(torch.from_numpy(a) for a in (truth, mean, std)), crop=2)
    assert from_numpy == from_torch
    for original, copy in zip((truth, mean, std), copies):
        np.testing.assert_array_equal(original, copy)


def test_calibration_bad_input() -> None:
    truth, mean, std = _gaussian_case(shape=(16, 16))
    with pytest.raises(InputError, match="shape"):
        calibration(truth, mean, std[:, :8])
    bad = mean.copy()
    bad[3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        calibration(truth, bad, std)
    with pytest.raises(InputError, match="negative"):
        calibration(truth, mean, -std)
    with pytest.raises(InputError, match="crop"):
        calibration(truth, mean, std, crop=8)
    with pytest.raises(InputError, match="2D"):
        calibration(truth[0], mean[0], std[0])


# --------------------------------------------------------------------------- edge / flat ratio


def _stripes(size: int = 64, period: int = 16) -> np.ndarray:
    """Vertical stripes of width ``period // 2``: sharp edges, everything else exactly flat."""
    columns = (np.arange(size) // (period // 2)) % 2
    return np.tile(columns.astype(np.float64), (size, 1))


def test_std_on_edges_gives_the_constructed_ratio() -> None:
    truth = _stripes()
    on_edge = np.zeros_like(truth, dtype=bool)
    on_edge[:, 1:] |= truth[:, 1:] != truth[:, :-1]
    on_edge[:, :-1] |= truth[:, 1:] != truth[:, :-1]  # both sides of every step
    std = np.where(on_edge, 0.05, 0.01)
    result = edge_flat_std_ratio(truth, std)
    # 2 of every 8 columns touch a step: 25 % of pixels >= the 10 % edge share, all at 0.05;
    # the flattest 50 % are all away from steps, at 0.01
    assert result["edge_mean_std"] == pytest.approx(0.05)
    assert result["flat_mean_std"] == pytest.approx(0.01)
    assert result["edge_flat_ratio"] == pytest.approx(5.0)
    assert result["edge_flat_ratio"] >= 2.0


def test_flat_or_random_std_gives_ratio_near_one() -> None:
    truth = _stripes()
    assert edge_flat_std_ratio(truth, np.full_like(truth, 0.02))["edge_flat_ratio"] == (
        pytest.approx(1.0)
    )
    noise = np.random.default_rng(5).uniform(0.0, 0.1, truth.shape)
    assert edge_flat_std_ratio(truth, noise)["edge_flat_ratio"] == pytest.approx(1.0, abs=0.1)


def test_ratio_does_not_depend_on_pixel_order() -> None:
    truth = _stripes()
    std = np.random.default_rng(6).uniform(0.0, 0.1, truth.shape)
    upright = edge_flat_std_ratio(truth, std)
    transposed = edge_flat_std_ratio(truth.T, std.T)
    assert transposed["edge_flat_ratio"] == pytest.approx(upright["edge_flat_ratio"])


def test_stack_of_identical_slices_matches_one_slice() -> None:
    rng = np.random.default_rng(8)
    truth = _stripes(48)
    std = rng.uniform(0.0, 0.1, truth.shape) + 0.1 * (truth > 0)
    single = edge_flat_std_ratio(truth, std, crop=3)
    stacked = edge_flat_std_ratio(np.stack([truth] * 3), np.stack([std] * 3), crop=3)
    assert stacked["edge_flat_ratio"] == pytest.approx(single["edge_flat_ratio"])


def test_zero_flat_std() -> None:
    truth = _stripes()
    std = np.zeros_like(truth)
    assert math.isnan(edge_flat_std_ratio(truth, std)["edge_flat_ratio"])
    std[:, 7:9] = 1.0  # a step lies between columns 7 and 8
    assert edge_flat_std_ratio(truth, std)["edge_flat_ratio"] == math.inf


def test_edge_flat_bad_input() -> None:
    truth = _stripes(16)
    std = np.ones_like(truth)
    with pytest.raises(InputError, match="edge_fraction"):
        edge_flat_std_ratio(truth, std, edge_fraction=0.0)
    with pytest.raises(InputError, match="exceeds 1"):
        edge_flat_std_ratio(truth, std, edge_fraction=0.6, flat_fraction=0.6)
    with pytest.raises(InputError, match="shape"):
        edge_flat_std_ratio(truth, std[:8])
    with pytest.raises(InputError, match="negative"):
        edge_flat_std_ratio(truth, -std)
