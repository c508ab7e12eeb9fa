"""The prior weight: the default λ rule, the published flow weighting, λ chosen on the reference."""

from __future__ import annotations

import threading

import numpy as np
import torch

from napari_wpp.core.config.fields import default_of
from napari_wpp.core.config.training import (
    PAPER_LAMBDA_NUMERATOR,
    PUBLISHED_RHO_PER_CROP,
    TrainSpec,
)
from napari_wpp.core.errors import InputError
from napari_wpp.core.metrics import psnr
from napari_wpp.core.operators import ForwardOperator, add_noise

__all__ = [
    "AUTO_LAMBDA_GRID",
    "choose_lambda",
    "default_lambda",
    "operator_gain",
    "paper_lambda",
    "published_rho",
]

#: λ grid of ``lam="auto"`` (mean data term, single-scale prior, as in training).
AUTO_LAMBDA_GRID = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08)


def paper_lambda(crop_size: int) -> float:
    """λ = 12.5 / n_LR² (the papers' rule for a mean data term; 0.02 for 25×25 crops)."""
    return PAPER_LAMBDA_NUMERATOR / float(crop_size) ** 2


def operator_gain(operator: ForwardOperator) -> float:
    """The operator's gain on a constant image: its kernel sum, without the bias.

    ``f(1) − f(0)`` on a constant HR image, read away from the padded border (median of the
    LR interior): 1 for every normalised blur (the Gaussian operators), the kernel sum of an
    estimated kernel (about 1.8 for the registered sandstone pair, whose LR scan has more
    contrast than the HR scan).
    """
    q = operator.scale
    side = q * (2 * operator.border_margin + 4)
    param = next(iter(operator.buffers()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    with torch.no_grad():
        ones = operator(torch.ones(side, side, dtype=dtype))
        zeros = operator(torch.zeros(side, side, dtype=dtype))
    response = (ones - zeros)[operator.interior_mask(ones.shape)]
    # 12 significant digits: a normalised blur gives exactly 1, not 1 ± 1e-16
    return float(f"{float(response.median()):.12g}")


def default_lambda(crop_size: int, operator: ForwardOperator) -> float:
    """The default λ: the paper's rule times the operator's squared gain, ``12.5·g² / n_LR²``.

    The data term sees an HR error through the operator, amplified by its gain ``g``
    (:func:`operator_gain`): with ``g`` times the LR contrast, the data term is ``g²`` times
    larger than with the unit-gain blur the paper's rule was set for. Scaling λ by ``g²``
    keeps the balance of data and prior, and leaves the rule unchanged (0.02 for 25×25 crops)
    for unit-gain operators such as the Gaussian blurs of the SiC benchmarks.
    """
    return paper_lambda(crop_size) * operator_gain(operator) ** 2


def published_rho(noise_std: float, crop_size: int) -> float:
    """The published flow's weighting as our ρ per LR pixel: ``100 / (σ² · n_LR²)``.

    Dividing the published loss per crop by σ² and by the crop's ``n_LR²`` pixels gives our
    loss per LR pixel with this ρ: 1600 for σ = 0.01 and 25×25 crops.
    """
    return PUBLISHED_RHO_PER_CROP / (float(noise_std) ** 2 * float(crop_size) ** 2)


def choose_lambda(
    reference: np.ndarray,
    operator: ForwardOperator,
    noise_std: float = 0.01,
    grid: tuple[float, ...] = AUTO_LAMBDA_GRID,
    crop: int = 128,
    iterations: int = 60,
    seed: int = 0,
    device: str = "auto",
    stop: threading.Event | None = None,
    patch_distance: str = default_of(TrainSpec, "patch_distance"),
    projections: int = default_of(TrainSpec, "projections"),
) -> tuple[float, dict[float, float]]:
    """Choose λ on the reference itself (the papers' protocol).

    A central crop of the reference is degraded with ``operator`` and noise, reconstructed by
    variational WPP (single-scale prior, mean data term: the network's loss for one image)
    for every λ of ``grid`` against patches of the rest of the reference, and the λ with the
    best PSNR is returned with all scores. Because both losses use a mean data term and the
    W₂² of a pooled patch distribution, the variational λ carries over to the network
    unchanged. ``patch_distance`` and ``projections`` choose the prior, as in training.
    """
    from napari_wpp.core.reconstruct import VariationalConfig, run_reconstruction

    ref = np.asarray(reference, dtype=np.float32)
    if ref.ndim == 3:
        ref = ref[ref.shape[0] // 2]
    q = operator.scale
    side = min(crop, *ref.shape) // q * q
    if side < 4 * q:
        raise InputError(f"reference {ref.shape} is too small to choose lambda: give λ explicitly")
    y0 = (ref.shape[0] - side) // 2
    x0 = (ref.shape[1] - side) // 2
    truth = ref[y0 : y0 + side, x0 : x0 + side]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lr = add_noise(operator(torch.from_numpy(truth)), noise_std, generator=generator)
    lr_np = lr.numpy().astype(np.float32)
    scores: dict[float, float] = {}
    for lam in grid:
        if stop is not None and stop.is_set():
            break
        config = VariationalConfig(
            lam=lam,
            iterations=iterations,
            levels=1,
            seed=seed,
            device=device,
            n_reference_patches=5_000,
            patch_distance=patch_distance,
            projections=projections,
        )
        result = run_reconstruction(lr_np, ref, operator, config)
        border = min(8, side // 8)
        inner = (slice(border, -border),) * 2
        scores[lam] = psnr(np.clip(result.image, 0, 1)[inner], truth[inner], crop=0)
    if not scores:
        raise InputError("lambda search was stopped before it scored any λ")
    best = max(scores, key=scores.__getitem__)
    return best, scores
