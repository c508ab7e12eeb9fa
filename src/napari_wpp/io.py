"""Reading and writing images (PNG, TIFF), forward operators (JSON) and model files.

Every user mistake (missing or corrupt file, wrong extension, unsupported shape, NaN pixels)
raises :class:`napari_wpp.core.errors.InputError` with a one-line message naming the fix.
Writes are atomic: the data goes to a temporary file in the target directory, which then
replaces the target, so an interrupted write never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_wpp.core.errors import InputError
from napari_wpp.core.intensity import check_finite

if TYPE_CHECKING:
    from napari_wpp.core.operators import ForwardOperator
    from napari_wpp.core.training import TrainingState

__all__ = [
    "ImageData",
    "read_image",
    "write_image",
    "read_operator",
    "write_operator",
    "IMAGE_EXTENSIONS",
    "save_model",
    "load_model",
    "read_model_metadata",
    "MODEL_SUFFIX",
    "open_zarr_array",
    "create_zarr_array",
    "atomic_write",
    "explained_write_errors",
    "one_line",
]

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


def one_line(what: object, limit: int | None = None) -> str:
    """``what`` on one line (whitespace collapsed), cut to ``limit`` characters.

    An exception reads ``"<type>: <message>"`` and is cut to 160 characters unless told.
    """
    text = " ".join(str(what).split())
    if isinstance(what, BaseException):
        limit = 160 if limit is None else limit
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    if isinstance(what, BaseException):
        return f"{type(what).__name__}: {text}" if text else type(what).__name__
    return text


@contextmanager
def explained_write_errors(path: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` into a one-line :class:`InputError`."""
    try:
        yield
    except OSError as exc:
        raise InputError(
            f"cannot write {str(path)!r} ({one_line(str(exc))}): check the path"
        ) from exc


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
            f"cannot read {path.name} ({one_line(exc)}): check that it is a valid, "
            "complete PNG/TIFF file"
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


def atomic_write(path: Path, writer: Callable[[Path], None]) -> Path:
    """Write via ``writer(tmp)`` to a temporary file next to ``path``, then replace ``path``."""
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"output directory {parent} does not exist: create it first")
    if path.is_dir():
        raise InputError(f"output path {path} is a directory: give a file name")
    fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "detach"):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def read_operator(path: str | Path) -> ForwardOperator:
    """Read a forward operator from a JSON file written by :func:`write_operator`.

    A file whose ``"operator"`` entry is a mapping (model metadata) is also accepted.

    Raises
    ------
    InputError
        Missing file, malformed JSON, or no valid operator description.
    """
    from napari_wpp.core.operators import operator_from_dict

    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"operator file {path} does not exist: check the path")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(
            f"operator file {path.name} is not valid JSON (line {exc.lineno}, column {exc.colno}):"
            " fix it or write it again with estimate-operator"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(
            f"cannot read operator file {path.name} ({one_line(exc)}): check the file"
        ) from None
    if isinstance(d, dict) and isinstance(d.get("operator"), dict):
        d = d["operator"]
    if not isinstance(d, dict):
        raise InputError(
            f"operator file {path.name} does not hold a JSON object: write it with write_operator"
        )
    try:
        return operator_from_dict(d)
    except InputError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(
            f"operator file {path.name} does not describe a valid operator ({one_line(exc)}): "
            "write it again with estimate-operator"
        ) from None


def write_operator(
    path: str | Path, operator: ForwardOperator, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``operator.to_dict()`` plus ``extra`` entries as a JSON file, atomically.

    Parameters
    ----------
    path
        Target ``.json`` file; its directory must exist.
    operator
        Forward operator with a ``to_dict()`` method.
    extra
        Additional JSON-serialisable entries (e.g. fit statistics); they must not reuse the
        operator's own keys.
    """
    path = Path(path).expanduser()
    d = dict(operator.to_dict())
    if extra:
        clash = sorted(set(extra) & set(d))
        if clash:
            raise InputError(f"extra entries {clash} clash with operator fields: rename them")
        d.update(extra)
    text = json.dumps(d, indent=2, default=_json_default, allow_nan=False) + "\n"

    def writer(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return atomic_write(path, writer)


# --------------------------------------------------------------------------- model files
#: File suffix of model files.
MODEL_SUFFIX = ".safetensors"
#: Name in the ``format`` entry of the metadata and the current format version.
MODEL_FORMAT = "napari-wpp-model"
MODEL_FORMAT_VERSION = 1
#: Key of the JSON metadata in the safetensors header.
MODEL_METADATA_KEY = "napari_wpp"
#: Model files keep at most this many per-step history records (evenly thinned).
MAX_HISTORY = 2000


def _cpu_copy(tensor: Any) -> Any:
    """A detached, contiguous CPU copy that shares no memory with ``tensor``."""
    return tensor.detach().to("cpu").contiguous().clone()


def _plain_json(obj: Any) -> Any:
    """JSON-ready copy of ``obj``: arrays and tensors as lists, non-finite floats as ``None``."""
    plain = json.loads(json.dumps(obj, default=_json_default))

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(plain)


def _thin_history(history: list[dict[str, float]], limit: int = MAX_HISTORY) -> list[dict]:
    """At most ``limit`` evenly spaced records, always keeping the first and the last."""
    n = len(history)
    if n <= limit:
        return list(history)
    keep = np.unique(np.round(np.linspace(0, n - 1, limit)).astype(int))
    return [history[int(i)] for i in keep]


def save_model(path: str | Path, state: TrainingState, include_training_state: bool = True) -> Path:
    """Write a trained model as one self-describing ``.safetensors`` file, atomically.

    Tensors are stored as ``model.<name>`` (weights), ``prior.<i>.<name>`` (ψ states),
    ``optimizer.<param index>.<name>`` (Adam moments) and ``rng``; everything else goes as
    JSON into the header metadata under ``"napari_wpp"`` (format and package version, model
    kind and configuration, operator, λ, training configuration, step, normalisation,
    optimizer parameter groups, thinned loss history, creation time).

    Parameters
    ----------
    path
        Target file ending in ``.safetensors``; its directory must exist.
    state
        A :class:`napari_wpp.core.training.TrainingState`; it is not modified.
    include_training_state
        ``False`` leaves out ψ, optimizer and random state: a small file that can be used
        for prediction but not to resume training.

    Returns
    -------
    Path
        The written file.
    """
    import torch
    from safetensors.torch import save_file

    import napari_wpp

    path = Path(path).expanduser()
    if path.suffix.lower() != MODEL_SUFFIX:
        raise InputError(
            f"cannot write model file {path.name}: model files end in {MODEL_SUFFIX}, "
            f"use a name like {path.stem or 'model'}{MODEL_SUFFIX}"
        )
    if not hasattr(state, "model") or not hasattr(state.model, "state_dict"):
        raise InputError("save_model needs a TrainingState with a model: pass a training state")

    tensors: dict[str, Any] = {}
    for name, value in state.model.state_dict().items():
        tensors[f"model.{name}"] = _cpu_copy(value)
    priors = list(state.priors or []) if include_training_state else []
    for i, prior in enumerate(priors):
        for name, value in prior.items():
            tensors[f"prior.{i}.{name}"] = _cpu_copy(value)
    optimizer_meta = None
    if include_training_state and state.optimizer is not None:
        extra: dict[str, dict[str, Any]] = {}
        for index, param_state in state.optimizer.get("state", {}).items():
            for name, value in param_state.items():
                if hasattr(value, "detach"):
                    tensors[f"optimizer.{int(index)}.{name}"] = _cpu_copy(value)
                else:
                    extra.setdefault(str(int(index)), {})[name] = value
        optimizer_meta = {
            "param_groups": state.optimizer.get("param_groups", []),
            "extra_state": extra,
        }
    if include_training_state and state.rng is not None:
        tensors["rng"] = _cpu_copy(state.rng)

    model_config = dict(state.model_config or {})
    operator = state.operator
    scale = model_config.get("scale", operator.get("scale") if isinstance(operator, dict) else None)
    history = list(state.history or [])
    meta = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "napari_wpp_version": napari_wpp.__version__,
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kind": str(state.kind),
        "scale": scale,
        "model_config": model_config,
        "operator": operator,
        "lam": state.lam,
        "config": state.config,
        "step": int(state.step),
        "elapsed_s": float(state.elapsed_s),
        "normalisation": state.normalisation,
        "training_state": bool(include_training_state),
        "n_priors": len(priors),
        "optimizer": optimizer_meta,
        "history": _thin_history(history),
        "history_length": len(history),
        "mean_frozen": bool(state.mean_frozen),
    }
    text = json.dumps(_plain_json(meta), allow_nan=False, separators=(",", ":"))

    def writer(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={MODEL_METADATA_KEY: text})

    return atomic_write(path, writer)


def _check_model_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"model file {path} does not exist: check the path")
    if not path.is_file():
        raise InputError(f"{path} is not a file: give the path of a {MODEL_SUFFIX} model file")
    return path


def _parse_model_metadata(path: Path, header: dict[str, str] | None) -> dict[str, Any]:
    """Validate the ``napari_wpp`` header entry of a safetensors file and return it."""
    foreign = (
        f"{path.name} is not a napari-wpp model file (no {MODEL_METADATA_KEY} metadata): "
        "train one with `napari-wpp train`"
    )
    if not header or MODEL_METADATA_KEY not in header:
        raise InputError(foreign)
    damaged = f"{path.name} has damaged napari-wpp metadata"
    try:
        meta = json.loads(header[MODEL_METADATA_KEY])
    except (json.JSONDecodeError, TypeError) as exc:
        raise InputError(f"{damaged} ({one_line(exc)}): save or train the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise InputError(foreign)
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{damaged} (format version {version!r}): save or train the model again")
    if version > MODEL_FORMAT_VERSION:
        import napari_wpp

        raise InputError(
            f"{path.name} uses model file format version {version}, but napari-wpp "
            f"{napari_wpp.__version__} reads up to version {MODEL_FORMAT_VERSION}: "
            "update napari-wpp"
        )
    required = {"kind": str, "model_config": dict, "step": int}
    for key, kind in required.items():
        if not isinstance(meta.get(key), kind):
            raise InputError(
                f"{damaged} (entry {key!r} missing or invalid): save or train the model again"
            )
    return meta


def _open_model_file(path: Path, with_tensors: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metadata and (optionally) all tensors of a model file, via ``safe_open`` only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata()
            meta = _parse_model_metadata(path, header)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if with_tensors else {}
    except InputError:
        raise
    except MemoryError:
        raise InputError(f"{path.name} is too large to load into memory") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file for the user
        raise InputError(
            f"cannot read model file {path.name} ({one_line(exc)}): it is truncated, damaged "
            f"or not a {MODEL_SUFFIX} file; save or train the model again"
        ) from None
    return meta, tensors


def read_model_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a model file, without reading its tensors.

    Returns
    -------
    dict
        ``format``, ``format_version``, ``napari_wpp_version``, ``kind``, ``scale``,
        ``model_config``, ``operator``, ``lam``, ``config``, ``step``, ``elapsed_s``,
        ``normalisation``, ``training_state``, ``n_priors``, ``optimizer`` (parameter groups),
        ``history`` (thinned), ``history_length``, ``mean_frozen`` (a WPPFlow past its mean
        warm-up), ``created``.

    Raises
    ------
    InputError
        Missing, truncated, corrupt or foreign file, or a format version this package cannot
        read.
    """
    path = _check_model_path(path)
    meta, _ = _open_model_file(path, with_tensors=False)
    return meta


def _damaged(path: Path, what: str) -> InputError:
    """The error of a model file whose metadata does not hold together."""
    return InputError(
        f"model file {path.name} has damaged metadata: {what}; save or train the model again"
    )


def _prior_count(path: Path, meta: dict[str, Any], tensors: dict[str, Any]) -> int:
    """Number of ψ states, derived from the tensors and checked against the metadata."""
    indices = set()
    for key in tensors:
        head, _, rest = key.partition(".")
        index = rest.partition(".")[0]
        if head == "prior" and index.isdigit():
            indices.add(int(index))
    count = max(indices) + 1 if indices else 0
    stated = meta.get("n_priors", 0)
    if not isinstance(stated, int) or isinstance(stated, bool) or stated != count:
        raise _damaged(path, f"n_priors is {stated!r} but the file holds {count} ψ states")
    if len(indices) != count:
        raise _damaged(path, f"the ψ states are numbered {sorted(indices)[:5]}…, not 0…{count - 1}")
    return count


def _check_model_config(
    path: Path, kind: str, model_config: dict[str, Any], weights: dict[str, Any]
) -> None:
    """Bound every value of ``model_config`` by what the stored weights can hold.

    A count of repeated parts (blocks, steps, …) cannot exceed the number of weight tensors,
    a width cannot exceed the largest weight tensor: a crafted file cannot make the model
    builder spend minutes or gigabytes before the shapes are compared.
    """
    from napari_wpp.core.models import MODEL_COUNT_OPTIONS

    n_tensors = len(weights)
    largest = max((int(v.numel()) for v in weights.values()), default=0)
    counts = MODEL_COUNT_OPTIONS.get(kind, ())
    for name, value in model_config.items():
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if not isinstance(value, (int, float)):
            raise _damaged(path, f"model_config {name} is {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise _damaged(path, f"model_config {name} is {value!r}")
        limit = n_tensors if name in counts else largest
        if abs(value) > max(limit, 64):
            raise _damaged(
                path, f"model_config {name} = {value!r} does not fit the {n_tensors} stored tensors"
            )


def _expected_shapes(path: Path, kind: str, model_config: dict[str, Any]) -> dict[str, Any]:
    """Parameter and buffer shapes of the configured model, built on the meta device."""
    import torch

    from napari_wpp.core.models import build_model

    try:
        with torch.device("meta"):
            model = build_model(kind, **model_config)
    except (InputError, ValueError, TypeError, RuntimeError) as exc:
        raise InputError(
            f"{path.name} has an invalid {kind} configuration {model_config} "
            f"({one_line(exc)}): save or train the model again"
        ) from None
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def _split_tensors(
    path: Path, tensors: dict[str, Any], n_priors: int
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[int, dict[str, Any]], Any]:
    weights: dict[str, Any] = {}
    priors: list[dict[str, Any]] = [{} for _ in range(n_priors)]
    optimizer: dict[int, dict[str, Any]] = {}
    rng = None
    for key, value in tensors.items():
        head, _, rest = key.partition(".")
        ok = True
        if head == "model" and rest:
            weights[rest] = value
        elif head in ("prior", "optimizer") and rest:
            index, _, name = rest.partition(".")
            ok = index.isdigit() and bool(name)
            if ok and head == "prior":
                ok = int(index) < n_priors
                if ok:
                    priors[int(index)][name] = value
            elif ok:
                optimizer.setdefault(int(index), {})[name] = value
        elif key == "rng":
            rng = value
        else:
            ok = False
        if not ok:
            raise InputError(
                f"{path.name} holds an unexpected tensor {key!r}: the file is damaged or was "
                "edited; save or train the model again"
            )
    return weights, priors, optimizer, rng


def _optimizer_state(
    path: Path, opt_meta: Any, opt_tensors: dict[int, dict[str, Any]]
) -> dict[str, Any] | None:
    """torch's optimizer ``state_dict`` from its metadata and tensors (``None``: not saved)."""
    if not isinstance(opt_meta, dict):
        if opt_tensors:
            raise InputError(
                f"{path.name} holds optimizer tensors without their parameter groups: the file "
                "is damaged; save the model again"
            )
        return None
    state: dict[int, dict[str, Any]] = {i: dict(v) for i, v in opt_tensors.items()}
    extra = opt_meta.get("extra_state") or {}
    groups_meta = opt_meta.get("param_groups") or []
    if not isinstance(extra, dict) or not isinstance(groups_meta, list):
        raise _damaged(path, "the optimizer entry is not the saved layout")
    for index, values in extra.items():
        if not str(index).isdigit() or not isinstance(values, dict):
            raise _damaged(path, f"optimizer state {index!r} is not a parameter index")
        state.setdefault(int(index), {}).update(values)
    groups = []
    for group in groups_meta:
        if not isinstance(group, dict):
            raise _damaged(path, "an optimizer parameter group is not a record")
        groups.append(
            {
                key: (tuple(value) if isinstance(value, list) and key != "params" else value)
                for key, value in group.items()
            }
        )
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def load_model(path: str | Path, device: str = "cpu") -> TrainingState:
    """Read a model file written by :func:`save_model` (never unpickles anything).

    Parameters
    ----------
    path
        ``.safetensors`` model file.
    device
        Device of the returned model (``"cpu"``, ``"cuda"``, ``"auto"``, ...). ψ states,
        optimizer and random state stay on the CPU.

    Returns
    -------
    TrainingState
        The model rebuilt from its kind and configuration, with its weights, in eval mode;
        ``priors``, ``optimizer`` (torch's ``state_dict`` layout) and ``rng`` when the file
        holds the training state (else ``[]``, ``None``, ``None``).

    Raises
    ------
    InputError
        Missing, truncated, corrupt or foreign file, unknown format version or model kind,
        or weights that do not fit the model configuration.
    """
    from napari_wpp.core.devices import resolve_device
    from napari_wpp.core.models import MODEL_KINDS, build_model
    from napari_wpp.core.training import TrainingState

    path = _check_model_path(path)
    target = resolve_device(device)
    meta, tensors = _open_model_file(path, with_tensors=True)
    kind, model_config = meta["kind"], meta["model_config"]
    if kind == "wppflow" and isinstance(model_config, dict):
        model_config.setdefault("edge_shifts", 0)  # files from before EdgeShift steps
        model_config.setdefault("edge_gain", 1.0)  # files from before their gain
    if kind not in MODEL_KINDS:
        raise InputError(
            f"{path.name} holds a model of unknown kind {kind!r}: update napari-wpp "
            f"(this version knows {', '.join(MODEL_KINDS)})"
        )
    n_priors = _prior_count(path, meta, tensors)
    weights, priors, opt_tensors, rng = _split_tensors(path, tensors, n_priors)
    _check_model_config(path, kind, model_config, weights)
    expected = _expected_shapes(path, kind, model_config)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(
        k for k in set(expected) & set(weights) if expected[k] != tuple(weights[k].shape)
    )
    if missing or unexpected or wrong:
        parts = []
        problems = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        for label, names in problems:
            if names:
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                parts.append(f"{label}: {', '.join(names[:3])}{more}")
        raise InputError(
            f"the weights in {path.name} do not fit its {kind} configuration {model_config} "
            f"({'; '.join(parts)}): the file is damaged or was edited; save the model again"
        )
    optimizer = _optimizer_state(path, meta.get("optimizer"), opt_tensors)
    elapsed_s = meta.get("elapsed_s") or 0.0
    lam = meta.get("lam")
    history = meta.get("history") or []
    if isinstance(elapsed_s, bool) or not isinstance(elapsed_s, (int, float)):
        raise _damaged(path, f"elapsed_s is {elapsed_s!r}")
    if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float))):
        raise _damaged(path, f"lam is {lam!r}")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise _damaged(path, "history is not a list of records")

    model = build_model(kind, **model_config)  # the shapes fit: as large as the file
    model.load_state_dict(weights, strict=True)
    model.to(target).eval()

    return TrainingState(
        kind=kind,
        model=model,
        model_config=model_config,
        operator=meta.get("operator") or {},
        lam=float(lam) if lam is not None else 0.0,
        config=meta.get("config") or {},
        step=meta["step"],
        elapsed_s=float(elapsed_s),
        normalisation=meta.get("normalisation"),
        priors=priors,
        optimizer=optimizer,
        rng=rng,
        history=list(history),
        mean_frozen=meta.get("mean_frozen") is True,
    )


# --------------------------------------------------------------------------- zarr volumes
#: zarr attribute with the physical size of one voxel, one number per axis (e.g. µm).
PIXEL_SIZE_ATTR = "pixel_size"
#: zarr attribute with the provenance of a superresolved volume.
PROVENANCE_ATTR = "napari_wpp"


def _import_zarr() -> Any:
    try:
        import zarr
    except ImportError:
        raise InputError(
            "zarr is not installed: install it with pip install 'napari-wpp[large]'"
        ) from None
    return zarr


def _zarr_node_type(path: Path) -> str | None:
    """``"array"``, ``"group"`` or ``None`` from the metadata files of a zarr v2/v3 directory."""
    if (path / ".zarray").is_file():
        return "array"
    if (path / ".zgroup").is_file():
        return "group"
    meta = path / "zarr.json"
    if meta.is_file():
        try:
            node = json.loads(meta.read_text(encoding="utf-8")).get("node_type")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return "unknown"
        return node if node in ("array", "group") else "unknown"
    return None


def open_zarr_array(path: str | Path) -> Any:
    """Open a zarr array (format 2 or 3) read-only, lazily.

    Raises
    ------
    InputError
        Missing path, a file, a plain directory, a zarr group or unreadable metadata.
    """
    zarr = _import_zarr()
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"zarr array {path} does not exist: check the path")
    if not path.is_dir():
        raise InputError(f"{path} is a file, not a zarr array (a directory): check the path")
    node = _zarr_node_type(path)
    if node == "group":
        raise InputError(
            f"{path} is a zarr group, not an array: give the path of an array inside it"
        )
    if node is None:
        raise InputError(f"{path} is not a zarr array (no zarr metadata): check the path")
    try:
        return zarr.open_array(store=str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - any metadata failure is a bad array for the user
        raise InputError(
            f"cannot open zarr array {path} ({one_line(exc)}): check that it is a valid array"
        ) from None


def create_zarr_array(
    path: str | Path,
    shape: tuple[int, ...],
    dtype: Any,
    chunks: tuple[int, ...],
    attrs: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Any:
    """Create an empty zarr array (format 3 where available) for writing, with attributes.

    Parameters
    ----------
    path
        Target directory; its parent must exist. An existing zarr array or group there is
        replaced when ``overwrite``; an existing file or non-empty non-zarr directory is never
        touched.
    shape, dtype, chunks
        Array shape, numpy dtype (integer or float) and chunk shape (clipped to the shape).
    attrs
        JSON-serialisable attributes written with the metadata.

    Returns
    -------
    zarr.Array
        Opened for writing; unwritten chunks read as 0.
    """
    zarr = _import_zarr()
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise InputError(f"output directory {path.parent} does not exist: create it first")
    if path.exists():
        if path.is_dir() and _zarr_node_type(path) is not None:
            if not overwrite:
                raise InputError(f"{path} already exists: choose another output path")
        elif not (path.is_dir() and not any(path.iterdir())):
            raise InputError(
                f"output path {path} exists and is not a zarr array: choose another path"
            )
    dtype = np.dtype(dtype)
    if dtype.kind not in "uif":
        raise InputError(f"cannot write pixel type {dtype} to zarr: use integers or floats")
    shape = tuple(int(n) for n in shape)
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != len(shape) or any(n < 1 for n in shape) or any(c < 1 for c in chunks):
        raise InputError(
            f"invalid zarr shape {shape} / chunks {chunks}: give positive sizes, one per axis"
        )
    chunks = tuple(min(c, n) for c, n in zip(chunks, shape))
    attributes = json.loads(json.dumps(attrs or {}, default=_json_default))
    try:
        if hasattr(zarr, "create_array"):  # zarr >= 3
            return zarr.create_array(
                store=str(path),
                shape=shape,
                dtype=dtype,
                chunks=chunks,
                attributes=attributes,
                overwrite=True,
            )
        array = zarr.open_array(str(path), mode="w", shape=shape, chunks=chunks, dtype=dtype)
        array.attrs.update(attributes)
        return array
    except OSError as exc:
        raise InputError(
            f"cannot create zarr array {path} ({one_line(exc)}): check the path"
        ) from None
