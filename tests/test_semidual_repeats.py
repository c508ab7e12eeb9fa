"""Repeated reference patches: one weighted point each (flat, saturated or constant regions)."""

from __future__ import annotations

import pytest
import torch

from napari_wpp.core.semidual import WassersteinPatchPrior, c_transform_argmin, exact_w2
from napari_wpp.core.semidual.engine import _brute_force64
from napari_wpp.core.semidual.prior import distinct_rows


def _saturated(m: int, d: int, repeated: float, seed: int) -> torch.Tensor:
    """``m`` patches of which a share ``repeated`` are copies of a few flat patches."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(m, d, generator=g)
    copies = int(repeated * m)
    flat = torch.tensor([0.0, 1.0, 0.5])[torch.randint(0, 3, (copies,), generator=g)]
    where = torch.randperm(m, generator=g)[:copies]
    y[where] = flat[:, None].expand(copies, d)
    return y


def test_distinct_rows_keep_first_occurrences_in_order() -> None:
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [2.0, 2.0], [0.0, 0.0]])
    rows, counts, which = distinct_rows(y)
    assert torch.equal(rows, torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 2.0]]))
    assert counts.tolist() == [2, 2, 1]
    assert which.tolist() == [0, 1, 0, 2, 1]
    distinct = torch.rand(6, 3)
    assert distinct_rows(distinct)[0] is distinct and distinct_rows(distinct)[1] is None


def test_prior_merges_repeats_into_weights() -> None:
    y = _saturated(400, 9, repeated=0.5, seed=0)
    prior = WassersteinPatchPrior(y)
    assert prior.reference.shape[0] < 400 and prior.n_given == 400
    assert prior.psi.shape == (prior.reference.shape[0],)
    assert float(prior.weights.sum()) == pytest.approx(1.0)
    assert float(prior.weights.max()) > 0.1  # one of the three flat patches
    unrepeated = WassersteinPatchPrior(torch.rand(50, 9))
    assert unrepeated.weights is None and unrepeated.reference.shape == (50, 9)


def test_weighted_assignment_is_the_exact_c_transform_of_all_copies() -> None:
    """Expanding ψ onto every copy, the brute force over all M copies picks the same point."""
    y = _saturated(300, 9, repeated=0.6, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.rand(200, 9, generator=g), torch.zeros(100, 9), torch.ones(50, 9)])
    prior = WassersteinPatchPrior(y)
    prior.ascend(x, 5)
    idx = c_transform_argmin(x, prior.reference, prior.psi)
    expanded = prior.psi[prior._distinct_index]
    full = _brute_force64(x, y, expanded)
    assert torch.equal(prior.reference[idx], y[full])


def test_semidual_value_approaches_the_exact_w2_with_repeats() -> None:
    y = _saturated(80, 4, repeated=0.5, seed=3)
    x = torch.rand(80, 4, generator=torch.Generator().manual_seed(4))
    prior = WassersteinPatchPrior(y)
    value = prior.ascend(x, 400)
    exact = exact_w2(x, y)
    assert value <= exact * (1 + 1e-6) + 1e-9  # a lower bound
    assert value >= 0.97 * exact


def test_a_state_saved_per_copy_loads_onto_the_distinct_patches() -> None:
    y = _saturated(120, 4, repeated=0.5, seed=5)
    prior = WassersteinPatchPrior(y)
    which = prior._distinct_index
    old_psi = torch.linspace(-1, 1, 120)
    state = {
        "psi": old_psi,
        "solver.exp_avg": torch.linspace(0, 1, 120),
        "solver.exp_avg_sq": torch.ones(120),
        "solver.step": torch.tensor(3.0, dtype=torch.float64),
        "solver.scale": torch.tensor(0.5, dtype=torch.float64),
    }
    prior.load_state_dict(state)
    for u in range(prior.reference.shape[0]):
        copies = torch.nonzero(which == u).squeeze(1)
        winner = copies[old_psi[copies].argmax()]  # the copy every c-transform picked
        assert prior.psi[u] == old_psi[winner]
        assert prior._state["exp_avg"][u] == state["solver.exp_avg"][winner]


def test_constant_reference_is_one_point() -> None:
    prior = WassersteinPatchPrior(torch.full((500, 36), 0.25))
    assert prior.reference.shape == (1, 36)
    x = torch.rand(1000, 36, generator=torch.Generator().manual_seed(6))
    loss = prior.loss_and_ascend(x, 3)
    assert torch.isfinite(loss)
    assert float(loss) == pytest.approx(float(((x - 0.25) ** 2).sum(1).mean()), rel=1e-5)
