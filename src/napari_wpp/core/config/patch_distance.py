"""The patch distance of the prior, shared by training and the variational reconstruction."""

from __future__ import annotations

from typing import Any

from napari_wpp.core.config.fields import spec_field

__all__ = ["PATCH_DISTANCES", "patch_distance_field", "projections_field"]

#: Patch distances of the prior: the exact semi-dual W₂² or the sliced (projected) W₂².
PATCH_DISTANCES = ("exact", "sliced")


def patch_distance_field() -> Any:
    """The ``patch_distance`` field of a spec (default ``"exact"``)."""
    return spec_field(
        "exact",
        "distance between the patches of the output and of the reference: exact (semi-dual "
        "W₂², nearest-neighbour search against every reference patch) or sliced (W₂² of "
        "1-D projections, a sort each: far cheaper per step, a lower bound)",
        choices=PATCH_DISTANCES,
    )


def projections_field() -> Any:
    """The ``projections`` field of a spec: random directions of the sliced distance."""
    return spec_field(
        64,
        "sliced distance: random directions per step, redrawn every step (the reference's "
        "principal axes are always added)",
        0,
        4096,
    )
