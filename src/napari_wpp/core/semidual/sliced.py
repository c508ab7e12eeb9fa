"""The sliced (projected) patch distance: W₂² along one-dimensional projections.

Along a direction θ the patches of an image and those of the reference become two sets of
numbers, and the squared 2-Wasserstein distance of two sets of numbers is a sort: the i-th
smallest projection is matched with the reference's quantile at the same level. The sliced
distance averages this over directions:

    SW₂²(μ_x, μ_y) = d · mean_θ W₂²(θ·x, θ·y),

with d the patch dimension, so that it has the scale of W₂² (for a translated set, or over the
d axes of an orthonormal basis, it is a sum of one-dimensional distances, and it never
exceeds W₂²). No dual potential, no nearest-neighbour search: a step costs one (N × d)·(d × K)
product and K sorts of N numbers, O(K·N log N).

:class:`SlicedPatchPrior` offers the interface of
:class:`~napari_wpp.core.semidual.WassersteinPatchPrior` that training and the variational
reconstruction use (``loss_and_ascend``, ``loss``, ``value``, ``ascend``, ``state_dict``,
``load_state_dict``, ``to``); :func:`build_patch_prior` builds either from a name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from napari_wpp.core.config.patch_distance import PATCH_DISTANCES
from napari_wpp.core.errors import InputError
from napari_wpp.core.semidual.prior import WassersteinPatchPrior

__all__ = [
    "PatchPrior",
    "SlicedPatchPrior",
    "argsort_rows",
    "build_patch_prior",
    "interpolated_quantiles",
    "sort_rows",
]


def interpolated_quantiles(sorted_values: Tensor, n: int) -> Tensor:
    """The quantiles of each row at the levels ``(i + ½)/n``, i = 0 … n − 1.

    Parameters
    ----------
    sorted_values
        (K, M) values sorted along the last axis (one row per direction).
    n
        Number of levels (the number of generated patches).

    Returns
    -------
    Tensor
        (K, n): linear interpolation of the sorted values at the positions
        ``(i + ½)·M/n − ½`` (clamped to the ends), so ``n = M`` returns the values themselves
        and a reference of any size M can be matched with n generated values.
    """
    m = sorted_values.shape[-1]
    if n == m:
        return sorted_values
    low, high, frac = _interpolation(n, m, sorted_values.device)
    frac = frac.to(sorted_values.dtype)
    below = sorted_values[:, low]
    return torch.addcmul(below, sorted_values[:, high] - below, frac)


@functools.lru_cache(maxsize=8)
def _interpolation(n: int, m: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Indices below and above the levels ``(i + ½)/n`` among m sorted values, and weights."""
    levels = torch.arange(n, dtype=torch.float64, device=device)
    position = ((levels + 0.5) * (m / n) - 0.5).clamp(0.0, m - 1.0)
    low = position.floor().to(torch.int64)
    high = (low + 1).clamp(max=m - 1)
    return low, high, position - low.to(torch.float64)


def _numpy(values: Tensor) -> np.ndarray:
    """A CPU tensor as numpy (float32 for the dtypes numpy lacks, e.g. bfloat16)."""
    values = values.detach()
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    return values.numpy()


def sort_rows(values: Tensor) -> Tensor:
    """``values`` (K, N) sorted along the last axis, without gradient.

    On the CPU through numpy, whose vectorised sort is several times faster than torch's.
    """
    if values.device.type == "cpu":
        return torch.from_numpy(np.sort(_numpy(values), axis=-1))
    return values.detach().sort(-1).values


def argsort_rows(values: Tensor) -> Tensor:
    """The permutation (int64, K × N) that sorts each row of ``values`` (see :func:`sort_rows`)."""
    if values.device.type == "cpu":
        order = np.argsort(_numpy(values), axis=-1)
        return torch.from_numpy(order.astype(np.int64, copy=False))
    return values.detach().argsort(-1)


class SlicedPatchPrior:
    """Sliced W₂² between generated patches and fixed reference patches.

    Every call projects the generated patches onto ``n_projections`` random unit directions
    (drawn afresh from the prior's own generator) and onto the reference's principal axes (the
    eigenvectors of its covariance, fixed), sorts each projection and compares it with the
    reference's quantiles at the same levels (:func:`interpolated_quantiles`). The loss is

        d · mean over directions of mean_i (sorted projection_i − reference quantile_i)²,

    differentiable in the generated patches through the sort (the gradient of patch j along
    direction θ is ``2 d (θ·x_j − q_rank(j)) θ / (N K_total)``).

    Parameters
    ----------
    reference_patches
        Reference patches y (M, d); repeats are simply repeated values of the quantile
        function (no merging needed). M need not equal the number of generated patches.
    n_projections
        Random directions per call (0: the principal axes alone).
    principal_axes
        Also project onto the d principal axes of the reference (their sorted projections are
        computed once).
    seed
        Seed of the directions' generator (its state is :meth:`state_dict`, so a resumed run
        draws the same directions).
    reduce_sum
        Accepted for the interface of the exact prior. Under data parallelism every rank
        draws the same directions and compares *its own* patches with the reference (the
        quantile match is not pooled over ranks); the losses' gradients are averaged as usual.
    """

    def __init__(
        self,
        reference_patches: Tensor,
        n_projections: int = 64,
        principal_axes: bool = True,
        seed: int = 0,
        reduce_sum: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if int(n_projections) != n_projections or n_projections < 0:
            raise InputError(
                f"number of projections {n_projections} is invalid: use an integer ≥ 0"
            )
        if n_projections == 0 and not principal_axes:
            raise InputError("the sliced prior needs directions: use n_projections ≥ 1")
        y = reference_patches.detach()
        if y.ndim != 2 or y.shape[0] == 0:
            raise InputError(
                f"reference patches have shape {tuple(y.shape)}: pass a non-empty (M, d) matrix"
            )
        self.reference = y.to(torch.float32).contiguous()
        #: Number of reference patches given.
        self.n_given = int(y.shape[0])
        self.n_projections = int(n_projections)
        self.seed = int(seed)
        self.reduce_sum = reduce_sum
        self._generator = torch.Generator(device="cpu").manual_seed(self.seed)
        y64 = self.reference.double()
        self.mean = y64.mean(0).float()
        d = self.reference.shape[1]
        if principal_axes:
            centred = y64 - y64.mean(0)
            covariance = centred.T @ centred / max(1, self.n_given - 1)
            _eigenvalues, vectors = torch.linalg.eigh(covariance)
            #: (d, d) principal axes of the reference, by decreasing variance.
            self.axes = vectors.flip(1).float().contiguous()
        else:
            self.axes = torch.zeros(d, 0, dtype=torch.float32, device=self.reference.device)
        self._axis_sorted = self._sorted_projections(self.axes)

    # ------------------------------------------------------------------ directions
    @property
    def dimension(self) -> int:
        """Patch dimension d."""
        return int(self.reference.shape[1])

    def _sorted_projections(self, directions: Tensor) -> Tensor:
        """(K, M) sorted projections of the centred reference onto ``directions`` (d, K)."""
        if directions.shape[1] == 0:
            return directions.new_zeros(0, self.n_given)
        return sort_rows(directions.T @ (self.reference - self.mean).T)

    def random_directions(self) -> Tensor:
        """(d, n_projections) random unit directions from the prior's generator."""
        d = self.dimension
        draws = torch.randn(d, self.n_projections, generator=self._generator)
        draws = draws / draws.norm(dim=0, keepdim=True).clamp(min=1e-12)
        return draws.to(self.reference.device)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Restart the directions' generator from the seed."""
        self._generator.manual_seed(self.seed)

    def state_dict(self) -> dict[str, Tensor]:
        """The directions' generator state (for checkpoints and resume)."""
        return {"sliced.generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        saved = state.get("sliced.generator")
        if saved is None:
            raise InputError(
                "prior state was saved with the exact patch distance: resume with "
                "patch distance 'exact'"
            )
        self._generator.set_state(saved.detach().to("cpu", torch.uint8).clone())

    def to(self, device: torch.device | str) -> SlicedPatchPrior:
        """Move the reference patches and their precomputed projections (in place)."""
        device = torch.device(device)
        self.reference = self.reference.to(device)
        self.mean = self.mean.to(device)
        self.axes = self.axes.to(device)
        self._axis_sorted = self._axis_sorted.to(device)
        return self

    # ------------------------------------------------------------------ distance
    def _check_patches(self, patches: Tensor) -> None:
        if patches.ndim != 2 or patches.shape[1] != self.dimension:
            raise InputError(
                f"generated patches have shape {tuple(patches.shape)} but reference patches "
                f"have dimension {self.dimension}: use the same patch size"
            )
        if patches.shape[0] == 0:
            raise InputError("no generated patches: images must be at least one patch large")

    def loss(self, patches: Tensor) -> Tensor:
        """The sliced W₂² of ``patches`` (N, d), differentiable; new random directions."""
        self._check_patches(patches)
        n = patches.shape[0]
        directions = self.random_directions()
        with torch.no_grad():
            targets = interpolated_quantiles(
                torch.cat([self._sorted_projections(directions), self._axis_sorted]), n
            )
        every = torch.cat([directions, self.axes], 1).to(patches.dtype)
        projected = every.T @ (patches - self.mean.to(patches.dtype)).T  # (K, N)
        ordered = projected.gather(1, argsort_rows(projected).to(projected.device))
        per_direction = ((ordered - targets.to(patches.dtype)) ** 2).mean(1)
        return self.dimension * per_direction.mean()

    def loss_and_ascend(
        self, patches: Tensor, passes: int = 1, should_stop: Callable[[], bool] | None = None
    ) -> Tensor:
        """:meth:`loss` (there is no dual potential to ascend; ``passes`` is checked only)."""
        if int(passes) != passes or passes < 1:
            raise InputError(f"number of psi passes {passes} is invalid: use a positive integer")
        return self.loss(patches)

    def ascend(
        self, patches: Tensor, passes: int, should_stop: Callable[[], bool] | None = None
    ) -> float:
        """Nothing to ascend: the sliced distance at new random directions, as a float."""
        return self.value(patches)

    def value(self, patches: Tensor) -> float:
        """The sliced W₂² of ``patches`` at new random directions (no gradient)."""
        with torch.no_grad():
            return float(self.loss(patches.detach()))


#: A patch prior as training and the reconstruction use it.
PatchPrior = WassersteinPatchPrior | SlicedPatchPrior


def build_patch_prior(
    distance: str,
    reference_patches: Tensor,
    projections: int = 64,
    seed: int = 0,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
    **exact_options: Any,
) -> PatchPrior:
    """The patch prior named ``distance`` (``"exact"`` or ``"sliced"``).

    ``projections`` and ``seed`` go to the sliced prior, ``exact_options`` (solver, scale
    momentum, solver options) to the exact one; ``reduce_sum`` to both.
    """
    if distance == "sliced":
        return SlicedPatchPrior(
            reference_patches, n_projections=projections, seed=seed, reduce_sum=reduce_sum
        )
    if distance == "exact":
        return WassersteinPatchPrior(reference_patches, reduce_sum=reduce_sum, **exact_options)
    raise InputError(
        f"unknown patch distance {distance!r}: use one of {', '.join(PATCH_DISTANCES)}"
    )
