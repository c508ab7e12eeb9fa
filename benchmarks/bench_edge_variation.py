"""What the WPPFlow loss charges for variance on edges: moving edges against white noise.

Takes a trained WPPFlow, draws one sample for each of 16 training crops (SiC ×4, published
corner operator), and adds extra variance to the pixels on the mean's strongest edges (top
10 % of ``|∇ mean|``) in two ways:

* white noise on those pixels (the baseline);
* moving the mean's edges along their normals by a smooth random displacement field
  (Gaussian-correlated over 1, 2 or 4 HR pixels, amplitudes 0.25–1 px).

For each it prints the added variance on the edge pixels and what the loss terms charge for
it per unit of that variance: the data term ``mean‖f(x) − y‖²/(2σ²)`` per LR pixel and the
patch prior ``W₂²`` (ψ re-solved for each perturbation), then the total at ρ = 100 and at the
published weighting ρ = 1600 per LR pixel, and the ratio of each to white noise measured in
the same run. Entropy pays the same per unit of log-variance either way, so the cheaper kind
is the one a trained flow should use.

Usage: ``python benchmarks/bench_edge_variation.py FLOW.safetensors [--data ../shared/data]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile
import torch
import torch.nn.functional as F

from napari_wpp.core.intensity import Normalisation
from napari_wpp.core.models.wppflow import edge_gradient, edge_pattern
from napari_wpp.core.operators import GaussianDownsampling
from napari_wpp.core.patches import extract_patches, sample_reference_patches
from napari_wpp.core.semidual import WassersteinPatchPrior
from napari_wpp.io import load_model

NOISE_STD = 0.01
RHOS = (100.0, 1600.0)


def _smooth_field(shape: torch.Size, corr: float, g: torch.Generator) -> torch.Tensor:
    """Unit-variance Gaussian random field correlated over ``corr`` pixels (circular)."""
    field = torch.randn(shape, generator=g)
    r = int(3 * corr) + 1
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * corr**2))
    k = k / k.sum()
    field = F.conv2d(F.pad(field, (r, r, 0, 0), mode="circular"), k[None, None, None, :])
    field = F.conv2d(F.pad(field, (0, 0, r, r), mode="circular"), k[None, None, :, None])
    return field / field.std()


def _move_edges(image: torch.Tensor, normal: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``image`` with each pixel's content moved by ``d`` pixels along ``normal`` (bicubic)."""
    _, _, h, w = image.shape
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    sx = xx - d[:, 0] * normal[:, 0]
    sy = yy - d[:, 0] * normal[:, 1]
    grid = torch.stack([2 * sx / (w - 1) - 1, 2 * sy / (h - 1) - 1], dim=-1)
    return F.grid_sample(image, grid, mode="bicubic", padding_mode="border", align_corners=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flow", type=Path, help="trained WPPFlow model file (SiC ×4)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--crops", type=int, default=16)
    parser.add_argument("--passes", type=int, default=60, help="ψ passes per perturbation")
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    state = load_model(args.flow)
    flow = state.model.eval()
    norm = Normalisation.from_dict(state.normalisation)
    sic = args.data / "sic"
    stack = norm.apply(tifffile.imread(sic / "train_lr_SiC_x4.tif")).astype(np.float32)
    ref = norm.apply(iio.imread(sic / "ref_SiC.png")).astype(np.float32)
    op = GaussianDownsampling(4, 2.0, kernel_size=16, anchor="corner", padding="circular")
    pick = torch.randperm(stack.shape[0], generator=g)[: args.crops]
    y = torch.from_numpy(stack)[pick][:, None]
    with torch.no_grad():
        mean = flow._context(y)[1][0]
        x0 = flow.sample(y, generator=g)
        grad = edge_pattern(mean)
        normal = edge_gradient(mean) / grad
    edge = grad >= torch.quantile(grad.flatten(), 0.9)

    prior = WassersteinPatchPrior(sample_reference_patches(ref, 5_000, patch_size=6, seed=0))

    def w2(x: torch.Tensor, passes: int) -> float:
        patches = extract_patches(x, 6)
        prior.ascend(patches, passes)
        return prior.value(patches)

    def data(x: torch.Tensor) -> float:
        residual = (op(x) - y)[..., 3:-3, 3:-3]
        return float((residual**2).mean() / (2 * NOISE_STD**2))

    base_w2 = w2(x0, 3 * args.passes)
    base_psi = prior.psi.clone()
    base_data = data(x0)
    base_var = float((x0 - mean)[edge].var())
    print(f"flow {args.flow.name}: {state.step} steps, ρ = {state.lam:g}; {args.crops} crops")
    print(f"sample: data {base_data:.3f}, W2² {base_w2:.5f}, edge-pixel std {base_var**0.5:.4f}")

    rows = []

    def measure(name: str, x: torch.Tensor) -> None:
        prior.reset()
        prior.psi = base_psi.clone()
        added = float((x - mean)[edge].var()) - base_var
        d_data = (data(x) - base_data) / added
        d_w2 = (w2(x, args.passes) - base_w2) / added
        rows.append((name, added, d_data, d_w2))

    with torch.no_grad():
        for tau in (0.04, 0.084):
            measure(f"white noise, std {tau}", x0 + tau * torch.randn(x0.shape, generator=g) * edge)
        for corr in (1.0, 2.0, 4.0):
            field = _smooth_field(x0.shape, corr, g)
            for amp in (0.25, 0.5, 1.0):
                moved = _move_edges(mean, normal, amp * field) - mean
                measure(f"edges moved {amp} px, corr {corr:g} px", x0 + moved)

    white = {rho: np.mean([r[2] + rho * r[3] for r in rows[:2]]) for rho in RHOS}
    head = " | ".join(f"ρ={rho:g} per var | vs white" for rho in RHOS)
    print(f"\n| extra variation | edge var added | data per var | W2² per var | {head} |")
    print("|---" * (4 + 2 * len(RHOS)) + "|")
    for name, added, d_data, d_w2 in rows:
        cells = []
        for rho in RHOS:
            total = d_data + rho * d_w2
            cells += [f"{total:.0f}", f"{total / white[rho]:.2f}×"]
        print(f"| {name} | {added:.5f} | {d_data:.1f} | {d_w2:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
