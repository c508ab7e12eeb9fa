"""Image quality metrics as in the WPP papers: PSNR, SSIM and blur effect.

Images are floats in [0, 1] (clipped to [0, 1] first), data range 1, and ``crop`` pixels are
removed on every side before measuring. Stacks (``(..., H, W)``) are measured slice by slice
and averaged. PSNR, SSIM and the blur effect come from scikit-image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from skimage.measure import blur_effect as _sk_blur_effect
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from napari_wpp.core.errors import InputError

__all__ = ["evaluate", "evaluate_slices", "psnr", "ssim", "blur_effect"]

_MIN_SSIM_SIDE = 7


def _prepare(image: np.ndarray, crop: int, what: str) -> np.ndarray:
    """Validate, clip to [0, 1], crop and reshape an image to ``(slices, h, w)`` float64."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype.kind != "f":
        raise InputError(
            f"{what} has dtype {image.dtype}: metrics expect float images in [0, 1]; "
            "normalise first (Normalisation.from_array(...).apply)"
        )
    if image.ndim < 2:
        raise InputError(f"{what} has shape {image.shape}: pass a 2D image or a (Z, H, W) stack")
    if not np.isfinite(image).all():
        raise InputError(f"{what} contains NaN or Inf pixels: replace them before evaluating")
    crop = int(crop)
    if crop < 0:
        raise InputError(f"crop={crop} is negative: use crop >= 0")
    h, w = image.shape[-2:]
    if h - 2 * crop < 1 or w - 2 * crop < 1:
        raise InputError(
            f"crop={crop} removes all of the {h}x{w} image: use a smaller crop (e.g. crop=0)"
        )
    if crop:
        image = image[..., crop : h - crop, crop : w - crop]
    image = np.clip(image.astype(np.float64), 0.0, 1.0)
    return image.reshape((-1,) + image.shape[-2:])


def _pair(pred: np.ndarray, truth: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred.detach().cpu().numpy() if hasattr(pred, "detach") else pred)
    t = np.asarray(truth.detach().cpu().numpy() if hasattr(truth, "detach") else truth)
    if p.shape != t.shape:
        raise InputError(
            f"prediction shape {p.shape} differs from truth shape {t.shape}: "
            "compare images of the same size"
        )
    return _prepare(p, crop, "prediction"), _prepare(t, crop, "truth")


def _per_slice(
    func: Callable[[np.ndarray, np.ndarray], float], p: np.ndarray, t: np.ndarray
) -> float:
    return float(np.mean([func(ps, ts) for ps, ts in zip(p, t)]))


def _psnr2d(p: np.ndarray, t: np.ndarray) -> float:
    mse = float(np.mean((p - t) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(peak_signal_noise_ratio(t, p, data_range=1.0))


def _ssim2d(p: np.ndarray, t: np.ndarray) -> float:
    if min(p.shape) < _MIN_SSIM_SIDE:
        raise InputError(
            f"image of {p.shape[0]}x{p.shape[1]} px after cropping is too small for SSIM: "
            f"need at least {_MIN_SSIM_SIDE} px per side (use a smaller crop)"
        )
    return float(structural_similarity(t, p, data_range=1.0))


def psnr(pred: np.ndarray, truth: np.ndarray, crop: int = 40) -> float:
    """Peak signal-to-noise ratio in dB (data range 1); mean over slices for stacks.

    Parameters
    ----------
    pred, truth
        Float images in [0, 1] of equal shape ``(H, W)`` or ``(..., H, W)``.
    crop
        Pixels removed on every side before measuring.
    """
    p, t = _pair(pred, truth, crop)
    return _per_slice(_psnr2d, p, t)


def ssim(pred: np.ndarray, truth: np.ndarray, crop: int = 40) -> float:
    """Structural similarity (scikit-image defaults, data range 1); mean over slices."""
    p, t = _pair(pred, truth, crop)
    return _per_slice(_ssim2d, p, t)


def blur_effect(image: np.ndarray, crop: int = 40) -> float:
    """Blur effect of Crété-Roffet et al. (0 sharp .. 1 blurred); mean over slices.

    Parameters
    ----------
    image
        Float image in [0, 1], ``(H, W)`` or ``(..., H, W)``.
    crop
        Pixels removed on every side before measuring.
    """
    x = _prepare(image, crop, "image")
    return float(np.mean([_sk_blur_effect(s) for s in x]))


def evaluate(pred: np.ndarray, truth: np.ndarray, crop: int = 40) -> dict[str, float]:
    """PSNR, SSIM and blur effect of a reconstruction against the truth.

    Parameters
    ----------
    pred, truth
        Float images in [0, 1] of equal shape ``(H, W)`` or ``(Z, H, W)``.
    crop
        Pixels removed on every side (40 in the papers).

    Returns
    -------
    dict
        ``{"psnr": dB, "ssim": ..., "blur_effect": ...}``; the blur effect is that of ``pred``.
    """
    p, t = _pair(pred, truth, crop)
    return {
        "psnr": _per_slice(_psnr2d, p, t),
        "ssim": _per_slice(_ssim2d, p, t),
        "blur_effect": float(np.mean([_sk_blur_effect(s) for s in p])),
    }


def evaluate_slices(pred: np.ndarray, truth: np.ndarray, crop: int = 40) -> dict[str, list[float]]:
    """PSNR, SSIM and blur effect of every slice of a test set (same crop rule as
    :func:`evaluate`, whose figures are the means of these lists).

    Returns
    -------
    dict
        ``{"psnr": [...], "ssim": [...], "blur_effect": [...]}``, one entry per slice of
        ``(..., H, W)`` stacks (one for a 2D image).
    """
    p, t = _pair(pred, truth, crop)
    return {
        "psnr": [_psnr2d(ps, ts) for ps, ts in zip(p, t)],
        "ssim": [_ssim2d(ps, ts) for ps, ts in zip(p, t)],
        "blur_effect": [float(_sk_blur_effect(ps)) for ps in p],
    }
