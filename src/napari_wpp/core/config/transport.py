"""The specs of a patch transport (fit and apply) and of the ground-truth-free readouts."""

from __future__ import annotations

from dataclasses import dataclass

from napari_wpp.core.config.fields import MAX_SEED, spec_field

__all__ = ["ReadoutSpec", "TransportSpec"]


@dataclass(frozen=True)
class TransportSpec:
    """A Gaussian patch transport: its fit (patch size, floor) and its application (α, data).

    α = 1 leaves an image unchanged, α = 0 transports it fully; ``alpha`` ``None`` chooses
    the α whose patch distance to the reference meets the middle of the reference's own band.
    """

    patch_size: int = spec_field(6, "side p of the p×p patches whose statistics move", 2, 16)
    floor: float = spec_field(
        1e-4, "eigenvalue floor of the source patch covariance (intensity² on [0, 1])", 0.0, 1.0
    )
    alpha: float | None = spec_field(
        None,
        "blend α·input + (1 − α)·transported: 1 unchanged (fidelity), 0 fully transported "
        "(perception)",
        -0.5,
        1.5,
        default_text="auto: where the patch distance meets the reference's band",
    )
    data_steps: int = spec_field(
        0,
        "steepest-descent steps on ‖f(x) − y‖² after the transport (needs the LR image), "
        "stopped at the noise level",
        0,
        1000,
    )


@dataclass(frozen=True)
class ReadoutSpec:
    """Readouts without ground truth: data residual and patch distance to the reference."""

    patch_size: int = spec_field(6, "side p of the patches compared with the reference", 2, 16)
    noise: float | None = spec_field(
        None,
        "noise std of the LR image on the [0, 1] scale",
        0.0,
        1.0,
        default_text="estimated from the LR image",
    )
    projections: int = spec_field(64, "random directions of the sliced distance", 1, 4096)
    samples: int = spec_field(20000, "patches per image drawn for the sliced distance", 100, 10**7)
    seed: int = spec_field(0, "seed of the random choices", 0, MAX_SEED)
