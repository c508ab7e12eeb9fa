"""Field metadata of the specs and what reads it (defaults, bounds, help lines)."""

from __future__ import annotations

from dataclasses import MISSING, field, fields
from typing import Any

__all__ = [
    "MAX_COUNT",
    "MAX_SEED",
    "bounds",
    "choices_of",
    "default_of",
    "field_meta",
    "help_of",
    "help_text",
    "spec_field",
    "spec_from",
]

#: Largest spin box value of counts in the widgets (batch size, samples).
MAX_COUNT = 4096
#: Largest latent seed (a 32-bit signed integer).
MAX_SEED = 2**31 - 1


def field_meta(help: str, low: float | None = None, high: float | None = None, **extra: Any) -> Any:
    """Metadata of a spec field: its one-line help and inclusive bounds (``None``: open)."""
    data: dict[str, Any] = {"help": help, **extra}
    if low is not None:
        data["min"] = low
    if high is not None:
        data["max"] = high
    return data


def spec_field(
    default: Any, help: str, low: float | None = None, high: float | None = None, **extra: Any
) -> Any:
    """A spec's dataclass field: its default, one-line help and inclusive bounds (``None``:
    open); ``extra`` metadata such as ``choices`` or ``default_text``."""
    return field(default=default, metadata=field_meta(help, low, high, **extra))


def _field(spec: type, name: str) -> Any:
    for item in fields(spec):
        if item.name == name:
            return item
    raise KeyError(f"{spec.__name__} has no field {name!r}")


def default_of(spec: type, name: str) -> Any:
    """The default of the field ``name`` of the spec class ``spec``."""
    item = _field(spec, name)
    if item.default is not MISSING:
        return item.default
    return item.default_factory()  # type: ignore[misc]


def bounds(spec: type, name: str) -> tuple[Any, Any]:
    """``(min, max)`` of a field (``None`` where unbounded)."""
    meta = _field(spec, name).metadata
    return meta.get("min"), meta.get("max")


def help_text(spec: type, name: str) -> str:
    """The field's one-line help followed by ``(default ...)``."""
    meta = _field(spec, name).metadata
    default = meta.get("default_text", default_of(spec, name))
    text = f"{default:g}" if isinstance(default, float) else str(default)
    return f"{meta['help']} (default {text})"


def help_of(spec: type, name: str) -> str:
    """The field's one-line help alone (for options whose default a face does not use)."""
    return str(_field(spec, name).metadata["help"])


def choices_of(spec: type, name: str) -> tuple[Any, ...]:
    """The values a field may take (its ``choices`` metadata)."""
    return tuple(_field(spec, name).metadata["choices"])


def spec_from(source: Any, spec: type, **given: Any) -> Any:
    """A ``spec`` (dataclass) whose fields take the attributes of ``source`` of their names.

    Fields ``source`` lacks keep their defaults; ``given`` sets further fields. ``source`` is
    e.g. parsed command-line options or another spec.
    """
    values = {
        item.name: getattr(source, item.name)
        for item in fields(spec)
        if item.init and hasattr(source, item.name)
    }
    return spec(**{**values, **given})
