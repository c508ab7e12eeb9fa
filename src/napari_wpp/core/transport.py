"""Gaussian optimal transport of pixel patches: moving an estimate towards the material.

Deep Optimal Transport in pixel space. The ``p × p`` patches of restored images (the
*source*) and of a clean reference (the *target*) are summarised by Gaussians (mean and
covariance, streamed in float64); every patch ``v`` of an image is moved by the Gaussian
optimal-transport map

    ``T = Σs^-½ (Σs^½ Σt Σs^½)^½ Σs^-½``,   ``v ↦ T (v − μs) + μt``,

and the overlapping patches are folded back with uniform weights. With uniform weights the
whole operation is one ``(2p − 1)²`` correlation plus a constant (:meth:`GaussianTransport.
kernel`), which is what :meth:`GaussianTransport.apply` computes; :meth:`GaussianTransport.
apply_fold` is the literal patch-by-patch form (tests compare both). Images are reflected by
``p − 1`` pixels at the border, so every pixel is covered by ``p²`` patches in both forms.

The source covariance of a blurry input is nearly singular (``‖T − I‖`` explodes); its
eigenvalues are raised to ``floor`` (intensity², on the [0, 1] scale) before the map is built.

Blending convention (:func:`blend`): ``x_α = α·x + (1 − α)·T(x)``, so **α = 1 leaves the image
unchanged** (fidelity to the data) and **α = 0 is fully transported** (the reference's patch
statistics); α > 1 moves away from the transport (a mild blur), α < 0 beyond it. α lies in
:data:`ALPHA_RANGE`.

All functions take float images on the [0, 1] scale, ``(..., H, W)`` numpy arrays or torch
tensors; inputs are never modified.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_wpp.core.config.fields import bounds, default_of
from napari_wpp.core.config.transport import TransportSpec
from napari_wpp.core.errors import InputError

__all__ = [
    "ALPHA_RANGE",
    "DEFAULT_FLOOR",
    "GaussianTransport",
    "PatchMoments",
    "PatchStatistics",
    "blend",
    "check_alpha",
    "data_consistency",
    "patch_statistics",
    "sqrtm_psd",
]

#: The range of the blending weight α (1: unchanged, 0: fully transported).
ALPHA_RANGE = bounds(TransportSpec, "alpha")
#: Default eigenvalue floor of the source covariance (intensity², [0, 1] scale): the variance
#: of noise of std 0.01, below which a blurry estimate's patch directions carry no signal.
DEFAULT_FLOOR = default_of(TransportSpec, "floor")
#: Patch rows unfolded at once while streaming statistics (bounds memory on large slices).
_BAND_ROWS = 64


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float, or an :class:`InputError` outside :data:`ALPHA_RANGE`."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise InputError(f"alpha {alpha!r} is not a number: use e.g. 0.75") from None
    low, high = ALPHA_RANGE
    if not (math.isfinite(value) and low <= value <= high):
        raise InputError(
            f"alpha {alpha} is outside [{low:g}, {high:g}]: use 1 (unchanged), 0 (fully "
            "transported) or a value in between"
        )
    return value


def _check_patch_size(patch_size: int) -> int:
    if isinstance(patch_size, bool) or int(patch_size) != patch_size or patch_size < 1:
        raise InputError(f"patch size {patch_size} is invalid: use a positive integer such as 6")
    return int(patch_size)


def _as_stack(images: Any, what: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``images`` as a CPU tensor of ``dtype`` and shape ``(N, H, W)`` (a copy, never a view)."""
    if isinstance(images, torch.Tensor):
        t = images.detach().to("cpu", dtype, copy=True)
    else:
        arr = np.asarray(images)
        if arr.dtype.kind not in "uif":
            raise InputError(f"{what} has dtype {arr.dtype}: pass a float image on [0, 1]")
        t = torch.from_numpy(np.array(arr, dtype=np.float64)).to(dtype)
    if t.ndim < 2:
        raise InputError(f"{what} has shape {tuple(t.shape)}: pass a 2D image or a (Z, H, W) stack")
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{what} contains NaN or Inf pixels: replace them first")
    return t.reshape(-1, *t.shape[-2:])


# --------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class PatchStatistics:
    """Mean and covariance of ``p × p`` patches (row-major vectors of length ``p²``).

    Attributes
    ----------
    patch_size
        Side ``p``.
    count
        Number of patches summarised.
    mean
        ``(p²,)`` float64.
    covariance
        ``(p², p²)`` float64, symmetric positive semi-definite (divided by ``count``).
    """

    patch_size: int
    count: int
    mean: np.ndarray = field(repr=False)
    covariance: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        p = _check_patch_size(self.patch_size)
        d = p * p
        mean = np.asarray(self.mean, dtype=np.float64).reshape(-1)
        cov = np.asarray(self.covariance, dtype=np.float64)
        if mean.shape != (d,) or cov.shape != (d, d):
            raise InputError(
                f"patch statistics of {p}×{p} patches need a mean of {d} values and a {d}×{d} "
                f"covariance, got {mean.shape} and {cov.shape}: fit them again"
            )
        if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
            raise InputError("patch statistics hold NaN or Inf values: fit them again")
        if int(self.count) < 1:
            raise InputError("patch statistics of no patches: give images larger than a patch")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "covariance", 0.5 * (cov + cov.T))
        object.__setattr__(self, "count", int(self.count))
        object.__setattr__(self, "patch_size", p)


class PatchMoments:
    """Streaming float64 mean and covariance of all valid ``p × p`` patches of many images.

    Batches are merged with the pairwise update of Chan et al. (centred sums, no large
    cancellation); images are unfolded :data:`_BAND_ROWS` patch rows at a time.
    """

    def __init__(self, patch_size: int = 6) -> None:
        self.patch_size = _check_patch_size(patch_size)
        d = self.patch_size**2
        self.count = 0
        self._mean = np.zeros(d)
        self._m2 = np.zeros((d, d))

    def _add_patches(self, patches: torch.Tensor) -> None:
        n_b = int(patches.shape[0])
        if n_b == 0:
            return
        mean_b = patches.mean(dim=0)
        centred = patches - mean_b
        m2_b = (centred.T @ centred).numpy()
        mean_b = mean_b.numpy()
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def add(self, images: Any) -> PatchMoments:
        """Add the patches of ``images`` (``(H, W)`` or ``(..., H, W)``, [0, 1] scale)."""
        p = self.patch_size
        stack = _as_stack(images, "image")
        h, w = stack.shape[-2:]
        if h < p or w < p:
            raise InputError(
                f"image {h}×{w} is smaller than the {p}×{p} patch: use a smaller patch size"
            )
        rows = h - p + 1
        for image in stack:
            for r0 in range(0, rows, _BAND_ROWS):
                band = image[r0 : min(rows, r0 + _BAND_ROWS) + p - 1]
                cols = F.unfold(band[None, None], kernel_size=p)  # (1, p², L)
                self._add_patches(cols[0].T)
        return self

    def statistics(self) -> PatchStatistics:
        """The statistics so far (:class:`InputError` when no patch was added)."""
        if self.count == 0:
            raise InputError("no patches were added: give at least one image larger than a patch")
        return PatchStatistics(self.patch_size, self.count, self._mean, self._m2 / self.count)


def patch_statistics(images: Any | Iterable[Any], patch_size: int = 6) -> PatchStatistics:
    """Patch statistics of an image, a stack, or a list of images of any sizes."""
    moments = PatchMoments(patch_size)
    items = images if isinstance(images, (list, tuple)) else [images]
    for item in items:
        moments.add(item)
    return moments.statistics()


# --------------------------------------------------------------------------- the map
def sqrtm_psd(matrix: np.ndarray, floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Square root and inverse square root of a symmetric PSD matrix.

    Eigenvalues below ``floor`` are raised to it first (``floor`` 0: clipped at 0, and the
    inverse root is that of the pseudo-inverse).
    """
    sym = 0.5 * (matrix + matrix.T)
    values, vectors = np.linalg.eigh(sym)
    values = np.maximum(values, max(float(floor), 0.0))
    root = np.sqrt(values)
    inv = np.divide(1.0, root, out=np.zeros_like(root), where=root > 0)
    return (vectors * root) @ vectors.T, (vectors * inv) @ vectors.T


def gaussian_map(source_cov: np.ndarray, target_cov: np.ndarray, floor: float) -> np.ndarray:
    """``T = Σs^-½ (Σs^½ Σt Σs^½)^½ Σs^-½`` with the eigenvalues of ``Σs`` floored."""
    s_half, s_inv_half = sqrtm_psd(source_cov, floor)
    middle, _ = sqrtm_psd(s_half @ target_cov @ s_half)
    t = s_inv_half @ middle @ s_inv_half
    return 0.5 * (t + t.T)


@dataclass(frozen=True)
class GaussianTransport:
    """The Gaussian OT map between source and target patch statistics, and its application.

    Build it with :meth:`fit`. ``matrix`` is ``T`` (``p² × p²``), ``offset`` is ``μt − T μs``;
    a patch ``v`` goes to ``T v + offset``.
    """

    source: PatchStatistics
    target: PatchStatistics
    floor: float
    matrix: np.ndarray = field(repr=False)
    offset: np.ndarray = field(repr=False)

    @classmethod
    def fit(
        cls, source: PatchStatistics, target: PatchStatistics, floor: float = DEFAULT_FLOOR
    ) -> GaussianTransport:
        """The map from ``source`` to ``target`` statistics with the eigenvalue ``floor``."""
        if source.patch_size != target.patch_size:
            raise InputError(
                f"source patches are {source.patch_size}×{source.patch_size} but target "
                f"patches {target.patch_size}×{target.patch_size}: fit both with one patch size"
            )
        floor = float(floor)
        if not (math.isfinite(floor) and floor >= 0.0):
            raise InputError(f"eigenvalue floor {floor} is invalid: use a value ≥ 0 such as 1e-4")
        matrix = gaussian_map(source.covariance, target.covariance, floor)
        offset = target.mean - matrix @ source.mean
        return cls(source, target, floor, matrix, offset)

    @property
    def patch_size(self) -> int:
        """Side ``p`` of the patches."""
        return self.source.patch_size

    def distance_from_identity(self) -> float:
        """Spectral norm ``‖T − I‖`` (large: the floor matters)."""
        return float(np.linalg.norm(self.matrix - np.eye(self.matrix.shape[0]), 2))

    def transport_patches(self, patches: Any) -> np.ndarray:
        """``T (v − μs) + μt`` for every row ``v`` of ``patches`` ``(N, p²)`` (float64)."""
        v = np.asarray(patches, dtype=np.float64)
        return v @ self.matrix.T + self.offset

    def kernel(self) -> tuple[np.ndarray, float]:
        """The equivalent ``(2p − 1)²`` correlation kernel and constant of the uniform fold.

        Pixel ``i`` of the result is ``Σ_d K[d] x(i + d) + c`` (``d`` from ``−(p−1)`` to
        ``p − 1`` on both axes, ``K`` indexed from ``−(p−1)``), because a pixel at position
        ``a`` of the patch with origin ``i − a`` reads ``x(i − a + k)`` through ``T[a, k]``.
        """
        p = self.patch_size
        t4 = self.matrix.reshape(p, p, p, p)  # [ar, ac, kr, kc]
        kernel = np.zeros((2 * p - 1, 2 * p - 1))
        for ar in range(p):
            for ac in range(p):
                kernel[p - 1 - ar : 2 * p - 1 - ar, p - 1 - ac : 2 * p - 1 - ac] += t4[ar, ac]
        return kernel / p**2, float(self.offset.mean())

    def apply(self, images: Any) -> np.ndarray:
        """Transport every patch of ``images`` (``(..., H, W)``), folded back uniformly.

        Computed as one correlation plus a constant (reflect padding of ``p − 1``). Returns a
        float32 numpy array of the input's shape (not clipped).
        """
        p = self.patch_size
        stack = _as_float32_stack(images, p)
        kernel, constant = self.kernel()
        weight = torch.from_numpy(kernel.astype(np.float32))[None, None]
        out = np.empty(stack.shape, dtype=np.float32)
        with torch.no_grad():
            for i, image in enumerate(stack):
                padded = _reflect(image[None, None], p - 1)
                out[i] = (F.conv2d(padded, weight)[0, 0] + constant).numpy()
        return out.reshape(np.shape(images))

    def apply_fold(self, images: Any) -> np.ndarray:
        """The literal form of :meth:`apply`: transport every patch, fold with uniform weights."""
        p = self.patch_size
        stack = _as_stack(images, "image")
        out = np.empty(stack.shape, dtype=np.float64)
        matrix = torch.from_numpy(self.matrix)
        offset = torch.from_numpy(self.offset)
        for i, image in enumerate(stack):
            padded = _reflect(image[None, None], p - 1)
            size = padded.shape[-2:]
            cols = F.unfold(padded, kernel_size=p)[0]  # (p², L)
            moved = matrix @ cols + offset[:, None]
            total = F.fold(moved[None], size, kernel_size=p)[0, 0]
            count = F.fold(torch.ones_like(moved)[None], size, kernel_size=p)[0, 0]
            out[i] = (total / count)[p - 1 : size[0] - p + 1, p - 1 : size[1] - p + 1].numpy()
        return out.reshape(np.shape(images))


def _as_float32_stack(images: Any, patch_size: int) -> torch.Tensor:
    t = _as_stack(images, "image", torch.float32)
    h, w = t.shape[-2:]
    if h < patch_size or w < patch_size:
        raise InputError(
            f"image {h}×{w} is smaller than the {patch_size}×{patch_size} patch of the "
            "transport: give a larger image"
        )
    return t


def _reflect(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect-pad the last two axes of ``(1, 1, H, W)`` by ``pad`` (replicate where too small)."""
    if pad == 0:
        return x
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    return F.pad(x, (pad, pad, pad, pad), mode=mode)


# --------------------------------------------------------------------------- blending, data
def blend(image: Any, transported: Any, alpha: float) -> np.ndarray:
    """``α·image + (1 − α)·transported`` (α = 1: unchanged, α = 0: fully transported)."""
    alpha = check_alpha(alpha)
    x = np.asarray(image, dtype=np.float32)
    t = np.asarray(transported, dtype=np.float32)
    if x.shape != t.shape:
        raise InputError(
            f"image {x.shape} and transported image {t.shape} differ in shape: blend an image "
            "with its own transport"
        )
    return (alpha * x + (1.0 - alpha) * t).astype(np.float32)


def data_consistency(
    image: Any,
    lr: Any,
    operator: torch.nn.Module,
    steps: int = 5,
    noise: float | None = None,
) -> np.ndarray:
    """Up to ``steps`` steepest-descent steps on ``½‖f(x) − y‖²`` from ``image`` ([0, 1] scale).

    The residual is taken away from the border, as in
    :func:`~napari_wpp.core.patch_distance.data_rms`.

    Each step moves along ``−fᵀ(f(x) − y)`` by the exact line-search length (the operator is
    affine, so the residual is quadratic in the step). With ``noise`` the steps stop at the
    discrepancy level: the last step is shortened so that the residual's rms meets ``noise``
    and no step is taken once it is at or below it (fitting the data below its noise fits the
    noise). Returns a float32 numpy array of ``image``'s shape.
    """
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise InputError(f"data-consistency steps {steps} is invalid: use an integer ≥ 0")
    if noise is not None and not (math.isfinite(float(noise)) and float(noise) >= 0.0):
        raise InputError(f"noise level {noise} is invalid: use the noise std on the [0, 1] scale")
    x = torch.tensor(np.asarray(image, dtype=np.float64))
    y = torch.as_tensor(np.asarray(lr, dtype=np.float64))
    operator = copy.deepcopy(operator).to(torch.float64)  # the caller's stays as it is
    interior = operator.interior_mask(tuple(y.shape)).to(torch.float64)
    with torch.no_grad():
        base = operator(torch.zeros_like(x))
        for _ in range(int(steps)):
            residual = operator(x) - y
            if residual.shape != y.shape:
                raise InputError(
                    f"the operator maps the {tuple(x.shape)} image to {tuple(residual.shape)} "
                    f"but the LR image is {tuple(y.shape)}: give the LR image of this estimate"
                )
            residual = residual * interior  # the border is the padding's, not the image's
            size = float(interior.sum()) * (residual.numel() // interior.numel())
            now = float((residual**2).sum())
            if noise is not None and now <= size * float(noise) ** 2:
                break
            direction = operator.adjoint(residual, tuple(x.shape[-2:]))
            moved = (operator(direction) - base) * interior  # A d on the interior
            aa = float((moved**2).sum())
            if aa <= 0.0:
                break
            ra = float((residual * moved).sum())
            length = ra / aa  # the minimiser of ‖r − t·A d‖²
            if noise is not None:
                goal = size * float(noise) ** 2
                if now - ra * length < goal:  # the minimum lies below the noise: stop on it
                    # ‖r‖² − 2t⟨r, Ad⟩ + t²‖Ad‖² = goal, the smaller root
                    disc = max(ra * ra - aa * (now - goal), 0.0)
                    length = (ra - math.sqrt(disc)) / aa
            x = x - length * direction
    return x.numpy().astype(np.float32)
