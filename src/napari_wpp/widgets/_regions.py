"""Image-plane regions of layers: rectangles of Shapes layers in data pixels, registered pairs.

World boxes map through each layer's world/data transform, so scaled or translated layers
work; a box of world size ``L`` on a layer of scale ``s`` spans ``L / s`` pixels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from napari_wpp.core.errors import InputError
from napari_wpp.widgets._layers import full_resolution

__all__ = [
    "pair_regions",
    "pixel_size_ratio",
    "rectangle_world_box",
    "reference_region",
    "region_text",
    "reference_selection",
    "registered_crops",
    "world_box_to_slices",
]

_EPS = 1e-6


def rectangle_world_box(shapes: Any) -> np.ndarray:
    """World bounds ``[[y0, x0], [y1, x1]]`` (last two axes) of a rectangle of a Shapes layer.

    The first selected rectangle is used, else the last one drawn.

    Raises
    ------
    InputError
        The layer has no rectangle.
    """
    rectangles = [i for i, kind in enumerate(shapes.shape_type) if kind == "rectangle"]
    if not rectangles:
        raise InputError(
            f"Shapes layer {shapes.name!r} has no rectangle: draw one with its rectangle tool"
        )
    selected = [i for i in sorted(shapes.selected_data) if i in rectangles]
    index = selected[0] if selected else rectangles[-1]
    vertices = np.asarray(shapes.data[index], dtype=np.float64)
    world = np.array([np.asarray(shapes.data_to_world(v), dtype=np.float64) for v in vertices])
    world = world[:, -2:]
    return np.stack([world.min(axis=0), world.max(axis=0)])


def world_box_to_slices(layer: Any, box: np.ndarray) -> tuple[slice, slice]:
    """Pixel rows and columns of ``layer`` whose centres lie in a world box.

    Parameters
    ----------
    layer
        Image layer (its last two axes are the image plane).
    box
        ``[[y0, x0], [y1, x1]]`` in world coordinates (last two world axes).

    Returns
    -------
    tuple of slice
        Half-open pixel ranges ``[ceil(d0), ceil(d1))`` of the box in data coordinates,
        clipped to the layer (empty where they do not overlap). A box of world size ``L``
        on a layer of scale ``s`` thus spans ``L / s`` pixels.
    """
    box = np.asarray(box, dtype=np.float64)
    corners = [(y, x) for y in box[:, 0] for x in box[:, 1]]
    data = np.array([np.asarray(layer.world_to_data(c), dtype=np.float64)[-2:] for c in corners])
    low, high = data.min(axis=0), data.max(axis=0)
    shape = full_resolution(layer).shape[-2:]
    slices = []
    for axis in range(2):
        start = min(max(0, math.ceil(low[axis] - _EPS)), shape[axis])
        stop = min(max(0, math.ceil(high[axis] - _EPS)), shape[axis])
        slices.append(slice(start, max(start, stop)))
    return slices[0], slices[1]


def _slices_world_box(layer: Any, rows: slice, cols: slice) -> np.ndarray:
    """World box covered by the pixels ``rows × cols`` of ``layer`` (their outer edges)."""
    corners = [
        (y, x)
        for y in (rows.start - 0.5, rows.stop - 0.5)
        for x in (cols.start - 0.5, cols.stop - 0.5)
    ]
    ndim = layer.ndim
    world = np.array(
        [
            np.asarray(layer.data_to_world([0.0] * (ndim - 2) + [y, x]), dtype=np.float64)[-2:]
            for y, x in corners
        ]
    )
    return np.stack([world.min(axis=0), world.max(axis=0)])


def _plane_shape(layer: Any) -> tuple[int, int]:
    shape = full_resolution(layer).shape
    return int(shape[-2]), int(shape[-1])


def pixel_size_ratio(hr_layer: Any, lr_layer: Any) -> int | None:
    """The scale of a registered pair from the layers' pixel sizes (LR / HR), if an integer ≥ 2."""
    ratio = float(lr_layer.scale[-1]) / float(hr_layer.scale[-1])
    if ratio >= 2 and abs(ratio - round(ratio)) < _EPS:
        return int(round(ratio))
    return None


def reference_region(
    layer: Any, shapes: Any | None = None, slice_range: tuple[int, int] | None = None
) -> tuple[tuple[slice, ...], tuple[int, ...]]:
    """Index and shape of the reference region of an image layer.

    Parameters
    ----------
    layer
        2D or 3D image layer.
    shapes
        Optional Shapes layer whose rectangle (see :func:`rectangle_world_box`) cuts the
        image plane; ``None`` takes the whole plane.
    slice_range
        ``(first, last)`` slice of a 3D layer (inclusive, clipped); default all slices.

    Returns
    -------
    index, shape
        The numpy index into the layer data and the shape of the region.

    Raises
    ------
    InputError
        Not a 2D/3D greyscale image, or a rectangle outside the image.
    """
    data = full_resolution(layer)
    if getattr(layer, "rgb", False) or len(data.shape) not in (2, 3):
        raise InputError(
            f"layer {layer.name!r} has shape {tuple(data.shape)}: choose a 2D or 3D greyscale "
            "image layer as reference"
        )
    height, width = _plane_shape(layer)
    if shapes is None:
        rows, cols = slice(0, height), slice(0, width)
    else:
        rows, cols = world_box_to_slices(layer, rectangle_world_box(shapes))
        if rows.stop <= rows.start or cols.stop <= cols.start:
            raise InputError(
                f"the rectangle of {shapes.name!r} does not overlap layer {layer.name!r}: "
                "draw it over the image"
            )
    if len(data.shape) == 2:
        index: tuple[slice, ...] = (rows, cols)
        return index, (rows.stop - rows.start, cols.stop - cols.start)
    depth = int(data.shape[0])
    first, last = (0, depth - 1) if slice_range is None else slice_range
    first, last = sorted((int(first), int(last)))
    first, last = max(0, first), min(depth - 1, last)
    if last < first:
        raise InputError(
            f"slice range is outside layer {layer.name!r} (0–{depth - 1}): choose slices in it"
        )
    index = (slice(first, last + 1), rows, cols)
    return index, (last - first + 1, rows.stop - rows.start, cols.stop - cols.start)


def pair_regions(
    hr_layer: Any,
    lr_layer: Any,
    hr_box: np.ndarray | None = None,
    lr_box: np.ndarray | None = None,
) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Image-plane crops of a registered HR/LR pair.

    With no box both layers are used whole; with one box (of either layer) the LR crop is the
    LR pixels whose centres lie in it and the HR crop is the HR pixels under those LR pixels,
    so the crops stay registered and their sizes differ by the scale exactly; with two boxes
    each layer is cut by its own.

    Returns
    -------
    (hr_rows, hr_cols), (lr_rows, lr_cols)

    Raises
    ------
    InputError
        A box that does not overlap its layer.
    """
    if hr_box is None and lr_box is None:
        (h, w), (lh, lw) = _plane_shape(hr_layer), _plane_shape(lr_layer)
        return (slice(0, h), slice(0, w)), (slice(0, lh), slice(0, lw))
    if hr_box is not None and lr_box is not None:
        hr_crop = world_box_to_slices(hr_layer, hr_box)
        lr_crop = world_box_to_slices(lr_layer, lr_box)
    else:
        box = hr_box if hr_box is not None else lr_box
        lr_crop = world_box_to_slices(lr_layer, box)
        if all(s.stop > s.start for s in lr_crop):
            hr_crop = world_box_to_slices(hr_layer, _slices_world_box(lr_layer, *lr_crop))
        else:
            hr_crop = lr_crop
    for crop, layer in ((hr_crop, hr_layer), (lr_crop, lr_layer)):
        if any(s.stop <= s.start for s in crop):
            raise InputError(
                f"the rectangle does not overlap layer {layer.name!r}: draw it over both "
                "layers, or draw one rectangle for each"
            )
    return hr_crop, lr_crop


def registered_crops(
    hr_layer: Any, lr_layer: Any, q: int, hr_box: Any = None, lr_box: Any = None
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """:func:`pair_regions` of a pair at scale ``q``: the LR crop is HR / q (the HR crop is
    cut to a multiple of q) or the HR crop's size (LR resampled onto the HR grid).

    Raises
    ------
    InputError
        The crops do not match the scale (the message names what to check).
    """
    hr_crop, lr_crop = pair_regions(hr_layer, lr_layer, hr_box, lr_box)
    hr_shape = tuple(s.stop - s.start for s in hr_crop)
    lr_shape = tuple(s.stop - s.start for s in lr_crop)
    native = (hr_shape[0] // q, hr_shape[1] // q)
    if lr_shape == native and hr_shape != (native[0] * q, native[1] * q):
        hr_crop = tuple(slice(s.start, s.start + n * q) for s, n in zip(hr_crop, native))
    elif lr_shape not in (native, hr_shape):
        raise InputError(
            f"HR region {hr_shape[0]}×{hr_shape[1]} and LR region {lr_shape[0]}×"
            f"{lr_shape[1]} do not match scale ×{q}: check the scale, the layers' "
            "registration or the rectangles"
        )
    return hr_crop, lr_crop


def reference_selection(
    layer: Any, index: tuple[slice, ...], shape: tuple[int, ...], patch_size: int
) -> Any:
    """The :class:`~napari_wpp.widgets._session.ReferenceSelection` of a region of ``layer``.

    The region is normalised to float32 [0, 1] by the whole layer's
    :meth:`~napari_wpp.core.intensity.Normalisation.from_array`; a single slice becomes 2D.

    Raises
    ------
    InputError
        The region is smaller than a patch.
    """
    from napari_wpp.core.intensity import Normalisation
    from napari_wpp.core.patches import count_patches
    from napari_wpp.widgets._session import ReferenceSelection

    count = count_patches(shape, patch_size)
    if count == 0:
        raise InputError(
            f"the reference region is {shape[-2]}×{shape[-1]} px, smaller than a "
            f"{patch_size}×{patch_size} patch: draw a larger rectangle"
        )
    data = full_resolution(layer)
    normalisation = Normalisation.from_array(np.asarray(data))
    region = normalisation.apply(np.asarray(data[index]))
    if region.ndim == 3 and region.shape[0] == 1:
        region = region[0]
    return ReferenceSelection(
        regions=[np.ascontiguousarray(region)],
        normalisation=normalisation.to_dict(),
        source=layer.name,
        n_patches=int(count),
    )


def region_text(shape: tuple[int, ...], n_patches: int, patch_size: int) -> tuple[str, bool]:
    """A line on a reference region of ``shape`` and whether it holds a patch.

    Example: ``("Region 20×20 px × 3 slices → 1,083 patches of 6×6", True)``.
    """
    size = f"{shape[-2]}×{shape[-1]} px"
    if len(shape) == 3:
        size += f" × {shape[0]} slice{'s' if shape[0] != 1 else ''}"
    patch = f"{patch_size}×{patch_size}"
    if n_patches == 0:
        return f"Region {size}: smaller than a {patch} patch", False
    return f"Region {size} → {n_patches:,} patches of {patch}", True
