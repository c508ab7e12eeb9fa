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
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from napari_wpp.core.budget import Budget, cosine_factor
from napari_wpp.core.devices import resolve_device
from napari_wpp.core.distributed import DataParallel, current
from napari_wpp.core.errors import DivergenceError, InputError
from napari_wpp.core.metrics import psnr
from napari_wpp.core.models import build_model
from napari_wpp.core.operators import ForwardOperator, add_noise
from napari_wpp.core.patches import sample_reference_patches, strided_patches
from napari_wpp.core.semidual import WassersteinPatchPrior

#: λ · n_LR² of the paper's rule λ = 12.5 / n_LR² (mean data term, n_LR the LR crop side).
PAPER_LAMBDA_NUMERATOR = 12.5
#: Steps used when neither a step nor a time budget is given.
DEFAULT_STEPS = 500
#: The learning rate decays (cosine) from ``learning_rate`` to this fraction of it.
FINAL_LR_FRACTION = 0.1
#: λ grid of ``lam="auto"`` (mean data term, single-scale prior, as in training).
AUTO_LAMBDA_GRID = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08)
PSI_MODES = ("shared", "per_batch")
PRECISIONS = ("auto", "bf16", "off")
#: Weight of the newest mean assigned cost in the ψ solver's cost scale.
PSI_SCALE_MOMENTUM = 0.1
#: The published flow's prior weight ρ per LR crop: its loss is ``½‖f(x) − y‖² + ρ·W₂² −
#: σ²·log|det ∇T|`` with the squared error summed over the crop (REFERENCE.md §5).
PUBLISHED_RHO_PER_CROP = 100.0
#: WPPFlow: gradient norm bound (in WPPNet loss units, i.e. the flow loss times 2σ²),
#: applied after backward so that a spike of the log-determinant cannot blow up the weights.
FLOW_GRAD_CLIP = 1.0
#: WPPFlow: share of the budget that trains the mean network alone before it is frozen
#: (docs/algorithms.md, "Mean first, then the spread").
DEFAULT_MEAN_WARMUP = 0.3
TRAINABLE_MODELS = ("wppnet", "wppflow")
#: Defaults of the settings whose best value depends on the device (``TrainingConfig`` fields
#: left at ``None``). The CPU values are the measured CPU defaults; the CUDA values are the
#: published settings (batch 25, 10,000 reference patches, all generated patches, 5 ψ
#: passes), provisional until measured on a GPU (docs/benchmarks.md). Other devices (MPS) take
#: the CPU values. ``patches_per_step`` 0 means all generated patches.
DEVICE_DEFAULTS: dict[str, dict[str, int]] = {
    "cpu": {
        "batch_size": 8,
        "n_reference_patches": 5_000,
        "patches_per_step": 20_000,
        "psi_passes": 2,
    },
    "cuda": {
        "batch_size": 25,
        "n_reference_patches": 10_000,
        "patches_per_step": 0,
        "psi_passes": 5,
    },
}
#: Channels-last convolutions per device type for the network being trained: measured faster
#: on CPUs; on CUDA a switch left off until measured (bf16 autocast is on there).
CHANNELS_LAST: dict[str, bool] = {"cpu": True, "cuda": False}
#: Steps over which the progress events' steps per second are averaged.
RATE_WINDOW = 20


def rate_text(steps_per_s: float | None) -> str:
    """``"3.4 steps/s"``, ``"12.0 s/step"`` for slow steps, ``""`` when unknown."""
    if steps_per_s is None or not steps_per_s > 0.0:
        return ""
    if steps_per_s >= 1.0:
        return f"{steps_per_s:.1f} steps/s"
    return f"{1.0 / steps_per_s:.1f} s/step"


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


def paper_lambda(crop_size: int) -> float:
    """λ = 12.5 / n_LR² (the papers' rule for a mean data term; 0.02 for 25×25 crops)."""
    return PAPER_LAMBDA_NUMERATOR / float(crop_size) ** 2


def published_rho(noise_std: float, crop_size: int) -> float:
    """The published flow's weighting as our ρ per LR pixel: ``100 / (σ² · n_LR²)``.

    Dividing the published loss per crop by σ² and by the crop's ``n_LR²`` pixels gives our
    loss per LR pixel with this ρ: 1600 for σ = 0.01 and 25×25 crops.
    """
    return PUBLISHED_RHO_PER_CROP / (float(noise_std) ** 2 * float(crop_size) ** 2)


@dataclass
class TrainingConfig:
    """Parameters of a WPPNet training run (the CLI and the widgets build this).

    Parameters
    ----------
    model
        Model kind: ``"wppnet"`` (a CNN) or ``"wppflow"`` (a conditional normalizing flow,
        trained with the backward KL of REFERENCE.md §1).
    lam
        WPPNet: weight λ of the patch prior (mean data term). ``None``: the paper's rule
        :func:`paper_lambda`; ``"auto"``: chosen on the reference by :func:`choose_lambda`.
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
        cost (:data:`PSI_SCALE_MOMENTUM`), since early outputs are far from the reference.
    patches_per_step
        About this many generated patches per step and process, on a strided grid with a
        random offset (0: all of them; ``None``: the device's default).
    patch_size
        Side p of the patches.
    learning_rate
        Adam step of the network, cosine-decayed to :data:`FINAL_LR_FRACTION` of it.
    mixed_precision
        ``"auto"``: the network runs in bfloat16 autocast on CUDA and on CPUs with native
        bfloat16 (AVX512-BF16/AMX), float32 elsewhere; ``"bf16"`` or ``"off"`` to force.
        A WPPFlow uses it for its mean network during the warm-up only.
        Patches are cast to float32 before the exact c-transform, so the neighbour assignment
        of the given outputs stays exact.
    augment
        Random flips and 90° rotations of the crops, where the operator allows them
        (:func:`augmentation_is_consistent`).
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
    model_options
        Extra constructor arguments of the model (e.g. ``{"features": 32}``).
    """

    model: str = "wppnet"
    lam: float | str | None = None
    rho: float | str | None = None
    mean_warmup: float = DEFAULT_MEAN_WARMUP
    steps: int | None = None
    minutes: float | None = None
    batch_size: int | None = None
    crop_size: int = 25
    n_reference_patches: int | None = None
    psi_passes: int | None = None
    psi_mode: str = "shared"
    psi_solver: str = "adam"
    psi_lr: float | None = None
    n_fixed_batches: int = 40
    patches_per_step: int | None = None
    patch_size: int = 6
    learning_rate: float = 1e-3
    mixed_precision: str = "auto"
    augment: bool = True
    noise_std: float = 0.01
    seed: int = 0
    device: str = "auto"
    preview_every: int | None = None
    checkpoint_every: int | None = None
    checkpoint_minutes: float | None = None
    validate_every: int | None = None
    model_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-serialisable copy of the parameters."""
        return asdict(self)

    def for_device(self, device: torch.device | str) -> TrainingConfig:
        """A copy with the device-dependent settings left at ``None`` filled in."""
        kind = torch.device(device).type
        defaults = DEVICE_DEFAULTS.get(kind, DEVICE_DEFAULTS["cpu"])
        chosen = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return replace(self, **chosen)


@dataclass
class TrainingState:
    """Everything needed to use a model or to resume its training.

    ``model`` lives on the training device; tensors in the state dicts are detached copies.
    """

    kind: str
    model: torch.nn.Module
    model_config: dict
    operator: dict
    lam: float
    config: dict
    step: int
    elapsed_s: float
    normalisation: dict | None = None
    priors: list[dict[str, Tensor]] = field(default_factory=list)
    optimizer: dict | None = None
    rng: Tensor | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    mean_frozen: bool = False


def saved_config(state: TrainingState) -> TrainingConfig:
    """The configuration a resumed run goes on with (settings absent from older files
    take the value those files were trained with: no mean warm-up)."""
    config = TrainingConfig(
        **{
            "mean_warmup": 0.0,  # runs saved before the warm-up existed trained jointly
            **state.config,
            "model_options": state.config.get("model_options", {}),
        }
    )
    if config.patches_per_step is None:  # files saved before device defaults: all patches
        config.patches_per_step = 0
    return config


@dataclass
class TrainingProgress:
    """Emitted after every step (``psnr`` only on validation steps).

    ``phase`` is ``"mean warm-up"`` or ``"spread"`` for a WPPFlow with a mean warm-up
    (:attr:`TrainingConfig.mean_warmup`), ``None`` otherwise; ``logdet`` is ``None`` for a
    WPPNet and during the warm-up. ``steps_per_s`` is the rate over the last
    :data:`RATE_WINDOW` steps (``None`` at the first step of a run), ``device`` the training
    device (with ``×W`` for W data-parallel processes) and ``total_steps`` the step budget
    (``None`` with a time budget only). Losses are means over all processes.
    """

    step: int
    elapsed_s: float
    data_term: float
    wpp_term: float
    loss: float
    fraction: float
    psnr: float | None = None
    logdet: float | None = None
    phase: str | None = None
    steps_per_s: float | None = None
    device: str = ""
    total_steps: int | None = None


@dataclass
class TrainingPreview:
    """The network's output for the preview input (float32, normalised units)."""

    step: int
    elapsed_s: float
    image: np.ndarray


@dataclass
class TrainingCheckpoint:
    """A resumable snapshot, every ``checkpoint_every`` steps."""

    state: TrainingState


@dataclass
class TrainingFinished:
    """Emitted once at the end, also when stopped early."""

    state: TrainingState
    stopped_early: bool = False


TrainingEvent = TrainingProgress | TrainingPreview | TrainingCheckpoint | TrainingFinished


# --------------------------------------------------------------------------- inputs
def _as_stack(lr_data: np.ndarray) -> np.ndarray:
    lr = np.asarray(lr_data)
    if lr.ndim == 2:
        lr = lr[None]
    if lr.ndim != 3:
        raise InputError(
            f"LR data must be a 2D image or a 3D stack, got shape {lr.shape}: pass (Z, H, W)"
        )
    if not np.issubdtype(lr.dtype, np.floating):
        raise InputError(
            f"LR data dtype {lr.dtype} is not normalised float: apply a Normalisation first"
        )
    if not np.all(np.isfinite(lr)):
        raise InputError("LR data contain NaN or Inf pixels: clean or fill them first")
    return np.ascontiguousarray(lr, dtype=np.float32)


def _check_config(config: TrainingConfig) -> None:
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


def _data_margins(operator: ForwardOperator, crop: int) -> tuple[int, int]:
    """LR pixels at the start and end of a crop whose HR support leaves the crop.

    LR pixel ``i`` of a crop of ``c`` LR pixels averages HR pixels within half a kernel of
    ``offset + q·i``; it is compared in the data term only when that support lies inside the
    crop's ``q·c`` HR pixels, so the operator's padding never matters.
    """
    q = operator.scale
    half = float(getattr(operator, "kernel_size", 2 * q)) / 2.0
    offset = float(operator.sampling_offset)
    first = max(0, math.ceil((half - offset - 0.5) / q))
    last = min(crop - 1, math.floor((q * crop - 0.5 - half - offset) / q))
    return first, crop - 1 - last


def augmentation_is_consistent(operator: ForwardOperator) -> bool:
    """Whether flips and 90° rotations of LR crops match flipped/rotated HR images.

    True for a centred Gaussian operator with one σ (it commutes with the dihedral group);
    a corner-anchored or an estimated (asymmetric) kernel would be flipped along with the
    data, so crops are then used as they are.
    """
    from napari_wpp.core.operators import GaussianDownsampling

    if not isinstance(operator, GaussianDownsampling) or operator.anchor != "center":
        return False
    sigma = operator.to_dict().get("sigma")
    return not isinstance(sigma, (list, tuple)) or len(set(sigma)) == 1


class CropSampler:
    """Random LR crops from random slices of a stack, with optional flips/rotations.

    Parameters
    ----------
    stack
        ``(Z, H, W)`` float32 LR data.
    crop_size
        Crop side (clipped to the smaller slice side).
    augment
        Random flips and 90° rotations (rotations only for square crops).
    generator
        Torch generator driving every choice.
    """

    def __init__(
        self, stack: np.ndarray, crop_size: int, augment: bool, generator: torch.Generator
    ) -> None:
        self.stack = torch.from_numpy(stack)
        self.crop = int(min(crop_size, *stack.shape[1:]))
        self.augment = augment
        self.generator = generator

    def sample(self, batch_size: int) -> Tensor:
        """``(batch_size, 1, c, c)`` crops."""
        z_count, h, w = self.stack.shape
        c, g = self.crop, self.generator
        zs = torch.randint(z_count, (batch_size,), generator=g)
        ys = torch.randint(h - c + 1, (batch_size,), generator=g)
        xs = torch.randint(w - c + 1, (batch_size,), generator=g)
        crops = []
        for z, y0, x0 in zip(zs.tolist(), ys.tolist(), xs.tolist(), strict=True):
            crop = self.stack[z, y0 : y0 + c, x0 : x0 + c]
            if self.augment:
                k, flip = (int(v) for v in torch.randint(4, (2,), generator=g))
                crop = torch.rot90(crop, k, (0, 1))
                if flip % 2:
                    crop = torch.flip(crop, (1,))
            crops.append(crop)
        return torch.stack(crops)[:, None].contiguous()


# --------------------------------------------------------------------------- λ
def choose_lambda(
    reference: np.ndarray,
    operator: ForwardOperator,
    noise_std: float = 0.01,
    grid: tuple[float, ...] = AUTO_LAMBDA_GRID,
    crop: int = 128,
    iterations: int = 60,
    seed: int = 0,
    device: str = "auto",
    stop: threading.Event | None = None,
) -> tuple[float, dict[float, float]]:
    """Choose λ on the reference itself (the papers' protocol).

    A central crop of the reference is degraded with ``operator`` and noise, reconstructed by
    variational WPP (single-scale prior, mean data term: the network's loss for one image)
    for every λ of ``grid`` against patches of the rest of the reference, and the λ with the
    best PSNR is returned with all scores. Because both losses use a mean data term and the
    W₂² of a pooled patch distribution, the variational λ carries over to the network
    unchanged.
    """
    from napari_wpp.core.reconstruct import VariationalConfig, run_reconstruction

    ref = np.asarray(reference, dtype=np.float32)
    if ref.ndim == 3:
        ref = ref[ref.shape[0] // 2]
    q = operator.scale
    side = min(crop, *ref.shape) // q * q
    if side < 4 * q:
        raise InputError(f"reference {ref.shape} is too small to choose lambda: give λ explicitly")
    y0 = (ref.shape[0] - side) // 2
    x0 = (ref.shape[1] - side) // 2
    truth = ref[y0 : y0 + side, x0 : x0 + side]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lr = add_noise(operator(torch.from_numpy(truth)), noise_std, generator=generator)
    lr_np = lr.numpy().astype(np.float32)
    scores: dict[float, float] = {}
    for lam in grid:
        if stop is not None and stop.is_set():
            break
        config = VariationalConfig(
            lam=lam,
            iterations=iterations,
            levels=1,
            seed=seed,
            device=device,
            n_reference_patches=5_000,
        )
        result = run_reconstruction(lr_np, ref, operator, config)
        border = min(8, side // 8)
        inner = (slice(border, -border),) * 2
        scores[lam] = psnr(np.clip(result.image, 0, 1)[inner], truth[inner], crop=0)
    if not scores:
        raise InputError("lambda search was stopped before it scored any λ")
    best = max(scores, key=scores.__getitem__)
    return best, scores


# --------------------------------------------------------------------------- training
# what rank 0 decides before every step
_GO_ON, _BUDGET_DONE, _STOP_ASKED = 0, 1, 2


def _rate(times: deque[float]) -> float | None:
    """Steps per second over the step end times in ``times`` (the first: a start)."""
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def _data_parallel_modules(
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


def _initialise_on(model: torch.nn.Module, z: Tensor, lr: Tensor) -> None:
    """Run the flow once on a whole step's batch if a data-dependent initialisation waits.

    ActNorm layers set themselves from their first training batch; under data parallelism
    every rank runs that first batch in full, so all ranks (and one process with the whole
    batch) start from the same parameters.
    """
    from napari_wpp.core.models.flow_blocks import ActNorm

    waiting = [m for m in model.modules() if isinstance(m, ActNorm) and not bool(m.initialized)]
    if waiting:
        with torch.no_grad():
            model(z, lr)


def _snapshot(
    model: torch.nn.Module,
    kind: str,
    operator: ForwardOperator,
    lam: float,
    config: TrainingConfig,
    step: int,
    elapsed: float,
    normalisation: dict | None,
    priors: list[WassersteinPatchPrior],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    history: list[dict[str, float]],
    mean_frozen: bool = False,
) -> TrainingState:
    return TrainingState(
        kind=kind,
        model=copy.deepcopy(model).eval(),
        model_config=model.config(),  # type: ignore[operator]
        operator=operator.to_dict(),
        lam=float(lam),
        config=config.to_dict(),
        step=step,
        elapsed_s=elapsed,
        normalisation=normalisation,
        priors=[prior.state_dict() for prior in priors],
        optimizer=copy.deepcopy(optimizer.state_dict()),
        rng=generator.get_state(),
        history=list(history),
        mean_frozen=mean_frozen,
    )


def train(
    lr_data: np.ndarray,
    reference: np.ndarray | list[np.ndarray],
    operator: ForwardOperator,
    config: TrainingConfig | None = None,
    stop: threading.Event | None = None,
    resume: TrainingState | None = None,
    normalisation: dict | None = None,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    preview_input: np.ndarray | None = None,
    data_parallel: DataParallel | None = None,
) -> Iterator[TrainingEvent]:
    """Train a WPPNet on LR data without paired HR data.

    Parameters
    ----------
    lr_data
        2D LR image, 3D stack of slices or of small crops; float32 normalised units.
    reference
        HR reference in normalised units: a 2D image, a 3D volume, or a list of regions
        (their patches are pooled).
    operator
        Forward operator f of the LR data.
    config
        Parameters; defaults when ``None``. Ignored (the saved one is used) when resuming,
        except for the budget, device and event intervals.
    stop
        Set it from any thread to stop after the current step; the final event still carries
        the state.
    resume
        A state from a checkpoint or final event of an earlier run.
    normalisation
        Intensity normalisation of the data (recorded in the state).
    validation
        Optional ``(lr, hr)`` pair in normalised units; PSNR every ``validate_every`` steps.
    preview_input
        LR image for previews (default: the first slice of the data, at most 64×64).
    data_parallel
        This process's place in a data-parallel run (default: that of an initialised
        ``torch.distributed`` process group, else one process). Every rank draws the same
        ``W · batch_size`` crops (and flow noise) from the shared seed and trains on its own
        ``batch_size`` of them; the network is wrapped in ``DistributedDataParallel``, ψ
        steps use the argmin counts of all ranks, and rank 0 decides when to stop. W ranks
        thus reproduce one process with W times the batch and the patches per step. Only
        rank 0 yields previews, validation PSNRs and checkpoints; every rank yields the
        progress (all-reduced losses) and the final event.

    Yields
    ------
    TrainingProgress, TrainingPreview, TrainingCheckpoint, then one TrainingFinished.
    """
    config = config or TrainingConfig()
    if resume is not None:
        saved = saved_config(resume)
        for name in (
            "steps",
            "minutes",
            "device",
            "preview_every",
            "checkpoint_every",
            "checkpoint_minutes",
            "validate_every",
        ):
            setattr(saved, name, getattr(config, name))
        config = saved
        if operator.to_dict() != resume.operator:
            raise InputError(
                "the operator differs from the one the checkpoint was trained with: "
                "resume with the same operator"
            )
    dp = data_parallel if data_parallel is not None else current()
    device = resolve_device(config.device)
    config = config.for_device(device)
    _check_config(config)
    stack = _as_stack(lr_data)
    q = operator.scale
    p = config.patch_size
    crop = int(min(config.crop_size, *stack.shape[1:]))
    margin_start, margin_end = _data_margins(operator, crop)
    if crop * q < p or crop - margin_start - margin_end < 1:
        raise InputError(
            f"LR crops of {crop}×{crop} are too small at scale {q} (need > "
            f"{margin_start + margin_end} LR pixels for the blur and ≥ {p} HR pixels for a "
            "patch): use larger LR crops"
        )
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # initial weights

    regions = reference if isinstance(reference, list) else [reference]
    ref_patches = []
    for i, region in enumerate(regions):
        region = np.asarray(region, dtype=np.float32)
        if not np.all(np.isfinite(region)):
            raise InputError("reference contains NaN or Inf pixels: clean or fill it first")
        share = max(1, config.n_reference_patches // len(regions))
        ref_patches.append(
            sample_reference_patches(region, share, patch_size=p, seed=config.seed + i)
        )
    reference_patches = torch.cat(ref_patches).to(device)

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
        )
        return lam_net

    def wppnet_lambda() -> float:
        if config.lam == "auto":
            return chosen_lambda()
        return paper_lambda(crop) if config.lam is None else float(config.lam)

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
    model = build_model(config.model, scale=q, **model_options).to(device)
    n_priors = config.n_fixed_batches if config.psi_mode == "per_batch" else 1
    solver_options = {} if config.psi_lr is None else {"lr": config.psi_lr}
    momentum = None if config.psi_solver == "asgd" else PSI_SCALE_MOMENTUM
    reduce_sum = dp.all_reduce_sum if dp.active else None
    priors = [
        WassersteinPatchPrior(
            reference_patches,
            config.psi_solver,
            scale_momentum=momentum,
            reduce_sum=reduce_sum,
            **solver_options,
        )
        for _ in range(n_priors)
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
        fixed_gen = torch.Generator().manual_seed(config.seed + 1)
        fixed_sampler = CropSampler(stack, crop, False, fixed_gen)
        fixed_batches = [
            fixed_sampler.sample(dp.world_size * config.batch_size) for _ in range(n_priors)
        ]
    # this rank's share of the W·B crops (and flow noise) that every rank draws alike
    share = slice(dp.rank * config.batch_size, (dp.rank + 1) * config.batch_size)

    op = copy.deepcopy(operator).to(device)
    if preview_input is None:
        preview_input = stack[0, :64, :64]
    preview_t = torch.from_numpy(np.ascontiguousarray(preview_input, np.float32))[None, None]
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
    # WPPFlow phases: the mean network alone until `warmup` of the budget, then the spread.
    # Channels-last convolutions are faster on CPUs for the WPPNet being trained (the flow's
    # mean network during its warm-up); a frozen mean network returns to the default layout
    # that the flow's other blocks and inference use.
    warmup = config.mean_warmup if flow and config.mean_warmup > 0 else 0.0
    channels_last = CHANNELS_LAST.get(device.type, False) and (
        not flow or (bool(warmup) and not mean_frozen)
    )
    if channels_last:
        (model.mean_net if flow else model).to(memory_format=torch.channels_last)
    budget = Budget(config.steps, config.minutes, DEFAULT_STEPS, elapsed_before)
    now = budget.elapsed

    def snapshot() -> TrainingState:
        return _snapshot(
            model,
            config.model,
            operator,
            lam,
            config,
            step,
            now(),
            normalisation,
            priors,
            optimizer,
            generator,
            history,
            mean_frozen,
        )

    def run_model(lr: Tensor) -> Tensor:
        with torch.no_grad():
            model.eval()
            lr = lr.to(device)
            out = (model.mode_sample(lr) if flow else model(lr)).float()
            model.train()
        return out

    stopped_early = False
    last_checkpoint = time.perf_counter()
    model.train()
    if mean_frozen:
        model.mean_net.requires_grad_(False)
    trained = _data_parallel_modules(model, device, dp)
    device_text = str(device) + (f" ×{dp.world_size}" if dp.active else "")
    step_times: deque[float] = deque([time.perf_counter()], maxlen=RATE_WINDOW + 1)
    while True:
        if budget.exhausted(step):
            decision, fraction = _BUDGET_DONE, 1.0
        elif stop is not None and stop.is_set():
            decision, fraction = _STOP_ASKED, 1.0
        else:
            decision, fraction = _GO_ON, budget.fraction(step)
        if dp.active:  # rank 0's clock and stop event decide for all ranks
            decision, fraction = dp.main_decision(decision, fraction)
        if decision == _STOP_ASKED:
            stopped_early = True
        if decision != _GO_ON:
            break
        mean_phase = bool(warmup) and not mean_frozen and fraction < warmup
        if warmup and not mean_phase and not mean_frozen:
            mean_frozen = True
            model.mean_net.requires_grad_(False)
            if channels_last:
                model.mean_net.to(memory_format=torch.contiguous_format)
        if mean_phase:
            factor = cosine_factor(fraction / warmup, FINAL_LR_FRACTION)
        else:
            factor = cosine_factor((fraction - warmup) / (1.0 - warmup), FINAL_LR_FRACTION)
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * factor
        if fixed_batches:
            index = step % n_priors
            full_batch, prior = fixed_batches[index], priors[index]
        else:
            full_batch, prior = sampler.sample(dp.world_size * config.batch_size), priors[0]
        batch = (full_batch[share] if dp.active else full_batch).to(device)
        if CHANNELS_LAST.get(device.type, False):
            batch = batch.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        logdet = None
        # a WPPNet, or the flow's mean network during its warm-up, trains with the WPPNet loss
        wppnet_loss = mean_phase or not flow
        weight = warmup_lam if mean_phase else lam
        if wppnet_loss:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                hr = trained("mean" if mean_phase else "model")(batch)
        else:
            full_z = torch.randn(
                (full_batch.shape[0], 1, batch.shape[2] * q, batch.shape[3] * q),
                generator=generator,
            )
            if dp.active:
                # data-dependent initialisations (ActNorm) see the whole step's batch
                _initialise_on(model, full_z.to(device), full_batch.to(device))
            z = (full_z[share] if dp.active else full_z).to(device)
            hr, logdet = trained("model")(z, batch)
        hr = hr.float()
        lr_hat = op(hr)
        inner = (
            ...,
            slice(margin_start, crop - margin_end),
            slice(margin_start, crop - margin_end),
        )
        data_term = torch.mean((lr_hat[inner] - batch[inner]) ** 2)
        patches = strided_patches(hr, p, config.patches_per_step, generator)
        if weight > 0:
            wpp_term = prior.loss_and_ascend(patches, config.psi_passes)
        else:
            wpp_term = torch.zeros((), device=device)
        if wppnet_loss:
            loss = data_term + weight * wpp_term
            scaled = loss
        else:
            # backward KL per LR pixel: data/(2σ²) + ρ·W₂² − log|det|/n_LR
            entropy = logdet.mean() / float(batch.shape[2] * batch.shape[3])
            loss = data_term / two_sigma2 + lam * wpp_term - entropy
            scaled = loss * two_sigma2  # WPPNet units: same step sizes, same clipping bound
        logged = [data_term, wpp_term, loss] + ([logdet.mean()] if logdet is not None else [])
        logged_means = dp.all_reduce_mean(torch.stack([v.detach().double() for v in logged]))
        values = [float(v) for v in logged_means.cpu()]
        if not math.isfinite(values[2]):
            raise DivergenceError(
                f"training diverged at step {step + 1} (loss {values[2]}): lower the "
                "learning rate or λ; checkpoints written before are kept"
            )
        scaled.backward()
        if not wppnet_loss:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), FLOW_GRAD_CLIP)
            if not torch.isfinite(norm):
                raise DivergenceError(
                    f"training diverged at step {step + 1} (non-finite gradient): lower the "
                    "learning rate or ρ; checkpoints written before are kept"
                )
        optimizer.step()
        step += 1
        step_times.append(time.perf_counter())
        record = {
            "step": step,
            "elapsed_s": now(),
            "data_term": values[0],
            "wpp_term": values[1],
            "loss": values[2],
        }
        if logdet is not None:
            record["logdet"] = values[3]
        val_psnr = None
        validate = val is not None and bool(config.validate_every) and dp.is_main
        if validate and step % config.validate_every == 0:
            out = run_model(val[0])[0, 0].cpu().numpy()
            val_psnr = psnr(np.clip(out, 0, 1), val[1], crop=40 if min(out.shape) > 160 else 0)
            record["psnr"] = val_psnr
        history.append(record)
        yield TrainingProgress(
            step=step,
            elapsed_s=record["elapsed_s"],
            data_term=record["data_term"],
            wpp_term=record["wpp_term"],
            loss=record["loss"],
            fraction=budget.fraction(step),
            psnr=val_psnr,
            logdet=record.get("logdet"),
            phase=("mean warm-up" if mean_phase else "spread") if warmup else None,
            steps_per_s=_rate(step_times),
            device=device_text,
            total_steps=budget.max_steps,
        )
        if not dp.is_main:  # previews and checkpoints are rank 0's
            continue
        if config.preview_every and step % config.preview_every == 0:
            image = run_model(preview_t)[0, 0].cpu().numpy().astype(np.float32)
            yield TrainingPreview(step=step, elapsed_s=now(), image=image)
        due = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
        if config.checkpoint_minutes:
            due = due or time.perf_counter() - last_checkpoint >= 60.0 * config.checkpoint_minutes
        if due:
            last_checkpoint = time.perf_counter()
            yield TrainingCheckpoint(state=snapshot())
    yield TrainingFinished(state=snapshot(), stopped_early=stopped_early)


def run_training(
    lr_data: np.ndarray,
    reference: np.ndarray | list[np.ndarray],
    operator: ForwardOperator,
    config: TrainingConfig | None = None,
    **options: Any,
) -> TrainingFinished:
    """Run :func:`train` to the end and return its final event."""
    final = None
    for event in train(lr_data, reference, operator, config, **options):
        if isinstance(event, TrainingFinished):
            final = event
    assert final is not None
    return final
