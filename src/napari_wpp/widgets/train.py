"""The "Train" dock widget: unsupervised WPPNet (or WPPFlow) training on an LR layer, or a
PatchNR prior on the session's reference (zero-shot: on the LR layer itself, when no reference
is chosen).

The form comes from the training spec (:class:`~napari_wpp.core.config.TrainSpec`: initial
values, ranges and tooltips), the choices live in :class:`TrainSettings`, and a run is
:func:`napari_wpp.jobs.train.train_job`, the job of ``napari-wpp train``, with the session's
reference (``session.reference``, in normalised units) and forward operator
(``session.operator``). The job normalises the LR data as the CLI does and writes every
checkpoint and the final state to the "Save to" file (or a file in a temporary folder); the
final state becomes ``session.model``.

While it trains, the widget shows the step and losses, a progress bar (also in napari's
activity dock), a live loss plot and, every N steps, the network's output for a central crop
of the current LR slice as the layer ``"<LR name> preview"`` overlaying the LR layer. Stop ends
the run after the current step (the file is still written), and so does closing napari.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSpinBox, LineEdit, PushButton, SpinBox
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QGroupBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout

from napari_wpp.core import config as specs
from napari_wpp.core.config.training import DEFAULT_STEPS, TRAINABLE_MODELS
from napari_wpp.core.errors import InputError
from napari_wpp.io import check_not_an_input
from napari_wpp.jobs.calibration import CalibrationFitted
from napari_wpp.jobs.train import (
    ModelFileFailed,
    ModelFileWritten,
    TrainingStarted,
    TrainSource,
    check_resumable,
)
from napari_wpp.widgets._base import JobDockWidget, JobLaunch, LayerChoice, job_finished_alias
from napari_wpp.widgets._forms import device_choices, spec_form
from napari_wpp.widgets._layers import (
    checked_image,
    full_resolution,
    greyscale_images,
    layer_files,
    layer_with_role,
)
from napari_wpp.widgets._layout import ask_file_path, group_box, note_label, scrolled_column
from napari_wpp.widgets._notify import notify_error
from napari_wpp.widgets._settings import (
    BUDGET_UNITS,
    DEFAULT_MINUTES,
    PRIOR_WEIGHT_HINTS,
    TrainSettings,
    default_model_path,
    parse_lambda,
)
from napari_wpp.widgets._train_view import (
    MODEL_NAMES,
    LossPlot,
    model_text,
    preview_crop,
    session_text,
    show_preview,
    theme_colors,
)

if TYPE_CHECKING:
    import napari

    from napari_wpp.core.training import TrainingState

__all__ = ["TrainSettings", "TrainWidget", "default_model_path", "parse_lambda"]

#: The spec fields of the form (the prior weight is a text: λ or ρ, see :func:`parse_lambda`).
FORM_FIELDS = (
    "model",
    "mean_warmup",
    "batch_size",
    "crop_size",
    "n_reference_patches",
    "patch_distance",
    "lr_denoise",
)


class TrainWidget(JobDockWidget):
    """Dock widget: train a WPPNet (or WPPFlow) on an LR layer and watch it learn.

    Public methods (buttons, scripts, tests): :meth:`start`, :meth:`stop`, :meth:`resume`,
    :meth:`shutdown`, :meth:`save_model`, :meth:`load_model`; errors become notifications
    and the methods then return ``None``. :attr:`training_finished` is emitted at the end of
    a run with the final ``TrainingState`` (``None`` when it failed), ``preview_updated``
    with the preview layer after each update; :attr:`plot` is the :class:`LossPlot`.
    """

    preview_updated = Signal(object)
    job_title = "training"
    stopping_text = "Stopping after this step; the model file will be written…"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, TrainSettings())
        self.checkpoint_path: Path | None = None
        self.last_state: TrainingState | None = None
        self._resume: TrainingState | None = None
        scrolled_column(self, [self._training_box(), self._run_box(), self._model_box()])
        self.watch_layers(self.layer_choice.refresh)
        self.listen(self.settings.events.model, self._on_model)
        self.listen(self.settings.events.budget_unit, self._on_budget_unit)
        for name in ("reference", "operator", "model", "model_path"):
            self.listen(getattr(self.session.events, name), self._update_session_label)
        self.listen(self.session.events.model, self._update_controls)
        self._on_model(self.settings.model)
        self._update_session_label()
        self._update_controls()

    training_finished = job_finished_alias(
        "Qt signal: a run ended (its argument: the final state or ``None``)."
    )

    # ------------------------------------------------------------------ UI
    def _training_box(self) -> QGroupBox:
        self.layer_choice = LayerChoice(
            self, "lr_layer", greyscale_images, layer_with_role("lr"), label="LR layer"
        )
        self.lam_edit = self.bind("lam", LineEdit(name="lam", label="λ"))
        self.form = self.bind_form(
            spec_form(
                specs.TrainSpec,
                FORM_FIELDS,
                model={"choices": [(MODEL_NAMES[k], k) for k in TRAINABLE_MODELS]},
                mean_warmup={"label": "Mean warm-up", "step": 0.05, "special_text": "none"},
                batch_size={"special_text": "device default"},
                crop_size={"label": "Crop size (px)"},
                n_reference_patches={"special_text": "device default", "step": 1000},
                patch_distance={"choices": list(specs.PATCH_DISTANCES)},
                lr_denoise={"label": "Denoise LR input"},
            )
        )
        self.form.insert(0, self.layer_choice.combo)
        self.form.insert(2, self.lam_edit)
        self.warmup_spin = self.form.mean_warmup
        # the form's row labels (magicgui), shown and hidden with their fields
        self.lam_label = self.lam_edit._labeled_widget()._label_widget
        self.warmup_label = self.warmup_spin._labeled_widget()._label_widget
        self.budget_spin = self.bind("budget", FloatSpinBox(min=0.1, max=1e7, step=100.0))
        self.budget_spin.native.setDecimals(0)
        unit = self.bind("budget_unit", ComboBox(choices=BUDGET_UNITS))
        budget = Container(widgets=[self.budget_spin, unit], layout="horizontal", label="Budget")
        budget.margins = (0, 0, 0, 0)
        device = self.bind("device", ComboBox(label="Device", choices=device_choices()))
        preview = SpinBox(label="Preview every (steps)", min=0, max=1_000_000)
        preview.native.setSpecialValueText("never")
        self.bind("preview_every", preview)
        self.save_edit = self.bind("save_path", LineEdit())
        self.save_edit.native.setPlaceholderText("new file in the temporary folder")
        browse = PushButton(text="…")
        browse.native.setMaximumWidth(32)
        browse.changed.connect(
            lambda: self._with_path("Save the model to", True, self._set_save_path)
        )
        save = Container(widgets=[self.save_edit, browse], layout="horizontal", label="Save to")
        save.margins = (0, 0, 0, 0)
        for widget in (budget, device, preview, save):
            self.form.append(widget)
        self.session_label = note_label()
        return group_box("Training", self.form, self.session_label)

    def _run_box(self) -> QGroupBox:
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue training the session's model for the budget")
        self.resume_button.clicked.connect(self.resume)
        controls = self.job_controls("Start", self.resume_button)
        self.start_button, self.stop_button = self.run_button, self.cancel_button
        self.stop_button.setText("Stop")
        self.progress_bar.setFormat("%p%")
        self.plot = LossPlot(theme_colors(self.viewer))
        return group_box("Run", controls, self.plot)

    def _model_box(self) -> QGroupBox:
        box = QGroupBox("Model")
        column = QVBoxLayout(box)
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        column.addWidget(self.model_label)
        buttons = QHBoxLayout()
        self.save_model_button = QPushButton("Save model…")
        self.load_model_button = QPushButton("Load model…")
        buttons.addWidget(self.save_model_button)
        buttons.addWidget(self.load_model_button)
        column.addLayout(buttons)
        self.save_model_button.clicked.connect(
            lambda: self._with_path("Save model", True, self.save_model)
        )
        self.load_model_button.clicked.connect(
            lambda: self._with_path("Load model", False, self.load_model)
        )
        return box

    def _on_model(self, kind: str) -> None:
        """The prior weight is λ for a WPPNet, ρ per LR pixel for a WPPFlow (with warm-up); a
        PatchNR has none (its λ is the reconstruction's) and plots its NLL. Only a WPPNet
        denoises its LR input."""
        flow = kind == "wppflow"
        self.warmup_spin.visible = self.warmup_label.visible = flow
        self.form.lr_denoise.visible = kind == "wppnet"  # the only model that uses it
        self.lam_edit.visible = self.lam_label.visible = kind != "patchnr"
        if self.worker is None:
            self.plot.show_nll(kind == "patchnr")
        label, placeholder, name = PRIOR_WEIGHT_HINTS.get(kind, PRIOR_WEIGHT_HINTS["wppnet"])
        self.lam_edit.label = label
        self.lam_edit.native.setPlaceholderText(placeholder)
        self.lam_edit.tooltip = (
            f"{label}: a number, 'auto' or empty for the default. "
            + specs.help_text(specs.TrainSpec, name)
        )

    def _on_budget_unit(self, unit: str) -> None:
        minutes = unit == "minutes"
        self.budget_spin.native.setDecimals(1 if minutes else 0)
        self.budget_spin.step = 1.0 if minutes else 100.0
        self.settings.budget = DEFAULT_MINUTES if minutes else float(DEFAULT_STEPS)

    def _update_session_label(self, *_args: Any) -> None:
        self.session_label.setText(session_text(self.session))
        self.model_label.setText(model_text(self.session.model, self.session.model_path))

    def _update_controls(self, *_args: Any) -> None:
        super()._update_controls()
        running = self.worker is not None
        self.resume_button.setEnabled(not running and self.session.model is not None)
        self.load_model_button.setEnabled(not running)

    # ------------------------------------------------------------------ running
    def start(self) -> Any:
        """Train a new model with the current settings (the worker, or ``None``)."""
        return self._launch(None)

    def resume(self) -> Any:
        """Continue training ``session.model`` for the budget (its operator, normalisation and
        settings; the same LR layer and reference)."""
        state = self.session.model
        if state is None:
            notify_error(InputError("no model to resume: train one or load a model file first"))
            return None
        try:
            check_resumable(state, "this model")
        except InputError as exc:
            notify_error(exc)
            return None
        return self._launch(state)

    def stop(self) -> None:
        """Ask the running training to stop after its current step (the file is written)."""
        self.cancel()

    def _launch(self, resume: TrainingState | None) -> Any:
        if self.worker is not None:
            notify_error(InputError("training is already running: stop it first"))
            return None
        self._resume = resume
        worker = self.run()
        if worker is not None:
            self.checkpoint_path = self.current_run["save_path"]
            self.last_state = None
            kind = resume.kind if resume is not None else self.settings.model
            self.plot.show_nll(kind == "patchnr")
            if resume is not None:
                self.plot.extend(resume.history)
        return worker

    def prepare_run(self) -> JobLaunch:
        """Check the choices and describe the training job (``InputError``: the fix)."""
        from napari_wpp.core.operators import operator_from_dict
        from napari_wpp.jobs.train import lr_normalisation

        resume = self._resume
        layer = checked_image(self.viewer, self.settings.lr_layer, "LR layer")
        reference = self.session.reference
        kind = resume.kind if resume is not None else self.settings.model
        if kind == "patchnr":
            return self._prepare_patchnr(layer, reference, resume)
        if reference is None or not reference.regions:
            raise InputError(
                "no HR reference chosen: choose one in the Reference & operator widget"
            )
        operator = operator_from_dict(resume.operator) if resume else self.session.operator
        if operator is None:
            raise InputError(
                "no forward operator chosen: set one in the Reference & operator widget"
            )
        spec = self.settings.training_config(resume)
        lr = np.asarray(full_resolution(layer))
        lr_normalisation(lr, resume, f"LR layer {layer.name!r}")  # the job's check, early
        preview, placement = None, None
        if spec.preview_every:
            preview, placement = preview_crop(layer, lr, self.viewer)
        source = TrainSource(
            lr, [np.asarray(r, np.float32) for r in reference.regions], True, preview
        )
        what = "Resuming" if resume is not None else "Starting"
        lam_note = " (choosing λ on the reference first)" if "auto" in (spec.lam, spec.rho) else ""
        status = f"{what} {spec.model} training{lam_note}…"
        return self._job(layer, spec, source, operator, resume, status, placement)

    def _job(
        self,
        layer: Any,
        spec: Any,
        source: TrainSource,
        operator: Any,
        resume: Any,
        status: str,
        placement: Any = None,
    ) -> JobLaunch:
        """The training job of ``source`` written to the save path."""
        from napari_wpp.jobs.train import train_job

        save_path = self._save_path(layer.name, spec.model)
        return JobLaunch(
            functools.partial(train_job, resume=resume),
            (spec, source, operator, save_path),
            total=1000,
            activity=f"Training {spec.model}",
            status=status,
            context={
                "layer_name": layer.name,
                "spec": spec,
                "placement": placement,
                "save_path": save_path,
                "scale": int(operator.scale) if operator is not None else 1,
                "normalisation": None,
            },
        )

    def _prepare_patchnr(self, layer: Any, reference: Any, resume: Any) -> JobLaunch:
        """A PatchNR learns the reference's regions, or zero-shot the LR layer's patches."""
        from napari_wpp.core.operators import operator_from_dict

        spec = replace(self.settings.training_config(resume), preview_every=None)
        lr = np.asarray(full_resolution(layer))
        operator = self.session.operator
        if resume is not None:
            operator = operator_from_dict(resume.operator) if resume.operator else None
        regions = None
        if reference is not None and reference.regions:
            regions = [np.asarray(r, np.float32) for r in reference.regions]
        source = TrainSource(lr if regions is None else None, regions, True)
        mode = "zero-shot on the LR layer" if regions is None else "on the reference"
        what = "Resuming" if resume is not None else "Starting"
        return self._job(
            layer, spec, source, operator, resume, f"{what} PatchNR training ({mode})…"
        )

    def _save_path(self, layer_name: str, kind: str) -> Path:
        text = self.settings.save_path.strip()
        if not text:
            path = default_model_path(layer_name, kind)
            path.parent.mkdir(parents=True, exist_ok=True)
            return path
        path = Path(text).expanduser()
        if path.suffix.lower() != ".safetensors":
            raise InputError(f"cannot save the model as {path.name}: use a .safetensors file name")
        if not path.parent.is_dir():
            raise InputError(f"folder {path.parent} does not exist: create it or choose another")
        check_not_an_input([path], layer_files(self.viewer))
        resumed = self.session.model_path if self._resume is not None else None
        if path.exists() and not (resumed and path.resolve() == Path(resumed).resolve()):
            raise InputError(
                f"model file {path.name} exists and training would replace it: choose another "
                "save path, or resume that model (only a resumed run may write to its own file)"
            )
        return path

    # ------------------------------------------------------------------ job events
    def on_job_event(self, item: Any) -> None:
        """Show progress, previews and checkpoints; the final state becomes the session's."""
        from napari_wpp.core.training import (
            TrainingCheckpoint,
            TrainingFinished,
            TrainingPreview,
            TrainingProgress,
        )

        run = self.current_run
        if isinstance(item, TrainingStarted):
            run["normalisation"] = item.normalisation
        elif isinstance(item, TrainingProgress):
            self._show_progress(item)
        elif isinstance(item, TrainingPreview):
            layer = show_preview(self.viewer, item.image, run)
            if layer is not None:
                self.preview_updated.emit(layer)
        elif isinstance(item, TrainingCheckpoint):
            self.status_label.setText(f"Checkpoint at step {item.state.step}.")
        elif isinstance(item, ModelFileWritten):
            self.checkpoint_path = item.path
            if item.final:
                self.session.model_path = str(item.path)
        elif isinstance(item, ModelFileFailed):
            self.fail(item.error)  # training goes on
        elif isinstance(item, CalibrationFitted):
            run["calibration"] = item  # its line ends the done text
        elif isinstance(item, TrainingFinished):
            self.last_state = run["layer"] = item.state
            run["finished"] = item
            self.session.model_path = None
            self.session.model = item.state

    def _show_progress(self, event: Any) -> None:
        from napari_wpp.core.training import rate_text

        done = int(round(1000 * min(max(float(event.fraction), 0.0), 1.0)))
        self.show_progress(done, 1000, event.elapsed_s, "Training")
        if event.nll is not None:  # a PatchNR
            held = np.nan if event.heldout_nll is None else event.heldout_nll
            self.plot.add(event.step, event.nll, held)
            total = f"/{event.total_steps}" if event.total_steps else ""
            held_text = "" if event.heldout_nll is None else f" · held-out {event.heldout_nll:.4g}"
            self.status_label.setText(
                f"Step {event.step}{total} · NLL {event.nll:.4g}{held_text} · "
                f"{event.elapsed_s:.0f} s" + (" · stopping…" if self._stop.is_set() else "")
            )
            return
        self.plot.add(event.step, event.data_term, event.wpp_term)
        psnr = f" · PSNR {event.psnr:.2f} dB" if event.psnr is not None else ""
        stopping = " · stopping…" if self._stop.is_set() else ""
        phase = f" · {event.phase}" if event.phase else ""
        total = f"/{event.total_steps}" if event.total_steps else ""
        rate = f" · {rate_text(event.steps_per_s)}" if event.steps_per_s else ""
        device = f" · {event.device}" if event.device else ""
        self.status_label.setText(
            f"Step {event.step}{total}{phase}{rate}{device} · data {event.data_term:.3e} · "
            f"WPP {event.wpp_term:.3e} · {event.elapsed_s:.0f} s{psnr}{stopping}"
        )

    def done_text(self, run: dict[str, Any]) -> str:
        """``Finished after N steps → file`` (``Stopped`` when stopped early)."""
        self.plot.redraw()
        self._update_session_label()
        state = run["layer"]
        where = f" → {self.checkpoint_path}" if self.session.model_path else " (not saved)"
        how = "Stopped" if run["finished"].stopped_early else "Finished"
        held = [r["heldout_nll"] for r in state.history if r.get("heldout_nll") is not None]
        nll = f" (held-out NLL {held[-1]:.4g})" if held else ""
        fitted = run.get("calibration")
        calibrated = "" if fitted is None else f"\n{fitted.text()}"
        return f"{how} after {state.step} steps{nll}{where}{calibrated}"

    # ------------------------------------------------------------------ files
    def save_model(self, path: str | Path) -> Path | None:
        """Write ``session.model`` to ``path`` (``.safetensors``; ``None`` after a notification)."""
        from napari.utils.notifications import show_info

        from napari_wpp.io import save_model

        try:
            state = self.session.model
            if state is None:
                raise InputError("no model to save yet: train one first")
            written = save_model(Path(path).expanduser(), state)
        except Exception as exc:  # noqa: BLE001 - notification
            notify_error(exc)
            return None
        self.session.model_path = str(written)
        show_info(f"model saved to {written}")
        return written

    def load_model(self, path: str | Path) -> TrainingState | None:
        """Read a model file into ``session.model`` and plot its loss history (``None`` after a
        notification)."""
        from napari_wpp.io import load_model

        if self.worker is not None:
            notify_error(InputError("training is running: stop it before loading a model"))
            return None
        try:
            state = load_model(Path(path).expanduser(), device="cpu")
        except Exception as exc:  # noqa: BLE001 - notification
            notify_error(exc)
            return None
        self.session.model = state
        self.session.model_path = str(Path(path).expanduser())
        self.plot.show_nll(state.kind == "patchnr")
        self.plot.extend(state.history)
        self.status_label.setText(f"Loaded {Path(path).name} ({state.step} steps).")
        return state

    def _set_save_path(self, path: str) -> None:
        self.settings.save_path = path

    def _with_path(self, title: str, save: bool, use: Any) -> None:
        """Ask for a model file (to write when ``save``) and call ``use(path)`` with it."""
        path = ask_file_path(self, title, save, "Model files (*.safetensors)", "model.safetensors")
        if path:
            use(path)
