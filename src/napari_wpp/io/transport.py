"""Transport files: the patch statistics of a Gaussian patch transport as JSON.

A transport file holds the source and target patch statistics (count, mean, covariance, in
float64 as JSON numbers, which round-trip exactly), the patch size, the eigenvalue floor, the
intensity normalisation of the source images, the reference's self-distance band and a
provenance mapping. The map ``T`` is rebuilt from the statistics when the file is read, so a
whole volume is transported with one map. Every defect of a file is a one-line
:class:`InputError` naming the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_wpp.core.errors import InputError
from napari_wpp.io.files import atomic_write, json_default, one_line, read_json

__all__ = [
    "TRANSPORT_FORMAT",
    "TRANSPORT_FORMAT_VERSION",
    "TransportFile",
    "read_transport",
    "write_transport",
]

TRANSPORT_FORMAT = "napari-wpp-transport"
TRANSPORT_FORMAT_VERSION = 1
_FIX = "fit it again with 'napari-wpp transport fit'"


@dataclass(frozen=True)
class TransportFile:
    """What a transport file holds.

    Attributes
    ----------
    transport
        The :class:`~napari_wpp.core.transport.GaussianTransport` (rebuilt from the statistics).
    normalisation
        The intensity normalisation of the source images (a ``Normalisation`` dict) or ``None``.
    band
        The reference's self-distance band (``ReferenceBand.to_dict()``) or ``None``.
    provenance
        Where the statistics came from (files, version, ...).
    """

    transport: Any
    normalisation: dict[str, Any] | None = None
    band: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def _statistics_dict(stats: Any) -> dict[str, Any]:
    return {
        "count": int(stats.count),
        "mean": stats.mean.tolist(),
        "covariance": stats.covariance.tolist(),
    }


def write_transport(path: str | Path, content: TransportFile) -> Path:
    """Write ``content`` as a JSON transport file, atomically."""
    transport = content.transport
    d = {
        "format": TRANSPORT_FORMAT,
        "format_version": TRANSPORT_FORMAT_VERSION,
        "patch_size": int(transport.patch_size),
        "floor": float(transport.floor),
        "source": _statistics_dict(transport.source),
        "target": _statistics_dict(transport.target),
        "normalisation": content.normalisation,
        "band": content.band,
        "provenance": dict(content.provenance),
    }
    text = json.dumps(d, default=json_default, allow_nan=False) + "\n"
    path = Path(path).expanduser()

    def writer(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return atomic_write(path, writer)


def _statistics(d: Any, patch_size: int, which: str, name: str) -> Any:
    from napari_wpp.core.transport import PatchStatistics

    if not isinstance(d, dict):
        raise InputError(f"transport file {name} has no {which} statistics: {_FIX}")
    try:
        mean = np.asarray(d["mean"], dtype=np.float64)
        cov = np.asarray(d["covariance"], dtype=np.float64)
        count = int(d["count"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(
            f"transport file {name} has unreadable {which} statistics ({one_line(exc)}): {_FIX}"
        ) from None
    try:
        return PatchStatistics(patch_size, count, mean, cov)
    except InputError as exc:
        raise InputError(f"transport file {name}, {which} statistics: {exc}") from None


def read_transport(path: str | Path) -> TransportFile:
    """Read a transport file written by :func:`write_transport`.

    Raises
    ------
    InputError
        Missing file, malformed JSON, another format or version, statistics of the wrong
        size or with non-finite values.
    """
    from napari_wpp.core.transport import GaussianTransport

    path = Path(path).expanduser()
    name = path.name
    d = read_json(path, "transport file", _FIX)
    if not isinstance(d, dict) or d.get("format") != TRANSPORT_FORMAT:
        raise InputError(f"{name} is not a napari-wpp transport file: {_FIX}")
    version = d.get("format_version")
    if version != TRANSPORT_FORMAT_VERSION:
        raise InputError(
            f"transport file {name} has format version {version!r}, this napari-wpp reads "
            f"{TRANSPORT_FORMAT_VERSION}: update napari-wpp or {_FIX}"
        )
    patch_size = d.get("patch_size")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise InputError(f"transport file {name} has an invalid patch size {patch_size!r}: {_FIX}")
    source = _statistics(d.get("source"), patch_size, "source", name)
    target = _statistics(d.get("target"), patch_size, "target", name)
    floor = d.get("floor")
    if isinstance(floor, bool) or not isinstance(floor, (int, float)):
        raise InputError(f"transport file {name} has an invalid floor {floor!r}: {_FIX}")
    try:
        transport = GaussianTransport.fit(source, target, float(floor))
    except InputError as exc:
        raise InputError(f"transport file {name}: {exc}") from None
    normalisation = d.get("normalisation")
    band = d.get("band")
    provenance = d.get("provenance")
    return TransportFile(
        transport,
        normalisation if isinstance(normalisation, dict) else None,
        band if isinstance(band, dict) else None,
        provenance if isinstance(provenance, dict) else {},
    )
