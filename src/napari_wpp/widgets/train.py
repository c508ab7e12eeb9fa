"""The "Train" dock widget: unsupervised WPPNet (or WPPFlow) training on an LR layer.

The widget keeps its choices in :class:`TrainSettings` (an evented dataclass), turns them into
the :class:`~napari_wpp.core.training.TrainingConfig` the CLI builds and drives
:func:`napari_wpp.core.training.train` in a napari thread worker, with the session's reference
(``session.reference``) and forward operator (``session.operator``). The LR data are
normalised as ``napari-wpp train`` does (dtype range for integers, percentiles for floats, the
model's own normalisation when resuming).

While it trains, the widget shows the step and losses, a progress bar (also in napari's
activity dock), a live loss plot and, every N steps, the network's output for a central crop
of the current LR slice as the layer ``"<LR name> preview"`` overlaying the LR layer. Every
checkpoint and the final state are written with :func:`napari_wpp.io.save_model` (the CLI's
model format) to the "Save to" file, or to a file in a temporary folder; the final state
becomes ``session.model``. Stop ends the run after the current step (the file is still
written), and so does closing napari.
"""

from __future__ import annotations

import math
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from psygnal import evented
from qtpy.QtCore import QSignalBlocker, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from napari_wpp.core.errors import InputError
from napari_wpp.widgets._form import choice_combo, form_layout, note_label, scrolled_column
from napari_wpp.widgets._layers import (
    PROVENANCE_KEY,
    add_or_update_image,
    current_index,
    full_resolution,
    layer_role,
    offset_translate,
    superresolved_geometry,
)
from napari_wpp.widgets._notify import notify_error
from napari_wpp.widgets._session import WPPSession, session_for
from napari_wpp.widgets._workers import (
    ActivityProgress,
    JobOwner,
    StoppableWorker,
    WorkerFailure,
    start_job,
)

if TYPE_CHECKING:
    import napari

    from napari_wpp.core.operators import ForwardOperator
    from napari_wpp.core.training import TrainingConfig, TrainingState

__all__ = [
    "ModelFileWritten",
    "TrainSettings",
    "TrainWidget",
    "TrainingStarted",
    "default_model_path",
    "parse_lambda",
    "training_job",
]

#: Defaults shared with ``napari-wpp train``.
DEFAULT_STEPS = 500
DEFAULT_MINUTES = 10.0
DEFAULT_BATCH_SIZE = 8
DEFAULT_CROP_SIZE = 25
DEFAULT_REFERENCE_PATCHES = 5_000
DEFAULT_PREVIEW_EVERY = 25
#: WPPFlow's mean warm-up share (``core.training.DEFAULT_MEAN_WARMUP``, checked by a test).
DEFAULT_MEAN_WARMUP = 0.3
#: Minutes between two checkpoint files during a run (as ``napari-wpp train``).
CHECKPOINT_MINUTES = 5.0
#: Largest side (LR pixels) of the preview crop.
PREVIEW_SIDE = 128
#: Seconds between two redraws of the loss plot.
PLOT_INTERVAL_S = 0.25
BUDGET_UNITS = ("steps", "minutes")
MODEL_NAMES = {"wppnet": "WPPNet", "wppflow": "WPPFlow (uncertainty)"}
_NONE = ""


# --------------------------------------------------------------------------- settings
def parse_lambda(text: str) -> float | str | None:
    """λ from the widget's text: ``""`` → ``None`` (paper rule), ``"auto"``, or a number ≥ 0.

    Raises
    ------
    InputError
        Anything else.
    """
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
            "paper rule"
        ) from None
    if not math.isfinite(number) or number < 0:
        raise InputError(f"λ must be a finite number ≥ 0, got {text!r}")
    return number


def default_model_path(lr_name: str, kind: str, folder: str | Path | None = None) -> Path:
    """A new model file name ``<folder>/<lr name>-<kind>-<time>.safetensors``.

    ``folder`` defaults to ``napari-wpp`` in the system's temporary folder.
    """
    base = Path(folder) if folder is not None else Path(tempfile.gettempdir()) / "napari-wpp"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", lr_name).strip("-.") or "model"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return base / f"{slug}-{kind}-{stamp}.safetensors"


@evented
@dataclass
class TrainSettings:
    """The Train widget's choices (what a run is started with).

    Parameters
    ----------
    lr_layer
        Name of the LR image layer (2D image or 3D stack).
    model
        Model kind, one of :data:`napari_wpp.core.models.MODEL_KINDS`.
    lam
        Prior weight as text: empty for the default, ``"auto"``, or a number. For a WPPNet it
        is λ (default: the paper rule), for a WPPFlow ρ per LR pixel (default: the published
        weighting 100 / (σ² · crop²), 1600 for σ = 0.01 and 25-pixel crops).
    mean_warmup
        WPPFlow: share of the budget that trains the mean network alone before the spread
        (``napari-wpp train --mean-warmup``); ignored for a WPPNet.
    budget, budget_unit
        How long to train: ``budget`` steps or minutes. Resume trains this much more.
    batch_size, crop_size, n_reference_patches
        As ``napari-wpp train --batch-size/--crop-size/--reference-patches``.
    device
        ``"auto"``, ``"cpu"``, ``"cuda:i"`` or ``"mps"``.
    preview_every
        Update the preview layer every this many steps (0: never).
    save_path
        Model file written at checkpoints and at the end; empty for a new file in the
        temporary folder.
    seed
        Seed of every random choice.
    model_options
        Extra model constructor arguments (e.g. ``{"features": 8, "blocks": 2}`` for tiny
        test models).
    config_overrides
        Further :class:`~napari_wpp.core.training.TrainingConfig` fields (advanced use).
    """

    lr_layer: str = _NONE
    model: str = "wppnet"
    lam: str = ""
    mean_warmup: float = DEFAULT_MEAN_WARMUP
    budget: float = float(DEFAULT_STEPS)
    budget_unit: str = "steps"
    batch_size: int = DEFAULT_BATCH_SIZE
    crop_size: int = DEFAULT_CROP_SIZE
    n_reference_patches: int = DEFAULT_REFERENCE_PATCHES
    device: str = "auto"
    preview_every: int = DEFAULT_PREVIEW_EVERY
    save_path: str = ""
    seed: int = 0
    model_options: dict[str, Any] = field(default_factory=dict)
    config_overrides: dict[str, Any] = field(default_factory=dict)

    def training_config(self, resume: TrainingState | None = None) -> TrainingConfig:
        """The :class:`~napari_wpp.core.training.TrainingConfig` of these settings.

        Parameters
        ----------
        resume
            The state a run resumes from: the budget is then counted on top of its steps
            (or minutes), since core budgets count the whole run.

        Raises
        ------
        InputError
            Invalid λ, budget or unknown model kind (the message names the fix).
        """
        from napari_wpp.core.devices import resolve_device
        from napari_wpp.core.models import MODEL_KINDS
        from napari_wpp.core.training import TrainingConfig

        if self.model not in MODEL_KINDS:
            raise InputError(
                f"model {self.model!r} is not available: choose one of {', '.join(MODEL_KINDS)}"
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
        options: dict[str, Any] = {
            "model": self.model,
            ("rho" if self.model == "wppflow" else "lam"): lam,
            "steps": steps,
            "minutes": minutes,
            "batch_size": int(self.batch_size),
            "crop_size": int(self.crop_size),
            "n_reference_patches": int(self.n_reference_patches),
            "seed": int(self.seed),
            "device": self.device,
            "preview_every": int(self.preview_every) or None,
            "checkpoint_minutes": CHECKPOINT_MINUTES,
            "model_options": dict(self.model_options),
        }
        if self.model == "wppflow":
            options["mean_warmup"] = float(self.mean_warmup)
        options.update(self.config_overrides)
        try:
            return TrainingConfig(**options)
        except TypeError as exc:
            raise InputError(f"invalid training option ({exc}): check config_overrides") from None


# --------------------------------------------------------------------------- worker job
@dataclass(frozen=True)
class TrainingStarted:
    """First item of a training job: the normalisation of the LR data (a dict)."""

    normalisation: dict[str, Any]


@dataclass(frozen=True)
class ModelFileWritten:
    """A checkpoint or the final state was written to ``path``."""

    path: Path
    step: int
    final: bool


def training_job(
    lr: np.ndarray,
    regions: list[np.ndarray],
    operator: ForwardOperator,
    config: TrainingConfig,
    stop: threading.Event,
    resume: TrainingState | None = None,
    recorded_normalisation: dict[str, Any] | None = None,
    preview: np.ndarray | None = None,
    save_path: Path | None = None,
) -> Iterator[Any]:
    """Worker body: normalise like the CLI, train, write checkpoints and the final state.

    Yields :class:`TrainingStarted`, then the events of
    :func:`~napari_wpp.core.training.train`, each checkpoint and final event followed by a
    :class:`ModelFileWritten` (or a :class:`~napari_wpp.widgets._workers.WorkerFailure` when
    the file could not be written; training goes on).
    """
    from napari_wpp.core.intensity import Normalisation
    from napari_wpp.core.training import TrainingCheckpoint, TrainingFinished, train
    from napari_wpp.io import save_model

    if recorded_normalisation is not None:
        norm = Normalisation.from_dict(recorded_normalisation)
    else:
        norm = Normalisation.from_array(lr)
    lr_n = np.asarray(norm.apply(lr), dtype=np.float32)
    preview_n = None if preview is None else np.asarray(norm.apply(preview), dtype=np.float32)
    yield TrainingStarted(norm.to_dict())
    for event in train(
        lr_n,
        regions,
        operator,
        config,
        stop=stop,
        resume=resume,
        normalisation=norm.to_dict(),
        preview_input=preview_n,
    ):
        yield event
        if save_path is not None and isinstance(event, (TrainingCheckpoint, TrainingFinished)):
            try:
                written = save_model(save_path, event.state)
            except Exception as exc:  # noqa: BLE001 - shown as a notification, training goes on
                yield WorkerFailure(exc)
            else:
                yield ModelFileWritten(
                    Path(written), int(event.state.step), isinstance(event, TrainingFinished)
                )


# --------------------------------------------------------------------------- loss plot
class LossPlot(QWidget):
    """Live plot of the data term and the WPP term per step (log y), matplotlib Qt canvas."""

    def __init__(self, theme: dict[str, str] | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        colors = {"background": "#23242b", "foreground": "#2e333e", "text": "#f0f1f2"}
        colors.update(theme or {})
        self.steps: list[int] = []
        self.data_terms: list[float] = []
        self.wpp_terms: list[float] = []
        self.figure = Figure(figsize=(3.6, 2.6), dpi=100, facecolor=colors["background"])
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.axes = self.figure.add_subplot(1, 1, 1)
        ax = self.axes
        ax.set_facecolor(colors["foreground"])
        for spine in ax.spines.values():
            spine.set_color(colors["text"])
        ax.tick_params(colors=colors["text"], labelsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("step", color=colors["text"], fontsize=9)
        ax.set_ylabel("loss", color=colors["text"], fontsize=9)
        ax.grid(True, which="major", alpha=0.25)
        (self.data_line,) = ax.plot([], [], color="#4fc3f7", lw=1.4, label="data term")
        (self.wpp_line,) = ax.plot([], [], color="#ffb74d", lw=1.4, label="WPP term")
        legend = ax.legend(
            loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False
        )
        for text in legend.get_texts():
            text.set_color(colors["text"])
        self.figure.subplots_adjust(left=0.2, right=0.96, top=0.88, bottom=0.19)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self._dirty = False
        self._last_draw = 0.0
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.redraw)

    def clear(self) -> None:
        """Forget every point."""
        self.steps.clear()
        self.data_terms.clear()
        self.wpp_terms.clear()
        self.redraw()

    def add(self, step: int, data_term: float, wpp_term: float) -> None:
        """Append one step (redrawn at most every :data:`PLOT_INTERVAL_S`)."""
        self.steps.append(int(step))
        self.data_terms.append(float(data_term))
        self.wpp_terms.append(float(wpp_term))
        self._schedule()

    def extend(self, records: Sequence[dict[str, Any]]) -> None:
        """Append history records (``step``, ``data_term``, ``wpp_term``) and redraw."""
        for record in records:
            if "step" in record and "data_term" in record:
                self.steps.append(int(record["step"]))
                self.data_terms.append(float(record["data_term"]))
                self.wpp_terms.append(float(record.get("wpp_term", np.nan)))
        self.redraw()

    def _schedule(self) -> None:
        wait = PLOT_INTERVAL_S - (time.perf_counter() - self._last_draw)
        if wait <= 0:
            self.redraw()
        elif not self._timer.isActive():
            self._timer.start(int(wait * 1000) + 1)

    def redraw(self) -> None:
        """Redraw the lines now."""
        self._timer.stop()
        self._last_draw = time.perf_counter()
        steps = np.asarray(self.steps, dtype=np.float64)
        for line, values in ((self.data_line, self.data_terms), (self.wpp_line, self.wpp_terms)):
            y = np.asarray(values, dtype=np.float64)
            y = np.where(y > 0, y, np.nan)  # log axis: hide zeros and negative estimates
            line.set_data(steps, y)
        ax = self.axes
        positive = [v for v in (*self.data_terms, *self.wpp_terms) if v > 0 and math.isfinite(v)]
        if len(steps):
            right = float(steps.max())
            left = float(steps.min())
            ax.set_xlim(left, right if right > left else left + 1)
        if positive:
            low, high = min(positive), max(positive)
            if high <= low * 1.01:
                low, high = low / 2, high * 2
            ax.set_ylim(low / 1.5, high * 1.5)
        self.canvas.draw_idle()


# --------------------------------------------------------------------------- widget
class TrainWidget(JobOwner, QWidget):
    """Dock widget: train a WPPNet (or WPPFlow) on an LR layer and watch it learn.

    Public methods (used by the buttons and by scripts/tests): :meth:`start`, :meth:`stop`,
    :meth:`resume`, :meth:`shutdown`, :meth:`save_model`, :meth:`load_model`. Errors become
    napari notifications; the methods then return ``None``.

    Attributes
    ----------
    settings
        The widget's :class:`TrainSettings`.
    session
        The viewer's shared :class:`~napari_wpp.widgets._session.WPPSession`.
    worker
        The running training worker, or ``None``.
    checkpoint_path
        The model file of the current (or last) run.
    plot
        The :class:`LossPlot`.
    training_finished
        Qt signal emitted at the end of a run with the final ``TrainingState`` (``None``
        when the run failed).
    preview_updated
        Qt signal emitted with the preview layer after each update.
    """

    training_finished = Signal(object)
    preview_updated = Signal(object)
    stopping_text = "Stopping after this step; the model file will be written…"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        # napari gives plugins a PublicOnlyProxy: key the session on the viewer itself
        self.session: WPPSession = session_for(getattr(napari_viewer, "__wrapped__", napari_viewer))
        self.settings = TrainSettings()
        self.worker: StoppableWorker | None = None
        self.checkpoint_path: Path | None = None
        self.last_state: TrainingState | None = None
        self._stop = threading.Event()
        self._run: dict[str, Any] = {}
        self._progress: ActivityProgress | None = None
        self._build_ui()
        self._bind_settings()
        self._connect_viewer()
        self._refresh_layers()
        self._update_session_label()
        self._update_controls()
        # closing the dock (or napari) deletes this widget: let a running job end cleanly
        self.destroyed.connect(lambda *_args, stop=self._stop: stop.set())

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        scrolled_column(
            self,
            [
                self._build_inputs_box(),
                self._build_run_box(),
                self._build_model_box(),
            ],
        )

    _form = staticmethod(form_layout)

    _combo = staticmethod(choice_combo)

    def _build_inputs_box(self) -> QGroupBox:
        from napari_wpp.core.devices import available_devices
        from napari_wpp.core.models import MODEL_KINDS

        box = QGroupBox("Training")
        form = self._form(box)
        self.lr_combo = self._combo()
        form.addRow("LR layer", self.lr_combo)
        self.model_combo = self._combo()
        for kind in MODEL_KINDS:
            self.model_combo.addItem(MODEL_NAMES.get(kind, kind), kind)
        form.addRow("Model", self.model_combo)
        self.lam_edit = QLineEdit()
        self.lam_label = QLabel("λ")
        form.addRow(self.lam_label, self.lam_edit)
        self.warmup_spin = QDoubleSpinBox()
        self.warmup_spin.setRange(0.0, 0.9)
        self.warmup_spin.setSingleStep(0.05)
        self.warmup_spin.setDecimals(2)
        self.warmup_spin.setSpecialValueText("none")
        self.warmup_spin.setToolTip(
            "Share of the budget that trains the flow's mean network alone (as a WPPNet) "
            "before it is frozen and the flow learns the spread around it"
        )
        self.warmup_label = QLabel("Mean warm-up")
        form.addRow(self.warmup_label, self.warmup_spin)
        budget_row = QHBoxLayout()
        self.budget_spin = QDoubleSpinBox()
        self.budget_spin.setRange(0.1, 1e7)
        self.budget_spin.setDecimals(0)
        self.budget_unit_combo = QComboBox()
        for unit in BUDGET_UNITS:
            self.budget_unit_combo.addItem(unit, unit)
        budget_row.addWidget(self.budget_spin, 1)
        budget_row.addWidget(self.budget_unit_combo)
        form.addRow("Budget", budget_row)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 4096)
        self.batch_spin.setToolTip("LR crops per step")
        self.crop_spin = QSpinBox()
        self.crop_spin.setRange(4, 4096)
        self.crop_spin.setSuffix(" px")
        self.crop_spin.setToolTip("Side of the LR crops")
        self.patches_spin = QSpinBox()
        self.patches_spin.setRange(10, 10_000_000)
        self.patches_spin.setSingleStep(1000)
        self.patches_spin.setToolTip("Reference patches the generated patches are matched to")
        form.addRow("Batch size", self.batch_spin)
        form.addRow("Crop size", self.crop_spin)
        form.addRow("Reference patches", self.patches_spin)
        self.device_combo = self._combo()
        self.device_combo.addItem("auto", "auto")
        for name in available_devices():
            self.device_combo.addItem(name, name)
        form.addRow("Device", self.device_combo)
        self.preview_spin = QSpinBox()
        self.preview_spin.setRange(0, 1_000_000)
        self.preview_spin.setSpecialValueText("never")
        self.preview_spin.setPrefix("every ")
        self.preview_spin.setSuffix(" steps")
        form.addRow("Preview", self.preview_spin)
        save_row = QHBoxLayout()
        self.save_edit = QLineEdit()
        self.save_edit.setPlaceholderText("new file in the temporary folder")
        self.save_edit.setToolTip("Model file written at checkpoints and at the end")
        self.save_browse = QToolButton()
        self.save_browse.setText("…")
        self.save_browse.clicked.connect(self._choose_save_path)
        save_row.addWidget(self.save_edit, 1)
        save_row.addWidget(self.save_browse)
        form.addRow("Save to", save_row)
        self.session_label = note_label()
        form.addRow(self.session_label)
        return box

    def _build_run_box(self) -> QGroupBox:
        box = QGroupBox("Run")
        column = QVBoxLayout(box)
        buttons = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.stop_button = QPushButton("Stop")
        self.resume_button = QPushButton("Resume")
        self.start_button.setToolTip("Train a new model")
        self.stop_button.setToolTip("Stop after the current step (the model file is written)")
        self.resume_button.setToolTip("Continue training the session's model for the budget")
        for button in (self.start_button, self.stop_button, self.resume_button):
            buttons.addWidget(button)
        column.addLayout(buttons)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setValue(0)
        self.progress_bar.setTextVisible(True)
        self.progress_bar.setFormat("%p%")
        column.addWidget(self.progress_bar)
        self.status_label = QLabel("Not started.")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        column.addWidget(self.status_label)
        self.plot = LossPlot(self._theme_colors())
        column.addWidget(self.plot)
        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.resume_button.clicked.connect(self.resume)
        return box

    def _build_model_box(self) -> QGroupBox:
        box = QGroupBox("Model")
        column = QVBoxLayout(box)
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        self.model_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        column.addWidget(self.model_label)
        buttons = QHBoxLayout()
        self.save_model_button = QPushButton("Save model…")
        self.load_model_button = QPushButton("Load model…")
        buttons.addWidget(self.save_model_button)
        buttons.addWidget(self.load_model_button)
        column.addLayout(buttons)
        self.save_model_button.clicked.connect(self._save_dialog)
        self.load_model_button.clicked.connect(self._load_dialog)
        return box

    def _theme_colors(self) -> dict[str, str]:
        try:
            from napari.utils.theme import get_theme

            theme = get_theme(self.viewer.theme)
            return {
                name: getattr(theme, name).as_hex()
                for name in ("background", "foreground", "text")
            }
        except Exception:  # noqa: BLE001 - cosmetic: fall back to the dark theme's colours
            return {}

    # ------------------------------------------------------------------ settings binding
    def _bind_settings(self) -> None:
        s = self.settings
        self._bind_combo(self.lr_combo, "lr_layer")
        self._bind_combo(self.model_combo, "model")
        self._bind_combo(self.budget_unit_combo, "budget_unit")
        self._bind_combo(self.device_combo, "device")
        self._bind_spin(self.budget_spin, "budget")
        self._bind_spin(self.warmup_spin, "mean_warmup")
        self._bind_spin(self.batch_spin, "batch_size")
        self._bind_spin(self.crop_spin, "crop_size")
        self._bind_spin(self.patches_spin, "n_reference_patches")
        self._bind_spin(self.preview_spin, "preview_every")
        self._bind_text(self.lam_edit, "lam")
        self._bind_text(self.save_edit, "save_path")
        s.events.budget_unit.connect(self._on_budget_unit)
        self._on_budget_unit(s.budget_unit, reset=False)
        s.events.model.connect(self._on_model)
        self._on_model(s.model)
        self.session.events.reference.connect(self._update_session_label)
        self.session.events.operator.connect(self._update_session_label)
        self.session.events.model.connect(self._update_session_label)
        self.session.events.model_path.connect(self._update_session_label)
        self.session.events.model.connect(self._update_controls)

    def _on_model(self, kind: str) -> None:
        """The prior weight is λ for a WPPNet and ρ (per LR pixel) for a WPPFlow."""
        self.warmup_label.setVisible(kind == "wppflow")
        self.warmup_spin.setVisible(kind == "wppflow")
        if kind == "wppflow":
            self.lam_label.setText("ρ")
            self.lam_edit.setPlaceholderText("published: 100 / (σ² · crop²)")
            self.lam_edit.setToolTip(
                "Weight ρ of the patch prior in the flow's loss per LR pixel: a number, "
                "'auto' (the λ chosen on the reference divided by 2σ²), or empty for the "
                "published weighting, 100 per LR crop: 100 / (σ² · crop²) per LR pixel, 1600 "
                "for σ = 0.01 and 25-pixel crops"
            )
        else:
            self.lam_label.setText("λ")
            self.lam_edit.setPlaceholderText("paper rule 12.5 / crop²")
            self.lam_edit.setToolTip(
                "Weight λ of the patch prior: a number, 'auto' (chosen on the reference), or "
                "empty for the papers' rule 12.5 / crop size²"
            )

    def _bind_combo(self, combo: QComboBox, name: str) -> None:
        def to_settings(_index: int) -> None:
            value = combo.currentData()
            if value is not None:
                setattr(self.settings, name, value)

        def to_widget(value: Any) -> None:
            index = combo.findData(value)
            if index >= 0 and index != combo.currentIndex():
                with QSignalBlocker(combo):
                    combo.setCurrentIndex(index)

        combo.currentIndexChanged.connect(to_settings)
        getattr(self.settings.events, name).connect(to_widget)
        to_widget(getattr(self.settings, name))

    def _bind_spin(self, spin: QSpinBox | QDoubleSpinBox, name: str) -> None:
        def to_widget(value: Any) -> None:
            with QSignalBlocker(spin):
                spin.setValue(value)

        spin.valueChanged.connect(lambda value: setattr(self.settings, name, value))
        getattr(self.settings.events, name).connect(to_widget)
        to_widget(getattr(self.settings, name))

    def _bind_text(self, edit: QLineEdit, name: str) -> None:
        def to_widget(value: Any) -> None:
            if edit.text() != str(value):
                with QSignalBlocker(edit):
                    edit.setText(str(value))

        edit.textChanged.connect(lambda text: setattr(self.settings, name, text))
        getattr(self.settings.events, name).connect(to_widget)
        to_widget(getattr(self.settings, name))

    def _on_budget_unit(self, unit: str, reset: bool = True) -> None:
        minutes = unit == "minutes"
        with QSignalBlocker(self.budget_spin):
            self.budget_spin.setDecimals(1 if minutes else 0)
            self.budget_spin.setSingleStep(1.0 if minutes else 100.0)
        if reset:
            self.settings.budget = DEFAULT_MINUTES if minutes else float(DEFAULT_STEPS)
        with QSignalBlocker(self.budget_spin):
            self.budget_spin.setValue(self.settings.budget)

    # ------------------------------------------------------------------ layers
    def _connect_viewer(self) -> None:
        events = self.viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved, events.reordered):
            emitter.connect(self._on_layers_changed)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._refresh_layers)

    def _on_layers_changed(self, event: Any = None) -> None:
        if getattr(event, "type", None) == "inserted":
            event.value.events.name.connect(self._refresh_layers)
        self._refresh_layers()

    def _lr_candidates(self) -> list[Any]:
        from napari.layers import Image

        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Image)
            and not layer.rgb
            and len(full_resolution(layer).shape) in (2, 3)
            and layer_role(layer) not in ("preview", "superresolved", "kernel")
        ]

    def _refresh_layers(self, *_args: Any) -> None:
        layers = self._lr_candidates()
        names = [layer.name for layer in layers]
        current = self.settings.lr_layer
        by_role = {layer_role(layer): layer.name for layer in layers}
        default = by_role.get("lr", names[0] if names else _NONE)
        value = current if current in names else default
        with QSignalBlocker(self.lr_combo):
            self.lr_combo.clear()
            if not names:
                self.lr_combo.addItem("(no image layer)", _NONE)
            for name in names:
                self.lr_combo.addItem(name, name)
            index = self.lr_combo.findData(value)
            self.lr_combo.setCurrentIndex(max(index, 0))
        if value != current:
            self.settings.lr_layer = value

    def _lr_layer(self) -> Any:
        from napari.layers import Image

        name = self.settings.lr_layer
        if not name or name not in self.viewer.layers:
            raise InputError("no LR layer chosen: open an LR image or stack and choose it")
        layer = self.viewer.layers[name]
        if not isinstance(layer, Image) or layer.rgb:
            raise InputError(
                f"layer {name!r} is not a greyscale image layer: choose an LR image or stack"
            )
        ndim = len(full_resolution(layer).shape)
        if ndim not in (2, 3):
            raise InputError(
                f"LR layer {name!r} is {ndim}D: choose a 2D image or a 3D stack (Z, Y, X)"
            )
        return layer

    # ------------------------------------------------------------------ labels and buttons
    def _update_session_label(self, *_args: Any) -> None:
        reference = self.session.reference
        operator = self.session.operator
        ref_text = (
            "not chosen"
            if reference is None
            else f"{reference.source or 'chosen'} ({reference.n_patches:,} patches)"
        )
        if operator is None:
            op_text = "not chosen"
        else:
            data = operator.to_dict()
            op_text = f"×{data.get('scale')} {data.get('kind', type(operator).__name__)}"
        self.session_label.setText(
            f"Reference: {ref_text} · Operator: {op_text} (Reference & operator widget)"
        )
        state = self.session.model
        if state is None:
            self.model_label.setText("No model yet: train one or load a model file.")
        else:
            path = self.session.model_path
            scale = state.model_config.get("scale", "?")
            self.model_label.setText(
                f"{MODEL_NAMES.get(state.kind, state.kind)} ×{scale}, {state.step} steps, "
                f"λ {state.lam:.3g}" + (f"\n{path}" if path else "\n(not saved)")
            )

    def _update_controls(self, *_args: Any) -> None:
        running = self.worker is not None
        self.start_button.setEnabled(not running)
        self.resume_button.setEnabled(not running and self.session.model is not None)
        self.stop_button.setEnabled(running and not self._stop.is_set())
        self.load_model_button.setEnabled(not running)

    # ------------------------------------------------------------------ running
    def start(self) -> StoppableWorker | None:
        """Train a new model with the current settings in a thread worker.

        Returns
        -------
        StoppableWorker or None
            The started worker, or ``None`` after a notification (bad input, or a run in
            progress).
        """
        return self._launch(resume=None)

    def resume(self) -> StoppableWorker | None:
        """Continue training ``session.model`` for the budget (steps or minutes more).

        The model's own operator, normalisation and training settings are used; the LR
        layer and the reference must be the ones it was trained on.
        """
        state = self.session.model
        if state is None:
            notify_error(InputError("no model to resume: train one or load a model file first"))
            return None
        if not state.priors or state.optimizer is None:
            notify_error(
                InputError(
                    "this model holds no training state (saved for prediction only): start a "
                    "new run instead"
                )
            )
            return None
        return self._launch(resume=state)

    def _launch(self, resume: TrainingState | None) -> StoppableWorker | None:
        if self.worker is not None:
            notify_error(InputError("training is already running: stop it first"))
            return None
        try:
            run = self._prepare_run(resume)
        except Exception as exc:  # noqa: BLE001 - notification
            notify_error(exc)
            return None
        self._stop.clear()
        self._run = run
        self.checkpoint_path = run["save_path"]
        self.last_state = None
        self.plot.clear()
        if resume is not None:
            self.plot.extend(resume.history)
        self.progress_bar.setValue(0)
        what = "Resuming" if resume is not None else "Starting"
        lam_note = " (choosing λ on the reference first)" if run["config"].lam == "auto" else ""
        self.status_label.setText(f"{what} {run['config'].model} training{lam_note}…")
        self._open_progress(run)
        self.worker = start_job(
            training_job,
            run["lr"],
            run["regions"],
            run["operator"],
            run["config"],
            self._stop,
            resume,
            run["recorded_normalisation"],
            run["preview"],
            run["save_path"],
            stop=self._stop,
            on_yield=self._on_event,
            on_finish=self._on_finished,
            name=f"napari-wpp training ({run['config'].model})",
        )
        self._update_controls()
        return self.worker

    def _prepare_run(self, resume: TrainingState | None) -> dict[str, Any]:
        """Collect and check everything a run needs (raises ``InputError`` with the fix)."""
        from napari_wpp.core.operators import operator_from_dict

        layer = self._lr_layer()
        reference = self.session.reference
        if reference is None or not reference.regions:
            raise InputError(
                "no HR reference chosen: choose one in the Reference & operator widget"
            )
        if resume is not None:
            operator = operator_from_dict(resume.operator)
        else:
            operator = self.session.operator
            if operator is None:
                raise InputError(
                    "no forward operator chosen: set one in the Reference & operator widget"
                )
        config = self.settings.training_config(resume)
        lr = np.asarray(full_resolution(layer))
        if lr.dtype.kind not in "uif":
            raise InputError(
                f"LR layer {layer.name!r} has dtype {lr.dtype}: use an integer or float image"
            )
        recorded = None
        if resume is not None and resume.normalisation is not None:
            recorded = dict(resume.normalisation)
            if np.dtype(recorded.get("dtype")) != lr.dtype:
                raise InputError(
                    f"LR layer {layer.name!r} is {lr.dtype} but the model was trained on "
                    f"{recorded.get('dtype')} data: resume with the same LR data"
                )
        preview, placement = None, None
        if config.preview_every:
            preview, placement = self._preview_input(layer, lr)
        if self.settings.save_path.strip():
            save_path = Path(self.settings.save_path.strip()).expanduser()
            if save_path.suffix.lower() != ".safetensors":
                raise InputError(
                    f"cannot save the model as {save_path.name}: use a .safetensors file name"
                )
            if not save_path.parent.is_dir():
                raise InputError(
                    f"folder {save_path.parent} does not exist: create it or choose another file"
                )
        else:
            save_path = default_model_path(layer.name, config.model)
            save_path.parent.mkdir(parents=True, exist_ok=True)
        return {
            "layer_name": layer.name,
            "lr": lr,
            "regions": [np.asarray(r, dtype=np.float32) for r in reference.regions],
            "operator": operator,
            "config": config,
            "recorded_normalisation": recorded,
            "preview": preview,
            "placement": placement,
            "save_path": save_path,
            "scale": int(operator.scale),
            "normalisation": None,
        }

    def _preview_input(self, layer: Any, lr: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Central crop (≤ :data:`PREVIEW_SIDE` px) of the LR slice shown, and where it sits."""
        if lr.ndim == 3:
            z = current_index(layer, self.viewer, axis=0)
            plane = lr[z]
        else:
            z = None
            plane = lr
        h, w = plane.shape
        ch, cw = min(PREVIEW_SIDE, h), min(PREVIEW_SIDE, w)
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        crop = np.array(plane[y0 : y0 + ch, x0 : x0 + cw])
        start = (y0, x0) if z is None else (z, y0, x0)
        placement = {
            "start": start,
            "scale": tuple(float(v) for v in layer.scale),
            "translate": tuple(float(v) for v in layer.translate),
            "contrast_limits": tuple(float(v) for v in layer.contrast_limits),
            "slice": z,
        }
        return crop, placement

    def _open_progress(self, run: dict[str, Any]) -> None:
        self._close_progress()
        self._progress = ActivityProgress(1000, f"Training {run['config'].model}")

    def stop(self) -> None:
        """Ask the running training to stop after its current step (the file is written)."""
        self._request_stop()

    # ------------------------------------------------------------------ worker events
    def _on_event(self, item: Any) -> None:
        from napari_wpp.core.training import (
            TrainingCheckpoint,
            TrainingFinished,
            TrainingPreview,
            TrainingProgress,
        )

        if isinstance(item, WorkerFailure):
            self._run["failed"] = True
            notify_error(item.error)
        elif isinstance(item, TrainingStarted):
            self._run["normalisation"] = item.normalisation
        elif isinstance(item, TrainingProgress):
            self._show_progress(item)
        elif isinstance(item, TrainingPreview):
            self._show_preview(item.image)
        elif isinstance(item, TrainingCheckpoint):
            self.status_label.setText(f"Checkpoint at step {item.state.step}.")
        elif isinstance(item, ModelFileWritten):
            self.checkpoint_path = item.path
            if item.final:
                self.session.model_path = str(item.path)
        elif isinstance(item, TrainingFinished):
            self.last_state = item.state
            self._run["stopped_early"] = item.stopped_early
            self.session.model_path = None
            self.session.model = item.state

    def _show_progress(self, event: Any) -> None:
        fraction = min(max(float(event.fraction), 0.0), 1.0)
        self.progress_bar.setValue(int(round(1000 * fraction)))
        if self._progress is not None:
            self._progress.set(
                int(round(1000 * fraction)),
                f"Training {self._run['config'].model}: step {event.step}",
            )
        self.plot.add(event.step, event.data_term, event.wpp_term)
        from napari_wpp.core.training import rate_text

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

    def _show_preview(self, image: np.ndarray) -> None:
        from napari_wpp.core.intensity import Normalisation

        run = self._run
        placement = run.get("placement")
        if placement is None:
            return
        norm = run.get("normalisation")
        data = np.asarray(image, dtype=np.float32)
        if norm is not None:
            data = Normalisation.from_dict(norm).invert(data)
        start = placement["start"]
        grown = (True, True) if len(start) == 2 else (False, True, True)
        if len(start) == 3:
            data = data[None]
        crop_translate = offset_translate(placement["scale"], placement["translate"], start)
        scale, translate = superresolved_geometry(
            placement["scale"], crop_translate, run["scale"], grown
        )
        metadata = {
            PROVENANCE_KEY: {
                "role": "preview",
                "source": run["layer_name"],
                "scale": run["scale"],
                "slice": placement["slice"],
                "crop_start": [int(v) for v in start],
                "model": run["config"].model,
            }
        }
        try:
            layer = add_or_update_image(
                self.viewer,
                f"{run['layer_name']} preview",
                data,
                scale=scale,
                translate=translate,
                metadata=metadata,
                contrast_limits=placement["contrast_limits"],
                colormap="gray",
            )
        except Exception as exc:  # noqa: BLE001 - e.g. the viewer is closing
            notify_error(exc)
            return
        self.preview_updated.emit(layer)

    def _on_finished(self) -> None:
        self.worker = None
        self._close_progress()
        run = self._run
        state = self.last_state
        if state is not None:
            self.progress_bar.setValue(self.progress_bar.maximum())
            self.plot.redraw()
            where = f" → {self.checkpoint_path}" if self.session.model_path else " (not saved)"
            how = "Stopped" if run.get("stopped_early") else "Finished"
            self.status_label.setText(f"{how} after {state.step} steps{where}")
        elif run.get("failed"):
            self.status_label.setText("Training failed (see the notification).")
        self._update_controls()
        self._update_session_label()
        self.training_finished.emit(state)

    # ------------------------------------------------------------------ files
    def save_model(self, path: str | Path) -> Path | None:
        """Write ``session.model`` to ``path`` (``.safetensors``, the CLI's format).

        Returns
        -------
        Path or None
            The written file, or ``None`` after a notification.
        """
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
        """Read a model file (CLI format) into ``session.model``; its loss history is plotted.

        Returns
        -------
        TrainingState or None
            The loaded state, or ``None`` after a notification.
        """
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
        self.plot.clear()
        self.plot.extend(state.history)
        self.status_label.setText(f"Loaded {Path(path).name} ({state.step} steps).")
        return state

    def _choose_save_path(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save the model to", "model.safetensors", "Model files (*.safetensors)"
        )
        if path:
            if Path(path).suffix.lower() != ".safetensors":
                path += ".safetensors"
            self.settings.save_path = path

    def _save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save model", "model.safetensors", "Model files (*.safetensors)"
        )
        if path:
            if Path(path).suffix.lower() != ".safetensors":
                path += ".safetensors"
            self.save_model(path)

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Load model", "", "Model files (*.safetensors);;All files (*)"
        )
        if path:
            self.load_model(path)
