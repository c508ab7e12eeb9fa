"""Exact c-transform, semi-dual optimal transport and the Wasserstein Patch Prior.

The hot loop of every WPP method is the c-transform argmin

    κ(j) = argmin_k ‖x_j − y_k‖² − ψ_k,

for N generated patches x (N, d) against M reference patches y (M, d). It is computed here in
bounded memory (blocks of the score matrix, never the whole N × M matrix), without autograd,
and *exactly*: scores are computed fast in float32 (or lower precision), every row whose
winner is not certified by a rigorous floating-point error bound is re-ranked in float64.

Algorithm of one block of R generated patches (the "grouped" engine):

1. Centre both clouds on the reference mean and fold ``|y_k|² − ψ_k`` into an augmented
   matrix, so one matrix product gives the scores ``s_jk = |y_k|² − ψ_k − 2 x_j·y_k``
   (the row constant ``|x_j|²`` does not change the argmin) as a (M, R) block.
2. The reference points are split into G contiguous groups of B points; the minimum of each
   group is a fast vertical SIMD reduction, the winning group is found among the G minima.
3. A row is certified when the second-best group minimum exceeds the best one by more than
   twice the error bound ``E_j`` of the computed scores: the exact argmin must then lie in
   the winning group. Inside the group the candidates are the points within ``2 E_j`` of the
   best computed score; one candidate is the exact answer, several are re-ranked in float64.
4. Rows whose best candidates span several groups (ties between duplicate patches of real
   scans) are re-ranked in float64 among the points of every group whose minimum is within
   the bound; a float64 brute force (chunked) remains the last resort.

On the CPU the blocks are shared among worker threads (one per torch thread), each running
its operations single-threaded: many small parallel operations would otherwise each pay an
OpenMP barrier, which is slow on a busy machine. While a call runs, torch's thread count is
set to 1 in the workers and restored afterwards.

On CUDA (a fused Triton kernel) and other devices (a torch device path),
:func:`c_transform_argmin` runs :mod:`napari_wpp.core.semidual.gpu` instead: same bound, same
exact answer, no host synchronisation inside a pass; CPU tensors keep this engine.

The error bound (u = unit round-off of float32, d = dimension, T_j = 2 |x_j| max_k |y_k| +
max_k |c_k|, centred coordinates) is ``E_j = (d + 6) u T_j + 3 u max_k |y_k|²`` for float32
inputs. It is rigorous to first order in u with room to spare: a score is a (d+1)-term dot
product, whose error in any summation order (blocked, FMA) is at most ``γ_{d+1} Σ|terms| ≤
γ_{d+1} T_j`` with γ_K = K u / (1 − K u); rounding the centred inputs to float32 perturbs
``−2 x·y_k`` by at most ``2 u · 2 |x_j| |y_k|`` and ``|y_k|²`` by ``2 u |y_k|²``, rounding c by
``u |c_k|``; twice this per-score error plus the rounding of the threshold ``m₁ + 2 E_j``
(``u T_j``) is ``(2d + 9) u T_j + 4 u max |y_k|² ≤ 2 E_j``. (The row constant ``|x_j|²`` and
its rounding do not change the argmin.) For other input dtypes (rounded to float32 first)
the bound keeps a safety factor 2. Lower candidate precisions (bf16) add ``8 u_lo 2 |x_j|
max_k |y_k|``.

Pruned ψ passes within one prior call: :mod:`napari_wpp.core.semidual.pruning`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from napari_wpp.core.errors import InputError
from napari_wpp.core.semidual import gpu as semidual_gpu

if TYPE_CHECKING:
    from napari_wpp.core.semidual.pruning import _PassTracker

__all__ = [
    "c_transform",
    "c_transform_argmin",
]

#: Maximum number of entries of one score block (float32: 4 MB, measured best on 2 cores).
BLOCK_ELEMS = 1 << 20
#: Reference points per group of the grouped reduction.
GROUP_SIZE = 64
#: On the CPU, run blocks on worker threads (one per torch thread) instead of parallel ops.
THREADED = True
#: Interleaved score rows (group minima reduce over the outer dimension).
INTERLEAVED = True
#: Unit round-off of the precisions used for candidate scores.
_UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8}
_PAD_SCORE = 1e30
#: Candidates re-ranked in float64 when a row's winner is not certified across groups.
CROSS_CANDIDATES = 32
#: Rows not certified across groups whose score columns are scanned together.
CROSS_BATCH = 64


def _check_inputs(x: Tensor, y: Tensor, psi: Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2:
        raise InputError(
            f"patch matrices must be 2D (N, d) and (M, d), got {tuple(x.shape)} and "
            f"{tuple(y.shape)}: flatten patches first"
        )
    if x.shape[1] != y.shape[1]:
        raise InputError(
            f"patch dimensions differ ({x.shape[1]} vs {y.shape[1]}): use the same patch size "
            "for generated and reference patches"
        )
    if psi.ndim != 1 or psi.shape[0] != y.shape[0]:
        raise InputError(
            f"psi has shape {tuple(psi.shape)} but there are {y.shape[0]} reference patches: "
            "pass one potential per reference patch"
        )
    if y.shape[0] == 0:
        raise InputError("no reference patches: sample at least one reference patch")
    if not (x.device == y.device == psi.device):
        raise InputError(
            f"x, y and psi live on different devices ({x.device}, {y.device}, {psi.device}): "
            "move them to one device"
        )


@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device) -> Iterator[None]:
    """Temporarily forbid TF32 / reduced-precision reductions in CUDA matmuls."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    saved = (m.allow_tf32, m.allow_bf16_reduced_precision_reduction)
    m.allow_tf32 = False
    m.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_tf32, m.allow_bf16_reduced_precision_reduction = saved


def _exact_scores(x64: Tensor, y64: Tensor, psi64: Tensor) -> Tensor:
    """Float64 scores ``‖x_j − y_k‖² − ψ_k`` for rows x64 (U, d) against candidates.

    ``y64`` is (U, C, d) and ``psi64`` (U, C) (per-row candidates).
    """
    diff = x64[:, None, :] - y64
    return (diff * diff).sum(-1) - psi64


def _brute_force64(x: Tensor, y: Tensor, psi: Tensor) -> Tensor:
    """Float64 argmin by direct differences, chunked to at most ``BLOCK_ELEMS`` entries."""
    x64, y64, psi64 = x.double(), y.double(), psi.double()
    m, d = y64.shape
    rows = max(1, BLOCK_ELEMS // max(1, m * d))
    out = []
    for chunk in x64.split(rows):
        diff = chunk[:, None, :] - y64[None, :, :]
        out.append(((diff * diff).sum(-1) - psi64).argmin(1))
    if not out:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    return torch.cat(out)


#: Per-thread reusable score buffer (CPU): a fresh 4 MB block per matmul costs page faults.
_BUFFERS = threading.local()


def _score_block(y_aug: Tensor, x_aug: Tensor) -> Tensor:
    """Scores of one block: (M_pad, d+1) @ (R, d+1)ᵀ → (M_pad, R).

    Kept as a separate function so tests can observe the block shapes (memory bound). On the
    CPU the result lives in a per-thread buffer, valid until the thread's next block.
    """
    m, r = y_aug.shape[0], x_aug.shape[0]
    if y_aug.device.type != "cpu" or y_aug.dtype != torch.float32:
        return torch.mm(y_aug, x_aug.T)
    buf = getattr(_BUFFERS, "scores", None)
    if buf is None or buf.numel() < m * r:
        buf = torch.empty(max(m * r, BLOCK_ELEMS), dtype=torch.float32)
        _BUFFERS.scores = buf
    return torch.mm(y_aug, x_aug.T, out=buf[: m * r].view(m, r))


class _Engine:
    """Prepared reference side of the grouped exact argmin (reused across calls)."""

    def __init__(
        self, x: Tensor, y: Tensor, psi: Tensor, precision: str, shift: float | None = None
    ) -> None:
        device = y.device
        m, d = y.shape
        self.m, self.d = m, d
        self.precision = precision
        mu = y.double().mean(0).to(torch.float32)
        self.mu = mu
        yc = y.to(torch.float32) - mu
        c64 = (yc.double() ** 2).sum(1) - psi.double()
        # global constant subtracted from every score (centres c); fixed by pruned passes
        self.shift = 0.5 * float(c64.max() + c64.min()) if shift is None else float(shift)
        c64 = c64 - self.shift
        c = c64.to(torch.float32)
        self.group = max(1, min(GROUP_SIZE, m))
        self.n_groups = math.ceil(m / self.group)
        m_pad = self.n_groups * self.group
        y_aug = torch.zeros(m_pad, d + 1, dtype=torch.float32, device=device)
        y_aug[:m, :d] = -2.0 * yc
        y_aug[:m, d] = c
        y_aug[m:, d] = _PAD_SCORE
        self.y_aug = y_aug
        # score rows: point k = g B + b of group g sits at row g B + b, or interleaved at b G + g
        # (the group minimum is then a reduction over the outer dimension, faster on the CPU)
        g, b = self.n_groups, self.group
        if INTERLEAVED:
            perm = torch.arange(m_pad, device=device).view(g, b).T.reshape(-1)
            self.y_rows = y_aug[perm].contiguous()
            self.stride_g, self.stride_b = 1, g
        else:
            self.y_rows = y_aug
            self.stride_g, self.stride_b = b, 1
        self._offset_cache: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
        if precision == "bf16":
            # candidate scores from bf16-rounded coordinates; c stays float32
            self.c_pad = self.y_rows[:, d].clone()
            self.y_lo = self.y_rows[:, :d].to(torch.bfloat16)
        ynorm = yc.double().norm(dim=1)
        self.ymax = float(ynorm.max())
        self.const = float(c64.abs().max())
        u32 = _UNIT_ROUNDOFF["fp32"]
        # rigorous for float32 inputs (see the module docstring); other input dtypes are
        # rounded to float32 first, for which a safety factor 2 is kept
        native = x.dtype == y.dtype == psi.dtype == torch.float32
        self.k32 = (1.0 if native else 2.0) * (d + 6) * u32
        self.ksq = (1.0 if native else 2.0) * 3.0 * u32 * self.ymax**2
        self.klo = 8.0 * _UNIT_ROUNDOFF[precision] if precision != "fp32" else 0.0

    def bound(self, xc: Tensor) -> Tensor:
        """Error bound E_j of the computed scores for centred rows xc (R, d)."""
        xn = xc.norm(dim=1).to(torch.float32)
        cross = 2.0 * xn * self.ymax
        return self.k32 * (cross + self.const) + self.ksq + self.klo * cross

    def prepare_rows(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Centred, augmented rows ``[x − μ, 1]`` (N, d+1) and twice their error bound (N,)."""
        xc = x.to(torch.float32) - self.mu
        x_aug = torch.cat([xc, torch.ones(xc.shape[0], 1, dtype=xc.dtype, device=xc.device)], 1)
        return x_aug, 2.0 * self.bound(xc)

    def block(
        self, x_aug: Tensor, bound2: Tensor, runner_up: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """Certified candidates for prepared rows ``x_aug`` (R, d+1) with bounds ``bound2``.

        Returns
        -------
        idx
            Winning index (valid where ``status == 0``).
        status
            0: certified single candidate, 1: several candidates in the winning group
            (re-rank ``group`` in float64), 2: not certified across groups.
        group
            Winning group per row.
        scores
            The computed (M_pad, R) score block.
        gmin
            Group minima (G, R).
        thr
            Candidate threshold per row: best computed score plus twice the error bound.
        second
            With ``runner_up``: the second-smallest computed score of every row (over all
            points), else None.
        """
        r = x_aug.shape[0]
        if self.precision == "bf16":
            x_lo = x_aug[:, : self.d].to(torch.bfloat16)
            if x_aug.device.type == "cuda":
                prod = _score_block(self.y_lo, x_lo).to(torch.float32)
            else:  # emulated: bf16-rounded inputs, float32 products
                prod = _score_block(self.y_lo.to(torch.float32), x_lo.to(torch.float32))
            scores = prod.add_(self.c_pad[:, None])
        else:
            scores = _score_block(self.y_rows, x_aug)  # (M_pad, R)
        g, b = self.n_groups, self.group
        if INTERLEAVED:
            gmin = scores.view(b, g, r).amin(0)  # (G, R)
        else:
            gmin = scores.view(g, b, r).amin(1)
        ar_r, off_b = self._offsets(r, x_aug.device)
        if g >= 2:
            top = gmin.topk(2, dim=0, largest=False)
            m1, g1, m2 = top.values[0], top.indices[0], top.values[1]
        else:
            m1, g1 = gmin[0], torch.zeros(r, dtype=torch.int64, device=x_aug.device)
            m2 = torch.full_like(m1, math.inf)
        thr = m1 + bound2
        cand = scores.take((g1 * (self.stride_g * r) + ar_r)[:, None] + off_b)  # (R, B)
        n_cand = (cand <= thr[:, None]).sum(1)
        best_in_group = cand.argmin(1)
        idx = g1 * b + best_in_group
        status = torch.where(m2 > thr, (n_cand > 1).to(torch.int64), 2)
        second = None
        if runner_up:  # smaller of the second group minimum and the group's second score
            second = m2
            if b >= 2:
                others = cand.scatter_(1, best_in_group[:, None], math.inf).amin(1)
                second = torch.minimum(m2, others)
        return idx, status, g1, scores, gmin, thr, second

    def _offsets(self, r: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Cached ``arange(r)`` and the (1, B) flat offsets of a group's points in a block."""
        key = (r, str(device))
        if key not in self._offset_cache:
            ar_b = torch.arange(self.group, device=device)
            self._offset_cache[key] = (
                torch.arange(r, device=device),
                (ar_b * (self.stride_b * r))[None, :],
            )
        return self._offset_cache[key]


def _resolve_multi(
    engine: _Engine, x: Tensor, y: Tensor, psi: Tensor, rows: Tensor, groups: Tensor
) -> Tensor:
    """Float64 re-rank of the whole winning group for the given rows."""
    b, m = engine.group, engine.m
    k = groups[:, None] * b + torch.arange(b, device=x.device)[None, :]  # (U, B)
    valid = k < m
    kc = k.clamp(max=m - 1)
    y64 = y[kc].double()
    p64 = psi[kc].double()
    s = _exact_scores(x[rows].double(), y64, p64)
    s = s.masked_fill(~valid, math.inf)
    return kc.gather(1, s.argmin(1, keepdim=True)).squeeze(1)


def _cross_candidates(
    engine: _Engine, rows: Tensor, scores: Tensor, gmin: Tensor, thr: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Candidates of block rows not certified across groups, for a float64 re-rank.

    Real patches contain exact duplicates (flat regions, saturated pixels) whose ties span
    groups. The candidates of row j are the points with computed score ``<= thr_j`` (the best
    computed score plus ``2 E_j``); they lie in the groups whose minimum is ``<= thr_j``, so
    only those groups' scores are scanned.

    Returns
    -------
    pair_rows, pair_points
        (row position in ``rows``, point index) of every candidate of the rows with at most
        ``CROSS_CANDIDATES`` candidates.
    ok
        Mask of those rows (the others go to the float64 brute force).
    """
    b, m = engine.group, engine.m
    t = thr[rows]
    pr, pg = torch.nonzero(gmin[:, rows].T <= t[:, None], as_tuple=True)  # (row, group) pairs
    r = scores.shape[1]
    ar_b = torch.arange(b, device=rows.device)
    flat = (pg * (engine.stride_g * r) + rows[pr])[:, None] + (ar_b * (engine.stride_b * r))
    pi, bi = torch.nonzero(scores.take(flat) <= t[pr][:, None], as_tuple=True)
    er, ek = pr[pi], (pg[pi] * b + bi).clamp(max=m - 1)
    ok = torch.bincount(er, minlength=rows.shape[0]) <= CROSS_CANDIDATES
    keep = ok[er]
    return er[keep], ek[keep], ok


def _resolve_across_groups(
    x: Tensor, y: Tensor, psi: Tensor, pair_rows: Tensor, pair_points: Tensor
) -> tuple[Tensor, Tensor]:
    """Float64 re-rank of candidate (row, point) pairs, all blocks at once.

    Returns the distinct rows and their winners: the lowest index among exact float64 ties,
    as a float64 brute-force argmin picks.
    """
    rows, inv = torch.unique(pair_rows, return_inverse=True)
    u, m = rows.shape[0], y.shape[0]
    diff = x[pair_rows].double() - y[pair_points].double()
    s64 = (diff * diff).sum(1) - psi[pair_points].double()
    inf = torch.full((u,), math.inf, dtype=torch.float64, device=x.device)
    best = inf.scatter_reduce(0, inv, s64, "amin")
    tied = s64 == best[inv]
    top = torch.full((u,), m, dtype=torch.int64, device=x.device)
    return rows, top.scatter_reduce(0, inv[tied], pair_points[tied], "amin")


#: Rows left for the brute force, and candidate (row, point) pairs for the float64 re-rank.
_Leftovers = tuple[list[Tensor], list[Tensor], list[Tensor]]


@dataclass
class _Blocks:
    """The row blocks of one pass: inputs, block height, output indices and pass record.

    ``out`` receives the certified argmins; with a ``store``, each block's group minima and
    runner-up scores are recorded in it (the baseline of pruned passes).
    """

    engine: _Engine
    x: Tensor
    y: Tensor
    psi: Tensor
    rows: int
    out: Tensor
    prepared: tuple[Tensor, Tensor]
    store: _PassTracker | None = None

    def run(self, starts: list[int]) -> _Leftovers:
        """Process the row blocks beginning at ``starts``; returns what is left uncertified."""
        engine, x, y, psi, out, store = self.engine, self.x, self.y, self.psi, self.out, self.store
        n = x.shape[0]
        x_aug, bound2 = self.prepared
        pending: list[Tensor] = []
        pair_rows: list[Tensor] = []
        pair_points: list[Tensor] = []
        # score columns of rows not certified across groups, scanned in batches (fewer small ops)
        held: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        n_held = 0

        def flush() -> None:
            cols, gm, th, rws = (torch.cat(t, dim) for t, dim in zip(zip(*held), (1, 1, 0, 0)))
            ar = torch.arange(rws.shape[0], device=rws.device)
            er, ek, ok = _cross_candidates(engine, ar, cols, gm, th)
            pair_rows.append(rws[er])
            pair_points.append(ek)
            if not bool(ok.all()):
                pending.append(rws[~ok])
            held.clear()

        for start in starts:
            stop = min(n, start + self.rows)
            idx, status, groups, scores, gmin, thr, second = engine.block(
                x_aug[start:stop], bound2[start:stop], runner_up=store is not None
            )
            out[start:stop] = idx
            if store is not None:
                store.record(start, stop, gmin, second, status)  # type: ignore[arg-type]
            if not status.any():  # the common case: every row certified
                continue
            multi = torch.nonzero(status == 1).squeeze(1)
            if multi.numel():
                out[start + multi] = _resolve_multi(
                    engine, x[start:stop], y, psi, multi, groups[multi]
                )
            bad = torch.nonzero(status == 2).squeeze(1)
            if bad.numel():
                held.append(
                    (scores.index_select(1, bad), gmin.index_select(1, bad), thr[bad], bad + start)
                )
                n_held += bad.numel()
                if n_held >= CROSS_BATCH:
                    flush()
                    n_held = 0
        if held:
            flush()
        return pending, pair_rows, pair_points

    def threaded(self, starts: list[int]) -> _Leftovers:
        """:meth:`run` on CPU worker threads, each single-threaded (no OpenMP barriers per op)."""
        workers = min(torch.get_num_threads(), len(starts))
        saved = torch.get_num_threads()

        def work(part: list[int]) -> _Leftovers:
            torch.set_num_threads(1)
            return self.run(part)

        parts = [starts[i::workers] for i in range(workers)]
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(work, parts))
        finally:
            torch.set_num_threads(saved)
        return tuple([t for r in results for t in r[i]] for i in range(3))  # type: ignore[return-value]

    def dispatch(self, starts: list[int]) -> _Leftovers:
        """Run all blocks, on worker threads where useful; returns what is left uncertified."""
        cpu = self.x.device.type == "cpu"
        if THREADED and cpu and torch.get_num_threads() > 1 and len(starts) > 1:
            return self.threaded(starts)
        return self.run(starts)


def _grouped_argmin(
    x: Tensor,
    y: Tensor,
    psi: Tensor,
    precision: str,
    store: _PassTracker | None = None,
    shift: float | None = None,
) -> Tensor:
    n, d = x.shape
    engine = _Engine(x, y, psi, precision, shift)
    if store is not None:
        store.begin(engine)
    m_pad = engine.n_groups * engine.group
    rows = max(16, min(n, BLOCK_ELEMS // m_pad))
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    starts = list(range(0, n, rows))
    prepared = engine.prepare_rows(x)  # O(N d) memory
    with _ieee_fp32_matmul(x.device):
        try:
            blocks = _Blocks(engine, x, y, psi, rows, out, prepared, store)
            pending, pair_rows, pair_points = blocks.dispatch(starts)
        finally:
            _BUFFERS.__dict__.pop("scores", None)
        if pair_rows:
            won_rows, winners = _resolve_across_groups(
                x, y, psi, torch.cat(pair_rows), torch.cat(pair_points)
            )
            out[won_rows] = winners
        if pending:
            bad = torch.cat(pending)
            if precision != "fp32":
                out[bad] = _grouped_argmin(x[bad], y, psi, "fp32")
            else:
                out[bad] = _brute_force64(x[bad], y, psi)
    return out


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_argmin(x: Tensor, y: Tensor, psi: Tensor) -> Tensor:
    """Certified argmin with faiss (inner-product search on augmented vectors, k = 2)."""
    import faiss

    m, d = y.shape
    engine = _Engine(x, y, psi, "fp32")
    yc = y.to(torch.float32) - engine.mu
    ya = torch.cat([2.0 * yc, -engine.y_aug[:m, d:]], dim=1).contiguous().numpy()
    index = faiss.IndexFlatIP(d + 1)
    index.add(ya)
    xc = x.to(torch.float32) - engine.mu
    xa = torch.cat([xc, torch.ones(x.shape[0], 1)], dim=1).contiguous().numpy()
    k = 2 if m >= 2 else 1
    dist, ind = index.search(xa, k)
    out = torch.from_numpy(ind[:, 0].astype(np.int64))
    if k == 1:
        return out
    gap = torch.from_numpy(dist[:, 0] - dist[:, 1])
    bad = torch.nonzero(~(gap > 2.0 * engine.bound(xc))).squeeze(1)
    if bad.numel():
        out[bad] = _brute_force64(x[bad], y, psi)
    return out


def c_transform_argmin(
    x: Tensor, y: Tensor, psi: Tensor, *, precision: str = "fp32", backend: str = "auto"
) -> Tensor:
    """Exact ``argmin_k ‖x_j − y_k‖² − ψ_k`` for every row j.

    Parameters
    ----------
    x
        Generated patches (N, d).
    y
        Reference patches (M, d).
    psi
        Potentials (M,).
    precision
        Precision of the candidate scores: ``"fp32"`` (default) or ``"bf16"`` (rounded
        inputs, wider error bound, more float64 re-ranking). The result is exact either way.
    backend
        ``"auto"`` (default): the grouped engine on CPU tensors, the fused Triton kernel on
        CUDA when Triton imports, else the torch device path (MPS and other devices).
        ``"torch"``: the grouped block engine (any device). ``"triton"``: the fused kernel of
        :mod:`napari_wpp.core.semidual.gpu` (CUDA, or CPU tensors under
        ``TRITON_INTERPRET=1``). ``"device"``: the sync-free torch device path (any device).
        ``"faiss"``: CPU, needs faiss. The GPU paths compute fp32 candidates; ``bf16`` runs
        the grouped engine.

    Returns
    -------
    Tensor
        int64 (N,), on the inputs' device. No autograd graph, memory bounded by
        ``BLOCK_ELEMS`` score entries plus O((N + M) d).
    """
    _check_inputs(x, y, psi)
    if precision not in _UNIT_ROUNDOFF:
        raise InputError(f"unknown precision {precision!r}: use fp32 or bf16")
    with torch.no_grad():
        x, y, psi = x.detach(), y.detach(), psi.detach()
        if x.shape[0] == 0:
            return torch.empty(0, dtype=torch.int64, device=x.device)
        if backend == "faiss":
            if x.device.type != "cpu":
                raise InputError("the faiss backend runs on the CPU only: use backend='torch'")
            if not _faiss_available():
                raise InputError(
                    "faiss is not installed: pip install faiss-cpu or use backend='torch'"
                )
            return _faiss_argmin(x, y, psi)
        if backend not in ("auto", "torch", "triton", "device"):
            raise InputError(
                f"unknown backend {backend!r}: use auto, torch, triton, device or faiss"
            )
        if backend == "auto" and x.device.type != "cpu" and precision == "fp32":
            backend = "triton" if semidual_gpu.triton_usable(x.device) else "device"
        if backend in ("triton", "device"):
            if precision != "fp32":
                raise InputError(f"the {backend} backend computes fp32 scores: use precision fp32")
            with _ieee_fp32_matmul(x.device):
                if backend == "device":
                    return semidual_gpu.device_argmin(x, y, psi)
                if not semidual_gpu.triton_usable(x.device):
                    raise InputError(
                        "the triton backend needs Triton and a CUDA device (or TRITON_INTERPRET=1 "
                        "for CPU tensors): use backend='device'"
                    )
                return semidual_gpu.triton_argmin(x, y, psi)
        return _grouped_argmin(x, y, psi, precision)


def c_transform(x: Tensor, y: Tensor, psi: Tensor, **options: str) -> tuple[Tensor, Tensor]:
    """c-transform: argmin indices and the minimal values ``‖x_j − y_κ‖² − ψ_κ``.

    Returns
    -------
    tuple of Tensor
        ``(indices int64 (N,), values (N,) in x's dtype)``, values without autograd.
    """
    idx = c_transform_argmin(x, y, psi, **options)
    with torch.no_grad():
        diff = x.detach() - y.detach()[idx]
        vals = (diff * diff).sum(1) - psi.detach()[idx]
    return idx, vals
