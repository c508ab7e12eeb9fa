"""WPPFlow: invertibility, exact log-determinant, aligned conditions, reproducible sampling."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_wpp.core.errors import InputError
from napari_wpp.core.models import build_model
from napari_wpp.core.models.wppflow import WPPFlow, aligned_upsample
from napari_wpp.core.operators import GaussianDownsampling
from napari_wpp.core.training import (
    TrainingCheckpoint,
    TrainingConfig,
    TrainingFinished,
    TrainingProgress,
    paper_lambda,
    published_rho,
    run_training,
    train,
)
from napari_wpp.io import load_model, save_model

TINY = {"steps": 1, "hidden": 8, "cond_features": 4, "mean_features": 8, "mean_blocks": 2}


def _perturbed(flow: WPPFlow, lr: torch.Tensor, scale: float = 0.05, seed: int = 0) -> WPPFlow:
    """Initialise ActNorm on data, then move every weight off its (identity) initialisation."""
    q = flow.scale
    flow(torch.randn(lr.shape[0], 1, lr.shape[2] * q, lr.shape[3] * q, dtype=lr.dtype), lr)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return flow


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_inverse_of_forward_is_identity(scale: int) -> None:
    torch.manual_seed(0)
    lr = torch.rand(2, 1, 5, 6)
    flow = _perturbed(WPPFlow(scale, **TINY), lr)
    z = torch.randn(2, 1, 5 * scale, 6 * scale)
    with torch.no_grad():
        x, logdet = flow(z, lr)
        back = flow.inverse(x, lr)
    assert x.shape == z.shape and logdet.shape == (2,)
    assert not torch.allclose(x, z, atol=1e-2)  # the flow does something
    assert torch.max(torch.abs(back - z)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logdet_matches_autograd_jacobian(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    lr = torch.rand(1, 1, 2, 2, dtype=dtype)
    flow = _perturbed(WPPFlow(4, **TINY).to(dtype), lr, scale=0.1)
    z = torch.randn(1, 1, 8, 8, dtype=dtype)

    def generate(flat: torch.Tensor) -> torch.Tensor:
        return flow(flat.view(1, 1, 8, 8), lr)[0].flatten()

    jacobian = torch.autograd.functional.jacobian(generate, z.flatten())
    expected = torch.linalg.slogdet(jacobian.double())[1]
    _, logdet = flow(z, lr)
    assert abs(float(logdet) - float(expected)) <= 1e-3 * abs(float(expected)) + 1e-4


@pytest.mark.parametrize("anchor", ["center", "corner"])
def test_conditions_are_registered_with_the_operator(anchor: str) -> None:
    """A ramp whose LR values are the HR coordinates they sample upsamples to the HR ramp."""
    q = 4
    operator = GaussianDownsampling(q, 2.0, kernel_size=16, anchor=anchor)
    offset = operator.sampling_offset
    lr = (offset + q * torch.arange(8.0)).expand(1, 1, 8, 8).contiguous()
    hr = aligned_upsample(lr, q, offset)
    inside = slice(q * 2, q * 6)
    expected = torch.arange(8.0 * q)[inside]
    assert torch.allclose(hr[0, 0, 0, inside], expected, atol=1e-4)
    flow = WPPFlow(q, sampling_offset=offset, **TINY)
    conds = flow.conditions(lr)
    assert [c.shape[-1] for c in conds] == [8, 16, 32]
    assert torch.allclose(conds[-1][0, 0, 0, inside], expected, atol=1e-4)
    # the middle level: pixel j covers HR pixels [2j, 2j + 2), centre 2j + 0.5
    mid = conds[1][0, 0, 0, 4:12]
    assert torch.allclose(mid, 2.0 * torch.arange(4.0, 12.0) + 0.5, atol=1e-4)


def test_sampling_is_reproducible_and_varies_with_seed() -> None:
    torch.manual_seed(0)
    lr = torch.rand(1, 1, 6, 6)
    flow = _perturbed(WPPFlow(2, **TINY), lr)
    with torch.no_grad():
        a = flow.sample(lr, 1.0, torch.Generator().manual_seed(3))
        b = flow.sample(lr, 1.0, torch.Generator().manual_seed(3))
        c = flow.sample(lr, 1.0, torch.Generator().manual_seed(4))
        cold = flow.sample(lr, 0.0, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.allclose(cold, flow.mode_sample(lr))


def test_initial_flow_spreads_samples_around_the_mean() -> None:
    """Zero-initialised subnets: x = mean(y) + initial_std · (orthogonal mix of z) at first."""
    torch.manual_seed(0)
    flow = WPPFlow(2, initial_std=0.05, **TINY)
    lr = torch.rand(4, 1, 16, 16)
    z = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        x, _ = flow(z, lr)
        mean = flow.mean_net(lr)
    noise = (x - mean) / 0.05
    assert abs(float(noise.mean())) < 0.05
    assert float(noise.std()) == pytest.approx(1.0, abs=0.05)


def test_repeated_image_shares_its_conditions() -> None:
    """K samples of one image (an expanded batch) equal K separate forward passes."""
    torch.manual_seed(0)
    lr = torch.rand(1, 1, 6, 6)
    flow = _perturbed(WPPFlow(2, **TINY), lr)
    z = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        shared, logdet = flow(z, lr.expand(3, -1, -1, -1))
        separate = [flow(z[i : i + 1], lr) for i in range(3)]
    assert torch.allclose(shared, torch.cat([x for x, _ in separate]), atol=1e-6)
    assert torch.allclose(logdet, torch.cat([d for _, d in separate]), atol=1e-3)


def test_bad_scale_and_shapes() -> None:
    with pytest.raises(InputError, match="WPPNet"):
        WPPFlow(3)
    flow = build_model("wppflow", scale=2, **TINY)
    with pytest.raises(InputError, match="latent"):
        flow(torch.zeros(1, 1, 10, 10), torch.zeros(1, 1, 6, 6))


def _tiny_data() -> tuple[np.ndarray, np.ndarray, GaussianDownsampling]:
    rng = np.random.default_rng(0)
    operator = GaussianDownsampling(2, 1.0, kernel_size=8)
    hr = rng.random((64, 64)).astype(np.float32)
    lr = operator(torch.from_numpy(hr)).numpy()
    return np.stack([lr, lr[::-1].copy()]), hr, operator


def _tiny_config(**overrides: object) -> TrainingConfig:
    """A WPPFlow training configuration small enough for a unit test."""
    options = {
        "model": "wppflow",
        "steps": 2,
        "batch_size": 2,
        "crop_size": 12,
        "n_reference_patches": 300,
        "patches_per_step": 400,
        "mean_warmup": 0.0,
        "model_options": TINY,
        **overrides,
    }
    return TrainingConfig(**options)  # type: ignore[arg-type]


def test_flow_training_steps_and_resume() -> None:
    lr, ref, operator = _tiny_data()
    config = _tiny_config()
    events = list(train(lr, ref, operator, config))
    progress = [e for e in events if isinstance(e, TrainingProgress)]
    assert len(progress) == 2
    assert all(np.isfinite(e.loss) and e.logdet is not None for e in progress)
    state = events[-1].state
    assert state.kind == "wppflow"  # default ρ: the published weighting for 12-pixel crops
    assert state.lam == pytest.approx(published_rho(0.01, 12)) == pytest.approx(100 / 0.0144)
    assert state.model.sampling_offset == operator.sampling_offset


@pytest.mark.parametrize("rho", [100.0, 7.0])
def test_flow_loss_is_the_backward_kl_per_lr_pixel(rho: float) -> None:
    """Per LR pixel: data/(2σ²) + ρ·W₂² − log|det|/n_LR, with the configured σ and ρ."""
    lr, ref, operator = _tiny_data()
    crop, sigma = 12, 0.02
    config = _tiny_config(rho=rho, noise_std=sigma, crop_size=crop)
    progress = [e for e in train(lr, ref, operator, config) if isinstance(e, TrainingProgress)]
    n_lr = crop * crop
    assert len(progress) == 2
    for e in progress:
        expected = e.data_term / (2 * sigma**2) + rho * e.wpp_term - e.logdet / n_lr
        assert e.loss == pytest.approx(expected, rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("warmup", [0.0, 0.5])
def test_flow_resume_continues_the_same_run(warmup: float) -> None:
    """Also across the end of the mean warm-up (steps 1–2 warm-up, step 3 spread)."""
    lr, ref, operator = _tiny_data()
    config = _tiny_config(steps=3, mean_warmup=warmup)
    straight = run_training(lr, ref, operator, config).state
    stop = threading.Event()
    first = None
    for event in train(lr, ref, operator, config, stop=stop):
        if isinstance(event, TrainingProgress) and event.step == 2:
            stop.set()
        if isinstance(event, TrainingFinished):
            first = event.state
    assert first is not None and first.step == 2
    resumed = run_training(lr, ref, operator, config, resume=first).state
    assert resumed.step == 3
    for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()):
        assert torch.equal(a, b)


def _parameters(state, mean: bool) -> dict[str, torch.Tensor]:
    return {
        name: value.detach().clone()
        for name, value in state.model.named_parameters()
        if name.startswith("mean_net.") == mean
    }


def _changed(before: dict, after: dict) -> list[str]:
    return [name for name in before if not torch.equal(before[name], after[name])]


def test_mean_warmup_trains_the_mean_alone_then_freezes_it(tmp_path) -> None:
    """Warm-up steps change only the mean WPPNet (WPPNet loss, no log-det); later steps
    change everything but it, also after a resume from a saved file."""
    lr, ref, operator = _tiny_data()
    config = _tiny_config(steps=6, mean_warmup=0.5, checkpoint_every=1)
    states, progress = {}, []
    for event in train(lr, ref, operator, config):
        if isinstance(event, TrainingCheckpoint):
            states[event.state.step] = event.state
        elif isinstance(event, TrainingProgress):
            progress.append(event)
    assert [e.logdet is None for e in progress] == [True] * 3 + [False] * 3
    assert [e.phase for e in progress] == ["mean warm-up"] * 3 + ["spread"] * 3
    for e in progress[:3]:  # WPPNet loss with the paper's λ for 12-pixel crops
        assert e.loss == pytest.approx(e.data_term + paper_lambda(12) * e.wpp_term, rel=1e-5)
    assert [states[k].mean_frozen for k in range(1, 7)] == [False] * 3 + [True] * 3

    # warm-up: the mean network learns, the rest of the flow stays at its initialisation
    assert _changed(_parameters(states[1], True), _parameters(states[3], True))
    assert not _changed(_parameters(states[1], False), _parameters(states[3], False))
    # spread: the mean network is frozen, the rest learns
    assert not _changed(_parameters(states[3], True), _parameters(states[6], True))
    assert _changed(_parameters(states[3], False), _parameters(states[6], False))

    path = tmp_path / "flow.safetensors"
    save_model(path, states[4])
    loaded = load_model(path)
    assert loaded.mean_frozen
    resumed = run_training(lr, ref, operator, config, resume=loaded).state
    assert resumed.step == 6
    assert not _changed(_parameters(states[4], True), _parameters(resumed, True))
    assert _changed(_parameters(states[4], False), _parameters(resumed, False))


def test_flows_saved_before_the_warmup_resume_jointly() -> None:
    """A saved configuration without ``mean_warmup`` goes on training everything at once."""
    lr, ref, operator = _tiny_data()
    state = run_training(lr, ref, operator, _tiny_config(steps=1)).state
    del state.config["mean_warmup"]
    # step 2 of 5 lies inside the default warm-up share: a warm-up would leave out the log-det
    events = list(train(lr, ref, operator, _tiny_config(steps=5), resume=state))
    progress = [e for e in events if isinstance(e, TrainingProgress)]
    assert [e.step for e in progress] == [2, 3, 4, 5]
    assert all(e.logdet is not None and e.phase is None for e in progress)
    assert not events[-1].state.mean_frozen


@pytest.mark.parametrize("warmup", [-0.1, 1.0, 1.5])
def test_mean_warmup_must_be_a_share_of_the_budget(warmup: float) -> None:
    lr, ref, operator = _tiny_data()
    with pytest.raises(InputError, match=r"mean warm-up must be a share of the budget in \[0, 1\)"):
        next(train(lr, ref, operator, _tiny_config(mean_warmup=warmup)))


def test_flow_rejects_wrong_weights() -> None:
    lr, ref, operator = _tiny_data()
    with pytest.raises(InputError, match="rho"):
        run_training(lr, ref, operator, TrainingConfig(model="wppflow", rho=-1.0, steps=1))
    with pytest.raises(InputError, match="noise level"):
        run_training(lr, ref, operator, TrainingConfig(model="wppflow", noise_std=0.0, steps=1))


def test_edge_steps_start_as_the_identity() -> None:
    """A fresh flow draws the same samples with or without its EdgeShift steps."""
    lr = torch.rand(2, 1, 6, 6)
    z = torch.randn(2, 1, 24, 24)
    torch.manual_seed(0)
    plain = WPPFlow(4, edge_shifts=0, **TINY)
    torch.manual_seed(0)
    edged = WPPFlow(4, edge_shifts=2, **TINY)
    assert len(plain.edge_steps) == 0 and len(edged.edge_steps) == 2
    assert edged.edge_steps[1].offset == 2  # the second grid straddles the first one's tiles
    with torch.no_grad():
        x0, ld0 = plain(z, lr)
        x1, ld1 = edged(z, lr)
    torch.testing.assert_close(x0, x1)
    torch.testing.assert_close(ld0, ld1)
    with pytest.raises(InputError, match="edge_shifts"):
        WPPFlow(4, edge_shifts=-1, **TINY)


def test_flow_files_from_before_edge_steps_still_load(tmp_path) -> None:
    import json

    import safetensors
    from safetensors.torch import save_file

    lr, ref, operator = _tiny_data()
    config = _tiny_config(steps=1, model_options={**TINY, "edge_shifts": 0})
    state = list(train(lr, ref, operator, config))[-1].state
    path = save_model(tmp_path / "new.safetensors", state)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["napari_wpp"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta["model_config"]["edge_shifts"]  # as written before EdgeShift existed
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"napari_wpp": json.dumps(meta)})
    loaded = load_model(old)
    assert len(loaded.model.edge_steps) == 0
    y = torch.from_numpy(lr[:1, None])
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    with torch.no_grad():
        expected = state.model.eval().sample(y, generator=gen())
        torch.testing.assert_close(loaded.model.eval().sample(y, generator=gen()), expected)


def test_flow_files_from_before_the_edge_gain_load_with_gain_one(tmp_path) -> None:
    """A file written when the edge steps had no gain draws the same samples as before."""
    import json

    import safetensors
    from safetensors.torch import save_file

    lr, ref, operator = _tiny_data()
    config = _tiny_config(steps=1, model_options={**TINY, "edge_gain": 1.0})
    state = list(train(lr, ref, operator, config))[-1].state
    with torch.no_grad():  # move the edge subnets off their zero initialisation
        for step in state.model.edge_steps:
            step.subnet[-1].bias.add_(0.3)
    path = save_model(tmp_path / "new.safetensors", state)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["napari_wpp"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta["model_config"]["edge_gain"]  # as written before the gain existed
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"napari_wpp": json.dumps(meta)})
    loaded = load_model(old)
    assert [step.gain for step in loaded.model.edge_steps] == [1.0, 1.0]
    assert WPPFlow(4).config()["edge_gain"] == 4.0  # new flows
    y = torch.from_numpy(lr[:1, None])
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    with torch.no_grad():
        expected = state.model.eval().sample(y, generator=gen())
        torch.testing.assert_close(loaded.model.eval().sample(y, generator=gen()), expected)
