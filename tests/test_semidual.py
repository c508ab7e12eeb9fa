"""Tests of the exact c-transform, the semi-dual solvers and the WPP loss."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_wpp.core.errors import InputError
from napari_wpp.core.semidual import (
    WassersteinPatchPrior,
    c_transform,
    c_transform_argmin,
    exact_w2,
)
from napari_wpp.core.semidual import engine as semidual_engine

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def brute_force(x: torch.Tensor, y: torch.Tensor, psi: torch.Tensor) -> tuple[np.ndarray, ...]:
    """Float64 argmin and min of ‖x_j − y_k‖² − ψ_k by direct differences (numpy)."""
    xa, ya, pa = (t.detach().cpu().double().numpy() for t in (x, y, psi))
    s = ((xa[:, None, :] - ya[None, :, :]) ** 2).sum(-1) - pa[None, :]
    return s.argmin(1), s.min(1)


def _random(n: int, m: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g)
    y = torch.rand(m, d, generator=g)
    psi = 0.3 * torch.rand(m, generator=g)
    return x, y, psi


@pytest.mark.parametrize(
    ("n", "m", "d"), [(1, 1, 3), (50, 1, 5), (300, 63, 4), (700, 64, 36), (513, 1000, 9)]
)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_argmin_exact_random(n: int, m: int, d: int, precision: str) -> None:
    x, y, psi = _random(n, m, d, seed=n + m)
    got = c_transform_argmin(x, y, psi, precision=precision)
    want, _ = brute_force(x, y, psi)
    assert got.dtype == torch.int64 and got.shape == (n,)
    np.testing.assert_array_equal(got.numpy(), want)


def test_argmin_exact_across_block_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(semidual_engine, "BLOCK_ELEMS", 3000)
    monkeypatch.setattr(semidual_engine, "GROUP_SIZE", 7)
    x, y, psi = _random(1001, 150, 6, seed=5)
    want, _ = brute_force(x, y, psi)
    np.testing.assert_array_equal(c_transform_argmin(x, y, psi).numpy(), want)


def test_argmin_exact_on_adversarial_near_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    """Near-duplicate references and potentials that equalise scores to ~1e-7."""
    g = torch.Generator().manual_seed(11)
    d, n = 36, 100
    base = torch.rand(n, d, generator=g)
    near = base + 1e-6 * torch.randn(n, d, generator=g)
    far = base + 1e-6 * torch.randn(n, d, generator=g)
    # near copies sit next to their original (same group), far copies in other groups
    y = torch.cat([torch.stack([base, near], 1).reshape(2 * n, d), far])
    x = torch.cat([base + 1e-3 * torch.randn(n, d, generator=g), torch.rand(300, d, generator=g)])
    # potentials that make the copies tie with the original for x_k up to 1e-9 .. 1e-7
    # (an exact real tie would be ambiguous; these gaps are resolvable in float64)
    x64, y64 = x[:n].double(), y.double()
    dist = lambda rows: ((x64 - y64[rows]) ** 2).sum(1)  # noqa: E731
    ar = torch.arange(n)
    psi64 = torch.zeros(3 * n, dtype=torch.float64)
    gaps = torch.linspace(-1e-7, 1e-7, n, dtype=torch.float64)
    psi64[2 * ar + 1] = dist(2 * ar + 1) - dist(2 * ar) + gaps
    far_gaps = gaps.flip(0)
    far_gaps[n // 2 :] = -1.0  # far copies compete only for the first half of the rows
    psi64[2 * n + ar] = dist(2 * n + ar) - dist(2 * ar) + far_gaps
    psi = psi64.float()
    calls = {"multi": 0, "across": 0, "brute": 0}
    real_multi, real_brute = semidual_engine._resolve_multi, semidual_engine._brute_force64
    real_across = semidual_engine._resolve_across_groups

    def multi(*a: object) -> torch.Tensor:
        calls["multi"] += 1
        return real_multi(*a)

    def across(*a: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls["across"] += 1
        return real_across(*a)

    def brute(*a: object) -> torch.Tensor:
        calls["brute"] += 1
        return real_brute(*a)

    monkeypatch.setattr(semidual_engine, "_resolve_multi", multi)
    monkeypatch.setattr(semidual_engine, "_resolve_across_groups", across)
    monkeypatch.setattr(semidual_engine, "_brute_force64", brute)
    monkeypatch.setattr(semidual_engine, "GROUP_SIZE", 8)
    want, _ = brute_force(x, y, psi)
    for precision in ("fp32", "bf16"):
        np.testing.assert_array_equal(
            c_transform_argmin(x, y, psi, precision=precision).numpy(), want
        )
    # near-ties were detected and resolved in float64 (within and across groups)
    assert calls["multi"] > 0 and calls["across"] > 0
    # with room for a single candidate only, cross-group ties go to the brute force
    monkeypatch.setattr(semidual_engine, "CROSS_CANDIDATES", 1)
    np.testing.assert_array_equal(c_transform_argmin(x, y, psi).numpy(), want)
    assert calls["brute"] > 0


def test_argmin_exact_with_duplicate_references() -> None:
    """Exact duplicates (flat regions of real scans) tie: the lowest index wins, as in float64."""
    g = torch.Generator().manual_seed(5)
    d = 36
    distinct = torch.rand(200, d, generator=g)
    flat = torch.full((1, d), 0.25)
    # 40 identical flat patches spread over many groups, among distinct ones
    y = torch.cat([distinct[:100], flat.expand(20, d), distinct[100:], flat.expand(20, d)])
    x = torch.cat([flat + 1e-3 * torch.randn(300, d, generator=g), torch.rand(100, d, generator=g)])
    psi = torch.zeros(y.shape[0])
    want, _ = brute_force(x, y, psi)
    np.testing.assert_array_equal(c_transform_argmin(x, y, psi).numpy(), want)
    assert (c_transform_argmin(x[:300], y, psi) == 100).float().mean() > 0.9


def test_argmin_identical_references_and_ties_to_first() -> None:
    y = torch.rand(1, 8).repeat(50, 1)
    x = torch.rand(20, 8)
    psi = torch.zeros(50)
    psi[37] = 1e-3
    assert torch.all(c_transform_argmin(x, y, psi) == 37)


@pytest.mark.skipif(not semidual_engine._faiss_available(), reason="faiss is not installed")
def test_argmin_faiss_backend_exact() -> None:
    x, y, psi = _random(900, 400, 36, seed=2)
    want, _ = brute_force(x, y, psi)
    np.testing.assert_array_equal(c_transform_argmin(x, y, psi, backend="faiss").numpy(), want)


def test_argmin_memory_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes: list[tuple[int, int]] = []
    real = semidual_engine._score_block

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = real(a, b)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(semidual_engine, "_score_block", spy)
    monkeypatch.setattr(semidual_engine, "BLOCK_ELEMS", 64 * 256)
    x, y, psi = _random(2000, 250, 5, seed=3)
    want, _ = brute_force(x, y, psi)
    np.testing.assert_array_equal(c_transform_argmin(x, y, psi).numpy(), want)
    assert len(shapes) >= 2000 // 64
    assert max(a * b for a, b in shapes) <= 64 * 256
    assert all(b < 2000 for _, b in shapes)


def test_c_transform_values() -> None:
    x, y, psi = _random(200, 90, 7, seed=4)
    idx, vals = c_transform(x, y, psi)
    want_idx, want_vals = brute_force(x, y, psi)
    np.testing.assert_array_equal(idx.numpy(), want_idx)
    np.testing.assert_allclose(vals.numpy(), want_vals, rtol=1e-5, atol=1e-5)


def test_input_errors() -> None:
    x, y, psi = _random(5, 4, 3, seed=0)
    with pytest.raises(InputError):
        c_transform_argmin(x, y[:, :2], psi)
    with pytest.raises(InputError):
        c_transform_argmin(x, y, psi[:3])
    with pytest.raises(InputError):
        c_transform_argmin(x, y, psi, precision="fp8")
    with pytest.raises(InputError):
        WassersteinPatchPrior(y, solver="lbfgs")
    with pytest.raises(InputError):
        WassersteinPatchPrior(y, solver="adam", momentum=0.5)


def test_exact_w2_against_permutations() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((6, 3)), rng.random((6, 3))
    cost = ((a[:, None] - b[None]) ** 2).sum(-1)
    best = min(cost[np.arange(6), list(p)].mean() for p in itertools.permutations(range(6)))
    assert exact_w2(a, b) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("solver", ["adam", "asgd", "gd"])
def test_semidual_value_is_lower_bound_and_improves(solver: str) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.rand(150, 4, generator=g)
    y = torch.rand(150, 4, generator=g) ** 2
    w2 = exact_w2(x, y)
    prior = WassersteinPatchPrior(y, solver=solver)
    v0 = prior.value(x)
    values = [prior.ascend(x, 20) for _ in range(5)]
    v_end = prior.value(x)
    assert max([v0, *values, v_end]) <= w2 * (1 + 1e-6)
    assert v_end > v0
    if solver == "adam":
        assert v_end >= 0.9 * w2
    # a random potential also gives a lower bound
    prior.psi = torch.randn(150, generator=g)
    assert prior.value(x) <= w2 * (1 + 1e-6)


def test_loss_value_and_gradient_match_finite_differences() -> None:
    g = torch.Generator().manual_seed(8)
    y = torch.rand(30, 4, generator=g)
    prior = WassersteinPatchPrior(y)
    x0 = torch.rand(12, 4, generator=g)
    prior.ascend(x0, 30)
    x = x0.double().requires_grad_(True)
    loss = prior.loss(x)
    assert loss.item() == pytest.approx(prior.value(x0), rel=1e-5)
    loss.backward()
    # analytic: 2 (x_j − y_κ(j)) / N
    idx = c_transform_argmin(x0, y, prior.psi)
    np.testing.assert_allclose(
        x.grad.numpy(), (2 * (x0.double() - y.double()[idx]) / 12).numpy(), rtol=1e-6
    )
    eps = 1e-6
    fd = torch.zeros_like(x)
    with torch.no_grad():
        for j, i in itertools.product(range(12), range(4)):
            e = torch.zeros_like(x)
            e[j, i] = eps
            fd[j, i] = (prior.loss(x + e) - prior.loss(x - e)) / (2 * eps)
    np.testing.assert_allclose(x.grad.numpy(), fd.numpy(), rtol=1e-4, atol=1e-7)
    assert prior.psi.grad is None


def test_state_dict_resume_is_identical() -> None:
    x, y, _ = _random(120, 80, 5, seed=9)
    for solver in ("adam", "asgd"):
        a = WassersteinPatchPrior(y, solver=solver)
        a.ascend(x, 7)
        b = WassersteinPatchPrior(y, solver=solver)
        b.load_state_dict(a.state_dict())
        assert a.ascend(x, 5) == b.ascend(x, 5)
        assert torch.equal(a.psi, b.psi)
        a.reset()
        assert torch.all(a.psi == 0)
    with pytest.raises(InputError):
        WassersteinPatchPrior(y, solver="asgd").load_state_dict(
            WassersteinPatchPrior(y).state_dict()
        )


class _OtherRank:
    """A second rank's sum for ``reduce_sum``: its own patches, the same ψ (in-process)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.prior: WassersteinPatchPrior | None = None
        self.idx = torch.empty(0, dtype=torch.int64)

    def __call__(self, local: torch.Tensor) -> torch.Tensor:
        assert self.prior is not None
        if local.dtype == torch.int64:  # the counts come first in every pass
            self.idx = c_transform_argmin(self.x, self.y, self.prior.psi)
            return local + torch.bincount(self.idx, minlength=self.y.shape[0])
        diff = self.x - self.y[self.idx]
        mine = torch.stack([torch.tensor(float(self.x.shape[0])), (diff * diff).sum(1).sum()])
        return local + mine.double()


@pytest.mark.parametrize("solver", ["adam", "asgd", "gd"])
def test_reduce_sum_gives_the_step_of_all_ranks_patches(solver: str) -> None:
    """With a rank sum, ψ follows the trajectory of one process holding every rank's patches."""
    x, y, _ = _random(90, 40, 5, seed=4)
    x_other = _random(70, 40, 5, seed=5)[0]
    single = WassersteinPatchPrior(y, solver=solver, scale_momentum=0.1)
    other = _OtherRank(x_other, y)
    ranked = WassersteinPatchPrior(y, solver=solver, scale_momentum=0.1, reduce_sum=other)
    other.prior = ranked
    assert ranked.ascend(x, 3) == pytest.approx(single.ascend(torch.cat([x, x_other]), 3))
    single.loss_and_ascend(torch.cat([x, x_other]), 2)
    ranked.loss_and_ascend(x, 2)
    torch.testing.assert_close(ranked.psi, single.psi, rtol=1e-5, atol=1e-7)
    alone = WassersteinPatchPrior(y, solver=solver, scale_momentum=0.1)
    alone.ascend(x, 3)
    alone.loss_and_ascend(x, 2)
    assert not torch.allclose(alone.psi, single.psi, rtol=1e-3, atol=1e-5)


def test_asgd_matches_torch_optim_asgd() -> None:
    """The 'asgd' solver reproduces torch.optim.ASGD(lr=1) on the semi-dual loss."""
    x, y, _ = _random(100, 60, 4, seed=10)
    prior = WassersteinPatchPrior(y, solver="asgd")
    psi = torch.zeros(60, requires_grad=True)
    opt = torch.optim.ASGD([psi], lr=1.0)
    for _ in range(15):
        prior.ascend(x, 1)
        opt.zero_grad()
        _, want_idx = None, torch.from_numpy(brute_force(x, y, psi.detach())[0])
        loss = -((((x - y[want_idx]) ** 2).sum(1) - psi[want_idx]).mean() + psi.mean())
        loss.backward()
        opt.step()
    torch.testing.assert_close(prior.psi, psi.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.realdata
def test_adam_reaches_90_percent_on_real_sic_patches() -> None:
    if not (DATA / "sic" / "ref_SiC.png").exists():
        pytest.skip(f"real data not found in {DATA} (see shared/data/README.md)")
    from PIL import Image

    from napari_wpp.core.patches import sample_reference_patches

    ref = np.asarray(Image.open(DATA / "sic" / "ref_SiC.png"))
    hr = np.asarray(Image.open(DATA / "sic" / "hr_SiC.png"))
    y = sample_reference_patches(ref, 500, 6, seed=1)
    x = sample_reference_patches(hr, 500, 6, seed=2)
    w2 = exact_w2(x, y)
    prior = WassersteinPatchPrior(y)
    prior.ascend(x, 100)
    value = prior.value(x)
    assert 0.9 * w2 <= value <= w2 * (1 + 1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_argmin_exact_on_cuda() -> None:
    x, y, psi = _random(3000, 700, 36, seed=12)
    want, _ = brute_force(x, y, psi)
    for precision in ("fp32", "bf16"):
        got = c_transform_argmin(x.cuda(), y.cuda(), psi.cuda(), precision=precision)
        assert got.device.type == "cuda"
        np.testing.assert_array_equal(got.cpu().numpy(), want)
    # the solver gives the same potentials on CUDA as on the CPU (exact argmin both sides)
    cpu, gpu = WassersteinPatchPrior(y), WassersteinPatchPrior(y).to("cuda")
    assert cpu.ascend(x, 3) == pytest.approx(gpu.ascend(x.cuda(), 3), rel=1e-5)
    torch.testing.assert_close(gpu.psi.cpu(), cpu.psi, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_score_error_bound_holds(scale: float) -> None:
    """Computed float32 score differences stay within twice the bound E_j of float64 ones."""
    g = torch.Generator().manual_seed(21)
    d = 36
    y = scale * (0.5 + torch.rand(300, d, generator=g))
    x = scale * (0.5 + torch.rand(200, d, generator=g))
    psi = scale**2 * torch.rand(300, generator=g)
    engine = semidual_engine._Engine(x, y, psi, "fp32")
    x_aug, bound2 = engine.prepare_rows(x)
    s32 = torch.mm(engine.y_aug, x_aug.T)[: y.shape[0]].T.double()  # (N, M), original order
    x64, y64 = x.double(), y.double()
    s64 = ((x64[:, None, :] - y64[None]) ** 2).sum(-1) - psi.double()
    best = s64.argmin(1, keepdim=True)
    err = (s32 - s32.gather(1, best)) - (s64 - s64.gather(1, best))
    assert bool((err.abs() <= bound2.double()[:, None]).all())
    # the bound is not vacuous: a few hundred ulps of the score scale
    assert float(bound2.max()) < 1e-3 * float(s64.abs().max())


def test_argmin_exact_with_small_cross_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cross-group ties are re-ranked exactly whatever the batching of their score columns."""
    g = torch.Generator().manual_seed(8)
    d = 16
    flat = torch.full((1, d), 0.5)
    y = torch.cat([torch.rand(150, d, generator=g), flat.expand(10, d), torch.rand(150, d)])
    y = torch.cat([y, flat.expand(10, d)])
    x = torch.cat([flat + 1e-4 * torch.randn(200, d, generator=g), torch.rand(100, d)])
    psi = torch.zeros(y.shape[0])
    want, _ = brute_force(x, y, psi)
    monkeypatch.setattr(semidual_engine, "GROUP_SIZE", 8)
    monkeypatch.setattr(semidual_engine, "BLOCK_ELEMS", 8 * 1024)
    for batch in (1, 7, 1000):
        monkeypatch.setattr(semidual_engine, "CROSS_BATCH", batch)
        np.testing.assert_array_equal(c_transform_argmin(x, y, psi).numpy(), want)
