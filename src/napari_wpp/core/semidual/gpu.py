"""Exact c-transform argmin on accelerators: a fused Triton kernel and a torch device path.

Both compute ``κ(j) = argmin_k ‖x_j − y_k‖² − ψ_k`` exactly (the lowest index among exact
float64 ties, as :func:`napari_wpp.core.semidual._brute_force64` picks), like the CPU grouped
engine of :mod:`napari_wpp.core.semidual`, but without host synchronisation inside the block
loop: on a GPU the grouped engine is bound by kernel launches and host syncs (``.item()``,
``.any()`` per block), not by arithmetic.

Scores. Both clouds are centred on the reference mean μ (float32) and the reference side is
augmented, ``ỹ_k = [−2 (y_k − μ), c_k]`` with ``c_k = |y_k − μ|² − ψ_k − shift`` (float64,
rounded once to float32; ``shift`` centres c), the generated side ``x̃_j = [x_j − μ, 1]``. One
(d+1)-term float32 dot product gives ``s_jk = ‖x_j − y_k‖² − ψ_k − |x_j − μ|² − shift``; the
row constant does not change the argmin.

Error bound. With u = 2⁻²⁴, ``T_j = 2 |x_j − μ| max_k |y_k − μ| + max_k |c_k|`` and the
constants of the CPU engine (same derivation: a (d+1)-term dot product in any summation
order, blocked or FMA, zero padding terms adding no error, plus the roundings of the centred
inputs, of c and of the threshold), every computed score is within ``E_j = (d + 6) u T_j +
3 u max_k |y_k − μ|²`` of its exact value (times 2 for inputs that are not float32). A row
whose computed runner-up exceeds its computed best by more than ``2 E_j`` (strictly) has its
computed winner as the exact argmin; every other row (near-ties, exact ties, duplicated
reference patches) is *uncertain* and is re-ranked in float64.

Triton path (:func:`triton_argmin`, CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

1. ``_top2_kernel``: one program per ``BLOCK_N`` generated patches loads and centres them
   (feature dimension padded to a power of two ≥ 16 for ``tl.dot``, the ones column built in
   registers), then streams tiles of ``BLOCK_M`` augmented reference patches (transposed,
   (d+1, M)). Per tile: an IEEE float32 ``tl.dot`` (no TF32), the tile minimum and its first
   argmin, the tile's second minimum (the tile with the argmin column masked, so a duplicate
   of the best in the same tile counts), merged into the running (best, index, second):
   ``second ← min(second, tile_second, max(best, tile_best))``, the index moves only on a
   strictly smaller tile best (earlier tiles hold lower indices). It writes the index and
   the uncertain flag ``not (second > best + 2 E_j)``. No N × M scores exist in memory.
2. The uncertain rows are compacted on the device (cumulative sum and scatter, their count
   stays a device tensor), and ``_rerank64_kernel`` runs on a fixed grid: programs past the
   count return at once, the others score their rows against all M points in float64 by
   direct differences (as the brute force) and keep the first minimum. No host sync, no
   nonzero(), one launch whatever the number of uncertain rows.

Torch device path (:func:`device_argmin`, any device, MPS included): large blocks of the
score matrix by ``addmm`` (``DEVICE_BLOCK_ELEMS`` entries), a top-2 per row, best, index and
runner-up written into preallocated tensors (no sync per block); after all blocks, one
``nonzero`` gathers the uncertain rows (the pass's only sync, plus one for the rare overflow
below) and they are re-ranked in float64 in batches: a float64 matrix product gives their
``RERANK_CANDIDATES`` best candidates, direct float64 differences rank those (lowest index
among exact ties); a row whose candidate list might miss a point within the float64 error
bound of its best (more near-ties than candidates) falls back to the float64 brute force.
On MPS, which lacks float64, the re-rank runs on the CPU.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

__all__ = ["device_argmin", "triton_argmin", "triton_available", "triton_usable"]

#: Generated patches per program of the fused kernel.
BLOCK_N = 64
#: Reference patches per streamed tile of the fused kernel.
BLOCK_M = 64
#: Warps per program of the fused kernel.
NUM_WARPS = 4
#: Uncertain rows per program of the float64 re-rank kernel.
RERANK_ROWS = 16
#: Reference patches per tile of the float64 re-rank kernel.
RERANK_COLS = 64
#: Score entries of one block of the torch device path (float32: 128 MB).
DEVICE_BLOCK_ELEMS = 1 << 25
#: Float64 score entries of one re-rank batch of the torch device path.
RERANK_ELEMS = 1 << 22
#: Float64 candidates per uncertain row in the torch device path's re-rank.
RERANK_CANDIDATES = 16
_U32 = 2.0**-24
_U64 = 2.0**-53


# ---------------------------------------------------------------------------- shared setup
def _reference_side(x: Tensor, y: Tensor, psi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean μ (d,), augmented references ỹ (M, d+1) (float32) and bound coefficients (2,).

    ``2 E_j = a |x_j − μ| + b`` with ``(a, b)`` returned as a float32 device tensor: nothing
    here syncs with the host.
    """
    d = y.shape[1]
    mu = y.double().mean(0).to(torch.float32)
    yc = y.to(torch.float32) - mu
    c64 = (yc.double() ** 2).sum(1) - psi.double()
    shift = 0.5 * (c64.amax() + c64.amin())
    c64 = c64 - shift
    y_aug = torch.cat([-2.0 * yc, c64.to(torch.float32)[:, None]], 1)
    ymax = yc.double().norm(dim=1).amax()
    const = c64.abs().amax()
    native = x.dtype == y.dtype == psi.dtype == torch.float32
    k32 = (1.0 if native else 2.0) * (d + 6) * _U32
    ksq = (1.0 if native else 2.0) * 3.0 * _U32 * ymax**2
    coeffs = torch.stack([2.0 * k32 * 2.0 * ymax, 2.0 * (k32 * const + ksq)])
    return mu, y_aug, coeffs.to(torch.float32)


# ---------------------------------------------------------------------------- Triton path
def triton_available() -> bool:
    """Whether Triton can be imported (it comes with torch's Linux CUDA wheels)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton path can run on ``device``: CUDA, or the CPU interpreter.

    ``TRITON_INTERPRET=1`` must be set before triton is first imported in the process.
    """
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


#: Kernels per mode (compiled, or Triton's CPU interpreter), built on first use.
_KERNELS: dict[tuple[bool, str], object] = {}


def _kernels() -> tuple[object, object]:
    """Triton kernels, defined on first use (the import stays optional).

    Triton picks the interpreter when a kernel is defined, so kernels are kept per mode.
    """
    mode = os.environ.get("TRITON_INTERPRET") == "1"
    if (mode, "top2") not in _KERNELS:
        import triton
        import triton.language as tl

        # fmt: off
        @triton.jit
        def top2_kernel(
            x_ptr, mu_ptr, yt_ptr, coeff_ptr,  # in: patches, their mean, Yᵀ with ψ, bound
            idx_ptr, unc_ptr,  # out: nearest index, 1 where the top-2 gap is not certified
            n, m, d, stride_x,
            K: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,  # noqa: N803
        ):
            # fmt: on
            pid = tl.program_id(0)
            rows = pid * BN + tl.arange(0, BN)
            ks = tl.arange(0, K)
            row_ok = rows < n
            feat = ks < d
            x_raw = tl.load(
                x_ptr + rows.to(tl.int64)[:, None] * stride_x + ks[None, :],
                mask=row_ok[:, None] & feat[None, :],
                other=0.0,
            ).to(tl.float32)
            mu = tl.load(mu_ptr + ks, mask=feat, other=0.0)
            xc = tl.where(feat[None, :], x_raw - mu[None, :], 0.0)
            xnorm = tl.sqrt(tl.sum(xc * xc, 1))
            xa = tl.where((ks == d)[None, :], 1.0, xc)
            best = tl.full((BN,), float("inf"), tl.float32)
            second = tl.full((BN,), float("inf"), tl.float32)
            idx = tl.zeros((BN,), tl.int32)
            lanes = tl.arange(0, BM)
            for start in range(0, m, BM):
                cols = start + lanes
                col_ok = cols < m
                yt = tl.load(
                    yt_ptr + ks[:, None] * m + cols[None, :],
                    mask=(ks <= d)[:, None] & col_ok[None, :],
                    other=0.0,
                )
                s = tl.dot(xa, yt, input_precision="ieee")
                s = tl.where(col_ok[None, :], s, float("inf"))
                t1 = tl.min(s, 1)
                a1 = tl.argmin(s, 1)
                t2 = tl.min(tl.where(lanes[None, :] == a1[:, None], float("inf"), s), 1)
                second = tl.minimum(tl.minimum(second, t2), tl.maximum(best, t1))
                idx = tl.where(t1 < best, start + a1, idx)
                best = tl.minimum(best, t1)
            bound2 = tl.load(coeff_ptr) * xnorm + tl.load(coeff_ptr + 1)
            certified = second > best + bound2
            tl.store(idx_ptr + rows, idx.to(tl.int64), mask=row_ok)
            tl.store(unc_ptr + rows, tl.where(certified, 0, 1).to(tl.int32), mask=row_ok)

        # fmt: off
        @triton.jit
        def rerank64_kernel(
            x_ptr, yt_ptr, psi_ptr,  # in: patches, Yᵀ, ψ
            slot_ptr, count_ptr,  # in: the rows to re-rank and how many there are
            idx_ptr,  # out: their nearest index in float64
            m, d, stride_x,
            BR: tl.constexpr, BM: tl.constexpr,  # noqa: N803
        ):
            # fmt: on
            pid = tl.program_id(0)
            count = tl.load(count_ptr)
            if pid * BR < count:
                slots = pid * BR + tl.arange(0, BR)
                slot_ok = slots < count
                rows = tl.load(slot_ptr + slots, mask=slot_ok, other=0).to(tl.int64)
                best = tl.full((BR,), float("inf"), tl.float64)
                idx = tl.zeros((BR,), tl.int64)
                for start in range(0, m, BM):
                    cols = start + tl.arange(0, BM)
                    col_ok = cols < m
                    acc = tl.zeros((BR, BM), tl.float64)
                    for i in range(0, d):
                        xi = tl.load(x_ptr + rows * stride_x + i).to(tl.float64)
                        yi = tl.load(yt_ptr + i * m + cols, mask=col_ok, other=0.0)
                        diff = xi[:, None] - yi.to(tl.float64)[None, :]
                        acc += diff * diff
                    p = tl.load(psi_ptr + cols, mask=col_ok, other=0.0).to(tl.float64)
                    s = tl.where(col_ok[None, :], acc - p[None, :], float("inf"))
                    t1 = tl.min(s, 1)
                    a1 = tl.argmin(s, 1)
                    idx = tl.where(t1 < best, start + a1.to(tl.int64), idx)
                    best = tl.minimum(best, t1)
                tl.store(idx_ptr + rows, idx, mask=slot_ok)

        _KERNELS[mode, "top2"] = top2_kernel
        _KERNELS[mode, "rerank64"] = rerank64_kernel
    return _KERNELS[mode, "top2"], _KERNELS[mode, "rerank64"]


def _compact(flags: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of the rows with ``flags == 1`` first (N+1,) and their count (1,), no sync."""
    n = flags.shape[0]
    pos = torch.cumsum(flags, 0, dtype=torch.int32)
    slot = torch.where(flags.bool(), pos.to(torch.int64) - 1, n)  # others land in slot n
    rows = torch.zeros(n + 1, dtype=torch.int32, device=flags.device)
    rows.scatter_(0, slot, torch.arange(n, dtype=torch.int32, device=flags.device))
    return rows, pos[-1:]


def triton_top2(x: Tensor, y: Tensor, psi: Tensor) -> tuple[Tensor, Tensor]:
    """Fused kernel only: computed winners (N,) int64 and uncertain flags (N,) int32."""
    n, d = x.shape
    m = y.shape[0]
    top2, _ = _kernels()
    mu, y_aug, coeffs = _reference_side(x, y, psi)
    yt = y_aug.T.contiguous()  # (d+1, M)
    x = x.contiguous()
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    flags = torch.empty(n, dtype=torch.int32, device=x.device)
    k = max(16, 1 << math.ceil(math.log2(d + 1)))
    grid = (math.ceil(n / BLOCK_N),)
    top2[grid](  # type: ignore[index]
        x, mu, yt, coeffs, idx, flags, n, m, d, x.stride(0),
        K=k, BN=BLOCK_N, BM=BLOCK_M, num_warps=NUM_WARPS,
    )  # fmt: skip
    return idx, flags


def triton_argmin(x: Tensor, y: Tensor, psi: Tensor) -> Tensor:
    """Exact argmin by the fused top-2 kernel and the float64 re-rank kernel (no host sync).

    Parameters
    ----------
    x, y, psi
        Generated patches (N, d), reference patches (M, d), potentials (M,), one device
        (CUDA, or CPU under ``TRITON_INTERPRET=1``); ``N ≥ 1``.

    Returns
    -------
    Tensor
        int64 (N,).
    """
    n, d = x.shape
    m = y.shape[0]
    _, rerank64 = _kernels()
    idx, flags = triton_top2(x, y, psi)
    slots, count = _compact(flags)
    x = x.contiguous()
    y_t = y.T.contiguous()  # (d, M) in the input dtype: float64 scores of the inputs
    grid = (math.ceil(n / RERANK_ROWS),)
    rerank64[grid](  # type: ignore[index]
        x, y_t, psi.contiguous(), slots, count, idx, m, d, x.stride(0),
        BR=RERANK_ROWS, BM=RERANK_COLS,
    )  # fmt: skip
    return idx


# ---------------------------------------------------------------------------- torch path
def device_top2(x: Tensor, y: Tensor, psi: Tensor) -> tuple[Tensor, Tensor]:
    """Block loop of the torch device path: computed winners (N,) and uncertain mask (N,)."""
    n, m = x.shape[0], y.shape[0]
    mu, y_aug, coeffs = _reference_side(x, y, psi)
    xc = x.to(torch.float32) - mu
    bound2 = coeffs[0] * xc.norm(dim=1) + coeffs[1]
    ones = torch.ones(n, 1, dtype=torch.float32, device=x.device)
    x_aug = torch.cat([xc, ones], 1)
    y_aug_t = y_aug.T.contiguous()
    best = torch.empty(n, dtype=torch.float32, device=x.device)
    second = torch.full((n,), math.inf, dtype=torch.float32, device=x.device)
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    rows = max(1, DEVICE_BLOCK_ELEMS // m)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        scores = x_aug[start:stop] @ y_aug_t  # (R, M)
        if m >= 2:
            top = scores.topk(2, dim=1, largest=False)  # ascending; exact ties stay uncertain
            best[start:stop] = top.values[:, 0]
            second[start:stop] = top.values[:, 1]
            idx[start:stop] = top.indices[:, 0]
        else:
            best[start:stop] = scores[:, 0]
            idx[start:stop] = 0
    return idx, ~(second > best + bound2)


def _float64_device(device: torch.device) -> torch.device:
    """Where float64 work runs: the device itself, or the CPU for MPS (no float64)."""
    return torch.device("cpu") if device.type == "mps" else device


def rerank64(x: Tensor, y: Tensor, psi: Tensor, rows: Tensor) -> Tensor:
    """Exact float64 argmin of the given rows, batched; lowest index among exact ties.

    A float64 matrix product (centred) gives each row's ``RERANK_CANDIDATES`` best points;
    direct float64 differences (the brute force's formula) rank them. A row is complete when
    its last candidate's product score exceeds its best by more than twice the float64 error
    bound (no other point can win or tie), or when all M points are candidates; the others
    go to the float64 brute force (one sync to find them).
    """
    from napari_wpp.core.semidual.engine import _brute_force64

    dev = _float64_device(x.device)
    m, d = y.shape
    y64 = y.to(dev, torch.float64)
    p64 = psi.to(dev, torch.float64)
    mu = y64.mean(0)
    yc = y64 - mu
    c = (yc * yc).sum(1) - p64
    ymax = yc.norm(dim=1).amax()
    pmax = p64.abs().amax()
    rows_dev = rows.to(dev)
    k = min(RERANK_CANDIDATES, m)
    batch = max(1, RERANK_ELEMS // m)
    out, complete = [], []
    for part in rows_dev.split(batch):
        x64 = x[part.to(x.device)].to(dev, torch.float64)
        xc = x64 - mu
        approx = torch.addmm(c, xc, yc.T, alpha=-2.0)  # ‖x − y‖² − ψ − |x − μ|²
        top = approx.topk(k, dim=1, largest=False)  # ascending
        cand = top.indices
        diff = x64[:, None, :] - y64[cand]
        exact = (diff * diff).sum(-1) - p64[cand]
        tied = exact == exact.amin(1, keepdim=True)
        out.append(torch.where(tied, cand, m).amin(1))
        # both formulas are within (2d + 12) u (|x − μ| + max|y − μ|)² + 2 u max|ψ| of the
        # exact score; a safety factor 4 on top
        xn = xc.norm(dim=1)
        err = 4.0 * ((2 * d + 12) * _U64 * (xn + ymax) ** 2 + 2.0 * _U64 * pmax)
        gap = top.values[:, -1] - top.values[:, 0]
        complete.append((gap > 2.0 * err) | (k == m))
    winners = torch.cat(out)
    incomplete = torch.nonzero(~torch.cat(complete)).squeeze(1)
    if incomplete.numel():
        winners[incomplete] = _brute_force64(
            x[rows_dev[incomplete].to(x.device)].to(dev), y.to(dev), psi.to(dev)
        )
    return winners.to(x.device)


def device_argmin(x: Tensor, y: Tensor, psi: Tensor) -> Tensor:
    """Exact argmin by large score blocks, top-2 certification and one float64 re-rank.

    Parameters
    ----------
    x, y, psi
        Generated patches (N, d), reference patches (M, d), potentials (M,), one device;
        ``N ≥ 1``.

    Returns
    -------
    Tensor
        int64 (N,).
    """
    idx, uncertain = device_top2(x, y, psi)
    rows = torch.nonzero(uncertain).squeeze(1)  # the pass's one sync, after all blocks
    if rows.numel():
        idx[rows] = rerank64(x, y, psi, rows)
    return idx
