"""Tests of the sliced (projected) patch distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_wpp.core.errors import InputError
from napari_wpp.core.semidual import (
    SlicedPatchPrior,
    WassersteinPatchPrior,
    build_patch_prior,
    exact_w2,
)
from napari_wpp.core.semidual.sliced import argsort_rows, interpolated_quantiles, sort_rows


def _cloud(n: int, d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 7, 200])
def test_one_dimensional_case_is_the_sorted_w2(n: int) -> None:
    x, y = _cloud(n, 1, 1), _cloud(n, 1, 2, scale=2.0) + 0.5
    prior = SlicedPatchPrior(y, n_projections=5)
    want = float(((x[:, 0].sort().values - y[:, 0].sort().values) ** 2).mean())
    assert prior.value(x.float()) == pytest.approx(want, rel=1e-5)
    assert want == pytest.approx(exact_w2(x, y), rel=1e-9)  # sorting solves 1-D transport


def test_zero_for_equal_sets_also_against_a_repeated_reference() -> None:
    x = _cloud(300, 9, 3).float()
    assert SlicedPatchPrior(x, n_projections=32).value(x[torch.randperm(300)]) < 1e-10
    # the reference holds every patch three times: its quantiles at the N levels are x's
    assert SlicedPatchPrior(x.repeat(3, 1), n_projections=32).value(x) < 1e-10


def test_interpolated_quantiles_match_levels() -> None:
    values = torch.arange(10, dtype=torch.float64)[None]
    assert torch.equal(interpolated_quantiles(values, 10), values)
    two = interpolated_quantiles(values, 2)[0]  # levels 1/4 and 3/4 of 0 … 9
    assert two.tolist() == pytest.approx([2.0, 7.0])


def test_numpy_sorts_agree_with_torch() -> None:
    values = _cloud(7, 300, 14).float()
    values[0, :5] = 0.25  # ties
    assert torch.equal(sort_rows(values), values.sort(-1).values)
    assert torch.equal(values.gather(1, argsort_rows(values)), values.sort(-1).values)
    assert torch.equal(sort_rows(values.bfloat16()), values.bfloat16().float().sort(-1).values)


def test_translation_costs_its_squared_length_and_pulls_back() -> None:
    """Principal axes only (an orthonormal basis): a translated set costs |c|² like W₂²,
    and the gradient summed over the patches is 2c."""
    y = _cloud(400, 6, 4)
    c = torch.tensor([0.3, -0.2, 0.0, 0.1, 0.4, -0.1], dtype=torch.float64)
    x = (y + c).requires_grad_(True)
    prior = SlicedPatchPrior(y, n_projections=0)
    loss = prior.loss(x)
    assert float(loss.detach()) == pytest.approx(float(c @ c), rel=1e-6)
    loss.backward()
    np.testing.assert_allclose(x.grad.sum(0).numpy(), (2 * c).numpy(), atol=1e-6)


def test_gradient_step_lowers_the_distance_at_the_same_directions() -> None:
    y = _cloud(500, 16, 5)
    x = _cloud(500, 16, 6, scale=1.7).requires_grad_(True)
    prior = SlicedPatchPrior(y, n_projections=40, seed=3)
    state = prior.state_dict()
    before = prior.loss(x)
    before.backward()
    prior.load_state_dict(state)  # the same random directions again
    with torch.no_grad():
        after = prior.loss(x - 0.05 * x.grad / x.grad.norm() * x.norm())
    assert float(after) < float(before)
    # a finite difference along a random direction agrees with the gradient
    v = _cloud(500, 16, 7)
    eps = 1e-6
    prior.load_state_dict(state)
    plus = float(prior.loss((x + eps * v).detach()))
    prior.load_state_dict(state)
    minus = float(prior.loss((x - eps * v).detach()))
    assert (plus - minus) / (2 * eps) == pytest.approx(float((x.grad * v).sum()), rel=1e-4)


def test_principal_axes_are_the_reference_covariance_axes() -> None:
    g = torch.Generator().manual_seed(8)
    basis, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    y = (
        torch.randn(2000, 5, generator=g, dtype=torch.float64) * torch.tensor([5, 3, 1, 0.5, 0.1])
    ) @ basis.T
    prior = SlicedPatchPrior(y, n_projections=0)
    first = prior.axes[:, 0].double()
    assert abs(float(first @ basis[:, 0])) > 0.999
    assert prior.axes.shape == (5, 5)
    # squeezing the sample along the first principal axis alone is seen by the prior
    squeeze = torch.eye(5, dtype=torch.float64) - 0.5 * torch.outer(basis[:, 0], basis[:, 0])
    assert prior.value((y @ squeeze).float()) > 0.2 * 25 * 0.25


def test_directions_are_redrawn_and_resume_from_the_state() -> None:
    prior = SlicedPatchPrior(_cloud(50, 4, 9), n_projections=3, seed=1)
    state = prior.state_dict()
    first, second = prior.random_directions(), prior.random_directions()
    assert not torch.allclose(first, second)
    assert torch.allclose(first.norm(dim=0), torch.ones(3))
    prior.load_state_dict(state)
    assert torch.equal(prior.random_directions(), first)
    with pytest.raises(InputError, match="exact"):
        prior.load_state_dict({"psi": torch.zeros(50)})


def test_interface_shared_with_the_exact_prior() -> None:
    y = _cloud(100, 4, 10).float()
    x = _cloud(80, 4, 11).float().requires_grad_(True)
    for distance, kind in (("exact", WassersteinPatchPrior), ("sliced", SlicedPatchPrior)):
        prior = build_patch_prior(distance, y, projections=8)
        assert isinstance(prior, kind)
        loss = prior.loss_and_ascend(x, 2)
        assert loss.ndim == 0 and loss.requires_grad
        assert isinstance(prior.ascend(x, 1), float)
        prior.load_state_dict(prior.state_dict())
    with pytest.raises(InputError, match="exact, sliced"):
        build_patch_prior("nearest", y)
    with pytest.raises(InputError, match="dimension"):
        SlicedPatchPrior(y).loss(torch.zeros(3, 5))
    with pytest.raises(InputError, match="projections"):
        SlicedPatchPrior(y, n_projections=-1)


def test_sliced_is_a_lower_bound_of_the_exact_w2() -> None:
    y, x = _cloud(200, 6, 12), _cloud(200, 6, 13, scale=1.5) + 0.2
    sliced = SlicedPatchPrior(y, n_projections=200).value(x.float())
    assert 0.0 < sliced <= exact_w2(x, y) * 1.001
