"""Distances between the patch distributions of two images, and readouts without ground truth.

* :func:`gelbrich_distance`: the 2-Wasserstein distance between the Gaussians fitted to two
  patch sets (closed form: the Gelbrich bound);
* :func:`sliced_wasserstein`: the sliced 2-Wasserstein distance between two patch sets (random
  unit directions; on each the distance is a sort, compared at common quantiles);
* :func:`reference_band`: the reference's distance to itself (between disjoint halves), the
  scale on which an output's distance to the reference is read;
* :func:`data_rms`, :func:`estimate_noise`: how well an HR estimate explains its LR data.

Distances are per pixel (divided by ``√(p²)``), so patch sizes compare; images are floats on
the [0, 1] scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from napari_wpp.core.errors import InputError
from napari_wpp.core.transport import PatchStatistics, patch_statistics, sqrtm_psd

__all__ = [
    "ReferenceBand",
    "blend_distances",
    "data_rms",
    "default_alpha",
    "estimate_noise",
    "gelbrich_distance",
    "reference_band",
    "sample_patches",
    "sliced_wasserstein",
]


def gelbrich_distance(a: PatchStatistics, b: PatchStatistics) -> float:
    """W₂ between the Gaussians of two patch statistics, per pixel.

    ``W₂² = ‖μa − μb‖² + tr(Σa + Σb − 2 (Σb^½ Σa Σb^½)^½)``, divided by ``p²``.
    """
    if a.patch_size != b.patch_size:
        raise InputError(
            f"patch sizes {a.patch_size} and {b.patch_size} differ: compare equal patch sizes"
        )
    b_half, _ = sqrtm_psd(b.covariance)
    cross, _ = sqrtm_psd(b_half @ a.covariance @ b_half)
    squared = float(np.sum((a.mean - b.mean) ** 2))
    squared += float(np.trace(a.covariance) + np.trace(b.covariance) - 2.0 * np.trace(cross))
    return math.sqrt(max(squared, 0.0) / a.mean.size)


def sample_patches(images: Any, patch_size: int, count: int, seed: int = 0) -> np.ndarray:
    """Up to ``count`` random valid patches of an image or stack, ``(N, p²)`` float64."""
    arr = np.asarray(images, dtype=np.float64)
    stack = arr.reshape(-1, *arr.shape[-2:])
    h, w = stack.shape[-2:]
    p = int(patch_size)
    if h < p or w < p:
        raise InputError(f"image {h}×{w} is smaller than the {p}×{p} patch: use a smaller patch")
    rows, cols = h - p + 1, w - p + 1
    total = stack.shape[0] * rows * cols
    rng = np.random.default_rng(seed)
    flat = np.arange(total) if total <= count else rng.choice(total, int(count), replace=False)
    z, rem = np.divmod(flat, rows * cols)
    i, j = np.divmod(rem, cols)
    offs = np.arange(p)
    patches = stack[
        z[:, None, None], (i[:, None] + offs)[:, :, None], (j[:, None] + offs)[:, None, :]
    ]
    return patches.reshape(-1, p * p)


def sliced_wasserstein(
    a: np.ndarray, b: np.ndarray, projections: int = 64, quantiles: int = 512, seed: int = 0
) -> float:
    """Sliced W₂ between patch sets ``a`` ``(N, d)`` and ``b`` ``(M, d)``, per pixel.

    ``projections`` random unit directions (fixed by ``seed``); on each, the projected sets
    are sorted and compared at ``quantiles`` common levels (linear interpolation), so the
    sets may differ in size. Returns the root mean squared difference over directions: for
    an isotropic cloud about ``W₂ / √d``, the per-pixel scale of :func:`gelbrich_distance`.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InputError(
            f"patch sets {a.shape} and {b.shape} do not match: pass (N, d) and (M, d) arrays"
        )
    if min(len(a), len(b)) < 2:
        raise InputError("a patch set has fewer than 2 patches: give larger images")
    d = a.shape[1]
    generator = torch.Generator().manual_seed(int(seed))
    dirs = torch.randn(d, int(projections), generator=generator, dtype=torch.float64).numpy()
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    levels = (np.arange(int(quantiles)) + 0.5) / int(quantiles)
    qa = np.quantile(a @ dirs, levels, axis=0)
    qb = np.quantile(b @ dirs, levels, axis=0)
    return math.sqrt(float(np.mean((qa - qb) ** 2)))


@dataclass(frozen=True)
class ReferenceBand:
    """The reference's distance to itself: distances between its disjoint crops.

    The reference (each slice of a stack) is cut into a 2 × 2 grid of crops; the distances
    of every pair of crops of one slice (and of the first crop of every slice pair) measure
    how far two samples of the same material lie apart at this patch size.

    Attributes
    ----------
    gelbrich, sliced
        The pairwise distances (per pixel).
    """

    gelbrich: tuple[float, ...]
    sliced: tuple[float, ...]

    @staticmethod
    def _summary(values: tuple[float, ...]) -> dict[str, float]:
        return {
            "low": float(min(values)),
            "middle": float(np.median(values)),
            "high": float(max(values)),
        }

    @property
    def middle(self) -> float:
        """Median Gelbrich distance: the default α puts an output's distance here."""
        return float(np.median(self.gelbrich))

    def to_dict(self) -> dict[str, dict[str, float]]:
        """``{"gelbrich": {"low", "middle", "high"}, "sliced": {...}}``."""
        return {"gelbrich": self._summary(self.gelbrich), "sliced": self._summary(self.sliced)}


def _crops(reference: np.ndarray) -> list[np.ndarray]:
    """The 2 × 2 grid of crops of every slice, slice by slice."""
    h, w = reference.shape[-2:]
    out = []
    for image in reference.reshape(-1, h, w):
        for rows in (slice(0, h // 2), slice(h // 2, h)):
            for cols in (slice(0, w // 2), slice(w // 2, w)):
                out.append(image[rows, cols])
    return out


def reference_band(
    reference: Any, patch_size: int = 6, projections: int = 64, samples: int = 20000, seed: int = 0
) -> ReferenceBand:
    """Distances between disjoint crops of ``reference`` (a 2D image or a stack, [0, 1])."""
    ref = np.asarray(reference, dtype=np.float64)
    p = int(patch_size)
    if ref.ndim < 2 or min(ref.shape[-2:]) < 4 * p:
        raise InputError(
            f"reference {ref.shape} is too small to cut into 2 × 2 crops of several {p}×{p} "
            "patches: give a larger reference"
        )
    crops = _crops(ref)
    pairs = [(i, j) for i in range(len(crops)) for j in range(i + 1, len(crops))]
    pairs = [(i, j) for i, j in pairs if i // 4 == j // 4 or (i % 4 == 0 and j % 4 == 0)]
    stats = [patch_statistics(c, p) for c in crops]
    picked = [sample_patches(c, p, samples, seed + k) for k, c in enumerate(crops)]
    gelbrich = tuple(gelbrich_distance(stats[i], stats[j]) for i, j in pairs)
    sliced = tuple(
        sliced_wasserstein(picked[i], picked[j], projections, seed=seed) for i, j in pairs
    )
    return ReferenceBand(gelbrich, sliced)


def data_rms(image: Any, lr: Any, operator: torch.nn.Module) -> float:
    """Root mean square of ``f(x) − y`` ([0, 1] scale); ``x`` is 2D or a stack of ``y``'s.

    Taken over the LR pixels away from the border (``operator.interior_mask``): at the border
    the operator's padding, not the estimate, decides ``f(x)``, and an estimate that is right
    everywhere still misses LR data made with wrapped or reflected content there.
    """
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))
    y = torch.as_tensor(np.asarray(lr, dtype=np.float32))
    with torch.no_grad():
        fx = operator(x)
    if tuple(fx.shape) != tuple(y.shape):
        raise InputError(
            f"the operator maps the {tuple(x.shape)} estimate to {tuple(fx.shape)} but the LR "
            f"image is {tuple(y.shape)}: give the LR image of this estimate and its operator"
        )
    residual = (fx.double() - y.double())[..., operator.interior_mask(tuple(y.shape))]
    return float(torch.sqrt(torch.mean(residual**2)))


def _flat_block_std(stack: np.ndarray, block: int = 8, percentile: float = 10.0) -> float:
    """Low percentile over ``block²`` blocks of the local std of the Laplacian residual."""
    mask = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]]) / 6.0
    residual = torch.nn.functional.conv2d(
        torch.from_numpy(stack)[:, None], torch.from_numpy(mask)[None, None]
    )[:, 0].numpy()
    h, w = (residual.shape[-2] // block) * block, (residual.shape[-1] // block) * block
    if h == 0 or w == 0:
        raise InputError(f"LR image {stack.shape[1:]} is too small to estimate its noise: give it")
    r = residual[:, :h, :w].reshape(-1, h // block, block, w // block, block)
    return float(np.percentile(r.std(axis=(2, 4)), percentile))


def estimate_noise(lr: Any) -> float:
    """Noise std of an LR image (or stack) from its flattest blocks.

    The Laplacian residual (Immerkær's mask, ÷ 6: unit gain on white noise) is cut into 8 × 8
    blocks; the 10th percentile of their standard deviations, divided by the same figure of
    unit white noise, is the estimate. Texture still biases it upwards on detailed LR images:
    give the noise level where it is known.
    """
    y = np.asarray(lr, dtype=np.float64)
    stack = y.reshape(-1, *y.shape[-2:])
    if min(stack.shape[-2:]) < 10:
        raise InputError(f"LR image {y.shape} is too small to estimate its noise: give it")
    white = np.random.default_rng(0).normal(size=(1, 256, 256))
    return _flat_block_std(stack) / _flat_block_std(white)


def blend_distances(
    image: Any, transported: Any, target: PatchStatistics, alphas: Any
) -> np.ndarray:
    """Gelbrich distance to ``target`` of ``α·image + (1 − α)·transported`` for every α.

    The blend is linear in α, so its patch mean and covariance follow from the statistics of
    ``image``, ``transported`` and their sum (three passes, then one small eigenproblem per α).
    """
    p = target.patch_size
    x = np.asarray(image, dtype=np.float64)
    t = np.asarray(transported, dtype=np.float64)
    sx, st, ss = (patch_statistics(a, p) for a in (x, t, x + t))
    cross = 0.5 * (ss.covariance - sx.covariance - st.covariance)  # symmetric part of C_xt
    out = []
    for alpha in np.asarray(alphas, dtype=np.float64).reshape(-1):
        beta = 1.0 - alpha
        mean = alpha * sx.mean + beta * st.mean
        cov = alpha**2 * sx.covariance + beta**2 * st.covariance + 2 * alpha * beta * cross
        out.append(gelbrich_distance(PatchStatistics(p, sx.count, mean, cov), target))
    return np.asarray(out)


def default_alpha(alphas: Any, distances: Any, goal: float) -> float:
    """The largest α in [0, 1] whose distance is at most ``goal`` (1 when α = 1 already is,
    0 when no α is); between grid points the crossing is interpolated linearly."""
    a = np.asarray(alphas, dtype=np.float64)
    d = np.asarray(distances, dtype=np.float64)
    keep = (a >= 0.0) & (a <= 1.0)
    a, d = a[keep], d[keep]
    order = np.argsort(a)[::-1]  # from 1 down to 0
    a, d = a[order], d[order]
    if len(a) == 0:
        raise InputError("no α in [0, 1] was measured: give a grid covering [0, 1]")
    if d[0] <= goal:
        return float(a[0])
    for k in range(1, len(a)):
        if d[k] <= goal:
            frac = (d[k - 1] - goal) / (d[k - 1] - d[k])
            return float(a[k - 1] + frac * (a[k] - a[k - 1]))
    return float(a[-1])
