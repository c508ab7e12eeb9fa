"""PatchNR: the patch flow (inverse, log-determinant, size)."""

from __future__ import annotations

import pytest
import torch

from napari_wpp.core.errors import InputError
from napari_wpp.core.models import build_model
from napari_wpp.core.models.patchnr import PUBLISHED_HIDDEN, PatchNR


def _randomised(model: PatchNR, seed: int = 0) -> PatchNR:
    """The model with all weights random (the zero-initialised last layers too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        model.shift.fill_(0.4)
        model.log_scale.fill_(-1.2)
    return model


def test_inverse_is_exact() -> None:
    model = _randomised(PatchNR(patch_size=4, hidden=32, blocks=3)).double()
    x = torch.rand(50, 16, dtype=torch.float64)
    z, _ = model(x)
    assert not torch.allclose(z, x)  # the random flow does something
    assert torch.allclose(model.inverse(z), x, atol=1e-10)


def test_logdet_matches_autograd_jacobian() -> None:
    model = _randomised(PatchNR(patch_size=3, hidden=16, blocks=2, clamp=1.6), seed=3).double()
    x = torch.rand(4, 9, dtype=torch.float64)
    _, logdet = model(x)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: model(v[None])[0][0], x[i])
        expected = torch.linalg.slogdet(jac).logabsdet
        assert float(logdet[i].detach()) == pytest.approx(float(expected), abs=1e-9)


def test_log_scales_are_soft_clamped() -> None:
    model = PatchNR(patch_size=2, hidden=8, blocks=1, clamp=0.5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(10.0)
    _, logdet = model(torch.ones(3, 4))
    # 4 log-scales, each bounded by the clamp; standardisation adds nothing (log_scale 0)
    assert torch.all(logdet.abs() <= 4 * 0.5 + 1e-6)


def test_published_size() -> None:
    model = build_model("patchnr", patch_size=6, hidden=PUBLISHED_HIDDEN, blocks=5)
    n = sum(p.numel() for p in model.parameters())
    assert 2.85e6 < n < 2.95e6


def test_starts_as_identity_and_standardises() -> None:
    model = PatchNR(patch_size=2, hidden=8, blocks=2)
    patches = 0.5 + 0.1 * torch.randn(1000, 4)
    model.standardise_on(patches)
    z, logdet = model(patches)
    assert float(z.std()) == pytest.approx(1.0, abs=0.05)
    assert float(logdet[0]) == pytest.approx(4 * -torch.log(patches.std()).item(), rel=1e-4)


def test_nll_prefers_likely_patches_after_fitting() -> None:
    torch.manual_seed(0)
    model = PatchNR(patch_size=2, hidden=16, blocks=2)
    data = torch.randn(2000, 4) @ torch.tensor(
        [[1.0, 0.9, 0.0, 0.0], [0.0, 0.3, 0.0, 0.0], [0.0, 0.0, 1.0, 0.8], [0.0, 0.0, 0.0, 0.2]]
    )
    model.standardise_on(data)
    before = float(model.nll(data).mean())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        optimizer.zero_grad()
        loss = model.nll(data[torch.randint(2000, (256,))]).mean()
        loss.backward()
        optimizer.step()
    assert float(model.nll(data).mean()) < before - 1.0


def test_bad_input_is_one_line() -> None:
    model = PatchNR(patch_size=6, hidden=8, blocks=1)
    with pytest.raises(InputError, match=r"\(N, 36\)"):
        model(torch.zeros(3, 25))
    with pytest.raises(InputError, match="positive integer"):
        PatchNR(patch_size=0)
