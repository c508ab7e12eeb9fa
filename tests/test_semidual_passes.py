"""Pruned ψ passes: every pass equals the exact c-transform argmin, trajectories are unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_wpp.core.semidual import WassersteinPatchPrior, c_transform_argmin
from napari_wpp.core.semidual import engine as semidual_engine
from napari_wpp.core.semidual import pruning as semidual_pruning


def _random(n: int, m: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g), torch.rand(m, d, generator=g), torch.zeros(m)


def _ascent_step(x: torch.Tensor, idx: torch.Tensor, m: int, lr: float) -> torch.Tensor:
    """Semi-dual gradient step of size lr (the direction of every ψ solver)."""
    counts = torch.bincount(idx, minlength=m).to(torch.float32)
    return lr * (1.0 / m - counts / x.shape[0])


def _run_sequence(
    x: torch.Tensor, y: torch.Tensor, psi: torch.Tensor, lrs: list[float]
) -> semidual_pruning._PassTracker:
    """Tracker and engine side by side along an ascent path; asserts equality at every pass."""
    tracker = semidual_pruning._PassTracker(x, y)
    x0, y0 = x.clone(), y.clone()
    for p, lr in enumerate(lrs):
        psi_before = psi.clone()
        got = tracker(psi)
        want = c_transform_argmin(x, y, psi)
        assert torch.equal(got, want), f"pass {p}: {(got != want).sum()} rows differ"
        assert torch.equal(psi, psi_before)
        psi = psi + _ascent_step(x, want, y.shape[0], lr)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # inputs are not modified
    return tracker


@pytest.mark.parametrize(("n", "m", "d"), [(3000, 700, 9), (2000, 150, 36), (500, 40, 4)])
def test_passes_exact_along_an_ascent_path(n: int, m: int, d: int) -> None:
    x, y, psi = _random(n, m, d, seed=n + m)
    scale = float(((x[:200, None] - y[None]) ** 2).sum(-1).min(1).values.mean())
    lrs = [0.002 * scale * m] * 15
    tracker = _run_sequence(x, y, psi, lrs)
    pairs = tracker.stats["pairs"]
    n_groups = -(-m // min(semidual_engine.GROUP_SIZE, m))
    # after the baseline, passes were pruned: fewer pairs than a full pass, some rows skipped
    assert pairs[0] == -1 and all(0 <= p < n * n_groups for p in pairs[1:])
    assert min(tracker.stats["slow_rows"][1:]) < n


def test_large_steps_fall_back_to_full_passes() -> None:
    x, y, psi = _random(1500, 300, 8, seed=3)
    # tiny, then huge (ψ moves by more than the score scale), then moderate steps
    lrs = [1e-6] * 3 + [500.0, 5.0, 1e-3, 1e-3]
    tracker = _run_sequence(x, y, psi, lrs)
    pairs = tracker.stats["pairs"]
    assert pairs.count(-1) >= 2  # the baseline and at least one refresh
    assert all(p >= 0 for p in pairs[1:4])  # the tiny steps were pruned


@pytest.mark.parametrize("lr", [0.02, 0.2])
def test_passes_exact_with_few_listed_groups(monkeypatch: pytest.MonkeyPatch, lr: float) -> None:
    """With 2 listed groups of 40, winners move to unlisted groups: rows are re-scored in full."""
    monkeypatch.setattr(semidual_pruning, "PRUNE_GROUPS", 2)
    monkeypatch.setattr(semidual_engine, "GROUP_SIZE", 8)
    x, y, psi = _random(2000, 320, 6, seed=33)
    scale = float(((x[:200, None] - y[None]) ** 2).sum(-1).min(1).values.mean())
    tracker = _run_sequence(x, y, psi, [lr * scale * 320] * 12)
    assert sum(tracker.stats["full_rows"][1:]) > 0  # some rows' rest bound was reached
    assert sum(p >= 0 for p in tracker.stats["pairs"]) >= 3  # pruned passes


def test_refresh_share_forces_new_baselines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(semidual_pruning, "PRUNE_REFRESH", 1e-4)
    x, y, psi = _random(1200, 256, 6, seed=4)
    tracker = _run_sequence(x, y, psi, [0.05] * 8)
    assert tracker.stats["pairs"].count(-1) >= 3


@pytest.mark.parametrize("group", [1, 7, 64, 1000])
def test_passes_exact_for_any_group_size(monkeypatch: pytest.MonkeyPatch, group: int) -> None:
    monkeypatch.setattr(semidual_engine, "GROUP_SIZE", group)
    monkeypatch.setattr(semidual_engine, "BLOCK_ELEMS", 4096)
    x, y, psi = _random(700, 150, 5, seed=group)
    _run_sequence(x, y, psi, [0.3] * 6 + [3.0] * 3)


def test_passes_exact_with_duplicate_references(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact duplicates tie across and inside groups: the lowest index wins at every pass."""
    monkeypatch.setattr(semidual_engine, "GROUP_SIZE", 8)
    g = torch.Generator().manual_seed(5)
    d = 16
    flat = torch.full((1, d), 0.25)
    dup = torch.rand(1, d, generator=g)
    y = torch.cat(
        [
            torch.rand(100, d, generator=g),
            flat.expand(10, d),
            dup.expand(3, d),
            torch.rand(150, d, generator=g),
            flat.expand(10, d),
            dup.expand(2, d),
        ]
    )
    x = torch.cat(
        [
            flat + 1e-3 * torch.randn(300, d, generator=g),
            dup + 1e-3 * torch.randn(100, d, generator=g),
            torch.rand(400, d, generator=g),
        ]
    )
    calls = {"n": 0}
    real = semidual_engine._resolve_across_groups

    def spy(*a: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls["n"] += 1
        return real(*a)

    tracker = semidual_pruning._PassTracker(x, y)
    psi = torch.zeros(y.shape[0])
    tracker(psi)  # baseline (a full pass)
    # ψ = 0 keeps the duplicates tied; tiny steps give them equal potentials again
    for lr in [1e-7, 1e-5, 1e-4, 0.01]:
        want = c_transform_argmin(x, y, psi)
        psi = psi + _ascent_step(x, want, y.shape[0], lr)
        want = c_transform_argmin(x, y, psi)
        monkeypatch.setattr(semidual_engine, "_resolve_across_groups", spy)
        got = tracker(psi)
        monkeypatch.setattr(semidual_engine, "_resolve_across_groups", real)
        assert torch.equal(got, want)
    assert all(p >= 0 for p in tracker.stats["pairs"][1:])  # pruned passes
    assert calls["n"] == 4  # which re-ranked ties in float64


def test_passes_exact_on_near_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies of references with potentials that tie them to ~1e-7, then tiny ψ moves."""
    # every row is a near tie here: prune anyway (no refresh), with groups of 8 points
    monkeypatch.setattr(semidual_pruning, "PRUNE_REFRESH", 1.0)
    monkeypatch.setattr(semidual_engine, "GROUP_SIZE", 8)
    g = torch.Generator().manual_seed(11)
    d, n = 36, 100
    base = torch.rand(n, d, generator=g)
    near = base + 1e-6 * torch.randn(n, d, generator=g)
    far = base + 1e-6 * torch.randn(n, d, generator=g)
    y = torch.cat([torch.stack([base, near], 1).reshape(2 * n, d), far])
    x = torch.cat([base + 1e-3 * torch.randn(n, d, generator=g), torch.rand(300, d, generator=g)])
    x64, y64 = x[:n].double(), y.double()
    ar = torch.arange(n)

    def dist(rows: torch.Tensor) -> torch.Tensor:
        return ((x64 - y64[rows]) ** 2).sum(1)

    psi64 = torch.zeros(3 * n, dtype=torch.float64)
    gaps = torch.linspace(-1e-7, 1e-7, n, dtype=torch.float64)
    psi64[2 * ar + 1] = dist(2 * ar + 1) - dist(2 * ar) + gaps
    far_gaps = gaps.flip(0)
    far_gaps[n // 2 :] = -1.0  # far copies (other groups) compete for half of the rows only
    psi64[2 * n + ar] = dist(2 * n + ar) - dist(2 * ar) + far_gaps
    psi = psi64.float()
    tracker = semidual_pruning._PassTracker(x, y)
    jitter = torch.Generator().manual_seed(12)
    for step in [0.0, 1e-8, 1e-7, 1e-6, 1e-5]:
        moved = psi + step * torch.randn(psi.shape[0], generator=jitter)
        want = c_transform_argmin(x, y, moved)
        assert torch.equal(tracker(moved), want)
        xa, ya, pa = x.double().numpy(), y.double().numpy(), moved.double().numpy()
        brute = (((xa[:, None] - ya[None]) ** 2).sum(-1) - pa).argmin(1)
        np.testing.assert_array_equal(want.numpy(), brute)
    assert tracker.stats["pairs"][0] == -1 and min(tracker.stats["pairs"][1:]) >= 0


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_passes_exact_at_other_scales(scale: float) -> None:
    x, y, psi = _random(800, 200, 12, seed=21)
    x, y = scale * (x + 0.5), scale * (y + 0.5)
    _run_sequence(x, y, psi, [scale**2 * 2.0] * 8)


@pytest.mark.parametrize("solver", ["asgd", "adam", "gd"])
def test_prior_trajectory_identical_with_and_without_pruning(
    monkeypatch: pytest.MonkeyPatch, solver: str
) -> None:
    g = torch.Generator().manual_seed(30)
    y = torch.rand(300, 9, generator=g)
    batches = [torch.rand(1200, 9, generator=g) for _ in range(3)]
    priors = {}
    for pruning in (False, True):
        monkeypatch.setattr(semidual_pruning, "PASS_PRUNING", pruning)
        prior = WassersteinPatchPrior(y, solver=solver)
        values, losses = [], []
        for x in batches:
            values.append(prior.ascend(x, 6))
            xg = x.clone().requires_grad_(True)
            loss = prior.loss_and_ascend(xg, 5)
            loss.backward()
            losses.append((loss.item(), xg.grad.clone()))
        priors[pruning] = (prior, values, losses)
    (a, va, la), (b, vb, lb) = priors[False], priors[True]
    assert va == vb
    assert torch.equal(a.psi, b.psi)
    for (loss_a, grad_a), (loss_b, grad_b) in zip(la, lb, strict=True):
        assert loss_a == loss_b and torch.equal(grad_a, grad_b)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_prior_uses_the_tracker_for_several_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[semidual_pruning._PassTracker] = []
    real = semidual_pruning._PassTracker

    def spy(*a: torch.Tensor) -> semidual_pruning._PassTracker:
        made.append(real(*a))
        return made[-1]

    monkeypatch.setattr(semidual_pruning, "_PassTracker", spy)
    x, y, _ = _random(600, 120, 6, seed=31)
    prior = WassersteinPatchPrior(y, solver="asgd")
    prior.loss_and_ascend(x, 4)
    prior.ascend(x, 1)  # a single pass needs no baseline
    assert len(made) == 1 and len(made[0].stats["pairs"]) == 4
    monkeypatch.setattr(semidual_pruning, "PASS_PRUNING", False)
    prior.ascend(x, 3)
    assert len(made) == 1


def test_prior_pauses_pruning_after_it_gave_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(semidual_pruning, "PRUNE_REFRESH", 0.0)  # every pruned pass falls back
    monkeypatch.setattr(semidual_pruning, "PRUNE_PAUSE", 2)
    made: list[semidual_pruning._PassTracker] = []
    real = semidual_pruning._PassTracker

    def spy(*a: torch.Tensor) -> semidual_pruning._PassTracker:
        made.append(real(*a))
        return made[-1]

    monkeypatch.setattr(semidual_pruning, "_PassTracker", spy)
    x, y, _ = _random(600, 120, 6, seed=34)
    prior = WassersteinPatchPrior(y, solver="asgd")
    reference = WassersteinPatchPrior(y, solver="asgd")
    for passes in (6, 3, 3, 3):
        prior.ascend(x, passes)
        with monkeypatch.context() as off:
            off.setattr(semidual_pruning, "PASS_PRUNING", False)
            reference.ascend(x, passes)
        assert torch.equal(prior.psi, reference.psi)
    # gave up after PRUNE_GIVE_UP fallbacks (then plain passes), paused 2 calls, tried again
    assert len(made) == 2 and made[0].gave_up
    assert made[0].stats["pairs"] == [-1] * 6


@pytest.mark.parametrize("listed", [2, 24])
def test_tracker_bounds_hold_after_passes(monkeypatch: pytest.MonkeyPatch, listed: int) -> None:
    """Listed lower bounds, rest bound and winner upper bound hold at each row's refresh."""
    monkeypatch.setattr(semidual_pruning, "PRUNE_GROUPS", listed)
    x, y, psi = _random(1500, 400, 7, seed=32)
    tracker = semidual_pruning._PassTracker(x, y)
    scale = float(((x[:200, None] - y[None]) ** 2).sum(-1).min(1).values.mean())
    for _ in range(6):
        idx = tracker(psi)
        assert torch.equal(idx, c_transform_argmin(x, y, psi))
        psi = psi + _ascent_step(x, idx, 400, 0.01 * scale * 400)
    assert min(tracker.stats["pairs"][1:]) >= 0
    assert tracker.cand_low.dtype == torch.float32 and tracker.cand_group.dtype == torch.int16
    assert tuple(tracker.cand_low.shape) == (1500, min(listed, 7))
    # exact scores at each row's reference potentials, in the tracker's frame
    psi_ref = torch.stack(tracker.history)[tracker.ref]  # (N, M) float64
    x64, y64 = x.double(), y.double()
    mu = y.double().mean(0).float().double()
    frame = ((x64 - mu) ** 2).sum(1, keepdim=True) + tracker.shift
    exact = ((x64[:, None] - y64[None]) ** 2).sum(-1) - psi_ref - frame
    e = tracker._bound()[:, None]
    b, g = tracker.group, tracker.n_groups
    padded = torch.cat([exact, torch.full((1500, g * b - 400), np.inf, dtype=torch.float64)], 1)
    group_min = padded.view(1500, g, b).amin(2)
    listed = tracker.cand_group.long()
    assert bool((tracker.cand_low.double() - e <= group_min.gather(1, listed)).all())
    unlisted = group_min.scatter(1, listed, np.inf).amin(1)
    assert bool((tracker.rest - e[:, 0] <= unlisted).all())
    winner_score = exact.gather(1, tracker.winner[:, None])[:, 0]
    assert bool((winner_score <= tracker.upper).all())
    others = exact.scatter(1, tracker.winner[:, None], np.inf).amin(1)
    assert bool((tracker.second - e[:, 0] <= others).all())


def test_should_stop_ends_the_ascent_between_passes_with_a_consistent_state() -> None:
    """A stop after k passes leaves ψ and the solver state of exactly k passes (issue 14)."""
    x, y, _ = _random(300, 120, 4, seed=3)
    asked = []

    def stop_after_three() -> bool:
        asked.append(True)
        return len(asked) > 2  # asked before passes 2, 3, 4, ...: passes 1-3 run

    stopped = WassersteinPatchPrior(y)
    stopped.ascend(x, 100000, should_stop=stop_after_three)
    plain = WassersteinPatchPrior(y)
    plain.ascend(x, 3)
    assert len(asked) == 3
    assert torch.equal(stopped.psi, plain.psi)
    for key, value in plain.state_dict().items():
        assert torch.equal(stopped.state_dict()[key], value), key

    # loss_and_ascend: a stop before the ascent passes still gives the loss pass
    stopped_loss = WassersteinPatchPrior(y)
    loss = stopped_loss.loss_and_ascend(x, 100000, should_stop=lambda: True)
    one_pass = WassersteinPatchPrior(y)
    assert torch.equal(loss, one_pass.loss_and_ascend(x, 1))
    assert torch.equal(stopped_loss.psi, one_pass.psi)
