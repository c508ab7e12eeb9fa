"""The degradation job: an HR image or stack through a forward operator, plus noise.

Both faces get the same rule: the input is normalised by
:meth:`~napari_wpp.core.intensity.Normalisation.from_array`, each slice goes through the
operator (slice ``i`` gets noise from seed ``spec.seed + i``), and the result returns to the
input's dtype and range (clipped to it for integer inputs) with the pixel size multiplied by
the scale.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_wpp.core.config import DegradeSpec
from napari_wpp.core.errors import InputError
from napari_wpp.io import ImageData
from napari_wpp.jobs.notices import JobProgress
from napari_wpp.jobs.operator import scaled_pixel_size
from napari_wpp.jobs.predict import OutputWritten

__all__ = ["DegradeResult", "degrade_job"]


def _check_output(operator: Any, lr: Any) -> None:
    """NaN/Inf from a finite image: the operator's fault (it names its file), not the image's."""
    from napari_wpp.core.operators import check_operator_output

    check_operator_output(operator, lr)


@dataclass(frozen=True)
class DegradeResult:
    """The LR image or stack in the input's dtype, with its pixel size and unit."""

    image: np.ndarray
    scale: int
    pixel_size: Any = None
    unit: str | None = None


def degrade_job(
    spec: DegradeSpec,
    operator: Any,
    source: ImageData,
    out: Path | None = None,
    inputs: Sequence[tuple[str, Path | str | None]] = (),
) -> Iterator[JobProgress | DegradeResult | OutputWritten]:
    """Degrade ``source`` with ``operator`` and ``spec``'s noise (a generator of events).

    Yields :class:`JobProgress` after each slice, then :class:`DegradeResult` and, when
    ``out`` is given, :class:`OutputWritten` (a TIFF, written atomically). ``out`` may not
    be ``source``'s file nor one of ``inputs`` (``(what, path)`` pairs).
    """
    import torch

    from napari_wpp.core.intensity import Normalisation
    from napari_wpp.core.operators import add_noise
    from napari_wpp.io import check_not_an_input, explained_write_errors, write_image

    check_not_an_input([out], [("input image", source.path), *inputs])
    array = np.asarray(source.array)
    q = int(operator.scale)
    if min(array.shape[-2:]) < q:
        shape = "×".join(str(int(s)) for s in array.shape[-2:])
        raise InputError(
            f"input image {shape} is smaller than the scale {q}: "
            "give a larger image or a smaller --scale"
        )
    norm = Normalisation.from_array(array)
    slices = array[None] if array.ndim == 2 else array
    results = []
    for i, hr_slice in enumerate(slices):
        hr = torch.from_numpy(np.ascontiguousarray(norm.apply(hr_slice), dtype=np.float32))
        with torch.no_grad():
            lr = operator(hr)
            _check_output(operator, lr)
            if spec.noise > 0:
                lr = add_noise(lr, spec.noise, seed=spec.seed + i)
        results.append(lr.detach().cpu().numpy())
        yield JobProgress(i + 1, len(slices), "slices")
    low = np.stack(results) if array.ndim == 3 else results[0]
    if array.dtype.kind in "ui":
        low = np.clip(low, 0.0, 1.0)
    low = np.asarray(norm.invert(low)).astype(array.dtype, copy=False)
    pixel_size = scaled_pixel_size(source.pixel_size, q)
    yield DegradeResult(low, q, pixel_size, source.unit)
    if out is not None:
        with explained_write_errors(out):
            write_image(out, low, pixel_size=pixel_size, unit=source.unit)
        yield OutputWritten({"result": out})
