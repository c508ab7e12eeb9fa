"""Patch extraction, reference patch sampling and Gaussian pyramids.

Patches are flattened row-major: a ``p × p`` patch becomes a vector of length ``p*p``. All
functions work on float32 torch tensors of shape ``(..., H, W)`` with intensities in
``[0, 1]``; only "valid" patches (fully inside the image) are used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from napari_wpp.core.errors import InputError

__all__ = [
    "count_patches",
    "extract_patches",
    "featureless_reference",
    "gaussian_pyramid",
    "sample_reference_patches",
]


def _check_patch_size(patch_size: int, stride: int = 1) -> None:
    if int(patch_size) != patch_size or patch_size < 1:
        raise InputError(f"patch size {patch_size} is invalid: use a positive integer such as 6")
    if int(stride) != stride or stride < 1:
        raise InputError(f"patch stride {stride} is invalid: use a positive integer such as 1")


def count_patches(shape: Sequence[int], patch_size: int, stride: int = 1) -> int:
    """Number of valid patches of all images of a stack of shape ``(..., H, W)``.

    Parameters
    ----------
    shape
        Shape of the images; leading dimensions are batch dimensions.
    patch_size
        Side ``p`` of the square patches.
    stride
        Step between patch origins.

    Returns
    -------
    int
        ``prod(leading) * n_rows * n_cols``; 0 when an image is smaller than a patch.
    """
    _check_patch_size(patch_size, stride)
    if len(shape) < 2:
        raise InputError(f"image shape {tuple(shape)} has fewer than 2 axes: pass (..., H, W)")
    h, w = int(shape[-2]), int(shape[-1])
    if h < patch_size or w < patch_size:
        return 0
    per_image = ((h - patch_size) // stride + 1) * ((w - patch_size) // stride + 1)
    return math.prod(int(s) for s in shape[:-2]) * per_image


def _center_rows(patches: Tensor) -> Tensor:
    return patches - patches.mean(dim=1, keepdim=True)


def extract_patches(
    images: Tensor, patch_size: int = 6, stride: int = 1, center: bool = False
) -> Tensor:
    """All valid patches of all images, pooled into one matrix.

    Parameters
    ----------
    images
        Tensor of shape ``(..., H, W)``; leading dimensions are pooled.
    patch_size
        Side ``p`` of the square patches.
    stride
        Step between patch origins.
    center
        Subtract each patch's own mean (keeps only its structure).

    Returns
    -------
    Tensor
        Shape ``(N, p*p)``, differentiable with respect to ``images`` (built with ``unfold``).
    """
    _check_patch_size(patch_size, stride)
    if images.ndim < 2:
        raise InputError(
            f"image shape {tuple(images.shape)} has fewer than 2 axes: pass (..., H, W)"
        )
    h, w = images.shape[-2:]
    if h < patch_size or w < patch_size:
        raise InputError(
            f"image {h}×{w} is smaller than the {patch_size}×{patch_size} patch: "
            "use larger images or a smaller patch size"
        )
    flat = images.reshape(-1, 1, h, w)
    cols = F.unfold(flat, kernel_size=patch_size, stride=stride)  # (B, p*p, L)
    patches = cols.transpose(1, 2).reshape(-1, patch_size * patch_size)
    return _center_rows(patches) if center else patches


def strided_patches(
    images: Tensor, patch_size: int, target: int | None, generator: torch.Generator
) -> Tensor:
    """All patches of ``images`` (..., H, W), or about ``target`` of them on a strided grid.

    The grid has stride s ≈ sqrt(all / target) and a random offset drawn from ``generator``.
    A fresh offset every call visits every patch position over s² calls; unlike a random
    subset, every pixel is covered by about (p / s)² patches in every call. Leading
    dimensions are pooled, as in :func:`extract_patches`.
    """
    h, w = images.shape[-2:]
    n_all = images[..., 0, 0].numel() * (h - patch_size + 1) * (w - patch_size + 1)
    stride = 1 if not target else max(1, round(math.sqrt(n_all / target)))
    if stride == 1:
        return extract_patches(images, patch_size=patch_size)
    oy, ox = (int(v) for v in torch.randint(stride, (2,), generator=generator))
    return extract_patches(images[..., oy:, ox:], patch_size=patch_size, stride=stride)


def _as_float_tensor(reference: np.ndarray | Tensor) -> Tensor:
    if isinstance(reference, Tensor):
        ref = reference.detach()
        if not ref.is_floating_point():
            info = torch.iinfo(ref.dtype)
            ref = (ref.double() - info.min) / (info.max - info.min)
        return ref.to(torch.float32)
    arr = np.asarray(reference)
    if arr.dtype == np.bool_:
        return torch.from_numpy(arr.astype(np.float32))
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        arr = (arr.astype(np.float64) - info.min) / (float(info.max) - float(info.min))
    elif not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"reference dtype {arr.dtype} is not numeric: pass an image array")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def sample_reference_patches(
    reference: np.ndarray | Tensor,
    n_patches: int,
    patch_size: int = 6,
    seed: int = 0,
    region: tuple[slice, slice] | None = None,
    slices: Sequence[int] | None = None,
    center: bool = False,
) -> Tensor:
    """A fixed random subset of the valid patches of a 2D or 3D reference.

    Parameters
    ----------
    reference
        ``(H, W)`` image or ``(Z, H, W)`` volume. Floats are used as they are (expected in
        ``[0, 1]``); integer dtypes are mapped to ``[0, 1]`` by their dtype range.
    n_patches
        Number of patches to draw (without replacement). If fewer exist, all are returned.
    patch_size
        Side ``p`` of the square patches.
    seed
        Seed of the draw; the same seed gives the same patches.
    region
        ``(rows, cols)`` slices applied to the last two axes before sampling.
    slices
        For a volume, the z indices whose patches are pooled (default: all slices).
    center
        Subtract each patch's own mean.

    Returns
    -------
    Tensor
        Shape ``(M, p*p)``, float32, on the CPU (or the device of a tensor reference).

    Raises
    ------
    InputError
        For a bad dimensionality, an empty slice selection, a region smaller than a patch or
        a non-positive ``n_patches``.
    """
    _check_patch_size(patch_size)
    if int(n_patches) != n_patches or n_patches < 1:
        raise InputError(
            f"number of reference patches {n_patches} is invalid: use a positive integer"
        )
    ref = _as_float_tensor(reference)
    if ref.ndim == 2:
        if slices is not None:
            raise InputError(
                "slices were given for a 2D reference: drop slices or pass a 3D volume"
            )
        ref = ref[None]
    elif ref.ndim == 3:
        if slices is not None:
            idx = [int(s) for s in slices]
            if not idx:
                raise InputError("no reference slices selected: choose at least one slice")
            depth = ref.shape[0]
            bad = [s for s in idx if not -depth <= s < depth]
            if bad:
                raise InputError(
                    f"reference slice {bad[0]} is out of range: the volume has {depth} slices"
                )
            ref = ref[torch.tensor(idx, dtype=torch.long, device=ref.device)]
    else:
        raise InputError(
            f"reference has shape {tuple(ref.shape)}: pass a 2D (H, W) image or 3D (Z, H, W) volume"
        )
    if region is not None:
        if len(region) != 2:
            raise InputError(
                "region must be two slices (rows, cols): e.g. (slice(0, 200), slice(0, 200))"
            )
        ref = ref[:, region[0], region[1]]
    _, h, w = ref.shape
    if h < patch_size or w < patch_size:
        raise InputError(
            f"reference region {h}×{w} is smaller than the {patch_size}×{patch_size} patch: "
            "choose a larger region"
        )
    n_rows, n_cols = h - patch_size + 1, w - patch_size + 1
    total = ref.shape[0] * n_rows * n_cols
    if total <= n_patches:
        flat = torch.arange(total)
    else:
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(total, size=int(n_patches), replace=False))
        flat = torch.from_numpy(chosen.astype(np.int64))
    flat = flat.to(ref.device)
    z = flat // (n_rows * n_cols)
    rem = flat % (n_rows * n_cols)
    i = rem // n_cols
    j = rem % n_cols
    offs = torch.arange(patch_size, device=ref.device)
    rows = (i[:, None] + offs[None, :])[:, :, None]  # (n, p, 1)
    cols = (j[:, None] + offs[None, :])[:, None, :]  # (n, 1, p)
    patches = ref[z[:, None, None], rows, cols].reshape(-1, patch_size * patch_size)
    patches = patches.contiguous()
    return _center_rows(patches) if center else patches


def _gaussian_kernel1d(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_pyramid(image: Tensor, levels: int) -> list[Tensor]:
    """Gaussian pyramid for multi-scale WPP, finest level first.

    Each coarser level is the previous one blurred with a Gaussian of standard deviation 1
    (reflect padding) and subsampled by 2 in both axes.

    Parameters
    ----------
    image
        Tensor of shape ``(..., H, W)``.
    levels
        Number of levels (1 returns ``[image]``).

    Returns
    -------
    list of Tensor
        ``levels`` tensors of shapes ``(..., ceil(H / 2**l), ceil(W / 2**l))``.
    """
    if int(levels) != levels or levels < 1:
        raise InputError(f"pyramid levels {levels} is invalid: use a positive integer")
    if image.ndim < 2:
        raise InputError(
            f"image shape {tuple(image.shape)} has fewer than 2 axes: pass (..., H, W)"
        )
    out = [image]
    k = _gaussian_kernel1d(1.0, image.dtype, image.device)
    r = k.numel() // 2
    current = image
    for _ in range(levels - 1):
        h, w = current.shape[-2:]
        if h < 2 or w < 2:
            raise InputError(
                f"image {tuple(image.shape[-2:])} is too small for {levels} pyramid levels: "
                "use fewer levels"
            )
        x = current.reshape(-1, 1, h, w)
        mode = "reflect" if min(h, w) > r else "replicate"
        x = F.pad(x, (r, r, 0, 0), mode=mode)
        x = F.conv2d(x, k.view(1, 1, 1, -1))
        x = F.pad(x, (0, 0, r, r), mode=mode)
        x = F.conv2d(x, k.view(1, 1, -1, 1))
        x = x[..., ::2, ::2]
        current = x.reshape(*current.shape[:-2], *x.shape[-2:])
        out.append(current)
    return out


#: A reference whose sampled patches have fewer distinct values than this is featureless.
FEW_DISTINCT_PATCHES = 20
#: ... or whose patches vary less than this (mean within-patch std, normalised units).
FLAT_PATCH_STD = 2e-3


def featureless_reference(
    reference: np.ndarray | Sequence[np.ndarray],
    patch_size: int = 6,
    n_sample: int = 2000,
    seed: int = 0,
) -> str | None:
    """Why a reference (in normalised units) gives the patch prior almost nothing to match.

    Samples up to ``n_sample`` patches (of every region of a list) and looks at how many are
    distinct and how much they vary inside. Returns ``None`` for a reference with texture,
    else a short reason (for a warning: such a prior pulls the result towards a flat image).
    """
    regions = list(reference) if isinstance(reference, (list, tuple)) else [reference]
    sampled = []
    for region in regions:
        region = np.asarray(region)
        if region.ndim < 2 or min(region.shape[-2:]) < patch_size:
            continue
        share = max(1, n_sample // len(regions))
        sampled.append(sample_reference_patches(region, share, patch_size, seed=seed))
    if not sampled:
        return None
    patches = torch.cat(sampled).to(torch.float32)
    distinct = int(torch.unique(patches, dim=0).shape[0])
    spread = float(patches.std(dim=1).mean()) if patches.shape[1] > 1 else 0.0
    if distinct < min(FEW_DISTINCT_PATCHES, patches.shape[0]) or distinct == 1:
        return f"only {distinct} distinct patches in {patches.shape[0]} sampled"
    if spread < FLAT_PATCH_STD:
        return f"its patches hardly vary (mean patch std {spread:.1e})"
    return None
