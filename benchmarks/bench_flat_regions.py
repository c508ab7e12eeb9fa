"""Variational WPP on flat regions: seconds per iteration with and without them (issue 14).

Three inputs on a 30 × 30 LR crop of SiC ×4 (``lr_SiC_x4.png``, reference ``ref_SiC.png``,
published corner operator):

* ``plain``: the crop and the reference as they are;
* ``saturated half``: the left half of the LR crop and of the reference clipped to 0 (a
  saturated phase or the zero area outside a CT field of view, shared by data and reference:
  thousands of identical patches);
* ``constant reference``: the plain crop against a constant reference.

Each runs ``--iterations`` iterations of the variational reconstruction
(after one warm-up iteration) and prints the median seconds per iteration and its ratio to
``plain`` (the bar: within 3×). Then the exactness check: after ψ ascent passes on the
saturated case's patches, the prior's assignment (one weighted point per distinct reference
patch) of 4,000 random rows is compared with the float64 brute force over every copy of the
reference patches.

    python benchmarks/bench_flat_regions.py [--iterations 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from shared_data import DATA_ROOT

from napari_wpp.core.operators import GaussianDownsampling
from napari_wpp.core.patches import sample_reference_patches, strided_patches
from napari_wpp.core.reconstruct import (
    ReconstructionProgress,
    VariationalConfig,
    reconstruct_variational,
)
from napari_wpp.core.semidual import WassersteinPatchPrior, c_transform_argmin


def load() -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    sic = DATA_ROOT / "sic"
    lr = np.asarray(Image.open(sic / "lr_SiC_x4.png"), np.float32) / 255.0
    ref = np.asarray(Image.open(sic / "ref_SiC.png"), np.float32) / 255.0
    return lr[40:70, 40:70].copy(), ref


def seconds_per_iteration(lr: np.ndarray, ref: np.ndarray, iterations: int) -> float:
    operator = GaussianDownsampling(4, 2.0, kernel_size=16, anchor="corner", padding="circular")
    config = VariationalConfig(iterations=iterations + 1, seed=0, device="cpu")
    times, last = [], None
    for event in reconstruct_variational(lr, ref, operator, config):
        if isinstance(event, ReconstructionProgress):
            now = time.perf_counter()
            if last is not None:
                times.append(now - last)
            last = now
    return statistics.median(times)


def exactness(lr: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    """Rows checked, rows that agree with the float64 brute force, distinct reference patches."""
    y = sample_reference_patches(ref, 10_000, patch_size=6, seed=0)
    up = torch.nn.functional.interpolate(
        torch.from_numpy(lr)[None, None], scale_factor=4, mode="bicubic"
    )[0, 0]
    x = strided_patches(up, 6, None, torch.Generator().manual_seed(0))
    prior = WassersteinPatchPrior(y)
    prior.ascend(x, 5)
    idx = c_transform_argmin(x, prior.reference, prior.psi)
    expanded = prior.psi if prior.weights is None else prior.psi[prior._distinct_index]
    rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))[:4000]
    y64, psi64 = y.double(), expanded.double()
    full = []
    for part in rows.split(32):  # direct float64 differences against every copy
        diff = x[part].double()[:, None, :] - y64[None]
        full.append(((diff * diff).sum(-1) - psi64).argmin(1))
    agree = int((prior.reference[idx[rows]] == y[torch.cat(full)]).all(1).sum())
    return rows.shape[0], agree, prior.reference.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=8, help="timed iterations per case")
    args = parser.parse_args()
    torch.manual_seed(0)
    lr, ref = load()
    saturated_lr, saturated_ref = lr.copy(), ref.copy()
    saturated_lr[:, :15] = 0.0
    saturated_ref[:, :300] = 0.0
    cases = {
        "plain": (lr, ref),
        "saturated half": (saturated_lr, saturated_ref),
        "constant reference": (lr, np.full_like(ref, 0.5)),
    }
    print(f"## variational WPP, 30×30 LR crop ×4, threads={torch.get_num_threads()}")
    print(f"{'case':20s} {'s/iteration':>12s} {'× plain':>8s}")
    plain = None
    for name, (lr_case, ref_case) in cases.items():
        t = seconds_per_iteration(lr_case, ref_case, args.iterations)
        plain = plain or t
        print(f"{name:20s} {t:12.3f} {t / plain:8.2f}")
    rows, agree, distinct = exactness(saturated_lr, saturated_ref)
    print(
        f"exactness (saturated half): {agree}/{rows} rows as the float64 brute force over all "
        f"10,000 reference patches ({distinct} distinct)"
    )


if __name__ == "__main__":
    main()
