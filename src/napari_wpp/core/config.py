"""Specifications of runs: every default, bound and one-line help in one place (torch-free).

The command line builds its options from these fields (``default``, ``help``) and the dock
widgets their forms (initial values, spin box ranges), so neither repeats a default. Each field
carries ``metadata`` with

* ``help``: one line, without the default (see :func:`help_text`),
* ``min`` / ``max``: inclusive bounds (absent: unbounded),
* ``default_text``: how the default reads in a help text, when ``str(default)`` does not say it.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

__all__ = ["PredictSpec", "bounds", "default_of", "help_text"]

#: Largest spin box value of counts in the widgets (batch size, samples).
MAX_COUNT = 4096
#: Largest latent seed (a 32-bit signed integer).
MAX_SEED = 2**31 - 1


def _meta(help: str, low: float | None = None, high: float | None = None, **extra: Any) -> Any:
    data: dict[str, Any] = {"help": help, **extra}
    if low is not None:
        data["min"] = low
    if high is not None:
        data["max"] = high
    return data


@dataclass(frozen=True)
class PredictSpec:
    """A prediction run: superresolution with a WPPNet, posterior sampling with a WPPFlow.

    The sampling fields (``samples``, ``temperature``, ``seed``, ``keep_samples``) are used
    only with a WPPFlow. The bounds are what the faces offer (parsers, spin boxes); values
    are checked by the core, whose messages name the fix.
    """

    axis: int = field(
        default=0,
        metadata=_meta(
            "axis of a 3D input cut into slices; it keeps its size, the two others grow",
            -3,
            2,
        ),
    )
    tile: int | None = field(
        default=None,
        metadata=_meta(
            "process each slice in tiles of T LR pixels (with a halo; same result, less memory)",
            1,
            65536,
            default_text="whole slices",
        ),
    )
    batch_size: int = field(
        default=4,
        metadata=_meta(
            "slices per forward pass; posterior samples per pass for a wppflow", 1, MAX_COUNT
        ),
    )
    device: str = field(default="auto", metadata=_meta("auto, cpu, cuda, cuda:N or mps"))
    samples: int = field(
        default=8,
        metadata=_meta("number of posterior samples per slice (1 gives a std of 0)", 1, MAX_COUNT),
    )
    temperature: float = field(
        default=1.0,
        metadata=_meta(
            "latent temperature: samples from T·N(0, I) (0: every sample is the mode)", 0.0, 5.0
        ),
    )
    seed: int = field(
        default=0,
        metadata=_meta("seed of the latents; the same seed gives the same samples", 0, MAX_SEED),
    )
    keep_samples: bool = field(
        default=False, metadata=_meta("also keep every posterior sample (sample axis first)")
    )


def _field(spec: type, name: str) -> Any:
    for item in fields(spec):
        if item.name == name:
            return item
    raise KeyError(f"{spec.__name__} has no field {name!r}")


def default_of(spec: type, name: str) -> Any:
    """The default of the field ``name`` of the spec class ``spec``."""
    item = _field(spec, name)
    if item.default is not MISSING:
        return item.default
    return item.default_factory()  # type: ignore[misc]


def bounds(spec: type, name: str) -> tuple[Any, Any]:
    """``(min, max)`` of a field (``None`` where unbounded)."""
    meta = _field(spec, name).metadata
    return meta.get("min"), meta.get("max")


def help_text(spec: type, name: str) -> str:
    """The field's one-line help followed by ``(default ...)``."""
    meta = _field(spec, name).metadata
    default = meta.get("default_text", default_of(spec, name))
    text = f"{default:g}" if isinstance(default, float) else str(default)
    return f"{meta['help']} (default {text})"
