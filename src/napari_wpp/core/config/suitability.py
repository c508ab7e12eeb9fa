"""The specs of the ground-truth-free checks of a reference: suitability map and blur width."""

from __future__ import annotations

from dataclasses import dataclass

from napari_wpp.core.config.fields import MAX_COUNT, MAX_SEED, default_of, spec_field
from napari_wpp.core.config.operator import SCALES, OperatorSpec
from napari_wpp.core.config.training import TrainSpec

__all__ = ["BlurCheckSpec", "SuitabilitySpec"]


@dataclass(frozen=True)
class SuitabilitySpec:
    """How far each LR patch of the data is from the nearest degraded reference patch.

    The score of a patch is its squared distance to the nearest patch of the reference
    degraded by the operator (at ``phases``² sampling offsets), divided by ``p² σ²`` (σ: the
    data's noise std): about 1 means "explained up to the noise".
    """

    noise_std: float = spec_field(
        default_of(TrainSpec, "noise_std"),
        "noise std σ of the LR data on the [0, 1] intensity scale (the score's unit)",
        1e-4,
        1.0,
    )
    patch_size: int = spec_field(
        4, "side of the LR patches compared (the ranges are set for 4)", 2, 8
    )
    phases: int = spec_field(
        2, "sampling offsets per axis at which the reference is degraded (≤ scale)", 1, 8
    )
    reference_patches: int = spec_field(
        400_000, "most degraded reference patches kept (a random subset above)", 1000
    )
    seed: int = spec_field(0, "seed of the subsets", 0, MAX_SEED)


@dataclass(frozen=True)
class BlurCheckSpec:
    """The Gaussian blur σ whose degraded reference best explains the LR data's patches."""

    scale: int = spec_field(4, "integer factor ≥ 2", 2, choices=SCALES)
    kernel_size: int = spec_field(default_of(OperatorSpec, "kernel_size"), "kernel side", 1, 129)
    patch_size: int = spec_field(3, "side of the LR patches compared", 2, 8)
    phases: int = spec_field(2, "sampling offsets per axis of the degraded reference", 1, 8)
    data_patches: int = spec_field(
        8000, "LR data patches compared (a random subset)", 100, 64 * MAX_COUNT
    )
    seed: int = spec_field(0, "seed of the subsets", 0, MAX_SEED)
