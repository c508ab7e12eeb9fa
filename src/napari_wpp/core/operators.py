"""Forward operators f (blur + subsampling), their adjoints, and their estimation.

Conventions
-----------
* Images are floating point tensors of shape ``(..., H, W)`` (any leading batch dims);
  every operator is batched over the leading dims, differentiable in the image and has an
  exact adjoint of its linear part.
* HR pixel centres sit at integer coordinates. ``operator.sampling_offset`` is the HR
  coordinate that LR pixel 0 samples; LR pixel ``i`` samples ``sampling_offset + q * i``
  (the same on both axes). :func:`upsample_aligned` uses it, so baselines and
  initialisations line up with the data whatever the convention.
* HR sizes not divisible by the scale ``q``: the LR size is ``floor(H / q)``; the trailing
  ``H mod q`` HR rows/columns still enter through the blur but start no LR pixel.

Two operators are provided:

:class:`GaussianDownsampling`
    Gaussian blur (``kernel_size``², sum 1) then stride ``q``. ``anchor="center"`` (default)
    centres LR pixel ``i`` on HR ``q*i + (q-1)/2``; ``anchor="corner"`` reproduces the
    published code (kernel anchored top-left, padding at bottom/right only, so LR pixel ``i``
    samples around ``q*i + (kernel_size-1)/2``).
:class:`FourierDownsampling`
    ``y = S(k * x + b)``: circular convolution with an arbitrary kernel ``k`` (origin at index
    ``k.shape // 2``), a bias ``b``, then Fourier downsampling ``S`` (keep the central LR-sized
    block of the spectrum: ideal low-pass + subsampling at HR positions ``q*i``).
    :func:`estimate_operator` fits it to a registered HR/LR pair in closed form.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from napari_wpp.core.errors import InputError

__all__ = [
    "ForwardOperator",
    "GaussianDownsampling",
    "FourierDownsampling",
    "operator_from_dict",
    "add_noise",
    "upsample_aligned",
    "gaussian_kernel_1d",
    "check_operator_output",
]

_ANCHORS = ("center", "corner")
#: Kernels up to this size are accepted on any image (above it: at most 4× the image side).
MAX_SMALL_IMAGE_KERNEL = 256
#: No kernel is built with more taps than this (a Gaussian of σ 680 fits in it).
MAX_KERNEL_SIZE = 4096
_PADDINGS = ("circular", "reflect", "zeros")


# --------------------------------------------------------------------------- validation
def check_scale(scale: Any) -> int:
    """``scale`` as an int, or an :class:`InputError` unless it is an integer ≥ 2."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Integral) or int(scale) < 2:
        raise InputError(f"scale must be an integer >= 2, got {scale!r}")
    return int(scale)


def _check_image(x: Any, name: str = "image") -> Tensor:
    if not isinstance(x, Tensor):
        raise InputError(
            f"{name} must be a torch tensor of shape (..., H, W), got {type(x).__name__}"
        )
    if x.ndim < 2:
        raise InputError(f"{name} must have shape (..., H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(
            f"{name} must be a floating point tensor (float32 in [0, 1]), got {x.dtype}"
        )
    return x


def is_number(v: Any) -> bool:
    """Whether ``v`` is a real number (not a bool)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# --------------------------------------------------------------------------- base class
def check_operator_output(operator: torch.nn.Module, output: Tensor) -> None:
    """Refuse NaN/Inf that ``operator`` produced from a finite image (an overflowing kernel).

    The message blames the operator (and names its file when it was read from one:
    ``operator.source``), not the image, whose pixels were checked when it was read.
    """
    if bool(torch.isfinite(output).all()):
        return
    source = getattr(operator, "source", None)
    named = f"operator file {source}" if source else "the forward operator"
    raise InputError(
        f"{named} turns a finite image into NaN/Inf values (its kernel or bias overflows "
        "float32): estimate or write the operator again, or use --scale/--sigma"
    )


class ForwardOperator(torch.nn.Module, ABC):
    """Abstract forward operator ``f``: HR image ``(..., H, W)`` -> LR ``(..., H//q, W//q)``.

    Attributes
    ----------
    scale
        Integer downsampling factor ``q >= 2``.
    """

    scale: int

    @abstractmethod
    def forward(self, hr: Tensor) -> Tensor:
        """Apply the operator to ``hr`` of shape ``(..., H, W)``."""

    @abstractmethod
    def adjoint(self, lr: Tensor, hr_shape: tuple[int, int] | None = None) -> Tensor:
        """Exact adjoint of the linear part of :meth:`forward`.

        Parameters
        ----------
        lr
            LR tensor of shape ``(..., h, w)``.
        hr_shape
            HR size ``(H, W)``; default ``(q*h, q*w)``. Needed when H or W is not a multiple
            of the scale.
        """

    @property
    @abstractmethod
    def sampling_offset(self) -> float:
        """HR coordinate sampled by LR pixel 0 (LR pixel ``i`` samples ``offset + q*i``)."""

    @abstractmethod
    def to_dict(self) -> dict:
        """JSON-serialisable description with a ``"kind"`` key (see :func:`operator_from_dict`)."""

    @property
    def border_margin(self) -> int:
        """LR pixels at each side whose value the operator's padding decides, not the image.

        ``⌈kernel_size / q⌉``: near the border the kernel reaches past the HR image, where
        circular or reflected padding stands in for content an estimate cannot know.
        """
        return math.ceil(int(getattr(self, "kernel_size", self.scale)) / self.scale)

    def interior_mask(self, lr_shape: tuple[int, ...]) -> Tensor:
        """Boolean LR mask without :attr:`border_margin` pixels at each side.

        The whole image when that would leave nothing (an LR image of at most twice the
        margin on an axis).
        """
        mask = torch.ones(tuple(lr_shape[-2:]), dtype=torch.bool)
        m = self.border_margin
        if min(mask.shape) > 2 * m:
            mask[:m] = mask[-m:] = False
            mask[:, :m] = mask[:, -m:] = False
        return mask

    def lr_shape(self, hr_shape: tuple[int, int]) -> tuple[int, int]:
        """LR size ``(floor(H/q), floor(W/q))`` for an HR size ``(H, W)``."""
        if len(hr_shape) != 2:
            raise InputError(f"hr_shape must be (H, W), got {tuple(hr_shape)!r}")
        h, w = int(hr_shape[0]) // self.scale, int(hr_shape[1]) // self.scale
        if h < 1 or w < 1:
            raise InputError(
                f"HR size {tuple(hr_shape)} is smaller than the scale {self.scale}: "
                f"use images of at least {self.scale}x{self.scale} pixels"
            )
        return h, w

    def _hr_shape_for(self, lr: Tensor, hr_shape: tuple[int, int] | None) -> tuple[int, int]:
        h, w = lr.shape[-2:]
        if hr_shape is None:
            return h * self.scale, w * self.scale
        hr_shape = (int(hr_shape[0]), int(hr_shape[1]))
        if self.lr_shape(hr_shape) != (h, w):
            raise InputError(
                f"LR shape {(h, w)} does not match HR shape {hr_shape} at scale {self.scale}: "
                f"expected LR {self.lr_shape(hr_shape)}"
            )
        return hr_shape


# --------------------------------------------------------------------------- Gaussian
def gaussian_kernel_1d(size: int, sigma: float, center: float | None = None) -> Tensor:
    """Sampled 1-D Gaussian of ``size`` taps, normalised to sum 1 (float64).

    Parameters
    ----------
    size
        Number of taps.
    sigma
        Standard deviation in pixels (> 0).
    center
        Position of the mean in tap indices; default ``(size - 1) / 2``.
    """
    if center is None:
        center = (size - 1) / 2
    t = torch.arange(size, dtype=torch.float64) - center
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def _pad_index(n: int, left: int, right: int, mode: str) -> tuple[Tensor, Tensor | None]:
    """Gather indices (and a validity mask for zero padding) padding a length-n axis.

    Negative ``left``/``right`` crop instead of pad.
    """
    idx = torch.arange(-left, n + right)
    if mode == "circular":
        return torch.remainder(idx, n), None
    if mode == "reflect":
        if n == 1:
            return torch.zeros_like(idx), None
        period = 2 * (n - 1)
        m = torch.remainder(idx, period)
        return torch.where(m < n, m, period - m), None
    valid = (idx >= 0) & (idx < n)
    return idx.clamp(0, n - 1), valid


class GaussianDownsampling(ForwardOperator):
    """Separable Gaussian blur followed by subsampling with stride ``q``.

    Parameters
    ----------
    scale
        Integer factor ``q >= 2``.
    sigma
        Standard deviation(s) in HR pixels, a scalar or ``(sigma_y, sigma_x)``, each > 0.
    kernel_size
        Taps of the (square) kernel; it is sampled around ``(kernel_size - 1) / 2`` and
        normalised to sum 1 (with ``anchor="center"`` and ``kernel_size - q`` odd the Gaussian
        is moved by half a tap so that sampling stays exactly centred).
    anchor
        ``"center"``: LR pixel ``i`` samples HR around ``q*i + (q-1)/2``. ``"corner"``: the
        published convention, kernel anchored top-left with padding at bottom/right only, so LR
        pixel ``i`` samples around ``q*i + (kernel_size-1)/2``.
    padding
        Boundary handling: ``"circular"``, ``"reflect"`` (mirror without repeating the edge)
        or ``"zeros"``.
    """

    def __init__(
        self,
        scale: int,
        sigma: float | tuple[float, float],
        kernel_size: int = 16,
        anchor: str = "center",
        padding: str = "circular",
    ) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        if is_number(sigma):
            sig = (float(sigma), float(sigma))
            self._sigma_scalar = True
        elif (
            isinstance(sigma, (tuple, list))
            and len(sigma) == 2
            and all(is_number(s) for s in sigma)
        ):
            sig = (float(sigma[0]), float(sigma[1]))
            self._sigma_scalar = False
        else:
            raise InputError(f"sigma must be a number or a pair (sigma_y, sigma_x), got {sigma!r}")
        if not all(math.isfinite(s) and s > 0 for s in sig):
            raise InputError(f"sigma must be > 0 (blur width in HR pixels), got {sigma!r}")
        if (
            isinstance(kernel_size, bool)
            or not isinstance(kernel_size, numbers.Integral)
            or kernel_size < 1
        ):
            raise InputError(f"kernel_size must be a positive integer, got {kernel_size!r}")
        if kernel_size > MAX_KERNEL_SIZE:  # refused before its taps are sampled
            raise InputError(
                f"kernel size {kernel_size} is far too large: use a kernel size of at most "
                f"{MAX_KERNEL_SIZE} (about 6·sigma + 1 taps hold the Gaussian, e.g. "
                "--kernel-size 13 for sigma 2)"
            )
        if anchor not in _ANCHORS:
            raise InputError(f"anchor must be one of {', '.join(_ANCHORS)}, got {anchor!r}")
        if padding not in _PADDINGS:
            raise InputError(f"padding must be one of {', '.join(_PADDINGS)}, got {padding!r}")
        self.sigma: tuple[float, float] = sig
        self.kernel_size = int(kernel_size)
        self.anchor = anchor
        self.padding = padding
        k, q = self.kernel_size, self.scale
        if anchor == "center":
            self._left = (k - q) // 2
            center = self._left + (q - 1) / 2
        else:
            self._left = 0
            center = (k - 1) / 2
        self.register_buffer("_gy", gaussian_kernel_1d(k, sig[0], center), persistent=False)
        self.register_buffer("_gx", gaussian_kernel_1d(k, sig[1], center), persistent=False)

    @property
    def kernel(self) -> Tensor:
        """The 2-D blur kernel (``kernel_size`` x ``kernel_size``, sum 1, float64)."""
        return torch.outer(self._gy, self._gx)

    @property
    def sampling_offset(self) -> float:
        if self.anchor == "center":
            return (self.scale - 1) / 2
        return (self.kernel_size - 1) / 2

    def _padding_plan(self, n: int) -> tuple[int, int, int]:
        """(left, right, n_lr) so that the padded axis gives exactly ``n // q`` outputs."""
        q, k = self.scale, self.kernel_size
        n_lr = n // q
        if n_lr < 1:
            raise InputError(
                f"image size {n} is smaller than the scale {q}: use images of at least {q} pixels"
            )
        largest = max(4 * n, MAX_SMALL_IMAGE_KERNEL)
        if k > largest:  # padding alone would need (k / n)² times the image's memory
            raise InputError(
                f"kernel size {k} is far larger than the image ({n} pixels): use a kernel "
                f"size of at most {largest} (e.g. --kernel-size 13) or a larger image"
            )
        right = q * (n_lr - 1) + k - n - self._left
        return self._left, right, n_lr

    def _pad(self, x: Tensor, dim: int, left: int, right: int) -> Tensor:
        idx, valid = _pad_index(x.shape[dim], left, right, self.padding)
        out = x.index_select(dim, idx.to(x.device))
        if valid is not None:
            shape = [1] * x.ndim
            shape[dim] = -1
            out = out * valid.to(device=x.device, dtype=x.dtype).view(shape)
        return out

    def _pad_adjoint(self, y: Tensor, dim: int, n: int, left: int, right: int) -> Tensor:
        idx, valid = _pad_index(n, left, right, self.padding)
        if valid is not None:
            shape = [1] * y.ndim
            shape[dim] = -1
            y = y * valid.to(device=y.device, dtype=y.dtype).view(shape)
        out_shape = list(y.shape)
        out_shape[dim] = n
        out = torch.zeros(out_shape, dtype=y.dtype, device=y.device)
        return out.index_add(dim, idx.to(y.device), y)

    def forward(self, hr: Tensor) -> Tensor:
        """Blur and subsample ``hr`` (``(..., H, W)``) to ``(..., H//q, W//q)``."""
        hr = _check_image(hr, "HR image")
        lead, (H, W) = hr.shape[:-2], hr.shape[-2:]
        ly, ry, h = self._padding_plan(H)
        lx, rx, w = self._padding_plan(W)
        x = hr.reshape(-1, 1, H, W)
        x = self._pad(self._pad(x, 2, ly, ry), 3, lx, rx)
        gy = self._gy.to(x).view(1, 1, -1, 1)
        gx = self._gx.to(x).view(1, 1, 1, -1)
        x = F.conv2d(x, gx, stride=(1, self.scale))
        x = F.conv2d(x, gy, stride=(self.scale, 1))
        return x.reshape(*lead, h, w)

    def adjoint(self, lr: Tensor, hr_shape: tuple[int, int] | None = None) -> Tensor:
        lr = _check_image(lr, "LR image")
        H, W = self._hr_shape_for(lr, hr_shape)
        lead, (h, w) = lr.shape[:-2], lr.shape[-2:]
        ly, ry, _ = self._padding_plan(H)
        lx, rx, _ = self._padding_plan(W)
        y = lr.reshape(-1, 1, h, w)
        gy = self._gy.to(y).view(1, 1, -1, 1)
        gx = self._gx.to(y).view(1, 1, 1, -1)
        y = F.conv_transpose2d(y, gy, stride=(self.scale, 1))  # rows: (h-1)q + k = padded H
        y = F.conv_transpose2d(y, gx, stride=(1, self.scale))
        y = self._pad_adjoint(self._pad_adjoint(y, 3, W, lx, rx), 2, H, ly, ry)
        return y.reshape(*lead, H, W)

    def to_dict(self) -> dict:
        sigma: float | list[float] = self.sigma[0] if self._sigma_scalar else list(self.sigma)
        return {
            "kind": "gaussian",
            "scale": self.scale,
            "sigma": sigma,
            "kernel_size": self.kernel_size,
            "anchor": self.anchor,
            "padding": self.padding,
        }

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, sigma={self.sigma}, kernel_size={self.kernel_size}, "
            f"anchor={self.anchor!r}, padding={self.padding!r}"
        )


# --------------------------------------------------------------------------- Fourier
def lr_frequency_index(n_hr: int, n_lr: int) -> Tensor:
    """HR FFT indices of the central ``n_lr`` frequencies, in LR FFT order."""
    f = torch.fft.fftfreq(n_lr, d=1.0 / n_lr).round().long()  # 0, 1, ..., -n//2, ..., -1
    return torch.remainder(f, n_hr)


class FourierDownsampling(ForwardOperator):
    """``y = S(k * x + b)``: circular convolution, bias, then Fourier downsampling.

    ``S`` keeps the central ``(H//q) x (W//q)`` block of the spectrum (ideal low-pass, then
    sampling at HR positions ``q*i``) and preserves the mean; the kernel is applied by circular
    convolution with its origin at index ``(kh//2, kw//2)``. LR pixel ``i`` thus samples the
    HR around ``q*i + sampling_offset`` where ``sampling_offset`` is the kernel's origin minus
    its centre of mass (0 for a symmetric odd kernel; estimated kernels carry the shift of the
    data, see :attr:`sampling_offset`).

    Parameters
    ----------
    scale
        Integer factor ``q >= 2``.
    kernel
        2-D kernel (numpy array or tensor), applied on the HR grid.
    bias
        Constant added after the convolution.
    noise_variance
        What the operator leaves unexplained in the LR scan it was estimated on: the variance
        of each 8 × 8 DCT coefficient of ``y - f(x)`` on the pair
        (:func:`napari_wpp.core.lr_denoise.noise_dct_variance`), or ``None``. Not used by the
        forward map; a WPPNet trained with it denoises its LR input at inference.
    """

    def __init__(
        self,
        scale: int,
        kernel: np.ndarray | Tensor,
        bias: float = 0.0,
        noise_variance: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        try:
            if isinstance(kernel, Tensor):
                k = kernel.detach().cpu().to(torch.float64)
            else:
                k = torch.as_tensor(np.asarray(kernel, dtype=np.float64))
        except (TypeError, ValueError):
            raise InputError("kernel must be a 2-D array of numbers") from None
        if k.ndim != 2 or k.shape[0] < 1 or k.shape[1] < 1:
            raise InputError(f"kernel must be a 2-D array, got shape {tuple(k.shape)}")
        if not bool(torch.isfinite(k).all()):
            raise InputError("kernel contains NaN or infinite values: pass a finite kernel")
        if not is_number(bias) or not math.isfinite(float(bias)):
            raise InputError(f"bias must be a finite number, got {bias!r}")
        self.bias = float(bias)
        self.register_buffer("_kernel", k, persistent=False)
        self.noise_variance: np.ndarray | None = None
        if noise_variance is not None:
            from napari_wpp.core.lr_denoise import check_noise_variance

            self.noise_variance = check_noise_variance(noise_variance, "operator noise_variance")

    @property
    def kernel(self) -> Tensor:
        """The convolution kernel (float64, origin at index ``shape // 2``)."""
        return self._kernel

    @property
    def kernel_size(self) -> int:
        """Side of the (larger axis of the) kernel; the support that training keeps in crops."""
        return int(max(self._kernel.shape))

    @property
    def sampling_offset(self) -> float:
        """Kernel origin minus its centre of mass, averaged over both axes.

        Falls back to the geometric centre when the kernel sums to about zero.
        """
        k = self._kernel
        kh, kw = k.shape
        total = float(k.sum())
        if abs(total) < 1e-6:
            cy, cx = (kh - 1) / 2, (kw - 1) / 2
        else:
            cy = float((k.sum(1) * torch.arange(kh, dtype=k.dtype)).sum()) / total
            cx = float((k.sum(0) * torch.arange(kw, dtype=k.dtype)).sum()) / total
        return 0.5 * ((kh // 2 - cy) + (kw // 2 - cx))

    def _kernel_spectrum(self, H: int, W: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        kh, kw = self._kernel.shape
        if kh > H or kw > W:
            raise InputError(
                f"kernel {kh}x{kw} is larger than the HR image {H}x{W}: use a larger image"
            )
        k = self._kernel.to(device=device, dtype=dtype)
        padded = torch.zeros(H, W, dtype=dtype, device=device)
        padded[:kh, :kw] = k
        padded = torch.roll(padded, shifts=(-(kh // 2), -(kw // 2)), dims=(0, 1))
        return torch.fft.fft2(padded)

    def _apply_linear(self, hr: Tensor) -> Tensor:
        H, W = hr.shape[-2:]
        h, w = self.lr_shape((H, W))
        rows = lr_frequency_index(H, h).to(hr.device)
        cols = lr_frequency_index(W, w).to(hr.device)
        spec = torch.fft.fft2(hr, norm="forward") * self._kernel_spectrum(H, W, hr.dtype, hr.device)
        block = spec.index_select(-2, rows).index_select(-1, cols)
        return torch.fft.ifft2(block, norm="forward").real

    def forward(self, hr: Tensor) -> Tensor:
        """Apply ``S(k * hr + b)`` to ``hr`` of shape ``(..., H, W)``."""
        hr = _check_image(hr, "HR image")
        return self._apply_linear(hr) + self.bias

    def adjoint(self, lr: Tensor, hr_shape: tuple[int, int] | None = None) -> Tensor:
        lr = _check_image(lr, "LR image")
        H, W = self._hr_shape_for(lr, hr_shape)
        h, w = lr.shape[-2:]
        rows = lr_frequency_index(H, h).to(lr.device)
        cols = lr_frequency_index(W, w).to(lr.device)
        block = torch.fft.fft2(lr)  # adjoint of ifft2(norm="forward")
        full = torch.zeros((*lr.shape[:-2], H, w), dtype=block.dtype, device=lr.device)
        full = full.index_copy(-2, rows, block)
        full2 = torch.zeros((*lr.shape[:-2], H, W), dtype=block.dtype, device=lr.device)
        full2 = full2.index_copy(-1, cols, full)
        full2 = full2 * self._kernel_spectrum(H, W, lr.dtype, lr.device).conj()
        return torch.fft.ifft2(full2).real  # adjoint of fft2(norm="forward")

    def to_dict(self) -> dict:
        data = {
            "kind": "fourier",
            "scale": self.scale,
            "kernel": self._kernel.tolist(),
            "bias": self.bias,
        }
        if self.noise_variance is not None:
            data["noise_variance"] = self.noise_variance.tolist()
        return data

    def extra_repr(self) -> str:
        kh, kw = self._kernel.shape
        total = float(self._kernel.sum())
        return f"scale={self.scale}, kernel={kh}x{kw} (sum {total:.4f}), bias={self.bias:.5f}"


# --------------------------------------------------------------------------- (de)serialisation
def _get(data: dict, key: str, kind: str) -> Any:
    if key not in data:
        raise InputError(f"{kind} operator description lacks the key {key!r}: add it")
    return data[key]


def kernel_concern(kernel: Any) -> str | None:
    """What is questionable about a blur kernel (``None``: nothing).

    An all-zero or all-negative kernel, or one whose sum is near zero (it removes the mean
    intensity: every flat region degrades to about the same value), is accepted but probably
    a mistake.
    """
    k = np.asarray(kernel, dtype=np.float64)
    if k.size == 0 or not np.all(np.isfinite(k)):
        return None
    if not np.any(k):
        return "the kernel is all zero (every LR pixel is the bias)"
    if np.all(k <= 0):
        return f"the kernel is all negative (sum {k.sum():.3g}; a blur kernel is ≥ 0)"
    if abs(k.sum()) < 1e-3 * np.abs(k).sum():
        return f"the kernel sums to {k.sum():.3g}, near zero (a blur kernel sums to about 1)"
    return None


def warn_if_questionable_kernel(kernel: Any, where: str) -> None:
    """Warn (:class:`~napari_wpp.core.errors.QuestionableInputWarning`) about a bad kernel."""
    import warnings

    from napari_wpp.core.errors import QuestionableInputWarning

    concern = kernel_concern(kernel)
    if concern is not None:
        warnings.warn(
            f"{where}: {concern}; check the operator (re-estimate it from a registered pair)",
            QuestionableInputWarning,
            stacklevel=2,
        )


def operator_from_dict(data: dict) -> ForwardOperator:
    """Rebuild an operator from :meth:`ForwardOperator.to_dict` output.

    Raises
    ------
    InputError
        With a one-line message for missing keys, wrong types or bad values.
    """
    if not isinstance(data, dict):
        raise InputError(f"operator description must be a dict, got {type(data).__name__}")
    kind = data.get("kind")
    if kind == "gaussian":
        scale = _get(data, "scale", kind)
        sigma = _get(data, "sigma", kind)
        if isinstance(sigma, list):
            sigma = tuple(sigma)
        kernel_size = data.get("kernel_size", 16)
        anchor = data.get("anchor", "center")
        padding = data.get("padding", "circular")
        return GaussianDownsampling(scale, sigma, kernel_size, anchor=anchor, padding=padding)
    if kind == "fourier":
        scale = _get(data, "scale", kind)
        kernel = _get(data, "kernel", kind)
        bias = data.get("bias", 0.0)
        if not isinstance(kernel, (list, tuple, np.ndarray)):
            raise InputError("fourier operator 'kernel' must be a nested list (rows of numbers)")
        try:
            arr = np.asarray(kernel, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(
                "fourier operator 'kernel' must be a rectangular nested list of numbers"
            ) from None
        return FourierDownsampling(scale, arr, bias=bias, noise_variance=data.get("noise_variance"))
    raise InputError(f"unknown operator kind {kind!r}: use 'gaussian' or 'fourier'")


# --------------------------------------------------------------------------- noise, upsampling
def add_noise(
    lr: Tensor,
    sigma: float,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Add white Gaussian noise N(0, sigma²) to ``lr`` (a new tensor).

    The noise is drawn on the CPU (from ``generator``, else a generator seeded with ``seed``,
    else torch's global generator) and moved to ``lr``'s device, so a seed gives the same noise
    on every device.
    """
    lr = _check_image(lr, "LR image")
    if not is_number(sigma) or not math.isfinite(float(sigma)) or sigma < 0:
        raise InputError(f"noise sigma must be a number >= 0, got {sigma!r}")
    if generator is None and seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(lr.shape, generator=generator, dtype=lr.dtype, device=gen_device)
    return lr + float(sigma) * noise.to(lr.device)


_UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")


def upsample_aligned(
    lr: Tensor,
    operator: ForwardOperator,
    mode: str = "bicubic",
    hr_shape: tuple[int, int] | None = None,
) -> Tensor:
    """Interpolate ``lr`` onto the HR grid in register with ``operator``'s sampling.

    HR pixel ``p`` takes the LR value interpolated at LR coordinate
    ``(p - operator.sampling_offset) / q``; outside the LR samples the border is extended.
    For a centred operator this is ``F.interpolate(..., align_corners=False)``.

    Parameters
    ----------
    lr
        LR image(s) ``(..., h, w)``.
    operator
        The forward operator that produced ``lr``.
    mode
        ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
    hr_shape
        Output size; default ``(q*h, q*w)``.
    """
    lr = _check_image(lr, "LR image")
    if not isinstance(operator, ForwardOperator):
        raise InputError(
            f"operator must be a ForwardOperator, got {type(operator).__name__}: "
            "build one with operator_from_dict"
        )
    if mode not in _UPSAMPLE_MODES:
        raise InputError(f"mode must be one of {', '.join(_UPSAMPLE_MODES)}, got {mode!r}")
    q = operator.scale
    h, w = lr.shape[-2:]
    H, W = (h * q, w * q) if hr_shape is None else (int(hr_shape[0]), int(hr_shape[1]))
    off = operator.sampling_offset

    def axis(n_hr: int, n_lr: int) -> Tensor:
        u = (torch.arange(n_hr, dtype=torch.float64, device=lr.device) - off) / q
        # align_corners=True: -1 <-> LR pixel 0, +1 <-> LR pixel n_lr - 1
        g = 2.0 * u / (n_lr - 1) - 1.0 if n_lr > 1 else torch.zeros_like(u)
        return g.to(lr.dtype)

    gy, gx = axis(H, h), axis(W, w)
    x = lr.reshape(-1, 1, h, w)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # (H, W, 2): (x, y)
    grid = grid.unsqueeze(0).expand(x.shape[0], H, W, 2)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=True)
    return out.reshape(*lr.shape[:-2], H, W)
