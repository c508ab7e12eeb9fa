"""Forward operators from their spec, and what an operator does to the physical pixel size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_wpp.core.config import OperatorSpec
from napari_wpp.core.errors import InputError
from napari_wpp.io import one_line

__all__ = ["build_operator", "describe_operator", "read_operator_file", "scaled_pixel_size"]


def read_operator_file(path_text: str) -> Any:
    """The operator of an operator JSON; every failure is a one-line ``InputError``."""
    from napari_wpp.io import read_operator

    path = Path(path_text).expanduser()
    if not path.is_file():
        raise InputError(f"operator file {path_text!r} does not exist: check the path")
    try:
        operator = read_operator(path)
    except InputError as exc:
        message = str(exc)
        if path.name not in message:
            message = f"operator file {path_text!r}: {message}"
        raise InputError(message) from exc
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise InputError(
            f"operator file {path_text!r} is not a valid operator JSON "
            f"({type(exc).__name__}: {one_line(str(exc))[:120]}): write one with "
            "'napari-wpp estimate-operator' or use --scale/--sigma"
        ) from exc
    scale = getattr(operator, "scale", None)
    if not isinstance(scale, int) or scale < 2:
        raise InputError(
            f"operator file {path_text!r} has scale {scale!r}: the scale must be an integer ≥ 2"
        )
    operator.source = path.name  # named when what the operator produces is refused
    return operator


def build_operator(spec: OperatorSpec) -> Any:
    """The forward operator of ``spec``: its operator file, or the Gaussian operator.

    Raises
    ------
    InputError
        An unreadable operator file or invalid parameters (the message names the fix).
    """
    from napari_wpp.core.operators import GaussianDownsampling

    if spec.path is not None:
        return read_operator_file(spec.path)
    try:
        return GaussianDownsampling(
            spec.scale,
            spec.resolved_sigma,
            kernel_size=spec.kernel_size,
            anchor=spec.anchor,
            padding=spec.padding,
        )
    except InputError:
        raise
    except ValueError as exc:
        raise InputError(f"invalid operator parameters: {one_line(str(exc))}") from exc


def scaled_pixel_size(pixel_size: Any, factor: float) -> Any:
    """Pixel size with its in-plane (last two) axes multiplied by ``factor`` (``None`` stays)."""
    if pixel_size is None:
        return None
    if isinstance(pixel_size, (int, float)):
        return float(pixel_size) * factor
    values = [float(v) for v in pixel_size]
    n = min(2, len(values))
    return type(pixel_size)(values[:-n] + [v * factor for v in values[-n:]]) if n else pixel_size


def describe_operator(operator: Any) -> str:
    """One-line description of a forward operator for the widget."""
    data = operator.to_dict()
    if data.get("kind") == "gaussian":
        sigma = data["sigma"]
        sigma_text = "/".join(f"{s:g}" for s in (sigma if isinstance(sigma, list) else [sigma]))
        return (
            f"Gaussian ×{data['scale']}, σ {sigma_text} px, kernel {data['kernel_size']}, "
            f"{data['anchor']}, {data['padding']}"
        )
    if data.get("kind") == "fourier":
        kernel = np.asarray(data["kernel"])
        return (
            f"estimated ×{data['scale']}, kernel {kernel.shape[0]}×{kernel.shape[1]} "
            f"(sum {kernel.sum():.3f}), bias {data['bias']:.4f}"
        )
    return type(operator).__name__
