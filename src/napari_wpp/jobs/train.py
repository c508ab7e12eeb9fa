"""The training job: what ``napari-wpp train`` and the Train widget both run.

Reading the inputs is the faces' business; the job owns the rest alike for both:

* **Normalisation**: the LR data use the resumed model's recorded normalisation (same dtype
  required) or their own (:meth:`~napari_wpp.core.intensity.Normalisation.from_array`); a
  reference read from a file is normalised by its own range, a reference already in
  normalised units (the Reference widget's regions) is used as it is.
* **Resume checks** (:func:`load_resume`, :func:`check_resume_budget`): only files with a
  training state of a trainable kind, a budget beyond the steps/minutes already trained.
* **Model files**: every checkpoint and the final state are written (atomically, by
  :func:`napari_wpp.io.save_model`) on rank 0; a failed write is an event
  (:class:`ModelFileFailed`), so each face decides whether training goes on.
* **Std calibration** (a WPPFlow): the right-most ``calibration_holdout`` share of the
  reference's columns stays out of the patch prior; after the last step the flow's std is
  calibrated on it (:mod:`napari_wpp.jobs.calibration`, a ``CalibrationFitted`` event before
  the final one) and stored with the final state.
* **Data parallelism** (:func:`data_parallel`): under ``torchrun`` the job joins the
  process group on the rank's device and leaves it at the end.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_wpp.core.config.training import DEFAULT_STEPS, TRAINABLE_MODELS, TrainSpec
from napari_wpp.core.errors import InputError
from napari_wpp.jobs.notices import JobWarning, reference_warning

__all__ = [
    "ModelFileFailed",
    "ModelFileWritten",
    "TrainSource",
    "TrainingStarted",
    "check_resumable",
    "check_resume_budget",
    "data_parallel",
    "load_resume",
    "lr_normalisation",
    "train_job",
]


@dataclass(frozen=True)
class TrainSource:
    """What a training run learns from.

    Attributes
    ----------
    lr
        LR image (2D) or stack (3D) in its own dtype (integer or float); ``None`` for a
        PatchNR learning from ``reference``.
    reference
        HR reference: an image, a volume or a list of regions. ``None`` (a PatchNR only):
        zero-shot, the flow learns the patches of ``lr`` itself.
    reference_normalised
        ``True``: ``reference`` is already in normalised units; ``False``: normalise it by
        its own range.
    preview
        LR image for previews, in the LR data's units (``None``: the core's default).
    lr_normalised
        ``True``: ``lr`` (and ``preview``) are already in normalised units (no normalisation
        is applied or recorded; a demo's synthetic data); ``False``: see :func:`lr_normalisation`.
    """

    lr: np.ndarray | None
    reference: Any
    reference_normalised: bool = False
    preview: np.ndarray | None = None
    lr_normalised: bool = False


@dataclass(frozen=True)
class TrainingStarted:
    """First event of a training job: the LR data's normalisation (a dict, ``None`` for data
    given in normalised units)."""

    normalisation: dict[str, Any] | None


@dataclass(frozen=True)
class ModelFileWritten:
    """A checkpoint (``final`` ``False``) or the final state was written to ``path``."""

    path: Path
    step: int
    final: bool


@dataclass(frozen=True)
class ModelFileFailed:
    """Writing the model file failed (training goes on unless the face stops it)."""

    path: Path
    error: Exception
    final: bool


def lr_normalisation(lr: np.ndarray, resume: Any = None, name: str = "LR data") -> Any:
    """The normalisation of the LR data: the resumed model's, or the data's own range.

    Raises
    ------
    InputError
        The data's dtype differs from the resumed model's, or is not a number.
    """
    from napari_wpp.core.intensity import Normalisation

    dtype = np.dtype(lr.dtype)
    if dtype.kind not in "uif":
        raise InputError(f"{name} has dtype {dtype}: use an integer or float image")
    recorded = getattr(resume, "normalisation", None)
    if recorded is None:
        return Normalisation.from_array(lr)
    norm = Normalisation.from_dict(dict(recorded))
    if np.dtype(norm.dtype) != dtype:
        raise InputError(
            f"{name} is {dtype} but the model was trained on {norm.dtype} data: resume with the "
            "same LR data"
        )
    return norm


def load_resume(path: str | Path, label: str | None = None) -> Any:
    """The training state of a model file to resume; refuses files that cannot be resumed.

    ``label`` names the file in messages (default: its name).
    """
    from napari_wpp.io import load_model, read_model_metadata

    meta = read_model_metadata(path)
    name = label or Path(path).name
    if meta.get("kind") not in TRAINABLE_MODELS:
        raise InputError(
            f"{name} is a {meta.get('kind')} model: only {' and '.join(TRAINABLE_MODELS)} runs "
            "can be resumed"
        )
    if not meta.get("training_state"):
        raise InputError(
            f"{name} holds no training state (it was saved for prediction only): start a new "
            "run instead"
        )
    state = load_model(path, device="cpu")
    check_resumable(state, name)
    return state


def check_resumable(state: Any, name: str) -> None:
    """Refuse a state without its ψ (a PatchNR has none) and optimizer state (saved for
    prediction only)."""
    if (not state.priors and state.kind != "patchnr") or state.optimizer is None:
        raise InputError(
            f"{name} holds no training state (saved for prediction only): start a new run instead"
        )


def check_resume_budget(
    spec: TrainSpec,
    state: Any,
    name: str,
    steps_label: str = "step budget",
    minutes_label: str = "time budget",
) -> None:
    """Refuse a budget the resumed run has already spent (budgets count the whole run).

    ``name`` names the model file, the labels the budgets in messages (e.g. ``--steps``).
    """
    steps = spec.steps
    if steps is None and spec.minutes is None:
        steps = DEFAULT_STEPS
    if steps is not None and state.step >= steps:
        raise InputError(
            f"{name} has already trained {state.step} steps and the budget is {steps} "
            f"(budgets count the whole run): give a larger {steps_label}"
        )
    if spec.minutes is not None and state.elapsed_s >= 60.0 * spec.minutes:
        raise InputError(
            f"{name} has already trained {state.elapsed_s / 60:.1f} minutes and the budget is "
            f"{spec.minutes:g} (budgets count the whole run): give a larger {minutes_label}"
        )


@contextlib.contextmanager
def data_parallel(device: str) -> Iterator[tuple[str, Any]]:
    """``(device, DataParallel or None)`` of this process, inside a ``torchrun`` process group.

    Without ``torchrun`` (one process): the resolved ``device`` and ``None``. Under
    ``torchrun``: the rank's device (``cuda:LOCAL_RANK`` for ``auto``/``cuda``) and its place
    in the run; the process group is left on exit.
    """
    from napari_wpp.core import distributed
    from napari_wpp.core.devices import resolve_device

    if not distributed.launched():
        yield str(resolve_device(device)), None
        return
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    rank_device = str(resolve_device(distributed.rank_device(device, local_rank, world_size)))
    group = distributed.init_from_environment(rank_device)
    try:
        yield rank_device, group
    finally:
        distributed.shutdown()


def train_job(
    spec: TrainSpec,
    source: TrainSource,
    operator: Any,
    model_path: Path | None = None,
    stop: threading.Event | None = None,
    resume: Any = None,
    group: Any = None,
    inputs: Sequence[tuple[str, Path | str | None]] = (),
) -> Iterator[Any]:
    """Train on ``source`` with ``spec`` (a generator of events).

    Yields :class:`TrainingStarted`, a :class:`~napari_wpp.jobs.notices.JobWarning` for a
    nearly featureless reference and one for a new WPPFlow without the mean warm-up, then the
    events of
    :func:`napari_wpp.core.training.train`, each checkpoint and final event followed (on rank
    0, when ``model_path`` is given) by :class:`ModelFileWritten` or :class:`ModelFileFailed`.
    Bad input raises ``InputError``. The model file's lock (:func:`napari_wpp.io.output_lock`)
    is held for the whole run, so a second run writing the same file is refused.

    Parameters
    ----------
    spec
        The run's parameters (ignored but for the budget, device and event intervals when
        resuming: the saved ones are used).
    operator
        The forward operator (the resumed run's when resuming).
    model_path
        ``.safetensors`` file written at checkpoints and at the end (``None``: none).
    resume
        A training state (:func:`load_resume`) to continue.
    group
        This process's place in a data-parallel run (:func:`data_parallel`).
    inputs
        ``(what, path)`` of the files read: ``model_path`` may not be one of them (the resumed
        model file may: continuing into it is the way to resume).
    """
    from napari_wpp.io import check_not_an_input, output_lock

    check_not_an_input([model_path], inputs)
    if group is not None and not group.is_main:
        model_path = None  # rank 0 writes the model file
    if model_path is None:
        yield from _train_events(spec, source, operator, None, stop, resume, group)
        return
    with output_lock(model_path):
        yield from _train_events(spec, source, operator, model_path, stop, resume, group)


def _train_events(
    spec: TrainSpec,
    source: TrainSource,
    operator: Any,
    model_path: Path | None,
    stop: threading.Event | None,
    resume: Any,
    group: Any,
) -> Iterator[Any]:
    """The events of :func:`train_job` (its checks and lock done)."""
    from napari_wpp.core.training import TrainingCheckpoint, TrainingFinished
    from napari_wpp.io import save_model

    if (resume.kind if resume is not None else spec.model) == "patchnr":
        events = _patchnr_events(spec, source, operator, stop, resume)
    else:
        events = _network_events(spec, source, operator, stop, resume, group)
    for event in events:
        yield event
        if model_path is None or not isinstance(event, (TrainingCheckpoint, TrainingFinished)):
            continue
        final = isinstance(event, TrainingFinished)
        try:
            written = save_model(model_path, event.state)
        except Exception as exc:  # noqa: BLE001 - an event: each face decides what follows
            yield ModelFileFailed(model_path, exc, final)
        else:
            yield ModelFileWritten(Path(written), int(event.state.step), final)


def _patchnr_events(
    spec: TrainSpec, source: TrainSource, operator: Any, stop: Any, resume: Any
) -> Iterator[Any]:
    """A PatchNR learns the reference's patches, or the LR data's own (zero-shot).

    Integer images are dequantised by one quantisation step (in normalised units).
    """
    from napari_wpp.core.training import train_patchnr

    zero_shot = source.reference is None
    images = source.lr if zero_shot else source.reference
    normalised = source.lr_normalised if zero_shot else source.reference_normalised
    recorded, step = None, 0.0
    if isinstance(images, list):
        images = images if normalised else _self_normalised(images)
    elif normalised:
        images = np.asarray(images, dtype=np.float32)
    else:
        data = np.asarray(images)
        norm = lr_normalisation(data, None, "LR data" if zero_shot else "reference")
        images = np.asarray(norm.apply(data), dtype=np.float32)
        recorded = norm.to_dict()
        if data.dtype.kind in "ui":
            step = 1.0 / (float(norm.high) - float(norm.low))
    yield TrainingStarted(recorded)
    warning = reference_warning(images, int(spec.patch_size))
    if warning is not None:
        yield warning
    yield from train_patchnr(
        images,
        operator,
        spec,
        stop=stop,
        resume=resume,
        normalisation=recorded,
        dequantise=step,
    )


#: Shown when a WPPFlow trains its mean and its spread together from the first step.
JOINT_FLOW_WARNING = (
    "a wppflow trained without the mean warm-up (--mean-warmup 0) can collapse: in a 5-minute "
    "probe on SiC ×4 one of two seeds ended at 16 dB (docs/algorithms.md, 'The sliced patch "
    "distance'); keep the default warm-up unless you are comparing"
)


def _network_events(
    spec: TrainSpec,
    source: TrainSource,
    operator: Any,
    stop: Any,
    resume: Any,
    group: Any,
) -> Iterator[Any]:
    """A WPPNet or a WPPFlow learns from the LR data with the reference's WPP."""
    from napari_wpp.core.training import train

    if source.reference is None:
        raise InputError(
            f"a {spec.model} needs an HR reference: give one (training without a reference is "
            "zero-shot PatchNR, --model patchnr)"
        )
    lr, preview, recorded = source.lr, source.preview, None
    if not source.lr_normalised:
        norm = lr_normalisation(np.asarray(lr), resume)
        lr = np.asarray(norm.apply(lr), dtype=np.float32)
        if preview is not None:
            preview = np.asarray(norm.apply(preview), dtype=np.float32)
        recorded = norm.to_dict()
    reference = source.reference
    if not source.reference_normalised:
        reference = _self_normalised(reference)
    yield TrainingStarted(recorded)
    if group is None or group.is_main:
        warning = reference_warning(reference, int(getattr(spec, "patch_size", 6)))
        if warning is not None:
            yield warning
        if resume is None and spec.model == "wppflow" and spec.mean_warmup == 0:
            yield JobWarning(JOINT_FLOW_WARNING)
    strips: list[np.ndarray] = []
    if (resume.kind if resume is not None else spec.model) == "wppflow":
        from napari_wpp.core.calibration import heldout_min_size, split_heldout

        saved = resume.config if resume is not None else spec.to_dict()
        share = float(saved.get("calibration_holdout", 0))
        min_size = heldout_min_size(operator.scale)
        reference, strips = split_heldout(reference, share, min_size)
        if share > 0 and not strips and (group is None or group.is_main):
            yield JobWarning(
                f"the reference is too small to hold out {share:.0%} of its columns for the std "
                f"calibration (at least {min_size} pixels each way): the std stays uncalibrated"
            )
    events = train(
        lr,
        reference,
        operator,
        spec,
        stop=stop,
        resume=resume,
        normalisation=recorded,
        preview_input=preview,
        data_parallel=group,
    )
    if not strips or (group is not None and not group.is_main):
        yield from events
        return
    from napari_wpp.jobs.calibration import calibrated_training

    noise = float(saved.get("noise_std", spec.noise_std))
    seed = int(saved.get("seed", spec.seed))
    yield from calibrated_training(events, strips, operator, noise, seed, spec.device, stop)


def _self_normalised(reference: Any) -> Any:
    """A reference (or each region) normalised by its own range, as float32."""
    from napari_wpp.core.intensity import Normalisation

    if isinstance(reference, list):
        return [_self_normalised(region) for region in reference]
    data = np.asarray(reference)
    return np.asarray(Normalisation.from_array(data).apply(data), dtype=np.float32)
