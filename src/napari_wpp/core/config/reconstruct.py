"""The spec of a variational WPP reconstruction of one image."""

from __future__ import annotations

from dataclasses import dataclass, field

from napari_wpp.core.config.fields import MAX_SEED, field_meta
from napari_wpp.core.config.patch_distance import patch_distance_field, projections_field

__all__ = ["FALLBACK_ITERATIONS", "ReconstructSpec"]

#: Iterations run when neither an iteration nor a time budget is given.
FALLBACK_ITERATIONS = 300


@dataclass(frozen=True)
class ReconstructSpec:
    """A variational WPP reconstruction: λ, the patch distance, the budgets, the seed and the
    device.

    The run stops at whichever budget ends first; with neither it runs
    :data:`FALLBACK_ITERATIONS` iterations.
    """

    lam: float = field(
        default=0.008,
        metadata=field_meta("weight λ of the patch prior, mean data term", 0.0, 10.0),
    )
    patch_distance: str = patch_distance_field()
    projections: int = projections_field()
    minutes: float | None = field(
        default=None,
        metadata=field_meta(
            "time budget in minutes (with --iterations: whichever ends first)",
            0.0,
            default_text="none",
        ),
    )
    iterations: int | None = field(
        default=None,
        metadata=field_meta(
            "iteration budget",
            1,
            default_text=f"{FALLBACK_ITERATIONS} when no budget is given",
        ),
    )
    seed: int = field(default=0, metadata=field_meta("seed of every random choice", 0, MAX_SEED))
    device: str = field(default="auto", metadata=field_meta("auto, cpu, cuda, cuda:N or mps"))
