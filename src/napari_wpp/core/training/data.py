"""Training data: LR stacks, crops (with consistent augmentation), data-term margins."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from napari_wpp.core.errors import InputError
from napari_wpp.core.operators import ForwardOperator
from napari_wpp.core.patches import sample_reference_patches

__all__ = [
    "CropSampler",
    "as_stack",
    "augmentation_is_consistent",
    "data_margins",
    "reference_patches",
]


def as_stack(lr_data: np.ndarray) -> np.ndarray:
    lr = np.asarray(lr_data)
    if lr.ndim == 2:
        lr = lr[None]
    if lr.ndim != 3:
        raise InputError(
            f"LR data must be a 2D image or a 3D stack, got shape {lr.shape}: pass (Z, H, W)"
        )
    if not np.issubdtype(lr.dtype, np.floating):
        raise InputError(
            f"LR data dtype {lr.dtype} is not normalised float: apply a Normalisation first"
        )
    if not np.all(np.isfinite(lr)):
        raise InputError("LR data contain NaN or Inf pixels: clean or fill them first")
    return np.ascontiguousarray(lr, dtype=np.float32)


def data_margins(operator: ForwardOperator, crop: int) -> tuple[int, int]:
    """LR pixels at the start and end of a crop whose HR support leaves the crop.

    LR pixel ``i`` of a crop of ``c`` LR pixels averages HR pixels within half a kernel of
    ``offset + q·i``; it is compared in the data term only when that support lies inside the
    crop's ``q·c`` HR pixels, so the operator's padding never matters.
    """
    q = operator.scale
    half = float(getattr(operator, "kernel_size", 2 * q)) / 2.0
    offset = float(operator.sampling_offset)
    first = max(0, math.ceil((half - offset - 0.5) / q))
    last = min(crop - 1, math.floor((q * crop - 0.5 - half - offset) / q))
    return first, crop - 1 - last


def augmentation_is_consistent(operator: ForwardOperator) -> bool:
    """Whether flips and 90° rotations of LR crops match flipped/rotated HR images.

    True for a centred Gaussian operator with one σ (it commutes with the dihedral group);
    a corner-anchored or an estimated (asymmetric) kernel would be flipped along with the
    data, so crops are then used as they are.
    """
    from napari_wpp.core.operators import GaussianDownsampling

    if not isinstance(operator, GaussianDownsampling) or operator.anchor != "center":
        return False
    sigma = operator.to_dict().get("sigma")
    return not isinstance(sigma, (list, tuple)) or len(set(sigma)) == 1


class CropSampler:
    """Random LR crops from random slices of a stack, with optional flips/rotations.

    Parameters
    ----------
    stack
        ``(Z, H, W)`` float32 LR data.
    crop_size
        Crop side (clipped to the smaller slice side).
    augment
        Random flips and 90° rotations (rotations only for square crops).
    generator
        Torch generator driving every choice.
    """

    def __init__(
        self, stack: np.ndarray, crop_size: int, augment: bool, generator: torch.Generator
    ) -> None:
        self.stack = torch.from_numpy(stack)
        self.crop = int(min(crop_size, *stack.shape[1:]))
        self.augment = augment
        self.generator = generator

    def sample(self, batch_size: int) -> Tensor:
        """``(batch_size, 1, c, c)`` crops."""
        z_count, h, w = self.stack.shape
        c, g = self.crop, self.generator
        zs = torch.randint(z_count, (batch_size,), generator=g)
        ys = torch.randint(h - c + 1, (batch_size,), generator=g)
        xs = torch.randint(w - c + 1, (batch_size,), generator=g)
        crops = []
        for z, y0, x0 in zip(zs.tolist(), ys.tolist(), xs.tolist(), strict=True):
            crop = self.stack[z, y0 : y0 + c, x0 : x0 + c]
            if self.augment:
                k, flip = (int(v) for v in torch.randint(4, (2,), generator=g))
                crop = torch.rot90(crop, k, (0, 1))
                if flip % 2:
                    crop = torch.flip(crop, (1,))
            crops.append(crop)
        return torch.stack(crops)[:, None].contiguous()


def reference_patches(regions: list[np.ndarray], count: int, patch_size: int, seed: int) -> Tensor:
    """``count`` random patches pooled over the reference ``regions`` (an equal share each)."""
    patches = []
    for i, region in enumerate(regions):
        region = np.asarray(region, dtype=np.float32)
        if not np.all(np.isfinite(region)):
            raise InputError("reference contains NaN or Inf pixels: clean or fill it first")
        share = max(1, count // len(regions))
        patches.append(
            sample_reference_patches(region, share, patch_size=patch_size, seed=seed + i)
        )
    return torch.cat(patches)
