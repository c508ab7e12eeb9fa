"""Tests of the invertible flow blocks (invertibility, log-determinants, initialisation)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from napari_wpp.core.errors import InputError
from napari_wpp.core.models.flow_blocks import (
    ActNorm,
    AffineCoupling,
    ConditionalAffineInjector,
    EdgeShift,
    FixedPermutation,
    FlowSequence,
    InvertibleConv1x1,
    Squeeze2x2,
)

C = 4  # channels of the block inputs
COND = 2  # condition channels
HIDDEN = 8


def _sequence() -> FlowSequence:
    # input (B, 1, 2H, 2W) -> squeeze -> (B, 4, H, W); cond is (B, COND, H, W)
    return FlowSequence(
        [
            Squeeze2x2(),
            ActNorm(C),
            AffineCoupling(C, hidden=HIDDEN, cond_channels=COND),
            FixedPermutation(C, seed=3),
            ConditionalAffineInjector(C, COND, hidden=HIDDEN),
            InvertibleConv1x1(C, seed=4),
            AffineCoupling(C, hidden=HIDDEN),
            ActNorm(C),
        ]
    )


# name -> (builder, input channels, input spatial scale relative to cond)
BLOCKS: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    "squeeze": (lambda: Squeeze2x2(), C, 1),
    "actnorm": (lambda: ActNorm(C), C, 1),
    "conv1x1": (lambda: InvertibleConv1x1(C, seed=0), C, 1),
    "coupling": (lambda: AffineCoupling(C, hidden=HIDDEN), C, 1),
    "coupling_odd": (lambda: AffineCoupling(3, hidden=HIDDEN), 3, 1),
    "cond_coupling": (lambda: AffineCoupling(C, hidden=HIDDEN, cond_channels=COND), C, 1),
    "injector": (lambda: ConditionalAffineInjector(C, COND, hidden=HIDDEN), C, 1),
    "permutation": (lambda: FixedPermutation(C, seed=1), C, 1),
    "edge_shift": (lambda: EdgeShift(COND, hidden=HIDDEN, block=2), 1, 1),
    "edge_shift_offset": (lambda: EdgeShift(COND, hidden=HIDDEN, block=2, offset=1), 1, 1),
    "sequence": (_sequence, 1, 2),
}


def _inputs(
    name: str, batch: int, size: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    _, channels, factor = BLOCKS[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, factor * size, factor * size, generator=g, dtype=dtype)
    x = 1.5 * x + 0.3
    cond = torch.randn(batch, COND, size, size, generator=g, dtype=dtype)
    return x, cond


@torch.no_grad()
def _perturb(module: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Add random noise to every parameter (zero-initialised last layers included)."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _prepared(name: str, x: torch.Tensor, cond: torch.Tensor, seed: int = 0) -> nn.Module:
    """Build a block, run the ActNorm data init on ``x``, perturb all parameters."""
    torch.manual_seed(0)
    block = BLOCKS[name][0]()
    block.train()
    block(x, cond)
    _perturb(block, seed=seed)
    return block


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_inverse_of_forward_is_identity(name: str, train: bool) -> None:
    for seed in range(3):  # a few random perturbations
        x, cond = _inputs(name, batch=3, size=6, seed=seed)
        block = _prepared(name, x, cond, seed=seed)
        block.train(train)
        x_before, cond_before = x.clone(), cond.clone()
        with torch.no_grad():
            y, logdet = block(x, cond)
            x_back = block.inverse(y, cond)
        assert torch.equal(x, x_before) and torch.equal(cond, cond_before)  # not modified
        assert logdet.shape == (3,)
        assert x_back.shape == x.shape
        assert (x_back - x).abs().max().item() < 1e-4
        if name not in ("squeeze", "permutation"):
            assert logdet.abs().min().item() > 1e-2  # the perturbed block is not the identity


@pytest.mark.parametrize("name", list(BLOCKS))
def test_logdet_matches_autograd_jacobian(name: str) -> None:
    x32, cond32 = _inputs(name, batch=2, size=4)
    block = _prepared(name, x32, cond32).double().eval()
    x, cond = _inputs(name, batch=1, size=4, dtype=torch.float64, seed=1)

    def f(inp: torch.Tensor) -> torch.Tensor:
        return block(inp, cond)[0]

    jac = torch.autograd.functional.jacobian(f, x, vectorize=True)
    n = x.numel()
    sign, expected = torch.linalg.slogdet(jac.reshape(n, n))
    assert sign.item() != 0
    logdet = block(x, cond)[1]
    assert logdet.shape == (1,)
    assert abs(logdet.item() - expected.item()) <= 1e-3 * max(1.0, abs(expected.item()))
    if name not in ("squeeze", "permutation"):
        assert abs(expected.item()) > 1e-2  # perturbed parameters change the volume


def test_logdet_is_per_sample() -> None:
    x, cond = _inputs("sequence", batch=3, size=4)
    block = _prepared("sequence", x, cond).eval()
    with torch.no_grad():
        _, logdet = block(x, cond)
        singles = torch.cat([block(x[i : i + 1], cond[i : i + 1])[1] for i in range(3)])
    torch.testing.assert_close(logdet, singles, rtol=1e-5, atol=1e-4)
    assert logdet.std() > 1e-3  # the conditional blocks make it differ between samples


def test_squeeze_layout_and_odd_size() -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    y, logdet = Squeeze2x2()(x)
    assert y.shape == (2, 12, 2, 3)
    assert torch.equal(logdet, torch.zeros(2))
    # channel 4c + 2i + j holds pixels (2h + i, 2w + j) of channel c
    for c, i, j in [(0, 0, 0), (1, 0, 1), (2, 1, 0), (2, 1, 1)]:
        assert torch.equal(y[:, 4 * c + 2 * i + j], x[:, c, i::2, j::2])
    with pytest.raises(InputError, match="even"):
        Squeeze2x2()(torch.zeros(1, 1, 5, 4))


def test_actnorm_data_initialisation() -> None:
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.1, 1.0, 5.0]).view(1, 3, 1, 1)
    x = torch.randn(4, 3, 6, 6, generator=g) * scales + torch.tensor([-2.0, 0.0, 7.0]).view(
        1, 3, 1, 1
    )
    norm = ActNorm(3)
    assert not bool(norm.initialized)
    y, logdet = norm.train()(x)
    assert bool(norm.initialized)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0
    )
    expected = -36 * torch.log(x.std(dim=(0, 2, 3), unbiased=False)).sum()
    torch.testing.assert_close(logdet, expected.expand(4), rtol=1e-4, atol=1e-4)
    # a second batch does not re-initialise
    params = [p.detach().clone() for p in norm.parameters()]
    norm(x * 3 + 1)
    assert all(torch.equal(a, b) for a, b in zip(params, norm.parameters()))


def test_actnorm_eval_does_not_initialise() -> None:
    norm = ActNorm(2).eval()
    x = torch.randn(2, 2, 4, 4) * 3 + 1
    y, _ = norm(x)
    assert torch.equal(y, x)
    assert not bool(norm.initialized)


def test_actnorm_not_reinitialised_after_load_state_dict() -> None:
    x1 = torch.randn(4, 3, 5, 5) * 2 + 1
    x2 = torch.randn(4, 3, 5, 5) * 7 - 3
    trained = ActNorm(3).train()
    trained(x1)
    state = trained.state_dict()
    assert "initialized" in state
    fresh = ActNorm(3)
    fresh.load_state_dict(state)
    assert bool(fresh.initialized)
    fresh.train()
    y, _ = fresh(x2)
    expected, _ = trained(x2)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(fresh.log_scale, trained.log_scale)
    # and a fresh block with x2 would have initialised differently
    other = ActNorm(3).train()
    other(x2)
    assert not torch.allclose(other.log_scale, fresh.log_scale)


@pytest.mark.parametrize(
    "name", ["coupling", "coupling_odd", "cond_coupling", "injector", "edge_shift_offset"]
)
def test_couplings_are_identity_at_initialisation(name: str) -> None:
    x, cond = _inputs(name, batch=2, size=6)
    block = BLOCKS[name][0]().train()
    y, logdet = block(x, cond)
    assert torch.equal(y, x)
    assert torch.equal(logdet, torch.zeros(2))
    assert torch.equal(block.inverse(x, cond), x)


def test_conv1x1_starts_orthogonal() -> None:
    conv = InvertibleConv1x1(6, seed=5)
    w = conv.weight()
    torch.testing.assert_close(w @ w.T, torch.eye(6), atol=1e-5, rtol=0)
    _, logdet = conv(torch.randn(2, 6, 3, 3))
    torch.testing.assert_close(logdet, torch.zeros(2), atol=1e-5, rtol=0)


def test_seeds_reproduce_conv_and_permutation() -> None:
    assert torch.equal(InvertibleConv1x1(6, seed=7).weight(), InvertibleConv1x1(6, seed=7).weight())
    assert not torch.allclose(
        InvertibleConv1x1(6, seed=7).weight(), InvertibleConv1x1(6, seed=8).weight()
    )
    a, b = InvertibleConv1x1(6, seed=7), InvertibleConv1x1(6, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(FixedPermutation(8, seed=2).perm, FixedPermutation(8, seed=2).perm)
    assert not torch.equal(FixedPermutation(8, seed=2).perm, FixedPermutation(8, seed=9).perm)
    assert sorted(FixedPermutation(8, seed=2).perm.tolist()) == list(range(8))


def test_gradients_reach_all_parameters() -> None:
    x, cond = _inputs("sequence", batch=2, size=4)
    block = _prepared("sequence", x, cond)
    y, logdet = block(x, cond)
    (0.5 * y.pow(2).sum() - logdet.sum()).backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _one_line_error(fn: Callable[[], object]) -> str:
    with pytest.raises(InputError) as info:
        fn()
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize(
    "name", ["actnorm", "conv1x1", "coupling", "cond_coupling", "injector", "permutation"]
)
def test_wrong_channel_count_raises(name: str) -> None:
    block = BLOCKS[name][0]()
    x = torch.randn(1, C + 1, 4, 4)
    cond = torch.randn(1, COND, 4, 4)
    assert "channels" in _one_line_error(lambda: block(x, cond))
    assert "channels" in _one_line_error(lambda: block.inverse(x, cond))


@pytest.mark.parametrize("name", ["cond_coupling", "injector", "sequence"])
def test_missing_or_mismatched_condition_raises(name: str) -> None:
    block = BLOCKS[name][0]()
    x, cond = _inputs(name, batch=2, size=4)
    assert "cond" in _one_line_error(lambda: block(x))
    with torch.no_grad():
        y, _ = block(x, cond)
    assert "cond" in _one_line_error(lambda: block.inverse(y))
    assert "cond" in _one_line_error(lambda: block(x, cond[:, :1]))  # wrong cond channels
    assert "cond" in _one_line_error(lambda: block(x, cond[:1]))  # wrong batch
    assert "cond" in _one_line_error(lambda: block(x, cond[:, :, :2]))  # wrong size


def test_bad_shapes_and_arguments_raise() -> None:
    _one_line_error(lambda: ActNorm(3)(torch.randn(3, 4, 4)))
    _one_line_error(lambda: ActNorm(3)(torch.zeros(1, 3, 4, 4, dtype=torch.int64)))
    _one_line_error(lambda: Squeeze2x2().inverse(torch.randn(1, 3, 2, 2)))
    _one_line_error(lambda: AffineCoupling(1))
    _one_line_error(lambda: AffineCoupling(4, clamp=0.0))
    _one_line_error(lambda: ConditionalAffineInjector(4, 0))
    _one_line_error(lambda: InvertibleConv1x1(0))
    _one_line_error(lambda: FlowSequence([nn.ReLU()]))


def test_edge_shift_stretches_only_within_the_edge_directions() -> None:
    x, cond = _inputs("edge_shift", batch=2, size=4)
    block = _prepared("edge_shift", x, cond).eval()
    with torch.no_grad():
        q, _, _ = block.stretch(cond)
        y, _ = block(x, cond)
        change = block._tiles(y - x)
        # the change lies in the span of the tile's three directions ...
        in_span = torch.linalg.lstsq(q.transpose(-1, -2), change.transpose(-1, -2)).solution
        residual = change - (q.transpose(-1, -2) @ in_span).transpose(-1, -2)
        # ... and the orthogonal complement of that span passes unchanged
        assert change.abs().max() > 1e-2
        assert residual.abs().max() < 1e-5


@pytest.mark.parametrize("turn", [0.0, 0.03], ids=["move", "turn"])
def test_edge_shift_directions_move_and_turn_an_edge(turn: float) -> None:
    from napari_wpp.core.models.wppflow import edge_pattern

    # a smooth edge near column 7.3; moving it by 0.2 px (and turning it a little) changes the
    # image, in every tile the edge crosses, almost only within the tile's directions
    rows = torch.arange(16, dtype=torch.float64)[:, None]
    cols = torch.arange(16, dtype=torch.float64)[None, :]

    def edge(at: float, slope: float) -> torch.Tensor:
        return torch.sigmoid((cols - at - slope * (rows - 7.5)) / 1.2)[None, None]

    m = edge(7.3, 0.0)
    change = edge(7.5, turn) - m
    block = EdgeShift(1, hidden=4, block=4).double()
    q, _, _ = block.stretch(edge_pattern(m))
    d = block._tiles(change)[..., 0, :]  # (1, 4, 4, 16)
    coords = torch.einsum("...mk,...k->...m", q, d)
    captured = coords.norm(dim=-1) / d.norm(dim=-1)
    strong = d.norm(dim=-1) > 1e-2  # tiles the edge crosses
    assert strong.sum() >= 4
    assert captured[strong].min() > 0.95


def test_edge_shift_rejects_bad_tiles() -> None:
    _one_line_error(lambda: EdgeShift(2, block=4, offset=4))
    block = EdgeShift(2, block=4)
    _one_line_error(lambda: block(torch.randn(1, 1, 6, 8), torch.randn(1, 2, 6, 8)))
    _one_line_error(lambda: block(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)))
