"""The spec of a prediction run (superresolution with a WPPNet, sampling with a WPPFlow)."""

from __future__ import annotations

from dataclasses import dataclass, field

from napari_wpp.core.config.fields import MAX_COUNT, MAX_SEED, field_meta

__all__ = ["PredictSpec"]


@dataclass(frozen=True)
class PredictSpec:
    """A prediction run: superresolution with a WPPNet, posterior sampling with a WPPFlow.

    The sampling fields (``samples``, ``temperature``, ``seed``, ``keep_samples``) are used
    only with a WPPFlow. The bounds are what the faces offer (parsers, spin boxes); values
    are checked by the core, whose messages name the fix.
    """

    axis: int = field(
        default=0,
        metadata=field_meta(
            "axis of a 3D input cut into slices; it keeps its size, the two others grow",
            -3,
            2,
        ),
    )
    tile: int | None = field(
        default=None,
        metadata=field_meta(
            "process each slice in tiles of T LR pixels (with a halo; same result, less memory)",
            1,
            65536,
            default_text="whole slices",
        ),
    )
    batch_size: int = field(
        default=4,
        metadata=field_meta(
            "slices per forward pass; posterior samples per pass for a wppflow", 1, MAX_COUNT
        ),
    )
    device: str = field(default="auto", metadata=field_meta("auto, cpu, cuda, cuda:N or mps"))
    samples: int = field(
        default=8,
        metadata=field_meta(
            "number of posterior samples per slice (1 gives a std of 0)", 1, MAX_COUNT
        ),
    )
    temperature: float = field(
        default=1.0,
        metadata=field_meta(
            "latent temperature: samples from T·N(0, I) (0: every sample is the mode)", 0.0, 5.0
        ),
    )
    seed: int = field(
        default=0,
        metadata=field_meta(
            "seed of the latents; the same seed gives the same samples", 0, MAX_SEED
        ),
    )
    keep_samples: bool = field(
        default=False, metadata=field_meta("also keep every posterior sample (sample axis first)")
    )
