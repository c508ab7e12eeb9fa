"""PatchNR: the patch flow (inverse, log-determinant, size)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from napari_wpp.core.config import TrainSpec
from napari_wpp.core.errors import InputError
from napari_wpp.core.models import build_model
from napari_wpp.core.models.patchnr import PUBLISHED_HIDDEN, PatchNR
from napari_wpp.core.patches import extract_patches
from napari_wpp.core.training import (
    TrainingCheckpoint,
    TrainingFinished,
    TrainingProgress,
    train_patchnr,
)
from napari_wpp.core.training.patchnr import HELDOUT_SHARE, PatchPool, dihedral


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
    assert float(z.detach().std()) == pytest.approx(1.0, abs=0.05)
    assert float(logdet[0].detach()) == pytest.approx(-4 * math.log(patches.std()), rel=1e-4)


def test_nll_prefers_likely_patches_after_fitting() -> None:
    torch.manual_seed(0)
    model = PatchNR(patch_size=2, hidden=16, blocks=2)
    data = torch.randn(2000, 4) @ torch.tensor(
        [[1.0, 0.9, 0.0, 0.0], [0.0, 0.3, 0.0, 0.0], [0.0, 0.0, 1.0, 0.8], [0.0, 0.0, 0.0, 0.2]]
    )
    model.standardise_on(data)
    before = float(model.nll(data).mean().detach())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        optimizer.zero_grad()
        loss = model.nll(data[torch.randint(2000, (256,))]).mean()
        loss.backward()
        optimizer.step()
    assert float(model.nll(data).mean().detach()) < before - 1.0


def test_bad_input_is_one_line() -> None:
    model = PatchNR(patch_size=6, hidden=8, blocks=1)
    with pytest.raises(InputError, match=r"\(N, 36\)"):
        model(torch.zeros(3, 25))
    with pytest.raises(InputError, match="positive integer"):
        PatchNR(patch_size=0)


# --- training -------------------------------------------------------------------------------


def _texture(seed: int = 0, size: int = 64) -> np.ndarray:
    """A smooth random texture in [0, 1] (patches with structure to learn)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((size, size))
    kernel = np.exp(-0.5 * (np.arange(-4, 5) / 1.5) ** 2)
    smooth = np.apply_along_axis(lambda r: np.convolve(r, kernel, "same"), 0, noise)
    smooth = np.apply_along_axis(lambda r: np.convolve(r, kernel, "same"), 1, smooth)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return smooth.astype(np.float32)


def _small(**changes: object) -> TrainSpec:
    options = dict(model="patchnr", steps=60, patchnr_hidden=16, patchnr_batch=64, device="cpu")
    options.update(changes)
    return TrainSpec(**options)


def test_training_lowers_the_heldout_nll() -> None:
    events = list(train_patchnr(_texture(), config=_small(steps=300), dequantise=1 / 255))
    progress = [e for e in events if isinstance(e, TrainingProgress)]
    held = [e.heldout_nll for e in progress if e.heldout_nll is not None]
    assert len(progress) == 300 and len(held) == 2  # step 250 and the last
    final = events[-1]
    assert isinstance(final, TrainingFinished) and final.state.kind == "patchnr"
    untrained = build_model("patchnr", patch_size=6, hidden=16)
    pool = PatchPool(_texture(), 6)
    untrained.standardise_on(pool.train)
    with torch.no_grad():
        before = float(untrained.nll(pool.heldout).mean())
        after = float(final.state.model.nll(pool.heldout).mean())
    assert after < before - 5.0
    assert held[-1] == pytest.approx(after, abs=2.0)  # same patches, dequantisation noise


def test_heldout_patches_are_never_trained_on() -> None:
    image = _texture(size=40)
    pool = PatchPool(image, 6)
    cut = 40 - round(HELDOUT_SHARE * 40)
    trained = torch.from_numpy(np.ascontiguousarray(image[:, :cut]))
    assert pool.train.shape[0] == (40 - 5) * (cut - 5)
    assert pool.heldout is not None
    assert torch.equal(pool.train, extract_patches(trained, 6))


def test_dihedral_gives_the_8_symmetries() -> None:
    patch = torch.arange(9, dtype=torch.float32)[None].repeat(400, 1)
    out = dihedral(patch, 3, torch.Generator().manual_seed(0))
    assert len({tuple(row.tolist()) for row in out}) == 8


def test_resume_continues_the_same_run() -> None:
    image = _texture(seed=2)
    events = list(train_patchnr(image, config=_small(steps=40, checkpoint_every=20)))
    half = next(e.state for e in events if isinstance(e, TrainingCheckpoint))
    whole = events[-1].state
    assert half.step == 20
    resumed = list(train_patchnr(image, config=_small(steps=40), resume=half))[-1].state
    assert resumed.step == 40
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_stop_ends_with_the_state() -> None:
    stop = threading.Event()
    events = []
    for event in train_patchnr(_texture(), config=_small(steps=1000), stop=stop):
        events.append(event)
        if isinstance(event, TrainingProgress) and event.step == 5:
            stop.set()
    assert events[-1].stopped_early and events[-1].state.step == 5
    assert "heldout_nll" in events[-1].state.history[-1]  # the last step is scored


def test_patch_larger_than_the_image_is_one_line() -> None:
    with pytest.raises(InputError, match="smaller than the 6×6 patch"):
        list(train_patchnr(np.zeros((4, 30), np.float32), config=_small()))
    with pytest.raises(InputError, match="NaN"):
        list(train_patchnr(np.full((30, 30), np.nan, np.float32), config=_small()))


# --- model files ----------------------------------------------------------------------------


def test_model_file_round_trip_without_pickle(tmp_path) -> None:
    from napari_wpp.io import load_model, read_model_metadata, save_model

    state = list(train_patchnr(_texture(), config=_small(steps=5)))[-1].state
    path = save_model(tmp_path / "prior.safetensors", state)
    meta = read_model_metadata(path)
    assert meta["kind"] == "patchnr" and meta["model_config"]["hidden"] == 16
    loaded = load_model(path)
    patches = PatchPool(_texture(seed=5), 6).train[:100]
    with torch.no_grad():
        assert torch.allclose(loaded.model.nll(patches), state.model.nll(patches), atol=1e-5)
    assert loaded.optimizer is not None and loaded.step == 5


def test_model_file_with_wrong_shapes_is_refused(tmp_path) -> None:
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from napari_wpp.io import load_model, save_model

    state = list(train_patchnr(_texture(), config=_small(steps=2)))[-1].state
    path = save_model(tmp_path / "prior.safetensors", state)
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["napari_wpp"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    meta["model_config"]["hidden"] = 32
    save_file(tensors, str(path), metadata={"napari_wpp": json.dumps(meta)})
    with pytest.raises(InputError, match="do not fit its patchnr configuration"):
        load_model(path)
