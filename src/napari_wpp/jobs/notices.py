"""Warnings a job yields among its events: the faces show them, the run goes on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["JobProgress", "JobWarning", "reference_warning"]


@dataclass(frozen=True)
class JobProgress:
    """Progress of a job: ``done`` of ``total`` units of work, ``what`` they are."""

    done: int
    total: int
    what: str = "slices"


@dataclass(frozen=True)
class JobWarning:
    """Something questionable but allowed; the CLI prints ``warning: …``, a widget notifies."""

    message: str


def reference_warning(
    reference: Any, patch_size: int, what: str = "reference"
) -> JobWarning | None:
    """A warning when the (normalised) reference is nearly featureless, else ``None``."""
    from napari_wpp.core.patches import featureless_reference

    reason = featureless_reference(reference, patch_size)
    if reason is None:
        return None
    return JobWarning(
        f"the {what} is nearly featureless ({reason}): the patch prior will flatten the "
        "result; choose a textured region of the material"
    )
