"""Invertible building blocks of a conditional normalizing flow (WPPFlow; docs/algorithms.md).

Every block is a :class:`torch.nn.Module` acting on tensors of shape ``(B, C, H, W)`` with

* ``forward(x, cond=None) -> (y, logdet)``, where ``logdet`` has shape ``(B,)`` and holds
  ``log |det ∂y/∂x|`` per sample;
* ``inverse(y, cond=None) -> x``, the exact inverse of ``forward`` for the same ``cond``.

Blocks that do not use a condition accept and ignore ``cond`` so that :class:`FlowSequence`
can pass the same condition to every block. Conditional blocks need ``cond`` of shape
``(B, cond_channels, H, W)`` with the same batch size and spatial size as their input.

Blocks:

* :class:`Squeeze2x2` (space-to-depth, ``C, H, W -> 4C, H/2, W/2``);
* :class:`ActNorm` (per-channel affine map with data-dependent initialisation);
* :class:`InvertibleConv1x1` (LU-parametrised invertible 1×1 convolution);
* :class:`AffineCoupling` (affine coupling, optionally conditional);
* :class:`ConditionalAffineInjector` (affine map computed from the condition alone);
* :class:`EdgeShift` (conditional expansion along the edge-moving direction of each block);
* :class:`FixedPermutation` (seeded channel permutation);
* :class:`FlowSequence` (a chain of blocks).

Subnets end in a zero-initialised convolution, so couplings and injectors are the identity at
initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_wpp.core.errors import InputError

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "ConditionalAffineInjector",
    "EdgeShift",
    "FixedPermutation",
    "FlowBlock",
    "FlowSequence",
    "InvertibleConv1x1",
    "Squeeze2x2",
]


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}: pass e.g. 1")
    return value


def _check_input(x: Tensor, channels: int | None, block: str) -> None:
    """Raise :class:`InputError` unless ``x`` is a float ``(B, channels, H, W)`` tensor."""
    if not isinstance(x, Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(
            f"{block} needs a (B, C, H, W) tensor, got {shape}: add batch/channel axes"
        )
    if not x.is_floating_point():
        raise InputError(
            f"{block} needs a floating-point tensor, got {x.dtype}: convert with .float()"
        )
    if channels is not None and x.shape[1] != channels:
        raise InputError(
            f"{block} expects {channels} channels, got {x.shape[1]}: "
            f"pass a tensor with {channels} channels or build the block for {x.shape[1]}"
        )


def _check_cond(cond: Tensor | None, x: Tensor, cond_channels: int, block: str) -> Tensor:
    """Return ``cond`` after checking it fits ``x`` (same batch and spatial size)."""
    if cond is None:
        raise InputError(f"{block} is conditional: pass cond of shape (B, {cond_channels}, H, W)")
    if not isinstance(cond, Tensor) or cond.ndim != 4:
        shape = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
        raise InputError(f"{block} needs cond of shape (B, {cond_channels}, H, W), got {shape}")
    expected = (x.shape[0], cond_channels, x.shape[2], x.shape[3])
    if tuple(cond.shape) != expected:
        raise InputError(
            f"{block} needs cond of shape {expected} to match its input, got {tuple(cond.shape)}: "
            "resize the condition to the input's batch and spatial size"
        )
    return cond.to(dtype=x.dtype)


def _subnet(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """3×3 conv → ReLU → 1×1 conv → ReLU → zero-initialised 3×3 conv."""
    last = nn.Conv2d(hidden, out_channels, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1),
        nn.ReLU(),
        last,
    )


def _soft_clamp(raw: Tensor, clamp: float) -> Tensor:
    """Log-scale ``clamp · tanh(raw / clamp)``: about ``raw`` near 0, bounded by ``±clamp``."""
    return clamp * torch.tanh(raw / clamp)


def _check_clamp(clamp: float) -> float:
    if not clamp > 0:
        raise InputError(f"clamp must be positive, got {clamp!r}: pass e.g. 2.0")
    return float(clamp)


class FlowBlock(nn.Module):
    """Base class of invertible blocks: ``forward(x, cond) -> (y, logdet)``, ``inverse``."""

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        raise NotImplementedError


def _zeros_logdet(x: Tensor) -> Tensor:
    return x.new_zeros(x.shape[0])


class Squeeze2x2(FlowBlock):
    """Space-to-depth: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``, volume preserving.

    Output channel ``4c + 2i + j`` holds the input pixels ``(2h + i, 2w + j)`` of channel ``c``.

    Parameters
    ----------
    channels
        Optional input channel count to check inputs against (``None``: any).
    """

    def __init__(self, channels: int | None = None) -> None:
        super().__init__()
        self.channels = None if channels is None else _check_positive("channels", channels)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_input(x, self.channels, "Squeeze2x2")
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise InputError(
                f"Squeeze2x2 needs even height and width, got {h}×{w}: crop or pad to even sizes"
            )
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(b, 4 * c, h // 2, w // 2), _zeros_logdet(x)

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        _check_input(y, None if self.channels is None else 4 * self.channels, "Squeeze2x2")
        b, c4, h, w = y.shape
        if c4 % 4:
            raise InputError(
                f"Squeeze2x2.inverse needs a channel count divisible by 4, got {c4}: "
                "pass the output of Squeeze2x2.forward"
            )
        c = c4 // 4
        x = y.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c, 2 * h, 2 * w)


class ActNorm(FlowBlock):
    """Per-channel affine map ``y = x · exp(log_scale) + bias``.

    On the first forward call in training mode the parameters are set from the batch so that
    the output has zero mean and unit variance per channel (data-dependent initialisation);
    the ``initialized`` buffer records this and travels with the state dict.

    Parameters
    ----------
    channels
        Number of channels.
    eps
        Added to the batch standard deviation at initialisation.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.channels = _check_positive("channels", channels)
        self.eps = float(eps)
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set scale and shift so that ``forward(x)`` is standardised per channel."""
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        log_scale = -torch.log(std + self.eps)
        self.log_scale.copy_(log_scale)
        self.bias.copy_(-mean * torch.exp(log_scale))
        self.initialized.fill_(True)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_input(x, self.channels, "ActNorm")
        if self.training and not bool(self.initialized):
            self.initialize(x)
        y = x * torch.exp(self.log_scale) + self.bias
        logdet = x.shape[2] * x.shape[3] * self.log_scale.sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        _check_input(y, self.channels, "ActNorm")
        return (y - self.bias) * torch.exp(-self.log_scale)


class InvertibleConv1x1(FlowBlock):
    """Invertible 1×1 convolution ``W = P · L · (U + diag(sign_s · exp(log_s)))``.

    ``P`` (permutation) and ``sign_s`` are fixed buffers; the strictly lower part of the unit
    lower-triangular ``L``, the strictly upper part of ``U`` and ``log_s`` are learned. The
    initial ``W`` is a random orthogonal matrix.

    Parameters
    ----------
    channels
        Number of channels.
    seed
        Seed of the generator for the initial orthogonal matrix (``None``: global RNG).
    """

    def __init__(self, channels: int, seed: int | None = None) -> None:
        super().__init__()
        self.channels = _check_positive("channels", channels)
        generator = None
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        gaussian = torch.randn(channels, channels, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(gaussian)
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(diag).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(torch.tril(lower, -1).float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(diag.abs()).float())

    def weight(self) -> Tensor:
        """The ``(C, C)`` weight matrix."""
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_input(x, self.channels, "InvertibleConv1x1")
        weight = self.weight().to(x.dtype)
        y = F.conv2d(x, weight.view(self.channels, self.channels, 1, 1))
        logdet = x.shape[2] * x.shape[3] * self.log_s.sum()
        return y, logdet.to(x.dtype).expand(x.shape[0])

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        _check_input(y, self.channels, "InvertibleConv1x1")
        inverse = torch.linalg.inv(self.weight().to(torch.float64)).to(y.dtype)
        return F.conv2d(y, inverse.view(self.channels, self.channels, 1, 1))


class AffineCoupling(FlowBlock):
    """Affine coupling: the first half of the channels sets scale and shift of the second.

    ``x = (x1, x2)`` with ``x1`` the first ``channels // 2`` channels;
    ``(raw, t) = subnet([x1, cond])``, ``log_s = clamp · tanh(raw / clamp)``,
    ``y = (x1, x2 · exp(log_s) + t)``, ``logdet = Σ log_s``. The subnet (3×3 conv → ReLU →
    1×1 conv → ReLU → 3×3 conv) ends in a zero-initialised convolution, so the block is the
    identity at initialisation.

    Parameters
    ----------
    channels
        Number of channels (at least 2).
    hidden
        Hidden channels of the subnet.
    cond_channels
        Channels of the condition concatenated to the subnet input (0: unconditional).
    clamp
        Bound of the log-scale.
    """

    def __init__(
        self, channels: int, hidden: int = 64, cond_channels: int = 0, clamp: float = 2.0
    ) -> None:
        super().__init__()
        self.channels = _check_positive("channels", channels)
        if channels < 2:
            raise InputError(
                f"AffineCoupling needs at least 2 channels, got {channels}: squeeze first"
            )
        if (
            isinstance(cond_channels, bool)
            or not isinstance(cond_channels, int)
            or cond_channels < 0
        ):
            raise InputError(f"cond_channels must be an integer >= 0, got {cond_channels!r}")
        self.cond_channels = cond_channels
        self.clamp = _check_clamp(clamp)
        self.split = channels // 2
        self.subnet = _subnet(
            self.split + cond_channels,
            _check_positive("hidden", hidden),
            2 * (channels - self.split),
        )

    def _scale_shift(self, x1: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        inp = x1
        if self.cond_channels:
            inp = torch.cat([x1, _check_cond(cond, x1, self.cond_channels, "AffineCoupling")], 1)
        raw, shift = self.subnet(inp).chunk(2, dim=1)
        return _soft_clamp(raw, self.clamp), shift

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_input(x, self.channels, "AffineCoupling")
        x1, x2 = x[:, : self.split], x[:, self.split :]
        log_s, shift = self._scale_shift(x1, cond)
        y2 = x2 * torch.exp(log_s) + shift
        return torch.cat([x1, y2], dim=1), log_s.sum(dim=(1, 2, 3))

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        _check_input(y, self.channels, "AffineCoupling")
        y1, y2 = y[:, : self.split], y[:, self.split :]
        log_s, shift = self._scale_shift(y1, cond)
        return torch.cat([y1, (y2 - shift) * torch.exp(-log_s)], dim=1)


class ConditionalAffineInjector(FlowBlock):
    """Affine map of all channels with scale and shift computed from the condition alone.

    ``(raw, t) = subnet(cond)``, ``log_s = clamp · tanh(raw / clamp)``,
    ``y = x · exp(log_s) + t``, ``logdet = Σ log_s``. Identity at initialisation.

    Parameters
    ----------
    channels
        Number of channels of ``x``.
    cond_channels
        Channels of the condition (at least 1).
    hidden
        Hidden channels of the subnet.
    clamp
        Bound of the log-scale.
    """

    def __init__(
        self, channels: int, cond_channels: int, hidden: int = 64, clamp: float = 2.0
    ) -> None:
        super().__init__()
        self.channels = _check_positive("channels", channels)
        self.cond_channels = _check_positive("cond_channels", cond_channels)
        self.clamp = _check_clamp(clamp)
        self.subnet = _subnet(cond_channels, _check_positive("hidden", hidden), 2 * channels)

    def _scale_shift(self, x: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        cond = _check_cond(cond, x, self.cond_channels, "ConditionalAffineInjector")
        raw, shift = self.subnet(cond).chunk(2, dim=1)
        return _soft_clamp(raw, self.clamp), shift

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_input(x, self.channels, "ConditionalAffineInjector")
        log_s, shift = self._scale_shift(x, cond)
        return x * torch.exp(log_s) + shift, log_s.sum(dim=(1, 2, 3))

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        _check_input(y, self.channels, "ConditionalAffineInjector")
        log_s, shift = self._scale_shift(y, cond)
        return (y - shift) * torch.exp(-log_s)


class EdgeShift(FlowBlock):
    """Conditional stretch along the directions that move, turn and bend edges, per tile.

    The image is cut into ``block × block`` tiles; with an ``offset`` the grid starts that many
    pixels in, and the strips it leaves at the borders pass unchanged. The first channel ``g``
    of the condition is an edge pattern such as ``|∇ mean|``: adding ``d · g`` moves the edges
    by ``d`` pixels along their normals (to first order). In tile ``b`` the rows of
    ``V_b = [g, g·u, g·v, g·(u² − ⟨u²⟩), g·(v² − ⟨v²⟩)]`` (``u, v`` the pixel coordinates
    from the tile centre, scaled to ±1) move its edge, turn it and bend it. With
    ``Q_b = L⁻¹ V_b``, ``L Lᵀ = V_b V_bᵀ + ε²I`` (orthonormal rows, shrunk where ``g`` vanishes)

        ``y_b = x_b + Q_bᵀ Γ_b Q_b x_b``,  ``Γ_b = diag(exp(c_b) − 1)``,

    so ``logdet = Σ_b log det(I + Q_b Q_bᵀ Γ_b)`` and
    ``x_b = y_b − Q_bᵀ Γ_b (I + Q_b Q_bᵀ Γ_b)⁻¹ Q_b y_b``. ``c_b`` (five values per tile) is
    ``gain`` times the tile mean of a zero-initialised subnet of the whole condition,
    soft-clamped to ``±clamp``: the identity at initialisation; training decides how far each
    tile's edge varies. The gain keeps Adam's step bound (about its learning rate per
    step on the last bias) from limiting ``c``, as Glow scales the output of its
    zero-initialised convolutions.

    Parameters
    ----------
    cond_channels
        Channels of the condition; channel 0 is the edge pattern ``g``.
    hidden
        Hidden channels of the subnet.
    block
        Tile size in pixels (the input's height and width must be multiples of it).
    offset
        Shift of the tile grid in pixels (``0 ≤ offset < block``).
    clamp
        Bound of ``c``.
    eps
        ``ε`` of the normalisation (in the pattern's units).
    gain
        Factor on the subnet's output before the clamp.
    """

    modes = 5

    def __init__(
        self,
        cond_channels: int,
        hidden: int = 32,
        block: int = 4,
        offset: int = 0,
        clamp: float = 3.0,
        eps: float = 1e-3,
        gain: float = 1.0,
    ) -> None:
        super().__init__()
        self.cond_channels = _check_positive("cond_channels", cond_channels)
        self.block = _check_positive("block", block)
        if not (math.isfinite(gain) and gain > 0):
            raise InputError(f"EdgeShift gain must be a finite number > 0, got {gain}")
        self.gain = float(gain)
        if block < 2:
            raise InputError(f"EdgeShift needs tiles of at least 2×2 pixels, got {block}")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < block:
            raise InputError(f"offset must be an integer in [0, {block}), got {offset!r}")
        self.offset = offset
        self.clamp = _check_clamp(clamp)
        self.eps = float(eps)
        self.subnet = _subnet(cond_channels, _check_positive("hidden", hidden), self.modes)
        centred = torch.arange(block, dtype=torch.float32) - (block - 1) / 2.0
        centred = centred / centred.abs().max()
        rows, cols = centred[:, None].expand(block, block), centred[None, :].expand(block, block)
        bends = [r * r - (r * r).mean() for r in (rows, cols)]
        ramps = torch.stack([rows, cols, *bends])
        self.register_buffer("ramps", ramps.reshape(4, block * block), persistent=False)

    def _interior(self, t: Tensor) -> Tensor:
        """The part of ``t`` the tile grid covers (all of it unless the grid is offset)."""
        o = self.offset
        if not o:
            return t
        cut = self.block - o
        return t[..., o : t.shape[-2] - cut, o : t.shape[-1] - cut]

    def _tiles(self, t: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, h', w', C, k²)``: the tiles of the (offset) grid."""
        t = self._interior(t)
        b, c, h, w = t.shape
        k = self.block
        t = t.reshape(b, c, h // k, k, w // k, k).permute(0, 2, 4, 1, 3, 5)
        return t.reshape(b, h // k, w // k, c, k * k)

    def _untile(self, tiles: Tensor, like: Tensor) -> Tensor:
        """Tiles back into an image shaped like ``like``, whose border strips it keeps."""
        b, hk, wk, c = tiles.shape[:4]
        k = self.block
        inner = tiles.reshape(b, hk, wk, c, k, k).permute(0, 3, 1, 4, 2, 5)
        inner = inner.reshape(b, c, hk * k, wk * k)
        if not self.offset:
            return inner
        out = like.clone()
        self._interior(out).copy_(inner)
        return out

    def stretch(self, cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per tile: directions ``Q`` (…, 5, k²), ``Γ`` (…, 5) and ``I + QᵀQΓ`` (…, 5, 5).

        Depends on the condition only, so a caller drawing many samples of one image can
        compute it once (:meth:`apply`, :meth:`apply_inverse`).
        """
        h, w = cond.shape[-2:]
        if h % self.block or w % self.block:
            raise InputError(
                f"EdgeShift needs a height and width that are multiples of {self.block}, got "
                f"{h}×{w}: crop or pad the input"
            )
        g = self._tiles(cond[:, :1])  # (B, h', w', 1, k²)
        v = torch.cat([g, g * self.ramps.to(g.dtype)], dim=-2)  # (…, 5, k²)
        eye = torch.eye(self.modes, dtype=g.dtype, device=g.device)
        gram = v @ v.transpose(-1, -2) + self.eps**2 * eye
        chol = torch.linalg.cholesky(gram)
        q = torch.linalg.solve_triangular(chol, v, upper=False)  # rows: Qᵀ
        raw = self._tiles(self.subnet(cond)).mean(-1)  # (…, 5)
        c = _soft_clamp(self.gain * raw, self.clamp)
        gamma = torch.expm1(c)
        inner = eye + (q @ q.transpose(-1, -2)) * gamma.unsqueeze(-2)
        return q, gamma, inner

    def apply(self, x: Tensor, stretch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """``(y, logdet)`` of ``x`` for a precomputed :meth:`stretch`."""
        q, gamma, inner = stretch
        xt = self._tiles(x)  # (B, h', w', 1, k²)
        coef = (xt @ q.transpose(-1, -2)) * gamma.unsqueeze(-2)  # (…, 1, 5)
        yt = xt + coef @ q
        logdet = torch.linalg.slogdet(inner)[1].sum(dim=(1, 2))
        return self._untile(yt, x), logdet.expand(x.shape[0])

    def apply_inverse(self, y: Tensor, stretch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """``x`` with ``apply(x, stretch)[0] == y``."""
        q, gamma, inner = stretch
        yt = self._tiles(y)
        proj = yt @ q.transpose(-1, -2)  # (…, 1, 5)
        # row form of x = y − Q Γ (I + QᵀQ Γ)⁻¹ Qᵀ y: xᵀ = yᵀ − (yᵀQ)(I + Γ QᵀQ)⁻¹ Γ Qᵀ
        sol = torch.linalg.solve(inner, proj.transpose(-1, -2))
        coef = sol.transpose(-1, -2) * gamma.unsqueeze(-2)
        return self._untile(yt - coef @ q, y)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_input(x, 1, "EdgeShift")
        return self.apply(x, self.stretch(_check_cond(cond, x, self.cond_channels, "EdgeShift")))

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        _check_input(y, 1, "EdgeShift")
        cond = _check_cond(cond, y, self.cond_channels, "EdgeShift")
        return self.apply_inverse(y, self.stretch(cond))


class FixedPermutation(FlowBlock):
    """Fixed random channel permutation drawn from ``seed`` (volume preserving).

    Parameters
    ----------
    channels
        Number of channels.
    seed
        Seed of the permutation.
    """

    def __init__(self, channels: int, seed: int = 0) -> None:
        super().__init__()
        self.channels = _check_positive("channels", channels)
        generator = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(channels, generator=generator)
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_input(x, self.channels, "FixedPermutation")
        return x[:, self.perm], _zeros_logdet(x)

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        _check_input(y, self.channels, "FixedPermutation")
        return y[:, self.inverse_perm]


class FlowSequence(FlowBlock):
    """Chain of flow blocks: forward in order (log-dets summed), inverse in reverse order.

    ``cond`` is passed to every block; unconditional blocks ignore it.

    Parameters
    ----------
    blocks
        The blocks, each with ``forward(x, cond) -> (y, logdet)`` and ``inverse(y, cond)``.
    """

    def __init__(self, blocks: Iterable[nn.Module]) -> None:
        super().__init__()
        blocks = list(blocks)
        for block in blocks:
            if not isinstance(block, nn.Module) or not hasattr(block, "inverse"):
                raise InputError(
                    f"FlowSequence needs invertible flow blocks, got {type(block).__name__}: "
                    "pass blocks from napari_wpp.core.models.flow_blocks"
                )
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_input(x, None, "FlowSequence")
        logdet = _zeros_logdet(x)
        for block in self.blocks:
            x, block_logdet = block(x, cond)
            logdet = logdet + block_logdet
        return x, logdet

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        _check_input(y, None, "FlowSequence")
        for block in reversed(self.blocks):
            y = block.inverse(y, cond)
        return y
