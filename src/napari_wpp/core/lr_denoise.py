"""Denoising the LR input with the noise that an estimated operator leaves unexplained.

A registered HR/LR pair gives, besides the operator ``f``, the LR scan's own misfit
``r = y - f(x)``: its noise and what the operator cannot model. Its variance per coefficient
of the 8 × 8 DCT (:func:`noise_dct_variance`) is the noise model of that scanner.

:func:`dct_denoise` removes it from an LR image by shrinkage in sliding 8 × 8 DCT blocks:
by default (power subtraction) each coefficient ``c`` of each block is scaled by
``√(max(c² - σ², 0) / c²)``, ``σ²`` its noise variance, so that it keeps its expected signal
power (the block mean is kept); the overlapping blocks are averaged. Strong edges pass,
noise-sized coefficients are removed, so the image keeps its sharpness where a global
(linear) Wiener filter would blur it.

A WPPNet trained on the raw LR crops (its data term must explain the LR as measured) is
applied to the denoised LR at inference: fed an estimate of ``f(x)`` instead of ``f(x)``
plus the scan's noise, it no longer turns that noise into HR detail (docs/algorithms.md,
"Denoising the LR input").
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from napari_wpp.core.errors import InputError

__all__ = [
    "BLOCK",
    "RULES",
    "check_noise_variance",
    "dct_basis",
    "dct_denoise",
    "denoise_image",
    "noise_dct_variance",
]

#: Side of the DCT blocks (LR pixels).
BLOCK = 8
#: Rows of the image handled at once (bounds the memory of the sliding blocks).
STRIP_ROWS = 128


def dct_basis(block: int = BLOCK, dtype: torch.dtype = torch.float64) -> Tensor:
    """The orthonormal 2D DCT-II as a ``(block², block²)`` matrix acting on flattened blocks."""
    n = torch.arange(block, dtype=torch.float64)
    one = torch.cos(math.pi * (n[None, :] + 0.5) * n[:, None] / block) * math.sqrt(2.0 / block)
    one[0] /= math.sqrt(2.0)
    return torch.kron(one, one).to(dtype)


def noise_dct_variance(residual: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Variance of each 8 × 8 DCT coefficient of ``residual`` over all its blocks.

    Parameters
    ----------
    residual
        ``y - f(x)`` of a registered pair, on the LR grid (2D, at least ``block`` each way).

    Returns
    -------
    numpy.ndarray
        ``(block, block)`` float64 variances (coefficient ``(u, v)``: vertical ``u``,
        horizontal ``v`` frequency).
    """
    r = np.asarray(residual, dtype=np.float64)
    if r.ndim != 2 or min(r.shape) < block:
        raise InputError(f"the residual {r.shape} needs to be 2D and at least {block}² pixels")
    x = torch.from_numpy(np.ascontiguousarray(r))[None, None]
    patches = torch.nn.functional.unfold(x, block)[0]  # (block², L)
    coefficients = dct_basis(block) @ patches
    return (coefficients**2).mean(dim=1).reshape(block, block).numpy()


def check_noise_variance(variance: object, where: str = "LR noise variance") -> np.ndarray:
    """``variance`` as a ``(8, 8)`` float64 array, or an ``InputError`` naming what is wrong."""
    try:
        v = np.asarray(variance, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{where} must be an {BLOCK}×{BLOCK} nested list of numbers") from None
    if v.shape != (BLOCK, BLOCK):
        raise InputError(
            f"{where} must be {BLOCK}×{BLOCK}, got shape {v.shape}: estimate the operator again"
        )
    if not np.all(np.isfinite(v)) or bool((v < 0).any()):
        raise InputError(f"{where} must be finite and ≥ 0: estimate the operator again")
    return v


#: Shrinkage rules of :func:`dct_denoise`.
RULES = ("power", "wiener")


def _denoise_strip(
    x: Tensor, basis: Tensor, variance: Tensor, block: int, rule: str = "power"
) -> Tensor:
    """The denoised ``(B, 1, h, w)`` of ``(B, 1, h + 2r, w + 2r)`` padded by ``r = block - 1``."""
    r = block - 1
    h_pad, w_pad = x.shape[-2:]
    h, w = h_pad - 2 * r, w_pad - 2 * r
    patches = torch.nn.functional.unfold(x, block)  # (B, block², L)
    coefficients = basis @ patches
    power = coefficients**2
    signal = torch.clamp(power - variance, min=0.0)
    tiny = torch.finfo(x.dtype).tiny
    if rule == "power":
        gains = torch.sqrt(signal / torch.clamp(power, min=tiny))
    else:
        gains = signal / torch.clamp(signal + variance, min=tiny)
    gains[:, 0] = 1.0  # the block mean is kept
    blocks = basis.T @ (coefficients * gains)
    summed = torch.nn.functional.fold(blocks, (h_pad, w_pad), block)
    # every pixel of the padded interior lies in exactly block² blocks
    return summed[:, :, r : r + h, r : r + w] / block**2


def dct_denoise(x: Tensor, variance: Tensor, rule: str = "power") -> Tensor:
    """``(B, 1, h, w)`` LR images denoised by sliding-block DCT shrinkage (see the module).

    ``variance`` is the ``(8, 8)`` noise variance per DCT coefficient. ``rule``: ``"power"``
    (power subtraction, the gain ``√(max(c² − σ², 0) / c²)``: each coefficient keeps its
    expected signal power) or ``"wiener"`` (``S / (S + σ²)`` with ``S = max(c² − σ², 0)``:
    a lower mean squared error, a smoother image). Borders are replicated, so an output
    pixel depends on the input within 7 pixels; the image is processed in strips of rows, so
    memory grows with the width, not the area.
    """
    if rule not in RULES:
        raise InputError(f"unknown shrinkage rule {rule!r}: use {' or '.join(RULES)}")
    block = variance.shape[-1]
    basis = dct_basis(block, x.dtype).to(x.device)
    v = variance.to(device=x.device, dtype=x.dtype).reshape(1, -1, 1)
    r = block - 1
    padded = torch.nn.functional.pad(x, (r, r, r, r), mode="replicate")
    h = x.shape[-2]
    strips = []
    for top in range(0, h, STRIP_ROWS):
        bottom = min(h, top + STRIP_ROWS)
        strips.append(_denoise_strip(padded[:, :, top : bottom + 2 * r], basis, v, block, rule))
    return torch.cat(strips, dim=2)


def denoise_image(image: np.ndarray, variance: np.ndarray, rule: str = "power") -> np.ndarray:
    """A 2D LR image (or a stack of them) denoised by :func:`dct_denoise` (float32 copy)."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    v = torch.from_numpy(check_noise_variance(variance)).to(torch.float32)
    with torch.no_grad():
        out = dct_denoise(x.reshape(-1, 1, *x.shape[-2:]), v, rule)
    return out.reshape(x.shape).numpy()
