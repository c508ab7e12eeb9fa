"""Gaussian patch transport and the ground-truth-free readouts, on Gaussian toys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from napari_wpp.core.errors import InputError
from napari_wpp.core.operators import GaussianDownsampling
from napari_wpp.core.patch_distance import (
    blend_distances,
    data_rms,
    default_alpha,
    estimate_noise,
    gelbrich_distance,
    reference_band,
    sample_patches,
    sliced_wasserstein,
)
from napari_wpp.core.patches import extract_patches
from napari_wpp.core.transport import (
    GaussianTransport,
    PatchMoments,
    PatchStatistics,
    blend,
    check_alpha,
    data_consistency,
    patch_statistics,
)


def field(shape: tuple[int, ...], sigma: float, amplitude: float, mean: float, seed: int):
    """A stationary Gaussian random field (white noise blurred on the last two axes)."""
    rng = np.random.default_rng(seed)
    sig = (0,) * (len(shape) - 2) + (sigma, sigma)
    return gaussian_filter(rng.normal(size=shape), sig) * amplitude + mean


def all_patches(images: np.ndarray, p: int) -> np.ndarray:
    return extract_patches(torch.from_numpy(np.asarray(images, np.float64)), p).numpy()


@pytest.fixture(scope="module")
def toys():
    source = field((2, 90, 100), 1.5, 0.3, 0.5, 0)
    target = field((120, 110), 0.7, 0.2, 0.4, 1)
    return source, target


def test_streamed_statistics_equal_the_direct_ones(monkeypatch, toys):
    import napari_wpp.core.transport as transport

    monkeypatch.setattr(transport, "_BAND_ROWS", 7)  # many bands and merges
    source, target = toys
    moments = PatchMoments(4).add(source).add(target[:50, :60])
    stats = moments.statistics()
    patches = np.concatenate([all_patches(source, 4), all_patches(target[:50, :60], 4)])
    assert stats.count == len(patches)
    np.testing.assert_allclose(stats.mean, patches.mean(0), atol=1e-12)
    np.testing.assert_allclose(stats.covariance, np.cov(patches.T, bias=True), atol=1e-12)


def test_transported_patches_have_the_targets_statistics(toys):
    source, target = toys
    s, t = patch_statistics(source, 4), patch_statistics(target, 4)
    moved = GaussianTransport.fit(s, t, floor=0.0).transport_patches(all_patches(source, 4))
    np.testing.assert_allclose(moved.mean(0), t.mean, atol=1e-10)
    scale = np.abs(t.covariance).max()
    np.testing.assert_allclose(np.cov(moved.T, bias=True), t.covariance, atol=1e-8 * scale)


def test_equal_statistics_give_the_identity(toys):
    _, source = toys  # well conditioned: without a floor the square roots stay accurate
    s = patch_statistics(source, 5)
    shifted = PatchStatistics(5, s.count, s.mean + 0.1, s.covariance)
    transport = GaussianTransport.fit(s, shifted, floor=0.0)
    np.testing.assert_allclose(transport.matrix, np.eye(25), atol=1e-8)
    np.testing.assert_allclose(transport.offset, 0.1, atol=1e-8)
    out = transport.apply(source)
    np.testing.assert_allclose(out, source + 0.1, atol=1e-5)


def test_convolution_form_equals_fold_form(toys):
    source, target = toys
    transport = GaussianTransport.fit(
        patch_statistics(source, 4), patch_statistics(target, 4), floor=1e-6
    )
    conv, fold = transport.apply(source), transport.apply_fold(source)
    assert conv.shape == source.shape and conv.dtype == np.float32
    assert np.abs(conv - source).mean() > 0.01  # it does move the image
    np.testing.assert_allclose(conv, fold, atol=2e-5)


def test_reapplying_is_close_to_identity(toys):
    source, target = toys
    t = patch_statistics(target, 4)
    first = GaussianTransport.fit(patch_statistics(source, 4), t, floor=0.0)
    # on patches the second map is exactly the identity
    moved = first.transport_patches(all_patches(source, 4))
    moments = PatchMoments(4)
    moments._add_patches(torch.from_numpy(moved))
    again = GaussianTransport.fit(moments.statistics(), t, floor=0.0)
    np.testing.assert_allclose(again.matrix, np.eye(16), atol=1e-6)
    # on images (patches folded back) the second transport moves far less than the first
    x1 = first.apply(source)
    second = GaussianTransport.fit(patch_statistics(x1, 4), t, floor=0.0)
    x2 = second.apply(x1)
    assert np.abs(x2 - x1).mean() < 0.25 * np.abs(x1 - source).mean()


def test_floor_bounds_the_map_of_a_blurry_source(toys):
    _, target = toys
    blurry = field((150, 150), 4.0, 0.3, 0.5, 3)  # near-singular patch covariance
    s, t = patch_statistics(blurry, 6), patch_statistics(target, 6)
    raw = GaussianTransport.fit(s, t, floor=0.0).distance_from_identity()
    floored = GaussianTransport.fit(s, t, floor=1e-4).distance_from_identity()
    assert floored < raw / 10


def test_blend_convention_and_alpha_range(toys):
    source, target = toys
    transported = GaussianTransport.fit(
        patch_statistics(source, 4), patch_statistics(target, 4)
    ).apply(source)
    before = source.copy()
    np.testing.assert_allclose(blend(source, transported, 1.0), source, atol=1e-6)
    np.testing.assert_allclose(blend(source, transported, 0.0), transported, atol=1e-6)
    half = blend(source, transported, 0.5)
    np.testing.assert_allclose(half, 0.5 * (source + transported), atol=1e-6)
    np.testing.assert_array_equal(source, before)
    assert check_alpha(1.5) == 1.5
    for bad in (-0.6, 1.6, float("nan"), "x"):
        with pytest.raises(InputError, match="alpha"):
            check_alpha(bad)


def test_mismatched_patch_sizes_and_tiny_images_are_refused(toys):
    source, target = toys
    with pytest.raises(InputError, match="one patch size"):
        GaussianTransport.fit(patch_statistics(source, 4), patch_statistics(target, 5))
    with pytest.raises(InputError, match="smaller than"):
        patch_statistics(np.zeros((3, 3)), 4)
    with pytest.raises(InputError, match="NaN"):
        patch_statistics(np.full((8, 8), np.nan), 4)


def test_data_consistency_stops_at_the_noise_level():
    operator = GaussianDownsampling(2, 1.0, 6)
    truth = torch.from_numpy(field((64, 64), 1.0, 0.3, 0.5, 5).astype(np.float32))
    with torch.no_grad():
        noise = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
        lr = operator(truth) + 0.01 * noise
    start = np.zeros((64, 64), np.float32) + 0.5
    loose = data_rms(start, lr, operator)
    fitted = data_consistency(start, lr, operator, steps=50, noise=0.01)
    assert data_rms(fitted, lr, operator) == pytest.approx(0.01, rel=1e-3)
    free = data_consistency(start, lr, operator, steps=50)
    assert data_rms(free, lr, operator) < 0.01 < loose
    assert operator._gx.dtype == torch.float64  # the caller's operator is not converted
    unchanged = data_consistency(start, lr, operator, steps=0)
    np.testing.assert_array_equal(unchanged, start)


def test_data_rms_leaves_out_the_border_the_padding_decides():
    operator = GaussianDownsampling(2, 1.0, 6, padding="circular")
    assert operator.border_margin == 3  # ⌈6 / 2⌉ LR pixels
    truth = torch.from_numpy(field((64, 64), 1.0, 0.3, 0.5, 5).astype(np.float32))
    with torch.no_grad():
        noise = torch.randn(32, 32, generator=torch.Generator().manual_seed(1))
        lr = operator(truth) + 0.01 * noise
    estimate = truth.numpy().copy()
    estimate[:, :2] = estimate[:, -2:] = 0.5  # wrong only where the kernel wraps around
    with torch.no_grad():
        whole = float(torch.sqrt(torch.mean((operator(torch.from_numpy(estimate)) - lr) ** 2)))
    assert data_rms(estimate, lr, operator) == pytest.approx(data_rms(truth, lr, operator))
    assert data_rms(truth, lr, operator) == pytest.approx(0.01, rel=0.1)
    assert whole > 1.5 * data_rms(estimate, lr, operator)


def test_gelbrich_distance_of_gaussians():
    d = 4
    rng = np.random.default_rng(0)
    a = rng.normal(size=(d, d))
    cov = a @ a.T + np.eye(d)
    s = PatchStatistics(2, 10, np.zeros(d), cov)
    assert gelbrich_distance(s, s) == pytest.approx(0.0, abs=1e-6)
    # a mean shift c in every pixel and a scaled covariance: closed form
    t = PatchStatistics(2, 10, np.full(d, 0.3), 4.0 * cov)
    expected = np.sqrt((d * 0.09 + np.trace(cov)) / d)  # tr(Σ + 4Σ − 2·2Σ) = tr Σ
    assert gelbrich_distance(s, t) == pytest.approx(expected, rel=1e-9)


def test_sliced_wasserstein_sees_shifts_and_not_reorderings():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4000, 9))
    assert sliced_wasserstein(a, a[::-1]) == pytest.approx(0.0, abs=1e-12)
    shifted = sliced_wasserstein(a, a + 0.5)
    assert shifted > 0.1
    assert sliced_wasserstein(a, a + 1.0) == pytest.approx(2 * shifted, rel=1e-6)


def test_reference_band_and_default_alpha(toys):
    source, target = toys
    band = reference_band(target, patch_size=4, samples=3000)
    summary = band.to_dict()["gelbrich"]
    assert 0 < summary["low"] <= summary["middle"] <= summary["high"]
    assert len(band.gelbrich) == 6  # the pairs of a 2 × 2 grid of one slice
    s, t = patch_statistics(source[0], 4), patch_statistics(target, 4)
    transported = GaussianTransport.fit(s, t).apply(source[0])
    alphas = np.linspace(0.0, 1.0, 11)
    curve = blend_distances(source[0], transported, t, alphas)
    direct = [
        gelbrich_distance(patch_statistics(blend(source[0], transported, a), 4), t) for a in alphas
    ]
    np.testing.assert_allclose(curve, direct, rtol=1e-5, atol=1e-9)
    assert curve[-1] > curve[0]  # the unchanged source is farther from the target
    goal = 0.5 * (curve[0] + curve[-1])
    alpha = default_alpha(alphas, curve, goal)
    assert 0.0 < alpha < 1.0
    moved = blend(source[0], transported, alpha)
    assert gelbrich_distance(patch_statistics(moved, 4), t) == pytest.approx(goal, rel=0.05)
    assert default_alpha(alphas, curve, curve[-1] + 1) == 1.0
    assert default_alpha(alphas, curve, 0.0) == 0.0


def test_noise_estimate_and_sample_patches():
    rng = np.random.default_rng(2)
    smooth = field((200, 200), 3.0, 0.3, 0.5, 7)
    noisy = smooth + rng.normal(scale=0.02, size=smooth.shape)
    assert estimate_noise(noisy) == pytest.approx(0.02, rel=0.15)
    picked = sample_patches(smooth, 3, 50, seed=1)
    assert picked.shape == (50, 9)
    rows = {tuple(r) for r in all_patches(smooth, 3).round(12)}
    assert all(tuple(r) in rows for r in picked.round(12))
