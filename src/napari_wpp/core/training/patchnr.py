"""Training a PatchNR by maximum likelihood on patches (docs/algorithms.md, PatchNR).

The flow learns the law of the p×p patches of its training images: the HR reference, or, in
zero-shot mode, the LR image itself (patches of the LR data taken as HR patches, the
self-similarity of the material across scales). Each step draws ``patchnr_batch`` random
patches, applies one of the 8 rotations/flips to each (with ``augment``), adds uniform
dequantisation noise of one quantisation step (8-bit data are a density only after that) and
takes an Adam step on their mean negative log-likelihood, the learning rate cosine-decayed to a
tenth over the budget.

A strip of the training images (the right-most :data:`HELDOUT_SHARE` of every image's columns)
is held out: its patches never enter training, and their mean NLL (every
:data:`HELDOUT_EVERY` steps and at the end) tells whether the flow still generalises.

Events are those of the other trainings (:mod:`.events`): ``TrainingProgress`` with ``nll``
and ``heldout_nll`` (``data_term``/``wpp_term`` 0), ``TrainingCheckpoint``, one
``TrainingFinished``; the state resumes like a WPPNet's (no ψ states).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from napari_wpp.core.budget import Budget, cosine_factor
from napari_wpp.core.config.training import DEFAULT_STEPS
from napari_wpp.core.config.training import TrainSpec as TrainingConfig
from napari_wpp.core.devices import resolve_device
from napari_wpp.core.errors import DivergenceError, InputError
from napari_wpp.core.models import build_model
from napari_wpp.core.operators import ForwardOperator
from napari_wpp.core.patches import extract_patches
from napari_wpp.core.training.events import (
    RATE_WINDOW,
    TrainingCheckpoint,
    TrainingEvent,
    TrainingFinished,
    TrainingProgress,
    TrainingState,
    saved_config,
    steps_per_second,
)

__all__ = [
    "HELDOUT_EVERY",
    "HELDOUT_PATCHES",
    "HELDOUT_SHARE",
    "MAX_TRAINING_PATCHES",
    "PatchPool",
    "train_patchnr",
]

#: Share of every training image's columns (the right-most) held out of training.
HELDOUT_SHARE = 0.15
#: At most this many held-out patches are scored (a fixed random subset).
HELDOUT_PATCHES = 8192
#: Held-out NLL every this many steps (and at the last step).
HELDOUT_EVERY = 250
#: At most this many training patches are kept (a random subset; a 600² image has 354,025).
MAX_TRAINING_PATCHES = 2_000_000
#: The learning rate decays (cosine) from ``learning_rate`` to this fraction of it.
FINAL_LR_FRACTION = 0.1
#: Settings a resumed run takes from the caller (all others from the saved run).
RESUME_OVERRIDES = ("steps", "minutes", "device", "checkpoint_every", "checkpoint_minutes")


def _slices(images: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
    """The 2D images of a 2D image, a 3D stack or a list of either."""
    items = images if isinstance(images, list) else [images]
    out = []
    for item in items:
        array = np.asarray(item, dtype=np.float32)
        if array.ndim not in (2, 3):
            raise InputError(
                f"PatchNR training images must be 2D or 3D, got shape {array.shape}: pass one "
                "image or stack"
            )
        if not np.all(np.isfinite(array)):
            raise InputError("training images contain NaN or Inf pixels: clean or fill them first")
        out.extend(array[None] if array.ndim == 2 else array)
    return out


class PatchPool:
    """The training and held-out patches of a set of images.

    Parameters
    ----------
    images
        2D images, 3D stacks or a list of either, in normalised units.
    patch_size
        Side p of the patches.
    seed
        Seed of the random subsets.
    """

    def __init__(
        self, images: np.ndarray | list[np.ndarray], patch_size: int, seed: int = 0
    ) -> None:
        p = int(patch_size)
        self.patch_size = p
        train, held = [], []
        for image in _slices(images):
            h, w = image.shape
            if min(h, w) < p:
                raise InputError(
                    f"training image {h}×{w} is smaller than the {p}×{p} patch: use a larger "
                    "image or a smaller --patch-size"
                )
            cut = w - int(round(HELDOUT_SHARE * w))
            tensor = torch.from_numpy(np.ascontiguousarray(image))
            if cut >= p and w - cut >= p:
                train.append(extract_patches(tensor[:, :cut], p))
                held.append(extract_patches(tensor[:, cut:], p))
            else:  # too narrow to split: everything trains, nothing is held out
                train.append(extract_patches(tensor, p))
        generator = torch.Generator().manual_seed(seed)
        self.train = _subset(torch.cat(train), MAX_TRAINING_PATCHES, generator)
        self.heldout = _subset(torch.cat(held), HELDOUT_PATCHES, generator) if held else None

    def batch(
        self, size: int, augment: bool, dequantise: float, generator: torch.Generator
    ) -> Tensor:
        """``size`` random training patches (rotated/flipped, dequantised)."""
        index = torch.randint(self.train.shape[0], (size,), generator=generator)
        patches = self.train[index]
        if augment:
            patches = dihedral(patches, self.patch_size, generator)
        if dequantise > 0:
            patches = patches + dequantise * torch.rand(patches.shape, generator=generator)
        return patches


def _subset(patches: Tensor, limit: int, generator: torch.Generator) -> Tensor:
    if patches.shape[0] <= limit:
        return patches
    return patches[torch.randperm(patches.shape[0], generator=generator)[:limit]]


def dihedral(patches: Tensor, patch_size: int, generator: torch.Generator) -> Tensor:
    """Each flattened patch under one of the 8 rotations/flips, drawn at random."""
    p = patch_size
    square = patches.reshape(-1, p, p)
    choice = torch.randint(8, (square.shape[0],), generator=generator)
    out = torch.empty_like(square)
    for k in range(8):
        rows = choice == k
        if bool(rows.any()):
            part = torch.rot90(square[rows], k % 4, (1, 2))
            out[rows] = torch.flip(part, (2,)) if k >= 4 else part
    return out.reshape(-1, p * p)


def _resolved(config: TrainingConfig, resume: TrainingState | None) -> TrainingConfig:
    if resume is None:
        return config
    saved = saved_config(resume)
    return replace(saved, **{name: getattr(config, name) for name in RESUME_OVERRIDES})


def _check(config: TrainingConfig) -> None:
    for name in ("patchnr_batch", "patchnr_hidden", "patch_size"):
        value = getattr(config, name)
        if int(value) != value or value < 1:
            raise InputError(f"{name.replace('_', ' ')} must be a positive integer, got {value}")
    if config.learning_rate <= 0:
        raise InputError(f"learning rate must be > 0, got {config.learning_rate}")
    if config.steps is not None and config.steps < 0:
        raise InputError(f"steps must be ≥ 0, got {config.steps}")
    if config.minutes is not None and config.minutes < 0:
        raise InputError(f"minutes must be ≥ 0, got {config.minutes}")


def train_patchnr(
    images: np.ndarray | list[np.ndarray],
    operator: ForwardOperator | None = None,
    config: TrainingConfig | None = None,
    stop: threading.Event | None = None,
    resume: TrainingState | None = None,
    normalisation: dict | None = None,
    dequantise: float = 0.0,
) -> Iterator[TrainingEvent]:
    """Train a PatchNR on the patches of ``images`` (a generator of events).

    Parameters
    ----------
    images
        Training images in normalised units: the HR reference (2D, 3D or a list of regions),
        or the LR data in zero-shot mode.
    operator
        The forward operator the prior is meant for (recorded in the state; ``None``: none).
    config
        Parameters (``model`` ``"patchnr"``); when resuming the saved ones but for the budget,
        device and checkpoint intervals.
    stop
        Set it from any thread to stop after the current step.
    resume
        A state from a checkpoint or final event of an earlier PatchNR run.
    normalisation
        Intensity normalisation of the training images (recorded in the state).
    dequantise
        Width of the uniform dequantisation noise in normalised units (one quantisation step
        of 8-bit data: 1/255 of the range; 0: none).

    Yields
    ------
    TrainingProgress, TrainingCheckpoint, then one TrainingFinished.
    """
    config = _resolved(config or TrainingConfig(model="patchnr"), resume)
    device = resolve_device(config.device)
    config = config.for_device(device)
    _check(config)
    if not (math.isfinite(dequantise) and dequantise >= 0):
        raise InputError(f"dequantisation width must be ≥ 0, got {dequantise}")
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # initial weights
    pool = PatchPool(images, config.patch_size, config.seed)
    options = {"patch_size": config.patch_size, "hidden": config.patchnr_hidden}
    options.update({"seed": config.seed, **config.model_options})
    model = build_model("patchnr", **options)
    model.standardise_on(pool.train)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    step, elapsed_before, history = 0, 0.0, []
    if resume is not None:
        model.load_state_dict(resume.model.state_dict())
        if resume.optimizer is not None:
            optimizer.load_state_dict(resume.optimizer)
        if resume.rng is not None:
            generator.set_state(resume.rng)
        step, elapsed_before, history = resume.step, resume.elapsed_s, list(resume.history)
    heldout = None
    if pool.heldout is not None:  # fixed dequantisation noise: comparable across steps
        noise = torch.Generator().manual_seed(config.seed + 1)
        heldout = pool.heldout + dequantise * torch.rand(pool.heldout.shape, generator=noise)
        heldout = heldout.to(device)
    budget = Budget(config.steps, config.minutes, DEFAULT_STEPS, elapsed_before)
    operator_dict = operator.to_dict() if operator is not None else {}
    if resume is not None:
        operator_dict = resume.operator

    def snapshot() -> TrainingState:
        import copy

        return TrainingState(
            kind="patchnr",
            model=copy.deepcopy(model).eval(),
            model_config=model.config(),
            operator=operator_dict,
            lam=0.0,
            config=config.to_dict(),
            step=step,
            elapsed_s=budget.elapsed(),
            normalisation=normalisation,
            optimizer=copy.deepcopy(optimizer.state_dict()),
            rng=generator.get_state(),
            history=list(history),
        )

    def heldout_nll() -> float | None:
        if heldout is None:
            return None
        model.eval()
        with torch.no_grad():
            value = float(torch.cat([model.nll(part) for part in heldout.split(4096)]).mean())
        model.train()
        return value

    stopped_early = False
    last_checkpoint = time.perf_counter()
    step_times: deque[float] = deque([time.perf_counter()], maxlen=RATE_WINDOW + 1)
    model.train()
    while True:
        if budget.exhausted(step):
            break
        if stop is not None and stop.is_set():
            stopped_early = True
            break
        factor = cosine_factor(budget.fraction(step), FINAL_LR_FRACTION)
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * factor
        batch = pool.batch(config.patchnr_batch, config.augment, dequantise, generator)
        loss = model.nll(batch.to(device)).mean()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise DivergenceError(
                f"PatchNR training diverged at step {step + 1} (NLL {value}): lower the "
                "learning rate or try another --seed; checkpoints written before are kept"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        step_times.append(time.perf_counter())
        last = budget.exhausted(step) or (stop is not None and stop.is_set())
        held = heldout_nll() if last or step % HELDOUT_EVERY == 0 else None
        record = {"step": step, "elapsed_s": budget.elapsed(), "nll": value, "loss": value}
        if held is not None:
            record["heldout_nll"] = held
        history.append(record)
        yield TrainingProgress(
            step=step,
            elapsed_s=record["elapsed_s"],
            data_term=0.0,
            wpp_term=0.0,
            loss=value,
            fraction=budget.fraction(step),
            steps_per_s=steps_per_second(step_times),
            device=str(device),
            total_steps=budget.max_steps,
            nll=value,
            heldout_nll=held,
        )
        due = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
        if config.checkpoint_minutes:
            due = due or time.perf_counter() - last_checkpoint >= 60.0 * config.checkpoint_minutes
        if due:
            last_checkpoint = time.perf_counter()
            yield TrainingCheckpoint(state=snapshot())
    if history and "heldout_nll" not in history[-1]:  # stopped: score the last step too
        held = heldout_nll()
        if held is not None:
            history[-1] = {**history[-1], "heldout_nll": held}
    yield TrainingFinished(state=snapshot(), stopped_early=stopped_early)
