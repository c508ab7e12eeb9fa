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
:func:`c_transform_argmin` runs :mod:`napari_wpp.core.semidual_gpu` instead: same bound, same
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

Pruned ψ passes (``PASS_PRUNING``, CPU). Within one :meth:`WassersteinPatchPrior.ascend` or
``loss_and_ascend`` call the patches are fixed and ψ moves little between passes. The first
pass is a full one that also keeps, per row j, bounds valid at that pass's ψ: lower bounds
of its ``PRUNE_GROUPS`` smallest group minima (float32, with their groups), one lower bound
for all its other groups, one for every point but its winner (the runner-up) and an upper
bound of its winner's score. All passes of the call compute scores in this pass's frame
(same centring and constant shift), where a score changes exactly by ``−δ_k`` when ψ moves
by δ. So at a later pass every point of group g scores at least its stored bound minus E_j
minus ``max_{k∈g} δ_k`` (δ since the pass the row's bounds refer to), and the winner at most
its stored upper bound minus ``δ_winner``. A row whose runner-up bound stays above the
winner's upper bound keeps its winner with no work; otherwise only its listed groups whose
lower bound is at most the upper bound are re-scored (pairs sorted by group, one small
matrix product per group), and rows whose unlisted groups might catch up are re-scored in
full by the engine. A group left out cannot hold a point scoring at most the winner's
score, so the exact argmin and all its exact ties lie among the re-scored points, which go
through the engine's certification unchanged (one candidate within 2 E_j of the best
re-scored score is the argmin, several are re-ranked in float64, lowest index among exact
float64 ties): every pass returns exactly what :func:`c_transform_argmin` returns, and
solvers follow the same ψ trajectory. Re-scored rows refresh their bounds at the current ψ,
so the work of a pass follows ψ's change of the last pass or few, not since the first. A
pass is a full one again (a new baseline) when the pairs to re-score exceed
``PRUNE_REFRESH`` of all, ψ moved by more than the score scale or ``PRUNE_HISTORY`` passes
went by. Memory: about ``6 L N + 4 (d + 1) N + 60 N`` bytes (L = ``PRUNE_GROUPS``; 80 MB
for N = 225,625, d = 36) plus 8 M bytes of ψ history per pass.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from napari_wpp.core import semidual_gpu
from napari_wpp.core.errors import InputError

__all__ = [
    "WassersteinPatchPrior",
    "c_transform",
    "c_transform_argmin",
    "exact_w2",
    "semidual_value",
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


def _run_blocks(
    engine: _Engine,
    x: Tensor,
    y: Tensor,
    psi: Tensor,
    starts: list[int],
    rows: int,
    out: Tensor,
    prepared: tuple[Tensor, Tensor],
    store: _PassTracker | None = None,
) -> _Leftovers:
    """Process the row blocks beginning at ``starts``; returns what is left uncertified.

    With a ``store``, each block's group minima and runner-up scores are recorded in it
    (the baseline of pruned passes).
    """
    n = x.shape[0]
    x_aug, bound2 = prepared
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
        stop = min(n, start + rows)
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
            out[start + multi] = _resolve_multi(engine, x[start:stop], y, psi, multi, groups[multi])
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


def _threaded_blocks(
    engine: _Engine,
    x: Tensor,
    y: Tensor,
    psi: Tensor,
    starts: list[int],
    rows: int,
    out: Tensor,
    prepared: tuple[Tensor, Tensor],
    store: _PassTracker | None = None,
) -> _Leftovers:
    """Run blocks on CPU worker threads, each single-threaded (no OpenMP barriers per op)."""
    workers = min(torch.get_num_threads(), len(starts))
    saved = torch.get_num_threads()

    def work(part: list[int]) -> _Leftovers:
        torch.set_num_threads(1)
        return _run_blocks(engine, x, y, psi, part, rows, out, prepared, store)

    parts = [starts[i::workers] for i in range(workers)]
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(work, parts))
    finally:
        torch.set_num_threads(saved)
    return tuple([t for r in results for t in r[i]] for i in range(3))  # type: ignore[return-value]


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
            pending, pair_rows, pair_points = _dispatch_blocks(
                engine, x, y, psi, starts, rows, out, prepared, store
            )
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


def _dispatch_blocks(
    engine: _Engine,
    x: Tensor,
    y: Tensor,
    psi: Tensor,
    starts: list[int],
    rows: int,
    out: Tensor,
    prepared: tuple[Tensor, Tensor],
    store: _PassTracker | None = None,
) -> _Leftovers:
    """Run all blocks, on worker threads where useful; returns what is left uncertified."""
    cpu = x.device.type == "cpu"
    if THREADED and cpu and torch.get_num_threads() > 1 and len(starts) > 1:
        return _threaded_blocks(engine, x, y, psi, starts, rows, out, prepared, store)
    return _run_blocks(engine, x, y, psi, starts, rows, out, prepared, store)


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
        :mod:`napari_wpp.core.semidual_gpu` (CUDA, or CPU tensors under
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


def exact_w2(x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> float:
    """Exact squared 2-Wasserstein distance between two equal-size uniform point clouds.

    Solved as an assignment problem (``scipy.optimize.linear_sum_assignment``); meant for
    tests and benchmarks (O(n³)).
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    xa = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, float)
    ya = y.detach().cpu().double().numpy() if isinstance(y, Tensor) else np.asarray(y, float)
    if xa.shape != ya.shape or xa.ndim != 2:
        raise InputError(
            f"exact_w2 needs two point clouds of equal shape (n, d), got {xa.shape} and {ya.shape}"
        )
    cost = cdist(xa, ya, "sqeuclidean")
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def semidual_value(x: Tensor, y: Tensor, psi: Tensor) -> float:
    """Semi-dual objective ``mean_j min_k (‖x_j − y_k‖² − ψ_k) + mean_k ψ_k``."""
    _, vals = c_transform(x, y, psi)
    return float(vals.double().mean() + psi.double().mean())


#: Pruned ψ passes: the passes of one :class:`WassersteinPatchPrior` call (fixed patches)
#: re-score only the (row, group) pairs that the change of ψ can affect (CPU only).
PASS_PRUNING = True
#: Nearest groups listed per row; the other groups of the row share one lower bound.
PRUNE_GROUPS = 24
#: Share of all (row, group) pairs above which a pass is recomputed in full (new baseline).
PRUNE_REFRESH = 0.25
#: Passes after which a full pass starts a new baseline (bounds the ψ history kept).
PRUNE_HISTORY = 64
#: Consecutive fallbacks to full passes after which a tracker stops pruning.
PRUNE_GIVE_UP = 2
#: Calls of a prior that run plain passes after one whose pruning gave up.
PRUNE_PAUSE = 10
#: Margin (times E_j) added to pruning comparisons for float64 roundings (far below E_j).
_PRUNE_SLACK = 0.125


def _round_down_f32(v: Tensor) -> Tensor:
    """Float32 values ``<= v`` (float64) entrywise: nearest rounding minus one ulp."""
    f = v.to(torch.float32)
    return torch.nextafter(f, torch.full_like(f, -math.inf))


class _PassTracker:
    """Exact c-transform argmin of fixed patches x for a sequence of nearby potentials ψ.

    Every row j keeps, in one score frame (the centring and constant shift of the first full
    pass), bounds that hold at the potentials ψ_r of its last refresh r: lower bounds of the
    ``PRUNE_GROUPS`` nearest group minima (and their groups), one lower bound for all other
    groups, one for every point but its winner (the runner-up) and an upper bound of its
    winner's score. A later pass moves these bounds by ψ's change since r, keeps the winner
    of rows whose runner-up cannot catch up, re-scores only the listed groups that may hold
    a better point, and runs the engine on the few rows whose other groups may (see the
    module docstring). Every call returns what :func:`c_transform_argmin` returns.

    Memory: ``(4 + 2) L N`` bytes of listed bounds and groups (L = ``PRUNE_GROUPS``: 32 MB
    for N = 225,625), ``4 (d + 1) N`` bytes of prepared rows (33 MB for d = 36), ~60 N bytes
    of row state (14 MB), the ψ history (8 M bytes a pass) and per-pass temporaries of at
    most ~20 L bytes per row not settled by its runner-up.
    """

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x = x.detach().to(torch.float32).contiguous()
        self.y = y.detach().to(torch.float32).contiguous()
        self.n, self.m = self.x.shape[0], self.y.shape[0]
        #: ψ (float64) of the passes since the last full pass; rows refer to them by index
        self.history: list[Tensor] = []
        self._target: Tensor | None = None
        #: consecutive pruned passes that fell back to a full one; past PRUNE_GIVE_UP the
        #: tracker runs plain engine passes (ψ moves too much for pruning to pay)
        self.failures = 0
        self.gave_up = False
        #: per call: listed pairs re-scored (-1: full pass), rows not settled by their
        #: runner-up, rows re-scored in full
        self.stats: dict[str, list[int]] = {"pairs": [], "slow_rows": [], "full_rows": []}

    # ------------------------------------------------------------ engine passes
    def begin(self, engine: _Engine) -> None:
        """Take the frame of a full pass, or follow the error bound of a partial one."""
        if self._target is not None:
            self.const = max(self.const, engine.const)
            return
        n, dev = self.n, self.x.device
        self.shift, self.const = engine.shift, engine.const
        self.group, self.n_groups = engine.group, engine.n_groups
        self.listed = min(PRUNE_GROUPS, engine.n_groups)
        self.k32, self.ksq, self.ymax = engine.k32, engine.ksq, engine.ymax
        self.scale = engine.const + engine.ymax**2
        # reference side in natural order: a pass only changes the constant column
        self.y_aug = engine.y_aug.clone()
        yc = self.y_aug[: self.m, :-1] / -2.0  # exact
        self.ysq = (yc.double() ** 2).sum(1)  # as the engine computes it
        shape = (n, self.listed)
        if getattr(self, "cand_group", None) is None or self.cand_group.shape != shape:
            index_dtype = torch.int16 if engine.n_groups < 2**15 else torch.int32
            self.cand_group = torch.empty(shape, dtype=index_dtype, device=dev)
            self.cand_low = torch.empty(shape, dtype=torch.float32, device=dev)
            f64 = {"dtype": torch.float64, "device": dev}
            self.rest, self.second, self.upper = (torch.empty(n, **f64) for _ in range(3))
            self.best = torch.empty(n, dtype=torch.float32, device=dev)
            self.ref = torch.zeros(n, dtype=torch.int64, device=dev)
            self.x_aug, _ = engine.prepare_rows(self.x)  # depends on y only (centring)
            self.xnorm = self.x_aug[:, :-1].norm(dim=1).double()

    def record(self, start: int, stop: int, gmin: Tensor, second: Tensor, status: Tensor) -> None:
        """Keep the nearest group minima, the rest's bound and the runner-up of a block."""
        rows: slice | Tensor = slice(start, stop)
        if self._target is not None:
            rows = self._target[start:stop]
        k = self.listed
        top = gmin.topk(min(k + 1, self.n_groups), dim=0, largest=False)  # ascending
        self.cand_group[rows] = top.indices[:k].T.to(self.cand_group.dtype)
        self.cand_low[rows] = top.values[:k].T
        rest = top.values[k] if self.n_groups > k else torch.full_like(top.values[0], math.inf)
        self.rest[rows] = rest.double()
        self.best[rows] = top.values[0]
        # the runner-up bounds every point but the winner only where the winner is certified
        self.second[rows] = second.masked_fill_(status != 0, -math.inf).double()

    def _refresh(self, psi: Tensor, rows: Tensor | None) -> Tensor:
        """Engine pass over ``rows`` (all when None) that records their bounds."""
        self._target = rows
        try:
            x = self.x if rows is None else self.x.index_select(0, rows)
            shift = None if rows is None else self.shift
            out = _grouped_argmin(x, self.y, psi, "fp32", store=self, shift=shift)
        finally:
            self._target = None
        at = slice(None) if rows is None else rows
        # the winner's exact score is at most the best computed one + E (+ slack)
        self.upper[at] = self.best[at].double() + (1.0 + _PRUNE_SLACK) * self._bound()[at]
        self.ref[at] = len(self.history) - 1
        return out

    def _full(self, psi: Tensor) -> Tensor:
        self.history = [psi.double()]
        self.winner = self._refresh(psi, None)
        self._log(-1, self.n, self.n)
        return self.winner.clone()

    def _bound(self) -> Tensor:
        """Per-score error bound E_j (float64) of every row (largest constant term so far)."""
        return self.k32 * (2.0 * self.xnorm * self.ymax + self.const) + self.ksq

    # ------------------------------------------------------------ pruned pass
    def __call__(self, psi: Tensor) -> Tensor:
        """Exact argmin (int64, (N,)) for potentials ``psi`` (M,)."""
        with torch.no_grad():
            psi = psi.detach().to(torch.float32)
            if self.gave_up:  # ψ moves too much for pruning: plain engine passes
                self._log(-1, self.n, self.n)
                return c_transform_argmin(self.x, self.y, psi)
            out = self._pruned(psi) if self.history else None
            if out is not None:
                self.failures = 0
                return out
            if self.history:
                self.failures += 1
                self.gave_up = self.failures >= PRUNE_GIVE_UP
                if self.gave_up:
                    self._log(-1, self.n, self.n)
                    return c_transform_argmin(self.x, self.y, psi)
            return self._full(psi)

    def _log(self, pairs: int, slow_rows: int, full_rows: int) -> None:
        self.stats["pairs"].append(pairs)
        self.stats["slow_rows"].append(slow_rows)
        self.stats["full_rows"].append(full_rows)

    def _pruned(self, psi: Tensor) -> Tensor | None:
        """Pruned pass, or None where a full pass is due."""
        saved = torch.get_num_threads()
        # many small operations: intra-op threads would each pay an OpenMP barrier; the
        # re-scoring runs on worker threads instead (CPU)
        self._workers = saved if THREADED and self.x.device.type == "cpu" else 1
        torch.set_num_threads(1)
        try:
            prepared = self._prepare(psi)
        finally:
            torch.set_num_threads(saved)
        if prepared is None or isinstance(prepared, Tensor):
            return prepared
        new, renew = prepared
        if renew.numel():
            new[renew] = self._refresh(psi, renew)
        self.winner = new
        return new.clone()

    def _prepare(self, psi: Tensor) -> Tensor | tuple[Tensor, Tensor] | None:
        """Bounds, re-scoring and certification of a pruned pass: None where a full pass is
        due, else the winners and the rows left for the engine."""
        n, m, g_count, b = self.n, self.m, self.n_groups, self.group
        psi64 = psi.double()
        if len(self.history) >= PRUNE_HISTORY:
            return None
        if float((psi64 - self.history[0]).abs().max()) > self.scale:
            return None  # a large step: bounds would be loose and roundings larger
        # scores in the rows' frame: the engine's augmented reference with ψ's constant column
        c64 = self.ysq - psi64 - self.shift
        y_aug = self.y_aug.clone()
        y_aug[:m, -1] = c64.to(torch.float32)
        self.const = max(self.const, float(c64.abs().max()))
        bound = self._bound()
        slack = _PRUNE_SLACK * bound
        # change of every potential since each refresh still referred to (exact in reals
        # up to float64 roundings, far below E), its maximum and its maximum per group
        first = int(self.ref.min())
        delta = psi64[None, :] - torch.stack(self.history[first:])  # (R, M)
        padded = delta.new_full((delta.shape[0], g_count * b), -math.inf)
        padded[:, :m] = delta
        rise = padded.view(-1, g_count, b).amax(2)  # (R, G)
        rise_all = delta.amax(1)
        ref = self.ref - first
        drift = rise_all[ref]
        # exact score now of the current winner <= upper (frame of the rows)
        upper = self.upper - delta.view(-1)[ref * m + self.winner]
        # rows whose runner-up cannot catch up keep their winner without any work
        fast = self.second - bound - drift > upper + slack
        slow = torch.nonzero(~fast).squeeze(1)
        # rows whose unlisted groups may catch up are re-scored in full by the engine
        rest_far = self.rest[slow] - bound[slow] - drift[slow] > upper[slow] + slack[slow]
        renew, part = slow[~rest_far], slow[rest_far]
        limit = PRUNE_REFRESH * n * g_count
        if renew.numel() * g_count > limit:
            return None
        groups = self.cand_group.index_select(0, part).long()  # (P, L)
        low = self.cand_low.index_select(0, part).double()
        low -= rise.view(-1)[(ref[part] * g_count)[:, None] + groups]
        # a listed group may hold the winner (or a tie) only if low − E <= upper (+ slack)
        flag = low <= (upper[part] + bound[part] + slack[part])[:, None]
        pair_pos, pair_slot = torch.nonzero(flag, as_tuple=True)
        pairs = pair_pos.numel()
        if pairs + renew.numel() * g_count > limit:
            return None
        self.history.append(psi64)
        self._log(pairs, int(slow.numel()), int(renew.numel()))
        new = self.winner.clone()
        if pairs:
            with _ieee_fp32_matmul(self.x.device):
                done = self._rescore(
                    psi, y_aug, new, bound, part, drift, low, flag, groups, pair_pos, pair_slot
                )
            if not done:
                return None
        return new, renew

    def _rescore(
        self,
        psi: Tensor,
        y_aug: Tensor,
        new: Tensor,
        bound: Tensor,
        part: Tensor,
        drift: Tensor,
        low: Tensor,
        flag: Tensor,
        groups: Tensor,
        pair_pos: Tensor,
        pair_slot: Tensor,
    ) -> bool:
        """Re-score the flagged listed groups of rows ``part``, certify or re-rank them and
        refresh their bounds at this pass (``new`` receives the winners)."""
        g_count, b, d = self.n_groups, self.group, self.x.shape[1]
        dev = self.x.device
        y_groups = y_aug.view(g_count, b, d + 1)
        bound2 = (2.0 * bound[part]).to(torch.float32)  # candidates: within 2 E of the best
        pair_group = groups[pair_pos, pair_slot]
        order = torch.argsort(pair_group)
        pos, slot, pair_group = pair_pos[order], pair_slot[order], pair_group[order]
        uniq, counts = torch.unique_consecutive(pair_group, return_counts=True)
        v1, v2, i1 = self._score_groups(y_groups, uniq, counts, part[pos])
        k = i1 + pair_group * b
        n_part = part.numel()
        inf = torch.full((n_part,), math.inf, dtype=torch.float32, device=dev)
        best = inf.scatter_reduce(0, pos, v1, "amin")
        if not bool(torch.isfinite(best).all()):
            return False  # cannot happen with valid bounds; stay safe
        thr = best + bound2
        # a row is certified when one group holds a point within 2 E of its best score and
        # that group holds only one (for the best group, ``many`` used this very threshold)
        hit = v1 <= thr[pos]
        many = v2 <= v1 + bound2[pos]
        single = torch.bincount(pos[hit], minlength=n_part) == 1
        single[pos[hit & many]] = False
        sel = hit & single[pos]
        new[part[pos[sel]]] = k[sel]
        tied = hit & ~single[pos]
        if bool(tied.any()):
            rows, points = self._tie_candidates(
                y_groups, part[pos[tied]], pair_group[tied], thr[pos[tied]]
            )
            won_rows, winners = _resolve_across_groups(self.x, self.y, psi, rows, points)
            new[won_rows] = winners
        # bounds at this pass: re-scored groups exactly, the others moved by ψ's change
        unflagged = low.masked_fill(flag, math.inf).amin(1)
        low[pos, slot] = v1.double()
        self.cand_low[part] = _round_down_f32(low)
        rest = self.rest[part] - drift[part]
        self.rest[part] = rest
        # runner-up of certified rows: the winner's group's second score, every other
        # re-scored group's minimum, the unflagged listed groups and the rest
        others = torch.where(sel, v2, v1).double()
        fill = torch.full((n_part,), math.inf, dtype=torch.float64, device=dev)
        second = torch.minimum(fill.scatter_reduce(0, pos, others, "amin"), unflagged)
        second = torch.minimum(second, rest).masked_fill_(~single, -math.inf)
        self.second[part] = second
        self.upper[part] = best.double() + (1.0 + _PRUNE_SLACK) * bound[part]
        self.ref[part] = len(self.history) - 1
        return True

    def _score_groups(
        self, y_groups: Tensor, groups: Tensor, counts: Tensor, rows: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Smallest and second-smallest computed score and the position of the smallest in
        the group, for (row, group) pairs sorted by group (``counts`` rows per group)."""

        def work(span: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
            torch.set_num_threads(1)
            lo, hi = span
            sizes = counts[lo:hi].tolist()
            start = int(counts[:lo].sum())
            part = rows[start : start + sum(sizes)]
            v1_l, v2_l, i1_l = [], [], []
            for g, r in zip(groups[lo:hi].tolist(), part.split(sizes), strict=True):
                # (B, n_g): group minima are vertical reductions
                s = torch.mm(y_groups[g], self.x_aug.index_select(0, r).T)
                v1, i1 = s.min(0)
                v1_l.append(v1)
                i1_l.append(i1)
                v2_l.append(s.scatter_(0, i1[None, :], math.inf).amin(0))  # second smallest
            if not v1_l:
                empty = rows.new_empty(0)
                return empty.float(), empty.float(), empty
            return torch.cat(v1_l), torch.cat(v2_l), torch.cat(i1_l)

        workers = max(1, min(self._workers, groups.numel()))
        if workers == 1:
            return work((0, groups.numel()))
        # contiguous spans of groups with about equal numbers of pairs, one per worker
        ends = torch.cumsum(counts, 0).double().cpu()
        targets = ends[-1] * torch.arange(1, workers, dtype=torch.float64) / workers
        cuts = torch.searchsorted(ends, targets).tolist()
        bounds = [0, *(min(c + 1, groups.numel()) for c in cuts), groups.numel()]
        spans = [(a, c) for a, c in zip(bounds[:-1], bounds[1:], strict=True) if c > a]
        if len(spans) == 1:
            return work(spans[0])
        with ThreadPoolExecutor(max_workers=len(spans)) as pool:
            parts = list(pool.map(work, spans))
        return tuple(torch.cat(t) for t in zip(*parts, strict=True))  # type: ignore[return-value]

    def _tie_candidates(
        self, y_groups: Tensor, rows: Tensor, groups: Tensor, thr: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(row, point) pairs with computed score <= thr among (row, group) pairs sorted by
        group; each group's pairs are re-scored with one matrix product."""
        b = self.group
        uniq, counts = torch.unique_consecutive(groups, return_counts=True)
        out_rows, out_points = [], []
        sizes = counts.tolist()
        for g, part, t in zip(uniq.tolist(), rows.split(sizes), thr.split(sizes), strict=True):
            s = torch.mm(y_groups[g], self.x_aug.index_select(0, part).T)  # (B, n_g)
            bi, pi = torch.nonzero(s <= t[None, :], as_tuple=True)
            out_rows.append(part[pi])
            out_points.append(bi + g * b)
        return torch.cat(out_rows), torch.cat(out_points)


_SOLVER_DEFAULTS: dict[str, dict[str, float]] = {
    # lr relative to the cost scale (mean nearest-neighbour cost at psi = 0)
    "adam": {"lr": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-12},
    # the published solver: torch.optim.ASGD semantics, absolute lr
    "asgd": {"lr": 1.0, "lambd": 1e-4, "alpha": 0.75, "t0": 1e6},
    # plain gradient ascent, step lr * scale * M * grad
    "gd": {"lr": 0.1},
}


class WassersteinPatchPrior:
    """Semi-dual Wasserstein patch prior against fixed reference patches.

    Holds the potential ψ (M,) of the semi-dual problem

        W₂²(μ_x, μ_y) = max_ψ mean_j min_k (‖x_j − y_k‖² − ψ_k) + mean_k ψ_k,

    improves it with a first-order solver (warm-started across calls) and gives the WPP loss
    whose gradient in the generated patches is that of ``mean_j ‖x_j − y_κ(j)‖²``.

    Parameters
    ----------
    reference_patches
        Reference patches y (M, d).
    solver
        ``"adam"`` (default: Adam on ψ with a step of ``lr`` times the cost scale, the mean
        nearest-neighbour cost at ψ = 0), ``"asgd"`` (the published averaged SGD, lr 1) or
        ``"gd"`` (gradient ascent with a step scaled to the cost).
    scale_momentum
        ``None`` (default): the cost scale of the adam and gd steps is fixed at the first call.
        A number m in (0, 1]: the scale follows the mean assigned cost as an exponential
        average with weight m, for generated patches that change a lot (network training,
        where the first outputs are far from the reference).
    reduce_sum
        ``None`` (default) for one process. Under data parallelism (each rank holds its own
        generated patches, the reference patches, ψ and the solver state replicated): a
        function that sums a tensor over all ranks (an all-reduce) and returns the sum. Every
        pass sums the integer argmin counts, the number of patches and the cost sums with it,
        so every rank applies the identical ψ step, the one of a single process holding all
        ranks' patches.
    **solver_options
        Hyper-parameters of the solver (``lr``, ``beta1``, ``beta2``, ``eps`` for adam;
        ``lr``, ``lambd``, ``alpha``, ``t0`` for asgd; ``lr`` for gd).
    """

    def __init__(
        self,
        reference_patches: Tensor,
        solver: str = "adam",
        scale_momentum: float | None = None,
        reduce_sum: Callable[[Tensor], Tensor] | None = None,
        **solver_options: float,
    ):
        if scale_momentum is not None and not 0.0 < scale_momentum <= 1.0:
            raise InputError(f"scale momentum {scale_momentum} is invalid: use a value in (0, 1]")
        self.scale_momentum = scale_momentum
        self.reduce_sum = reduce_sum
        if solver not in _SOLVER_DEFAULTS:
            names = ", ".join(_SOLVER_DEFAULTS)
            raise InputError(f"unknown psi solver {solver!r}: use one of {names}")
        unknown = set(solver_options) - set(_SOLVER_DEFAULTS[solver])
        if unknown:
            raise InputError(
                f"unknown option(s) {', '.join(sorted(unknown))} for solver {solver!r}: "
                f"use {', '.join(_SOLVER_DEFAULTS[solver])}"
            )
        y = reference_patches.detach()
        if y.ndim != 2 or y.shape[0] == 0:
            raise InputError(
                f"reference patches have shape {tuple(y.shape)}: pass a non-empty (M, d) matrix"
            )
        self.reference = y.to(torch.float32).contiguous()
        self.solver = solver
        self.options = {
            **_SOLVER_DEFAULTS[solver],
            **{k: float(v) for k, v in solver_options.items()},
        }
        self.psi = torch.zeros(self.reference.shape[0], device=self.reference.device)
        self._state: dict[str, Tensor] = {}
        self._prune_pause = 0  # calls left without pass pruning (it did not pay lately)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Set ψ to zero and forget the solver state (moments, step count, cost scale)."""
        dev = self.reference.device
        m = self.reference.shape[0]
        self.psi = torch.zeros(m, dtype=torch.float32, device=dev)
        zeros = torch.zeros(m, dtype=torch.float32, device=dev)
        # scalars live with ψ: off the CPU the solver runs without host syncs
        scalar = torch.zeros((), dtype=torch.float64, device=dev)
        self._state = {"step": scalar.clone(), "scale": scalar.clone()}
        if self.solver == "adam":
            self._state.update(exp_avg=zeros.clone(), exp_avg_sq=zeros.clone())
        elif self.solver == "asgd":
            self._state.update(
                ax=zeros.clone(),
                eta=torch.full((), self.options["lr"], dtype=torch.float64, device=dev),
                mu=torch.ones((), dtype=torch.float64, device=dev),
            )

    def state_dict(self) -> dict[str, Tensor]:
        """ψ and the solver state as tensors (for checkpoints and resume)."""
        out = {"psi": self.psi.detach().clone()}
        out.update({f"solver.{k}": v.detach().clone() for k, v in self._state.items()})
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (same reference patches and solver)."""
        psi = state.get("psi")
        if psi is None or psi.shape != self.psi.shape:
            raise InputError(
                "prior state does not match: it was saved for a different number of reference "
                "patches; use the same reference patches"
            )
        expected = {f"solver.{k}" for k in self._state}
        missing = expected - set(state)
        if missing:
            raise InputError(
                f"prior state lacks {', '.join(sorted(missing))}: it was saved with another "
                f"solver than {self.solver!r}; use that solver"
            )
        self.psi = psi.detach().to(self.psi.device, torch.float32).clone()
        for k, v in self._state.items():
            self._state[k] = state[f"solver.{k}"].detach().to(v.device, v.dtype).clone()

    def to(self, device: torch.device | str) -> WassersteinPatchPrior:
        """Move reference patches, ψ and the solver state to ``device`` (in place)."""
        device = torch.device(device)
        self.reference = self.reference.to(device)
        self.psi = self.psi.to(device)
        for k, v in self._state.items():
            self._state[k] = v.to(device)
        return self

    @property
    def _on_host(self) -> bool:
        """CPU prior: scalars are Python floats. Elsewhere they stay device tensors (no sync)."""
        return self.reference.device.type == "cpu"

    # ------------------------------------------------------------------ solver
    def _check_patches(self, patches: Tensor) -> None:
        if patches.ndim != 2 or patches.shape[1] != self.reference.shape[1]:
            raise InputError(
                f"generated patches have shape {tuple(patches.shape)} but reference patches "
                f"have dimension {self.reference.shape[1]}: use the same patch size"
            )
        if patches.shape[0] == 0:
            raise InputError("no generated patches: images must be at least one patch large")

    def _tracker(self, x: Tensor, passes: int) -> _PassTracker | None:
        """Pruned-pass tracker for ``passes`` c-transforms of fixed patches, where it pays."""
        if not (PASS_PRUNING and passes > 1 and x.device.type == "cpu"):
            return None
        if self._prune_pause > 0:
            self._prune_pause -= 1
            return None
        return _PassTracker(x, self.reference)

    def _tracker_done(self, tracker: _PassTracker | None) -> None:
        if tracker is not None and tracker.gave_up:
            self._prune_pause = PRUNE_PAUSE

    def _argmin(self, x: Tensor, tracker: _PassTracker | None) -> Tensor:
        if tracker is None:
            return c_transform_argmin(x, self.reference, self.psi)
        return tracker(self.psi)

    def _pass(
        self, x: Tensor, tracker: _PassTracker | None = None
    ) -> tuple[float | Tensor, Tensor]:
        """One c-transform over all patches: semi-dual value and ascent direction ∇ψ.

        On the CPU the value is a float; elsewhere a float64 device tensor (no host sync).
        """
        idx = self._argmin(x, tracker)
        diff = x - self.reference[idx]
        costs = (diff * diff).sum(1)
        counts, n, cost_sum = self._global_counts(idx, costs)
        value = self._semidual_value(counts, n, cost_sum)
        self._update_scale(value, cost_sum / n)
        return value, self._ascent_direction(counts, n)

    def _semidual_value(
        self, counts: Tensor, n: float | Tensor, cost_sum: float | Tensor
    ) -> float | Tensor:
        """``mean_j (c_j − ψ_κ(j)) + mean_k ψ_k`` from the counts and the cost sum."""
        psi_sum: float | Tensor = (counts.double() * self.psi.double()).sum()
        psi_mean: float | Tensor = self.psi.double().mean()
        if self._on_host:
            psi_sum, psi_mean = float(psi_sum), float(psi_mean)
        return (cost_sum - psi_sum) / n + psi_mean

    def _update_scale(self, value: float | Tensor, mean_cost: float | Tensor) -> None:
        """Cost scale of the adam/gd steps: fixed at the first value, or tracked."""
        if not self._on_host:
            self._update_scale_on_device(value, mean_cost)  # type: ignore[arg-type]
            return
        if float(self._state["scale"]) <= 0.0:
            # the semi-dual value at the first call (mean nearest-neighbour cost when
            # psi = 0), floored to stay positive
            self._state["scale"] = torch.tensor(max(abs(value), 1e-12), dtype=torch.float64)
        elif self.scale_momentum is not None:
            self._track_scale(mean_cost)

    def _global_counts(
        self, idx: Tensor, costs: Tensor
    ) -> tuple[Tensor, float | Tensor, float | Tensor]:
        """Argmin counts (M,), number of patches and sum of assigned costs, over all ranks.

        On the CPU the two sums are floats, elsewhere float64 device scalars (no sync).
        """
        m = self.reference.shape[0]
        if self._on_host:
            counts = torch.bincount(idx, minlength=m)
        else:  # CUDA's bincount reads the maximum index on the host; a scatter does not
            counts = torch.zeros(m, dtype=torch.int64, device=idx.device)
            counts.scatter_add_(0, idx, torch.ones_like(idx))
        size = torch.full((), float(idx.shape[0]), dtype=torch.float64, device=costs.device)
        sums = torch.stack([size, costs.double().sum()])
        if self.reduce_sum is not None:
            counts, sums = self.reduce_sum(counts), self.reduce_sum(sums)
        if not self._on_host:
            return counts, sums[0], sums[1]
        n, cost_sum = (float(v) for v in sums)
        return counts, n, cost_sum

    def _ascent_direction(self, counts: Tensor, n: float | Tensor) -> Tensor:
        """∇ψ of the semi-dual objective: ``1/M − counts/N``."""
        return 1.0 / counts.shape[0] - counts.to(torch.float32) / n

    def _track_scale(self, mean_cost: float) -> None:
        m = float(self.scale_momentum)  # type: ignore[arg-type]
        scale = (1 - m) * float(self._state["scale"]) + m * max(mean_cost, 1e-12)
        self._state["scale"] = torch.tensor(scale, dtype=torch.float64)

    def _update_scale_on_device(self, value: Tensor, mean_cost: Tensor) -> None:
        """:meth:`_update_scale` with device scalars: selections instead of branches."""
        scale = self._state["scale"]
        first = value.abs().clamp(min=1e-12)
        if self.scale_momentum is not None:
            m = float(self.scale_momentum)
            tracked = (1 - m) * scale + m * mean_cost.clamp(min=1e-12)
        else:
            tracked = scale
        self._state["scale"] = torch.where(scale <= 0.0, first, tracked)

    def _step_on_device(self, grad: Tensor) -> None:
        """:meth:`_step` with the step count and scalars as device tensors (no host sync)."""
        st, opt = self._state, self.options
        st["step"] = st["step"] + 1
        t = st["step"]
        m = self.psi.shape[0]
        if self.solver == "adam":
            b1, b2 = opt["beta1"], opt["beta2"]
            st["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
            mhat = st["exp_avg"] / (1 - b1**t)
            vhat = st["exp_avg_sq"] / (1 - b2**t)
            lr = opt["lr"] * st["scale"]
            self.psi.add_(lr * mhat / (vhat.sqrt() + opt["eps"]))
        elif self.solver == "asgd":
            eta, mu = st["eta"], st["mu"]
            self.psi.mul_(1 - opt["lambd"] * eta).add_(grad * eta)
            st["ax"].copy_(torch.where(mu == 1.0, self.psi, st["ax"] + (self.psi - st["ax"]) * mu))
            st["eta"] = opt["lr"] / (1 + opt["lambd"] * opt["lr"] * t) ** opt["alpha"]
            st["mu"] = 1.0 / (t - opt["t0"]).clamp(min=1.0)
        else:  # gd
            self.psi.add_(grad * (opt["lr"] * st["scale"] * m))

    def _step(self, grad: Tensor) -> None:
        if not self._on_host:
            self._step_on_device(grad)
            return
        st, opt = self._state, self.options
        st["step"] = st["step"] + 1
        t = float(st["step"])
        m = self.psi.shape[0]
        if self.solver == "adam":
            b1, b2 = opt["beta1"], opt["beta2"]
            st["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
            mhat = st["exp_avg"] / (1 - b1**t)
            vhat = st["exp_avg_sq"] / (1 - b2**t)
            lr = opt["lr"] * float(st["scale"])
            self.psi.add_(lr * mhat / (vhat.sqrt() + opt["eps"]))
        elif self.solver == "asgd":
            eta, mu = float(st["eta"]), float(st["mu"])
            self.psi.mul_(1 - opt["lambd"] * eta).add_(grad, alpha=eta)
            if mu != 1.0:
                st["ax"].add_((self.psi - st["ax"]) * mu)
            else:
                st["ax"].copy_(self.psi)
            st["eta"] = torch.tensor(
                opt["lr"] / (1 + opt["lambd"] * opt["lr"] * t) ** opt["alpha"], dtype=torch.float64
            )
            st["mu"] = torch.tensor(1.0 / max(1.0, t - opt["t0"]), dtype=torch.float64)
        else:  # gd
            self.psi.add_(grad, alpha=opt["lr"] * float(st["scale"]) * m)

    def ascend(self, patches: Tensor, passes: int) -> float:
        """Improve ψ for these generated patches, warm-started from the current ψ.

        Parameters
        ----------
        patches
            Generated patches (N, d) (detached internally), on the prior's device.
        passes
            Number of solver iterations; each is one c-transform over all N patches (the
            first a full one, the others pruned to what ψ's change can affect on the CPU;
            exact either way, see the module docstring).

        Returns
        -------
        float
            The semi-dual value at the last evaluated ψ (a lower bound of W₂²).
        """
        if int(passes) != passes or passes < 1:
            raise InputError(f"number of psi passes {passes} is invalid: use a positive integer")
        self._check_patches(patches)
        x = patches.detach().to(torch.float32)
        tracker = self._tracker(x, int(passes))
        value = self._ascend(x, int(passes), tracker)
        self._tracker_done(tracker)
        return float(value)  # off the CPU: the call's one host sync

    def _ascend(self, x: Tensor, passes: int, tracker: _PassTracker | None) -> float | Tensor:
        value: float | Tensor = float("nan")
        with torch.no_grad():
            for _ in range(passes):
                value, grad = self._pass(x, tracker)
                self._step(grad)
        return value

    def loss_and_ascend(self, patches: Tensor, passes: int = 1) -> Tensor:
        """The WPP loss and ψ ascent sharing one c-transform: the cheap training step.

        Runs ``passes − 1`` ascent passes, then one c-transform whose assignment gives both
        :meth:`loss` at the current ψ (returned, differentiable in ``patches``) and the last
        ascent step of ψ. This costs one c-transform less than :meth:`ascend` followed by
        :meth:`loss`.
        """
        if int(passes) != passes or passes < 1:
            raise InputError(f"number of psi passes {passes} is invalid: use a positive integer")
        self._check_patches(patches)
        x = patches.detach().to(torch.float32)
        tracker = self._tracker(x, int(passes))  # shared by the ascent and the loss pass
        if passes > 1:
            self._ascend(x, int(passes) - 1, tracker)
        with torch.no_grad():
            idx = self._argmin(x, tracker)
        self._tracker_done(tracker)
        target = self.reference[idx].to(patches.dtype)
        diff = patches - target
        psi = self.psi.to(patches.dtype)
        loss = (diff * diff).sum(1).mean() - psi[idx].mean() + psi.mean()
        with torch.no_grad():
            counts, n, cost_sum = self._global_counts(idx, (diff.detach().float() ** 2).sum(1))
            self._update_scale(self._semidual_value(counts, n, cost_sum), cost_sum / n)
            self._step(self._ascent_direction(counts, n))
        return loss

    def value(self, patches: Tensor) -> float:
        """Semi-dual value at the current ψ (one c-transform, no update)."""
        self._check_patches(patches)
        with torch.no_grad():
            _, vals = c_transform(patches.detach().to(torch.float32), self.reference, self.psi)
            return float(vals.double().mean() + self.psi.double().mean())

    def loss(self, patches: Tensor) -> Tensor:
        """Semi-dual value at the current ψ, differentiable in ``patches``.

        ``mean_j ‖x_j − y_κ(j)‖² − ψ_κ(j) + mean_k ψ_k`` with κ the exact c-transform argmin;
        the gradient flows only through the gathered reference patches (no gradient through
        ψ, no N × M graph).
        """
        self._check_patches(patches)
        idx = c_transform_argmin(patches.detach().to(torch.float32), self.reference, self.psi)
        target = self.reference[idx].to(patches.dtype)
        diff = patches - target
        psi = self.psi.to(patches.dtype)
        return (diff * diff).sum(1).mean() - psi[idx].mean() + psi.mean()
