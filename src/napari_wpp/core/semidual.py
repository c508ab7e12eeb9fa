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
4. Rows that are not certified are recomputed by a float64 brute force (chunked).

On the CPU the blocks are shared among worker threads (one per torch thread), each running
its operations single-threaded: many small parallel operations would otherwise each pay an
OpenMP barrier, which is slow on a busy machine. While a call runs, torch's thread count is
set to 1 in the workers and restored afterwards.

The error bound (u = unit round-off of the score precision, d = dimension) is
``E_j = 2 (d + 6) u (2 |x_j| max_k |y_k| + max_k |c_k| + max_k |y_k|²)``, a safety factor 2
over the standard bound for inner products computed with recursive or blocked summation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

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
#: Unit round-off of the precisions used for candidate scores.
_UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8}
_PAD_SCORE = 1e30
#: Candidates re-ranked in float64 when a row's winner is not certified across groups.
CROSS_CANDIDATES = 32


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


def _score_block(y_aug: Tensor, x_aug: Tensor) -> Tensor:
    """Scores of one block: (M_pad, d+1) @ (R, d+1)ᵀ → (M_pad, R).

    Kept as a separate function so tests can observe the block shapes (memory bound).
    """
    return torch.mm(y_aug, x_aug.T)


class _Engine:
    """Prepared reference side of the grouped exact argmin (reused across calls)."""

    def __init__(self, x: Tensor, y: Tensor, psi: Tensor, precision: str) -> None:
        device = y.device
        m, d = y.shape
        self.m, self.d = m, d
        self.precision = precision
        mu = y.double().mean(0).to(torch.float32)
        self.mu = mu
        yc = y.to(torch.float32) - mu
        c64 = (yc.double() ** 2).sum(1) - psi.double()
        c64 = c64 - 0.5 * (c64.max() + c64.min())
        c = c64.to(torch.float32)
        self.group = max(1, min(GROUP_SIZE, m))
        self.n_groups = math.ceil(m / self.group)
        m_pad = self.n_groups * self.group
        y_aug = torch.zeros(m_pad, d + 1, dtype=torch.float32, device=device)
        y_aug[:m, :d] = -2.0 * yc
        y_aug[:m, d] = c
        y_aug[m:, d] = _PAD_SCORE
        self.y_aug = y_aug
        if precision == "bf16":
            # candidate scores from bf16-rounded coordinates; c stays float32
            self.c_pad = y_aug[:, d].clone()
            self.y_lo = y_aug[:, :d].to(torch.bfloat16)
        ynorm = yc.double().norm(dim=1)
        self.ymax = float(ynorm.max())
        self.const = float(c64.abs().max()) + self.ymax**2
        u32 = _UNIT_ROUNDOFF["fp32"]
        self.k32 = 2.0 * (d + 6) * u32
        self.klo = 8.0 * _UNIT_ROUNDOFF[precision] if precision != "fp32" else 0.0

    def bound(self, xc: Tensor) -> Tensor:
        """Error bound E_j of the computed scores for centred rows xc (R, d)."""
        xn = xc.norm(dim=1).to(torch.float32)
        cross = 2.0 * xn * self.ymax
        return self.k32 * (cross + self.const) + self.klo * cross

    def prepare_rows(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Centred, augmented rows ``[x − μ, 1]`` (N, d+1) and twice their error bound (N,)."""
        xc = x.to(torch.float32) - self.mu
        x_aug = torch.cat([xc, torch.ones(xc.shape[0], 1, dtype=xc.dtype, device=xc.device)], 1)
        return x_aug, 2.0 * self.bound(xc)

    def block(self, x_aug: Tensor, bound2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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
            scores = _score_block(self.y_aug, x_aug)  # (M_pad, R)
        g, b = self.n_groups, self.group
        view = scores.view(g, b, r)
        gmin = view.amin(1)  # (G, R)
        if g >= 2:
            top = gmin.topk(2, dim=0, largest=False)
            m1, g1, m2 = top.values[0], top.indices[0], top.values[1]
            group_ok = (m2 - m1) > bound2
        else:
            m1, g1 = gmin[0], torch.zeros(r, dtype=torch.int64, device=x_aug.device)
            group_ok = torch.ones(r, dtype=torch.bool, device=x_aug.device)
        ar_r = torch.arange(r, device=x_aug.device)
        ar_b = torch.arange(b, device=x_aug.device)
        cand = view[g1[:, None], ar_b[None, :], ar_r[:, None]]  # (R, B)
        within = cand <= (m1 + bound2)[:, None]
        n_cand = within.sum(1)
        idx = g1 * b + cand.argmin(1)
        status = torch.where(n_cand > 1, 1, 0)
        status = torch.where(group_ok, status, 2)
        return idx, status, g1, scores


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


def _resolve_across_groups(
    engine: _Engine,
    x: Tensor,
    y: Tensor,
    psi: Tensor,
    rows: Tensor,
    scores: Tensor,
    bound2: Tensor,
) -> tuple[Tensor, Tensor]:
    """Float64 re-rank of every candidate within the error bound, across groups.

    Real patches contain exact duplicates (flat regions, saturated pixels) whose ties span
    groups. For such rows the ``CROSS_CANDIDATES`` smallest computed scores hold every point
    within ``2 E_j`` of the best one, unless more points are that close; those candidates are
    re-ranked exactly. Returns the winners and the mask of rows resolved this way (the others
    go to the float64 brute force).
    """
    k = min(CROSS_CANDIDATES + 1, scores.shape[0])
    vals, cand = scores[:, rows].T.topk(k, dim=1, largest=False)  # (U, k), ascending
    within = vals <= vals[:, :1] + bound2[rows][:, None]
    if k > CROSS_CANDIDATES:
        ok = ~within[:, -1]
    else:
        ok = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    cand = cand.clamp(max=engine.m - 1)
    s64 = _exact_scores(x[rows].double(), y[cand].double(), psi[cand].double())
    s64 = s64.masked_fill(~within, math.inf)
    # the lowest index among exact ties, as a float64 brute-force argmin picks
    tied = s64 == s64.min(1, keepdim=True).values
    winner = torch.where(tied, cand, torch.full_like(cand, engine.m)).min(1).values
    return winner, ok


def _run_blocks(
    engine: _Engine,
    x: Tensor,
    y: Tensor,
    psi: Tensor,
    starts: list[int],
    rows: int,
    out: Tensor,
    prepared: tuple[Tensor, Tensor],
) -> list[Tensor]:
    """Process the row blocks beginning at ``starts``; returns rows left uncertified."""
    n = x.shape[0]
    x_aug, bound2 = prepared
    pending: list[Tensor] = []
    for start in starts:
        stop = min(n, start + rows)
        idx, status, groups, scores = engine.block(x_aug[start:stop], bound2[start:stop])
        multi = torch.nonzero(status == 1).squeeze(1)
        if multi.numel():
            idx[multi] = _resolve_multi(engine, x[start:stop], y, psi, multi, groups[multi])
        bad = torch.nonzero(status == 2).squeeze(1)
        if bad.numel():
            winner, ok = _resolve_across_groups(
                engine, x[start:stop], y, psi, bad, scores, bound2[start:stop]
            )
            idx[bad[ok]] = winner[ok]
            bad = bad[~ok]
        out[start:stop] = idx
        if bad.numel():
            pending.append(bad + start)
    return pending


def _threaded_blocks(
    engine: _Engine,
    x: Tensor,
    y: Tensor,
    psi: Tensor,
    starts: list[int],
    rows: int,
    out: Tensor,
    prepared: tuple[Tensor, Tensor],
) -> list[Tensor]:
    """Run blocks on CPU worker threads, each single-threaded (no OpenMP barriers per op)."""
    workers = min(torch.get_num_threads(), len(starts))
    saved = torch.get_num_threads()

    def work(part: list[int]) -> list[Tensor]:
        torch.set_num_threads(1)
        return _run_blocks(engine, x, y, psi, part, rows, out, prepared)

    parts = [starts[i::workers] for i in range(workers)]
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(work, parts))
    finally:
        torch.set_num_threads(saved)
    return [t for r in results for t in r]


def _grouped_argmin(x: Tensor, y: Tensor, psi: Tensor, precision: str) -> Tensor:
    n, d = x.shape
    engine = _Engine(x, y, psi, precision)
    m_pad = engine.n_groups * engine.group
    rows = max(16, min(n, BLOCK_ELEMS // m_pad))
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    starts = list(range(0, n, rows))
    prepared = engine.prepare_rows(x)  # O(N d) memory
    with _ieee_fp32_matmul(x.device):
        if THREADED and x.device.type == "cpu" and torch.get_num_threads() > 1 and len(starts) > 1:
            pending = _threaded_blocks(engine, x, y, psi, starts, rows, out, prepared)
        else:
            pending = _run_blocks(engine, x, y, psi, starts, rows, out, prepared)
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
        ``"torch"`` (grouped block engine, any device), ``"faiss"`` (CPU, needs faiss) or
        ``"auto"`` (currently the torch engine; faiss is not faster on this workload).

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
        if backend == "faiss" or (backend == "auto" and _prefer_faiss(x)):
            if x.device.type != "cpu":
                raise InputError("the faiss backend runs on the CPU only: use backend='torch'")
            if not _faiss_available():
                raise InputError(
                    "faiss is not installed: pip install faiss-cpu or use backend='torch'"
                )
            return _faiss_argmin(x, y, psi)
        if backend not in ("auto", "torch"):
            raise InputError(f"unknown backend {backend!r}: use auto, torch or faiss")
        return _grouped_argmin(x, y, psi, precision)


def _prefer_faiss(x: Tensor) -> bool:
    return False


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
    **solver_options
        Hyper-parameters of the solver (``lr``, ``beta1``, ``beta2``, ``eps`` for adam;
        ``lr``, ``lambd``, ``alpha``, ``t0`` for asgd; ``lr`` for gd).
    """

    def __init__(self, reference_patches: Tensor, solver: str = "adam", **solver_options: float):
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
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Set ψ to zero and forget the solver state (moments, step count, cost scale)."""
        dev = self.reference.device
        m = self.reference.shape[0]
        self.psi = torch.zeros(m, dtype=torch.float32, device=dev)
        zeros = torch.zeros(m, dtype=torch.float32, device=dev)
        scalar = torch.zeros((), dtype=torch.float64)
        self._state = {"step": scalar.clone(), "scale": scalar.clone()}
        if self.solver == "adam":
            self._state.update(exp_avg=zeros.clone(), exp_avg_sq=zeros.clone())
        elif self.solver == "asgd":
            self._state.update(
                ax=zeros.clone(),
                eta=torch.tensor(self.options["lr"], dtype=torch.float64),
                mu=torch.ones((), dtype=torch.float64),
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
            if v.ndim:
                self._state[k] = v.to(device)
        return self

    # ------------------------------------------------------------------ solver
    def _check_patches(self, patches: Tensor) -> None:
        if patches.ndim != 2 or patches.shape[1] != self.reference.shape[1]:
            raise InputError(
                f"generated patches have shape {tuple(patches.shape)} but reference patches "
                f"have dimension {self.reference.shape[1]}: use the same patch size"
            )
        if patches.shape[0] == 0:
            raise InputError("no generated patches: images must be at least one patch large")

    def _pass(self, x: Tensor) -> tuple[float, Tensor]:
        """One c-transform over all patches: semi-dual value and ascent direction ∇ψ."""
        n, m = x.shape[0], self.reference.shape[0]
        idx, vals = c_transform(x, self.reference, self.psi)
        counts = torch.bincount(idx, minlength=m).to(torch.float32)
        value = float(vals.double().mean() + self.psi.double().mean())
        if float(self._state["scale"]) <= 0.0:
            # cost scale: the semi-dual value at the first call (mean nearest-neighbour cost
            # when psi = 0), floored to stay positive
            self._state["scale"] = torch.tensor(max(abs(value), 1e-12), dtype=torch.float64)
        grad = 1.0 / m - counts / n
        return value, grad

    def _step(self, grad: Tensor) -> None:
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
            Number of solver iterations; each is one c-transform over all N patches.

        Returns
        -------
        float
            The semi-dual value at the last evaluated ψ (a lower bound of W₂²).
        """
        if int(passes) != passes or passes < 1:
            raise InputError(f"number of psi passes {passes} is invalid: use a positive integer")
        self._check_patches(patches)
        x = patches.detach().to(torch.float32)
        value = float("nan")
        with torch.no_grad():
            for _ in range(int(passes)):
                value, grad = self._pass(x)
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
        if passes > 1:
            self.ascend(patches, int(passes) - 1)
        self._check_patches(patches)
        m = self.reference.shape[0]
        with torch.no_grad():
            idx = c_transform_argmin(patches.detach().to(torch.float32), self.reference, self.psi)
        target = self.reference[idx].to(patches.dtype)
        diff = patches - target
        psi = self.psi.to(patches.dtype)
        loss = (diff * diff).sum(1).mean() - psi[idx].mean() + psi.mean()
        with torch.no_grad():
            if float(self._state["scale"]) <= 0.0:
                self._state["scale"] = torch.tensor(
                    max(abs(float(loss.detach())), 1e-12), dtype=torch.float64
                )
            counts = torch.bincount(idx, minlength=m).to(torch.float32)
            self._step(1.0 / m - counts / patches.shape[0])
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
