"""Tests of PSNR, SSIM and blur effect."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.measure import blur_effect as sk_blur
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from napari_wpp.core import metrics
from napari_wpp.core.errors import InputError


def _pair(seed: int = 0, shape: tuple[int, ...] = (96, 96)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.random(shape).astype(np.float32)
    pred = np.clip(truth + rng.normal(0, 0.05, shape), 0, 1).astype(np.float32)
    return pred, truth


def test_psnr_hand_computed() -> None:
    truth = np.zeros((100, 100), np.float32)
    pred = np.full((100, 100), 0.1, np.float32)  # MSE 0.01 -> 20 dB
    assert metrics.psnr(pred, truth, crop=0) == pytest.approx(20.0, abs=1e-4)
    pred[:40, :] = 0.0  # rows 0..39 lie in the 40-px border: cropped away
    assert metrics.psnr(pred, truth, crop=40) == pytest.approx(20.0, abs=1e-4)
    assert metrics.psnr(pred, truth, crop=0) == pytest.approx(
        10 * math.log10(1 / (0.01 * 0.6)), abs=1e-4
    )


def test_psnr_clips_to_unit_range() -> None:
    truth = np.full((20, 20), 1.0, np.float32)
    pred = np.full((20, 20), 1.5, np.float32)  # clipped to 1 -> identical
    assert metrics.psnr(pred, truth, crop=0) == math.inf


def test_agrees_with_skimage_with_crop() -> None:
    pred, truth = _pair()
    c = 10
    p, t = pred[c:-c, c:-c].astype(np.float64), truth[c:-c, c:-c].astype(np.float64)
    res = metrics.evaluate(pred, truth, crop=c)
    assert set(res) == {"psnr", "ssim", "blur_effect"}
    assert res["psnr"] == pytest.approx(peak_signal_noise_ratio(t, p, data_range=1.0), rel=1e-9)
    assert res["ssim"] == pytest.approx(structural_similarity(t, p, data_range=1.0), rel=1e-9)
    assert res["blur_effect"] == pytest.approx(sk_blur(p), rel=1e-9)
    assert metrics.ssim(pred, truth, crop=c) == pytest.approx(res["ssim"])
    assert metrics.blur_effect(pred, crop=c) == pytest.approx(res["blur_effect"])
    assert all(isinstance(v, float) for v in res.values())


def test_stack_is_mean_over_slices() -> None:
    a, ta = _pair(1, (64, 64))
    b, tb = _pair(2, (64, 64))
    b = np.clip(b + 0.1, 0, 1).astype(np.float32)
    res = metrics.evaluate(np.stack([a, b]), np.stack([ta, tb]), crop=5)
    ra = metrics.evaluate(a, ta, crop=5)
    rb = metrics.evaluate(b, tb, crop=5)
    for key in res:
        assert res[key] == pytest.approx((ra[key] + rb[key]) / 2)


def test_blur_effect_orders_sharp_and_blurred() -> None:
    from scipy.ndimage import gaussian_filter

    sharp = np.zeros((96, 96), np.float32)
    sharp[::8] = 1.0
    sharp[:, ::12] = 1.0
    blurred = gaussian_filter(sharp, 2.0)
    assert metrics.blur_effect(blurred, crop=4) > metrics.blur_effect(sharp, crop=4)


def test_better_prediction_scores_higher() -> None:
    rng = np.random.default_rng(3)
    truth = rng.random((80, 80)).astype(np.float32)
    good = (truth + rng.normal(0, 0.02, truth.shape)).astype(np.float32)
    bad = (truth + rng.normal(0, 0.2, truth.shape)).astype(np.float32)
    rg, rb = metrics.evaluate(good, truth, crop=0), metrics.evaluate(bad, truth, crop=0)
    assert rg["psnr"] > rb["psnr"] + 10
    assert rg["ssim"] > rb["ssim"]


def test_inputs_not_modified() -> None:
    pred, truth = _pair()
    pred[0, 0] = 1.7
    pc, tc = pred.copy(), truth.copy()
    metrics.evaluate(pred, truth, crop=3)
    np.testing.assert_array_equal(pred, pc)
    np.testing.assert_array_equal(truth, tc)


@pytest.mark.parametrize(
    ("pred", "truth", "crop"),
    [
        (np.zeros((10, 10), np.float32), np.zeros((10, 12), np.float32), 0),
        (np.zeros((10, 10), np.float32), np.zeros((10, 10), np.float32), 5),
        (np.zeros((10, 10), np.float32), np.zeros((10, 10), np.float32), -1),
        (np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8), 0),
        (np.full((10, 10), np.nan, np.float32), np.zeros((10, 10), np.float32), 0),
        (np.zeros(10, np.float32), np.zeros(10, np.float32), 0),
        (np.zeros((20, 20), np.float32), np.zeros((20, 20), np.float32), 8),  # 4 px: no SSIM
    ],
)
def test_bad_inputs_raise_one_line(pred: np.ndarray, truth: np.ndarray, crop: int) -> None:
    with pytest.raises(InputError) as info:
        metrics.evaluate(pred, truth, crop=crop)
    assert "\n" not in str(info.value)


@pytest.mark.realdata
def test_known_answers_on_sic(shared_file) -> None:
    """Known answers (../shared/data/README.md, published tables).

    Truth blur effect 0.321; bicubic x4 18.48 dB unaligned, 25.22 dB rolled.
    """
    torch = pytest.importorskip("torch")
    import imageio.v3 as iio

    hr = iio.imread(shared_file("sic/hr_SiC.png")).astype(np.float32) / 255
    lr = iio.imread(shared_file("sic/lr_SiC_x4.png")).astype(np.float32) / 255
    up = torch.nn.functional.interpolate(
        torch.from_numpy(lr)[None, None], scale_factor=4, mode="bicubic", align_corners=False
    )[0, 0].numpy()
    assert metrics.blur_effect(hr) == pytest.approx(0.321, abs=0.001)
    assert metrics.psnr(up, hr) == pytest.approx(18.48, abs=0.01)
    assert metrics.psnr(np.roll(up, (6, 6), (0, 1)), hr) == pytest.approx(25.22, abs=0.01)
