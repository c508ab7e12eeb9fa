"""WPPNet: the asymmetric CNN of the WPPNets paper (after ACNet, cut to ten blocks).

Architecture (Altekrüger & Hertrich 2023; docs/algorithms.md, WPPNet), for one-channel
images at integer scales 2, 3, 4, 6, 8:

* ten *asymmetric blocks*: each sums a 1×3, a 3×1 and a 3×3 convolution (64 channels, no bias)
  of the previous block's activation, then applies a ReLU;
* the ten pre-activation block outputs are summed (memory path) and passed through a ReLU;
* one shared pixel-shuffle upsampler (per factor 2 or 3: 3×3 conv 64 → 64·r², ReLU, shuffle r)
  is applied to two branches, the summed features and the first block's activation;
* each branch continues with two 3×3 convolutions; the branches are added, ReLU;
* three 3×3 convolutions (ReLU, ReLU, none) end in one channel. No skip, no output clamp;
  intensities are centred around ``offset`` on the way in and out (ACNet's mean shift).

About 1.07 M parameters at ×4 (0.92 M at ×2, 1.26 M at ×6). Fully convolutional: any input
size works, the output is ``q`` times larger in both axes. The receptive field radius in LR
pixels is given by :func:`receptive_radius` (used for tiled inference halos).

Optionally (``denoise_block=8``) the network holds the LR noise model of an estimated
operator and denoises its input at inference (:mod:`napari_wpp.core.lr_denoise`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from napari_wpp.core.errors import InputError
from napari_wpp.core.lr_denoise import BLOCK, check_noise_variance, dct_denoise

#: Scales with a pixel-shuffle factorisation.
SUPPORTED_SCALES = (2, 3, 4, 6, 8)
FEATURES = 64
N_BLOCKS = 10
#: Input/output intensity shift (see :class:`WPPNet`).
DEFAULT_OFFSET = 0.5


def shuffle_factors(scale: int) -> list[int]:
    """Pixel-shuffle stages for ``scale`` (``[2, 2]`` for 4, ``[2, 3]`` for 6, ...)."""
    factors = {2: [2], 3: [3], 4: [2, 2], 6: [2, 3], 8: [2, 2, 2]}
    if scale not in factors:
        supported = ", ".join(str(s) for s in SUPPORTED_SCALES)
        raise InputError(f"WPPNet does not support scale {scale}: use one of {supported}")
    return factors[scale]


class AsymmetricBlock(nn.Module):
    """Sum of a 1×3, a 3×1 and a 3×3 convolution without bias (pre-activation output)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.horizontal = nn.Conv2d(in_channels, out_channels, (1, 3), padding=(0, 1), bias=False)
        self.vertical = nn.Conv2d(in_channels, out_channels, (3, 1), padding=(1, 0), bias=False)
        self.square = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.horizontal(x) + self.vertical(x) + self.square(x)


class PixelShuffleUpsampler(nn.Sequential):
    """Stages of (3×3 conv to ``r²`` times the channels, ReLU, pixel shuffle ``r``)."""

    def __init__(self, channels: int, scale: int) -> None:
        layers: list[nn.Module] = []
        for r in shuffle_factors(scale):
            layers += [
                nn.Conv2d(channels, channels * r * r, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.PixelShuffle(r),
            ]
        super().__init__(*layers)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)


class WPPNet(nn.Module):
    """The published WPPNet generator ``G``: LR ``(B, 1, h, w)`` → HR ``(B, 1, q·h, q·w)``.

    Parameters
    ----------
    scale
        Integer superresolution factor (2, 3, 4, 6 or 8).
    features
        Channels of the hidden layers (64 in the paper).
    blocks
        Number of asymmetric blocks (10 in the paper).
    offset
        Intensity subtracted from the input and added back to the output: ACNet's mean
        shift, which the published WPPNet dropped. The layers and the parameter count are
        the published ones either way; centring the [0, 1] intensities (the default 0.5)
        makes the unsupervised training converge several times faster (docs/benchmarks.md),
        ``offset=0`` is the published network exactly.
    denoise_block
        0 (default): none. 8: the network holds an LR noise model (buffer
        ``noise_variance``, set by :meth:`set_noise_variance`) and, in eval mode only,
        denoises its input with it first (:func:`napari_wpp.core.lr_denoise.dct_denoise`).
        Training (train mode) sees the LR crops as they are.
    """

    kind = "wppnet"

    def __init__(
        self,
        scale: int = 4,
        features: int = FEATURES,
        blocks: int = N_BLOCKS,
        offset: float = DEFAULT_OFFSET,
        denoise_block: int = 0,
    ) -> None:
        super().__init__()
        shuffle_factors(int(scale))  # validates the scale
        if denoise_block not in (0, BLOCK):
            raise InputError(f"WPPNet denoise_block must be 0 or {BLOCK}, got {denoise_block!r}")
        self.denoise_block = int(denoise_block)
        if self.denoise_block:
            self.register_buffer("noise_variance", torch.zeros(BLOCK, BLOCK))
        if blocks < 1 or features < 1:
            raise InputError(f"WPPNet needs ≥ 1 block and feature, got {blocks}, {features}")
        self.scale = int(scale)
        self.features = int(features)
        self.n_blocks = int(blocks)
        self.offset = float(offset)
        self.blocks = nn.ModuleList(
            [AsymmetricBlock(1 if i == 0 else features, features) for i in range(blocks)]
        )
        self.upsampler = PixelShuffleUpsampler(features, self.scale)
        self.memory_branch = nn.Sequential(
            _conv3x3(features, features), _conv3x3(features, features)
        )
        self.first_block_branch = nn.Sequential(
            _conv3x3(features, features), _conv3x3(features, features)
        )
        self.reconstruction = nn.Sequential(
            _conv3x3(features, features),
            nn.ReLU(inplace=True),
            _conv3x3(features, features),
            nn.ReLU(inplace=True),
            _conv3x3(features, 1),
        )

    def config(self) -> dict:
        """Constructor arguments (stored in model files)."""
        return {
            "scale": self.scale,
            "features": self.features,
            "blocks": self.n_blocks,
            "offset": self.offset,
        } | ({"denoise_block": self.denoise_block} if self.denoise_block else {})

    def set_noise_variance(self, variance: np.ndarray | Tensor) -> None:
        """Set the LR noise model (``(8, 8)`` DCT variances; zeros switch denoising off)."""
        if not self.denoise_block:
            raise InputError("this WPPNet was built without denoise_block: build it with 8")
        v = torch.as_tensor(check_noise_variance(np.asarray(variance)), dtype=torch.float32)
        self.noise_variance.copy_(v)

    @property
    def denoises(self) -> bool:
        """Whether inference (eval mode) denoises the LR input (a non-zero noise model)."""
        return bool(self.denoise_block) and bool(self.noise_variance.any())

    def forward(self, lr: Tensor) -> Tensor:
        if lr.ndim != 4 or lr.shape[1] != 1:
            raise InputError(
                f"WPPNet expects a (batch, 1, h, w) tensor, got shape {tuple(lr.shape)}"
            )
        if not self.training and self.denoises:
            lr = dct_denoise(lr, self.noise_variance)
        h = lr - self.offset if self.offset else lr
        memory = None
        first = None
        for block in self.blocks:
            pre = block(h)
            memory = pre if memory is None else memory + pre
            h = torch.relu(pre)
            if first is None:
                first = h
        assert memory is not None and first is not None
        up_memory = self.upsampler(torch.relu(memory))
        up_first = self.upsampler(first)
        merged = self.memory_branch(up_memory) + self.first_block_branch(up_first)
        out = self.reconstruction(torch.relu(merged))
        return out + self.offset if self.offset else out


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def receptive_radius(model: WPPNet) -> int:
    """Receptive-field radius of the network in LR pixels (rounded up).

    Every 3×3 (or 1×3/3×1) layer at LR adds one LR pixel; the layers after an upsampling
    stage add ``1 / (product of factors so far)`` LR pixels each.
    """
    radius = float(model.n_blocks)  # the asymmetric blocks
    factor = 1
    for r in shuffle_factors(model.scale):
        radius += 1.0 / factor  # the stage's conv runs at the current resolution
        factor *= r
    radius += 5.0 / factor  # two branch convs + three reconstruction convs at HR
    return math.ceil(radius) + (model.denoise_block - 1 if model.denoise_block else 0)
