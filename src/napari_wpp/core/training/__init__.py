"""Unsupervised training of superresolution networks with the Wasserstein Patch Prior.

The WPPNet loss of a batch of LR crops ``y_i`` is

    L(θ) = mean_i mean((f(G_θ(y_i)) − y_i)²) + λ · W₂²(patches of all G_θ(y_i) pooled, reference)

with the semi-dual W₂² of :mod:`napari_wpp.core.semidual` (exact c-transform, ψ warm-started
across steps). The data term is compared away from the crop border (LR pixels whose HR support
leaves the crop are ignored), so the operator's padding never enters the loss.

Training is a generator of typed events, like the variational reconstruction, so that the CLI
and napari drive the same code: :class:`TrainingProgress` after every step,
:class:`TrainingPreview` every ``preview_every`` steps, :class:`TrainingCheckpoint` every
``checkpoint_every`` steps and one :class:`TrainingFinished` at the end (also when stopped
through ``stop`` or by the budget). Checkpoint and final events carry a :class:`TrainingState`
(model, ψ, optimizer and random state): writing it to a file is the caller's business
(:func:`napari_wpp.io.save_model`), and passing it back as ``resume`` continues the same run.

The package: :mod:`~napari_wpp.core.config.training` holds the parameters (``TrainingConfig``
is :class:`~napari_wpp.core.config.TrainSpec`), :mod:`.setup` builds a run, :mod:`.losses`
holds the loss objects, :mod:`.loop` steps the run and yields its events (:mod:`.events`),
:mod:`.data` cuts crops and :mod:`.lambdas` chooses the prior weight; :mod:`.patchnr` trains
a PatchNR prior by maximum likelihood on patches.
"""

from napari_wpp.core.config.training import (
    DEFAULT_MEAN_WARMUP,
    DEFAULT_STEPS,
    DEVICE_DEFAULTS,
    PAPER_LAMBDA_NUMERATOR,
    PRECISIONS,
    PSI_MODES,
    PUBLISHED_RHO_PER_CROP,
    TRAINABLE_MODELS,
    TrainSpec,
)
from napari_wpp.core.training.data import CropSampler, augmentation_is_consistent
from napari_wpp.core.training.events import (
    RATE_WINDOW,
    TrainingCheckpoint,
    TrainingEvent,
    TrainingFinished,
    TrainingPreview,
    TrainingProgress,
    TrainingState,
    rate_text,
    saved_config,
)
from napari_wpp.core.training.lambdas import (
    AUTO_LAMBDA_GRID,
    choose_lambda,
    default_lambda,
    operator_gain,
    paper_lambda,
    published_rho,
)
from napari_wpp.core.training.loop import run_training, train
from napari_wpp.core.training.losses import FLOW_GRAD_CLIP, FlowLoss, LossTerms, WPPNetLoss
from napari_wpp.core.training.patchnr import train_patchnr
from napari_wpp.core.training.setup import (
    CHANNELS_LAST,
    FINAL_LR_FRACTION,
    PSI_SCALE_MOMENTUM,
    TrainingRun,
    native_bf16,
    setup_run,
)

#: The parameters of a training run (the spec :class:`~napari_wpp.core.config.TrainSpec`).
TrainingConfig = TrainSpec

__all__ = [
    "AUTO_LAMBDA_GRID",
    "CHANNELS_LAST",
    "DEFAULT_MEAN_WARMUP",
    "DEFAULT_STEPS",
    "DEVICE_DEFAULTS",
    "FINAL_LR_FRACTION",
    "FLOW_GRAD_CLIP",
    "PAPER_LAMBDA_NUMERATOR",
    "PRECISIONS",
    "PSI_MODES",
    "PSI_SCALE_MOMENTUM",
    "PUBLISHED_RHO_PER_CROP",
    "RATE_WINDOW",
    "TRAINABLE_MODELS",
    "CropSampler",
    "FlowLoss",
    "LossTerms",
    "TrainSpec",
    "TrainingCheckpoint",
    "TrainingConfig",
    "TrainingEvent",
    "TrainingFinished",
    "TrainingPreview",
    "TrainingProgress",
    "TrainingRun",
    "TrainingState",
    "WPPNetLoss",
    "augmentation_is_consistent",
    "choose_lambda",
    "native_bf16",
    "default_lambda",
    "operator_gain",
    "paper_lambda",
    "published_rho",
    "rate_text",
    "run_training",
    "saved_config",
    "setup_run",
    "train",
    "train_patchnr",
]
