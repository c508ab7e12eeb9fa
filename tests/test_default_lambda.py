"""The default prior weight: the paper's rule times the operator's squared gain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_wpp.core.config.training import PAPER_LAMBDA_NUMERATOR
from napari_wpp.core.operators import FourierDownsampling, GaussianDownsampling
from napari_wpp.core.training import (
    TrainingConfig,
    default_lambda,
    operator_gain,
    paper_lambda,
    run_training,
)


def sic_operator() -> GaussianDownsampling:
    """The published SiC ×4 operator (corner-anchored σ = 2, 16 taps, circular)."""
    return GaussianDownsampling(scale=4, sigma=2.0, kernel_size=16, anchor="corner")


def estimated_like(gain: float, bias: float = -0.2, seed: int = 0) -> FourierDownsampling:
    """A random positive 15×15 kernel scaled to sum ``gain`` (an estimated ×2 operator)."""
    kernel = np.random.default_rng(seed).random((15, 15))
    return FourierDownsampling(2, kernel * gain / kernel.sum(), bias=bias)


@pytest.mark.parametrize(
    "operator",
    [
        sic_operator(),
        GaussianDownsampling(scale=2, sigma=1.0, kernel_size=9, padding="reflect"),
        GaussianDownsampling(scale=3, sigma=1.5, kernel_size=12, padding="zeros"),
    ],
)
def test_unit_gain_operators_keep_the_paper_rule(operator) -> None:
    # exactly: a unit-gain operator trains with the paper's λ, bit for bit
    assert operator_gain(operator) == 1.0
    assert default_lambda(25, operator) == paper_lambda(25) == 0.02
    assert default_lambda(16, operator) == paper_lambda(16)


def test_gain_is_the_kernel_sum_whatever_the_bias() -> None:
    op = estimated_like(1.8, bias=-0.23)
    kernel_sum = float(op.kernel.sum())
    assert operator_gain(op) == pytest.approx(kernel_sum, rel=1e-9)
    assert operator_gain(estimated_like(1.8, bias=0.4)) == pytest.approx(kernel_sum, rel=1e-9)


@pytest.mark.parametrize("crop, gain", [(25, 1.8), (40, 0.7), (13, 2.5)])
def test_default_lambda_follows_its_formula(crop: int, gain: float) -> None:
    op = estimated_like(gain, seed=crop)
    kernel_sum = float(op.kernel.sum())
    expected = PAPER_LAMBDA_NUMERATOR * kernel_sum**2 / crop**2
    assert default_lambda(crop, op) == pytest.approx(expected, rel=1e-9)


def test_doubling_the_gain_quadruples_lambda() -> None:
    single, double = estimated_like(1.0), estimated_like(2.0)
    assert default_lambda(25, double) == pytest.approx(4 * default_lambda(25, single), rel=1e-9)
    # halving the crop side quadruples it too (the paper's 1/n_LR²)
    assert default_lambda(12, single) == pytest.approx(default_lambda(24, single) * 4, rel=1e-9)


def test_training_uses_the_rule_unless_lambda_is_given() -> None:
    rng = np.random.default_rng(1)
    lr = rng.random((2, 24, 24)).astype(np.float32)
    ref = rng.random((48, 48)).astype(np.float32)
    op = estimated_like(1.6, bias=-0.1)
    options = dict(
        steps=1,
        batch_size=2,
        crop_size=20,
        n_reference_patches=200,
        psi_passes=1,
        model_options={"features": 8, "blocks": 1},
        device="cpu",
        mixed_precision="off",
    )
    torch.manual_seed(0)
    state = run_training(lr, ref, op, TrainingConfig(**options)).state
    assert state.lam == pytest.approx(PAPER_LAMBDA_NUMERATOR * 1.6**2 / 20**2, rel=1e-6)
    given = run_training(lr, ref, op, TrainingConfig(lam=0.03, **options)).state
    assert given.lam == pytest.approx(0.03)
