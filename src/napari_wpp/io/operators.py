"""Forward operators as JSON files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_wpp.core.errors import InputError

if TYPE_CHECKING:
    from napari_wpp.core.operators import ForwardOperator
from napari_wpp.io.files import atomic_write, json_default, one_line, read_json


def read_operator(path: str | Path) -> ForwardOperator:
    """Read a forward operator from a JSON file written by :func:`write_operator`.

    A file whose ``"operator"`` entry is a mapping (model metadata) is also accepted.

    Raises
    ------
    InputError
        Missing file, malformed JSON, or no valid operator description.
    """
    from napari_wpp.core.operators import operator_from_dict, warn_if_questionable_kernel

    path = Path(path).expanduser()
    d = read_json(path, "operator file", "fix it or write it again with estimate-operator")
    if isinstance(d, dict) and isinstance(d.get("operator"), dict):
        d = d["operator"]
    if not isinstance(d, dict):
        raise InputError(
            f"operator file {path.name} does not hold a JSON object: write it with write_operator"
        )
    try:
        operator = operator_from_dict(d)
    except InputError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(
            f"operator file {path.name} does not describe a valid operator ({one_line(exc)}): "
            "write it again with estimate-operator"
        ) from None
    if isinstance(d.get("kernel"), (list, tuple)):
        warn_if_questionable_kernel(d["kernel"], f"operator file {path.name}")
    return operator


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
    text = json.dumps(d, indent=2, default=json_default, allow_nan=False) + "\n"

    def writer(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return atomic_write(path, writer)
