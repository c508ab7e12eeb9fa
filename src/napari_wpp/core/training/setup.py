"""Setting up a training run: checked config, data, priors, model, optimiser, resume.

:func:`setup_run` turns the inputs of :func:`~napari_wpp.core.training.train` into a
:class:`TrainingRun`, in the order that fixes every random draw (so a run is reproducible
and resumable bit for bit on a CPU); the loop then only steps it.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from napari_wpp.core.budget import Budget, cosine_factor
from napari_wpp.core.config.training import (
    DEFAULT_STEPS,
    PATCH_DISTANCES,
    PRECISIONS,
    PSI_MODES,
    TRAINABLE_MODELS,
)
from napari_wpp.core.config.training import TrainSpec as TrainingConfig
from napari_wpp.core.devices import resolve_device
from napari_wpp.core.distributed import DataParallel, current
from napari_wpp.core.errors import InputError
from napari_wpp.core.lr_denoise import BLOCK as LR_NOISE_BLOCK
from napari_wpp.core.models import build_model
from napari_wpp.core.operators import ForwardOperator
from napari_wpp.core.semidual import PatchPrior, build_patch_prior
from napari_wpp.core.training.data import (
    CropSampler,
    as_stack,
    augmentation_is_consistent,
    data_margins,
    reference_patches,
)
from napari_wpp.core.training.events import TrainingState, saved_config, snapshot
from napari_wpp.core.training.lambdas import choose_lambda, default_lambda, published_rho
from napari_wpp.core.training.losses import FlowLoss, WPPNetLoss

__all__ = [
    "CHANNELS_LAST",
    "FINAL_LR_FRACTION",
    "PSI_SCALE_MOMENTUM",
    "TrainingRun",
    "check_config",
    "native_bf16",
    "setup_run",
]

#: The learning rate decays (cosine) from ``learning_rate`` to this fraction of it.
FINAL_LR_FRACTION = 0.1
#: Weight of the newest mean assigned cost in the ψ solver's cost scale.
PSI_SCALE_MOMENTUM = 0.1
#: Channels-last convolutions per device type for the network being trained: measured faster
#: on CPUs; on CUDA a switch left off until measured (bf16 autocast is on there).
CHANNELS_LAST: dict[str, bool] = {"cpu": True, "cuda": False}
#: Settings a resumed run takes from the caller (all others from the saved run).
RESUME_OVERRIDES = (
    "steps",
    "minutes",
    "device",
    "preview_every",
    "checkpoint_every",
    "checkpoint_minutes",
    "validate_every",
)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 convolutions natively (fast)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            flags = open("/proc/cpuinfo").read()  # noqa: SIM115 (read once, Linux only)
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def check_config(config: TrainingConfig) -> None:
    """Raise ``InputError`` (naming the fix) for an invalid, device-resolved config."""
    if config.model == "patchnr":
        raise InputError(
            "a PatchNR trains on patches alone: use core.training.train_patchnr (the train job "
            "does)"
        )
    if config.model not in TRAINABLE_MODELS:
        raise InputError(
            f"unknown model {config.model!r} for training: use one of {', '.join(TRAINABLE_MODELS)}"
        )
    for name, value in (("lambda", config.lam), ("rho", config.rho)):
        if isinstance(value, str) and value != "auto":
            raise InputError(f"{name} {value!r} is invalid: use a number ≥ 0 or 'auto'")
        if isinstance(value, (int, float)) and value < 0:
            raise InputError(f"{name} must be ≥ 0, got {value}")
    if not 0.0 <= config.mean_warmup < 1.0:
        raise InputError(
            f"mean warm-up must be a share of the budget in [0, 1), got {config.mean_warmup}"
        )
    if config.model == "wppflow" and not config.noise_std > 0:
        raise InputError(f"WPPFlow needs a noise level σ > 0, got {config.noise_std}")
    for name in ("batch_size", "crop_size", "n_reference_patches", "psi_passes", "patch_size"):
        value = getattr(config, name)
        if int(value) != value or value < 1:
            raise InputError(f"{name.replace('_', ' ')} must be a positive integer, got {value}")
    if config.steps is not None and config.steps < 0:
        raise InputError(f"steps must be ≥ 0, got {config.steps}")
    if config.minutes is not None and config.minutes < 0:
        raise InputError(f"minutes must be ≥ 0, got {config.minutes}")
    if config.psi_mode not in PSI_MODES:
        raise InputError(f"psi mode {config.psi_mode!r} is unknown: use one of {PSI_MODES}")
    if config.mixed_precision not in PRECISIONS:
        raise InputError(
            f"mixed precision {config.mixed_precision!r} is unknown: use one of {PRECISIONS}"
        )
    if config.learning_rate <= 0:
        raise InputError(f"learning rate must be > 0, got {config.learning_rate}")
    if config.patch_distance not in PATCH_DISTANCES:
        raise InputError(
            f"patch distance {config.patch_distance!r} is unknown: use one of "
            f"{', '.join(PATCH_DISTANCES)}"
        )
    if int(config.projections) != config.projections or config.projections < 0:
        raise InputError(f"projections must be an integer ≥ 0, got {config.projections}")


def data_parallel_modules(
    model: torch.nn.Module, device: torch.device, dp: DataParallel
) -> Callable[[str], torch.nn.Module]:
    """What the training step calls: ``"model"`` or the flow's ``"mean"`` network.

    One process: the modules themselves. Several: each wrapped in ``DistributedDataParallel``
    (gradients averaged over the ranks) when first asked for, so that a flow's wrapper is
    built after its mean network is frozen (DDP registers the parameters that need
    gradients when it is built).
    """
    wrapped: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        module = model.mean_net if name == "mean" else model
        if not dp.active:
            return module
        if name not in wrapped:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            wrapped[name] = DistributedDataParallel(module, device_ids=ids)
        return wrapped[name]

    return get


@dataclass
class TrainingRun:
    """A run ready to step: what :func:`setup_run` built and the loop updates.

    ``step``, ``history`` and ``mean_frozen`` change as the run goes; ``lam`` is λ (WPPNet)
    or ρ (WPPFlow), ``warmup_lam`` the λ of a flow's mean warm-up (0: none left) and
    ``warmup`` its share of the budget. ``loss`` is the run's loss object, ``mean_loss``
    that of the warm-up.
    """

    config: TrainingConfig
    device: torch.device
    dp: DataParallel
    operator: ForwardOperator
    model: torch.nn.Module
    priors: list[PatchPrior]
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    sampler: CropSampler
    fixed_batches: list[Tensor]
    share: slice
    loss: WPPNetLoss | FlowLoss
    mean_loss: WPPNetLoss
    lam: float
    warmup_lam: float
    warmup: float
    use_amp: bool
    channels_last: bool
    budget: Budget
    normalisation: dict | None
    preview: Tensor
    validation: tuple[Tensor, np.ndarray] | None
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    mean_frozen: bool = False

    @property
    def flow(self) -> bool:
        """Whether the run trains a WPPFlow."""
        return self.config.model == "wppflow"

    @property
    def scale(self) -> int:
        """The operator's scale factor q."""
        return int(self.operator.scale)

    def snapshot(self) -> TrainingState:
        """The run's resumable state now."""
        return snapshot(
            self.model,
            self.config.model,
            self.operator,
            self.lam,
            self.config,
            self.step,
            self.budget.elapsed(),
            self.normalisation,
            self.priors,
            self.optimizer,
            self.generator,
            self.history,
            self.mean_frozen,
        )

    def run_model(self, lr: Tensor) -> Tensor:
        """The model's output (a flow's mode) for ``lr``, without gradients, as float32."""
        with torch.no_grad():
            self.model.eval()
            lr = lr.to(self.device)
            out = (self.model.mode_sample(lr) if self.flow else self.model(lr)).float()
            self.model.train()
        return out

    def freeze_mean(self) -> None:
        """End a flow's warm-up: its mean network stops learning (default memory layout)."""
        self.mean_frozen = True
        self.model.mean_net.requires_grad_(False)
        if self.channels_last:
            self.model.mean_net.to(memory_format=torch.contiguous_format)

    def set_learning_rate(self, fraction: float, mean_phase: bool) -> None:
        """Cosine decay within the current phase (the warm-up, or the rest of the budget)."""
        warmup = self.warmup
        if mean_phase:
            factor = cosine_factor(fraction / warmup, FINAL_LR_FRACTION)
        else:
            factor = cosine_factor((fraction - warmup) / (1.0 - warmup), FINAL_LR_FRACTION)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.learning_rate * factor

    def next_batch(self) -> tuple[Tensor, PatchPrior]:
        """All ranks' crops of this step and the prior they go with."""
        if self.fixed_batches:
            index = self.step % len(self.priors)
            return self.fixed_batches[index], self.priors[index]
        return self.sampler.sample(self.dp.world_size * self.config.batch_size), self.priors[0]


def resolved_config(
    config: TrainingConfig | None, operator: ForwardOperator, resume: TrainingState | None
) -> TrainingConfig:
    """The config a run goes on with: the saved one when resuming (budget, device and event
    intervals from ``config``); the operator must be the checkpoint's."""
    config = config or TrainingConfig()
    if resume is None:
        return config
    saved = saved_config(resume)
    saved = replace(saved, **{name: getattr(config, name) for name in RESUME_OVERRIDES})
    if operator.to_dict() != resume.operator:
        raise InputError(
            "the operator differs from the one the checkpoint was trained with: "
            "resume with the same operator"
        )
    return saved


def setup_run(
    lr_data: np.ndarray,
    reference: np.ndarray | list[np.ndarray],
    operator: ForwardOperator,
    config: TrainingConfig | None,
    stop: threading.Event | None,
    resume: TrainingState | None,
    **inputs: Any,
) -> TrainingRun:
    """Check the inputs and build a :class:`TrainingRun`; bad input raises ``InputError``.

    The parameters are those of :func:`~napari_wpp.core.training.loop.train`, which passes
    them all; ``inputs`` holds its ``normalisation``, ``validation``, ``preview_input`` and
    ``data_parallel``.
    """
    normalisation = inputs.get("normalisation")
    validation = inputs.get("validation")
    preview_input = inputs.get("preview_input")
    data_parallel = inputs.get("data_parallel")
    config = resolved_config(config, operator, resume)
    dp = data_parallel if data_parallel is not None else current()
    device = resolve_device(config.device)
    config = config.for_device(device)
    check_config(config)
    stack = as_stack(lr_data)
    q = operator.scale
    p = config.patch_size
    crop = int(min(config.crop_size, *stack.shape[1:]))
    margins = data_margins(operator, crop)
    if crop * q < p or crop - sum(margins) < 1:
        raise InputError(
            f"LR crops of {crop}×{crop} are too small at scale {q} (need > "
            f"{sum(margins)} LR pixels for the blur and ≥ {p} HR pixels for a "
            "patch): use larger LR crops"
        )
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # initial weights
    regions = reference if isinstance(reference, list) else [reference]
    patches = reference_patches(regions, config.n_reference_patches, p, config.seed)
    patches = patches.to(device)

    flow = config.model == "wppflow"
    two_sigma2 = 2.0 * config.noise_std**2

    def chosen_lambda() -> float:
        lam_net, _ = choose_lambda(
            regions[0],
            operator,
            config.noise_std,
            seed=config.seed,
            device=str(device),
            stop=stop,
            patch_distance=config.patch_distance,
            projections=config.projections,
        )
        return lam_net

    def wppnet_lambda() -> float:
        if config.lam == "auto":
            return chosen_lambda()
        return default_lambda(crop, operator) if config.lam is None else float(config.lam)

    if resume is not None:
        lam = resume.lam
    elif flow and config.rho is None:
        lam = published_rho(config.noise_std, crop)
    elif flow and config.rho == "auto":
        lam = chosen_lambda() / two_sigma2
    elif flow:
        lam = float(config.rho)
    else:
        lam = wppnet_lambda()
    # WPPFlow trains its mean network alone first (a WPPNet loss with this λ), then freezes it
    mean_frozen = resume.mean_frozen if resume is not None else False
    warmup_lam = wppnet_lambda() if flow and config.mean_warmup > 0 and not mean_frozen else 0.0

    model_options = dict(config.model_options)
    if flow:
        model_options.setdefault("sampling_offset", float(operator.sampling_offset))
        model_options.setdefault("seed", config.seed)
    noise_variance = getattr(operator, "noise_variance", None)
    denoise = config.model == "wppnet" and config.lr_denoise and noise_variance is not None
    if denoise:
        model_options.setdefault("denoise_block", LR_NOISE_BLOCK)
    model = build_model(config.model, scale=q, **model_options)
    if denoise and resume is None:
        model.set_noise_variance(noise_variance)
    model = model.to(device)
    n_priors = config.n_fixed_batches if config.psi_mode == "per_batch" else 1
    solver_options = {} if config.psi_lr is None else {"lr": config.psi_lr}
    momentum = None if config.psi_solver == "asgd" else PSI_SCALE_MOMENTUM
    reduce_sum = dp.all_reduce_sum if dp.active else None
    priors = [
        build_patch_prior(
            config.patch_distance,
            patches,
            projections=config.projections,
            seed=config.seed + i,
            reduce_sum=reduce_sum,
            solver=config.psi_solver,
            scale_momentum=momentum,
            **solver_options,
        )
        for i in range(n_priors)
    ]
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    step, elapsed_before, history = 0, 0.0, []
    if resume is not None:
        model.load_state_dict(resume.model.state_dict())
        if len(resume.priors) != n_priors:
            raise InputError("checkpoint has a different number of ψ states: resume unchanged")
        for prior, state in zip(priors, resume.priors, strict=True):
            prior.load_state_dict(state)
        if resume.optimizer is not None:
            optimizer.load_state_dict(resume.optimizer)
        if resume.rng is not None:
            generator.set_state(resume.rng)
        step, elapsed_before, history = resume.step, resume.elapsed_s, list(resume.history)

    augment = config.augment and augmentation_is_consistent(operator)
    sampler = CropSampler(stack, crop, augment, generator)
    fixed_batches: list[Tensor] = []
    if config.psi_mode == "per_batch":
        fixed_sampler = CropSampler(
            stack, crop, False, torch.Generator().manual_seed(config.seed + 1)
        )
        fixed_batches = [
            fixed_sampler.sample(dp.world_size * config.batch_size) for _ in range(n_priors)
        ]
    op = copy.deepcopy(operator).to(device)
    budget = Budget(config.steps, config.minutes, DEFAULT_STEPS, elapsed_before)
    loss_options = {
        # the stop event and the time budget are honoured between the ψ passes of a step
        "should_stop": budget.stopper(stop),
        "operator": op,
        "margins": margins,
        "patch_size": p,
        "patches_per_step": config.patches_per_step,
        "psi_passes": config.psi_passes,
    }
    if flow:
        loss: WPPNetLoss | FlowLoss = FlowLoss(
            weight=lam, noise_std=config.noise_std, **loss_options
        )
    else:
        loss = WPPNetLoss(weight=lam, **loss_options)
    if preview_input is None:
        preview_input = stack[0, :64, :64]
    preview = torch.from_numpy(np.ascontiguousarray(preview_input, np.float32))[None, None]
    val = None
    if validation is not None:
        val = (
            torch.from_numpy(np.ascontiguousarray(validation[0], np.float32))[None, None],
            np.asarray(validation[1], np.float32),
        )
    # bfloat16 for a WPPNet, also for the flow's mean network during its warm-up; the flow
    # itself stays in float32 (log-determinants and inverses)
    if config.mixed_precision == "auto":
        use_amp = native_bf16(device)
    else:
        use_amp = config.mixed_precision == "bf16"
    # Channels-last convolutions are faster on CPUs for the WPPNet being trained (the flow's
    # mean network during its warm-up); a frozen mean network returns to the default layout
    # that the flow's other blocks and inference use.
    warmup = config.mean_warmup if flow and config.mean_warmup > 0 else 0.0
    channels_last = CHANNELS_LAST.get(device.type, False) and (
        not flow or (bool(warmup) and not mean_frozen)
    )
    if channels_last:
        (model.mean_net if flow else model).to(memory_format=torch.channels_last)
    return TrainingRun(
        config=config,
        device=device,
        dp=dp,
        operator=operator,
        model=model,
        priors=priors,
        optimizer=optimizer,
        generator=generator,
        sampler=sampler,
        fixed_batches=fixed_batches,
        # this rank's share of the W·B crops (and flow noise) that every rank draws alike
        share=slice(dp.rank * config.batch_size, (dp.rank + 1) * config.batch_size),
        loss=loss,
        mean_loss=WPPNetLoss(weight=warmup_lam, **loss_options),
        lam=lam,
        warmup_lam=warmup_lam,
        warmup=warmup,
        use_amp=use_amp,
        channels_last=channels_last,
        budget=budget,
        normalisation=normalisation,
        preview=preview,
        validation=val,
        step=step,
        history=history,
        mean_frozen=mean_frozen,
    )
