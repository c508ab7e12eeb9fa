"""The "Uncertainty" dock widget: posterior samples, mean and std of a WPPFlow.

The widget draws ``K`` posterior samples of a WPPFlow (the session's model when it is a
WPPFlow, or one read from a model file) for the current slice of an LR layer, or for the part
of it under a Shapes rectangle, with :func:`napari_wpp.core.inference.sample` in a napari
thread worker (progress, also in napari's activity dock, and Cancel). The region is found in
the layer through its world/data transforms, as in the Reference & operator widget, so scaled
and translated layers work; 3D stacks are cut into slices along axis 0.

Intensities are handled as ``napari-wpp predict`` does (:func:`napari_wpp.jobs.predict.
input_normalisation` of the whole LR layer: integer inputs use their dtype's range, float
inputs the model's recorded range or the layer's percentiles); the mean and
the samples come back in the input's dtype, the standard deviation as float32 in the input's
intensity units. Results appear as the layers

* ``"<source> mean"`` (grey, the source's contrast limits),
* ``"<source> std"`` (colormap magma; with "overlay std on mean" it is blended additively over
  the mean),
* ``"<source> samples"`` (optional; sample axis first),

with the superresolved geometry of :mod:`napari_wpp.widgets._layers` placed over the region
(scale ``s / q``, translate ``t − s·(q − 1) / (2q)`` on the image plane, the samples with an
extra leading axis), provenance in ``metadata["napari_wpp"]`` (role ``"superresolved"`` and a
``"statistic"``), updated in place when the widget runs again.

The widget shows the largest std and the share of the region whose std lies above a threshold
(a percentage of the intensity range, recomputed as the threshold changes). With a ground-truth
layer on the superresolved pixel grid (the sample data's "HR truth"), it also shows the
calibration figures of :mod:`napari_wpp.core.uncertainty`: the share of pixels whose truth lies
within 1, 2 and 3 std of the mean against a Gaussian's, the correlation of the std with the
actual error and the edge/flat std ratio.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from psygnal import evented
from qtpy.QtCore import QSignalBlocker, Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QToolButton,
    QWidget,
)

from napari_wpp.core.config import PredictSpec, bounds
from napari_wpp.core.errors import InputError
from napari_wpp.jobs.predict import input_normalisation
from napari_wpp.widgets._form import (
    NOTE_STYLE,
    choice_combo,
    form_layout,
    note_label,
    scrolled_column,
)
from napari_wpp.widgets._layers import (
    PROVENANCE_KEY,
    add_or_update_image,
    current_index,
    full_resolution,
    grown_axes,
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

    from napari_wpp.core.training import TrainingState

__all__ = [
    "MIN_REGION",
    "UncertaintyFinished",
    "UncertaintyMaps",
    "UncertaintySettings",
    "UncertaintyWidget",
    "SamplingRegion",
    "output_names",
    "share_above",
    "truth_index",
    "uncertainty_job",
]

MODEL_SOURCES = (("session", "This session's model"), ("file", "Model file"))
#: Smallest region side in LR pixels.
MIN_REGION = 4
#: Tolerance (in truth pixels) of the check that a ground truth lies on the output grid.
GRID_TOLERANCE = 1e-3
_NONE = ""
_EXCLUDED_ROLES = ("preview", "superresolved", "kernel")


def output_names(source: str) -> dict[str, str]:
    """Names of the layers computed from the layer ``source`` (``mean``, ``std``, ``samples``)."""
    return {what: f"{source} {what}" for what in ("mean", "std", "samples")}


def share_above(std: np.ndarray, threshold: float) -> float:
    """Share (0..1) of the pixels of ``std`` strictly above ``threshold`` (0 when empty)."""
    values = np.asarray(std)
    if values.size == 0:
        return 0.0
    return float(np.count_nonzero(values > threshold)) / float(values.size)


# --------------------------------------------------------------------------- settings
@evented
@dataclass
class UncertaintySettings:
    """The Uncertainty widget's choices.

    Parameters
    ----------
    model_source
        ``"session"`` (the session's model, which must be a WPPFlow) or ``"file"``.
    model_file
        Path of a ``.safetensors`` WPPFlow model file.
    input_layer
        Name of the LR image layer (2D image or 3D stack; slices along axis 0).
    region_shapes
        Name of a Shapes layer whose rectangle cuts the slice; ``""``: the whole slice.
    truth_layer
        Name of a ground-truth layer on the superresolved grid; ``""``: none.
    k
        Number of posterior samples.
    temperature
        Latent temperature (1: the trained posterior; 0: every sample is the mode).
    seed
        Seed of the latents (the same seed gives the same samples).
    batch_size
        Samples per forward pass.
    tile
        Tile side in LR pixels for regions too large at once (0: the whole region).
    device
        ``"auto"``, ``"cpu"``, ``"cuda:i"`` or ``"mps"``.
    keep_samples
        Also show every sample as the layer ``"<source> samples"``.
    overlay_std
        Blend the std layer additively over the mean.
    threshold_percent
        Threshold of the "share above" statistic, in percent of the intensity range.
    """

    model_source: str = "session"
    model_file: str = ""
    input_layer: str = _NONE
    region_shapes: str = _NONE
    truth_layer: str = _NONE
    k: int = PredictSpec.samples
    temperature: float = PredictSpec.temperature
    seed: int = PredictSpec.seed
    batch_size: int = PredictSpec.batch_size
    tile: int = PredictSpec.tile or 0
    device: str = PredictSpec.device
    keep_samples: bool = PredictSpec.keep_samples
    overlay_std: bool = True
    threshold_percent: float = 5.0


# --------------------------------------------------------------------------- worker job
@dataclass(frozen=True, eq=False)
class UncertaintyMaps:
    """What a finished run gives the widget.

    Attributes
    ----------
    mean
        Pixelwise mean of the samples, ``(q·h, q·w)`` in the input's dtype and range.
    std
        Pixelwise standard deviation (``ddof=1``), float32, in the input's intensity units.
    samples
        ``(k, q·h, q·w)`` samples in the input's dtype, or ``None``.
    normalisation
        The :class:`~napari_wpp.core.intensity.Normalisation` dict of the input.
    normalisation_from
        How it was chosen (shown in the provenance).
    intensity_range
        ``high − low`` of the normalisation (the std of a sample spread over the whole range).
    max_std
        Largest std of the region (intensity units).
    figures
        Calibration figures against the ground truth (:func:`~napari_wpp.core.uncertainty.
        calibration` and :func:`~napari_wpp.core.uncertainty.edge_flat_std_ratio`, on the
        [0, 1] scale of the normalisation), or ``None`` without a ground truth.
    figures_error
        Why the figures could not be computed (one line), or ``None``.
    """

    mean: np.ndarray
    std: np.ndarray
    samples: np.ndarray | None
    normalisation: dict[str, Any]
    normalisation_from: str
    intensity_range: float
    max_std: float
    figures: dict[str, float] | None
    figures_error: str | None


@dataclass(frozen=True, eq=False)
class UncertaintyFinished:
    """Last item of a job: the maps, or ``None`` when the run was cancelled."""

    maps: UncertaintyMaps | None
    elapsed_s: float
    stopped_early: bool


def _figures(
    truth: np.ndarray, mean01: np.ndarray, std01: np.ndarray, norm: Any
) -> dict[str, float]:
    """Calibration and edge/flat figures on the normalisation's [0, 1] scale."""
    from napari_wpp.core.uncertainty import calibration, edge_flat_std_ratio

    truth = np.asarray(truth)
    if truth.dtype.kind not in "uif":
        raise InputError(f"ground truth has dtype {truth.dtype}: use a greyscale image")
    truth01 = norm.apply(truth, clip=False)
    figures = dict(calibration(truth01, mean01, std01))
    figures.update(edge_flat_std_ratio(truth01, std01))
    return figures


@dataclass(frozen=True, eq=False)
class SamplingRegion:
    """The part of an LR layer an Uncertainty run samples.

    Attributes
    ----------
    region
        The 2D LR region (array-like, read in the worker).
    volume
        The whole LR layer the region comes from (its percentiles normalise a float input,
        as for ``napari-wpp predict`` of that layer).
    slice_index
        Random stream of the seed (the slice's index, as ``sample_volume`` uses).
    truth
        The ground truth under the region on the output grid (array-like) or ``None``.
    """

    region: Any
    volume: Any
    slice_index: int = 0
    truth: Any = None


def uncertainty_job(
    spec: PredictSpec,
    model: Any,
    recorded_normalisation: dict[str, Any] | None,
    where: SamplingRegion,
    stop: threading.Event,
) -> Iterator[Any]:
    """Worker body: normalise the region, draw the samples, compute the statistics.

    Parameters
    ----------
    spec
        ``samples``, ``temperature``, ``seed``, ``batch_size``, ``tile``, ``device`` and
        ``keep_samples`` as :func:`napari_wpp.core.inference.sample` takes them.
    model
        A WPPFlow.
    recorded_normalisation
        The model's normalisation (used for float inputs when it was trained on floats).
    where
        The region, its layer, its slice and its ground truth.
    stop
        Set to cancel after the current batch of samples.

    Yields
    ------
    SamplingProgress, then UncertaintyFinished
    """
    from napari_wpp.core.inference import SamplingFinished, sample

    region, truth = where.region, where.truth
    lr = np.asarray(region)
    norm, how = input_normalisation(lr.dtype, recorded_normalisation, where.volume)
    lr01 = norm.apply(lr)
    for event in sample(
        model,
        lr01,
        spec.samples,
        temperature=spec.temperature,
        seed=spec.seed,
        batch_size=spec.batch_size,
        tile=spec.tile,
        keep_samples=spec.keep_samples,
        device=spec.device,
        stop=stop,
        slice_index=where.slice_index,
    ):
        if not isinstance(event, SamplingFinished):
            yield event
            continue
        if event.stopped_early or event.result is None:
            yield UncertaintyFinished(None, event.elapsed_s, True)
            return
        result = event.result
        spread = norm.high - norm.low
        std = (result.std.astype(np.float64) * spread).astype(np.float32)
        figures = figures_error = None
        if truth is not None:
            try:
                figures = _figures(np.asarray(truth), result.mean, result.std, norm)
            except InputError as exc:
                figures_error = str(exc)
        samples = None if result.samples is None else norm.invert(result.samples)
        maps = UncertaintyMaps(
            mean=norm.invert(result.mean),
            std=std,
            samples=samples,
            normalisation=norm.to_dict(),
            normalisation_from=how,
            intensity_range=float(spread),
            max_std=float(std.max()) if std.size else 0.0,
            figures=figures,
            figures_error=figures_error,
        )
        yield UncertaintyFinished(maps, event.elapsed_s, False)


# --------------------------------------------------------------------------- geometry
def truth_index(
    truth: Any,
    out_scale: tuple[float, ...],
    out_translate: tuple[float, ...],
    plane_shape: tuple[int, int],
) -> tuple[Any, ...]:
    """Index of the pixels of a ground-truth layer under a superresolved region.

    Parameters
    ----------
    truth
        Image layer (2D or 3D) on the superresolved pixel grid.
    out_scale, out_translate
        Geometry of the superresolved region (2 or 3 axes; a 3D region is one slice thick).
    plane_shape
        ``(H, W)`` of the superresolved region.

    Returns
    -------
    tuple
        A numpy index into the truth's data giving the ``(H, W)`` truth of the region.

    Raises
    ------
    InputError
        The truth is not on the output's pixel grid or does not cover the region.
    """
    data = full_resolution(truth)
    tnd = len(data.shape)
    out_nd = len(out_scale)
    if getattr(truth, "rgb", False) or tnd not in (2, 3):
        raise InputError(
            f"ground truth {truth.name!r} has shape {tuple(data.shape)}: choose a 2D or 3D "
            "greyscale image"
        )
    if tnd == 3 and out_nd == 2:
        raise InputError(
            f"ground truth {truth.name!r} is 3D but the LR layer is 2D: choose a 2D ground truth"
        )
    height, width = (int(n) for n in plane_shape)
    s = np.asarray(out_scale, dtype=np.float64)
    t = np.asarray(out_translate, dtype=np.float64)
    last_pixel = np.zeros(out_nd)
    last_pixel[-2:] = (height - 1, width - 1)
    first = np.asarray(truth.world_to_data(t), dtype=np.float64)
    last = np.asarray(truth.world_to_data(t + s * last_pixel), dtype=np.float64)
    span = last - first
    expected = np.zeros(tnd)
    expected[-2:] = (height - 1, width - 1)
    rounded = np.rint(first)
    if np.abs(span - expected).max() > GRID_TOLERANCE * max(height, width, 1) or (
        np.abs(first - rounded).max() > 1e-2
    ):
        raise InputError(
            f"ground truth {truth.name!r} is not on the superresolved pixel grid (its pixel "
            "size or offset differ): choose the HR truth registered with the LR layer"
        )
    start = rounded.astype(int)
    stop = start + np.asarray([1] * (tnd - 2) + [height, width])
    if (start < 0).any() or (stop > np.asarray(data.shape)).any():
        raise InputError(
            f"ground truth {truth.name!r} does not cover the region: choose a truth layer "
            "that covers it, or a smaller region"
        )
    index: list[Any] = [int(v) for v in start[:-2]]
    index += [slice(int(start[-2]), int(stop[-2])), slice(int(start[-1]), int(stop[-1]))]
    return tuple(index)


# --------------------------------------------------------------------------- widget
class UncertaintyWidget(JobOwner, QWidget):
    """Dock widget: posterior mean, standard deviation and samples of a WPPFlow.

    Public methods (used by the buttons and by scripts/tests): :meth:`run`, :meth:`cancel`,
    :meth:`load_model`, :meth:`shutdown`, :meth:`statistics`. Errors become napari
    notifications; the methods then return ``None``.

    Attributes
    ----------
    settings
        The widget's :class:`UncertaintySettings`.
    session
        The viewer's shared :class:`~napari_wpp.widgets._session.WPPSession`.
    worker
        The running worker, or ``None``.
    last_maps
        The :class:`UncertaintyMaps` of the last finished run, or ``None``.
    uncertainty_finished
        Qt signal emitted at the end of a run with the mean layer (``None`` when the run
        failed or was cancelled).
    """

    uncertainty_finished = Signal(object)

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session: WPPSession = session_for(getattr(napari_viewer, "__wrapped__", napari_viewer))
        self.settings = UncertaintySettings()
        self.worker: StoppableWorker | None = None
        self.last_maps: UncertaintyMaps | None = None
        self._stop = threading.Event()
        self._file_state: TrainingState | None = None
        self._file_key: tuple[str, float] | None = None
        self._run: dict[str, Any] = {}
        self._progress: ActivityProgress | None = None
        self._offered: set[tuple[str, str]] = set()
        self._build_ui()
        self._bind_settings()
        self._connect_viewer()
        self._refresh_layers()
        self._update_model_label()
        self._update_controls()
        self._show_statistics()
        self.destroyed.connect(lambda *_args, stop=self._stop: stop.set())

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        scrolled_column(
            self,
            [
                self._build_model_box(),
                self._build_input_box(),
                self._build_sampling_box(),
                self._build_statistics_box(),
            ],
        )

    _form = staticmethod(form_layout)

    _combo = staticmethod(choice_combo)

    @staticmethod
    def _note() -> QLabel:
        return note_label(selectable=True)

    def _build_model_box(self) -> QGroupBox:
        box = QGroupBox("WPPFlow model")
        form = self._form(box)
        self.source_combo = self._combo()
        for value, text in MODEL_SOURCES:
            self.source_combo.addItem(text, value)
        form.addRow("Use", self.source_combo)
        file_row = QHBoxLayout()
        self.file_edit = QLineEdit()
        self.file_edit.setPlaceholderText("flow.safetensors")
        self.file_browse = QToolButton()
        self.file_browse.setText("…")
        self.file_browse.clicked.connect(self._choose_model_file)
        file_row.addWidget(self.file_edit, 1)
        file_row.addWidget(self.file_browse)
        form.addRow("File", file_row)
        self.model_label = self._note()
        form.addRow(self.model_label)
        return box

    def _build_input_box(self) -> QGroupBox:
        box = QGroupBox("Region")
        form = self._form(box)
        self.layer_combo = self._combo()
        self.layer_combo.setToolTip("LR image or stack; a stack is sampled at the current slice")
        form.addRow("LR layer", self.layer_combo)
        self.shapes_combo = self._combo()
        self.shapes_combo.setToolTip("A Shapes layer whose rectangle cuts the slice")
        form.addRow("Rectangle", self.shapes_combo)
        self.truth_combo = self._combo()
        self.truth_combo.setToolTip(
            "HR ground truth on the superresolved grid: shows how well the std is calibrated"
        )
        form.addRow("Ground truth", self.truth_combo)
        self.region_label = self._note()
        form.addRow(self.region_label)
        return box

    def _build_sampling_box(self) -> QGroupBox:
        from napari_wpp.core.devices import available_devices

        box = QGroupBox("Sampling")
        form = self._form(box)
        self.k_spin = QSpinBox()
        self.k_spin.setRange(*bounds(PredictSpec, "samples"))
        self.k_spin.setToolTip("Number of posterior samples")
        form.addRow("Samples K", self.k_spin)
        self.temperature_spin = QDoubleSpinBox()
        self.temperature_spin.setRange(*bounds(PredictSpec, "temperature"))
        self.temperature_spin.setDecimals(2)
        self.temperature_spin.setSingleStep(0.1)
        self.temperature_spin.setToolTip(
            "Latent temperature: 1 is the trained posterior, 0 the mode"
        )
        form.addRow("Temperature", self.temperature_spin)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(*bounds(PredictSpec, "seed"))
        form.addRow("Seed", self.seed_spin)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(*bounds(PredictSpec, "batch_size"))
        self.batch_spin.setToolTip("Samples per forward pass")
        form.addRow("Batch size", self.batch_spin)
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(0, bounds(PredictSpec, "tile")[1])
        self.tile_spin.setSpecialValueText("whole region")
        self.tile_spin.setSuffix(" px")
        self.tile_spin.setToolTip("Tile side in LR pixels for regions too large at once")
        form.addRow("Tiles", self.tile_spin)
        self.device_combo = self._combo()
        self.device_combo.addItem("auto", "auto")
        for name in available_devices():
            self.device_combo.addItem(name, name)
        form.addRow("Device", self.device_combo)
        self.samples_check = QCheckBox("Show every sample (layer, sample axis first)")
        form.addRow(self.samples_check)
        self.overlay_check = QCheckBox("Overlay std on mean (additive blending)")
        form.addRow(self.overlay_check)
        buttons = QHBoxLayout()
        self.run_button = QPushButton("Draw samples")
        self.cancel_button = QPushButton("Cancel")
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        form.addRow(buttons)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setTextVisible(True)
        self.progress_bar.setFormat("%v / %m samples")
        form.addRow(self.progress_bar)
        self.status_label = QLabel("Ready.")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        form.addRow(self.status_label)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        return box

    def _build_statistics_box(self) -> QGroupBox:
        box = QGroupBox("Statistics")
        form = self._form(box)
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(0.0, 100.0)
        self.threshold_spin.setDecimals(1)
        self.threshold_spin.setSingleStep(0.5)
        self.threshold_spin.setSuffix(" % of range")
        self.threshold_spin.setToolTip(
            "Share of the area whose std exceeds this share of the intensity range"
        )
        form.addRow("Std threshold", self.threshold_spin)
        self.max_std_label = QLabel("–")
        form.addRow("Max std", self.max_std_label)
        self.share_label = QLabel("–")
        form.addRow("Area above", self.share_label)
        self.calibration_box = QGroupBox("Calibration against the ground truth")
        cal = self._form(self.calibration_box)
        self.coverage_labels = []
        for k in (1, 2, 3):
            label = QLabel("–")
            self.coverage_labels.append(label)
            cal.addRow(f"Within {k} sd", label)
        self.correlation_label = QLabel("–")
        cal.addRow("Std ~ |error|", self.correlation_label)
        self.edge_flat_label = QLabel("–")
        cal.addRow("Edge/flat std", self.edge_flat_label)
        self.calibration_note = self._note()
        cal.addRow(self.calibration_note)
        form.addRow(self.calibration_box)
        return box

    # ------------------------------------------------------------------ settings binding
    def _bind_settings(self) -> None:
        self._bind_combo(self.source_combo, "model_source")
        self._bind_combo(self.layer_combo, "input_layer")
        self._bind_combo(self.shapes_combo, "region_shapes")
        self._bind_combo(self.truth_combo, "truth_layer")
        self._bind_combo(self.device_combo, "device")
        self._bind_spin(self.k_spin, "k")
        self._bind_spin(self.temperature_spin, "temperature")
        self._bind_spin(self.seed_spin, "seed")
        self._bind_spin(self.batch_spin, "batch_size")
        self._bind_spin(self.tile_spin, "tile")
        self._bind_spin(self.threshold_spin, "threshold_percent")
        self._bind_text(self.file_edit, "model_file")
        self._bind_check(self.samples_check, "keep_samples")
        self._bind_check(self.overlay_check, "overlay_std")
        for name in ("model_source", "model_file", "input_layer"):
            getattr(self.settings.events, name).connect(self._update_controls)
        for name in ("model_source", "model_file"):
            getattr(self.settings.events, name).connect(self._update_model_label)
        for name in ("input_layer", "region_shapes"):
            getattr(self.settings.events, name).connect(self._update_region_label)
        self.settings.events.overlay_std.connect(self._apply_overlay)
        self.settings.events.threshold_percent.connect(self._show_statistics)
        self.session.events.model.connect(self._update_model_label)
        self.session.events.model_path.connect(self._update_model_label)

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
        convert: Callable[[Any], Any] = float if isinstance(spin, QDoubleSpinBox) else int

        def to_widget(value: Any) -> None:
            with QSignalBlocker(spin):
                spin.setValue(convert(value))

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

    def _bind_check(self, check: QCheckBox, name: str) -> None:
        def to_widget(value: Any) -> None:
            with QSignalBlocker(check):
                check.setChecked(bool(value))

        check.toggled.connect(lambda value: setattr(self.settings, name, bool(value)))
        getattr(self.settings.events, name).connect(to_widget)
        to_widget(getattr(self.settings, name))

    # ------------------------------------------------------------------ layers
    def _connect_viewer(self) -> None:
        events = self.viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved, events.reordered):
            emitter.connect(self._on_layers_changed)
        for layer in self.viewer.layers:
            self._watch_layer(layer)
        self.viewer.dims.events.current_step.connect(self._update_region_label)

    def _watch_layer(self, layer: Any) -> None:
        layer.events.name.connect(self._refresh_layers)
        if hasattr(layer.events, "data"):
            layer.events.data.connect(self._update_region_label)

    def _on_layers_changed(self, event: Any = None) -> None:
        if getattr(event, "type", None) == "inserted":
            self._watch_layer(event.value)
        self._refresh_layers()

    def _image_layers(self) -> list[Any]:
        from napari.layers import Image

        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Image)
            and not layer.rgb
            and len(full_resolution(layer).shape) in (2, 3)
            and layer_role(layer) not in _EXCLUDED_ROLES
        ]

    def _refresh_layers(self, *_args: Any) -> None:
        from napari.layers import Shapes

        images = self._image_layers()
        names = [layer.name for layer in images]
        by_role = {layer_role(layer): layer.name for layer in images}
        lr_default = by_role.get("lr", names[0] if names else _NONE)
        self._fill(self.layer_combo, "input_layer", names, "(no image layer)", lr_default, False)
        shapes = [layer.name for layer in self.viewer.layers if isinstance(layer, Shapes)]
        self._fill(self.shapes_combo, "region_shapes", shapes, "(whole slice)", _NONE, True)
        truth_default = by_role.get("truth", _NONE)
        self._fill(self.truth_combo, "truth_layer", names, "(none)", truth_default, True)
        self._update_controls()
        self._update_region_label()

    def _fill(
        self,
        combo: QComboBox,
        name: str,
        names: list[str],
        empty_text: str,
        default: str,
        optional: bool,
    ) -> None:
        """Refill ``combo`` with ``names`` (and a "none" entry when ``optional``)."""
        current = getattr(self.settings, name)
        value = current if current in names else default
        if optional and current == _NONE:
            # offer a default (the truth of the sample data) once; "none" stays chosen after
            value = default if (name, default) not in self._offered else _NONE
        self._offered.add((name, value))
        with QSignalBlocker(combo):
            combo.clear()
            if optional or not names:
                combo.addItem(empty_text, _NONE)
            for item in names:
                combo.addItem(item, item)
            combo.setCurrentIndex(max(combo.findData(value), 0))
        if value != current:
            setattr(self.settings, name, value)

    def _layer(self, name: str, what: str) -> Any:
        if not name or name not in self.viewer.layers:
            raise InputError(f"no {what} chosen: open one and choose it")
        return self.viewer.layers[name]

    def _input_layer(self) -> Any:
        from napari.layers import Image

        layer = self._layer(self.settings.input_layer, "LR layer")
        if not isinstance(layer, Image) or layer.rgb:
            raise InputError(f"layer {layer.name!r} is not a greyscale image layer: choose another")
        ndim = len(full_resolution(layer).shape)
        if ndim not in (2, 3):
            raise InputError(
                f"LR layer {layer.name!r} is {ndim}D: choose a 2D image or a 3D stack (Z, Y, X)"
            )
        return layer

    def _region(self, layer: Any) -> tuple[int | None, slice, slice]:
        """Slice index (``None`` for 2D) and the rows and columns of the region."""
        from napari.layers import Shapes

        from napari_wpp.widgets.reference_operator import (
            rectangle_world_box,
            world_box_to_slices,
        )

        data = full_resolution(layer)
        index = current_index(layer, self.viewer, 0) if len(data.shape) == 3 else None
        height, width = (int(n) for n in data.shape[-2:])
        rows, cols = slice(0, height), slice(0, width)
        if self.settings.region_shapes:
            shapes = self._layer(self.settings.region_shapes, "Shapes layer")
            if not isinstance(shapes, Shapes):
                raise InputError(f"layer {shapes.name!r} is not a Shapes layer: choose another")
            rows, cols = world_box_to_slices(layer, rectangle_world_box(shapes))
            if rows.stop <= rows.start or cols.stop <= cols.start:
                raise InputError(
                    f"the rectangle of {shapes.name!r} does not overlap layer {layer.name!r}: "
                    "draw it over the image"
                )
        h, w = rows.stop - rows.start, cols.stop - cols.start
        if min(h, w) < MIN_REGION:
            raise InputError(
                f"the region is {h}×{w} LR pixels, smaller than {MIN_REGION}×{MIN_REGION}: "
                "draw a larger rectangle"
            )
        return index, rows, cols

    # ------------------------------------------------------------------ labels and controls
    def _update_controls(self, *_args: Any) -> None:
        running = self.worker is not None
        from_file = self.settings.model_source == "file"
        self.file_edit.setEnabled(from_file and not running)
        self.file_browse.setEnabled(from_file and not running)
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running and not self._stop.is_set())

    def _update_region_label(self, *_args: Any) -> None:
        try:
            layer = self._input_layer()
            index, rows, cols = self._region(layer)
        except InputError as exc:
            self.region_label.setText(str(exc))
            self.region_label.setStyleSheet("color: #e8a33d;")
            return
        except Exception:  # noqa: BLE001 - a label must never break the widget
            self.region_label.setText("")
            return
        where = "" if index is None else f" of slice {index}"
        self.region_label.setText(
            f"Rows {rows.start}–{rows.stop - 1}, columns {cols.start}–{cols.stop - 1}{where} "
            f"({rows.stop - rows.start}×{cols.stop - cols.start} LR px)"
        )
        self.region_label.setStyleSheet(NOTE_STYLE)

    def _update_model_label(self, *_args: Any) -> None:
        if self.settings.model_source == "session":
            state = self.session.model
            if state is None:
                self.model_label.setText(
                    "No model in this session yet: train a WPPFlow or load one."
                )
                return
            origin = self.session.model_path or "trained in this session, not saved"
        else:
            state = self._file_state if self._file_key_matches() else None
            if state is None:
                path = self.settings.model_file.strip()
                self.model_label.setText(
                    f"{Path(path).name} is read when you run." if path else "Choose a model file."
                )
                return
            origin = self.settings.model_file
        scale = state.model_config.get("scale", "?")
        if state.kind != "wppflow":
            self.model_label.setText(
                f"{state.kind} ×{scale} is not a WPPFlow: train a WPPFlow (Train widget) or "
                "choose a WPPFlow model file."
            )
            return
        self.model_label.setText(f"WPPFlow ×{scale}, {state.step} steps\n{origin}")

    def _current_file_key(self) -> tuple[str, float] | None:
        path = Path(self.settings.model_file.strip()).expanduser()
        try:
            return (str(path.resolve()), path.stat().st_mtime)
        except OSError:
            return None

    def _file_key_matches(self) -> bool:
        return self._file_state is not None and self._file_key == self._current_file_key()

    # ------------------------------------------------------------------ statistics
    def statistics(self) -> dict[str, float] | None:
        """Figures of the last run (``None`` before one finished).

        Returns
        -------
        dict or None
            ``max_std`` (intensity units), ``threshold`` (intensity units), ``share_above``
            (0..1) and, with a ground truth, the calibration figures (``coverage_1sd`` ...,
            ``std_error_pearson``, ``edge_flat_ratio``, ...).
        """
        maps = self.last_maps
        if maps is None:
            return None
        threshold = float(self.settings.threshold_percent) / 100.0 * maps.intensity_range
        figures: dict[str, float] = {
            "max_std": maps.max_std,
            "threshold": threshold,
            "share_above": share_above(maps.std, threshold),
        }
        figures.update(maps.figures or {})
        return figures

    def _show_statistics(self, *_args: Any) -> None:
        figures = self.statistics()
        maps = self.last_maps
        has_truth = maps is not None and (maps.figures is not None or maps.figures_error)
        self.calibration_box.setVisible(bool(has_truth))
        if figures is None or maps is None:
            self.max_std_label.setText("–")
            self.share_label.setText("–")
            return
        spread = maps.intensity_range
        self.max_std_label.setText(
            f"{figures['max_std']:.4g} ({100 * figures['max_std'] / spread:.1f} % of range)"
        )
        self.share_label.setText(
            f"{100 * figures['share_above']:.1f} % of the region (std > "
            f"{figures['threshold']:.4g})"
        )
        if maps.figures_error:
            for label in (*self.coverage_labels, self.correlation_label, self.edge_flat_label):
                label.setText("–")
            self.calibration_note.setText(maps.figures_error)
            return
        if maps.figures is None:
            return
        f = maps.figures
        for k, label in zip((1, 2, 3), self.coverage_labels):
            label.setText(
                f"{100 * f[f'coverage_{k}sd']:.1f} % (Gaussian {100 * f[f'expected_{k}sd']:.1f} %)"
            )

        def number(value: float) -> str:
            return f"{value:.3f}" if math.isfinite(value) else "n/a"

        self.correlation_label.setText(
            f"Pearson {number(f['std_error_pearson'])} · Spearman "
            f"{number(f['std_error_spearman'])}"
        )
        self.edge_flat_label.setText(f"{number(f['edge_flat_ratio'])} (useful maps: ≥ 2)")
        self.calibration_note.setText(
            f"Against {self._run.get('truth_name', 'the ground truth')}, [0, 1] scale; mean "
            f"|error| {f['mean_abs_error']:.4f}, mean std {f['mean_std']:.4f}."
        )

    def _apply_overlay(self, *_args: Any) -> None:
        name = self._run.get("names", {}).get("std")
        if name and name in self.viewer.layers:
            self.viewer.layers[name].blending = self._std_blending()

    def _std_blending(self) -> str:
        return "additive" if self.settings.overlay_std else "translucent"

    # ------------------------------------------------------------------ model
    def load_model(self, path: str | Path) -> TrainingState | None:
        """Read a WPPFlow model file and use it (``model_source`` becomes ``"file"``).

        Returns
        -------
        TrainingState or None
            The loaded state, or ``None`` after a notification.
        """
        self.settings.model_file = str(path)
        self.settings.model_source = "file"
        try:
            return self._model_state()[0]
        except Exception as exc:  # noqa: BLE001 - notification
            notify_error(exc)
            return None

    def _model_state(self) -> tuple[TrainingState, str | None]:
        """The WPPFlow to sample and its file (``None`` for an unsaved session model)."""
        from napari_wpp.io import load_model

        if self.settings.model_source == "session":
            state = self.session.model
            if state is None:
                raise InputError(
                    "no model in this session: train a WPPFlow (Train widget) or choose a "
                    "model file"
                )
            path = self.session.model_path
        else:
            text = self.settings.model_file.strip()
            if not text:
                raise InputError("no model file chosen: choose a WPPFlow .safetensors file")
            if not self._file_key_matches():
                self._file_state = load_model(Path(text).expanduser(), device="cpu")
                self._file_key = self._current_file_key()
                self._update_model_label()
            assert self._file_state is not None
            state, path = self._file_state, str(Path(text).expanduser().resolve())
        if state.kind != "wppflow":
            where = "the session's model" if path is None else Path(path).name
            raise InputError(
                f"{where} is a {state.kind}, not a WPPFlow: train a WPPFlow (Train widget, "
                "model WPPFlow) or choose a WPPFlow model file"
            )
        return state, path

    # ------------------------------------------------------------------ running
    def run(self) -> StoppableWorker | None:
        """Draw the posterior samples of the region in a thread worker.

        Returns
        -------
        StoppableWorker or None
            The started worker, or ``None`` after a notification.
        """
        if self.worker is not None:
            notify_error(InputError("sampling is already running: wait or cancel it"))
            return None
        try:
            run = self._prepare_run()
        except Exception as exc:  # noqa: BLE001 - notification
            notify_error(exc)
            return None
        self._stop.clear()
        self._run = run
        self.progress_bar.setRange(0, run["k"])
        self.progress_bar.setValue(0)
        self.status_label.setText(f"Drawing {run['k']} samples of {run['what']}…")
        self._close_progress()
        self._progress = ActivityProgress(run["k"], "Posterior samples")
        s = self.settings
        spec = PredictSpec(
            samples=run["k"],
            temperature=float(s.temperature),
            seed=int(s.seed),
            batch_size=int(s.batch_size),
            tile=int(s.tile) or None,
            device=s.device,
            keep_samples=bool(s.keep_samples),
        )
        where = SamplingRegion(run["region"], run["volume"], run["slice_index"], run["truth"])
        self.worker = start_job(
            uncertainty_job,
            spec,
            run["model"],
            run["recorded_normalisation"],
            where,
            self._stop,
            stop=self._stop,
            on_yield=self._on_event,
            on_finish=self._on_finished,
            name="napari-wpp posterior samples",
        )
        self._update_controls()
        return self.worker

    def _prepare_run(self) -> dict[str, Any]:
        """Collect and check everything a run needs (raises ``InputError`` with the fix)."""
        import napari_wpp
        from napari_wpp.core.devices import resolve_device
        from napari_wpp.core.inference import model_scale

        s = self.settings
        layer = self._input_layer()
        state, model_file = self._model_state()
        q = model_scale(state.model)
        resolve_device(s.device)
        data = full_resolution(layer)
        dtype = np.dtype(data.dtype)
        if dtype.kind not in "uif":
            raise InputError(
                f"layer {layer.name!r} has dtype {dtype}: use an integer or float greyscale image"
            )
        index, rows, cols = self._region(layer)
        ndim = len(data.shape)
        if index is None:
            region = data[rows, cols]
            start: list[int] = [rows.start, cols.start]
        else:
            region = data[index, rows, cols]
            start = [index, rows.start, cols.start]
        scale = tuple(float(v) for v in layer.scale)
        crop_translate = offset_translate(scale, tuple(float(v) for v in layer.translate), start)
        out_scale, out_translate = superresolved_geometry(
            scale, crop_translate, q, grown_axes(ndim, 0)
        )
        plane_shape = (q * (rows.stop - rows.start), q * (cols.stop - cols.start))
        truth = None
        truth_name = s.truth_layer
        if truth_name:
            truth_layer = self._layer(truth_name, "ground-truth layer")
            t_index = truth_index(truth_layer, out_scale, out_translate, plane_shape)
            truth = full_resolution(truth_layer)[t_index]
        names = output_names(layer.name)
        provenance: dict[str, Any] = {
            "role": "superresolved",
            "source": layer.name,
            "model_kind": state.kind,
            "model_config": dict(state.model_config),
            "model_file": model_file,
            "model_step": int(state.step),
            "scale": q,
            "operator": state.operator,
            "axis": 0 if index is not None else None,
            "slice": index,
            "region": {
                "rows": [rows.start, rows.stop],
                "columns": [cols.start, cols.stop],
                "shapes": s.region_shapes or None,
            },
            "k": int(s.k),
            "temperature": float(s.temperature),
            "seed": int(s.seed),
            "tile": int(s.tile) or None,
            "ground_truth": truth_name or None,
            "version": napari_wpp.__version__,
        }
        where = f"rows {rows.start}–{rows.stop - 1}, columns {cols.start}–{cols.stop - 1}"
        if index is not None:
            where = f"slice {index}, {where}"
        return {
            "layer_name": layer.name,
            "names": names,
            "model": state.model,
            "region": region,
            "volume": data,
            "recorded_normalisation": state.normalisation,
            "k": int(s.k),
            "slice_index": 0 if index is None else int(index),
            "truth": truth,
            "truth_name": truth_name,
            "ndim": ndim,
            "out_scale": out_scale,
            "out_translate": out_translate,
            "keep_samples": bool(s.keep_samples),
            "contrast_limits": tuple(float(v) for v in layer.contrast_limits),
            "provenance": provenance,
            "what": f"{layer.name} ({where})",
        }

    def cancel(self) -> None:
        """Stop the running job after the current batch of samples (no layer is changed)."""
        self._request_stop()

    # ------------------------------------------------------------------ worker events
    def _on_event(self, item: Any) -> None:
        from napari_wpp.core.inference import SamplingProgress

        run = self._run
        if isinstance(item, WorkerFailure):
            run["failed"] = True
            notify_error(item.error)
        elif isinstance(item, SamplingProgress):
            self.progress_bar.setValue(int(item.done))
            if self._progress is not None:
                self._progress.set(int(item.done))
            self.status_label.setText(
                f"Sample {item.done} / {item.total} · {item.elapsed_s:.1f} s"
            )
        elif isinstance(item, UncertaintyFinished):
            run["finished"] = item
            if item.maps is not None:
                self._show_maps(item.maps)

    def _show_maps(self, maps: UncertaintyMaps) -> None:
        run = self._run
        names = run["names"]
        base = dict(run["provenance"])
        base["normalisation"] = maps.normalisation
        base["normalisation_from"] = maps.normalisation_from

        def placed(array: np.ndarray) -> np.ndarray:
            return array if run["ndim"] == 2 else np.expand_dims(array, -3)

        def meta(statistic: str, **extra: Any) -> dict[str, Any]:
            return {PROVENANCE_KEY: {**base, "statistic": statistic, **extra}}

        scale, translate = run["out_scale"], run["out_translate"]
        std_high = maps.max_std if maps.max_std > 0 else 1.0
        try:
            if maps.samples is not None:
                lead_scale, lead_translate = (1.0, *scale), (0.0, *translate)
                add_or_update_image(
                    self.viewer,
                    names["samples"],
                    placed(maps.samples),
                    scale=lead_scale,
                    translate=lead_translate,
                    metadata=meta("samples", sample_axis=0),
                    contrast_limits=run["contrast_limits"],
                    colormap="gray",
                )
            else:
                self._remove_stale(names["samples"])
            mean_layer = add_or_update_image(
                self.viewer,
                names["mean"],
                placed(maps.mean),
                scale=scale,
                translate=translate,
                metadata=meta("mean"),
                contrast_limits=run["contrast_limits"],
                colormap="gray",
            )
            std_layer = add_or_update_image(
                self.viewer,
                names["std"],
                placed(maps.std),
                scale=scale,
                translate=translate,
                metadata=meta("std", units="input intensity"),
                contrast_limits=(0.0, std_high),
                colormap="magma",
            )
            std_layer.colormap = "magma"
            std_layer.blending = self._std_blending()
        except Exception as exc:  # noqa: BLE001 - e.g. the viewer is closing
            run["failed"] = True
            notify_error(exc)
            return
        self.last_maps = maps
        run["layer"] = mean_layer
        self._show_statistics()

    def _remove_stale(self, name: str) -> None:
        """Remove a samples layer of an earlier run (its samples no longer match)."""
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            info = (getattr(layer, "metadata", None) or {}).get(PROVENANCE_KEY, {})
            if isinstance(info, dict) and info.get("statistic") == "samples":
                self.viewer.layers.remove(layer)

    def _on_finished(self) -> None:
        self.worker = None
        self._close_progress()
        run = self._run
        finished = run.get("finished")
        layer = run.get("layer")
        if layer is not None and finished is not None:
            self.progress_bar.setValue(self.progress_bar.maximum())
            self.status_label.setText(
                f"Done in {finished.elapsed_s:.1f} s: {run['k']} samples of {run['what']}"
            )
        elif finished is not None and finished.stopped_early:
            self.status_label.setText("Cancelled: no layer was changed.")
        elif run.get("failed"):
            self.status_label.setText("Sampling failed (see the notification).")
        self._update_controls()
        self.uncertainty_finished.emit(layer)

    # ------------------------------------------------------------------ dialogs
    def _choose_model_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "WPPFlow model file", "", "Model files (*.safetensors);;All files (*)"
        )
        if path:
            self.load_model(path)
