"""Reference suitability map and blur-width search (core, job, CLI), synthetic and real data."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import tifffile
import torch
from cli_helpers import assert_bad_input, run_cli

from napari_wpp.core.config import BlurCheckSpec, SuitabilitySpec
from napari_wpp.core.operators import GaussianDownsampling, add_noise
from napari_wpp.core.suitability import (
    SUITABILITY_RANGES,
    degraded_patches,
    estimate_blur_sigma,
    suitability,
    suitability_verdict,
)
from napari_wpp.data import synthetic_volume
from napari_wpp.jobs.suitability import sigma_warning

NOISE = 0.01


def _float(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.astype(np.float32) / 255.0)


@pytest.fixture(scope="module")
def three_phase() -> np.ndarray:
    """Two uint8 slices of a 3-phase synthetic material, far apart (data and reference)."""
    return synthetic_volume((2, 320, 320), phases=3, seed=1)


def _degrade(hr: torch.Tensor, scale: int = 4, sigma: float = 2.0, seed: int = 0):
    operator = GaussianDownsampling(scale, sigma, 16)
    with torch.no_grad():
        return add_noise(operator(hr), NOISE, seed=seed), operator


def test_verdict_ranges_are_ordered() -> None:
    tops = [top for _, top in SUITABILITY_RANGES]
    assert tops == sorted(tops)
    assert suitability_verdict(0.5) == "suits"
    assert suitability_verdict(tops[0] + 0.1) == "partly"
    assert suitability_verdict(1e6) == "does not suit"


def test_degraded_patches_pool_the_phases() -> None:
    hr = torch.rand(64, 64)
    operator = GaussianDownsampling(4, 2.0, 16)
    one = degraded_patches(hr, operator, 4, 1)
    four = degraded_patches(hr, operator, 4, 2)
    assert one.shape == (13 * 13, 16)
    assert four.shape[0] > 3 * one.shape[0]
    assert torch.equal(four[: one.shape[0]], one)  # offset (0, 0) first


def test_the_reference_itself_is_explained_up_to_the_noise(three_phase) -> None:
    hr = _float(three_phase[0])
    lr, operator = _degrade(hr)
    result = suitability(lr, hr, operator, SuitabilitySpec(noise_std=NOISE))
    assert result.score_map.shape == (1, 80, 80)
    assert 0.3 < result.median_score < 1.5  # d² ≈ p² σ² for the image's own patches
    assert result.verdict == "suits"


def test_a_reference_missing_a_phase_lights_up_where_that_phase_is() -> None:
    data_hr = synthetic_volume((1, 320, 320), phases=3, seed=1)[0]
    two_phase = synthetic_volume((1, 320, 320), phases=2, seed=2)[0]
    three_phase_ref = synthetic_volume((1, 320, 320), phases=3, seed=2)[0]
    lr, operator = _degrade(_float(data_hr))
    spec = SuitabilitySpec(noise_std=NOISE)
    full = suitability(lr, _float(three_phase_ref), operator, spec)
    missing = suitability(lr, _float(two_phase), operator, spec)
    assert missing.median_score > full.median_score
    # the bright phase (the 3rd) of the data, on the LR grid
    bright = operator(torch.from_numpy((data_hr > 170).astype(np.float32))).numpy() > 0.5
    assert bright.mean() > 0.01
    lit = missing.score_map[0]
    assert np.median(lit[bright]) > 3 * np.median(lit[~bright])
    assert np.median(lit[bright]) > 3 * np.median(full.score_map[0][bright])


def test_the_score_is_relative_to_the_noise(three_phase) -> None:
    hr = _float(three_phase[0])
    lr, operator = _degrade(hr)
    low = suitability(lr, _float(three_phase[1]), operator, SuitabilitySpec(noise_std=NOISE))
    high = suitability(lr, _float(three_phase[1]), operator, SuitabilitySpec(noise_std=2 * NOISE))
    assert high.median_score == pytest.approx(low.median_score / 4, rel=1e-4)


def test_suitability_refuses_bad_input(three_phase) -> None:
    from napari_wpp.core.errors import InputError

    hr = _float(three_phase[0])
    operator = GaussianDownsampling(4, 2.0, 16)
    with pytest.raises(InputError, match="noise"):
        suitability(operator(hr), hr, operator, SuitabilitySpec(noise_std=0.0))
    with pytest.raises(InputError, match="too small"):
        suitability(operator(hr), hr[:12, :12], operator, SuitabilitySpec())
    with pytest.raises(InputError, match="float"):
        suitability(np.zeros((20, 20), np.uint8), hr, operator, SuitabilitySpec())


@pytest.mark.parametrize(("scale", "sigma"), [(4, 1.5), (2, 1.2)])
def test_blur_search_recovers_the_sigma_of_synthetic_data(three_phase, scale, sigma) -> None:
    lr, _ = _degrade(_float(three_phase[0]), scale, sigma)
    fit = estimate_blur_sigma(lr, _float(three_phase[1]), BlurCheckSpec(scale=scale))
    assert not fit.at_bound
    assert fit.sigma == pytest.approx(sigma, rel=0.2)
    assert min(fit.residuals) == pytest.approx(
        fit.residuals[fit.sigmas.index(min(fit.sigmas, key=lambda s: abs(s - fit.sigma)))],
        rel=0.05,
    )


def test_sigma_warning() -> None:
    assert sigma_warning(2.0, 2.08) is None
    message = sigma_warning(4.0, 2.0)
    assert message is not None and "2.00" in message and "4" in message


# --------------------------------------------------------------------------- real data
def _read(path) -> torch.Tensor:
    import imageio.v3 as iio

    return _float(np.asarray(iio.imread(path)))


def test_sic_reference_suits_sic_data_other_materials_are_flagged(shared_file) -> None:
    lr = _read(shared_file("sic/lr_SiC_x4.png"))
    operator = GaussianDownsampling(4, 2.0, 16, anchor="corner")
    spec = SuitabilitySpec(noise_std=NOISE)
    sic = suitability(lr, _read(shared_file("sic/ref_SiC.png")), operator, spec)
    sandstone_hr = _read(shared_file("fs_registered_pair/FS_HR_estimate_operator.png"))
    sandstone = suitability(lr, sandstone_hr[:800, :800], operator, spec)
    synthetic = suitability(lr, _float(synthetic_volume((1, 600, 600))[0]), operator, spec)
    assert sic.verdict == "suits", sic.summary()
    assert sandstone.verdict == "does not suit", sandstone.summary()
    assert synthetic.verdict == "does not suit", synthetic.summary()
    assert sandstone.median_score > 2 * sic.median_score


def test_blur_search_on_sic_x4_recovers_sigma_2(shared_file) -> None:
    lr = _read(shared_file("sic/lr_SiC_x4.png"))
    ref = _read(shared_file("sic/ref_SiC.png"))
    fit = estimate_blur_sigma(lr, ref, BlurCheckSpec(scale=4))
    assert abs(fit.sigma - 2.0) <= 0.25, fit


# --------------------------------------------------------------------------- CLI
@pytest.fixture
def pair_files(tmp_path, three_phase):
    lr, _ = _degrade(_float(three_phase[0]))
    lr8 = np.clip(np.rint(lr.numpy() * 255), 0, 255).astype(np.uint8)
    lr_path, ref_path = tmp_path / "lr.tif", tmp_path / "ref.tif"
    tifffile.imwrite(lr_path, np.stack([lr8, lr8[::-1]]))
    tifffile.imwrite(ref_path, three_phase[1])
    return lr_path, ref_path


def test_cli_suitability_writes_the_map(capsys, tmp_path, pair_files) -> None:
    lr_path, ref_path = pair_files
    out = tmp_path / "map.tif"
    code, stdout, _ = run_cli(
        capsys, "suitability", "--lr", lr_path, "--reference", ref_path, "--scale", 4,
        "--out", out, "--json",
    )  # fmt: skip
    assert code == 0
    payload = json.loads(stdout)
    assert payload["verdict"] == suitability_verdict(payload["median_score"])
    score_map = tifffile.imread(out)
    assert score_map.shape == (2, 80, 80) and score_map.dtype == np.float32
    assert payload["unexplained"] == pytest.approx(float((score_map > 8.0).mean()))


def test_cli_suitability_needs_an_operator(capsys, pair_files) -> None:
    lr_path, ref_path = pair_files
    result = run_cli(capsys, "suitability", "--lr", lr_path, "--reference", ref_path)
    assert_bad_input(*result, "operator")


def test_cli_estimate_operator_without_hr_prints_sigma(capsys, tmp_path, three_phase) -> None:
    lr, _ = _degrade(_float(three_phase[0]), 4, 1.5)
    lr_path, ref_path = tmp_path / "lr.tif", tmp_path / "ref.tif"
    tifffile.imwrite(lr_path, np.clip(np.rint(lr.numpy() * 255), 0, 255).astype(np.uint8))
    tifffile.imwrite(ref_path, three_phase[1])
    argv = ["estimate-operator", "--lr", lr_path, "--reference", ref_path, "--scale", 4]
    code, stdout, _ = run_cli(capsys, *argv, "--json")
    assert code == 0
    payload = json.loads(stdout)
    assert payload["sigma"] == pytest.approx(1.5, rel=0.2)
    assert len(payload["sigmas"]) == len(payload["residuals"])
    assert_bad_input(*run_cli(capsys, *argv[:3], "--scale", 4), "--reference")
    assert_bad_input(*run_cli(capsys, *argv, "--out", tmp_path / "op.json"), "--hr")


def test_spec_fields_reach_the_core(three_phase) -> None:
    hr = _float(three_phase[0])
    lr, operator = _degrade(hr)
    spec = SuitabilitySpec(noise_std=NOISE, reference_patches=1000)
    small = suitability(lr, hr, operator, spec)
    assert small.reference_patches == 1000
    full = suitability(lr, hr, operator, replace(spec, reference_patches=10**6))
    assert full.median_score < small.median_score
