"""zarr arrays for volumes that do not fit in memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_wpp.core.errors import InputError

if TYPE_CHECKING:
    pass
from napari_wpp.io.files import json_default, one_line

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
    attributes = json.loads(json.dumps(attrs or {}, default=json_default))
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


class ChunkReadingArray:
    """A zarr array whose reads name it when a chunk cannot be decoded (damaged, truncated).

    Everything else (``shape``, ``dtype``, ``chunks``, ``attrs``, ...) is the array's own.
    """

    def __init__(self, array: Any, path: Path) -> None:
        self._array = array
        self._path = path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # e.g. while unpickling, before __init__
            raise AttributeError(name)
        return getattr(self._array, name)

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return ("napari-wpp-zarr", tokenize(self._array))

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, key: Any) -> Any:
        try:
            return self._array[key]
        except (InputError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - a codec's error: the file is damaged
            raise InputError(
                f"zarr array {self._path} has a chunk that cannot be read ({one_line(exc)}): "
                "the array is damaged; write it again or restore it from a copy"
            ) from None


def open_zarr_for_reading(path: str | Path) -> ChunkReadingArray:
    """:func:`open_zarr_array` whose reads name the array when a chunk is damaged."""
    return ChunkReadingArray(open_zarr_array(path), Path(path).expanduser())
