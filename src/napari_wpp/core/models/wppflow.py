"""WPPFlow: a conditional normalizing flow ``x = T(z; y)`` for posterior sampling.

After Altekrüger & Hertrich 2023 (see docs/algorithms.md, WPPFlow).

The latent ``z`` has the HR image's size (one channel, ``q·h × q·w`` for an ``h × w`` LR image
``y``). The flow runs coarse to fine, in the generative direction ``z → x``:

1. ``z`` is squeezed (2×2 space-to-depth) ``L = log2 q`` times down to the LR grid
   (``4^L`` channels).
2. At every level ``l = 0 … L−1`` (grid ``2^l·h``, ``4^(L−l)`` channels) ``steps`` flow steps of
   [ActNorm → invertible 1×1 convolution → conditional affine coupling → conditional affine
   injector] act on the latent, then it is unsqueezed to the next finer grid.
3. At HR size a final conditional affine step ``v = exp(log_s(y)) · u`` scales the latent;
   ``log_s`` is a small subnet of the condition, starting at ``log(initial_std)``.
4. ``edge_shifts`` :class:`~napari_wpp.core.models.flow_blocks.EdgeShift` steps (tile grids
   offset by half a tile from one step to the next) stretch ``v`` along the directions that
   move, turn and bend the mean's edges (``|∇ mean(y)|`` times low-order polynomials of the
   tile coordinates), by factors that training sets per tile (1 at initialisation).
5. ``x = mean(y) + v``: ``mean(y)`` is a WPPNet CNN of the LR image
   (:mod:`~napari_wpp.core.models.wppnet`) plus a learned shift.

Why step 4: the patch prior charges far less for moving an edge than for the same pixel
variance as white noise on it (``benchmarks/bench_edge_variation.py``), but the entropy term
pays only for directions the flow *expands*; the coupling levels, which see the LR image
only, do not find edge-moving directions in CPU minutes, and spread white noise instead.

The condition of level ``l`` is the LR image upsampled to that grid *in register with the
operator's sampling* (``sampling_offset``; the published flow is off by 6 px at ×4 with the
corner convention), concatenated with features of a small CNN on the LR image, upsampled the
same way. Subnets end in zero-initialised convolutions, so at initialisation the flow draws
``mean(y) + initial_std · u`` with ``u`` an orthogonal mix of ``z`` normalised by ActNorm.

Squeezes and unsqueezes have unit Jacobian; every other block reports its log-determinant, so
``forward(z, y)`` returns ``(x, log|det ∂x/∂z|)`` per sample exactly. Scales 2, 4 and 8.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_wpp.core.errors import InputError
from napari_wpp.core.models.flow_blocks import (
    ActNorm,
    AffineCoupling,
    ConditionalAffineInjector,
    EdgeShift,
    FlowSequence,
    InvertibleConv1x1,
    Squeeze2x2,
)
from napari_wpp.core.models.wppnet import DEFAULT_OFFSET, WPPNet

__all__ = ["FLOW_SCALES", "WPPFlow", "aligned_upsample", "edge_gradient", "edge_pattern"]

#: Floor of ``log(|∇ mean| + floor)`` in the edge steps' condition (intensities in [0, 1]).
EDGE_FLOOR = 1e-2
#: Gain of the edge steps' subnets, so that their stretches are not held back by Adam's step
#: bound on the last bias (docs/algorithms.md, "Edge steps").
EDGE_GAIN = 4.0

#: Scales the flow supports (powers of two: one squeeze per factor 2).
FLOW_SCALES = (2, 4, 8)


def aligned_upsample(lr: Tensor, factor: int, sampling_offset: float) -> Tensor:
    """Bilinear upsampling by ``factor`` in register with an operator's sampling.

    Output pixel ``p`` takes the input value at coordinate ``(p − sampling_offset) / factor``
    (border extended), with ``sampling_offset`` in output pixels: the HR coordinate that input
    pixel 0 samples. ``sampling_offset = (factor − 1) / 2`` is ``align_corners=False``.
    """
    if factor == 1:
        return lr
    h, w = lr.shape[-2:]

    def axis(n_in: int) -> Tensor:
        u = torch.arange(n_in * factor, dtype=torch.float32, device=lr.device) - sampling_offset
        u = u / factor
        return (2.0 * u / (n_in - 1) - 1.0) if n_in > 1 else torch.zeros_like(u)

    gy, gx = axis(h), axis(w)
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)
    grid = grid.to(lr.dtype).expand(lr.shape[0], -1, -1, -1)
    return F.grid_sample(lr, grid, mode="bilinear", padding_mode="border", align_corners=True)


def edge_gradient(image: Tensor) -> Tensor:
    """``(∂x, ∂y)`` of ``(B, 1, H, W)`` images as ``(B, 2, H, W)``: Sobel, per pixel, border
    replicated, differentiable (the evaluation's edge masks use scikit-image's instead)."""
    sobel = torch.tensor(
        [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]],
        dtype=image.dtype,
        device=image.device,
    )
    kernels = torch.stack([sobel, sobel.T])[:, None] / 8.0
    return F.conv2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), kernels)


def edge_pattern(image: Tensor) -> Tensor:
    """``|∇ image|``: adding ``d · |∇ image|`` moves the edges of ``image`` by ``d`` pixels
    along their normals, to first order."""
    gradient = edge_gradient(image)
    return torch.sqrt((gradient * gradient).sum(dim=1, keepdim=True) + 1e-12)


class _FlowStep(FlowSequence):
    """ActNorm → invertible 1×1 conv → conditional coupling → conditional injector."""

    def __init__(self, channels: int, cond_channels: int, hidden: int, clamp: float, seed: int):
        super().__init__(
            [
                ActNorm(channels),
                InvertibleConv1x1(channels, seed=seed),
                AffineCoupling(channels, hidden, cond_channels, clamp),
                ConditionalAffineInjector(channels, cond_channels, hidden, clamp),
            ]
        )


class WPPFlow(nn.Module):
    """Conditional normalizing flow ``T(z; y)`` of WPPFlow (see the module docstring).

    Parameters
    ----------
    scale
        Superresolution factor q (2, 4 or 8).
    steps
        Flow steps per level.
    hidden
        Hidden channels of the coupling and injector subnets.
    cond_features
        Channels of the LR feature CNN that conditions every level.
    clamp
        Bound of every log-scale (soft clamp).
    sampling_offset
        HR coordinate sampled by LR pixel 0 (the operator's ``sampling_offset``); default
        centred, ``(q − 1) / 2``.
    initial_std
        Spread of the samples around the mean at initialisation.
    edge_shifts
        Number of :class:`EdgeShift` steps after the final affine step (0: none, as in
        model files written before they existed). Their tile grids are offset by 0, ½, ¼
        and ¾ of a tile, in turn.
    edge_gain
        :class:`EdgeShift` gain on its subnet's output (1 in model files written before it
        existed).
    mean_features, mean_blocks
        Width and depth of the WPPNet that gives the mean.
    offset
        Intensity offset of the WPPNet (ACNet mean shift).
    seed
        Seed of the 1×1 convolutions' initial rotations.
    """

    kind = "wppflow"

    def __init__(
        self,
        scale: int = 4,
        steps: int = 4,
        hidden: int = 32,
        cond_features: int = 16,
        clamp: float = 2.0,
        sampling_offset: float | None = None,
        initial_std: float = 0.05,
        edge_shifts: int = 2,
        edge_gain: float = EDGE_GAIN,
        mean_features: int = 64,
        mean_blocks: int = 10,
        offset: float = DEFAULT_OFFSET,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if scale not in FLOW_SCALES:
            raise InputError(
                f"WPPFlow supports scales {FLOW_SCALES}, got {scale}: use WPPNet for ×3 and ×6"
            )
        for name, value in (("steps", steps), ("hidden", hidden), ("cond_features", cond_features)):
            if int(value) != value or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value}")
        if isinstance(edge_shifts, bool) or int(edge_shifts) != edge_shifts or edge_shifts < 0:
            raise InputError(f"edge_shifts must be an integer ≥ 0, got {edge_shifts}")
        if not initial_std > 0:
            raise InputError(f"initial std must be > 0, got {initial_std}")
        self.scale = int(scale)
        self.levels = int(round(math.log2(scale)))
        self.sampling_offset = (
            (scale - 1) / 2.0 if sampling_offset is None else float(sampling_offset)
        )
        self._config = {
            "scale": self.scale,
            "steps": int(steps),
            "hidden": int(hidden),
            "cond_features": int(cond_features),
            "clamp": float(clamp),
            "sampling_offset": self.sampling_offset,
            "initial_std": float(initial_std),
            "edge_shifts": int(edge_shifts),
            "edge_gain": float(edge_gain),
            "mean_features": int(mean_features),
            "mean_blocks": int(mean_blocks),
            "offset": float(offset),
            "seed": int(seed),
        }
        self.mean_net = WPPNet(scale, features=mean_features, blocks=mean_blocks, offset=offset)
        self.encoder = nn.Sequential(
            nn.Conv2d(1, cond_features, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(cond_features, cond_features, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(cond_features, cond_features, 3, padding=1),
        )
        self.offset = float(offset)
        cond_channels = 1 + cond_features
        self.squeeze = Squeeze2x2()
        self.level_steps = nn.ModuleList()
        for level in range(self.levels):
            channels = 4 ** (self.levels - level)
            self.level_steps.append(
                FlowSequence(
                    _FlowStep(channels, cond_channels, hidden, clamp, seed + 97 * level + i)
                    for i in range(steps)
                )
            )
        self.final = ConditionalAffineInjector(1, cond_channels + 1, hidden, clamp)
        tile = min(4, self.scale)
        self.edge_steps = nn.ModuleList(
            EdgeShift(
                cond_channels + 3,
                hidden,
                block=tile,
                offset=(i % 2) * (tile // 2) + ((i // 2) % 2) * (tile // 4),
                gain=edge_gain,
            )
            for i in range(int(edge_shifts))
        )
        self.log_initial_std = math.log(initial_std)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (stored in model files)."""
        return dict(self._config)

    # ------------------------------------------------------------------ conditions
    def conditions(self, lr: Tensor) -> list[Tensor]:
        """Conditions of levels 0 … L (grid ``2^l`` × LR), registered with the operator."""
        features = self.encoder(lr - self.offset)
        base = torch.cat([lr, features], dim=1)
        conds = []
        for level in range(self.levels + 1):
            factor = 2**level
            # LR pixel 0 sits at HR coordinate `sampling_offset`; on a grid of `factor` × LR,
            # at sampling_offset · factor / q plus the half-pixel shift of the coarser grid.
            offset = (self.sampling_offset + 0.5) * factor / self.scale - 0.5
            conds.append(aligned_upsample(base, factor, offset))
        return conds

    def _final_steps(
        self, lr: Tensor, cond_hr: Tensor
    ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
        """Centre ``mean + shift``, log-scale and edge-step stretches of the final steps."""
        mean = self.mean_net(lr)
        log_s, shift = self.final._scale_shift(mean, torch.cat([cond_hr, mean], dim=1))
        stretches = []
        if len(self.edge_steps):
            edges = edge_pattern(mean)
            # |∇m| drives the directions; its log tells the subnet edges from flat ground
            edge_cond = torch.cat([edges, torch.log(edges + EDGE_FLOOR), mean, cond_hr], dim=1)
            stretches = [step.stretch(edge_cond) for step in self.edge_steps]
        return mean + shift, log_s + self.log_initial_std, stretches

    def _context(
        self, lr: Tensor
    ) -> tuple[list[Tensor], tuple[Tensor, Tensor, list[tuple[Tensor, Tensor, Tensor]]]]:
        """Conditions and final steps of ``lr``; computed once for a repeated image.

        ``lr.expand(K, …)`` (stride 0 along the batch, as when drawing K samples of one slice)
        runs the condition CNN, the mean WPPNet and the final subnets on one image only.
        """
        batch = lr.shape[0]
        if batch > 1 and lr.stride(0) == 0:
            conds, (mean, log_s, stretches) = self._context(lr[:1])
            return (
                [c.expand(batch, -1, -1, -1) for c in conds],
                (mean.expand(batch, -1, -1, -1), log_s.expand(batch, -1, -1, -1), stretches),
            )
        conds = self.conditions(lr)
        return conds, self._final_steps(lr, conds[-1])

    # ------------------------------------------------------------------ flow
    def _check(self, z: Tensor, lr: Tensor) -> None:
        if lr.ndim != 4 or lr.shape[1] != 1:
            raise InputError(f"LR input must be (B, 1, h, w), got {tuple(lr.shape)}")
        expected = (lr.shape[0], 1, lr.shape[2] * self.scale, lr.shape[3] * self.scale)
        if tuple(z.shape) != expected:
            raise InputError(
                f"latent shape {tuple(z.shape)} does not fit LR {tuple(lr.shape)} at ×"
                f"{self.scale}: pass z of shape {expected}"
            )

    def forward(self, z: Tensor, lr: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log|det ∂x/∂z|)``: the HR sample for latent ``z`` and LR image ``lr``."""
        self._check(z, lr)
        conds, (mean, log_s, stretches) = self._context(lr)
        u = z
        for _ in range(self.levels):
            u, _ = self.squeeze(u)
        logdet = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        for level, steps in enumerate(self.level_steps):
            u, ld = steps(u, conds[level])
            logdet = logdet + ld
            u = self.squeeze.inverse(u)
        v = u * torch.exp(log_s)
        logdet = logdet + log_s.sum(dim=(1, 2, 3))
        for step, stretch in zip(self.edge_steps, stretches):
            v, ld = step.apply(v, stretch)
            logdet = logdet + ld
        return mean + v, logdet

    def inverse(self, x: Tensor, lr: Tensor) -> Tensor:
        """The latent ``z`` with ``forward(z, lr)[0] == x``."""
        self._check(x, lr)
        conds, (mean, log_s, stretches) = self._context(lr)
        v = x - mean
        for step, stretch in reversed(list(zip(self.edge_steps, stretches))):
            v = step.apply_inverse(v, stretch)
        u = v * torch.exp(-log_s)
        for level in reversed(range(self.levels)):
            u, _ = self.squeeze(u)
            u = self.level_steps[level].inverse(u, conds[level])
        for _ in range(self.levels):
            u = self.squeeze.inverse(u)
        return u

    def sample(
        self,
        lr: Tensor,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One posterior sample per LR image, with latent ``temperature · N(0, I)``."""
        shape = (lr.shape[0], 1, lr.shape[2] * self.scale, lr.shape[3] * self.scale)
        z = torch.randn(shape, generator=generator, dtype=lr.dtype, device="cpu")
        return self(z.to(lr.device) * temperature, lr)[0]

    def mode_sample(self, lr: Tensor) -> Tensor:
        """The sample at ``z = 0`` (temperature 0)."""
        z = lr.new_zeros((lr.shape[0], 1, lr.shape[2] * self.scale, lr.shape[3] * self.scale))
        return self(z, lr)[0]
