"""What every writer shares: atomic replacement, one-line errors, JSON of arrays."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_wpp.core.errors import InputError

if TYPE_CHECKING:
    pass

#: When this process started (about): leftovers of this tool older than this are stale.
PROCESS_STARTED = time.time()
_held_locks: dict[Path, int] = {}
_held_guard = threading.Lock()


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


def _umask() -> int:
    """The process's umask (read without changing it where ``/proc`` tells)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, RuntimeError):
        return False


def check_not_an_input(
    outputs: Iterable[str | Path | None], inputs: Iterable[tuple[str, str | Path | None]]
) -> None:
    """Refuse an output that is one of the inputs (same path, a hard or symbolic link to it).

    Parameters
    ----------
    outputs
        Paths to be written (``None`` entries are skipped).
    inputs
        ``(what, path)`` pairs of the files read, e.g. ``("LR image", "lr.tif")``.

    Raises
    ------
    InputError
        Naming the output, the input it would overwrite and the fix.
    """
    given = [(what, Path(p).expanduser()) for what, p in inputs if p is not None]
    for out in outputs:
        if out is None:
            continue
        out_path = Path(out).expanduser()
        for what, path in given:
            if _same_file(out_path, path):
                raise InputError(
                    f"output {str(out_path)!r} is the {what} {str(path)!r} (the same file): "
                    "choose another output path, it would overwrite the input"
                )


def _temp_patterns(path: Path) -> tuple[str, ...]:
    """Glob patterns of this tool's temporary files for ``path`` (atomic writes, zarr)."""
    return (f".{path.name}.*.part", f".{path.name}.*.partial.zarr")


def remove_stale_leftovers(path: Path) -> list[Path]:
    """Remove this tool's temporary leftovers of ``path`` older than this process.

    What a killed run (``kill -9``) leaves next to its output: ``.NAME.*.part`` files and
    ``.NAME.*.partial.zarr`` folders. Call it while holding :func:`output_lock`. Returns what
    was removed.
    """
    import shutil

    removed = []
    parent = path.parent
    if not parent.is_dir():
        return removed
    for pattern in _temp_patterns(path):
        for leftover in parent.glob(pattern):
            try:
                if leftover.is_symlink() or leftover.lstat().st_mtime >= PROCESS_STARTED:
                    continue
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
                removed.append(leftover)
            except OSError:
                continue
    return removed


def lock_path(path: Path) -> Path:
    """The lock file of output ``path``: ``.NAME.lock`` next to it."""
    return path.with_name(f".{path.name}.lock")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_lock(lock: Path, out: Path) -> None:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _pid_alive(pid):
                raise InputError(
                    f"output {str(out)!r} is being written by another napari-wpp run "
                    f"(process {pid}): wait for it to end or choose another output path "
                    f"(if no such run exists, delete {str(lock)!r})"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        return
    raise InputError(
        f"cannot lock output {str(out)!r} ({str(lock)!r} keeps reappearing): "
        "choose another output path"
    )


@contextmanager
def output_lock(path: str | Path) -> Iterator[None]:
    """Hold the lock of output ``path`` (re-entrant within this process).

    The lock is a file ``.NAME.lock`` created exclusively next to the output, holding this
    process's id; a lock whose process is gone is stale and taken over. On entry, this
    tool's stale temporary leftovers of the output are removed.

    Raises
    ------
    InputError
        Another live process holds the lock.
    """
    out = Path(path).expanduser()
    key = out.absolute()
    lock = lock_path(out)
    with _held_guard:
        first = _held_locks.get(key, 0) == 0
        owned = True
        if first:
            try:
                _take_lock(lock, out)
            except (FileNotFoundError, PermissionError):
                owned = False  # no folder or a read-only one: the write itself says so
        if owned:
            _held_locks[key] = _held_locks.get(key, 0) + 1
    if owned and first:
        remove_stale_leftovers(out)
    try:
        yield
    finally:
        if owned:
            with _held_guard:
                _held_locks[key] -= 1
                if _held_locks[key] == 0:
                    del _held_locks[key]
                    lock.unlink(missing_ok=True)


def atomic_write(path: Path, writer: Callable[[Path], None]) -> Path:
    """Write via ``writer(tmp)`` to a temporary file next to ``path``, then replace ``path``.

    The temporary file has an unpredictable name and is created exclusively; the output gets
    the permissions the umask allows (like a file the user creates). The output's lock is held
    meanwhile (:func:`output_lock`).
    """
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"output directory {parent} does not exist: create it first")
    if path.is_dir():
        raise InputError(f"output path {path} is a directory: give a file name")
    with output_lock(path):
        fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            writer(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def read_json(path: Path, what: str, fix: str) -> Any:
    """The JSON content of ``path``; a missing, unreadable or malformed file is a one-line
    :class:`InputError` naming ``what`` (e.g. ``"operator file"``) and ``fix``."""
    import json

    if not path.is_file():
        raise InputError(f"{what} {path} does not exist: check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{what} {path.name} is not valid JSON (line {exc.lineno}, column {exc.colno}): {fix}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(
            f"cannot read {what} {path.name} ({one_line(exc)}): check the file"
        ) from None


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
