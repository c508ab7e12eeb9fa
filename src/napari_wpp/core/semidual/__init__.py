"""Exact c-transform, semi-dual optimal transport and the Wasserstein Patch Prior.

* :mod:`~napari_wpp.core.semidual.engine`: the exact c-transform argmin on the CPU (the
  grouped block engine with a rigorous error bound and float64 re-ranking) and the dispatch
  of :func:`c_transform_argmin` to the accelerator paths;
* :mod:`~napari_wpp.core.semidual.gpu`: the fused Triton kernel and the torch device path;
* :mod:`~napari_wpp.core.semidual.pruning`: pruned ψ passes within one prior call (CPU);
* :mod:`~napari_wpp.core.semidual.prior`: :class:`WassersteinPatchPrior` (ψ, its solvers,
  the WPP loss), :func:`exact_w2` and :func:`semidual_value`;
* :mod:`~napari_wpp.core.semidual.sliced`: :class:`SlicedPatchPrior` (W₂² along random and
  principal 1-D projections, a sort each) and :func:`build_patch_prior` (either prior by name).
"""

from napari_wpp.core.semidual.engine import c_transform, c_transform_argmin
from napari_wpp.core.semidual.prior import WassersteinPatchPrior, exact_w2, semidual_value
from napari_wpp.core.semidual.sliced import PatchPrior, SlicedPatchPrior, build_patch_prior

__all__ = [
    "PatchPrior",
    "SlicedPatchPrior",
    "WassersteinPatchPrior",
    "build_patch_prior",
    "c_transform",
    "c_transform_argmin",
    "exact_w2",
    "semidual_value",
]
