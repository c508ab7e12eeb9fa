"""Recorded mapping of image intensities of any dtype to float32 in [0, 1] and back.

Integers use the full range of their dtype (uint8 0..255, uint16 0..65535, ...), floats use a
given value range or robust percentiles. The mapping is stored with every model so that outputs
return to the input's dtype and range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_wpp.core.errors import InputError

__all__ = ["Normalisation", "check_finite"]


def _check_dtype(dtype: np.dtype) -> None:
    """Raise ``InputError`` for dtypes that are not real numbers."""
    if dtype.kind == "b":
        raise InputError("image is boolean: convert it to uint8 (0/255) or float before use")
    if dtype.kind not in "uif":
        raise InputError(
            f"unsupported image dtype {dtype}: use an integer or floating point greyscale image"
        )


def check_finite(array: np.ndarray, what: str = "image") -> None:
    """Raise ``InputError`` when a floating point array holds NaN or Inf values.

    Parameters
    ----------
    array
        Array to check (integers are always finite).
    what
        Name used in the message.
    """
    if array.dtype.kind in "fc" and array.size and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise InputError(
            f"{what} contains NaN or Inf pixels ({bad} of {array.size}): "
            "replace them (e.g. numpy.nan_to_num) before use"
        )


@dataclass(frozen=True)
class Normalisation:
    """Affine map of ``[low, high]`` to ``[0, 1]`` that remembers the original dtype.

    Attributes
    ----------
    low, high
        Intensities mapped to 0 and 1.
    dtype
        Name of the original numpy dtype (``"uint8"``, ``"float32"``, ...).
    """

    low: float
    high: float
    dtype: str

    def __post_init__(self) -> None:
        try:
            dtype = np.dtype(self.dtype)
        except TypeError:
            raise InputError(
                f"unknown dtype {self.dtype!r} in normalisation: use a numpy dtype name"
            ) from None
        _check_dtype(dtype)
        low, high = float(self.low), float(self.high)
        if not (np.isfinite(low) and np.isfinite(high)) or high <= low:
            raise InputError(
                f"invalid intensity range [{self.low}, {self.high}]: need finite low < high"
            )
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        object.__setattr__(self, "dtype", dtype.name)

    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        value_range: tuple[float, float] | None = None,
        percentiles: tuple[float, float] = (0.1, 99.9),
    ) -> Normalisation:
        """Choose the normalisation of an image.

        Parameters
        ----------
        array
            Image of any shape; integer or floating point.
        value_range
            ``(low, high)`` for floating point images; overrides the percentiles.
        percentiles
            Percentiles of the pixel values used as range for floating point images.

        Returns
        -------
        Normalisation
            For integers the range of the dtype, for floats ``value_range`` or the percentiles.
            A constant float image gets ``[v, v + 1]``.
        """
        array = np.asarray(array)
        _check_dtype(array.dtype)
        if array.size == 0:
            raise InputError("image is empty: pass an image with at least one pixel")
        check_finite(array)
        if array.dtype.kind in "ui":
            info = np.iinfo(array.dtype)
            return cls(float(info.min), float(info.max), array.dtype.name)
        if value_range is not None:
            low, high = (float(v) for v in value_range)
            if not high > low:
                raise InputError(
                    f"value range {value_range} is empty: give (low, high) with low < high"
                )
            return cls(low, high, array.dtype.name)
        p_low, p_high = (float(p) for p in percentiles)
        if not 0.0 <= p_low < p_high <= 100.0:
            raise InputError(
                f"percentiles {percentiles} invalid: give (low, high) with 0 <= low < high <= 100"
            )
        low, high = np.percentile(array.astype(np.float64, copy=False), [p_low, p_high])
        low, high = float(low), float(high)
        if not high > low:
            high = low + 1.0
        return cls(low, high, array.dtype.name)

    def apply(self, array: np.ndarray, clip: bool = True) -> np.ndarray:
        """Map intensities to float32 ``[0, 1]`` (new array; the input is never modified).

        Parameters
        ----------
        array
            Image in the original intensity scale.
        clip
            Clip the result to ``[0, 1]`` (values outside ``[low, high]`` saturate).
        """
        array = np.asarray(array)
        _check_dtype(array.dtype)
        check_finite(array)
        out = (array.astype(np.float64) - self.low) / (self.high - self.low)
        if clip:
            np.clip(out, 0.0, 1.0, out=out)
        return out.astype(np.float32)

    def invert(self, normalised: np.ndarray) -> np.ndarray:
        """Map float ``[0, 1]`` values back to the original dtype and range.

        Integers are rounded and clipped to the range of their dtype; floats are not clipped.
        Accepts numpy arrays and (CPU or GPU) torch tensors.
        """
        if hasattr(normalised, "detach"):
            normalised = normalised.detach().cpu().numpy()
        normalised = np.asarray(normalised)
        _check_dtype(normalised.dtype)
        if normalised.dtype.kind in "fc" and not np.isfinite(normalised).all():
            # results only come here, computed from inputs checked to be finite
            bad = int(normalised.size - np.count_nonzero(np.isfinite(normalised)))
            raise InputError(
                f"the result has NaN or Inf values ({bad} of {normalised.size}) although the "
                "input is finite: the model or the operator produced them; use another model "
                "file (or train it again) or check the operator"
            )
        dtype = np.dtype(self.dtype)
        out = normalised.astype(np.float64) * (self.high - self.low) + self.low
        if dtype.kind in "ui":
            info = np.iinfo(dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        return out.astype(dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``{"low", "high", "dtype"}``)."""
        return {"low": self.low, "high": self.high, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalisation:
        """Inverse of :meth:`to_dict`; ``InputError`` for missing or invalid entries."""
        if not isinstance(d, dict):
            raise InputError("normalisation must be a mapping with keys low, high and dtype")
        missing = [k for k in ("low", "high", "dtype") if k not in d]
        if missing:
            raise InputError(f"normalisation lacks {', '.join(missing)}: store low, high and dtype")
        try:
            low, high = float(d["low"]), float(d["high"])
        except (TypeError, ValueError):
            raise InputError(
                "normalisation low/high are not numbers: store numeric values"
            ) from None
        return cls(low, high, str(d["dtype"]))
