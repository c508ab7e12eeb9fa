"""The spec of a variational reconstruction of one image (WPP or a PatchNR prior)."""

from __future__ import annotations

from dataclasses import dataclass

from napari_wpp.core.config.fields import MAX_SEED, spec_field
from napari_wpp.core.config.patch_distance import patch_distance_field, projections_field

__all__ = ["FALLBACK_ITERATIONS", "ReconstructSpec"]

#: Iterations run when neither an iteration nor a time budget is given.
FALLBACK_ITERATIONS = 300
#: λ of a PatchNR prior with the mean data term, tuned on SiC ×4 with priors trained for
#: 6–12 CPU minutes (the published λ = 0.15 of a summed data term is 0.15 / 150² = 6.7e-6
#: here; docs/algorithms.md, PatchNR).
PATCHNR_LAMBDA = 5e-6
#: Patches per iteration scored by a PatchNR prior.
PATCHNR_PATCHES = 40_000


@dataclass(frozen=True)
class ReconstructSpec:
    """A variational reconstruction: λ and the patch distance of the WPP (or λ of a PatchNR
    prior), the budgets, the seed and the device.

    The run stops at whichever budget ends first; with neither it runs
    :data:`FALLBACK_ITERATIONS` iterations.
    """

    lam: float = spec_field(0.008, "weight λ of the patch prior, mean data term", 0.0, 10.0)
    patch_distance: str = patch_distance_field()
    projections: int = projections_field()
    patchnr_lam: float = spec_field(
        PATCHNR_LAMBDA,
        "weight λ of a PatchNR prior's mean patch NLL (mean data term; the published "
        "λ = 0.15 with a summed data term is 0.15 / LR pixels: 6.7e-6 for 150² pixels)",
        0.0,
        1.0,
    )
    patchnr_patches: int = spec_field(
        PATCHNR_PATCHES,
        "about this many patches per iteration scored by a PatchNR prior (0: all)",
        0,
        10**8,
    )
    patchnr_step: float = spec_field(
        0.03,
        "Adam step on the image with a PatchNR prior, decayed to a tenth (published 0.03; "
        "0.01 for a zero-shot prior)",
        0.0,
        1.0,
    )
    minutes: float | None = spec_field(
        None,
        "time budget in minutes (with --iterations: whichever ends first)",
        0.0,
        default_text="none",
    )
    iterations: int | None = spec_field(
        None, "iteration budget", 1, default_text=f"{FALLBACK_ITERATIONS} when no budget is given"
    )
    seed: int = spec_field(0, "seed of every random choice", 0, MAX_SEED)
    device: str = spec_field("auto", "auto, cpu, cuda, cuda:N or mps")
