"""The spec of a training run (a WPPNet, a WPPFlow or a PatchNR prior), torch-free.

:class:`TrainSpec` holds every default, bound and one-line help of training, including the
device-dependent defaults (fields left at ``None``, filled in by :meth:`TrainSpec.for_device`
from their ``cpu``/``cuda`` metadata) and the constants the faces describe (model kinds, the
published flow weighting, the default budget). ``napari_wpp.core.training.TrainingConfig``
is this class, so saved model files (``config.to_dict()``) keep loading.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from napari_wpp.core.config.fields import MAX_COUNT, MAX_SEED, field_meta, spec_field
from napari_wpp.core.config.patch_distance import (
    PATCH_DISTANCES,
    patch_distance_field,
    projections_field,
)

__all__ = [
    "CALIBRATION_SAMPLES",
    "CHECKPOINT_MINUTES",
    "DEFAULT_CALIBRATION_HOLDOUT",
    "DEFAULT_MEAN_WARMUP",
    "DEFAULT_STEPS",
    "DEVICE_DEFAULTS",
    "PAPER_LAMBDA_NUMERATOR",
    "PATCH_DISTANCES",
    "PRECISIONS",
    "PSI_MODES",
    "PREDICTION_MODELS",
    "PUBLISHED_RHO_PER_CROP",
    "TRAINABLE_MODELS",
    "TrainSpec",
    "device_defaults",
]

#: Model kinds that can be trained.
TRAINABLE_MODELS = ("wppnet", "wppflow", "patchnr")
#: Model kinds that superresolve by themselves (a PatchNR is a prior for ``reconstruct``).
PREDICTION_MODELS = ("wppnet", "wppflow")
#: Modes of the dual potentials ψ (see :attr:`TrainSpec.psi_mode`).
PSI_MODES = ("shared", "per_batch")
#: Mixed precision choices (see :attr:`TrainSpec.mixed_precision`).
PRECISIONS = ("auto", "bf16", "off")
#: Steps used when neither a step nor a time budget is given.
DEFAULT_STEPS = 500
#: λ · n_LR² of the paper's rule λ = 12.5 / n_LR² (mean data term, n_LR the LR crop side); the
#: default λ multiplies it by the operator's squared gain (``default_lambda``).
PAPER_LAMBDA_NUMERATOR = 12.5
#: The published flow's prior weight ρ per LR crop: its loss is ``½‖f(x) − y‖² + ρ·W₂² −
#: σ²·log|det ∇T|`` with the squared error summed over the crop (REFERENCE.md §5).
PUBLISHED_RHO_PER_CROP = 100.0
#: WPPFlow: share of the budget that trains the mean network alone before it is frozen
#: (docs/algorithms.md, "Mean first, then the spread").
DEFAULT_MEAN_WARMUP = 0.3
#: WPPFlow: share of the reference's columns (the right-most) kept out of the patch prior to
#: calibrate the std on (docs/algorithms.md, "Calibrated std").
DEFAULT_CALIBRATION_HOLDOUT = 0.15
#: Posterior samples per pixel when the std calibration is fitted (predict's usual count).
CALIBRATION_SAMPLES = 16
#: Minutes between two writes of the model file by the faces (CLI, Train widget).
CHECKPOINT_MINUTES = 5.0

#: Device types whose defaults a device-dependent field records (others take the CPU's).
_DEVICE_KINDS = ("cpu", "cuda")


def _per_device(help: str, cpu: int, cuda: int, low: int, high: int) -> Any:
    """Metadata of a field whose default depends on the device (the field's default: None)."""
    return field_meta(help, low, high, cpu=cpu, cuda=cuda, default_text=f"{cpu}; {cuda} on CUDA")


@dataclass(frozen=True)
class TrainSpec:
    """Parameters of a WPPNet, WPPFlow or PatchNR training run (the CLI and widgets build this).

    Every field carries its one-line help and bounds (:func:`~napari_wpp.core.config.bounds`,
    :func:`~napari_wpp.core.config.help_text`). Fields whose best value depends on the device
    default to ``None`` and carry ``cpu`` and ``cuda`` defaults in their metadata, which
    :meth:`for_device` fills in (MPS and other devices take the CPU values; the CUDA values
    are the published settings, provisional until measured, docs/benchmarks.md). The
    functions named below live in :mod:`napari_wpp.core.training`.

    Parameters
    ----------
    model
        Model kind: ``"wppnet"`` (a CNN), ``"wppflow"`` (a conditional normalizing flow,
        trained with the backward KL of REFERENCE.md §1) or ``"patchnr"`` (a normalizing flow
        on patches trained by maximum likelihood on the reference's patches, or on the LR
        data's own in zero-shot mode: a prior for the variational reconstruction).
    lam
        WPPNet: weight λ of the patch prior (mean data term). ``None``: the paper's rule
        :func:`paper_lambda` times the operator's squared gain, :func:`default_lambda`
        (unchanged for normalised blurs, about 3.2× for the estimated sandstone kernel of sum
        1.8); ``"auto"``: chosen on the reference by :func:`choose_lambda`.
    rho
        WPPFlow: weight ρ of the patch prior in the loss per LR pixel ``mean‖f(x) − y‖²/(2σ²)
        + ρ·W₂² − log|det ∇T|/n_LR``. ``None``: the published weighting
        :func:`published_rho` (1600 for σ = 0.01 and 25×25 crops); ``"auto"``: the λ of
        :func:`choose_lambda` divided by 2σ², since the WPPNet loss is that loss times 2σ²
        without the entropy (with σ = 0.01, ρ = 100 is λ = 0.02, the paper's WPPNet value).
    mean_warmup
        WPPFlow: share of the budget in which the flow's mean network is trained alone, as a
        WPPNet (data term plus λ·W₂², λ from ``lam`` as for WPPNet), before it is frozen and
        the rest of the flow learns the spread around it with the loss above (0: everything
        trained together from the start). Each phase decays its own learning rate.
    calibration_holdout
        WPPFlow: share of the reference's columns (the right-most of every image) kept out
        of the patch prior. After training, the train job degrades them with the operator
        and σ, samples the flow on them and fits the std calibration
        (:mod:`napari_wpp.core.calibration`) stored in the model file.
    steps, minutes
        Budgets; training stops at whichever comes first. With neither, :data:`DEFAULT_STEPS`.
    batch_size
        LR crops per step and process; their generated patches are pooled into one
        distribution (over all processes of a data-parallel run: W processes train as one
        process with W times the batch and the patches per step). ``None``: the device's
        default (:data:`DEVICE_DEFAULTS`, like the three settings below); :func:`train`
        records the value it used in the saved configuration.
    crop_size
        Side of the LR crops (clipped to the LR data's size).
    n_reference_patches
        Size of the fixed random subset of reference patches (``None``: the device's).
    psi_passes
        ψ ascent passes per step; the last one shares its c-transform with the loss
        (``None``: the device's).
    psi_mode
        ``"shared"``: one ψ for all batches, fresh random crops every step;
        ``"per_batch"`` (published): ``n_fixed_batches`` fixed batches of crops, one ψ each.
    n_fixed_batches
        Number of fixed batches in ``"per_batch"`` mode.
    psi_solver, psi_lr
        ψ solver of :class:`~napari_wpp.core.semidual.WassersteinPatchPrior` and its step
        (``None``: the solver's default). The adam/gd cost scale follows the mean assigned
        cost (``PSI_SCALE_MOMENTUM``), since early outputs are far from the reference.
    patch_distance, projections
        The prior's patch distance: ``"exact"`` (the semi-dual W₂² of
        :class:`~napari_wpp.core.semidual.WassersteinPatchPrior`, with ψ and its solver) or
        ``"sliced"`` (:class:`~napari_wpp.core.semidual.SlicedPatchPrior`: W₂² along
        ``projections`` random directions redrawn every step plus the reference's principal
        axes; the ψ settings are then unused).
    patches_per_step
        About this many generated patches per step and process, on a strided grid with a
        random offset (0: all of them; ``None``: the device's default).
    patch_size
        Side p of the patches.
    learning_rate
        Adam step of the network, cosine-decayed to a tenth of it.
    mixed_precision
        ``"auto"``: the network runs in bfloat16 autocast on CUDA and on CPUs with native
        bfloat16 (AVX512-BF16/AMX), float32 elsewhere; ``"bf16"`` or ``"off"`` to force.
        A WPPFlow uses it for its mean network during the warm-up only.
        Patches are cast to float32 before the exact c-transform, so the neighbour assignment
        of the given outputs stays exact.
    augment
        Random flips and 90° rotations of the crops, where the operator allows them
        (:func:`augmentation_is_consistent`).
    lr_denoise
        A WPPNet trained with an operator that carries an LR noise model (one estimated from
        a registered pair) keeps that model and denoises its LR input at inference
        (:mod:`napari_wpp.core.lr_denoise`); training always sees the crops as they are.
    noise_std
        Noise level σ of the LR data (normalised units), used by ``lam="auto"`` and as the σ
        of WPPFlow's data term.
    seed
        Seed of every random choice (crops, reference patches, initial weights).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    preview_every, checkpoint_every, validate_every
        Yield a preview / checkpoint / validation PSNR every this many steps (``None``: never;
        the final event always carries the state).
    checkpoint_minutes
        Also yield a checkpoint whenever this many minutes have passed since the last one
        (``None``: never), e.g. for the CLI to save the model file periodically.
    patchnr_hidden
        PatchNR: hidden width of the coupling subnets (published 512; ``None``: the device's).
    patchnr_batch
        PatchNR: training patches per step (``None``: the device's).
    model_options
        Extra constructor arguments of the model (e.g. ``{"features": 32}``).
    """

    model: str = spec_field(
        "wppnet",
        "wppnet (a CNN), wppflow (a conditional normalizing flow: posterior samples) or "
        "patchnr (a patch flow: the learned prior of `reconstruct --prior`)",
        choices=TRAINABLE_MODELS,
    )
    lam: float | str | None = spec_field(
        None,
        "wppnet: weight λ of the patch prior (mean data term), or 'auto' (chosen on the reference)",
        0.0,
        None,
        default_text=f"{PAPER_LAMBDA_NUMERATOR:g} · gain² / crop-size², gain the operator's kernel "
        "sum: 0.02 for 25-pixel crops and a normalised blur",
    )
    rho: float | str | None = spec_field(
        None,
        "wppflow: weight ρ of the patch prior in the flow's loss per LR pixel, "
        "data/(2σ²) + ρ·W₂² − log-det/n_LR, or 'auto' (the λ chosen on the reference "
        "divided by 2σ²)",
        0.0,
        None,
        default_text=f"the published weighting, ρ = {PUBLISHED_RHO_PER_CROP:g} per LR crop, "
        f"which is {PUBLISHED_RHO_PER_CROP:g}/(σ²·crop²) per LR pixel: 1600 for σ = 0.01 "
        "and 25-pixel crops",
    )
    mean_warmup: float = spec_field(
        DEFAULT_MEAN_WARMUP,
        "wppflow: share of the budget that trains the flow's mean network alone, as a "
        "WPPNet, before it is frozen and the flow learns the spread around it (0: train "
        "everything together)",
        0.0,
        0.9,
    )
    calibration_holdout: float = spec_field(
        DEFAULT_CALIBRATION_HOLDOUT,
        "wppflow: share of the reference's columns (the right-most) kept out of the patch "
        "prior; after training the flow is sampled on them, degraded, and its std is "
        "calibrated against the actual error there (0: no calibration)",
        0.0,
        0.5,
    )
    steps: int | None = spec_field(
        None,
        "step budget; budgets count the whole run, including resumed steps",
        1,
        10**9,
        default_text=f"{DEFAULT_STEPS} steps when no time budget is given either",
    )
    minutes: float | None = spec_field(
        None,
        "time budget in minutes (with a step budget: whichever ends first)",
        0.0,
        None,
        default_text="none",
    )
    batch_size: int | None = field(
        default=None,
        metadata=_per_device("LR crops per step (per process under torchrun)", 8, 25, 1, MAX_COUNT),
    )
    crop_size: int = spec_field(
        25, "side of the LR crops in LR pixels (clipped to the data)", 4, 4096
    )
    n_reference_patches: int | None = field(
        default=None,
        metadata=_per_device(
            "random reference patches used by the prior", 5_000, 10_000, 10, 10**7
        ),
    )
    psi_passes: int | None = field(
        default=None,
        metadata=_per_device("dual (ψ) ascent passes per step", 2, 5, 1, 100),
    )
    psi_mode: str = spec_field(
        "shared",
        "shared: one ψ, fresh random crops every step; per_batch (published): fixed "
        "batches of crops, one ψ each",
        choices=PSI_MODES,
    )
    psi_solver: str = spec_field("adam", "ψ solver of the semi-dual W₂² (adam, gd, asgd)")
    psi_lr: float | None = spec_field(
        None, "step of the ψ solver", 0.0, None, default_text="the solver's"
    )
    patch_distance: str = patch_distance_field()
    projections: int = projections_field()
    n_fixed_batches: int = spec_field(40, "number of fixed batches in per_batch ψ mode", 1, 10_000)
    patches_per_step: int | None = field(
        default=None,
        metadata=_per_device(
            "about this many generated patches per step and process (0: all of them)",
            20_000,
            0,
            0,
            10**8,
        ),
    )
    patch_size: int = spec_field(6, "side p of the patches", 1, 64)
    learning_rate: float = spec_field(
        1e-3, "Adam step of the network, cosine-decayed to a tenth", 0.0, None
    )
    mixed_precision: str = spec_field(
        "auto", "auto (bfloat16 where native), bf16 or off", choices=PRECISIONS
    )
    augment: bool = spec_field(
        True, "random flips and 90° rotations of the crops, where consistent"
    )
    lr_denoise: bool = spec_field(
        True,
        "wppnet: denoise the LR input at inference with the noise model of an operator "
        "estimated from a registered pair (other operators have none)",
    )
    noise_std: float = spec_field(
        0.01,
        "noise std σ of the LR data on the [0, 1] intensity scale: the σ of wppflow's data "
        "term, and used by λ/ρ 'auto'",
        0.0,
        1.0,
    )
    seed: int = spec_field(0, "seed of every random choice", 0, MAX_SEED)
    device: str = spec_field("auto", "auto, cpu, cuda, cuda:N or mps")
    preview_every: int | None = spec_field(
        None, "preview every this many steps", 1, None, default_text="never"
    )
    checkpoint_every: int | None = spec_field(
        None, "checkpoint every this many steps", 1, None, default_text="never"
    )
    checkpoint_minutes: float | None = spec_field(
        None, "checkpoint every this many minutes", 0.0, None, default_text="never"
    )
    validate_every: int | None = spec_field(
        None, "validation PSNR every this many steps", 1, None, default_text="never"
    )
    patchnr_hidden: int | None = field(
        default=None,
        metadata=_per_device(
            "patchnr: hidden width of the coupling subnets (published 512)", 256, 512, 4, 4096
        ),
    )
    patchnr_batch: int | None = field(
        default=None,
        metadata=_per_device("patchnr: training patches per step", 256, 1024, 1, MAX_COUNT),
    )
    model_options: dict[str, Any] = field(
        default_factory=dict,
        metadata=field_meta("extra constructor arguments of the model, e.g. {'features': 32}"),
    )

    def to_dict(self) -> dict:
        """JSON-serialisable copy of the parameters."""
        return asdict(self)

    def for_device(self, device: Any) -> TrainSpec:
        """A copy with the device-dependent settings left at ``None`` filled in.

        Parameters
        ----------
        device
            A ``torch.device`` or a device text (``"cpu"``, ``"cuda:1"``, ...).
        """
        kind = getattr(device, "type", None) or str(device).split(":")[0]
        defaults = device_defaults(type(self), kind)
        chosen = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return replace(self, **chosen)


def device_defaults(spec: type = TrainSpec, kind: str = "cpu") -> dict[str, Any]:
    """The device-dependent defaults of ``spec`` for the device type ``kind``."""
    key = kind if kind in _DEVICE_KINDS else "cpu"
    return {item.name: item.metadata[key] for item in fields(spec) if key in item.metadata}


#: Defaults of the device-dependent fields per device type (read from :class:`TrainSpec`).
DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    kind: device_defaults(TrainSpec, kind) for kind in _DEVICE_KINDS
}
