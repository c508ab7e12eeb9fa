"""WPPNet training generator: events, budgets, stop, resume, λ, bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_wpp.core.errors import InputError
from napari_wpp.core.training import (
    TrainingCheckpoint,
    TrainingConfig,
    TrainingFinished,
    TrainingPreview,
    TrainingProgress,
    choose_lambda,
    paper_lambda,
    run_training,
    train,
)
from napari_wpp.data import synthetic_material

TINY_MODEL = {"features": 8, "blocks": 2, "offset": 0.5}


@pytest.fixture(scope="module")
def material():
    m = synthetic_material(shape=(6, 64, 64), scale=2, noise=0.01, seed=3)
    lr = m.lr.astype(np.float32) / 255.0
    hr = m.hr.astype(np.float32) / 255.0
    ref = m.reference.astype(np.float32) / 255.0
    return lr, hr, ref, m.operator


def tiny_config(**overrides) -> TrainingConfig:
    options = dict(
        steps=4,
        batch_size=2,
        crop_size=16,
        n_reference_patches=300,
        psi_passes=2,
        model_options=dict(TINY_MODEL),
        device="cpu",
        mixed_precision="off",
    )
    options.update(overrides)
    return TrainingConfig(**options)


def collect(events):
    return list(events)


def test_events_and_final_state(material) -> None:
    lr, hr, ref, op = material
    config = tiny_config(preview_every=2, checkpoint_every=3, validate_every=2)
    events = collect(
        train(
            lr,
            ref,
            op,
            config,
            validation=(lr[0], hr[0]),
            preview_input=lr[0, :10, :12],
            normalisation={"kind": "test"},
        )
    )
    progress = [e for e in events if isinstance(e, TrainingProgress)]
    assert [e.step for e in progress] == [1, 2, 3, 4]
    assert all(np.isfinite([e.data_term, e.wpp_term, e.loss]).all() for e in progress)
    assert [e.psnr is not None for e in progress] == [False, True, False, True]
    previews = [e for e in events if isinstance(e, TrainingPreview)]
    assert [e.step for e in previews] == [2, 4]
    assert previews[0].image.shape == (20, 24) and previews[0].image.dtype == np.float32
    checkpoints = [e for e in events if isinstance(e, TrainingCheckpoint)]
    assert [e.state.step for e in checkpoints] == [3]
    final = events[-1]
    assert isinstance(final, TrainingFinished) and not final.stopped_early
    state = final.state
    assert state.step == 4 and state.kind == "wppnet"
    assert state.lam == pytest.approx(paper_lambda(16))
    assert state.operator == op.to_dict()
    assert state.normalisation == {"kind": "test"}
    assert len(state.priors) == 1 and state.priors[0]["psi"].shape == (300,)
    assert float(state.priors[0]["psi"].abs().sum()) > 0  # ψ was ascended
    assert len(state.history) == 4
    # the snapshot is a copy: it is not the network being trained
    with torch.no_grad():
        out = state.model(torch.from_numpy(lr[:1, None]))
    assert out.shape == (1, 1, 64, 64)


def test_training_lowers_the_data_term(material) -> None:
    lr, _, ref, op = material
    final = run_training(lr, ref, op, tiny_config(steps=40, learning_rate=3e-3, lam=0.0))
    history = final.state.history
    first = np.mean([h["data_term"] for h in history[:5]])
    last = np.mean([h["data_term"] for h in history[-5:]])
    assert last < 0.5 * first


def test_stop_event_ends_early_with_a_state(material) -> None:
    lr, _, ref, op = material
    stop = threading.Event()
    events = []
    for event in train(lr, ref, op, tiny_config(steps=50), stop=stop):
        events.append(event)
        if isinstance(event, TrainingProgress) and event.step == 2:
            stop.set()
    final = events[-1]
    assert isinstance(final, TrainingFinished) and final.stopped_early
    assert final.state.step == 2


def _parameters(state) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in state.model.parameters()])


def _stopped_at(step: int, lr, ref, op, config):
    """The final state of a run whose stop event is set at ``step``."""
    stop = threading.Event()
    first = None
    for event in train(lr, ref, op, config, stop=stop):
        if isinstance(event, TrainingProgress) and event.step == step:
            stop.set()
        if isinstance(event, TrainingFinished):
            first = event.state
    assert first is not None and first.step == step
    return first


@pytest.mark.parametrize("psi_mode", ["shared", "per_batch"])
def test_resume_continues_the_same_run(material, psi_mode: str) -> None:
    lr, _, ref, op = material
    config = tiny_config(steps=6, psi_mode=psi_mode, n_fixed_batches=3)
    straight = run_training(lr, ref, op, config).state
    first = _stopped_at(3, lr, ref, op, config)
    resumed = run_training(lr, ref, op, config, resume=first).state
    assert resumed.step == 6
    assert torch.equal(_parameters(resumed), _parameters(straight))
    for a, b in zip(resumed.priors, straight.priors, strict=True):
        assert torch.equal(a["psi"], b["psi"])
    assert [h["step"] for h in resumed.history] == list(range(1, 7))


@pytest.mark.parametrize("psi_mode", ["shared", "per_batch"])
def test_sliced_patch_distance_trains_and_resumes_through_a_model_file(
    material, psi_mode: str, tmp_path
) -> None:
    from napari_wpp import io

    lr, _, ref, op = material
    config = tiny_config(
        steps=6, patch_distance="sliced", projections=8, psi_mode=psi_mode, n_fixed_batches=2
    )
    straight = run_training(lr, ref, op, config).state
    assert all(set(p) == {"sliced.generator"} for p in straight.priors)
    assert all(np.isfinite(h["wpp_term"]) and h["wpp_term"] > 0 for h in straight.history)
    first = _stopped_at(3, lr, ref, op, config)
    saved = io.load_model(io.save_model(tmp_path / "sliced.safetensors", first), device="cpu")
    assert saved.config["patch_distance"] == "sliced"
    resumed = run_training(lr, ref, op, config, resume=saved).state
    assert torch.equal(_parameters(resumed), _parameters(straight))


def test_exact_and_sliced_runs_differ_only_in_the_prior(material) -> None:
    lr, _, ref, op = material
    exact = run_training(lr, ref, op, tiny_config(steps=2)).state
    sliced = run_training(lr, ref, op, tiny_config(steps=2, patch_distance="sliced")).state
    assert "psi" in exact.priors[0] and "psi" not in sliced.priors[0]
    assert not torch.equal(_parameters(exact), _parameters(sliced))


def test_resume_refuses_another_operator(material) -> None:
    from napari_wpp.core.operators import GaussianDownsampling

    lr, _, ref, op = material
    state = run_training(lr, ref, op, tiny_config(steps=1)).state
    other = GaussianDownsampling(2, 1.5)
    with pytest.raises(InputError, match="same operator"):
        collect(train(lr, ref, other, tiny_config(steps=2), resume=state))


def test_seed_makes_runs_reproducible(material) -> None:
    lr, _, ref, op = material
    a = run_training(lr, ref, op, tiny_config(steps=2, seed=5)).state
    b = run_training(lr, ref, op, tiny_config(steps=2, seed=5)).state
    c = run_training(lr, ref, op, tiny_config(steps=2, seed=6)).state
    assert torch.equal(_parameters(a), _parameters(b))
    assert not torch.equal(_parameters(a), _parameters(c))


def test_reference_regions_are_pooled(material) -> None:
    lr, _, ref, op = material
    state = run_training(
        lr, [ref[:32], ref[32:]], op, tiny_config(steps=1, n_reference_patches=200)
    ).state
    assert state.priors[0]["psi"].shape == (200,)


def test_choose_lambda_scores_every_grid_value(material) -> None:
    _, _, ref, op = material
    grid = (0.0, 0.01, 0.05)
    best, scores = choose_lambda(ref, op, grid=grid, crop=48, iterations=8, device="cpu")
    assert set(scores) == set(grid)
    assert best in grid and scores[best] == max(scores.values())
    assert all(np.isfinite(v) for v in scores.values())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"lam": -1.0}, "lambda must be"),
        ({"lam": "often"}, "lambda 'often'"),
        ({"psi_mode": "each"}, "psi mode"),
        ({"patch_distance": "nearest"}, "patch distance 'nearest' is unknown"),
        ({"projections": -2}, "projections must be"),
        ({"batch_size": 0}, "batch size"),
        ({"mixed_precision": "fp8"}, "mixed precision"),
        ({"model": "unet"}, "unknown model"),
    ],
)
def test_bad_configuration(material, overrides, match) -> None:
    lr, _, ref, op = material
    with pytest.raises(InputError, match=match):
        collect(train(lr, ref, op, tiny_config(**overrides)))


def test_bad_data(material) -> None:
    lr, _, ref, op = material
    with pytest.raises(InputError, match="too small"):
        collect(train(lr[:, :3, :3], ref, op, tiny_config()))
    bad = lr.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        collect(train(bad, ref, op, tiny_config()))
    assert np.isfinite(lr).all()  # the caller's array was not touched
    with pytest.raises(InputError, match="normalised float"):
        collect(train((lr * 255).astype(np.uint8), ref, op, tiny_config()))
    with pytest.raises(InputError, match="smaller than"):
        collect(train(lr, ref[:4, :4], op, tiny_config()))


def test_divergence_is_reported_with_a_hint(material) -> None:
    from napari_wpp.core.errors import DivergenceError

    lr, _, ref, op = material
    with pytest.raises(DivergenceError, match=r"lower λ \(--lambda\), use a larger --batch-size"):
        collect(train(lr, ref, op, tiny_config(steps=60, learning_rate=1e12)))
