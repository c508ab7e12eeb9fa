"""The Wasserstein Patch Prior: semi-dual optimal transport against fixed reference patches."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from napari_wpp.core.errors import InputError
from napari_wpp.core.semidual import pruning
from napari_wpp.core.semidual.engine import c_transform, c_transform_argmin


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


def distinct_rows(y: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The rows of ``y`` without repeats, in the order of their first occurrence.

    Returns
    -------
    rows
        (M', d) distinct rows (``y`` itself when all rows differ).
    counts
        (M',) multiplicity of each distinct row, or ``None`` when all rows differ.
    which
        (M,) index of each row of ``y`` among the distinct rows, or ``None``.
    """
    unique, inverse, counts = torch.unique(y, dim=0, return_inverse=True, return_counts=True)
    m, u = y.shape[0], unique.shape[0]
    if u == m:
        return y, None, None
    index = torch.arange(m, device=y.device)
    first = torch.full((u,), m, dtype=torch.int64, device=y.device)
    first = first.scatter_reduce(0, inverse, index, "amin")
    order = first.argsort()  # distinct rows by first occurrence
    rank = torch.empty_like(order)
    rank[order] = torch.arange(u, device=y.device)
    return y[first[order]].contiguous(), counts[order], rank[inverse]


class WassersteinPatchPrior:
    """Semi-dual Wasserstein patch prior against fixed reference patches.

    Holds the potential ψ of the semi-dual problem

        W₂²(μ_x, μ_y) = max_ψ mean_j min_k (‖x_j − y_k‖² − ψ_k) + mean_k ψ_k,

    with one ψ_k per *distinct* reference patch: repeated patches (flat or saturated regions
    of real scans, a featureless reference) are one point of the reference measure with
    their multiplicity as its weight, so ``mean_k ψ_k`` is weighted and the ascent direction
    is ``w_k − counts_k/N``. It is the same optimal transport problem, without the ties
    between copies that would send many rows of every pass to float64 re-ranking.

    improves it with a first-order solver (warm-started across calls) and gives the WPP loss
    whose gradient in the generated patches is that of ``mean_j ‖x_j − y_κ(j)‖²``.

    Parameters
    ----------
    reference_patches
        Reference patches y (M, d); :attr:`reference` keeps the distinct ones (M', d), in
        order of first occurrence, and :attr:`weights` their multiplicities / M (``None``
        when all differ).
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
        y = y.to(torch.float32).contiguous()
        self.reference, counts, self._distinct_index = distinct_rows(y)
        #: Number of reference patches given (with repeats).
        self.n_given = int(y.shape[0])
        #: Weight of each distinct patch in the reference measure (``None``: uniform).
        self.weights = None if counts is None else counts.to(torch.float32) / self.n_given
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
        """Restore what :meth:`state_dict` returned (same reference patches and solver).

        A state saved with one ψ per given patch (before repeated patches were merged) is
        mapped onto the distinct patches: each takes the copy with the largest ψ (the one
        every c-transform picked), with its solver moments.
        """
        state = self._merged_copies(state)
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

    def _merged_copies(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``state`` with per-patch entries of all M given patches reduced to the M' distinct."""
        psi = state.get("psi")
        which = self._distinct_index
        if which is None or psi is None or psi.shape != (self.n_given,):
            return state
        which = which.to(psi.device)
        u, m = self.reference.shape[0], self.n_given
        best = torch.full((u,), -torch.inf, dtype=psi.dtype, device=psi.device)
        best = best.scatter_reduce(0, which, psi, "amax")
        index = torch.arange(m, device=psi.device)
        index = torch.where(psi == best[which], index, m)
        pick = torch.full((u,), m, dtype=torch.int64, device=psi.device)
        pick = pick.scatter_reduce(0, which, index, "amin")
        return {k: v[pick] if v.ndim == 1 and v.shape[0] == m else v for k, v in state.items()}

    def _psi_mean(self, psi: Tensor) -> Tensor:
        """``mean_k ψ_k`` over the reference measure (weighted where patches repeat)."""
        if self.weights is None:
            return psi.mean()
        return (self.weights.to(psi.device, psi.dtype) * psi).sum()

    def to(self, device: torch.device | str) -> WassersteinPatchPrior:
        """Move reference patches, ψ and the solver state to ``device`` (in place)."""
        device = torch.device(device)
        self.reference = self.reference.to(device)
        self.psi = self.psi.to(device)
        if self.weights is not None:
            self.weights = self.weights.to(device)
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

    def _tracker(self, x: Tensor, passes: int) -> pruning._PassTracker | None:
        """Pruned-pass tracker for ``passes`` c-transforms of fixed patches, where it pays."""
        if not (pruning.PASS_PRUNING and passes > 1 and x.device.type == "cpu"):
            return None
        if self._prune_pause > 0:
            self._prune_pause -= 1
            return None
        return pruning._PassTracker(x, self.reference)

    def _tracker_done(self, tracker: pruning._PassTracker | None) -> None:
        if tracker is not None and tracker.gave_up:
            self._prune_pause = pruning.PRUNE_PAUSE

    def _argmin(self, x: Tensor, tracker: pruning._PassTracker | None) -> Tensor:
        if tracker is None:
            return c_transform_argmin(x, self.reference, self.psi)
        return tracker(self.psi)

    def _pass(
        self, x: Tensor, tracker: pruning._PassTracker | None = None
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
        psi_mean: float | Tensor = self._psi_mean(self.psi.double())
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
        """∇ψ of the semi-dual objective: ``w_k − counts_k/N`` (``w_k = 1/M`` if none repeat)."""
        share = 1.0 / counts.shape[0] if self.weights is None else self.weights
        return share - counts.to(torch.float32) / n

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

    def _adam_step(self, grad: Tensor, t: float | Tensor, lr: float | Tensor) -> None:
        """Adam's moment updates at step ``t`` and its ascent step of size ``lr`` on ψ."""
        st, opt = self._state, self.options
        b1, b2 = opt["beta1"], opt["beta2"]
        st["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        mhat = st["exp_avg"] / (1 - b1**t)
        vhat = st["exp_avg_sq"] / (1 - b2**t)
        self.psi.add_(lr * mhat / (vhat.sqrt() + opt["eps"]))

    def _step_on_device(self, grad: Tensor) -> None:
        """:meth:`_step` with the step count and scalars as device tensors (no host sync)."""
        st, opt = self._state, self.options
        st["step"] = st["step"] + 1
        t = st["step"]
        m = self.psi.shape[0]
        if self.solver == "adam":
            self._adam_step(grad, t, opt["lr"] * st["scale"])
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
            self._adam_step(grad, t, opt["lr"] * float(st["scale"]))
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

    def ascend(
        self, patches: Tensor, passes: int, should_stop: Callable[[], bool] | None = None
    ) -> float:
        """Improve ψ for these generated patches, warm-started from the current ψ.

        Parameters
        ----------
        patches
            Generated patches (N, d) (detached internally), on the prior's device.
        passes
            Number of solver iterations; each is one c-transform over all N patches (the
            first a full one, the others pruned to what ψ's change can affect on the CPU;
            exact either way, see the module docstring).
        should_stop
            Asked before every pass after the first; ``True`` ends the ascent there (ψ and the
            solver state are those of the last completed pass). A stop event or a deadline.

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
        value = self._ascend(x, int(passes), tracker, should_stop, first_checked=False)
        self._tracker_done(tracker)
        return float(value)  # off the CPU: the call's one host sync

    def _stop_asked(self, should_stop: Callable[[], bool] | None) -> bool:
        """``should_stop()``; under data parallelism, whether any rank asks (all stop alike)."""
        if should_stop is None:
            return False
        asked = bool(should_stop())
        if self.reduce_sum is not None:
            flag = torch.tensor(float(asked), device=self.reference.device)
            asked = bool(self.reduce_sum(flag) > 0)
        return asked

    def _ascend(
        self,
        x: Tensor,
        passes: int,
        tracker: pruning._PassTracker | None,
        should_stop: Callable[[], bool] | None = None,
        first_checked: bool = True,
    ) -> float | Tensor:
        value: float | Tensor = float("nan")
        with torch.no_grad():
            for done in range(passes):
                if (done or first_checked) and self._stop_asked(should_stop):
                    break
                value, grad = self._pass(x, tracker)
                self._step(grad)
        return value

    def loss_and_ascend(
        self, patches: Tensor, passes: int = 1, should_stop: Callable[[], bool] | None = None
    ) -> Tensor:
        """The WPP loss and ψ ascent sharing one c-transform: the cheap training step.

        Runs ``passes − 1`` ascent passes, then one c-transform whose assignment gives both
        :meth:`loss` at the current ψ (returned, differentiable in ``patches``) and the last
        ascent step of ψ. This costs one c-transform less than :meth:`ascend` followed by
        :meth:`loss`. ``should_stop`` is asked before each of the ``passes − 1`` ascent passes;
        ``True`` skips the rest of them (the loss pass always runs, at the ψ reached).
        """
        if int(passes) != passes or passes < 1:
            raise InputError(f"number of psi passes {passes} is invalid: use a positive integer")
        self._check_patches(patches)
        x = patches.detach().to(torch.float32)
        tracker = self._tracker(x, int(passes))  # shared by the ascent and the loss pass
        if passes > 1:
            self._ascend(x, int(passes) - 1, tracker, should_stop)
        with torch.no_grad():
            idx = self._argmin(x, tracker)
        self._tracker_done(tracker)
        target = self.reference[idx].to(patches.dtype)
        diff = patches - target
        psi = self.psi.to(patches.dtype)
        loss = (diff * diff).sum(1).mean() - psi[idx].mean() + self._psi_mean(psi)
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
            return float(vals.double().mean() + self._psi_mean(self.psi.double()))

    def loss(self, patches: Tensor) -> Tensor:
        """Semi-dual value at the current ψ, differentiable in ``patches``.

        ``mean_j ‖x_j − y_κ(j)‖² − ψ_κ(j) + mean_k ψ_k`` (weighted where patches repeat) with
        κ the exact c-transform argmin;
        the gradient flows only through the gathered reference patches (no gradient through
        ψ, no N × M graph).
        """
        self._check_patches(patches)
        idx = c_transform_argmin(patches.detach().to(torch.float32), self.reference, self.psi)
        target = self.reference[idx].to(patches.dtype)
        diff = patches - target
        psi = self.psi.to(patches.dtype)
        return (diff * diff).sum(1).mean() - psi[idx].mean() + self._psi_mean(psi)
