"""Variational Wasserstein Patch Prior reconstruction of one image.

Minimises ``E(x) = mean((f(x) - y)²) + λ · Σ_levels W₂²(patches of x at that level, reference)``
over the HR image ``x`` (the data term is the mean over LR pixels, which makes λ independent of
the image size; the published sum form ``½‖f(x) − y‖²`` corresponds to
``λ_sum = λ · n_LR / 2``).

With a learned prior instead (:func:`reconstruct_variational` with ``prior``, a
:class:`~napari_wpp.core.models.patchnr.PatchNR`) the prior term is the mean negative
log-likelihood of about ``patchnr_patches`` patches of ``x`` per iteration (a strided grid with a
random offset): ``E(x) = mean((f(x) − y)²) + λ_NR · mean_patches NLL(patch)``. The published
PatchNR loss ``‖f(x) − y‖² + λ_sum · mean NLL`` (summed data term, no ½) corresponds to
``λ_NR = λ_sum / n_LR``.

The reconstruction is a generator of typed events so that the CLI and napari drive the same
code: :class:`ReconstructionProgress` while it runs, :class:`ReconstructionFinished` at the end
(also when stopped early through ``stop`` or the time budget).
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

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
    patchnr_lam
        Weight λ_NR of a PatchNR prior's mean patch NLL (mean data term).
    patchnr_patches
        About this many patches per iteration scored by a PatchNR prior (0: all of them).
    patchnr_step
        Adam step on the image with a PatchNR prior.
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
    patchnr_lam: float = default_of(ReconstructSpec, "patchnr_lam")
    patchnr_patches: int = default_of(ReconstructSpec, "patchnr_patches")
    patchnr_step: float = default_of(ReconstructSpec, "patchnr_step")

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
    nll: float | None = None


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


def _check_inputs(
    lr: np.ndarray, reference: np.ndarray | None, config: VariationalConfig, p: int
) -> None:
    if lr.ndim != 2:
        raise InputError(f"LR image must be 2D, got shape {lr.shape}: pass one slice")
    if reference is not None and reference.ndim not in (2, 3):
        raise InputError(f"reference must be 2D or 3D, got shape {reference.shape}")
    arrays = (
        (("LR image", lr),) if reference is None else (("LR image", lr), ("reference", reference))
    )
    for name, array in arrays:
        if not np.all(np.isfinite(array)):
            raise InputError(f"{name} contains NaN or Inf pixels: clean or fill them first")
    if reference is not None and min(reference.shape[-2:]) < p:
        raise InputError(
            f"reference {reference.shape[-2]}×{reference.shape[-1]} is smaller than the "
            f"{p}×{p} patch: choose a larger reference"
        )
    for name, value in (("lambda", config.lam), ("PatchNR lambda", config.patchnr_lam)):
        if value is not None and value < 0:
            raise InputError(f"{name} must be ≥ 0, got {value}")
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


class WPPTerm:
    """The multi-scale Wasserstein Patch Prior term of a reconstruction (one ψ per level).

    Parameters
    ----------
    reference
        2D or 3D (slices pooled) HR reference in normalised units.
    config
        Patch size, levels, reference patches, patches per iteration, ψ passes, seed.
    device
        Where ψ and the reference patches live.
    """

    def __init__(self, reference: np.ndarray, config: VariationalConfig, device: Any) -> None:
        self.config = config
        ref_t = torch.from_numpy(reference)
        if ref_t.ndim == 2:
            ref_t = ref_t[None]
        # One prior per pyramid level; the reference is reduced like the image.
        ref_levels = [gaussian_pyramid(ref_slice, config.levels) for ref_slice in ref_t]
        self.priors: list[PatchPrior] = []
        p = config.patch_size
        for level in range(config.levels):
            level_ref = torch.stack([levels[level] for levels in ref_levels])
            if min(level_ref.shape[-2:]) < p:
                break
            ref_patches = sample_reference_patches(
                level_ref.numpy(),
                config.n_reference_patches,
                patch_size=p,
                seed=config.seed + level,
            )
            self.priors.append(
                build_patch_prior(
                    config.patch_distance,
                    ref_patches.to(device),
                    projections=config.projections,
                    seed=config.seed + level,
                )
            )

    def __call__(
        self, x_ext: Tensor, generator: torch.Generator, should_stop: Callable[[], bool]
    ) -> Tensor:
        """Σ over levels of W₂²(patches of ``x_ext``, reference); ψ ascends on the way."""
        config = self.config
        terms = []
        pyramid = gaussian_pyramid(x_ext, len(self.priors))
        for level, prior in enumerate(self.priors):
            patches = strided_patches(
                pyramid[level], config.patch_size, config.patches_per_iteration, generator
            )
            terms.append(prior.loss_and_ascend(patches, config.psi_passes, should_stop))
        return torch.stack(terms).sum()


class PatchNRTerm:
    """The learned patch prior term: mean NLL of about ``patches`` patches of the image.

    Parameters
    ----------
    model
        A trained :class:`~napari_wpp.core.models.patchnr.PatchNR` (not modified).
    patches
        About this many patches per iteration, on a strided grid with a random offset (0: all).
    device
        Where the flow runs.
    """

    def __init__(self, model: torch.nn.Module, patches: int, device: Any) -> None:
        from napari_wpp.core.models.patchnr import PatchNR

        if not isinstance(model, PatchNR):
            raise InputError(
                f"the prior must be a PatchNR, got a {type(model).__name__}: train one with "
                "`napari-wpp train --model patchnr`"
            )
        self.model = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        self.patch_size = model.patch_size
        self.patches = int(patches)

    def __call__(
        self, x_ext: Tensor, generator: torch.Generator, should_stop: Callable[[], bool]
    ) -> Tensor:
        """Mean patch NLL of the image's patches."""
        patches = strided_patches(x_ext, self.patch_size, self.patches, generator)
        return self.model.nll(patches).mean()


def reconstruct_variational(
    lr: np.ndarray,
    reference: np.ndarray | None,
    operator: ForwardOperator,
    config: VariationalConfig | None = None,
    stop: threading.Event | None = None,
    prior: torch.nn.Module | None = None,
) -> Iterator[ReconstructionEvent]:
    """Reconstruct an HR image from one LR image with the variational WPP or a PatchNR.

    Parameters
    ----------
    lr
        2D float32 LR image in normalised units ([0, 1]).
    reference
        2D or 3D (slices pooled) HR reference in normalised units (WPP; ``None`` with
        ``prior``).
    operator
        Forward operator f (blur + downsampling) that produced ``lr``.
    config
        Parameters; defaults when ``None``.
    stop
        Set it (from any thread) to stop after the current iteration; the result so far is
        still returned in the final event.
    prior
        A trained :class:`~napari_wpp.core.models.patchnr.PatchNR`: the learned prior replaces
        the WPP (weight ``config.patchnr_lam``, Adam step ``config.patchnr_step``).

    Yields
    ------
    ReconstructionProgress (and ReconstructionPreview), then one ReconstructionFinished.
    """
    config = config or VariationalConfig()
    lr = np.asarray(lr, dtype=np.float32)
    if prior is None and reference is None:
        raise InputError("a reconstruction needs an HR reference or a trained prior: give one")
    reference = None if reference is None else np.asarray(reference, dtype=np.float32)
    p = config.patch_size if prior is None else int(getattr(prior, "patch_size", 0))
    _check_inputs(lr, reference if prior is None else None, config, p)
    device = resolve_device(config.device)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)

    if prior is None:
        lam = DEFAULT_LAMBDA if config.lam is None else config.lam
        learning_rate = config.learning_rate
    else:
        lam, learning_rate = config.patchnr_lam, config.patchnr_step
    border = p - 1 if config.border is None else config.border

    operator = copy.deepcopy(operator).to(device)  # Module.to would move the caller's one
    y = torch.from_numpy(lr).to(device)
    with torch.no_grad():
        init = upsample_aligned(y, operator).float()
        check_operator_output(operator, operator(init))  # NaN later: the run, not the operator
    hr_h, hr_w = init.shape[-2:]
    x_ext = F.pad(init[None, None], (border,) * 4, mode="replicate")[0, 0]
    x_ext = x_ext.clone().requires_grad_(True)

    if prior is None:
        prior_term: WPPTerm | PatchNRTerm = WPPTerm(reference, config, device)
    else:
        prior_term = PatchNRTerm(prior, config.patchnr_patches, device)

    optimizer = torch.optim.Adam([x_ext], lr=learning_rate)
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
            group["lr"] = learning_rate * factor
        optimizer.zero_grad(set_to_none=True)
        x = x_ext[border : border + hr_h, border : border + hr_w]
        data_term = torch.mean((operator(x) - y) ** 2)
        term = prior_term(x_ext, generator, should_stop)
        loss = data_term + lam * term
        loss.backward()
        optimizer.step()
        iteration += 1
        elapsed = budget.elapsed()
        value = float(term.detach())
        yield ReconstructionProgress(
            iteration=iteration,
            elapsed_s=elapsed,
            data_term=float(data_term.detach()),
            wpp_term=value if prior is None else 0.0,
            fraction=budget.fraction(iteration),
            nll=None if prior is None else value,
        )
        if config.preview_every and iteration % config.preview_every == 0:
            with torch.no_grad():
                current = x_ext[border : border + hr_h, border : border + hr_w]
                image = current.detach().cpu().numpy().astype(np.float32)
            yield ReconstructionPreview(iteration=iteration, elapsed_s=elapsed, image=image)

    with torch.no_grad():
        result = x_ext[border : border + hr_h, border : border + hr_w].detach().cpu().numpy()
    if not math.isfinite(float(np.abs(result).max(initial=0.0))):
        weight = "λ (--lambda)" if prior is None else "the PatchNR λ (--patchnr-lambda)"
        raise DivergenceError(
            f"reconstruction diverged (NaN/Inf): lower {weight} or try another --seed"
        )
    yield ReconstructionFinished(
        image=result.astype(np.float32),
        iterations=iteration,
        elapsed_s=budget.elapsed(),
        stopped_early=stopped_early,
    )


def run_reconstruction(
    lr: np.ndarray,
    reference: np.ndarray | None,
    operator: ForwardOperator,
    config: VariationalConfig | None = None,
    prior: torch.nn.Module | None = None,
) -> ReconstructionFinished:
    """Run :func:`reconstruct_variational` to the end and return its final event."""
    final = None
    for event in reconstruct_variational(lr, reference, operator, config, prior=prior):
        if isinstance(event, ReconstructionFinished):
            final = event
    assert final is not None
    return final
