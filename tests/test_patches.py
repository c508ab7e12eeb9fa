"""Tests of patch extraction, reference sampling and pyramids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_wpp.core.errors import InputError
from napari_wpp.core.patches import (
    count_patches,
    extract_patches,
    gaussian_pyramid,
    sample_reference_patches,
)


def _manual_patches(img: np.ndarray, p: int, stride: int = 1) -> np.ndarray:
    h, w = img.shape
    out = [
        img[i : i + p, j : j + p].ravel()
        for i in range(0, h - p + 1, stride)
        for j in range(0, w - p + 1, stride)
    ]
    return np.array(out)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_extract_patches_matches_manual_slicing(stride: int) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.random((2, 3, 11, 9)).astype(np.float32)
    got = extract_patches(torch.from_numpy(imgs), patch_size=4, stride=stride).numpy()
    want = np.concatenate([_manual_patches(im, 4, stride) for im in imgs.reshape(-1, 11, 9)])
    np.testing.assert_array_equal(got, want)
    assert got.shape[0] == count_patches(imgs.shape, 4, stride)


def test_extract_patches_center_and_gradient() -> None:
    img = torch.rand(7, 8, requires_grad=True)
    pc = extract_patches(img, patch_size=3, center=True)
    assert torch.allclose(pc.mean(1), torch.zeros(pc.shape[0]), atol=1e-6)
    extract_patches(img, patch_size=3).sum().backward()
    # each pixel's gradient is the number of 3×3 patches covering it
    rows = np.minimum(np.minimum(np.arange(7) + 1, 3), np.minimum(7 - np.arange(7), 3))
    cols = np.minimum(np.minimum(np.arange(8) + 1, 3), np.minimum(8 - np.arange(8), 3))
    np.testing.assert_array_equal(img.grad.numpy(), np.outer(rows, cols).astype(np.float32))


def test_count_patches_small_and_errors() -> None:
    assert count_patches((5, 5), 6) == 0
    assert count_patches((4, 10, 12), 6, 2) == 4 * 3 * 4
    with pytest.raises(InputError):
        count_patches((10, 10), 0)
    with pytest.raises(InputError):
        extract_patches(torch.rand(4, 4), 6)


def test_sample_reference_patches_seeded_and_real_patches() -> None:
    rng = np.random.default_rng(1)
    ref = rng.random((40, 30)).astype(np.float32)
    a = sample_reference_patches(ref, 100, patch_size=5, seed=3)
    b = sample_reference_patches(ref, 100, patch_size=5, seed=3)
    c = sample_reference_patches(ref, 100, patch_size=5, seed=4)
    assert a.shape == (100, 25) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    allp = _manual_patches(ref, 5)
    # every sampled patch is a patch of the image, and they are distinct
    d = ((a.numpy()[:, None, :] - allp[None]) ** 2).sum(-1)
    assert np.all(d.min(1) == 0)
    assert len(np.unique(d.argmin(1))) == 100


def test_sample_reference_returns_all_when_fewer() -> None:
    ref = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    got = sample_reference_patches(ref, 1000, patch_size=6)
    np.testing.assert_array_equal(got.numpy(), _manual_patches(ref, 6))


def test_sample_reference_3d_pools_chosen_slices_and_region() -> None:
    vol = np.zeros((4, 20, 20), dtype=np.float32)
    for z in range(4):
        vol[z] = z / 10.0
    got = sample_reference_patches(vol, 500, patch_size=3, slices=[0, 2], seed=0)
    levels = set(np.unique(got.numpy().astype(np.float64).round(4)).tolist())
    assert levels == {0.0, 0.2}
    # region: rows 0..9, cols 5..14 of slice 3 → 8 × 8 patches of size 3
    got = sample_reference_patches(
        vol, 10_000, patch_size=3, slices=[3], region=(slice(0, 10), slice(5, 15))
    )
    assert got.shape == (64, 9)


def test_sample_reference_uint8_is_scaled() -> None:
    ref = np.full((10, 10), 255, dtype=np.uint8)
    got = sample_reference_patches(ref, 5, patch_size=3)
    assert torch.all(got == 1.0)


def test_sample_reference_region_too_small_raises() -> None:
    ref = np.zeros((50, 50), dtype=np.float32)
    with pytest.raises(InputError) as err:
        sample_reference_patches(ref, 10, patch_size=6, region=(slice(0, 4), slice(10, 15)))
    assert str(err.value) == (
        "reference region 4×5 is smaller than the 6×6 patch: choose a larger region"
    )
    with pytest.raises(InputError):
        sample_reference_patches(np.zeros((2, 3, 4, 5)), 10)
    with pytest.raises(InputError):
        sample_reference_patches(np.zeros((3, 20, 20)), 10, slices=[5])


def test_gaussian_pyramid() -> None:
    img = torch.rand(2, 33, 40)
    pyr = gaussian_pyramid(img, 3)
    assert [tuple(p.shape) for p in pyr] == [(2, 33, 40), (2, 17, 20), (2, 9, 10)]
    assert pyr[0] is img
    const = torch.full((16, 16), 0.3)
    for level in gaussian_pyramid(const, 3):
        assert torch.allclose(level, torch.full_like(level, 0.3), atol=1e-6)
    # blur reduces the variance of white noise
    assert pyr[1].std() < 0.6 * img.std()
    with pytest.raises(InputError):
        gaussian_pyramid(img, 0)


def test_strided_patches_subsample_on_a_grid() -> None:
    import torch

    from napari_wpp.core.patches import extract_patches, strided_patches

    images = torch.rand(3, 40, 40)
    generator = torch.Generator().manual_seed(0)
    everything = strided_patches(images, 6, None, generator)
    assert torch.equal(everything, extract_patches(images, 6))
    some = strided_patches(images, 6, 1200, generator)
    assert 600 <= some.shape[0] <= 2400  # about the target, pooled over the batch
    rows = {tuple(r.tolist()) for r in everything}
    assert all(tuple(r.tolist()) in rows for r in some)  # real patches of the images
