"""The training losses of a WPPNet and of a WPPFlow, one object each.

Both compare the generated HR batch ``x`` with its LR crops ``y`` through the forward operator
``f`` away from the crop border (LR pixels whose HR support leaves the crop are ignored, see
:func:`~napari_wpp.core.training.data.data_margins`), and add the W₂² between the patches of
``x`` (all crops pooled) and the reference patches of the run's patch prior: the semi-dual
:class:`~napari_wpp.core.semidual.WassersteinPatchPrior`, whose ψ ascends on the way, or the
sliced :class:`~napari_wpp.core.semidual.SlicedPatchPrior`:

* :class:`WPPNetLoss`: ``mean((f(x) − y)²) + λ · W₂²``;
* :class:`FlowLoss` (backward KL per LR pixel): ``mean((f(x) − y)²)/(2σ²) + ρ · W₂² −
  mean(log|det ∇T|)/n_LR``, stepped as that loss times ``2σ²`` (WPPNet units: same step
  sizes, same gradient clipping bound :data:`FLOW_GRAD_CLIP`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from napari_wpp.core.errors import DivergenceError
from napari_wpp.core.patches import strided_patches

__all__ = ["FLOW_GRAD_CLIP", "FlowLoss", "LossTerms", "WPPNetLoss"]

#: WPPFlow: gradient norm bound (in WPPNet loss units, i.e. the flow loss times 2σ²),
#: applied after backward so that a spike of the log-determinant cannot blow up the weights.
FLOW_GRAD_CLIP = 1.0


@dataclass(frozen=True)
class LossTerms:
    """The terms of one step's loss.

    Attributes
    ----------
    data_term, wpp_term
        ``mean((f(x) − y)²)`` over the inner LR pixels, and W₂² between the generated and
        the reference patches (0 when the weight is 0).
    loss
        The loss as defined by the loss object.
    scaled
        What is differentiated (``loss``, or the flow's loss times 2σ²).
    logdet
        The flow's ``log|det ∇T|`` per sample (``None`` for a WPPNet loss).
    """

    data_term: Tensor
    wpp_term: Tensor
    loss: Tensor
    scaled: Tensor
    logdet: Tensor | None = None

    def logged(self) -> list[Tensor]:
        """``[data_term, wpp_term, loss]`` and, for a flow, the mean log-determinant."""
        terms = [self.data_term, self.wpp_term, self.loss]
        return terms + ([self.logdet.mean()] if self.logdet is not None else [])


@dataclass(eq=False)
class _PatchPriorLoss:
    """What both losses share: the inner data term and the patch prior's W₂².

    Parameters
    ----------
    operator
        Forward operator ``f`` (on the training device).
    margins
        LR pixels ignored at the start and end of each crop side.
    weight
        λ (WPPNet) or ρ (WPPFlow); 0 skips the prior (no ψ ascent).
    patch_size
        Side p of the patches.
    patches_per_step
        About this many generated patches on a strided grid with a random offset (0: all).
    psi_passes
        ψ ascent passes per step (the last one shares its c-transform with the loss).
    should_stop
        Asked between the ψ passes of a step (a stop event, a deadline): ``True`` ends the
        ascent early, the loss pass still runs.
    """

    operator: torch.nn.Module
    margins: tuple[int, int]
    weight: float
    patch_size: int
    patches_per_step: int
    psi_passes: int
    should_stop: Callable[[], bool] | None = None

    def data_term(self, hr: Tensor, lr: Tensor) -> Tensor:
        """``mean((f(hr) − lr)²)`` over the LR pixels away from the crop border."""
        lr_hat = self.operator(hr)
        start, end = self.margins
        inner = (..., slice(start, lr.shape[-2] - end), slice(start, lr.shape[-1] - end))
        return torch.mean((lr_hat[inner] - lr[inner]) ** 2)

    def prior_term(self, hr: Tensor, prior: object, generator: torch.Generator) -> Tensor:
        """W₂² of ``hr``'s patches (ψ ascends ``psi_passes`` times); 0 when the weight is 0."""
        patches = strided_patches(hr, self.patch_size, self.patches_per_step, generator)
        if self.weight > 0:
            return prior.loss_and_ascend(  # type: ignore[attr-defined]
                patches, self.psi_passes, self.should_stop
            )
        return torch.zeros((), device=hr.device)

    def clip_gradients(self, parameters: Iterable[Tensor], step: int) -> None:
        """Bound the gradients after backward (nothing for a WPPNet loss)."""


class WPPNetLoss(_PatchPriorLoss):
    """``mean((f(x) − y)²) + λ · W₂²`` (a WPPNet, or a flow's mean network in its warm-up)."""

    def __call__(
        self, hr: Tensor, lr: Tensor, prior: object, generator: torch.Generator
    ) -> LossTerms:
        """The terms of the loss of the HR batch ``hr`` (float32) for the LR crops ``lr``."""
        data_term = self.data_term(hr, lr)
        wpp_term = self.prior_term(hr, prior, generator)
        loss = data_term + self.weight * wpp_term
        return LossTerms(data_term, wpp_term, loss, loss)


@dataclass(eq=False)
class FlowLoss(_PatchPriorLoss):
    """Backward KL per LR pixel: ``mean((f(x) − y)²)/(2σ²) + ρ·W₂² − mean(log|det|)/n_LR``.

    Parameters
    ----------
    noise_std
        σ of the LR data; ``weight`` is ρ. The other parameters are those of
        :class:`WPPNetLoss`.
    """

    noise_std: float = field(kw_only=True)

    @property
    def two_sigma2(self) -> float:
        """``2σ²``, the factor between the flow's loss and WPPNet loss units."""
        return 2.0 * self.noise_std**2

    def __call__(
        self,
        hr: Tensor,
        lr: Tensor,
        prior: object,
        generator: torch.Generator,
        logdet: Tensor | None = None,
    ) -> LossTerms:
        """The terms of the loss of the samples ``hr`` with log-determinants ``logdet``."""
        assert logdet is not None, "a flow's loss needs the log-determinants"
        data_term = self.data_term(hr, lr)
        wpp_term = self.prior_term(hr, prior, generator)
        entropy = logdet.mean() / float(lr.shape[2] * lr.shape[3])
        loss = data_term / self.two_sigma2 + self.weight * wpp_term - entropy
        return LossTerms(data_term, wpp_term, loss, loss * self.two_sigma2, logdet)

    def clip_gradients(self, parameters: Iterable[Tensor], step: int) -> None:
        """Clip the gradient norm to :data:`FLOW_GRAD_CLIP`; a non-finite norm diverged."""
        norm = torch.nn.utils.clip_grad_norm_(parameters, FLOW_GRAD_CLIP)
        if not torch.isfinite(norm):
            raise DivergenceError(
                f"training diverged at step {step} (non-finite gradient): lower ρ (--rho), "
                "use a larger --batch-size or another --seed; checkpoints written before are kept"
            )
