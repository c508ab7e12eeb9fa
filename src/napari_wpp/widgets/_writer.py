"""napari writer contribution: image layers to TIFF with their physical pixel size.

napari calls :func:`write_tiff` (an npe2 single-layer writer) with the layer's data and its
state (``scale``, ``units``, ``rgb``, ``multiscale``, ...). The pixel size of the last two axes
is taken from the layer's scale and, where the layer has physical units, their symbol is
written too, so that :func:`napari_wpp.io.read_image` (and ImageJ) read both back.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_wpp.core.errors import InputError

_NO_UNITS = ("", "pixel", "pixels", "px", "dimensionless")


def _unit_symbol(units: Any) -> str | None:
    """Short symbol (``"µm"``, ``"nm"``) of the in-plane units of a layer, ``None`` for pixels.

    Parameters
    ----------
    units
        The layer's ``units``: a sequence of pint units or strings (one per axis), a single
        unit, or ``None``.
    """
    if units is None:
        return None
    if isinstance(units, str) or not isinstance(units, Sequence):
        in_plane = [units]
    else:
        in_plane = list(units)[-2:]
    symbols = []
    for unit in in_plane:
        try:
            symbol = f"{unit:~}"  # pint: abbreviated form, e.g. micrometer -> µm
        except (TypeError, ValueError):
            symbol = str(unit)
        symbol = symbol.strip()
        symbols.append(None if symbol.lower() in _NO_UNITS else symbol)
    if not symbols or symbols[0] is None:
        return None
    if any(s != symbols[0] for s in symbols):
        raise InputError(
            f"the layer's y and x units differ ({', '.join(str(s) for s in symbols)}): "
            "give both axes the same unit before saving"
        )
    return symbols[0]


def pixel_size_from_layer_state(
    attributes: dict[str, Any],
) -> tuple[tuple[float, float] | None, str | None]:
    """Physical ``(y, x)`` pixel size and unit of a layer from its state dictionary.

    Parameters
    ----------
    attributes
        ``layer._get_state()``-like dict with ``scale`` and optionally ``units``.

    Returns
    -------
    tuple
        ``((y, x), unit)``; the pixel size is ``None`` when the layer has unit scale and no
        physical units (nothing to record).
    """
    scale = attributes.get("scale")
    unit = _unit_symbol(attributes.get("units"))
    if scale is None or len(scale) < 2:
        return None, unit
    size_y, size_x = (float(abs(v)) for v in list(scale)[-2:])
    if (size_y, size_x) == (1.0, 1.0) and unit is None:
        return None, None
    return (size_y, size_x), unit


def write_tiff(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write one image layer to ``path`` (.tif/.tiff) keeping its pixel size and unit.

    Parameters
    ----------
    path
        Target file, ending in ``.tif`` or ``.tiff``.
    data
        The layer data: a numpy-like (or dask) array of 2 to 4 dimensions, or a multiscale list
        (the full-resolution level is written).
    attributes
        The layer state napari passes to writers (``scale``, ``units``, ``rgb``, ``multiscale``).

    Returns
    -------
    list of str
        The written path.

    Raises
    ------
    InputError
        RGB layers, unsupported dimensionality or dtype, or a path that is not a TIFF.
    """
    from napari_wpp.io import write_image

    if attributes.get("rgb"):
        raise InputError(
            "RGB layers are not written by napari-wpp: convert the layer to greyscale first"
        )
    if attributes.get("multiscale") or (
        isinstance(data, (list, tuple)) and data and hasattr(data[0], "shape")
    ):
        data = data[0]
    array = np.asarray(data)
    pixel_size, unit = pixel_size_from_layer_state(attributes)
    written = write_image(Path(path), array, pixel_size=pixel_size, unit=unit)
    return [str(written)]
