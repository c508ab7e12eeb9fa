"""Geometry and bookkeeping of the image layers the napari-wpp widgets produce.

A superresolved layer of factor ``q`` over a source layer with scale ``s`` and translate ``t``
gets scale ``s / q`` and translate ``t − s·(q − 1) / (2q)`` on the superresolved axes (pixel
centres sit at integer data coordinates, so the ``q × q`` output pixels of one input pixel
tile its footprint exactly) and keeps ``s`` and ``t`` on the slice axis of a volume. Outputs
are named after their source, carry their provenance under ``metadata["napari_wpp"]`` and are
updated in place when a widget runs again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_wpp.core.errors import InputError
from napari_wpp.jobs.zarr_layout import grown_axes

__all__ = [
    "PROVENANCE_KEY",
    "add_or_update_image",
    "current_index",
    "full_resolution",
    "grown_axes",
    "layer_role",
    "offset_translate",
    "superresolved_geometry",
]

#: Key of the napari-wpp provenance in a layer's ``metadata``.
PROVENANCE_KEY = "napari_wpp"


def full_resolution(layer: Any) -> Any:
    """The full-resolution data of an image layer (level 0 of a multiscale layer)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def layer_role(layer: Any) -> str | None:
    """The ``metadata["napari_wpp"]["role"]`` of a layer (``"lr"``, ``"reference"``, ...)."""
    meta = getattr(layer, "metadata", None) or {}
    info = meta.get(PROVENANCE_KEY) if isinstance(meta, dict) else None
    return info.get("role") if isinstance(info, dict) else None


def superresolved_geometry(
    scale: Sequence[float],
    translate: Sequence[float],
    factor: int,
    grown: Sequence[bool],
    leading_axes: int = 0,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Scale and translate of a layer superresolved ``factor`` times from a source layer.

    Parameters
    ----------
    scale, translate
        The source layer's scale ``s`` and translate ``t`` (one value per axis).
    factor
        Superresolution factor ``q``.
    grown
        One flag per axis: ``True`` where the axis is ``q`` times finer.
    leading_axes
        Extra leading axes of the output (e.g. the sample axis), with scale 1 and translate 0.

    Returns
    -------
    tuple
        ``(scale, translate)``: ``s / q`` and ``t − s·(q − 1) / (2q)`` on grown axes, ``s`` and
        ``t`` elsewhere, preceded by ``leading_axes`` times ``(1, 0)``.
    """
    s = np.asarray(scale, dtype=np.float64)
    t = np.asarray(translate, dtype=np.float64)
    flags = np.asarray(grown, dtype=bool)
    if not s.shape == t.shape == flags.shape or s.ndim != 1:
        raise InputError(
            f"scale {tuple(s)}, translate {tuple(t)} and axes {tuple(flags)} differ in length: "
            "give one value per axis"
        )
    q = int(factor)
    if q < 1:
        raise InputError(f"superresolution factor {factor} is invalid: use an integer ≥ 1")
    new_scale = np.where(flags, s / q, s)
    new_translate = np.where(flags, t - s * (q - 1) / (2.0 * q), t)
    lead = int(leading_axes)
    return (
        (1.0,) * lead + tuple(float(v) for v in new_scale),
        (0.0,) * lead + tuple(float(v) for v in new_translate),
    )


def offset_translate(
    scale: Sequence[float], translate: Sequence[float], start: Sequence[int]
) -> tuple[float, ...]:
    """Translate of a crop of a layer that starts at data index ``start`` (``t + s·start``)."""
    s = np.asarray(scale, dtype=np.float64)
    t = np.asarray(translate, dtype=np.float64)
    return tuple(float(v) for v in t + s * np.asarray(start, dtype=np.float64))


def current_index(layer: Any, viewer: Any, axis: int = 0) -> int:
    """Data index on ``axis`` of ``layer`` at the viewer's current position (clipped)."""
    shape = full_resolution(layer).shape
    position = np.asarray(layer.world_to_data(viewer.dims.point), dtype=np.float64)
    index = int(round(float(position[axis])))
    return int(min(max(index, 0), int(shape[axis]) - 1))


def add_or_update_image(
    viewer: Any,
    name: str,
    data: Any,
    *,
    scale: Sequence[float],
    translate: Sequence[float],
    metadata: dict[str, Any] | None = None,
    contrast_limits: Sequence[float] | None = None,
    **kwargs: Any,
) -> Any:
    """Add the image layer ``name`` or, when it exists with the same dimensionality, update it.

    Parameters
    ----------
    viewer
        The napari viewer.
    name
        Layer name.
    data
        Array-like (numpy, dask, zarr).
    scale, translate
        Layer geometry (see :func:`superresolved_geometry`).
    metadata
        Replaces the layer's metadata.
    contrast_limits
        Fixed contrast limits (recommended for lazy data, which would be read to find them);
        ``None`` resets them from the data.
    **kwargs
        Further ``add_image`` arguments, used only when the layer is created.

    Returns
    -------
    napari.layers.Image
        The added or updated layer. A layer of another type or dimensionality under that
        name is replaced at the same position in the layer list.
    """
    from napari.layers import Image

    scale = tuple(float(v) for v in scale)
    translate = tuple(float(v) for v in translate)
    existing = viewer.layers[name] if name in viewer.layers else None
    if (
        isinstance(existing, Image)
        and existing.ndim == len(data.shape)
        and not existing.multiscale
        and not existing.rgb
    ):
        existing.scale = scale
        existing.translate = translate
        if metadata is not None:
            existing.metadata = metadata
        existing.data = data
        if contrast_limits is not None:
            existing.contrast_limits = tuple(float(v) for v in contrast_limits)
        else:
            existing.reset_contrast_limits()
        existing.refresh()
        return existing
    index = None
    if existing is not None:
        index = viewer.layers.index(existing)
        viewer.layers.remove(existing)
    options = dict(kwargs)
    if contrast_limits is not None:
        options["contrast_limits"] = tuple(float(v) for v in contrast_limits)
    layer = viewer.add_image(
        data, name=name, scale=scale, translate=translate, metadata=metadata or {}, **options
    )
    if index is not None:
        viewer.layers.move(viewer.layers.index(layer), index)
    return layer
