"""What every writer shares: atomic replacement, one-line errors, JSON of arrays."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_wpp.core.errors import InputError

if TYPE_CHECKING:
    pass


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


def json_default(obj: Any) -> Any:
    """``json.dumps`` ``default`` for numpy and torch values and paths."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "detach"):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
