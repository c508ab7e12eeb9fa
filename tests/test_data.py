"""Tests of the synthetic material data."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wpp import data
from napari_wpp.core.errors import InputError

SMALL = (12, 96, 96)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return data.synthetic_volume(SMALL, phases=3, seed=5)


def test_volume_shape_dtype_and_seed(volume: np.ndarray) -> None:
    assert volume.shape == SMALL and volume.dtype == np.uint8
    np.testing.assert_array_equal(volume, data.synthetic_volume(SMALL, phases=3, seed=5))
    other = data.synthetic_volume(SMALL, phases=3, seed=6)
    assert np.mean(other != volume) > 0.5


@pytest.mark.parametrize("phases", [2, 3])
def test_phase_count(phases: int) -> None:
    v = data.synthetic_volume((6, 96, 96), phases=phases, seed=1).astype(np.float64)
    # every pixel lies near one of the grey levels (noise std 4, mild blur at boundaries)
    levels = np.array([75.0, 125.0, 195.0])
    dist = np.abs(v[..., None] - levels)
    nearest = dist.argmin(-1)
    assert np.mean(dist.min(-1) < 12) > 0.75
    fractions = np.bincount(nearest.ravel(), minlength=3) / nearest.size
    assert np.sum(fractions > 0.1) == phases, fractions
    assert np.sum(fractions > 0.02) == phases, fractions


def test_slices_correlate_like_a_ct_stack(volume: np.ndarray) -> None:
    lag1 = np.mean([_corr(volume[i], volume[i + 1]) for i in range(len(volume) - 1)])
    lag6 = np.mean([_corr(volume[i], volume[i + 6]) for i in range(len(volume) - 6)])
    assert 0.3 < lag1 < 0.9  # similar but not identical
    assert abs(lag6) < 0.15
    assert not np.array_equal(volume[0], volume[1])


def test_volume_has_sharp_structure(volume: np.ndarray) -> None:
    # strong in-plane edges: many neighbouring pixel pairs differ by a phase step
    step = np.abs(np.diff(volume.astype(np.int16), axis=-1))
    assert np.mean(step > 30) > 0.02


@pytest.mark.parametrize(
    "kwargs",
    [{"phases": 4}, {"phases": 1}, {"shape": (10, 10)}, {"shape": (0, 10, 10)}, {"shape": "big"}],
)
def test_volume_bad_inputs(kwargs: dict) -> None:
    with pytest.raises(InputError) as info:
        data.synthetic_volume(**kwargs)
    assert "\n" not in str(info.value)


def test_default_sigma() -> None:
    assert [data.default_sigma(q) for q in (2, 4, 6, 8)] == [1.0, 2.0, 3.0, 4.0]


@pytest.fixture(scope="module")
def material():
    pytest.importorskip("napari_wpp.core.operators")
    return data.synthetic_material((4, 64, 96), scale=4, noise=0.01, seed=3)


def test_material_shapes_and_operator(material) -> None:
    m = material
    assert m.hr.shape == (4, 64, 96) and m.hr.dtype == np.uint8
    assert m.lr.shape == (4, 16, 24) and m.lr.dtype == np.uint8
    assert m.reference.shape == (64, 96) and m.reference.dtype == np.uint8
    assert m.scale == 4 and m.noise == 0.01
    d = m.operator.to_dict()
    assert d["anchor"] == "center" and d["scale"] == 4
    assert np.allclose(d["sigma"], 2.0)


def test_material_lr_is_operator_plus_noise(material) -> None:
    import torch

    y = material.operator(torch.from_numpy(material.hr.astype(np.float32) / 255)).numpy()
    residual = material.lr / 255.0 - y
    expected = np.sqrt(0.01**2 + 1 / (12 * 255.0**2))  # noise plus 8-bit quantisation
    assert residual.std() == pytest.approx(expected, rel=0.1)
    assert abs(residual.mean()) < 0.002


def test_material_reference_is_separate(material) -> None:
    corrs = [_corr(material.reference, s) for s in material.hr]
    assert max(abs(c) for c in corrs) < 0.2
    # but of the same material: all three phases present
    levels = np.array([75.0, 125.0, 195.0])
    nearest = np.abs(material.reference.astype(np.float64)[..., None] - levels).argmin(-1)
    assert np.all(np.bincount(nearest.ravel(), minlength=3) / nearest.size > 0.05)


def test_material_seeded_and_noise_free() -> None:
    pytest.importorskip("napari_wpp.core.operators")
    import torch

    a = data.synthetic_material((2, 32, 32), scale=2, noise=0.0, seed=1)
    b = data.synthetic_material((2, 32, 32), scale=2, noise=0.0, seed=1)
    np.testing.assert_array_equal(a.lr, b.lr)
    assert a.lr.shape == (2, 16, 16)
    assert np.allclose(a.operator.to_dict()["sigma"], 1.0)
    y = a.operator(torch.from_numpy(a.hr.astype(np.float32) / 255)).numpy()
    assert np.abs(a.lr / 255.0 - y).max() <= 0.5 / 255 + 1e-6  # only rounding


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": (2, 30, 32), "scale": 4},
        {"scale": 0},
        {"noise": -0.1},
        {"shape": (2, 32, 32), "phases": 5},
    ],
)
def test_material_bad_inputs(kwargs: dict) -> None:
    pytest.importorskip("napari_wpp.core.operators")
    with pytest.raises(InputError):
        data.synthetic_material(**kwargs)


def test_sample_data_layers_overlay() -> None:
    pytest.importorskip("napari_wpp.core.operators")
    layers = data.sample_data()
    assert [t[2] for t in layers] == ["image"] * 3
    roles = [t[1]["metadata"]["napari_wpp"]["role"] for t in layers]
    assert roles == ["reference", "lr", "truth"]
    (ref, _, _), (lr, lr_kw, _), (hr, hr_kw, _) = layers
    assert ref.ndim == 2 and hr.ndim == 3 and lr.ndim == 3
    q = lr_kw["metadata"]["napari_wpp"]["scale"]
    assert hr.shape == (lr.shape[0], lr.shape[1] * q, lr.shape[2] * q)
    assert len({t[1]["name"] for t in layers}) == 3
    # the world position of LR pixel i is the centre of the HR pixels it averages (centred operator)
    scale = np.asarray(lr_kw["scale"])
    translate = np.asarray(lr_kw["translate"])
    hr_scale = np.asarray(hr_kw.get("scale", (1, 1, 1)))
    idx = np.array([3, 5, 7])
    lr_world = translate + scale * idx
    block = [np.arange(i * q, (i + 1) * q) for i in idx[1:]]
    hr_centre = np.array([idx[0], block[0].mean(), block[1].mean()]) * hr_scale
    np.testing.assert_allclose(lr_world, hr_centre)
