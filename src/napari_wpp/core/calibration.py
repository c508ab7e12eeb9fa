"""Self-calibration of a WPPFlow's posterior std on a held-out part of the HR reference.

A flow's sample std is a spread, not yet an error bar: on SiC it is too small, most of all on
edges (docs/algorithms.md, "Calibrated std"). The reference knows better: a strip of it that
the patch prior never saw is degraded with the training operator and noise, the flow is
sampled on it, and the actual error of the posterior mean there is compared with the std.

:class:`StdCalibration` maps the raw std ``σ`` and the gradient magnitude ``g`` of the mean
to a calibrated std

    σ_cal = s · sqrt((a·σ)² + (b·g)² + c²),

``a``, ``b``, ``c`` fitted by Gaussian likelihood of the errors, then the one factor ``s``
chosen so that the shares of errors within 1, 2 and 3 σ_cal come closest to a Gaussian's
(68.3 / 95.4 / 99.7 %). The fit uses every other band of rows of the held-out strip; the
other bands measure the coverage the calibration promises (:attr:`StdCalibration.coverage`).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_wpp.core.errors import InputError
from napari_wpp.core.uncertainty import gaussian_coverage

__all__ = [
    "CALIBRATION_BAND",
    "CALIBRATION_MARGIN",
    "HeldoutErrors",
    "StdCalibration",
    "fit_std_calibration",
    "gradient_magnitude",
    "heldout_errors",
    "heldout_min_size",
    "split_heldout",
]

#: HR pixels left out on every side of a held-out strip (the operator's padding and the cut).
CALIBRATION_MARGIN = 16
#: Height in HR pixels of the bands of rows that alternate between fitting and checking.
CALIBRATION_BAND = 32
#: The ks of the coverage figures (truth within k std).
_KS = (1, 2, 3)


def gradient_magnitude(image: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of every 2D slice of ``(..., H, W)``, as float64."""
    from skimage.filters import sobel

    data = np.asarray(image, dtype=np.float64)
    slices = data.reshape((-1,) + data.shape[-2:])
    return np.stack([sobel(s) for s in slices]).reshape(data.shape)


def _coverage(error: np.ndarray, std: np.ndarray) -> tuple[float, float, float]:
    """Shares of ``|error| <= k·std`` for k = 1, 2, 3."""
    e = np.abs(error)
    return tuple(float(np.mean(e <= k * std)) for k in _KS)  # type: ignore[return-value]


@dataclass(frozen=True)
class StdCalibration:
    """A fitted map from a flow's raw std (and the mean's gradient) to a calibrated std.

    Attributes
    ----------
    std_scale, gradient_scale, floor
        ``a``, ``b`` and ``c`` of ``σ_cal = s·sqrt((a·σ)² + (b·g)² + c²)`` (``c`` in
        normalised intensity units, ``g`` the Sobel gradient magnitude of the mean).
    coverage_scale
        ``s``, which brings the coverage on the fitting pixels closest to a Gaussian's.
    coverage
        Shares of held-out pixels (not used by the fit) within 1, 2, 3 calibrated std.
    raw_coverage
        The same shares with the raw std.
    pixels
        Number of held-out pixels the coverage figures count.
    samples
        Posterior samples per pixel the calibration was fitted with.
    """

    std_scale: float
    gradient_scale: float
    floor: float
    coverage_scale: float = 1.0
    coverage: tuple[float, float, float] = (float("nan"),) * 3
    raw_coverage: tuple[float, float, float] = (float("nan"),) * 3
    pixels: int = 0
    samples: int = 0

    def calibrated_std(self, std: np.ndarray, mean: np.ndarray, unit: float = 1.0) -> np.ndarray:
        """The calibrated std (float32) of ``std`` and ``mean`` of shape ``(..., H, W)``.

        ``unit`` is the size of one normalised intensity unit in the arrays' units (the
        normalisation's ``high − low``; 1 for normalised arrays); the gradient is taken in
        the last two axes, the sampled planes.
        """
        s = np.asarray(std, dtype=np.float64)
        m = np.asarray(mean, dtype=np.float64)
        if s.shape != m.shape:
            raise InputError(f"std {s.shape} and mean {m.shape} differ in shape: pass matching")
        g = gradient_magnitude(m) if self.gradient_scale else 0.0
        out = self.coverage_scale * np.sqrt(
            (self.std_scale * s) ** 2 + (self.gradient_scale * g) ** 2 + (self.floor * unit) ** 2
        )
        return out.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """Plain floats and lists (a model file's metadata)."""
        return {
            "std_scale": float(self.std_scale),
            "gradient_scale": float(self.gradient_scale),
            "floor": float(self.floor),
            "coverage_scale": float(self.coverage_scale),
            "coverage": [float(c) for c in self.coverage],
            "raw_coverage": [float(c) for c in self.raw_coverage],
            "pixels": int(self.pixels),
            "samples": int(self.samples),
        }

    @classmethod
    def from_dict(cls, data: Any) -> StdCalibration:
        """Rebuild from :meth:`to_dict`; a damaged record raises ``InputError``."""
        try:
            calibration = cls(
                std_scale=float(data["std_scale"]),
                gradient_scale=float(data["gradient_scale"]),
                floor=float(data["floor"]),
                coverage_scale=float(data.get("coverage_scale", 1.0)),
                coverage=tuple(float(c) for c in data.get("coverage", (math.nan,) * 3)),
                raw_coverage=tuple(float(c) for c in data.get("raw_coverage", (math.nan,) * 3)),
                pixels=int(data.get("pixels", 0)),
                samples=int(data.get("samples", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"the std calibration record {data!r} is damaged ({exc}): calibrate the model again"
            ) from exc
        params = (calibration.std_scale, calibration.gradient_scale, calibration.floor)
        if not all(math.isfinite(v) and v >= 0 for v in (*params, calibration.coverage_scale)):
            raise InputError(
                f"the std calibration record has invalid parameters {params}: calibrate again"
            )
        return calibration

    def promise_text(self) -> str:
        """One line: the held-out coverage the calibrated std promises (and the raw std's)."""
        cal = " / ".join(f"{100 * c:.1f}" for c in self.coverage)
        raw = " / ".join(f"{100 * c:.1f}" for c in self.raw_coverage)
        gauss = " / ".join(f"{100 * gaussian_coverage(k):.1f}" for k in _KS)
        return (
            f"calibrated std: truth within 1/2/3 std on {cal} % of held-out reference pixels "
            f"(raw std {raw} %, Gaussian {gauss} %)"
        )


def _nll(params: np.ndarray, std: np.ndarray, grad: np.ndarray, error2: np.ndarray) -> float:
    a, b, c = np.exp(params)
    var = (a * std) ** 2 + (b * grad) ** 2 + c**2
    return float(np.mean(0.5 * np.log(var) + 0.5 * error2 / var))


def _coverage_scale(ratio: np.ndarray) -> float:
    """The factor ``s`` minimising the squared gaps of coverage at 1, 2, 3 std to a Gaussian's
    for normalised errors ``ratio = |error| / σ``."""
    candidates = np.exp(np.linspace(np.log(0.25), np.log(4.0), 401))
    target = np.array([gaussian_coverage(k) for k in _KS])
    sorted_ratio = np.sort(ratio)
    best, best_gap = 1.0, math.inf
    for s in candidates:
        shares = np.searchsorted(sorted_ratio, np.array(_KS) * s, side="right") / ratio.size
        gap = float(np.sum((shares - target) ** 2))
        if gap < best_gap:
            best, best_gap = float(s), gap
    return best


def fit_std_calibration(
    std: np.ndarray,
    gradient: np.ndarray,
    error: np.ndarray,
    fit: np.ndarray | None = None,
    use_gradient: bool = True,
    samples: int = 0,
) -> StdCalibration:
    """Fit a :class:`StdCalibration` to pixels' raw std, mean gradient and actual error.

    Parameters
    ----------
    std, gradient, error
        Arrays of one shape: the raw posterior std, the Sobel gradient magnitude of the mean
        and the mean's error (mean − truth), in normalised units.
    fit
        Boolean mask of the pixels to fit on; the others measure the coverage figures.
        ``None``: alternate halves of the flattened pixels (every other pixel).
    use_gradient
        ``False``: no gradient term (``b = 0``).
    samples
        Posterior samples per pixel (recorded).
    """
    from scipy.optimize import minimize

    s = np.asarray(std, dtype=np.float64).ravel()
    g = np.asarray(gradient, dtype=np.float64).ravel()
    e = np.asarray(error, dtype=np.float64).ravel()
    if not s.shape == g.shape == e.shape:
        raise InputError("std, gradient and error differ in size: pass arrays of one shape")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(g)) and np.all(np.isfinite(e))):
        raise InputError("std, gradient or error hold NaN or Inf: clean the arrays first")
    if fit is None:
        fit_mask = (np.arange(s.size) % 2) == 0
    else:
        fit_mask = np.asarray(fit, dtype=bool).ravel()
        if fit_mask.shape != s.shape:
            raise InputError("the fit mask differs in size from the arrays: pass one per pixel")
    check = ~fit_mask
    if fit_mask.sum() < 16 or check.sum() < 16:
        raise InputError(
            "too few pixels to fit and check a std calibration (16 each at least): use a larger "
            "held-out reference"
        )
    sf, gf, ef = s[fit_mask], g[fit_mask], e[fit_mask]
    rms = float(np.sqrt(np.mean(ef**2))) or 1e-6
    mean_std = float(np.mean(sf)) or rms
    mean_grad = float(np.mean(gf)) or 1.0
    start = np.log([rms / mean_std, 0.5 * rms / mean_grad, 0.5 * rms])
    gf_used = gf if use_gradient else np.zeros_like(gf)
    if not use_gradient:
        start[1] = np.log(1e-12)
    result = minimize(
        _nll,
        start,
        args=(sf, gf_used, ef**2),
        method="Nelder-Mead",
        options={"xatol": 1e-4, "fatol": 1e-9, "maxiter": 2000},
    )
    a, b, c = (float(v) for v in np.exp(result.x))
    if not use_gradient:
        b = 0.0
    shape = StdCalibration(a, b, c)
    fitted = np.sqrt((a * sf) ** 2 + (b * gf) ** 2 + c**2)
    scale = _coverage_scale(np.abs(ef) / fitted)
    held = np.sqrt((a * s[check]) ** 2 + (b * g[check]) ** 2 + c**2) * scale
    return StdCalibration(
        std_scale=shape.std_scale,
        gradient_scale=shape.gradient_scale,
        floor=shape.floor,
        coverage_scale=scale,
        coverage=_coverage(e[check], held),
        raw_coverage=_coverage(e[check], s[check]),
        pixels=int(check.sum()),
        samples=int(samples),
    )


def heldout_min_size(scale: int, margin: int = CALIBRATION_MARGIN) -> int:
    """The smallest held-out strip side (HR pixels) that leaves pixels to fit and check."""
    return 2 * margin + 2 * int(scale)


def split_heldout(reference: Any, share: float, min_size: int = 1) -> tuple[Any, list[np.ndarray]]:
    """Split the right-most ``share`` of every reference image's columns off.

    ``reference`` is a 2D image, a 3D volume (each slice split) or a list of them. Returns
    what trains the patch prior (the same kind as ``reference``) and the held-out strips (2D
    arrays; not copies). ``share`` 0 holds nothing out, nor does an image whose strip would
    be narrower or lower than ``min_size`` pixels (it is kept whole).
    """
    if not 0.0 <= share < 1.0:
        raise InputError(f"held-out share must be in [0, 1), got {share}")
    if isinstance(reference, list):
        parts = [split_heldout(region, share, min_size) for region in reference]
        return [p[0] for p in parts], [s for p in parts for s in p[1]]
    data = np.asarray(reference)
    if share == 0.0:
        return reference, []
    width = data.shape[-1]
    cut = int(round(width * share))
    if cut < max(1, min_size) or data.shape[-2] < min_size or width - cut < 1:
        return reference, []
    kept = data[..., : width - cut]
    strips = data[..., width - cut :]
    held = [strips] if strips.ndim == 2 else list(strips.reshape((-1,) + strips.shape[-2:]))
    return kept, held


@dataclass(frozen=True)
class HeldoutErrors:
    """Per-pixel raw std, mean gradient, error and fit/check split of held-out strips."""

    std: np.ndarray
    gradient: np.ndarray
    error: np.ndarray
    fit: np.ndarray


def heldout_errors(
    model: Any,
    strips: list[np.ndarray],
    operator: Any,
    noise_std: float,
    samples: int = 16,
    seed: int = 0,
    device: str = "cpu",
    stop: threading.Event | None = None,
    margin: int = CALIBRATION_MARGIN,
    band: int = CALIBRATION_BAND,
) -> HeldoutErrors:
    """Degrade each held-out strip (operator plus noise), sample the flow on it and measure.

    Strips are cut to a multiple of the scale; ``margin`` HR pixels on every side are left out
    of the figures; bands of ``band`` rows alternate between fitting (even) and checking.
    """
    import copy

    import torch

    from napari_wpp.core.inference import run_sample

    q = int(operator.scale)
    op = copy.deepcopy(operator).to("cpu")  # the caller's operator stays where it is
    generator = torch.Generator().manual_seed(int(seed))
    stds, grads, errors, fits = [], [], [], []
    for strip in strips:
        h, w = (np.asarray(strip).shape[0] // q) * q, (np.asarray(strip).shape[1] // q) * q
        if h - 2 * margin < 2 or w - 2 * margin < 2:
            continue
        truth = np.ascontiguousarray(np.asarray(strip, dtype=np.float32)[:h, :w])
        with torch.no_grad():
            lr = op(torch.from_numpy(truth)[None, None]).float()
            lr = lr + float(noise_std) * torch.randn(lr.shape, generator=generator)
        lr_image = lr[0, 0].numpy()
        result = run_sample(model, lr_image, samples, seed=seed, device=device, stop=stop)
        if result is None:
            raise InputError("calibration stopped")
        mean, std = result.mean.astype(np.float64), result.std.astype(np.float64)
        inner = (slice(margin, h - margin), slice(margin, w - margin))
        rows = np.arange(h)[inner[0]]
        band_fit = ((rows - margin) // band) % 2 == 0
        stds.append(std[inner].ravel())
        grads.append(gradient_magnitude(mean)[inner].ravel())
        errors.append((mean - truth)[inner].ravel())
        fits.append(np.repeat(band_fit, w - 2 * margin))
    if not stds:
        raise InputError(
            f"the held-out reference strips are too small for a calibration (need more than "
            f"{2 * margin} HR pixels each way): hold out a larger share or give a larger reference"
        )
    return HeldoutErrors(
        std=np.concatenate(stds),
        gradient=np.concatenate(grads),
        error=np.concatenate(errors),
        fit=np.concatenate(fits),
    )
