"""Ground-truth-free checks of an HR reference against LR data: suitability and blur width.

Both compare LR patches of the data with LR patches of the reference *degraded by the
operator*, at several sampling offsets ("phases": the reference cropped by ``(dy, dx)`` HR
pixels before degrading, so the LR grid of the data may fall anywhere on the material), and
find each data patch's nearest degraded reference patch with the exact c-transform engine
(:func:`~napari_wpp.core.semidual.c_transform` with zero potentials).

Suitability
    The score of a data patch is ``d² / (p² σ²)`` (``d``: distance to the nearest degraded
    reference patch, ``p``: patch side, ``σ``: the data's noise std). A patch the reference
    explains up to the noise scores about 1; structure the reference lacks scores far
    higher. The pixel map averages the scores of the patches covering each LR pixel; the
    summary is the median patch score with the ranges of :data:`SUITABILITY_RANGES`.
Blur width
    The σ of a Gaussian blur + subsampling operator whose degraded reference minimises the
    mean nearest-patch distance of the data's patches: a coarse grid of σ = q/8 .. q, a fine
    grid of step q/32 around the best coarse value, then a parabola through the best three.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from napari_wpp.core.config import BlurCheckSpec, SuitabilitySpec
from napari_wpp.core.errors import InputError
from napari_wpp.core.operators import ForwardOperator, GaussianDownsampling
from napari_wpp.core.patches import extract_patches
from napari_wpp.core.semidual import c_transform

__all__ = [
    "SUITABILITY_RANGES",
    "UNEXPLAINED_SCORE",
    "BlurFit",
    "Suitability",
    "degraded_patches",
    "estimate_blur_sigma",
    "nearest_patch_distances",
    "suitability",
    "suitability_verdict",
]

#: Upper ends of the median patch score of each verdict (p = 4, calibrated on SiC ×4, see
#: docs/algorithms.md): ref_SiC for SiC data scores 2.5, the sandstone HR scan 10.5 and
#: synthetic samples 11.6 to 14.1.
SUITABILITY_RANGES = (("suits", 4.0), ("partly", 8.0), ("does not suit", math.inf))
#: Pixels whose score exceeds this (the lower end of "does not suit") count as unexplained.
UNEXPLAINED_SCORE = 8.0

Progress = Callable[[int, int], None] | None


def _as_stack(image: Tensor | np.ndarray, what: str) -> Tensor:
    t = torch.as_tensor(np.asarray(image) if not isinstance(image, Tensor) else image)
    if not t.is_floating_point():
        raise InputError(f"{what} must be a float image in [0, 1]: normalise it first")
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise InputError(f"{what} has shape {tuple(t.shape)}: give a 2D image or a 3D stack")
    return t.detach().to(torch.float32)


def _lr_stack(lr: Tensor | np.ndarray, patch_size: int) -> Tensor:
    """The LR data as a float32 ``(Z, h, w)`` stack of slices holding a patch."""
    data = _as_stack(lr, "LR data")
    if min(data.shape[-2:]) < patch_size:
        raise InputError(
            f"LR data {data.shape[-2]}×{data.shape[-1]} is smaller than a {patch_size}×"
            f"{patch_size} patch: use larger LR images or a smaller patch size"
        )
    return data


def degraded_patches(
    reference: Tensor | np.ndarray,
    operator: ForwardOperator,
    patch_size: int,
    phases: int,
) -> Tensor:
    """All ``p × p`` LR patches of the reference degraded at ``phases``² sampling offsets.

    The offsets are ``(dy, dx)`` with ``dy, dx`` in ``round(k q / phases)``, ``k < phases``
    (HR pixels cropped from the top/left before degrading). A 3D reference pools its slices.
    """
    ref = _as_stack(reference, "reference")
    q = operator.scale
    phases = max(1, min(int(phases), q))
    offsets = sorted({round(k * q / phases) for k in range(phases)})
    parts = []
    with torch.no_grad():
        for dy in offsets:
            for dx in offsets:
                lr = operator(ref[:, dy:, dx:])
                if min(lr.shape[-2:]) >= patch_size:
                    parts.append(extract_patches(lr, patch_size))
    if not parts:
        raise InputError(
            f"the reference {ref.shape[-2]}×{ref.shape[-1]} is too small for {patch_size}×"
            f"{patch_size} LR patches at scale {q}: choose a larger reference region"
        )
    return torch.cat(parts)


def nearest_patch_distances(patches: Tensor, library: Tensor) -> Tensor:
    """Squared distance of every row of ``patches`` to its nearest row of ``library`` (exact)."""
    potentials = torch.zeros(library.shape[0], dtype=library.dtype)
    return c_transform(patches, library, potentials)[1].clamp_min(0.0)


def _subset(patches: Tensor, most: int, generator: torch.Generator) -> Tensor:
    if patches.shape[0] <= most:
        return patches
    return patches[torch.randperm(patches.shape[0], generator=generator)[:most]]


def suitability_verdict(median_score: float) -> str:
    """``"suits"``, ``"partly"`` or ``"does not suit"`` for a median patch score."""
    return next(name for name, top in SUITABILITY_RANGES if median_score <= top)


@dataclass(frozen=True)
class Suitability:
    """Suitability of a reference for LR data.

    Attributes
    ----------
    score_map
        ``(Z, h, w)`` float32 on the LR grid: the mean score of the patches covering a pixel.
    median_score
        Median patch score over all slices (the summary number).
    unexplained
        Share of LR pixels whose score exceeds :data:`UNEXPLAINED_SCORE`.
    verdict
        :func:`suitability_verdict` of ``median_score``.
    reference_patches
        Number of degraded reference patches compared against.
    """

    score_map: np.ndarray
    median_score: float
    unexplained: float
    verdict: str
    reference_patches: int

    def summary(self) -> dict[str, float | str | int]:
        """The summary figures as plain Python values."""
        return {
            "median_score": self.median_score,
            "unexplained": self.unexplained,
            "verdict": self.verdict,
            "reference_patches": self.reference_patches,
            "ranges": {name: top for name, top in SUITABILITY_RANGES if math.isfinite(top)},
        }


def _pixel_map(scores: Tensor, shape: tuple[int, int], p: int) -> Tensor:
    """Mean of the patch scores ``(h-p+1, w-p+1)`` over the patches covering each pixel."""
    cols = scores.reshape(1, 1, -1).expand(1, p * p, -1)
    total = F.fold(cols, shape, kernel_size=p)
    count = F.fold(torch.ones_like(cols), shape, kernel_size=p)
    return (total / count)[0, 0]


def suitability(
    lr: Tensor | np.ndarray,
    reference: Tensor | np.ndarray,
    operator: ForwardOperator,
    spec: SuitabilitySpec,
    progress: Progress = None,
) -> Suitability:
    """Score how well the degraded reference explains every LR patch of the data.

    Parameters
    ----------
    lr
        LR data ``(h, w)`` or ``(Z, h, w)``, float in [0, 1].
    reference
        HR reference ``(H, W)`` or ``(Z, H, W)``, float in [0, 1].
    operator
        The forward operator of the data.
    spec
        Noise std (the score's unit), patch side, phases, library size and seed.
    progress
        Called with ``(slices done, slices)`` after every LR slice.
    """
    if not spec.noise_std > 0:
        raise InputError(f"noise std {spec.noise_std!r} must be > 0: give the data's noise level")
    p = int(spec.patch_size)
    data = _lr_stack(lr, p)
    generator = torch.Generator().manual_seed(int(spec.seed))
    library = degraded_patches(reference, operator, p, spec.phases)
    library = _subset(library, spec.reference_patches, generator)
    unit = p * p * float(spec.noise_std) ** 2
    maps, medians = [], []
    for index, plane in enumerate(data):
        rows, cols = plane.shape[0] - p + 1, plane.shape[1] - p + 1
        scores = nearest_patch_distances(extract_patches(plane, p), library) / unit
        maps.append(_pixel_map(scores.reshape(rows, cols), tuple(plane.shape), p))
        medians.append(scores)
        if progress is not None:
            progress(index + 1, data.shape[0])
    score_map = torch.stack(maps).numpy().astype(np.float32)
    median = float(torch.cat(medians).median())
    return Suitability(
        score_map=score_map,
        median_score=median,
        unexplained=float((score_map > UNEXPLAINED_SCORE).mean()),
        verdict=suitability_verdict(median),
        reference_patches=int(library.shape[0]),
    )


# --------------------------------------------------------------------------- blur width
@dataclass(frozen=True)
class BlurFit:
    """The blur width that best matches the data.

    Attributes
    ----------
    sigma
        The estimated σ in HR pixels.
    sigmas, residuals
        Every σ tried and the mean nearest-patch distance² per pixel it gave (sorted by σ).
    at_bound
        Whether the best coarse σ was the smallest or largest tried (the estimate is then
        only a bound).
    """

    sigma: float
    sigmas: tuple[float, ...]
    residuals: tuple[float, ...]
    at_bound: bool


def _parabola_minimum(x: list[float], y: list[float]) -> float:
    """Vertex of the parabola through three points, clamped to their span."""
    a, b, _ = np.polyfit(np.asarray(x), np.asarray(y), 2)
    if a <= 0:
        return float(x[int(np.argmin(y))])
    return float(np.clip(-b / (2 * a), min(x), max(x)))


def estimate_blur_sigma(
    lr: Tensor | np.ndarray,
    reference: Tensor | np.ndarray,
    spec: BlurCheckSpec,
    progress: Progress = None,
) -> BlurFit:
    """The σ of the Gaussian operator whose degraded reference best explains the LR data.

    Parameters
    ----------
    lr, reference
        As in :func:`suitability`.
    spec
        Scale and kernel side of the Gaussian blur + subsampling operator (centre anchored,
        circular padding; the phases make the anchoring irrelevant), patch side, phases,
        number of data patches and seed.
    progress
        Called with ``(σ values tried, σ values to try)``.
    """
    p = int(spec.patch_size)
    data = _lr_stack(lr, p)
    generator = torch.Generator().manual_seed(int(spec.seed))
    patches = _subset(extract_patches(data, p), spec.data_patches, generator)
    q = int(spec.scale)
    tried: dict[float, float] = {}
    planned = 7 + 6

    def residual(sigma: float) -> float:
        sigma = round(sigma, 6)
        if sigma not in tried:
            operator = GaussianDownsampling(q, sigma, spec.kernel_size)
            library = degraded_patches(reference, operator, p, spec.phases)
            tried[sigma] = float(nearest_patch_distances(patches, library).mean()) / (p * p)
            if progress is not None:
                progress(len(tried), planned)
        return tried[sigma]

    coarse = [q * k / 8 for k in (1, 2, 3, 4, 5, 6, 8)]
    values = [residual(s) for s in coarse]
    best = coarse[int(np.argmin(values))]
    at_bound = best in (coarse[0], coarse[-1])
    step = q / 32
    fine = [best + k * step for k in range(-3, 4) if best + k * step > 0]
    fine_values = [residual(s) for s in fine]
    i = int(np.clip(np.argmin(fine_values), 1, len(fine) - 2))
    sigma = _parabola_minimum(fine[i - 1 : i + 2], fine_values[i - 1 : i + 2])
    order = sorted(tried)
    return BlurFit(
        sigma=sigma,
        sigmas=tuple(order),
        residuals=tuple(tried[s] for s in order),
        at_bound=at_bound,
    )
