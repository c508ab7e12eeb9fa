"""Variational Wasserstein Patch Prior reconstruction of one image.

Minimises ``E(x) = mean((f(x) - y)²) + λ · Σ_levels W₂²(patches of x at that level, reference)``
over the HR image ``x`` (the data term is the mean over LR pixels, which makes λ independent of
the image size; the published sum form ``½‖f(x) − y‖²`` corresponds to
``λ_sum = λ · n_LR / 2``).

The reconstruction is a generator of typed events so that the CLI and napari drive the same
code: :class:`ReconstructionProgress` while it runs, :class:`ReconstructionFinished` at the end
(also when stopped early through ``stop`` or the time budget).
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_wpp.core.budget import Budget
from napari_wpp.core.config import (
    FALLBACK_ITERATIONS,
    PATCH_DISTANCES,
    ReconstructSpec,
    default_of,
    spec_from,
)
from napari_wpp.core.devices import resolve_device
from napari_wpp.core.errors import DivergenceError, InputError
from napari_wpp.core.operators import ForwardOperator, check_operator_output, upsample_aligned
from napari_wpp.core.patches import gaussian_pyramid, sample_reference_patches, strided_patches
from napari_wpp.core.semidual import PatchPrior, build_patch_prior

#: λ with the mean data term (``ReconstructSpec.lam``); chosen by the grid search documented in
#: docs/algorithms.md.
DEFAULT_LAMBDA: float = default_of(ReconstructSpec, "lam")
#: Iterations used when neither an iteration nor a time budget is given.
DEFAULT_ITERATIONS = FALLBACK_ITERATIONS
#: The image step decays (cosine) from ``learning_rate`` to this fraction of it.
FINAL_STEP_FRACTION = 0.1


@dataclass
class VariationalConfig:
    """Parameters of a variational WPP reconstruction.

    The fields a user chooses (λ, budgets, seed, device) take their defaults from
    :class:`~napari_wpp.core.config.ReconstructSpec` (see :meth:`from_spec`); the others are
    the algorithm's.

    Parameters
    ----------
    lam
        Weight λ of the patch prior (mean data term); ``None`` uses :data:`DEFAULT_LAMBDA`.
    iterations, minutes
        Budgets; the run stops at whichever comes first. With neither,
        :data:`DEFAULT_ITERATIONS` iterations.
    patch_size
        Side p of the square patches.
    n_reference_patches
        Size of the fixed random subset of reference patches (per pyramid level).
    levels
        Number of pyramid levels of the multi-scale prior (1 = single scale).
    patch_distance, projections
        ``"exact"`` (semi-dual W₂²) or ``"sliced"`` (W₂² along ``projections`` random
        directions per iteration plus the reference's principal axes), per pyramid level.
    psi_passes
        ψ ascent passes per iteration (warm-started); the last one shares its c-transform
        with the loss (exact distance only).
    patches_per_iteration
        About this many generated patches per iteration and level, on a strided grid with a
        random offset (``None`` or 0: all of them).
    learning_rate
        Adam step on the image (intensities in [0, 1]).
    border
        Border extension in HR pixels, so that border pixels are in as many patches as inner
        ones; ``None`` uses ``patch_size - 1``.
    seed
        Seed of every random choice.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    preview_every
        Yield a :class:`ReconstructionPreview` every this many iterations (``None``: never).
    """

    lam: float | None = DEFAULT_LAMBDA
    iterations: int | None = default_of(ReconstructSpec, "iterations")
    minutes: float | None = default_of(ReconstructSpec, "minutes")
    patch_size: int = 6
    n_reference_patches: int = 10_000
    levels: int = 2
    patch_distance: str = default_of(ReconstructSpec, "patch_distance")
    projections: int = default_of(ReconstructSpec, "projections")
    psi_passes: int = 1
    patches_per_iteration: int | None = 25_000
    learning_rate: float = 0.01
    border: int | None = None
    seed: int = default_of(ReconstructSpec, "seed")
    device: str = default_of(ReconstructSpec, "device")
    preview_every: int | None = None

    @classmethod
    def from_spec(cls, spec: ReconstructSpec, **algorithm: Any) -> VariationalConfig:
        """The configuration of ``spec`` (plus algorithm parameters, e.g. ``preview_every``)."""
        return spec_from(spec, cls, **algorithm)

    def to_dict(self) -> dict:
        """JSON-serialisable copy of the parameters."""
        return asdict(self)


@dataclass
class ReconstructionProgress:
    """Emitted after every iteration."""

    iteration: int
    elapsed_s: float
    data_term: float
    wpp_term: float
    fraction: float


@dataclass
class ReconstructionPreview:
    """The current estimate (float32, normalised units), every ``preview_every`` iterations."""

    iteration: int
    elapsed_s: float
    image: np.ndarray


@dataclass
class ReconstructionFinished:
    """Emitted once at the end; ``image`` is float32 in normalised units."""

    image: np.ndarray
    iterations: int
    elapsed_s: float
    stopped_early: bool = False


ReconstructionEvent = ReconstructionProgress | ReconstructionPreview | ReconstructionFinished


def _check_inputs(lr: np.ndarray, reference: np.ndarray, config: VariationalConfig) -> None:
    if lr.ndim != 2:
        raise InputError(f"LR image must be 2D, got shape {lr.shape}: pass one slice")
    if reference.ndim not in (2, 3):
        raise InputError(f"reference must be 2D or 3D, got shape {reference.shape}")
    for name, array in (("LR image", lr), ("reference", reference)):
        if not np.all(np.isfinite(array)):
            raise InputError(f"{name} contains NaN or Inf pixels: clean or fill them first")
    p = config.patch_size
    if min(reference.shape[-2:]) < p:
        raise InputError(
            f"reference {reference.shape[-2]}×{reference.shape[-1]} is smaller than the "
            f"{p}×{p} patch: choose a larger reference"
        )
    if config.lam is not None and config.lam < 0:
        raise InputError(f"lambda must be ≥ 0, got {config.lam}")
    if config.iterations is not None and config.iterations < 0:
        raise InputError(f"iterations must be ≥ 0, got {config.iterations}")
    if config.minutes is not None and config.minutes < 0:
        raise InputError(f"minutes must be ≥ 0, got {config.minutes}")
    if config.levels < 1:
        raise InputError(f"levels must be ≥ 1, got {config.levels}")
    if config.patch_distance not in PATCH_DISTANCES:
        raise InputError(
            f"patch distance {config.patch_distance!r} is unknown: use one of "
            f"{', '.join(PATCH_DISTANCES)}"
        )


def reconstruct_variational(
    lr: np.ndarray,
    reference: np.ndarray,
    operator: ForwardOperator,
    config: VariationalConfig | None = None,
    stop: threading.Event | None = None,
) -> Iterator[ReconstructionEvent]:
    """Reconstruct an HR image from one LR image with the variational WPP.

    Parameters
    ----------
    lr
        2D float32 LR image in normalised units ([0, 1]).
    reference
        2D or 3D (slices pooled) HR reference in normalised units.
    operator
        Forward operator f (blur + downsampling) that produced ``lr``.
    config
        Parameters; defaults when ``None``.
    stop
        Set it (from any thread) to stop after the current iteration; the result so far is
        still returned in the final event.

    Yields
    ------
    ReconstructionProgress (and ReconstructionPreview), then one ReconstructionFinished.
    """
    config = config or VariationalConfig()
    lr = np.asarray(lr, dtype=np.float32)
    reference = np.asarray(reference, dtype=np.float32)
    _check_inputs(lr, reference, config)
    device = resolve_device(config.device)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)

    lam = DEFAULT_LAMBDA if config.lam is None else config.lam
    p = config.patch_size
    border = p - 1 if config.border is None else config.border

    operator = copy.deepcopy(operator).to(device)  # Module.to would move the caller's one
    y = torch.from_numpy(lr).to(device)
    with torch.no_grad():
        init = upsample_aligned(y, operator).float()
        check_operator_output(operator, operator(init))  # NaN later: the run, not the operator
    hr_h, hr_w = init.shape[-2:]
    x_ext = F.pad(init[None, None], (border,) * 4, mode="replicate")[0, 0]
    x_ext = x_ext.clone().requires_grad_(True)

    # One prior per pyramid level; the reference is reduced like the image.
    ref_t = torch.from_numpy(reference)
    if ref_t.ndim == 2:
        ref_t = ref_t[None]
    ref_levels = [gaussian_pyramid(ref_slice, config.levels) for ref_slice in ref_t]
    priors: list[PatchPrior] = []
    for level in range(config.levels):
        level_ref = torch.stack([levels[level] for levels in ref_levels])
        if min(level_ref.shape[-2:]) < p:
            break
        ref_patches = sample_reference_patches(
            level_ref.numpy(), config.n_reference_patches, patch_size=p, seed=config.seed + level
        )
        priors.append(
            build_patch_prior(
                config.patch_distance,
                ref_patches.to(device),
                projections=config.projections,
                seed=config.seed + level,
            )
        )

    optimizer = torch.optim.Adam([x_ext], lr=config.learning_rate)
    budget = Budget(config.iterations, config.minutes, DEFAULT_ITERATIONS)
    iteration = 0
    stopped_early = False
    should_stop = budget.stopper(stop)  # also between the ψ passes of one iteration

    while not budget.exhausted(iteration):
        if stop is not None and stop.is_set():
            stopped_early = True
            break
        # cosine decay of the image step over the budget, down to a tenth
        factor = budget.cosine_decay(iteration, FINAL_STEP_FRACTION)
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * factor
        optimizer.zero_grad(set_to_none=True)
        x = x_ext[border : border + hr_h, border : border + hr_w]
        data_term = torch.mean((operator(x) - y) ** 2)
        wpp_terms = []
        pyramid = gaussian_pyramid(x_ext, len(priors))
        for level, prior in enumerate(priors):
            patches = strided_patches(pyramid[level], p, config.patches_per_iteration, generator)
            wpp_terms.append(prior.loss_and_ascend(patches, config.psi_passes, should_stop))
        wpp_term = torch.stack(wpp_terms).sum()
        loss = data_term + lam * wpp_term
        loss.backward()
        optimizer.step()
        iteration += 1
        elapsed = budget.elapsed()
        yield ReconstructionProgress(
            iteration=iteration,
            elapsed_s=elapsed,
            data_term=float(data_term.detach()),
            wpp_term=float(wpp_term.detach()),
            fraction=budget.fraction(iteration),
        )
        if config.preview_every and iteration % config.preview_every == 0:
            with torch.no_grad():
                current = x_ext[border : border + hr_h, border : border + hr_w]
                image = current.detach().cpu().numpy().astype(np.float32)
            yield ReconstructionPreview(iteration=iteration, elapsed_s=elapsed, image=image)

    with torch.no_grad():
        result = x_ext[border : border + hr_h, border : border + hr_w].detach().cpu().numpy()
    if not math.isfinite(float(np.abs(result).max(initial=0.0))):
        raise DivergenceError(
            "reconstruction diverged (NaN/Inf): lower λ (--lambda) or try another --seed"
        )
    yield ReconstructionFinished(
        image=result.astype(np.float32),
        iterations=iteration,
        elapsed_s=budget.elapsed(),
        stopped_early=stopped_early,
    )


def run_reconstruction(
    lr: np.ndarray,
    reference: np.ndarray,
    operator: ForwardOperator,
    config: VariationalConfig | None = None,
) -> ReconstructionFinished:
    """Run :func:`reconstruct_variational` to the end and return its final event."""
    final = None
    for event in reconstruct_variational(lr, reference, operator, config):
        if isinstance(event, ReconstructionFinished):
            final = event
    assert final is not None
    return final
