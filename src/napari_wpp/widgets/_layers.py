"""Geometry and bookkeeping of the image layers the napari-wpp widgets produce.

A superresolved layer of factor ``q`` over a source layer with scale ``s`` and translate ``t``
gets scale ``s / q`` and translate ``t − s·(q − 1) / (2q)`` on the superresolved axes (pixel
centres sit at integer data coordinates, so the ``q × q`` output pixels of one input pixel
tile its footprint exactly) and keeps ``s`` and ``t`` on the slice axis of a volume. Outputs
are named after their source, carry their provenance under ``metadata["napari_wpp"]`` and are
updated in place when a widget runs again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from napari_wpp.core.errors import InputError
from napari_wpp.jobs.zarr_layout import grown_axes

__all__ = [
    "MIN_REGION",
    "PROVENANCE_KEY",
    "add_or_update_image",
    "add_or_update_kernel",
    "checked_image",
    "chosen_layer",
    "current_index",
    "full_resolution",
    "greyscale_images",
    "grown_axes",
    "layer_files",
    "layer_role",
    "layer_with_role",
    "offset_translate",
    "pair_hr_default",
    "pair_lr_default",
    "crop_geometry",
    "region_slices",
    "shapes_layers",
    "shown_plane",
    "stack_depth",
    "superresolved_geometry",
    "superresolved_provenance",
    "truth_index",
]

#: Key of the napari-wpp provenance in a layer's ``metadata``.
PROVENANCE_KEY = "napari_wpp"
#: Roles of layers a widget computed (never offered as inputs).
OUTPUT_ROLES = ("preview", "superresolved", "kernel")
#: Smallest region side in LR pixels.
MIN_REGION = 4
#: Tolerance (in truth pixels) of the check that a ground truth lies on the output grid.
GRID_TOLERANCE = 1e-3


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


def crop_geometry(
    layer: Any, start: Sequence[int], factor: int, axis: int | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Scale and translate of a crop of ``layer`` from data index ``start``, superresolved.

    ``axis`` is the slice axis of a 3D layer (it keeps its scale), ``None`` for a 2D one.
    """
    scale = tuple(float(v) for v in layer.scale)
    translate = offset_translate(scale, tuple(float(v) for v in layer.translate), start)
    grown = grown_axes(len(scale), axis if len(scale) == 3 else None)
    return superresolved_geometry(scale, translate, factor, grown)


def show_result(viewer: Any, name: str, data: Any, run: dict[str, Any]) -> Any:
    """Add or update the result layer ``name`` placed by ``run``'s ``geometry`` (scale,
    translate), with its ``provenance`` and ``contrast_limits``, in grey."""
    scale, translate = run["geometry"]
    return add_or_update_image(
        viewer,
        name,
        data,
        scale=scale,
        translate=translate,
        metadata={PROVENANCE_KEY: dict(run["provenance"])},
        contrast_limits=run["contrast_limits"],
        colormap="gray",
    )


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


# --------------------------------------------------------------------------- inputs
def greyscale_images(viewer: Any) -> list[Any]:
    """The 2D and 3D greyscale image layers of ``viewer`` that no widget computed."""
    from napari.layers import Image

    return [
        layer
        for layer in viewer.layers
        if isinstance(layer, Image)
        and not layer.rgb
        and len(full_resolution(layer).shape) in (2, 3)
        and layer_role(layer) not in OUTPUT_ROLES
    ]


def shapes_layers(viewer: Any) -> list[Any]:
    """The Shapes layers of ``viewer`` (whose rectangles cut regions)."""
    from napari.layers import Shapes

    return [layer for layer in viewer.layers if isinstance(layer, Shapes)]


def stack_depth(layer: Any) -> int:
    """Number of slices of a 3D image layer (0 for a 2D one)."""
    shape = full_resolution(layer).shape
    return int(shape[0]) if len(shape) == 3 else 0


def shown_plane(layer: Any, viewer: Any) -> Any:
    """The 2D data of ``layer``: the slice shown in ``viewer`` of a 3D layer (full resolution)."""
    data = full_resolution(layer)
    return data[current_index(layer, viewer)] if data.ndim == 3 else data


def layer_with_role(role: str, first: bool = True) -> Callable[[Sequence[Any]], str]:
    """A layer choice's default: the layer whose role is ``role``, else the first (or none)."""

    def choose(layers: Sequence[Any]) -> str:
        by_role = {layer_role(layer): layer.name for layer in layers}
        return by_role.get(role, layers[0].name if first and layers else "")

    return choose


def pair_hr_default(layers: Sequence[Any]) -> str:
    """The HR layer offered for a registered pair: the ground truth, else the reference."""
    return layer_with_role("truth", first=False)(layers) or layer_with_role("reference")(layers)


def pair_lr_default(layers: Sequence[Any]) -> str:
    """The LR layer offered for a registered pair: the LR layer, else another than the HR."""
    hr_name = pair_hr_default(layers)
    others = [layer.name for layer in layers if layer.name != hr_name]
    return {layer_role(layer): layer.name for layer in layers}.get(
        "lr", others[0] if others else hr_name
    )


def chosen_layer(viewer: Any, name: str, what: str) -> Any:
    """The layer ``name`` of ``viewer`` (``InputError`` naming ``what`` when there is none)."""
    if not name or name not in viewer.layers:
        raise InputError(f"no {what} chosen: open one and choose it")
    return viewer.layers[name]


def checked_image(viewer: Any, name: str, what: str) -> Any:
    """The greyscale 2D/3D image layer ``name`` with an integer or float dtype.

    Raises
    ------
    InputError
        No such layer, not a greyscale image, not 2D/3D or not numeric; the message says
        what to choose instead.
    """
    from napari.layers import Image

    layer = chosen_layer(viewer, name, what)
    if not isinstance(layer, Image) or layer.rgb:
        raise InputError(f"layer {layer.name!r} is not a greyscale image layer: choose another")
    data = full_resolution(layer)
    ndim = len(data.shape)
    if ndim not in (2, 3):
        raise InputError(
            f"{what} {layer.name!r} is {ndim}D: choose a 2D image or a 3D stack (Z, Y, X)"
        )
    dtype = np.dtype(data.dtype)
    if dtype.kind not in "uif":
        raise InputError(
            f"layer {layer.name!r} has dtype {dtype}: use an integer or float greyscale image"
        )
    return layer


def superresolved_provenance(
    source: str, state: Any, model_file: str | None, factor: int, **extra: Any
) -> dict[str, Any]:
    """``metadata["napari_wpp"]`` of a layer superresolved from ``source`` by a model."""
    import napari_wpp

    return {
        "role": "superresolved",
        "source": source,
        "model_kind": state.kind,
        "model_config": dict(state.model_config),
        "model_file": model_file,
        "model_step": int(state.step),
        "scale": int(factor),
        "operator": state.operator,
        **extra,
        "version": napari_wpp.__version__,
    }


def region_slices(layer: Any, shapes: Any | None) -> tuple[slice, slice]:
    """Rows and columns of ``layer`` under the rectangle of ``shapes`` (all without one).

    Raises
    ------
    InputError
        ``shapes`` is no Shapes layer, its rectangle misses the layer or the region is
        smaller than :data:`MIN_REGION` pixels a side.
    """
    from napari.layers import Shapes

    from napari_wpp.widgets.reference_operator import rectangle_world_box, world_box_to_slices

    height, width = (int(n) for n in full_resolution(layer).shape[-2:])
    rows, cols = slice(0, height), slice(0, width)
    if shapes is not None:
        if not isinstance(shapes, Shapes):
            raise InputError(f"layer {shapes.name!r} is not a Shapes layer: choose another")
        rows, cols = world_box_to_slices(layer, rectangle_world_box(shapes))
        if rows.stop <= rows.start or cols.stop <= cols.start:
            raise InputError(
                f"the rectangle of {shapes.name!r} does not overlap layer {layer.name!r}: "
                "draw it over the image"
            )
    h, w = rows.stop - rows.start, cols.stop - cols.start
    if min(h, w) < MIN_REGION:
        raise InputError(
            f"the region is {h}×{w} LR pixels, smaller than {MIN_REGION}×{MIN_REGION}: "
            "draw a larger rectangle"
        )
    return rows, cols


def truth_index(
    truth: Any,
    out_scale: tuple[float, ...],
    out_translate: tuple[float, ...],
    plane_shape: tuple[int, int],
) -> tuple[Any, ...]:
    """Index of the pixels of a ground-truth layer under a superresolved region.

    Parameters
    ----------
    truth
        Image layer (2D or 3D) on the superresolved pixel grid.
    out_scale, out_translate
        Geometry of the superresolved region (2 or 3 axes; a 3D region is one slice thick).
    plane_shape
        ``(H, W)`` of the superresolved region.

    Returns
    -------
    tuple
        A numpy index into the truth's data giving the ``(H, W)`` truth of the region.

    Raises
    ------
    InputError
        The truth is not on the output's pixel grid or does not cover the region.
    """
    data = full_resolution(truth)
    tnd = len(data.shape)
    out_nd = len(out_scale)
    if getattr(truth, "rgb", False) or tnd not in (2, 3):
        raise InputError(
            f"ground truth {truth.name!r} has shape {tuple(data.shape)}: choose a 2D or 3D "
            "greyscale image"
        )
    if tnd == 3 and out_nd == 2:
        raise InputError(
            f"ground truth {truth.name!r} is 3D but the LR layer is 2D: choose a 2D ground truth"
        )
    height, width = (int(n) for n in plane_shape)
    s = np.asarray(out_scale, dtype=np.float64)
    t = np.asarray(out_translate, dtype=np.float64)
    last_pixel = np.zeros(out_nd)
    last_pixel[-2:] = (height - 1, width - 1)
    first = np.asarray(truth.world_to_data(t), dtype=np.float64)
    last = np.asarray(truth.world_to_data(t + s * last_pixel), dtype=np.float64)
    span = last - first
    expected = np.zeros(tnd)
    expected[-2:] = (height - 1, width - 1)
    rounded = np.rint(first)
    if np.abs(span - expected).max() > GRID_TOLERANCE * max(height, width, 1) or (
        np.abs(first - rounded).max() > 1e-2
    ):
        raise InputError(
            f"ground truth {truth.name!r} is not on the superresolved pixel grid (its pixel "
            "size or offset differ): choose the HR truth registered with the LR layer"
        )
    start = rounded.astype(int)
    stop = start + np.asarray([1] * (tnd - 2) + [height, width])
    if (start < 0).any() or (stop > np.asarray(data.shape)).any():
        raise InputError(
            f"ground truth {truth.name!r} does not cover the region: choose a truth layer "
            "that covers it, or a smaller region"
        )
    index: list[Any] = [int(v) for v in start[:-2]]
    index += [slice(int(start[-2]), int(stop[-2])), slice(int(start[-1]), int(stop[-1]))]
    return tuple(index)


def layer_files(viewer: Any) -> list[tuple[str, str]]:
    """``(what, path)`` of the files the viewer's layers were opened from.

    A widget's save path may not be one of them (:func:`napari_wpp.io.check_not_an_input`).
    """
    files = []
    for layer in getattr(viewer, "layers", ()):
        path = getattr(getattr(layer, "source", None), "path", None)
        if path:
            files.append((f"file of layer {layer.name!r}", str(path)))
    return files


def add_or_update_kernel(viewer: Any, estimate: Any, source: dict[str, Any]) -> Any:
    """Add or update the image layer ``"<LR name> kernel"`` of an estimated operator.

    Parameters
    ----------
    viewer
        The napari viewer.
    estimate
        The :class:`~napari_wpp.core.operators.OperatorEstimate`.
    source
        The estimation's source record (``hr`` and ``lr`` layer names and regions); it goes
        into the layer's metadata. The kernel sits just above the HR layer, at its pixel size.
    """
    kernel = np.asarray(estimate.kernel, dtype=np.float32)
    scale, translate = (1.0, 1.0), (0.0, 0.0)
    if source["hr"] in viewer.layers:
        hr_layer = viewer.layers[source["hr"]]
        scale = tuple(float(abs(s)) for s in hr_layer.scale[-2:])
        corner = np.asarray(hr_layer.data_to_world([0.0] * hr_layer.ndim), dtype=np.float64)
        translate = (float(corner[-2]) - (kernel.shape[0] + 4) * scale[0], float(corner[-1]))
    fit = {
        "kernel_sum": estimate.kernel_sum,
        "bias": estimate.bias,
        "residual_rms": estimate.residual_rms,
        "method": estimate.method,
    }
    return add_or_update_image(
        viewer,
        f"{source['lr']} kernel",
        kernel,
        scale=scale,
        translate=translate,
        metadata={PROVENANCE_KEY: {"role": "kernel", **fit, **source}},
        colormap="magma",
    )


def slice_region(viewer: Any, layer: Any, shapes_name: str) -> tuple[int | None, slice, slice]:
    """The slice shown of ``layer`` (``None`` for 2D) and the rows and columns under the
    rectangle of the Shapes layer ``shapes_name`` (``""``: the whole slice); see
    :func:`region_slices` for the errors."""
    shapes = chosen_layer(viewer, shapes_name, "Shapes layer") if shapes_name else None
    rows, cols = region_slices(layer, shapes)
    index = current_index(layer, viewer, 0) if layer.ndim == 3 else None
    return index, rows, cols
