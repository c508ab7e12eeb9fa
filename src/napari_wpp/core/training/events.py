"""What a training run yields (progress, previews, checkpoints, the final state)."""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from napari_wpp.core.config.training import TrainSpec as TrainingConfig
from napari_wpp.core.operators import ForwardOperator
from napari_wpp.core.semidual import PatchPrior

__all__ = [
    "RATE_WINDOW",
    "TrainingCheckpoint",
    "TrainingEvent",
    "TrainingFinished",
    "TrainingPreview",
    "TrainingProgress",
    "TrainingState",
    "rate_text",
    "saved_config",
    "snapshot",
    "steps_per_second",
]

#: Steps over which the progress events' steps per second are averaged.
RATE_WINDOW = 20


def rate_text(steps_per_s: float | None) -> str:
    """``"3.4 steps/s"``, ``"12.0 s/step"`` for slow steps, ``""`` when unknown."""
    if steps_per_s is None or not steps_per_s > 0.0:
        return ""
    if steps_per_s >= 1.0:
        return f"{steps_per_s:.1f} steps/s"
    return f"{1.0 / steps_per_s:.1f} s/step"


@dataclass
class TrainingState:
    """Everything needed to use a model or to resume its training.

    ``model`` lives on the training device; tensors in the state dicts are detached copies.
    """

    kind: str
    model: torch.nn.Module
    model_config: dict
    operator: dict
    lam: float
    config: dict
    step: int
    elapsed_s: float
    normalisation: dict | None = None
    priors: list[dict[str, Tensor]] = field(default_factory=list)
    optimizer: dict | None = None
    rng: Tensor | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    mean_frozen: bool = False
    #: A WPPFlow's std calibration (:meth:`napari_wpp.core.calibration.StdCalibration.to_dict`).
    calibration: dict | None = None


def saved_config(state: TrainingState) -> TrainingConfig:
    """The configuration a resumed run goes on with (settings absent from older files
    take the value those files were trained with: no mean warm-up)."""
    config = TrainingConfig(
        **{
            "mean_warmup": 0.0,  # runs saved before the warm-up existed trained jointly
            "calibration_holdout": 0.0,  # and before the held-out strip: the whole reference
            **state.config,
            "model_options": state.config.get("model_options", {}),
        }
    )
    if config.patches_per_step is None:  # files saved before device defaults: all patches
        config = replace(config, patches_per_step=0)
    return config


@dataclass
class TrainingProgress:
    """Emitted after every step (``psnr`` only on validation steps).

    ``phase`` is ``"mean warm-up"`` or ``"spread"`` for a WPPFlow with a mean warm-up
    (:attr:`TrainingConfig.mean_warmup`), ``None`` otherwise; ``logdet`` is ``None`` for a
    WPPNet and during the warm-up. ``steps_per_s`` is the rate over the last
    :data:`RATE_WINDOW` steps (``None`` at the first step of a run), ``device`` the training
    device (with ``×W`` for W data-parallel processes) and ``total_steps`` the step budget
    (``None`` with a time budget only). Losses are means over all processes. A PatchNR run
    reports its batch's mean patch NLL as ``nll`` (and ``loss``; ``data_term`` and
    ``wpp_term`` 0) and, every few hundred steps, that of the held-out patches as
    ``heldout_nll``.
    """

    step: int
    elapsed_s: float
    data_term: float
    wpp_term: float
    loss: float
    fraction: float
    psnr: float | None = None
    logdet: float | None = None
    phase: str | None = None
    steps_per_s: float | None = None
    device: str = ""
    total_steps: int | None = None
    nll: float | None = None
    heldout_nll: float | None = None


@dataclass
class TrainingPreview:
    """The network's output for the preview input (float32, normalised units)."""

    step: int
    elapsed_s: float
    image: np.ndarray


@dataclass
class TrainingCheckpoint:
    """A resumable snapshot, every ``checkpoint_every`` steps."""

    state: TrainingState


@dataclass
class TrainingFinished:
    """Emitted once at the end, also when stopped early."""

    state: TrainingState
    stopped_early: bool = False


TrainingEvent = TrainingProgress | TrainingPreview | TrainingCheckpoint | TrainingFinished


def steps_per_second(times: deque[float]) -> float | None:
    """Steps per second over the step end times in ``times`` (the first: a start)."""
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def snapshot(
    model: torch.nn.Module,
    kind: str,
    operator: ForwardOperator,
    lam: float,
    config: TrainingConfig,
    step: int,
    elapsed: float,
    normalisation: dict | None,
    priors: list[PatchPrior],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    history: list[dict[str, float]],
    mean_frozen: bool = False,
) -> TrainingState:
    return TrainingState(
        kind=kind,
        model=copy.deepcopy(model).eval(),
        model_config=model.config(),  # type: ignore[operator]
        operator=operator.to_dict(),
        lam=float(lam),
        config=config.to_dict(),
        step=step,
        elapsed_s=elapsed,
        normalisation=normalisation,
        priors=[prior.state_dict() for prior in priors],
        optimizer=copy.deepcopy(optimizer.state_dict()),
        rng=generator.get_state(),
        history=list(history),
        mean_frozen=mean_frozen,
    )
