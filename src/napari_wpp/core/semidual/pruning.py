"""Pruned ψ passes: exact c-transforms of fixed patches for a sequence of nearby ψ.

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

import math
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from napari_wpp.core.semidual import engine as _engine
from napari_wpp.core.semidual.engine import c_transform_argmin

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
    def begin(self, engine: _engine._Engine) -> None:
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
            out = _engine._grouped_argmin(x, self.y, psi, "fp32", store=self, shift=shift)
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
        self._workers = saved if _engine.THREADED and self.x.device.type == "cpu" else 1
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
            with _engine._ieee_fp32_matmul(self.x.device):
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
            won_rows, winners = _engine._resolve_across_groups(self.x, self.y, psi, rows, points)
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
