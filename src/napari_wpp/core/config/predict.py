"""The spec of a prediction run (superresolution with a WPPNet, sampling with a WPPFlow)."""

from __future__ import annotations

from dataclasses import dataclass

from napari_wpp.core.config.fields import MAX_COUNT, MAX_SEED, spec_field

__all__ = ["PredictSpec"]


@dataclass(frozen=True)
class PredictSpec:
    """A prediction run: superresolution with a WPPNet, posterior sampling with a WPPFlow.

    The sampling fields (``samples``, ``temperature``, ``seed``, ``keep_samples``) are used
    only with a WPPFlow. The bounds are what the faces offer (parsers, spin boxes); values
    are checked by the core, whose messages name the fix.
    """

    axis: int = spec_field(
        0, "axis of a 3D input cut into slices; it keeps its size, the two others grow", -3, 2
    )
    tile: int | None = spec_field(
        None,
        "process each slice in tiles of T LR pixels (with a halo; same result, less memory)",
        1,
        65536,
        default_text="whole slices",
    )
    batch_size: int = spec_field(
        4, "slices per forward pass; posterior samples per pass for a wppflow", 1, MAX_COUNT
    )
    device: str = spec_field("auto", "auto, cpu, cuda, cuda:N or mps")
    samples: int = spec_field(
        8, "number of posterior samples per slice (1 gives a std of 0)", 1, MAX_COUNT
    )
    temperature: float = spec_field(
        1.0, "latent temperature: samples from T·N(0, I) (0: every sample is the mode)", 0.0, 5.0
    )
    seed: int = spec_field(
        0, "seed of the latents; the same seed gives the same samples", 0, MAX_SEED
    )
    keep_samples: bool = spec_field(False, "also keep every posterior sample (sample axis first)")
    lr_denoise: bool = spec_field(
        True,
        "wppnet: denoise the LR input with the model's noise model, when it holds one "
        "(trained with an operator estimated from a registered pair)",
    )
