"""Allocation failures: recognise them (torch's allocators, ``MemoryError``), read the size
asked for from their message, and say it in one line."""

from __future__ import annotations

import re

__all__ = ["allocation_size", "describe_bytes", "is_allocation_failure", "out_of_memory_message"]


_ALLOCATION_PHRASES = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "not enough memory",
    "could not allocate",
    "failed to allocate",
)


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: ``MemoryError``, torch's out-of-memory errors
    (CUDA, MPS) or the ``RuntimeError`` torch's CPU allocator raises."""
    if isinstance(exc, MemoryError):
        return True
    oom_type = type(exc).__name__
    if oom_type == "OutOfMemoryError":  # torch.OutOfMemoryError, torch.cuda.OutOfMemoryError
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(phrase in text for phrase in _ALLOCATION_PHRASES)


def allocation_size(exc: BaseException) -> int | None:
    """Bytes an allocation failure asked for, parsed from its message (``None``: not given).

    torch's CPU allocator says "you tried to allocate N bytes", CUDA "Tried to allocate 2.00
    GiB", MPS "... (N bytes)".
    """
    text = str(exc)
    units = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    match = re.search(r"allocate\s+([0-9.]+)\s*(bytes|[KMGT]iB|B)?", text, re.IGNORECASE)
    if match is None:
        return None
    unit = (match.group(2) or "").lower()
    return int(float(match.group(1)) * units.get("" if unit == "bytes" else unit, 1))


def describe_bytes(size: int) -> str:
    """``size`` bytes as e.g. ``74.5 GiB``."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"  # pragma: no cover - the loop returns


def out_of_memory_message(exc: BaseException, fix: str) -> str:
    """One line for an allocation failure: the size asked for (when known) and ``fix``."""
    size = allocation_size(exc)
    asked = f" (asked for {describe_bytes(size)})" if size is not None else ""
    return f"out of memory{asked}: {fix}"
