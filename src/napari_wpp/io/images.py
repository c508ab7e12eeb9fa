"""Images and stacks: PNG and TIFF with their physical pixel size."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_wpp.core.errors import InputError
from napari_wpp.core.intensity import check_finite

if TYPE_CHECKING:
    pass
from napari_wpp.io.files import atomic_write, one_line
from napari_wpp.io.library_warnings import caught_library_warnings, folded

PNG_EXTENSIONS = (".png",)
TIFF_EXTENSIONS = (".tif", ".tiff")
IMAGE_EXTENSIONS = PNG_EXTENSIONS + TIFF_EXTENSIONS

# micrometres per unit of the TIFF ResolutionUnit tag
_RESUNIT_UM = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}
_UNIT_ALIASES = {
    "micron": "µm",
    "microns": "µm",
    "um": "µm",
    "\\u00b5m": "µm",
    "μm": "µm",  # Greek mu
    "µm": "µm",  # micro sign
}
_IMAGEJ_DTYPES = ("uint8", "uint16", "float32")

#: Environment variable that sets the most pixels (values) an image may decode to.
MAX_PIXELS_ENV = "NAPARI_WPP_MAX_PIXELS"
#: The default of :data:`MAX_PIXELS_ENV`: 2**31 values (8 GiB as float32).
DEFAULT_MAX_PIXELS = 2**31


def max_pixels() -> int:
    """The most values an image may decode to: ``$NAPARI_WPP_MAX_PIXELS`` or the default."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(text))
    except (ValueError, OverflowError):
        raise InputError(
            f"{MAX_PIXELS_ENV}={text!r} is not a number: set it to a pixel count, e.g. "
            f"{MAX_PIXELS_ENV}={DEFAULT_MAX_PIXELS}"
        ) from None
    return max(value, 1)


def check_decoded_size(path: Path, shape: tuple[int, ...], dtype: Any) -> None:
    """Refuse an image whose header promises more than :func:`max_pixels` values."""
    count = math.prod(int(n) for n in shape)
    limit = max_pixels()
    if count > limit:
        size = count * np.dtype(dtype).itemsize
        raise InputError(
            f"{path.name} decodes to {'×'.join(str(int(n)) for n in shape)} = {count} values "
            f"({size / 2**30:.1f} GiB), more than the limit of {limit}: crop the image, or "
            f"raise the limit with {MAX_PIXELS_ENV}=N if you have the memory"
        )


@dataclass
class ImageData:
    """An image or stack with its physical pixel size.

    Attributes
    ----------
    array
        ``(H, W)`` or ``(Z, H, W)`` array in the file's dtype.
    pixel_size
        Physical ``(y, x)`` size of one pixel, or ``None`` when the file does not say.
    unit
        Unit of ``pixel_size`` (``"µm"``, ...), or ``None``.
    path
        File the image was read from.
    """

    array: np.ndarray
    pixel_size: tuple[float, float] | None = None
    unit: str | None = None
    path: Path | None = None


def _normalise_unit(unit: Any) -> str | None:
    if unit is None:
        return None
    if isinstance(unit, bytes):
        unit = unit.decode("utf-8", "replace")
    unit = str(unit).strip()
    if "\\u" in unit:
        try:
            unit = unit.encode("ascii").decode("unicode_escape")
        except (UnicodeError, ValueError):
            pass
    if not unit or unit.lower() in ("pixel", "pixels", "none"):
        return None
    return _UNIT_ALIASES.get(unit.lower(), unit)


def _ascii(text: str) -> str:
    return "".join(c if ord(c) < 128 else f"\\u{ord(c):04x}" for c in text)


def _round_size(value: float) -> float:
    """Round away the rational encoding error of TIFF resolution tags (10 significant digits)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, 9 - int(math.floor(math.log10(abs(value)))))


def _to_greyscale(array: np.ndarray, path: Path) -> np.ndarray:
    """Turn a ``(H, W, C)`` image whose colour channels are equal into ``(H, W)``."""
    channels = array.shape[-1]
    if channels in (2, 4):  # grey/colour plus alpha: only a fully opaque alpha is ignored
        alpha = array[..., -1]
        if np.issubdtype(array.dtype, np.integer):
            opaque = np.iinfo(array.dtype).max
        else:
            opaque = 1.0
        if not np.all(alpha == opaque):
            raise InputError(
                f"{path.name} has transparent pixels: save it as a greyscale image without alpha"
            )
        array = array[..., :-1]
    first = array[..., 0]
    for c in range(1, array.shape[-1]):
        if not np.array_equal(array[..., c], first):
            raise InputError(
                f"{path.name} is a colour image: convert it to greyscale (one channel) first"
            )
    return np.ascontiguousarray(first)


def _check_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise InputError(
            f"unsupported image file type {path.suffix or '(none)'!r} for {path.name}: "
            "use .png, .tif or .tiff"
        )
    if not path.exists():
        raise InputError(f"image file {path} does not exist: check the path")
    if not path.is_file():
        raise InputError(f"{path} is not a file: give the path of a PNG or TIFF image")
    return path


def _read_png(path: Path) -> tuple[np.ndarray, tuple[float, float] | None, str | None]:
    import imageio.v3 as iio
    from PIL import Image

    with Image.open(path) as header:  # reads the header only
        width, height = header.size
        bands = len(header.getbands())
    check_decoded_size(path, (height, width, bands), np.uint16 if bands == 1 else np.uint8)
    array = np.asarray(iio.imread(path, plugin="pillow"))
    if array.ndim == 3 and array.shape[-1] in (2, 3, 4):
        array = _to_greyscale(array, path)
    return array, None, None


def _tiff_pixel_size(tif: Any) -> tuple[tuple[float, float] | None, str | None]:
    page = tif.pages.first
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        xres = yres = None
    else:
        try:
            xres, yres = page.get_resolution(scale=1.0)
        except Exception:  # noqa: BLE001 - malformed tags: ignore the resolution
            xres = yres = None
    resunit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    valid = xres is not None and xres > 0 and yres > 0 and math.isfinite(xres * yres)

    shaped = tif.shaped_metadata[0] if tif.is_shaped and tif.shaped_metadata else None
    if isinstance(shaped, dict) and "pixel_size" in shaped:
        try:
            py, px = (float(v) for v in shaped["pixel_size"])
            return (py, px), _normalise_unit(shaped.get("unit"))
        except (TypeError, ValueError):
            pass
    if tif.is_imagej:
        meta = tif.imagej_metadata or {}
        unit = _normalise_unit(meta.get("unit"))
        if valid and (unit is not None or (xres, yres) != (1.0, 1.0)):
            return (_round_size(1.0 / yres), _round_size(1.0 / xres)), unit
        return None, None
    if not valid:
        return None, None
    if resunit in _RESUNIT_UM:
        um = _RESUNIT_UM[resunit]
        return (_round_size(um / yres), _round_size(um / xres)), "µm"
    if (xres, yres) == (1.0, 1.0):
        return None, None
    return (_round_size(1.0 / yres), _round_size(1.0 / xres)), None


def _read_tiff(path: Path) -> tuple[np.ndarray, tuple[float, float] | None, str | None]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise InputError(f"{path.name} contains no image data: check the file")
        series = tif.series[0]
        check_decoded_size(path, tuple(series.shape), series.dtype)
        array = np.asarray(series.asarray())
        axes = series.axes
        pixel_size, unit = _tiff_pixel_size(tif)
    if axes.startswith("S") and array.ndim == 3:
        # Planar "samples" in front of Y, X: what tifffile writes by default for a stack of
        # 3 or 4 slices (tagged RGB). Scans of materials are not colour: keep it as a stack.
        axes = "Z" + axes[1:]
    if "S" in axes and array.shape[axes.index("S")] > 1:
        s = axes.index("S")
        array = np.moveaxis(array, s, -1)
        axes = axes[:s] + axes[s + 1 :] + "S"
        if array.shape[-1] > 4:
            raise InputError(
                f"{path.name} has {array.shape[-1]} samples per pixel: save one channel"
            )
        array = _to_greyscale(array, path)
        axes = axes[:-1]
    keep = tuple(i for i, n in enumerate(array.shape) if n != 1)
    if len(keep) >= 2:
        array = array.reshape(tuple(array.shape[i] for i in keep))
    elif array.ndim > 2:
        array = array.reshape(array.shape[-2:])
    return array, pixel_size, unit


def read_image(path: str | Path) -> ImageData:
    """Read a greyscale PNG or TIFF image or ``(Z, Y, X)`` TIFF stack.

    Parameters
    ----------
    path
        ``.png``, ``.tif`` or ``.tiff`` file.

    Returns
    -------
    ImageData
        The array in the file's dtype and the physical pixel size when the file records one
        (TIFF resolution tags or ImageJ metadata).

    Raises
    ------
    InputError
        Missing, unreadable or corrupt file, unsupported extension, colour data, not 2D/3D,
        or NaN/Inf pixels.
    """
    path = _check_path(path)
    reader = _read_png if path.suffix.lower() in PNG_EXTENSIONS else _read_tiff
    with caught_library_warnings() as library_said:  # dropped when the read succeeds
        try:
            array, pixel_size, unit = reader(path)
        except InputError:
            raise
        except MemoryError:
            raise InputError(
                f"{path.name} is too large to load into memory: use a smaller crop"
            ) from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file for the user
            raise InputError(
                f"cannot read {path.name} ({one_line(exc)}{folded(library_said)}): check that "
                "it is a valid, complete PNG/TIFF file"
            ) from None
    if array.dtype.kind not in "uif":
        raise InputError(
            f"{path.name} has unsupported pixel type {array.dtype}: save it as integer or float"
        )
    if array.ndim not in (2, 3) or array.size == 0:
        raise InputError(
            f"{path.name} has shape {array.shape}: need a 2D image (Y, X) or a 3D stack (Z, Y, X)"
        )
    check_finite(array, path.name)
    return ImageData(array=array, pixel_size=pixel_size, unit=unit, path=path)


def write_image(
    path: str | Path,
    array: np.ndarray,
    pixel_size: tuple[float, float] | None = None,
    unit: str | None = None,
) -> Path:
    """Write an image or stack as TIFF, in the array's dtype, atomically.

    Parameters
    ----------
    path
        Target ``.tif``/``.tiff`` file; its directory must exist.
    array
        ``(H, W)``, ``(Z, H, W)`` or ``(K, Z, H, W)`` array of integers or floats.
    pixel_size
        Physical ``(y, x)`` pixel size, recorded in the resolution tags and ImageJ metadata.
    unit
        Unit of ``pixel_size`` (e.g. ``"µm"``).

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() not in TIFF_EXTENSIONS:
        raise InputError(
            f"cannot write {path.name}: images are written as TIFF, use a .tif or .tiff name"
        )
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype.kind not in "uif":
        raise InputError(f"cannot write pixel type {array.dtype}: convert to integer or float")
    if array.ndim not in (2, 3, 4) or array.size == 0:
        raise InputError(
            f"cannot write an array of shape {array.shape}: need (Y, X), (Z, Y, X) or (K, Z, Y, X)"
        )
    if pixel_size is not None:
        try:
            py, px = (float(v) for v in pixel_size)
        except (TypeError, ValueError):
            raise InputError(f"pixel_size {pixel_size!r} invalid: give (y, x) numbers") from None
        if not (py > 0 and px > 0 and math.isfinite(py) and math.isfinite(px)):
            raise InputError(f"pixel_size {pixel_size!r} invalid: give positive finite sizes")
    unit = _normalise_unit(unit)
    axes = "YX" if array.ndim == 2 else ("ZYX" if array.ndim == 3 else "TZYX")
    array = np.ascontiguousarray(array)

    def writer(tmp: Path) -> None:
        with caught_library_warnings():  # e.g. tifffile's notes on metadata: not for users
            _write_tiff(tmp)

    def _write_tiff(tmp: Path) -> None:
        import tifffile

        kwargs: dict[str, Any] = {}
        if pixel_size is not None:
            kwargs["resolution"] = (1.0 / px, 1.0 / py)
        if array.dtype.name in _IMAGEJ_DTYPES:
            metadata: dict[str, Any] = {"axes": axes}
            if unit is not None:  # ImageJ wants ASCII; it shows "micron" as µm
                metadata["unit"] = "micron" if unit == "µm" else _ascii(unit)
            tifffile.imwrite(tmp, array, imagej=True, metadata=metadata, **kwargs)
        else:
            metadata = {"axes": axes}
            if pixel_size is not None:
                metadata["pixel_size"] = [py, px]
                metadata["unit"] = unit
                kwargs["resolutionunit"] = "NONE"
            tifffile.imwrite(tmp, array, metadata=metadata, photometric="minisblack", **kwargs)

    return atomic_write(path, writer)
