"""The variational reconstruction job: one LR image superresolved with the WPP prior, or with
a trained PatchNR prior (:func:`load_prior`).

The LR image and the reference are each normalised by
:meth:`~napari_wpp.core.intensity.Normalisation.from_array`; the result returns to the LR
image's dtype and range (clipped to it for integer inputs) with the pixel size divided by the
scale. A stopped run still returns (and writes) the result so far.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_wpp.core.config import ReconstructSpec
from napari_wpp.core.errors import InputError
from napari_wpp.core.events import forward_until_finished
from napari_wpp.io import ImageData
from napari_wpp.jobs.notices import reference_warning
from napari_wpp.jobs.operator import scaled_pixel_size
from napari_wpp.jobs.predict import OutputWritten

__all__ = ["ReconstructResult", "load_prior", "reconstruct_job"]


@dataclass(frozen=True)
class ReconstructResult:
    """The HR image in the LR image's dtype and range, its pixel size and how the run went."""

    image: np.ndarray
    scale: int
    iterations: int
    elapsed_s: float
    stopped_early: bool
    lam: float
    pixel_size: Any = None
    unit: str | None = None


def load_prior(path: str | Path, label: str | None = None) -> Any:
    """The trained PatchNR of a model file (a ``TrainingState``); other kinds are refused.

    ``label`` names the file in messages (default: its name).
    """
    from napari_wpp.io import load_model, read_model_metadata

    name = label or Path(path).name
    kind = read_model_metadata(path).get("kind")
    if kind != "patchnr":
        raise InputError(
            f"{name} is a {kind} model, not a PatchNR prior: give a file from `napari-wpp train "
            f"--model patchnr` (a {kind} superresolves by itself: `napari-wpp predict`)"
        )
    return load_model(path, device="cpu")


def reconstruct_job(
    spec: ReconstructSpec,
    operator: Any,
    lr: ImageData,
    reference: np.ndarray | None,
    out: Path | None = None,
    stop: threading.Event | None = None,
    inputs: Sequence[tuple[str, Path | str | None]] = (),
    prior: Any = None,
    **algorithm: Any,
) -> Iterator[Any]:
    """Reconstruct the 2D image ``lr`` (a generator of events).

    Parameters
    ----------
    spec
        λ, budgets, seed and device.
    operator
        The forward operator that produced ``lr``.
    lr
        The 2D LR image with its pixel size and unit.
    reference
        HR reference image or stack (any dtype); ``None`` with ``prior``.
    out
        TIFF to write (atomically), or ``None``.
    stop
        Set it to stop after the current iteration (the result so far is kept).
    inputs
        ``(what, path)`` of further files read (``lr``'s own is checked): the output may
        not be one of them.
    prior
        A PatchNR prior (:func:`load_prior`): it replaces the WPP of ``reference``, with
        ``spec.patchnr_lam``.
    algorithm
        Further :class:`~napari_wpp.core.reconstruct.VariationalConfig` fields.

    Yields a :class:`~napari_wpp.jobs.notices.JobWarning` for a nearly featureless
    reference, the core's ``ReconstructionProgress`` (and ``ReconstructionPreview``) events, then
    :class:`ReconstructResult` and, with ``out``, :class:`OutputWritten`.
    """
    from napari_wpp.core.intensity import Normalisation
    from napari_wpp.core.reconstruct import (
        ReconstructionFinished,
        VariationalConfig,
        reconstruct_variational,
    )
    from napari_wpp.io import check_not_an_input, explained_write_errors, write_image

    check_not_an_input([out], [("LR image", lr.path), *inputs])
    image = np.asarray(lr.array)
    config = VariationalConfig.from_spec(spec, **algorithm)
    model = None if prior is None else getattr(prior, "model", prior)
    # a reference smaller than a patch is refused by the core
    p = config.patch_size if model is None else int(model.patch_size)
    q = int(operator.scale)
    if image.ndim == 2 and min(image.shape) * q < p:
        raise InputError(
            f"LR image {image.shape[0]}×{image.shape[1]} at ×{q} is smaller than the {p}×{p} "
            "patch: give a larger LR image"
        )
    norm = Normalisation.from_array(image)
    lr_n = np.asarray(norm.apply(image), dtype=np.float32)
    ref_n = None
    if model is None:
        if reference is None:
            raise InputError("a reconstruction needs an HR reference or a PatchNR prior: give one")
        reference = np.asarray(reference)
        ref_n = np.asarray(Normalisation.from_array(reference).apply(reference), dtype=np.float32)
        warning = reference_warning(ref_n, p)
        if warning is not None:
            yield warning
    events = reconstruct_variational(lr_n, ref_n, operator, config, stop=stop, prior=model)
    finished = yield from forward_until_finished(
        events, ReconstructionFinished, "the reconstruction"
    )
    result = np.asarray(finished.image, dtype=np.float32)
    if image.dtype.kind in "ui":
        result = np.clip(result, 0.0, 1.0)
    result = np.asarray(norm.invert(result)).astype(image.dtype, copy=False)
    pixel_size = scaled_pixel_size(lr.pixel_size, 1.0 / q)
    yield ReconstructResult(
        image=result,
        scale=q,
        iterations=int(finished.iterations),
        elapsed_s=float(finished.elapsed_s),
        stopped_early=bool(finished.stopped_early),
        lam=float(spec.lam if model is None else spec.patchnr_lam),
        pixel_size=pixel_size,
        unit=lr.unit,
    )
    if out is not None:
        with explained_write_errors(out):
            write_image(out, result, pixel_size=pixel_size, unit=lr.unit)
        yield OutputWritten({"result": out})
