"""The evented settings of the Train and Reference & operator dock widgets.

A widget's choices live in one evented dataclass: its magicgui widgets are bound to the fields
(see :meth:`~napari_wpp.widgets._base.JobDockWidget.bind`), scripts and tests set them, and the
fields that are spec fields default to the spec's current default.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psygnal import evented

from napari_wpp.core import config as specs
from napari_wpp.core.config import (
    CHECKPOINT_MINUTES,
    EstimateSpec,
    OperatorSpec,
    default_of,
    default_sigma,
)
from napari_wpp.core.config.training import DEFAULT_STEPS, TRAINABLE_MODELS
from napari_wpp.core.errors import InputError
from napari_wpp.widgets._base import NO_LAYER
from napari_wpp.widgets._forms import form_value, spec_default, spec_value

if TYPE_CHECKING:
    from napari_wpp.core.training import TrainingState

__all__ = [
    "BUDGET_UNITS",
    "DEFAULT_MINUTES",
    "PRIOR_WEIGHT_HINTS",
    "ReferenceOperatorSettings",
    "TrainSettings",
    "default_model_path",
    "parse_lambda",
]

#: Time budget offered when the budget unit becomes minutes.
DEFAULT_MINUTES = 10.0
#: Preview every this many steps by default (0: never).
DEFAULT_PREVIEW_EVERY = 25
#: Units of the training budget.
BUDGET_UNITS = ("steps", "minutes")
#: Placeholder and tooltip of the prior weight, per model kind.
PRIOR_WEIGHT_HINTS = {
    "wppnet": ("λ", "12.5 · gain² / crop²", "lam"),
    "wppflow": ("ρ", "published: 100 / (σ² · crop²)", "rho"),
}


def parse_lambda(text: str) -> float | str | None:
    """λ (or ρ) from the widget's text: ``""`` → ``None`` (the default rule), ``"auto"``, or a
    number ≥ 0 (anything else raises ``InputError``)."""
    value = str(text).strip().lower()
    if value in ("", "paper"):
        return None
    if value == "auto":
        return "auto"
    try:
        number = float(value)
    except ValueError:
        raise InputError(
            f"λ {text!r} is not a number: give a number ≥ 0, 'auto', or leave it empty for the "
            "default rule"
        ) from None
    if not math.isfinite(number) or number < 0:
        raise InputError(f"λ must be a finite number ≥ 0, got {text!r}")
    return number


def default_model_path(lr_name: str, kind: str, folder: str | Path | None = None) -> Path:
    """A new model file ``<folder>/<lr name>-<kind>-<time>.safetensors`` (``folder``: the
    temporary folder's ``napari-wpp``)."""
    base = Path(folder) if folder is not None else Path(tempfile.gettempdir()) / "napari-wpp"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", lr_name).strip("-.") or "model"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return base / f"{slug}-{kind}-{stamp}.safetensors"


def _spec_default(name: str) -> Any:
    """A ``default_factory``: the current spec's default of ``name`` as the form shows it."""
    return field(
        default_factory=lambda: form_value(specs.TrainSpec, name, default_of(specs.TrainSpec, name))
    )


@evented
@dataclass
class TrainSettings:
    """The Train widget's choices (the spec fields default to the training spec's).

    Parameters
    ----------
    lr_layer
        Name of the LR image layer (2D image or 3D stack).
    model, mean_warmup, batch_size, crop_size, n_reference_patches, patch_distance, lr_denoise,
    device, seed
        The :class:`~napari_wpp.core.config.TrainSpec` fields (``batch_size`` and
        ``n_reference_patches`` 0: the device's default).
    lam
        Prior weight as text: empty for the default, ``"auto"`` or a number; λ for a WPPNet,
        ρ per LR pixel for a WPPFlow.
    budget, budget_unit
        How long to train: ``budget`` steps or minutes. Resume trains this much more.
    preview_every
        Update the preview layer every this many steps (0: never).
    save_path
        Model file written at checkpoints and at the end; empty for a new temporary file.
    model_options, config_overrides
        Extra model constructor arguments and further spec fields (advanced use, tests).
    """

    lr_layer: str = NO_LAYER
    model: str = _spec_default("model")
    lam: str = ""
    mean_warmup: float = _spec_default("mean_warmup")
    budget: float = float(DEFAULT_STEPS)
    budget_unit: str = "steps"
    batch_size: int = _spec_default("batch_size")
    crop_size: int = _spec_default("crop_size")
    n_reference_patches: int = _spec_default("n_reference_patches")
    patch_distance: str = _spec_default("patch_distance")
    lr_denoise: bool = _spec_default("lr_denoise")
    device: str = _spec_default("device")
    preview_every: int = DEFAULT_PREVIEW_EVERY
    save_path: str = ""
    seed: int = _spec_default("seed")
    model_options: dict[str, Any] = field(default_factory=dict)
    config_overrides: dict[str, Any] = field(default_factory=dict)

    def training_config(self, resume: TrainingState | None = None) -> Any:
        """The :class:`~napari_wpp.core.config.TrainSpec` of these settings.

        With ``resume``, the budget counts on top of its steps (or minutes), since core
        budgets count the whole run. Raises ``InputError`` naming the fix.
        """
        from napari_wpp.core.devices import resolve_device

        spec = specs.TrainSpec
        if self.model not in TRAINABLE_MODELS:
            raise InputError(
                f"model {self.model!r} is not available: choose one of "
                f"{', '.join(TRAINABLE_MODELS)}"
            )
        lam = parse_lambda(self.lam)
        budget = float(self.budget)
        if not math.isfinite(budget) or budget <= 0:
            raise InputError(f"the budget must be > 0 {self.budget_unit}, got {self.budget:g}")
        if self.budget_unit not in BUDGET_UNITS:
            raise InputError(f"budget unit {self.budget_unit!r} is unknown: use steps or minutes")
        resolve_device(self.device)  # fail before starting on a device this machine lacks
        steps = minutes = None
        if self.budget_unit == "steps":
            steps = max(1, int(round(budget))) + (resume.step if resume is not None else 0)
        else:
            minutes = budget + (resume.elapsed_s / 60.0 if resume is not None else 0.0)
        names = [
            "model",
            "batch_size",
            "crop_size",
            "n_reference_patches",
            "patch_distance",
            "lr_denoise",
            "device",
            "seed",
        ]
        if self.model == "wppflow":
            names.append("mean_warmup")
        options = {name: spec_value(spec, name, getattr(self, name)) for name in names}
        if self.model in PRIOR_WEIGHT_HINTS:  # a PatchNR's weight is the reconstruction's
            options[PRIOR_WEIGHT_HINTS[self.model][2]] = lam
        options.update(
            {
                "steps": steps,
                "minutes": minutes,
                "preview_every": int(self.preview_every) or None,
                "checkpoint_minutes": CHECKPOINT_MINUTES,
                "model_options": dict(self.model_options),
            }
        )
        try:
            return replace(spec(**options), **self.config_overrides)
        except TypeError as exc:
            raise InputError(f"invalid training option ({exc}): check config_overrides") from None


@evented
@dataclass
class ReferenceOperatorSettings:
    """The widget's choices: layers, region and operator parameters (from the specs).

    Layer fields hold layer names; ``""`` means "none" (for Shapes: the whole image).

    Parameters
    ----------
    reference_layer, reference_shapes
        HR image layer of the reference and the Shapes layer whose rectangle cuts it.
    slice_start, slice_stop
        First and last slice (inclusive, data indices on axis 0) of a 3D reference.
    scale, sigma, kernel_size, anchor, padding
        The :class:`~napari_wpp.core.config.OperatorSpec` fields (σ follows the scale).
    pair_hr_layer, pair_lr_layer, pair_hr_shapes, pair_lr_shapes
        The registered HR/LR pair for estimation and their optional rectangles.
    check_lr_layer
        The LR data layer of the checks without ground truth (suitability, σ).
    pair_scale, pair_kernel_size
        The :class:`~napari_wpp.core.config.EstimateSpec` fields.
    """

    reference_layer: str = NO_LAYER
    reference_shapes: str = NO_LAYER
    slice_start: int = 0
    slice_stop: int = 0
    scale: int = field(default_factory=spec_default(OperatorSpec, "scale"))
    sigma: float = field(default_factory=lambda: default_sigma(default_of(OperatorSpec, "scale")))
    kernel_size: int = field(default_factory=spec_default(OperatorSpec, "kernel_size"))
    anchor: str = field(default_factory=spec_default(OperatorSpec, "anchor"))
    padding: str = field(default_factory=spec_default(OperatorSpec, "padding"))
    pair_hr_layer: str = NO_LAYER
    pair_lr_layer: str = NO_LAYER
    pair_hr_shapes: str = NO_LAYER
    pair_lr_shapes: str = NO_LAYER
    check_lr_layer: str = NO_LAYER
    pair_scale: int = field(default_factory=spec_default(EstimateSpec, "scale"))
    pair_kernel_size: int = field(default_factory=spec_default(EstimateSpec, "kernel_size"))

    def operator_spec(self) -> OperatorSpec:
        """The :class:`OperatorSpec` of the parametric fields."""
        return OperatorSpec(
            scale=int(self.scale),
            sigma=float(self.sigma),
            kernel_size=int(self.kernel_size),
            anchor=self.anchor,
            padding=self.padding,
        )

    def show_gaussian(self, operator: Any) -> None:
        """Set the parametric fields to those of a loaded ``GaussianDownsampling``."""
        self.scale = operator.scale  # sets σ to its default (in the widget), overwritten next
        self.sigma = float(operator.sigma[0])
        self.kernel_size = operator.kernel_size
        self.anchor = operator.anchor
        self.padding = operator.padding

    def estimate_spec(self) -> EstimateSpec:
        """The :class:`EstimateSpec` of the pair fields."""
        return EstimateSpec(scale=int(self.pair_scale), kernel_size=int(self.pair_kernel_size))
