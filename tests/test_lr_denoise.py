"""LR denoising with an estimated operator's noise model: the DCT shrinkage, the noise model
of a fitted pair, the operator and model files that carry it, and training that keeps it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from test_training import TINY_MODEL, tiny_config

from napari_wpp.core import lr_denoise
from napari_wpp.core.errors import InputError
from napari_wpp.core.inference.superresolution import superresolve_slice
from napari_wpp.core.lr_denoise import (
    BLOCK,
    check_noise_variance,
    dct_basis,
    dct_denoise,
    denoise_image,
    noise_dct_variance,
)
from napari_wpp.core.models.wppnet import WPPNet, receptive_radius
from napari_wpp.core.operator_estimation import estimate_operator
from napari_wpp.core.operators import FourierDownsampling, GaussianDownsampling, operator_from_dict
from napari_wpp.core.training import TrainingFinished, train
from napari_wpp.io import load_model, read_operator, save_model, write_operator


def grains(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A piecewise-smooth two-phase image in [0.2, 0.8] (sharp phase boundaries)."""
    field = gaussian_filter(np.random.default_rng(seed).normal(size=shape), 3.0)
    return np.where(field > 0, 0.8, 0.2) - 0.05 * gaussian_filter(field, 1.0)


def test_dct_basis_is_orthonormal() -> None:
    basis = dct_basis()
    assert torch.allclose(basis @ basis.T, torch.eye(BLOCK * BLOCK, dtype=basis.dtype), atol=1e-12)


def test_white_noise_has_its_variance_in_every_coefficient() -> None:
    noise = np.random.default_rng(0).normal(0.0, 0.05, size=(256, 256))
    variance = noise_dct_variance(noise)
    assert variance.shape == (BLOCK, BLOCK)
    np.testing.assert_allclose(variance, 0.05**2, rtol=0.1)


def test_zero_noise_leaves_the_image_unchanged() -> None:
    image = grains((40, 50), 1).astype(np.float32)
    np.testing.assert_allclose(denoise_image(image, np.zeros((BLOCK, BLOCK))), image, atol=1e-5)


@pytest.mark.parametrize(("rule", "flat_share"), [("power", 0.7), ("wiener", 0.6)])
def test_denoising_removes_noise_and_keeps_the_mean(rule: str, flat_share: float) -> None:
    rng = np.random.default_rng(3)
    variance = noise_dct_variance(rng.normal(0.0, 0.05, size=(128, 128)))
    inner = (slice(8, -8), slice(8, -8))
    for clean, share in ((np.full((96, 96), 0.5), flat_share), (grains((96, 96), 2), 0.95)):
        noisy = clean + rng.normal(0.0, 0.05, size=clean.shape)
        denoised = denoise_image(noisy, variance, rule).astype(np.float64)
        before = np.sqrt(np.mean((noisy - clean)[inner] ** 2))
        after = np.sqrt(np.mean((denoised - clean)[inner] ** 2))
        assert after < share * before
        assert abs(denoised.mean() - noisy.mean()) < 2e-3
    with pytest.raises(InputError, match="rule"):
        denoise_image(noisy, variance, "median")
    constant = np.full((30, 30), 0.37, np.float32)
    np.testing.assert_allclose(denoise_image(constant, variance), constant, atol=1e-6)


def test_strips_match_one_pass(monkeypatch) -> None:
    image = torch.from_numpy(grains((70, 33), 4).astype(np.float32))[None, None]
    variance = torch.full((BLOCK, BLOCK), 1e-3)
    whole = dct_denoise(image, variance)
    monkeypatch.setattr(lr_denoise, "STRIP_ROWS", 16)
    np.testing.assert_allclose(dct_denoise(image, variance).numpy(), whole.numpy(), atol=1e-6)
    assert whole.shape == image.shape


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.zeros((4, 4)), "8×8"),
        (np.full((8, 8), np.nan), "finite"),
        (-np.ones((8, 8)), "≥ 0"),
        ("noise", "nested list"),
    ],
)
def test_bad_noise_variance_is_refused(value, match) -> None:
    with pytest.raises(InputError, match=match):
        check_noise_variance(value)


def test_estimated_operator_carries_the_pair_noise_and_keeps_it_in_its_file(tmp_path) -> None:
    hr = grains((192, 192), 5)
    truth = GaussianDownsampling(2, 1.0, 9)
    with torch.no_grad():
        clean = truth(torch.from_numpy(hr)).numpy()
    lr = clean + np.random.default_rng(6).normal(0.0, 0.02, size=clean.shape)
    operator = estimate_operator(hr, lr, 2, kernel_size=9).operator
    # white noise 0.02² in every coefficient, plus the model error of a Fourier operator
    # fitted to a strided Gaussian (aliasing it cannot represent) at the highest frequencies
    assert operator.noise_variance is not None
    high = operator.noise_variance[4:, 4:]
    assert np.all(high > 0.9 * 0.02**2) and np.all(high < 1.5 * 0.02**2)
    again = operator_from_dict(operator.to_dict())
    np.testing.assert_array_equal(again.noise_variance, operator.noise_variance)
    path = write_operator(tmp_path / "op.json", operator)
    np.testing.assert_array_equal(read_operator(path).noise_variance, operator.noise_variance)
    plain = FourierDownsampling(2, np.ones((3, 3)) / 9)
    assert "noise_variance" not in plain.to_dict()
    with pytest.raises(InputError, match="8×8"):
        operator_from_dict({**plain.to_dict(), "noise_variance": [[1.0]]})


def denoising_net(variance: np.ndarray) -> WPPNet:
    torch.manual_seed(0)
    net = WPPNet(2, denoise_block=BLOCK, **TINY_MODEL)
    net.set_noise_variance(variance)
    return net


def test_wppnet_denoises_its_input_at_inference_only() -> None:
    variance = np.full((BLOCK, BLOCK), 4e-4)
    net = denoising_net(variance)
    plain = WPPNet(2, **TINY_MODEL)
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if k != "noise_variance"})
    lr = torch.from_numpy(grains((24, 20), 7).astype(np.float32))[None, None]
    lr = lr + 0.02 * torch.randn(lr.shape, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        net.train()
        assert torch.equal(net(lr), plain(lr))  # training sees the crops as they are
        net.eval()
        plain.eval()
        denoised = dct_denoise(lr, torch.from_numpy(variance).float())
        torch.testing.assert_close(net(lr), plain(denoised))
        assert not torch.allclose(net(lr), plain(lr), atol=1e-4)
    assert net.denoises and net.config()["denoise_block"] == BLOCK
    assert "denoise_block" not in plain.config()
    assert receptive_radius(net) == receptive_radius(plain) + BLOCK - 1
    image = lr[0, 0].numpy()
    np.testing.assert_allclose(
        superresolve_slice(net, image, tile=9), superresolve_slice(net, image), atol=1e-5
    )
    net.set_noise_variance(np.zeros((BLOCK, BLOCK)))
    assert not net.denoises


def test_wppnet_denoising_options_are_checked() -> None:
    with pytest.raises(InputError, match="denoise_block"):
        WPPNet(2, denoise_block=4, **TINY_MODEL)
    with pytest.raises(InputError, match="built without"):
        WPPNet(2, **TINY_MODEL).set_noise_variance(np.zeros((BLOCK, BLOCK)))


def test_model_file_keeps_the_noise_model(tmp_path) -> None:
    from napari_wpp.core.training import TrainingState

    net = denoising_net(np.full((BLOCK, BLOCK), 2e-4))
    state = TrainingState("wppnet", net, net.config(), {}, 0.02, {}, 0, 0.0)
    loaded = load_model(save_model(tmp_path / "m.safetensors", state, False)).model
    assert loaded.denoises
    torch.testing.assert_close(loaded.noise_variance, net.noise_variance)
    net.noise_variance.fill_(float("nan"))  # a damaged file: a clear message, not NaN outputs
    damaged = save_model(tmp_path / "damaged.safetensors", state, False)
    with pytest.raises(InputError, match="invalid LR noise model"):
        load_model(damaged)


@pytest.mark.parametrize(
    ("noisy_operator", "overrides", "denoises"),
    [(True, {}, True), (True, {"lr_denoise": False}, False), (False, {}, False)],
)
def test_training_keeps_the_operator_noise_model(noisy_operator, overrides, denoises) -> None:
    kernel = np.ones((5, 5)) / 25
    variance = np.full((BLOCK, BLOCK), 3e-4) if noisy_operator else None
    operator = FourierDownsampling(2, kernel, noise_variance=variance)
    lr = grains((40, 40), 9).astype(np.float32)
    reference = grains((80, 80), 10).astype(np.float32)
    events = list(train(lr, reference, operator, tiny_config(steps=2, **overrides)))
    model = next(e for e in events if isinstance(e, TrainingFinished)).state.model
    assert getattr(model, "denoises", False) is denoises
    if denoises:
        np.testing.assert_allclose(model.noise_variance.numpy(), variance, rtol=1e-6)
