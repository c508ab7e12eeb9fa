"""The training loss objects against their formulas, on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from napari_wpp.core.operators import GaussianDownsampling
from napari_wpp.core.patches import strided_patches
from napari_wpp.core.training import FlowLoss, LossTerms, WPPNetLoss


class FixedPrior:
    """A stand-in prior: its W₂² is the mean squared patch value, recorded per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def loss_and_ascend(
        self, patches: torch.Tensor, passes: int, should_stop: object = None
    ) -> torch.Tensor:
        self.calls.append((int(patches.shape[0]), passes))
        return patches.pow(2).mean()


@pytest.fixture
def tiny() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    operator = GaussianDownsampling(scale=2, sigma=1.0)
    generator = torch.Generator().manual_seed(0)
    hr = torch.rand((2, 1, 16, 16), generator=generator)
    lr = torch.rand((2, 1, 8, 8), generator=generator)
    return operator, hr, lr


def _options(operator: torch.nn.Module, weight: float) -> dict:
    return {
        "operator": operator,
        "margins": (1, 2),
        "weight": weight,
        "patch_size": 3,
        "patches_per_step": 0,
        "psi_passes": 2,
    }


def _inner_mse(operator: torch.nn.Module, hr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    return ((operator(hr) - lr)[..., 1:6, 1:6] ** 2).mean()


def test_wppnet_loss_is_data_term_plus_lambda_w2(tiny) -> None:
    operator, hr, lr = tiny
    prior = FixedPrior()
    terms = WPPNetLoss(**_options(operator, 0.25))(hr, lr, prior, torch.Generator())
    data = _inner_mse(operator, hr, lr)
    wpp = strided_patches(hr, 3, 0, torch.Generator()).pow(2).mean()  # all 3×3 patches
    assert isinstance(terms, LossTerms) and terms.logdet is None
    assert torch.allclose(terms.data_term, data)
    assert prior.calls == [(2 * 14 * 14, 2)]  # every patch, ψ ascends psi_passes times
    assert torch.allclose(terms.loss, terms.data_term + 0.25 * terms.wpp_term)
    assert terms.scaled is terms.loss
    assert len(terms.logged()) == 3
    assert torch.allclose(terms.wpp_term, wpp)


def test_zero_weight_skips_the_prior(tiny) -> None:
    operator, hr, lr = tiny
    prior = FixedPrior()
    terms = WPPNetLoss(**_options(operator, 0.0))(hr, lr, prior, torch.Generator())
    assert prior.calls == [] and float(terms.wpp_term) == 0.0
    assert torch.equal(terms.loss, terms.data_term)


def test_flow_loss_is_the_backward_kl_per_lr_pixel(tiny) -> None:
    operator, hr, lr = tiny
    sigma, rho = 0.1, 3.0
    logdet = torch.tensor([40.0, 24.0])
    loss = FlowLoss(**_options(operator, rho), noise_std=sigma)
    terms = loss(hr, lr, FixedPrior(), torch.Generator(), logdet)
    data = _inner_mse(operator, hr, lr)
    expected = data / (2 * sigma**2) + rho * terms.wpp_term - logdet.mean() / 64.0
    assert torch.allclose(terms.data_term, data)
    assert torch.allclose(terms.loss, expected)
    assert torch.allclose(terms.scaled, expected * 2 * sigma**2)
    assert [float(v) for v in terms.logged()][3] == 32.0


def test_flow_loss_clips_gradients_and_flags_divergence() -> None:
    from napari_wpp.core.errors import DivergenceError
    from napari_wpp.core.training import FLOW_GRAD_CLIP

    loss = FlowLoss(torch.nn.Identity(), (0, 0), 1.0, 2, 0, 1, noise_std=0.01)
    weight = torch.nn.Parameter(torch.zeros(3))
    weight.grad = torch.tensor([30.0, 40.0, 0.0])
    loss.clip_gradients([weight], step=1)
    assert float(weight.grad.norm()) == pytest.approx(FLOW_GRAD_CLIP, rel=1e-5)
    weight.grad = torch.tensor([float("nan"), 0.0, 0.0])
    with pytest.raises(DivergenceError, match="step 7"):
        loss.clip_gradients([weight], step=7)
    WPPNetLoss(torch.nn.Identity(), (0, 0), 1.0, 2, 0, 1).clip_gradients([weight], step=1)
