"""The "Superresolve" dock widget: apply a trained model to an image layer, slice by slice.

The model is the session's (``session.model``, trained or loaded in the Train widget) or one
read from a model file. The widget runs :func:`napari_wpp.jobs.predict.superresolve_job`, the
job of ``napari-wpp predict`` (in memory, or into a zarr array for stacks too large for
memory), in a napari thread worker, with progress (also in napari's activity dock) and Cancel.

Intensities are handled by the job's one rule (:func:`napari_wpp.jobs.predict.
input_normalisation`, computed on the whole layer even when one slice is run) and the result
has the input's dtype. The output layer ``"<source> superresolved"`` overlays the source (scale
``s / q``, translate ``t − s·(q − 1) / (2q)`` on the superresolved axes, see
:mod:`napari_wpp.widgets._layers`), carries its provenance in ``metadata["napari_wpp"]`` and is
updated in place when the widget runs again. A zarr result is shown lazily (dask).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from psygnal import evented
from qtpy.QtCore import QSignalBlocker, Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from napari_wpp.core.config import PredictSpec, bounds
from napari_wpp.core.errors import InputError
from napari_wpp.jobs.predict import (
    NormalisationChosen,
    OutputWritten,
    PredictSource,
    PredictTarget,
    superresolve_job,
)
from napari_wpp.widgets._form import choice_combo, form_layout, note_label, scrolled_column
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
    "SuperresolveSettings",
    "SuperresolveWidget",
    "output_name",
]

MODEL_SOURCES = (("session", "This session's model"), ("file", "Model file"))
EXTENTS = (("slice", "Current slice"), ("stack", "Whole stack"))
MODEL_NAMES = {"wppnet": "WPPNet", "wppflow": "WPPFlow"}
_NONE = ""


def output_name(source: str) -> str:
    """Name of the superresolved layer of the layer ``source``."""
    return f"{source} superresolved"


# --------------------------------------------------------------------------- settings
@evented
@dataclass
class SuperresolveSettings:
    """The Superresolve widget's choices.

    Parameters
    ----------
    model_source
        ``"session"`` (the session's model) or ``"file"`` (``model_file``).
    model_file
        Path of a ``.safetensors`` model file.
    input_layer
        Name of the image layer to superresolve (2D image or 3D stack).
    axis
        Slice axis of a 3D stack (the other two axes are superresolved).
    extent
        ``"slice"``: only the slice shown in the viewer; ``"stack"``: every slice.
    tile
        Tile side in LR pixels for slices too large for memory at once (0: whole slices).
    batch_size
        Slices per forward pass (and per zarr chunk).
    device
        ``"auto"``, ``"cpu"``, ``"cuda:i"`` or ``"mps"``.
    to_zarr, zarr_path
        Write a whole-stack result to this zarr array and show it lazily.
    """

    model_source: str = "session"
    model_file: str = ""
    input_layer: str = _NONE
    axis: int = PredictSpec.axis
    extent: str = "stack"
    tile: int = PredictSpec.tile or 0
    batch_size: int = PredictSpec.batch_size
    device: str = PredictSpec.device
    to_zarr: bool = False
    zarr_path: str = ""


# --------------------------------------------------------------------------- widget
class SuperresolveWidget(JobOwner, QWidget):
    """Dock widget: superresolve an image layer with the session's model or a model file.

    Public methods (used by the buttons and by scripts/tests): :meth:`run`, :meth:`cancel`,
    :meth:`load_model`, :meth:`shutdown`. Errors become napari notifications; the methods
    then return ``None``.

    Attributes
    ----------
    settings
        The widget's :class:`SuperresolveSettings`.
    session
        The viewer's shared :class:`~napari_wpp.widgets._session.WPPSession`.
    worker
        The running worker, or ``None``.
    superresolve_finished
        Qt signal emitted at the end of a run with the output layer (``None`` when the run
        failed or was cancelled).
    """

    superresolve_finished = Signal(object)

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session: WPPSession = session_for(getattr(napari_viewer, "__wrapped__", napari_viewer))
        self.settings = SuperresolveSettings()
        self.worker: StoppableWorker | None = None
        self._stop = threading.Event()
        self._file_state: TrainingState | None = None
        self._file_key: tuple[str, float] | None = None
        self._run: dict[str, Any] = {}
        self._progress: ActivityProgress | None = None
        self._build_ui()
        self._bind_settings()
        self._connect_viewer()
        self._refresh_layers()
        self._update_model_label()
        self._update_controls()
        self.destroyed.connect(lambda *_args, stop=self._stop: stop.set())

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        scrolled_column(
            self,
            [
                self._build_model_box(),
                self._build_input_box(),
                self._build_output_box(),
            ],
        )

    _form = staticmethod(form_layout)

    _combo = staticmethod(choice_combo)

    def _build_model_box(self) -> QGroupBox:
        box = QGroupBox("Model")
        form = self._form(box)
        self.source_combo = self._combo()
        for value, text in MODEL_SOURCES:
            self.source_combo.addItem(text, value)
        form.addRow("Use", self.source_combo)
        file_row = QHBoxLayout()
        self.file_edit = QLineEdit()
        self.file_edit.setPlaceholderText("model.safetensors")
        self.file_browse = QToolButton()
        self.file_browse.setText("…")
        self.file_browse.clicked.connect(self._choose_model_file)
        file_row.addWidget(self.file_edit, 1)
        file_row.addWidget(self.file_browse)
        form.addRow("File", file_row)
        self.model_label = note_label(selectable=True)
        form.addRow(self.model_label)
        return box

    def _build_input_box(self) -> QGroupBox:
        from napari_wpp.core.devices import available_devices

        box = QGroupBox("Input")
        form = self._form(box)
        self.layer_combo = self._combo()
        form.addRow("Image layer", self.layer_combo)
        self.axis_spin = QSpinBox()
        self.axis_spin.setRange(0, 2)
        self.axis_spin.setToolTip("Slice axis of a 3D stack; the two other axes are superresolved")
        form.addRow("Slice axis", self.axis_spin)
        self.extent_combo = self._combo()
        for value, text in EXTENTS:
            self.extent_combo.addItem(text, value)
        form.addRow("Superresolve", self.extent_combo)
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(0, bounds(PredictSpec, "tile")[1])
        self.tile_spin.setSpecialValueText("whole slices")
        self.tile_spin.setSuffix(" px")
        self.tile_spin.setToolTip("Tile side in LR pixels for slices too large at once")
        form.addRow("Tiles", self.tile_spin)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(*bounds(PredictSpec, "batch_size"))
        self.batch_spin.setToolTip("Slices per forward pass")
        form.addRow("Batch size", self.batch_spin)
        self.device_combo = self._combo()
        self.device_combo.addItem("auto", "auto")
        for name in available_devices():
            self.device_combo.addItem(name, name)
        form.addRow("Device", self.device_combo)
        return box

    def _build_output_box(self) -> QGroupBox:
        box = QGroupBox("Output")
        column = QVBoxLayout(box)
        self.zarr_check = QCheckBox("Write the stack to a zarr array (shown lazily)")
        self.zarr_check.setToolTip("For stacks too large for memory; only for the whole stack")
        column.addWidget(self.zarr_check)
        zarr_row = QHBoxLayout()
        self.zarr_edit = QLineEdit()
        self.zarr_edit.setPlaceholderText("result.zarr")
        self.zarr_browse = QToolButton()
        self.zarr_browse.setText("…")
        self.zarr_browse.clicked.connect(self._choose_zarr_path)
        zarr_row.addWidget(self.zarr_edit, 1)
        zarr_row.addWidget(self.zarr_browse)
        column.addLayout(zarr_row)
        buttons = QHBoxLayout()
        self.run_button = QPushButton("Superresolve")
        self.cancel_button = QPushButton("Cancel")
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        column.addLayout(buttons)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setTextVisible(True)
        self.progress_bar.setFormat("%v / %m slices")
        column.addWidget(self.progress_bar)
        self.status_label = QLabel("Ready.")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        column.addWidget(self.status_label)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        return box

    # ------------------------------------------------------------------ settings binding
    def _bind_settings(self) -> None:
        self._bind_combo(self.source_combo, "model_source")
        self._bind_combo(self.layer_combo, "input_layer")
        self._bind_combo(self.extent_combo, "extent")
        self._bind_combo(self.device_combo, "device")
        self._bind_spin(self.axis_spin, "axis")
        self._bind_spin(self.tile_spin, "tile")
        self._bind_spin(self.batch_spin, "batch_size")
        self._bind_text(self.file_edit, "model_file")
        self._bind_text(self.zarr_edit, "zarr_path")
        self.zarr_check.toggled.connect(lambda value: setattr(self.settings, "to_zarr", value))
        self.settings.events.to_zarr.connect(self._set_zarr_check)
        self._set_zarr_check(self.settings.to_zarr)
        for name in ("model_source", "model_file", "input_layer", "extent", "to_zarr"):
            getattr(self.settings.events, name).connect(self._update_controls)
        for name in ("model_source", "model_file"):
            getattr(self.settings.events, name).connect(self._update_model_label)
        self.session.events.model.connect(self._update_model_label)
        self.session.events.model_path.connect(self._update_model_label)

    def _set_zarr_check(self, value: bool) -> None:
        with QSignalBlocker(self.zarr_check):
            self.zarr_check.setChecked(bool(value))

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

    def _bind_spin(self, spin: QSpinBox, name: str) -> None:
        def to_widget(value: Any) -> None:
            with QSignalBlocker(spin):
                spin.setValue(int(value))

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

    def _candidates(self) -> list[Any]:
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
        layers = self._candidates()
        names = [layer.name for layer in layers]
        current = self.settings.input_layer
        by_role = {layer_role(layer): layer.name for layer in layers}
        default = by_role.get("lr", names[0] if names else _NONE)
        value = current if current in names else default
        with QSignalBlocker(self.layer_combo):
            self.layer_combo.clear()
            if not names:
                self.layer_combo.addItem("(no image layer)", _NONE)
            for name in names:
                self.layer_combo.addItem(name, name)
            self.layer_combo.setCurrentIndex(max(self.layer_combo.findData(value), 0))
        if value != current:
            self.settings.input_layer = value
        self._update_controls()

    def _input_layer(self) -> Any:
        from napari.layers import Image

        name = self.settings.input_layer
        if not name or name not in self.viewer.layers:
            raise InputError("no input layer chosen: open an image or stack and choose it")
        layer = self.viewer.layers[name]
        if not isinstance(layer, Image) or layer.rgb:
            raise InputError(f"layer {name!r} is not a greyscale image layer: choose another")
        ndim = len(full_resolution(layer).shape)
        if ndim not in (2, 3):
            raise InputError(
                f"input layer {name!r} is {ndim}D: choose a 2D image or a 3D stack (Z, Y, X)"
            )
        return layer

    # ------------------------------------------------------------------ labels and controls
    def _update_controls(self, *_args: Any) -> None:
        running = self.worker is not None
        name = self.settings.input_layer
        ndim = 0
        if name and name in self.viewer.layers:
            ndim = len(getattr(full_resolution(self.viewer.layers[name]), "shape", ()))
        stack = ndim == 3
        self.axis_spin.setEnabled(stack and not running)
        self.extent_combo.setEnabled(stack and not running)
        whole = not stack or self.settings.extent == "stack"
        self.zarr_check.setEnabled(whole and not running)
        zarr = whole and self.settings.to_zarr
        self.zarr_edit.setEnabled(zarr and not running)
        self.zarr_browse.setEnabled(zarr and not running)
        from_file = self.settings.model_source == "file"
        self.file_edit.setEnabled(from_file and not running)
        self.file_browse.setEnabled(from_file and not running)
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running and not self._stop.is_set())

    def _update_model_label(self, *_args: Any) -> None:
        if self.settings.model_source == "session":
            state = self.session.model
            if state is None:
                self.model_label.setText("No model in this session yet: train or load one.")
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
        kind = MODEL_NAMES.get(state.kind, state.kind)
        self.model_label.setText(f"{kind} ×{scale}, {state.step} steps\n{origin}")

    def _current_file_key(self) -> tuple[str, float] | None:
        path = Path(self.settings.model_file.strip()).expanduser()
        try:
            return (str(path.resolve()), path.stat().st_mtime)
        except OSError:
            return None

    def _file_key_matches(self) -> bool:
        return self._file_state is not None and self._file_key == self._current_file_key()

    # ------------------------------------------------------------------ model
    def load_model(self, path: str | Path) -> TrainingState | None:
        """Read a model file and use it (``model_source`` becomes ``"file"``).

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
        """The model to run and its file (``None`` for an unsaved session model)."""
        from napari_wpp.io import load_model

        if self.settings.model_source == "session":
            state = self.session.model
            if state is None:
                raise InputError(
                    "no model in this session: train one (Train widget) or choose a model file"
                )
            return state, self.session.model_path
        text = self.settings.model_file.strip()
        if not text:
            raise InputError("no model file chosen: choose a .safetensors model file")
        if not self._file_key_matches():
            self._file_state = load_model(Path(text).expanduser(), device="cpu")
            self._file_key = self._current_file_key()
            self._update_model_label()
        assert self._file_state is not None
        return self._file_state, str(Path(text).expanduser().resolve())

    # ------------------------------------------------------------------ running
    def run(self) -> StoppableWorker | None:
        """Superresolve the chosen layer (current slice or whole stack) in a thread worker.

        Returns
        -------
        StoppableWorker or None
            The started worker, or ``None`` after a notification.
        """
        if self.worker is not None:
            notify_error(InputError("superresolution is already running: wait or cancel it"))
            return None
        try:
            run = self._prepare_run()
        except Exception as exc:  # noqa: BLE001 - notification
            notify_error(exc)
            return None
        self._stop.clear()
        self._run = run
        self.progress_bar.setRange(0, max(run["slices"], 1))
        self.progress_bar.setValue(0)
        self.status_label.setText(f"Superresolving {run['what']}…")
        self._open_progress(run)
        self.worker = start_job(
            superresolve_job,
            run["spec"],
            run["model"],
            run["recorded_normalisation"],
            run["source"],
            run["target"],
            self._stop,
            stop=self._stop,
            on_yield=self._on_event,
            on_finish=self._on_finished,
            name="napari-wpp superresolution",
        )
        self._update_controls()
        return self.worker

    def _prepare_run(self) -> dict[str, Any]:
        """Collect and check everything a run needs (raises ``InputError`` with the fix)."""
        import napari_wpp
        from napari_wpp.core.devices import resolve_device
        from napari_wpp.core.inference import model_scale

        layer = self._input_layer()
        state, model_file = self._model_state()
        model = state.model
        q = model_scale(model)
        resolve_device(self.settings.device)
        data = full_resolution(layer)
        ndim = len(data.shape)
        dtype = np.dtype(data.dtype)
        if dtype.kind not in "uif":
            raise InputError(
                f"layer {layer.name!r} has dtype {dtype}: use an integer or float greyscale image"
            )
        axis = int(self.settings.axis) if ndim == 3 else 0
        if ndim == 3 and not 0 <= axis < 3:
            raise InputError(f"slice axis {axis} is out of range: use 0, 1 or 2")
        whole = ndim == 2 or self.settings.extent == "stack"
        index = None
        scale = tuple(float(v) for v in layer.scale)
        translate = tuple(float(v) for v in layer.translate)
        if whole:
            run_data = data
            slices = 1 if ndim == 2 else int(data.shape[axis])
            what = layer.name if ndim == 2 else f"{slices} slices of {layer.name}"
        else:
            index = current_index(layer, self.viewer, axis)
            selector: list[Any] = [slice(None)] * 3
            selector[axis] = index
            run_data = data[tuple(selector)]  # lazy for dask; read in the worker
            slices = 1
            start = [0, 0, 0]
            start[axis] = index
            translate = offset_translate(scale, translate, start)
            what = f"slice {index} (axis {axis}) of {layer.name}"
        tile = int(self.settings.tile) or None
        zarr_out = zarr_in = None
        provenance: dict[str, Any] = {
            "role": "superresolved",
            "source": layer.name,
            "model_kind": state.kind,
            "model_config": dict(state.model_config),
            "model_file": model_file,
            "model_step": int(state.step),
            "scale": q,
            "operator": state.operator,
            "axis": axis if ndim == 3 else None,
            "slice": index,
            "tile": tile,
            "version": napari_wpp.__version__,
        }
        if whole and self.settings.to_zarr:
            zarr_out, zarr_in = self._zarr_paths(layer, data)
            provenance["zarr"] = str(zarr_out)
        spec = PredictSpec(
            axis=axis,
            tile=tile,
            batch_size=int(self.settings.batch_size),
            device=self.settings.device,
        )
        source = PredictSource(
            data=run_data,
            name=str(zarr_in.resolve()) if zarr_in is not None else layer.name,
            zarr_path=zarr_in,
            pixel_size=scale,
            volume=data,
        )
        target = PredictTarget(
            path=zarr_out,
            provenance={"model_file": model_file, "model_step": int(state.step)},
        )
        return {
            "layer_name": layer.name,
            "model": model,
            "spec": spec,
            "source": source,
            "target": target,
            "ndim": ndim,
            "axis": axis,
            "index": index,
            "recorded_normalisation": state.normalisation,
            "zarr_out": zarr_out,
            "slices": slices,
            "what": what,
            "scale_factor": q,
            "layer_scale": scale,
            "layer_translate": translate,
            "contrast_limits": tuple(float(v) for v in layer.contrast_limits),
            "provenance": provenance,
        }

    def _zarr_paths(self, layer: Any, data: Any) -> tuple[Path, Path | None]:
        """The zarr output path and, when the layer comes from a zarr array, its path."""
        text = self.settings.zarr_path.strip()
        if not text:
            raise InputError("no zarr output chosen: give a path ending in .zarr")
        out = Path(text).expanduser()
        if out.suffix.lower() != ".zarr":
            raise InputError(f"zarr output {out.name} must end in .zarr: e.g. result.zarr")
        if not out.parent.is_dir():
            raise InputError(f"folder {out.parent} does not exist: create it or choose another")
        source_path = getattr(getattr(layer, "source", None), "path", None)
        zarr_in = None
        if source_path:
            candidate = Path(str(source_path)).expanduser()
            if candidate.is_dir() and candidate.suffix.lower() == ".zarr":
                from napari_wpp.io import open_zarr_array

                try:
                    array = open_zarr_array(candidate)
                except InputError:
                    array = None
                if array is not None and tuple(array.shape) == tuple(data.shape):
                    zarr_in = candidate
        if zarr_in is not None and out.resolve() == zarr_in.resolve():
            raise InputError(f"zarr output {out} is the input: choose another path")
        return out, zarr_in

    def _open_progress(self, run: dict[str, Any]) -> None:
        self._close_progress()
        self._progress = ActivityProgress(run["slices"], "Superresolving")

    def cancel(self) -> None:
        """Stop the running superresolution after the current batch (no layer is changed)."""
        self._request_stop()

    # ------------------------------------------------------------------ worker events
    def _on_event(self, item: Any) -> None:
        from napari_wpp.core.inference import InferenceFinished, InferenceProgress

        run = self._run
        if isinstance(item, WorkerFailure):
            run["failed"] = True
            notify_error(item.error)
        elif isinstance(item, NormalisationChosen):
            run["provenance"]["normalisation"] = item.normalisation
            run["provenance"]["normalisation_from"] = item.how
        elif isinstance(item, InferenceProgress):
            self.progress_bar.setValue(int(item.done) if run["slices"] > 1 else 1)
            if self._progress is not None:
                self._progress.set(int(item.done))
            self.status_label.setText(
                f"Slice {item.done} / {item.total} · {item.elapsed_s:.1f} s"
            )
        elif isinstance(item, InferenceFinished):
            run["finished"] = item
            if not item.stopped_early and item.result is not None:
                self._show_result(item.result)
        elif isinstance(item, OutputWritten):
            self._show_zarr(item.paths["result"])

    def _geometry(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        run = self._run
        grow = grown_axes(run["ndim"], run["axis"])
        return superresolved_geometry(
            run["layer_scale"], run["layer_translate"], run["scale_factor"], grow
        )

    def _show_result(self, result: Any) -> None:
        run = self._run
        data = result
        if run["index"] is not None:
            data = np.expand_dims(result, run["axis"])
        self._set_output(data)

    def _show_zarr(self, path: Path) -> None:
        import dask.array as da

        from napari_wpp.io import open_zarr_array

        array = open_zarr_array(path)
        self._set_output(da.from_zarr(array))

    def _set_output(self, data: Any) -> None:
        run = self._run
        scale, translate = self._geometry()
        try:
            layer = add_or_update_image(
                self.viewer,
                output_name(run["layer_name"]),
                data,
                scale=scale,
                translate=translate,
                metadata={PROVENANCE_KEY: dict(run["provenance"])},
                contrast_limits=run["contrast_limits"],
                colormap="gray",
            )
        except Exception as exc:  # noqa: BLE001 - notification
            run["failed"] = True
            notify_error(exc)
            return
        run["layer"] = layer

    def _on_finished(self) -> None:
        self.worker = None
        self._close_progress()
        run = self._run
        finished = run.get("finished")
        layer = run.get("layer")
        if layer is not None:
            self.progress_bar.setValue(self.progress_bar.maximum())
            where = f" ({run['zarr_out']})" if run.get("zarr_out") else ""
            shape = " × ".join(str(n) for n in layer.data.shape)
            self.status_label.setText(
                f"Done in {finished.elapsed_s:.1f} s: {layer.name}\n{shape} {layer.data.dtype}"
                f"{where}"
            )
        elif finished is not None and finished.stopped_early:
            self.status_label.setText("Cancelled: no layer was changed.")
        elif run.get("failed"):
            self.status_label.setText("Superresolution failed (see the notification).")
        self._update_controls()
        self.superresolve_finished.emit(layer)

    # ------------------------------------------------------------------ dialogs
    def _choose_model_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Model file", "", "Model files (*.safetensors);;All files (*)"
        )
        if path:
            self.load_model(path)

    def _choose_zarr_path(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Write the result to", "result.zarr", "")
        if path:
            if Path(path).suffix.lower() != ".zarr":
                path += ".zarr"
            self.settings.zarr_path = path
