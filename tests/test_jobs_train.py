"""The training job: normalisation, model files and their failure events, resume checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_wpp.core.config import TrainSpec
from napari_wpp.core.errors import InputError
from napari_wpp.core.training import TrainingFinished, TrainingProgress
from napari_wpp.data import synthetic_material
from napari_wpp.jobs.notices import JobWarning
from napari_wpp.jobs.train import (
    ModelFileFailed,
    ModelFileWritten,
    TrainingStarted,
    TrainSource,
    check_resume_budget,
    load_resume,
    lr_normalisation,
    train_job,
)

TINY = {"features": 8, "blocks": 2}


@pytest.fixture(scope="module")
def material():
    return synthetic_material(shape=(3, 40, 40), scale=2, noise=0.01, seed=5)


def _spec(**overrides) -> TrainSpec:
    options = dict(
        steps=2,
        batch_size=2,
        crop_size=16,
        n_reference_patches=200,
        psi_passes=1,
        checkpoint_every=1,
        device="cpu",
        model_options=TINY,
    )
    return TrainSpec(**{**options, **overrides})


def test_job_normalises_trains_and_writes_the_model_file(material, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    source = TrainSource(material.lr, material.reference)
    events = list(train_job(_spec(), source, material.operator, out))
    assert isinstance(events[0], TrainingStarted)
    assert events[0].normalisation["dtype"] == str(material.lr.dtype)
    assert sum(isinstance(e, TrainingProgress) for e in events) == 2
    written = [e for e in events if isinstance(e, ModelFileWritten)]
    assert [(w.step, w.final) for w in written] == [(1, False), (2, False), (2, True)]
    assert isinstance(events[-1], ModelFileWritten) and out.is_file()
    state = load_resume(out)
    assert state.step == 2 and state.normalisation == events[0].normalisation
    check_resume_budget(_spec(steps=3), state, "model")
    with pytest.raises(InputError, match="larger --steps"):
        check_resume_budget(_spec(steps=2), state, "model", "--steps")
    with pytest.raises(InputError, match="trained on uint8"):
        lr_normalisation(material.lr.astype(np.float32), state)


@pytest.mark.parametrize(("model", "warmup", "warned"), [
    ("wppflow", 0.0, True), ("wppflow", 0.3, False), ("wppnet", 0.0, False),
])  # fmt: skip
def test_a_flow_without_the_mean_warmup_is_warned_about(material, model, warmup, warned) -> None:
    options = {"steps": 1, "checkpoint_every": None, "mean_warmup": warmup}
    if model == "wppflow":
        flow = {"steps": 1, "hidden": 8, "cond_features": 4, "mean_features": 8, "mean_blocks": 2}
        options.update(model=model, model_options=flow, calibration_holdout=0.0)
    spec = _spec(**options)
    source = TrainSource(material.lr, material.reference)
    events = list(train_job(spec, source, material.operator))
    messages = [e.message for e in events if isinstance(e, JobWarning)]
    assert any("--mean-warmup 0" in m for m in messages) is warned
    assert any(isinstance(e, TrainingFinished) for e in events)


def test_a_model_file_that_cannot_be_written_is_an_event(material, tmp_path: Path) -> None:
    out = tmp_path / "missing" / "model.safetensors"
    source = TrainSource(material.lr, material.reference)
    events = list(train_job(_spec(steps=1, checkpoint_every=None), source, material.operator, out))
    failed = [e for e in events if isinstance(e, ModelFileFailed)]
    assert len(failed) == 1 and failed[0].final and failed[0].path == out
    assert any(isinstance(e, TrainingFinished) for e in events)


def test_normalised_inputs_are_used_as_they_are(material) -> None:
    lr = material.lr.astype(np.float32) / 255.0
    ref = material.reference.astype(np.float32) / 255.0
    source = TrainSource(lr, [ref], reference_normalised=True, lr_normalised=True)
    events = list(train_job(_spec(steps=1), source, material.operator))
    assert events[0].normalisation is None
    assert events[-1].state.normalisation is None
