"""Benchmark the estimators of ``FourierDownsampling`` (15x15 kernel + bias, scale 2).

For each method of :func:`napari_wpp.core.operator_estimation.estimate_operator` it prints

* the fit on the registered Fontainebleau sandstone pair (``../shared/data``): kernel sum,
  bias, peak, residual rms (published: 1.7735, -0.22338, 0.0499 at (6, 6), 0.0232);
* quadrant cross-validation: fit on one quadrant (HR 826², LR reduced to 413²), residual rms on
  each of the three others, mean over the 12 pairs (whole quadrant and with a 10 LR px border
  cropped, which removes the wrap-around of the circular model);
* a synthetic pair: the sandstone HR (top-left 826²) through a known anisotropic, off-centre
  15x15 kernel (sum 1.6) and bias -0.15, plus N(0, 0.01²) noise at native LR size: errors of
  the recovered kernel, sum and bias, and the rms of ``fitted(x) - true(x)`` (noise-free)
  on the fitted quadrant and on the three held-out quadrants.

Run: ``python benchmarks/bench_estimate_operator.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from shared_data import DATA_ROOT

from napari_wpp.core.operator_estimation import estimate_operator
from napari_wpp.core.operators import FourierDownsampling

DATA = DATA_ROOT / "fs_registered_pair"
SCALE = 2
CASES: list[tuple[str, dict]] = [
    ("published (block reduction)", {"method": "published", "reduction": "block"}),
    ("published eps=0", {"method": "published", "eps": 0.0}),
    ("published", {"method": "published"}),
    ("refined (default)", {}),
    ("refined lam=0.3", {"method": "refined", "lam": 0.3}),
    ("refined lam=10", {"method": "refined", "lam": 10.0}),
    ("lstsq", {"method": "lstsq"}),
]


def _load() -> tuple[np.ndarray, np.ndarray]:
    import imageio.v3 as iio

    hr = np.asarray(iio.imread(DATA / "FS_HR_estimate_operator.png")).astype(np.float64) / 255
    lr = np.asarray(iio.imread(DATA / "FS_LR_estimate_operator.png")).astype(np.float64) / 255
    return hr, lr


def _apply(op: FourierDownsampling, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return op(torch.from_numpy(x)).numpy()


def _rms(a: np.ndarray, crop: int = 0) -> float:
    if crop:
        a = a[crop:-crop, crop:-crop]
    return float(np.sqrt(np.mean(a**2)))


def _quadrants(n: int) -> list[tuple[slice, slice]]:
    m = n // 2
    return [(slice(r, r + m), slice(c, c + m)) for r in (0, m) for c in (0, m)]


def _cross_validation(hr: np.ndarray, lr: np.ndarray, kw: dict) -> tuple[float, float]:
    from napari_wpp.core import operators as ops

    reduction = kw.get("reduction", "antialias")
    parts = []
    for sl in _quadrants(hr.shape[0]):
        x = hr[sl]
        y = ops._reduce_to_lr(lr[sl], SCALE, reduction)
        parts.append((x, y, estimate_operator(x, y, SCALE, **kw).operator))
    full, cropped = [], []
    for i, (_, _, op) in enumerate(parts):
        for j, (x, y, _) in enumerate(parts):
            if i != j:
                r = _apply(op, x) - y
                full.append(_rms(r))
                cropped.append(_rms(r, crop=10))
    return float(np.mean(full)), float(np.mean(cropped))


def _true_kernel() -> np.ndarray:
    t = np.arange(15) - 7.0
    gy = np.exp(-0.5 * ((t - 0.5) / 1.3) ** 2)
    gx = np.exp(-0.5 * ((t + 0.3) / 1.0) ** 2)
    k = np.outer(gy, gx)
    k[5, 9] += 0.15 * k.max()  # a little asymmetry
    return 1.6 * k / k.sum()


def _synthetic(hr: np.ndarray, kw: dict) -> dict[str, float]:
    k_true, b_true = _true_kernel(), -0.15
    truth = FourierDownsampling(SCALE, k_true, bias=b_true)
    quads = _quadrants(hr.shape[0])
    x = hr[quads[0]]
    g = np.random.default_rng(0)
    y = _apply(truth, x) + 0.01 * g.standard_normal((x.shape[0] // SCALE, x.shape[1] // SCALE))
    est = estimate_operator(x, y, SCALE, **{k: v for k, v in kw.items() if k != "reduction"})
    held = [_rms(_apply(est.operator, hr[sl]) - _apply(truth, hr[sl])) for sl in quads[1:]]
    return {
        "kernel_err": float(np.linalg.norm(est.kernel - k_true) / np.linalg.norm(k_true)),
        "sum": est.kernel_sum,
        "bias": est.bias,
        "fit_rms": est.residual_rms,
        "op_err_in": _rms(_apply(est.operator, x) - _apply(truth, x)),
        "op_err_out": float(np.mean(held)),
    }


def main() -> None:
    hr, lr = _load()
    print(f"FS pair {hr.shape}, scale {SCALE}; synthetic truth: sum 1.6, bias -0.15, noise 0.01")
    print(
        f"{'method':28s} {'sum':>7s} {'bias':>8s} {'peak':>13s} {'rms':>8s} {'time':>6s} | "
        f"{'CV rms':>8s} {'CV crop':>8s} | {'syn kerr':>8s} {'sum':>6s} {'bias':>7s} "
        f"{'op err':>8s} {'held-out':>8s}"
    )
    for name, kw in CASES:
        t0 = time.perf_counter()
        est = estimate_operator(hr, lr, SCALE, 15, **kw)
        dt = time.perf_counter() - t0
        k = est.kernel
        pk = np.unravel_index(int(np.argmax(k)), k.shape)
        peak = f"{k.max():.4f}@({pk[0]},{pk[1]})"
        cv, cvc = _cross_validation(hr, lr, kw)
        s = _synthetic(hr, kw)
        print(
            f"{name:28s} {est.kernel_sum:7.4f} {est.bias:8.4f} {peak:>13s} "
            f"{est.residual_rms:8.5f} {dt:5.2f}s | {cv:8.5f} {cvc:8.5f} | "
            f"{s['kernel_err']:8.4f} {s['sum']:6.3f} {s['bias']:7.4f} "
            f"{s['op_err_in']:8.5f} {s['op_err_out']:8.5f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
