"""Synthetic material volumes for sample data, demos and tests.

A synthetic material is a binder holding grains of one or two other phases (so two or three
phases in all) with sharp, irregular boundaries and mild noise, like a CT scan of a sintered
composite. The structure is three-dimensional: slices are several voxels apart, so neighbouring
slices are similar but not identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.fft

from napari_wpp.core.config import default_sigma as config_default_sigma
from napari_wpp.core.errors import InputError

if TYPE_CHECKING:
    from napari_wpp.core.operators import ForwardOperator

__all__ = [
    "synthetic_volume",
    "SyntheticMaterial",
    "synthetic_material",
    "sample_data",
    "default_sigma",
]

# grey levels (uint8) of binder, faceted grains and bright irregular phase
_LEVELS = (75.0, 125.0, 195.0)
# volume fractions of the faceted grains and of the bright phase (the binder takes the rest)
_GRAIN_FRACTION = 0.30
_BRIGHT_FRACTION = 0.28
_Z_STEP = 6.0  # in-plane pixels per slice: slices are several voxels apart
_GRAIN_RADIUS = (7.0, 16.0)  # px
_GRAIN_FACETS = 9
_SIGMA_YX = 6.0  # correlation length of the bright phase (px)
_SIGMA_Z = 1.0  # ... along z (slices)
_DETAIL_YX = 1.5  # boundary roughness of the bright phase (px)
_DETAIL_WEIGHT = 0.5
_NOISE_STD = 4.0  # grey levels
_PSF_SIGMA = 0.6  # mild optical blur (px)


def default_sigma(scale: int) -> float:
    """Gaussian blur width of the published operators: 2 at ×4, 3 at ×6, 4 at ×8 (scale / 2).

    The rule is :func:`napari_wpp.core.config.default_sigma`'s (``OperatorSpec.sigma``).
    """
    return config_default_sigma(scale)


def _check_shape(shape: Any) -> tuple[int, int, int]:
    try:
        dims = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        raise InputError(f"shape {shape!r} invalid: give (Z, H, W) integers") from None
    if len(dims) != 3 or min(dims) < 1:
        raise InputError(f"shape {shape!r} invalid: give (Z, H, W) with positive sizes")
    return dims  # type: ignore[return-value]


def _gaussian_field(
    rng: np.random.Generator, shape: tuple[int, int, int], sigma: tuple[float, float, float]
) -> np.ndarray:
    """Standardised Gaussian random field (white noise filtered by a Gaussian, no wrap-around)."""
    pad = [int(np.ceil(3 * s)) for s in sigma]
    full = tuple(scipy.fft.next_fast_len(n + 2 * p, real=True) for n, p in zip(shape, pad))
    noise = rng.standard_normal(full, dtype=np.float32)
    spectrum = scipy.fft.rfftn(noise, workers=-1)
    for axis, (n, s) in enumerate(zip(full, sigma)):
        freq = scipy.fft.rfftfreq(n) if axis == 2 else scipy.fft.fftfreq(n)
        gain = np.exp(-2.0 * (np.pi * s * freq) ** 2).astype(np.float32)
        view = [1, 1, 1]
        view[axis] = -1
        spectrum *= gain.reshape(view)
    field = scipy.fft.irfftn(spectrum, s=full, workers=-1)
    field = field[tuple(slice(p, p + n) for p, n in zip(pad, shape))]
    field -= field.mean()
    field /= field.std() + 1e-12
    return field.astype(np.float32, copy=False)


def _faceted_grains(
    shape: tuple[int, int, int], fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Mask of randomly placed, randomly oriented faceted (polyhedral) grains."""
    z, h, w = shape
    mask = np.zeros(shape, dtype=bool)
    target = fraction * mask.size
    r_min, r_max = _GRAIN_RADIUS
    for count in range(1, 100_000):
        r = rng.uniform(r_min, r_max)
        rz = r / _Z_STEP
        c = (rng.uniform(-rz, z - 1 + rz), rng.uniform(-r, h - 1 + r), rng.uniform(-r, w - 1 + r))
        normals = rng.standard_normal((_GRAIN_FACETS, 3))
        normals /= np.linalg.norm(normals, axis=1, keepdims=True)
        ext = 1.7 * r
        lo = [
            max(int(np.floor(c[0] - ext / _Z_STEP)), 0),
            max(int(np.floor(c[1] - ext)), 0),
            max(int(np.floor(c[2] - ext)), 0),
        ]
        hi = [
            min(int(np.ceil(c[0] + ext / _Z_STEP)) + 1, z),
            min(int(np.ceil(c[1] + ext)) + 1, h),
            min(int(np.ceil(c[2] + ext)) + 1, w),
        ]
        if any(a >= b for a, b in zip(lo, hi)):
            continue
        vz = (np.arange(lo[0], hi[0]) - c[0])[:, None, None] * _Z_STEP
        vy = (np.arange(lo[1], hi[1]) - c[1])[None, :, None]
        vx = (np.arange(lo[2], hi[2]) - c[2])[None, None, :]
        dist = 0.6 * np.sqrt(vz**2 + vy**2 + vx**2)
        for n in normals:
            dist = np.maximum(dist, n[0] * vz + n[1] * vy + n[2] * vx)
        mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= dist < r
        if count % 16 == 0 and np.count_nonzero(mask) >= target:
            break
    return mask


def _phase_labels(shape: tuple[int, int, int], phases: int, rng: np.random.Generator) -> np.ndarray:
    """Labels 0 (binder), 1 (faceted grains) and, for 3 phases, 2 (bright irregular phase)."""
    labels = np.zeros(shape, dtype=np.uint8)
    grains = _faceted_grains(shape, _GRAIN_FRACTION, rng)
    labels[grains] = 1
    if phases == 3:
        field = _gaussian_field(rng, shape, (_SIGMA_Z, _SIGMA_YX, _SIGMA_YX))
        detail = (0.7 * _SIGMA_Z, _DETAIL_YX, _DETAIL_YX)
        field += _DETAIL_WEIGHT * _gaussian_field(rng, shape, detail)
        free = ~grains
        candidates = field[free]
        k = min(max(int(round(_BRIGHT_FRACTION * labels.size)), 1), candidates.size)
        if k > 0:
            threshold = np.partition(candidates, candidates.size - k)[candidates.size - k]
            labels[free & (field >= threshold)] = 2
    return labels


def _render(labels: np.ndarray, phases: int, rng: np.random.Generator) -> np.ndarray:
    """Grey levels of the phases, mild blur and noise, as uint8."""
    from scipy.ndimage import gaussian_filter

    levels = np.asarray(_LEVELS[:phases], dtype=np.float32)
    image = levels[labels]
    image = gaussian_filter(image, sigma=(0.0, _PSF_SIGMA, _PSF_SIGMA), mode="reflect")
    image += rng.normal(0.0, _NOISE_STD, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def synthetic_volume(
    shape: tuple[int, int, int] = (24, 256, 256), phases: int = 3, seed: int = 0
) -> np.ndarray:
    """High-resolution volume of a synthetic granular material.

    Parameters
    ----------
    shape
        ``(Z, H, W)``.
    phases
        2 (binder + faceted grains) or 3 (binder + faceted grains + bright irregular phase).
    seed
        Random seed; the same seed gives the same volume.

    Returns
    -------
    numpy.ndarray
        ``uint8`` volume of ``shape``: dark binder (grey 75), faceted grains (125, about 30 %)
        and, for 3 phases, a bright phase with irregular boundaries (195, about 28 %); mild
        blur (0.6 px) and noise (std 4 grey levels).
    """
    dims = _check_shape(shape)
    if phases not in (2, 3):
        raise InputError(f"phases={phases!r} unsupported: use 2 or 3")
    rng = np.random.default_rng(seed)
    labels = _phase_labels(dims, phases, rng)
    return _render(labels, phases, rng)


@dataclass
class SyntheticMaterial:
    """A synthetic superresolution problem with known truth.

    Attributes
    ----------
    hr
        ``(Z, H, W)`` uint8 truth.
    lr
        ``(Z, H // q, W // q)`` uint8 observation: ``operator`` applied to ``hr`` plus noise.
    reference
        ``(H, W)`` uint8 HR slice from a separate part of the same volume.
    operator
        The forward operator (centred Gaussian blur + subsampling).
    scale
        Factor ``q``.
    noise
        Noise standard deviation on the [0, 1] scale.
    """

    hr: np.ndarray
    lr: np.ndarray
    reference: np.ndarray
    operator: ForwardOperator
    scale: int
    noise: float


_REFERENCE_GAP = 8  # slices between the stack and the reference: several correlation lengths


def synthetic_material(
    shape: tuple[int, int, int] = (24, 256, 256),
    scale: int = 4,
    sigma: float | None = None,
    noise: float = 0.01,
    seed: int = 0,
    phases: int = 3,
) -> SyntheticMaterial:
    """Synthetic HR volume, its degraded LR stack and an independent HR reference slice.

    Parameters
    ----------
    shape
        HR ``(Z, H, W)``; ``H`` and ``W`` must be multiples of ``scale``.
    scale
        Downsampling factor ``q`` (2, 3, 4, 6, 8, ...).
    sigma
        Blur width in HR pixels; default :func:`default_sigma` (2 at ×4, 3 at ×6, 4 at ×8).
    noise
        Standard deviation of the Gaussian noise added to the LR images ([0, 1] scale), before
        8-bit quantisation.
    seed
        Random seed for the volume and the noise.
    phases
        2 or 3, see :func:`synthetic_volume`.
    """
    from napari_wpp.core.operators import GaussianDownsampling, add_noise

    z, h, w = _check_shape(shape)
    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise InputError(f"scale={scale!r} invalid: use an integer factor >= 1")
    scale = int(scale)
    if h % scale or w % scale:
        raise InputError(
            f"HR size {h}x{w} is not a multiple of scale {scale}: choose H and W divisible by it"
        )
    if noise < 0:
        raise InputError(f"noise={noise} is negative: use noise >= 0")
    sigma = default_sigma(scale) if sigma is None else float(sigma)
    volume = synthetic_volume((z + _REFERENCE_GAP + 1, h, w), phases=phases, seed=seed)
    hr = np.ascontiguousarray(volume[:z])
    reference = np.ascontiguousarray(volume[-1])

    import torch

    operator = GaussianDownsampling(scale, sigma, anchor="center")
    with torch.no_grad():
        x = torch.from_numpy(hr.astype(np.float32) / 255.0)
        y = operator(x)
        generator = torch.Generator().manual_seed(int(seed) + 1)
        y = add_noise(y, noise, generator=generator)
    lr = np.clip(np.rint(y.numpy() * 255.0), 0, 255).astype(np.uint8)
    return SyntheticMaterial(
        hr=hr, lr=lr, reference=reference, operator=operator, scale=scale, noise=float(noise)
    )


def sample_data() -> list[tuple[Any, dict[str, Any], str]]:
    """napari sample: HR reference, LR stack and HR truth of a synthetic material at ×4.

    Returns
    -------
    list of LayerDataTuple
        ``(data, kwargs, "image")`` for the reference (shown beside the stack), the LR stack
        (scale ``(1, q, q)`` and translate ``(0, (q - 1) / 2, (q - 1) / 2)`` so it overlays the
        HR grid) and the hidden HR truth. ``metadata["napari_wpp"]`` records each layer's role,
        the scale, the noise and the forward operator.
    """
    material = synthetic_material()
    q = material.scale
    z, h, w = material.hr.shape
    info = {
        "scale": q,
        "noise": material.noise,
        "operator": material.operator.to_dict(),
        "source": "napari_wpp.data.synthetic_material",
    }
    common = {"contrast_limits": (0, 255), "colormap": "gray"}
    offset = (q - 1) / 2.0
    return [
        (
            material.reference,
            {
                **common,
                "name": "synthetic HR reference",
                "translate": (0.0, float(w + 16)),
                "metadata": {"napari_wpp": {**info, "role": "reference"}},
            },
            "image",
        ),
        (
            material.lr,
            {
                **common,
                "name": f"synthetic LR stack (x{q})",
                "scale": (1.0, float(q), float(q)),
                "translate": (0.0, offset, offset),
                "metadata": {"napari_wpp": {**info, "role": "lr"}},
            },
            "image",
        ),
        (
            material.hr,
            {
                **common,
                "name": "synthetic HR truth",
                "visible": False,
                "metadata": {"napari_wpp": {**info, "role": "truth"}},
            },
            "image",
        ),
    ]
