"""The specs of the forward operator and of the runs built on it (degrade, estimate)."""

from __future__ import annotations

from dataclasses import dataclass

from napari_wpp.core.config.fields import MAX_SEED, spec_field

__all__ = [
    "ANCHORS",
    "PADDINGS",
    "SCALES",
    "SIGMA_DIVISOR",
    "DegradeSpec",
    "EstimateSpec",
    "OperatorSpec",
    "default_sigma",
]

#: Downsampling factors the widgets offer (any integer ≥ 2 works on the command line).
SCALES = (2, 3, 4, 6, 8)
#: Kernel anchorings of the Gaussian operator ('corner' reproduces the published data).
ANCHORS = ("center", "corner")
#: Border handlings of the blur.
PADDINGS = ("circular", "reflect", "zeros")
#: The published operators blur with σ = q / SIGMA_DIVISOR HR pixels.
SIGMA_DIVISOR = 2


def default_sigma(scale: int) -> float:
    """Gaussian blur width of the published operators: 2 at ×4, 3 at ×6, 4 at ×8 (q / 2)."""
    return float(scale) / SIGMA_DIVISOR


def _sigma_rule_text() -> str:
    examples = ", ".join(f"{default_sigma(q):g} for ×{q}" for q in (4, 6, 8))
    return f"q/{SIGMA_DIVISOR}: {examples}"


@dataclass(frozen=True)
class OperatorSpec:
    """A forward operator: an operator JSON file, or a parametric Gaussian blur + downsampling.

    With ``path`` set the other fields are not used. ``sigma`` ``None`` follows the scale
    (:func:`default_sigma`), see :attr:`resolved_sigma`.
    """

    path: str | None = spec_field(
        None, "operator JSON (from estimate-operator)", default_text="none"
    )
    scale: int = spec_field(4, "integer downsampling factor q ≥ 2", 2, choices=SCALES)
    sigma: float | None = spec_field(
        None, "Gaussian blur σ in HR pixels", 0.05, 64.0, default_text=_sigma_rule_text()
    )
    kernel_size: int = spec_field(16, "kernel side", 1, 129)
    anchor: str = spec_field(
        "center", "kernel anchoring; 'corner' reproduces the published data", choices=ANCHORS
    )
    padding: str = spec_field("circular", "border handling of the blur", choices=PADDINGS)

    @property
    def resolved_sigma(self) -> float:
        """σ in HR pixels: ``sigma``, or the scale's :func:`default_sigma`."""
        return default_sigma(self.scale) if self.sigma is None else float(self.sigma)


@dataclass(frozen=True)
class DegradeSpec:
    """Degradation of an HR image or stack by a forward operator, plus Gaussian noise."""

    noise: float = spec_field(0.0, "Gaussian noise std on the [0, 1] intensity scale", 0.0, 1.0)
    seed: int = spec_field(0, "noise seed (slice i uses seed + i)", 0, MAX_SEED)


@dataclass(frozen=True)
class EstimateSpec:
    """Estimation of a K×K kernel and a bias from a registered HR/LR pair."""

    scale: int = spec_field(4, "integer factor ≥ 2", 2, choices=SCALES)
    kernel_size: int = spec_field(15, "kernel side", 1, 64)
