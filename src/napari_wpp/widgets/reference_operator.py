"""The "Reference & operator" dock widget: HR reference region and forward operator.

The widget keeps its own choices in :class:`ReferenceOperatorState` (an evented dataclass)
and writes what it produces into the viewer's shared
:class:`~napari_wpp.widgets._session.WPPSession`:

* ``session.reference``: an HR image layer (2D or 3D), optionally cut by a Shapes rectangle
  (mapped through the layers' world/data transforms, so scaled or translated layers work)
  and a slice range, normalised to [0, 1];
* ``session.operator``: the same :class:`~napari_wpp.core.operators.GaussianDownsampling`
  the CLI builds from ``--scale/--sigma/--kernel-size/--anchor/--padding``, or the
  :class:`~napari_wpp.core.operators.FourierDownsampling` estimated (in a napari thread
  worker) from a registered HR/LR pair, as ``napari-wpp estimate-operator`` does.

Operators save and load as the CLI's operator JSON.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from psygnal import evented
from qtpy.QtCore import QSignalBlocker, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QWidget,
)

from napari_wpp.core.errors import InputError
from napari_wpp.data import default_sigma
from napari_wpp.widgets._form import choice_combo, form_layout, note_label, scrolled_column
from napari_wpp.widgets._notify import notify_error
from napari_wpp.widgets._session import ReferenceSelection, WPPSession, session_for

if TYPE_CHECKING:
    import napari

    from napari_wpp.core.operators import (
        ForwardOperator,
        GaussianDownsampling,
        OperatorEstimate,
    )

__all__ = [
    "PATCH_SIZE",
    "ReferenceOperatorState",
    "ReferenceOperatorWidget",
    "pair_regions",
    "rectangle_world_box",
    "reference_region",
    "world_box_to_slices",
]

#: Side of the patches whose distribution the WPP prior matches.
PATCH_SIZE = 6
#: Downsampling factors offered in the widget (others are added when an operator is loaded).
SCALES = (2, 3, 4, 6, 8)
ANCHORS = (("center", "center (default)"), ("corner", "corner (published data)"))
PADDINGS = ("circular", "reflect", "zeros")
#: Kernel sides the CLI uses by default (``degrade``/``train`` and ``estimate-operator``).
PARAMETRIC_KERNEL_SIZE = 16
ESTIMATED_KERNEL_SIZE = 15
_EPS = 1e-6
_NONE = ""


# --------------------------------------------------------------------------- state
@evented
@dataclass
class ReferenceOperatorState:
    """The widget's own choices (layer names, region, operator parameters).

    Layer fields hold layer names; ``""`` means "none" (for Shapes: the whole image).

    Parameters
    ----------
    reference_layer, reference_shapes
        HR image layer of the reference and the Shapes layer whose rectangle cuts it.
    slice_start, slice_stop
        First and last slice (inclusive, data indices on axis 0) of a 3D reference.
    scale, sigma, kernel_size, anchor, padding
        Parameters of the parametric Gaussian operator (as the CLI's operator flags).
    pair_hr_layer, pair_lr_layer, pair_hr_shapes, pair_lr_shapes
        The registered HR/LR pair for estimation and their optional rectangles.
    pair_scale, pair_kernel_size
        Scale and kernel side of the estimated operator.
    """

    reference_layer: str = _NONE
    reference_shapes: str = _NONE
    slice_start: int = 0
    slice_stop: int = 0
    scale: int = 4
    sigma: float = default_sigma(4)
    kernel_size: int = PARAMETRIC_KERNEL_SIZE
    anchor: str = "center"
    padding: str = "circular"
    pair_hr_layer: str = _NONE
    pair_lr_layer: str = _NONE
    pair_hr_shapes: str = _NONE
    pair_lr_shapes: str = _NONE
    pair_scale: int = 4
    pair_kernel_size: int = ESTIMATED_KERNEL_SIZE

    def parametric_operator(self) -> GaussianDownsampling:
        """The Gaussian operator of the current parameters (what the CLI builds).

        Raises
        ------
        InputError
            Invalid parameters (the message names the fix).
        """
        from napari_wpp.core.operators import GaussianDownsampling

        return GaussianDownsampling(
            int(self.scale),
            float(self.sigma),
            kernel_size=int(self.kernel_size),
            anchor=self.anchor,
            padding=self.padding,
        )


# --------------------------------------------------------------------------- geometry
def full_resolution(layer: Any) -> Any:
    """The full-resolution data of an image layer (level 0 of a multiscale layer)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def rectangle_world_box(shapes: Any) -> np.ndarray:
    """World bounds ``[[y0, x0], [y1, x1]]`` (last two axes) of a rectangle of a Shapes layer.

    The first selected rectangle is used, else the last one drawn.

    Raises
    ------
    InputError
        The layer has no rectangle.
    """
    rectangles = [i for i, kind in enumerate(shapes.shape_type) if kind == "rectangle"]
    if not rectangles:
        raise InputError(
            f"Shapes layer {shapes.name!r} has no rectangle: draw one with its rectangle tool"
        )
    selected = [i for i in sorted(shapes.selected_data) if i in rectangles]
    index = selected[0] if selected else rectangles[-1]
    vertices = np.asarray(shapes.data[index], dtype=np.float64)
    world = np.array([np.asarray(shapes.data_to_world(v), dtype=np.float64) for v in vertices])
    world = world[:, -2:]
    return np.stack([world.min(axis=0), world.max(axis=0)])


def world_box_to_slices(layer: Any, box: np.ndarray) -> tuple[slice, slice]:
    """Pixel rows and columns of ``layer`` whose centres lie in a world box.

    Parameters
    ----------
    layer
        Image layer (its last two axes are the image plane).
    box
        ``[[y0, x0], [y1, x1]]`` in world coordinates (last two world axes).

    Returns
    -------
    tuple of slice
        Half-open pixel ranges ``[ceil(d0), ceil(d1))`` of the box in data coordinates,
        clipped to the layer (empty where they do not overlap). A box of world size ``L``
        on a layer of scale ``s`` thus spans ``L / s`` pixels.
    """
    box = np.asarray(box, dtype=np.float64)
    corners = [(y, x) for y in box[:, 0] for x in box[:, 1]]
    data = np.array([np.asarray(layer.world_to_data(c), dtype=np.float64)[-2:] for c in corners])
    low, high = data.min(axis=0), data.max(axis=0)
    shape = full_resolution(layer).shape[-2:]
    slices = []
    for axis in range(2):
        start = min(max(0, math.ceil(low[axis] - _EPS)), shape[axis])
        stop = min(max(0, math.ceil(high[axis] - _EPS)), shape[axis])
        slices.append(slice(start, max(start, stop)))
    return slices[0], slices[1]


def _slices_world_box(layer: Any, rows: slice, cols: slice) -> np.ndarray:
    """World box covered by the pixels ``rows × cols`` of ``layer`` (their outer edges)."""
    corners = [
        (y, x)
        for y in (rows.start - 0.5, rows.stop - 0.5)
        for x in (cols.start - 0.5, cols.stop - 0.5)
    ]
    ndim = layer.ndim
    world = np.array(
        [
            np.asarray(layer.data_to_world([0.0] * (ndim - 2) + [y, x]), dtype=np.float64)[-2:]
            for y, x in corners
        ]
    )
    return np.stack([world.min(axis=0), world.max(axis=0)])


def _plane_shape(layer: Any) -> tuple[int, int]:
    shape = full_resolution(layer).shape
    return int(shape[-2]), int(shape[-1])


def reference_region(
    layer: Any, shapes: Any | None = None, slice_range: tuple[int, int] | None = None
) -> tuple[tuple[slice, ...], tuple[int, ...]]:
    """Index and shape of the reference region of an image layer.

    Parameters
    ----------
    layer
        2D or 3D image layer.
    shapes
        Optional Shapes layer whose rectangle (see :func:`rectangle_world_box`) cuts the
        image plane; ``None`` takes the whole plane.
    slice_range
        ``(first, last)`` slice of a 3D layer (inclusive, clipped); default all slices.

    Returns
    -------
    index, shape
        The numpy index into the layer data and the shape of the region.

    Raises
    ------
    InputError
        Not a 2D/3D greyscale image, or a rectangle outside the image.
    """
    data = full_resolution(layer)
    if getattr(layer, "rgb", False) or len(data.shape) not in (2, 3):
        raise InputError(
            f"layer {layer.name!r} has shape {tuple(data.shape)}: choose a 2D or 3D greyscale "
            "image layer as reference"
        )
    height, width = _plane_shape(layer)
    if shapes is None:
        rows, cols = slice(0, height), slice(0, width)
    else:
        rows, cols = world_box_to_slices(layer, rectangle_world_box(shapes))
        if rows.stop <= rows.start or cols.stop <= cols.start:
            raise InputError(
                f"the rectangle of {shapes.name!r} does not overlap layer {layer.name!r}: "
                "draw it over the image"
            )
    if len(data.shape) == 2:
        index: tuple[slice, ...] = (rows, cols)
        return index, (rows.stop - rows.start, cols.stop - cols.start)
    depth = int(data.shape[0])
    first, last = (0, depth - 1) if slice_range is None else slice_range
    first, last = sorted((int(first), int(last)))
    first, last = max(0, first), min(depth - 1, last)
    if last < first:
        raise InputError(
            f"slice range is outside layer {layer.name!r} (0–{depth - 1}): choose slices in it"
        )
    index = (slice(first, last + 1), rows, cols)
    return index, (last - first + 1, rows.stop - rows.start, cols.stop - cols.start)


def pair_regions(
    hr_layer: Any,
    lr_layer: Any,
    hr_box: np.ndarray | None = None,
    lr_box: np.ndarray | None = None,
) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Image-plane crops of a registered HR/LR pair.

    With no box both layers are used whole; with one box (of either layer) the LR crop is the
    LR pixels whose centres lie in it and the HR crop is the HR pixels under those LR pixels,
    so the crops stay registered and their sizes differ by the scale exactly; with two boxes
    each layer is cut by its own.

    Returns
    -------
    (hr_rows, hr_cols), (lr_rows, lr_cols)

    Raises
    ------
    InputError
        A box that does not overlap its layer.
    """
    if hr_box is None and lr_box is None:
        (h, w), (lh, lw) = _plane_shape(hr_layer), _plane_shape(lr_layer)
        return (slice(0, h), slice(0, w)), (slice(0, lh), slice(0, lw))
    if hr_box is not None and lr_box is not None:
        hr_crop = world_box_to_slices(hr_layer, hr_box)
        lr_crop = world_box_to_slices(lr_layer, lr_box)
    else:
        box = hr_box if hr_box is not None else lr_box
        lr_crop = world_box_to_slices(lr_layer, box)
        if all(s.stop > s.start for s in lr_crop):
            hr_crop = world_box_to_slices(hr_layer, _slices_world_box(lr_layer, *lr_crop))
        else:
            hr_crop = lr_crop
    for crop, layer in ((hr_crop, hr_layer), (lr_crop, lr_layer)):
        if any(s.stop <= s.start for s in crop):
            raise InputError(
                f"the rectangle does not overlap layer {layer.name!r}: draw it over both "
                "layers, or draw one rectangle for each"
            )
    return hr_crop, lr_crop


def _current_slice(layer: Any, viewer: Any) -> int:
    """Data index on axis 0 of the slice of a 3D layer shown in the viewer."""
    depth = int(full_resolution(layer).shape[0])
    position = np.asarray(layer.world_to_data(viewer.dims.point), dtype=np.float64)
    return int(min(max(round(float(position[0])), 0), depth - 1))


def _estimate_job(
    hr_plane: Any, lr_plane: Any, hr_crop: tuple, lr_crop: tuple, scale: int, kernel_size: int
) -> Any:
    """Worker body: normalise the pair as the CLI does and estimate the operator.

    Returns the :class:`~napari_wpp.core.operators.OperatorEstimate`, or the exception, so
    that the widget turns every failure into a notification (not a traceback dialog).
    """
    from napari_wpp.core.intensity import Normalisation
    from napari_wpp.core.operators import estimate_operator

    try:
        hr = np.asarray(hr_plane)
        lr = np.asarray(lr_plane)
        hr_n = Normalisation.from_array(hr).apply(hr[hr_crop])
        lr_n = Normalisation.from_array(lr).apply(lr[lr_crop])
        return estimate_operator(hr_n, lr_n, scale, kernel_size=kernel_size)
    except Exception as exc:  # noqa: BLE001 - handed to the GUI thread as a notification
        return exc


def describe_operator(operator: Any) -> str:
    """One-line description of a forward operator for the widget."""
    data = operator.to_dict()
    if data.get("kind") == "gaussian":
        sigma = data["sigma"]
        values = sigma if isinstance(sigma, list) else [sigma]
        sigma_text = "/".join(f"{s:g}" for s in values)
        return (
            f"Gaussian ×{data['scale']}, σ {sigma_text} px, kernel {data['kernel_size']}, "
            f"{data['anchor']}, {data['padding']}"
        )
    if data.get("kind") == "fourier":
        kernel = np.asarray(data["kernel"])
        return (
            f"estimated ×{data['scale']}, kernel {kernel.shape[0]}×{kernel.shape[1]} "
            f"(sum {kernel.sum():.3f}), bias {data['bias']:.4f}"
        )
    return type(operator).__name__


def _disconnect_all(connections: Sequence[tuple[Any, Callable[..., Any]]]) -> None:
    """Disconnect ``(emitter, callback)`` pairs, ignoring those already gone."""
    for emitter, callback in connections:
        try:
            emitter.disconnect(callback)
        except (RuntimeError, ValueError, TypeError, KeyError):
            pass


def _role(layer: Any) -> str | None:
    meta = getattr(layer, "metadata", None) or {}
    info = meta.get("napari_wpp") if isinstance(meta, dict) else None
    return info.get("role") if isinstance(info, dict) else None


# --------------------------------------------------------------------------- widget
class ReferenceOperatorWidget(QWidget):
    """Dock widget: choose the HR reference and the forward operator of a session.

    Public methods (used by the buttons and by scripts/tests): :meth:`use_as_reference`,
    :meth:`use_parametric_operator`, :meth:`estimate`, :meth:`use_estimated_operator`,
    :meth:`save_operator`, :meth:`load_operator`, :meth:`patch_count`. Errors become napari
    notifications; the methods then return ``None``.

    Attributes
    ----------
    state
        The widget's :class:`ReferenceOperatorState`.
    session
        The viewer's shared :class:`~napari_wpp.widgets._session.WPPSession`.
    last_estimate
        The last :class:`~napari_wpp.core.operators.OperatorEstimate`, or ``None``.
    estimation_worker
        The running estimation worker, or ``None``.
    estimation_finished
        Qt signal emitted when an estimation ends, with the estimate or the exception.
    """

    estimation_finished = Signal(object)

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        # napari hands plugins a PublicOnlyProxy; key the session on the viewer itself so that
        # every widget of this viewer shares it however it was given the viewer
        self.session: WPPSession = session_for(getattr(napari_viewer, "__wrapped__", napari_viewer))
        self.state = ReferenceOperatorState()
        self.last_estimate: OperatorEstimate | None = None
        self.estimation_worker: Any = None
        self._estimate_source: dict[str, Any] = {}
        # connections to objects that outlive this widget (viewer, layers, session): dropped
        # when the Qt widget is destroyed, so no callback reaches a deleted widget
        self._external: list[tuple[Any, Callable[..., Any]]] = []
        self._watched: list[tuple[Any, Callable[..., Any]]] = []
        self._build_ui()
        self._bind_state()
        self._refresh_layer_choices()
        self._on_reference_layer_changed(self.state.reference_layer)
        self._connect_viewer()
        self._update_session_summary()
        external, watched = self._external, self._watched
        self.destroyed.connect(lambda *_: _disconnect_all(external + watched))

    # ------------------------------------------------------------------ UI construction
    def _build_ui(self) -> None:
        scrolled_column(
            self,
            [
                self._build_reference_box(),
                self._build_parametric_box(),
                self._build_estimation_box(),
                self._build_session_box(),
            ], spacing=10,
        )

    _form = staticmethod(form_layout)

    _hint = staticmethod(note_label)

    @staticmethod
    def _combo() -> QComboBox:
        return choice_combo(12)

    def _build_reference_box(self) -> QGroupBox:
        box = QGroupBox("Reference (high resolution)")
        form = self._form(box)
        self.reference_layer_combo = self._combo()
        self.reference_shapes_combo = self._combo()
        form.addRow("HR image", self.reference_layer_combo)
        form.addRow("Region", self.reference_shapes_combo)
        self.slice_start_spin = QSpinBox()
        self.slice_stop_spin = QSpinBox()
        self.current_slice_button = QPushButton("Current slice")
        self.current_slice_button.setToolTip("Use only the slice shown in the viewer")
        self.all_slices_button = QPushButton("All slices")
        slice_buttons = QWidget()
        buttons = QHBoxLayout(slice_buttons)
        buttons.setContentsMargins(0, 0, 0, 0)
        buttons.addWidget(self.current_slice_button)
        buttons.addWidget(self.all_slices_button)
        first_label, last_label = QLabel("First slice"), QLabel("Last slice")
        form.addRow(first_label, self.slice_start_spin)
        form.addRow(last_label, self.slice_stop_spin)
        form.addRow(slice_buttons)
        # shown only for a 3D reference layer
        self._slice_widgets = (
            first_label,
            self.slice_start_spin,
            last_label,
            self.slice_stop_spin,
            slice_buttons,
        )
        self.patch_label = QLabel()
        self.patch_label.setWordWrap(True)
        form.addRow(self.patch_label)
        self.use_reference_button = QPushButton("Use as reference")
        form.addRow(self.use_reference_button)
        self.use_reference_button.clicked.connect(self.use_as_reference)
        self.current_slice_button.clicked.connect(self._use_current_slice)
        self.all_slices_button.clicked.connect(self._use_all_slices)
        return box

    def _build_parametric_box(self) -> QGroupBox:
        box = QGroupBox("Operator: Gaussian blur + subsampling")
        form = self._form(box)
        self.scale_combo = self._combo()
        for q in SCALES:
            self.scale_combo.addItem(f"×{q}", q)
        self.sigma_spin = QDoubleSpinBox()
        self.sigma_spin.setRange(0.05, 64.0)
        self.sigma_spin.setDecimals(2)
        self.sigma_spin.setSingleStep(0.25)
        self.sigma_spin.setSuffix(" px")
        self.sigma_spin.setToolTip("Blur width in HR pixels (default scale / 2)")
        self.kernel_spin = QSpinBox()
        self.kernel_spin.setRange(1, 129)
        self.kernel_spin.setToolTip("Side of the square blur kernel in HR pixels")
        self.anchor_combo = self._combo()
        for value, text in ANCHORS:
            self.anchor_combo.addItem(text, value)
        self.padding_combo = self._combo()
        for value in PADDINGS:
            self.padding_combo.addItem(value, value)
        form.addRow("Scale", self.scale_combo)
        form.addRow("σ", self.sigma_spin)
        form.addRow("Kernel size", self.kernel_spin)
        form.addRow("Anchoring", self.anchor_combo)
        form.addRow("Padding", self.padding_combo)
        self.use_parametric_button = QPushButton("Use parametric operator")
        form.addRow(self.use_parametric_button)
        self.use_parametric_button.clicked.connect(self.use_parametric_operator)
        return box

    def _build_estimation_box(self) -> QGroupBox:
        box = QGroupBox("Operator: estimated from a registered pair")
        form = self._form(box)
        self.pair_hr_combo = self._combo()
        self.pair_hr_shapes_combo = self._combo()
        self.pair_lr_combo = self._combo()
        self.pair_lr_shapes_combo = self._combo()
        self.pair_scale_combo = self._combo()
        for q in SCALES:
            self.pair_scale_combo.addItem(f"×{q}", q)
        self.pair_kernel_spin = QSpinBox()
        self.pair_kernel_spin.setRange(1, 64)
        self.pair_kernel_spin.setToolTip("Side of the estimated kernel in HR pixels")
        form.addRow("HR image", self.pair_hr_combo)
        form.addRow("HR region", self.pair_hr_shapes_combo)
        form.addRow("LR image", self.pair_lr_combo)
        form.addRow("LR region", self.pair_lr_shapes_combo)
        form.addRow("Scale", self.pair_scale_combo)
        form.addRow("Kernel size", self.pair_kernel_spin)
        form.addRow(
            self._hint(
                "The LR image is HR / scale in size or resampled onto the HR grid. One "
                "rectangle cuts both layers where they overlay; 3D layers use the slice shown."
            )
        )
        self.estimate_button = QPushButton("Estimate")
        self.use_estimated_button = QPushButton("Use estimated operator")
        self.use_estimated_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.estimate_button)
        buttons.addWidget(self.use_estimated_button)
        form.addRow(buttons)
        self.estimate_label = QLabel("No estimate yet.")
        self.estimate_label.setWordWrap(True)
        form.addRow(self.estimate_label)
        self.estimate_button.clicked.connect(self.estimate)
        self.use_estimated_button.clicked.connect(self.use_estimated_operator)
        return box

    def _build_session_box(self) -> QGroupBox:
        box = QGroupBox("Session (shared by the napari-wpp widgets)")
        form = self._form(box)
        self.session_reference_label = QLabel()
        self.session_operator_label = QLabel()
        for label in (self.session_reference_label, self.session_operator_label):
            label.setWordWrap(True)
        form.addRow("Reference", self.session_reference_label)
        form.addRow("Operator", self.session_operator_label)
        buttons = QHBoxLayout()
        self.save_button = QPushButton("Save operator…")
        self.load_button = QPushButton("Load operator…")
        buttons.addWidget(self.save_button)
        buttons.addWidget(self.load_button)
        form.addRow(buttons)
        self.save_button.clicked.connect(self._save_dialog)
        self.load_button.clicked.connect(self._load_dialog)
        return box

    # ------------------------------------------------------------------ state binding
    def _bind_state(self) -> None:
        combos = {
            "reference_layer": self.reference_layer_combo,
            "reference_shapes": self.reference_shapes_combo,
            "scale": self.scale_combo,
            "anchor": self.anchor_combo,
            "padding": self.padding_combo,
            "pair_hr_layer": self.pair_hr_combo,
            "pair_lr_layer": self.pair_lr_combo,
            "pair_hr_shapes": self.pair_hr_shapes_combo,
            "pair_lr_shapes": self.pair_lr_shapes_combo,
            "pair_scale": self.pair_scale_combo,
        }
        for name, combo in combos.items():
            self._bind_combo(combo, name)
        spins = {
            "slice_start": self.slice_start_spin,
            "slice_stop": self.slice_stop_spin,
            "sigma": self.sigma_spin,
            "kernel_size": self.kernel_spin,
            "pair_kernel_size": self.pair_kernel_spin,
        }
        for name, spin in spins.items():
            self._bind_spin(spin, name)
        self.state.events.scale.connect(self._on_scale_changed)
        self.state.events.reference_layer.connect(self._on_reference_layer_changed)
        self.state.events.reference_shapes.connect(self._watch_reference_layers)
        for name in ("reference_shapes", "slice_start", "slice_stop"):
            getattr(self.state.events, name).connect(self._update_patch_label)
        self.state.events.pair_hr_layer.connect(self._guess_pair_scale)
        self.state.events.pair_lr_layer.connect(self._guess_pair_scale)
        self._connect(self.session.events.reference, self._update_session_summary)
        self._connect(self.session.events.operator, self._update_session_summary)

    def _bind_combo(self, combo: QComboBox, name: str) -> None:
        def to_state(_index: int) -> None:
            value = combo.currentData()
            if value is not None:
                setattr(self.state, name, value)

        combo.currentIndexChanged.connect(to_state)
        getattr(self.state.events, name).connect(lambda value: self._set_combo(combo, value))
        self._set_combo(combo, getattr(self.state, name))

    def _bind_spin(self, spin: QSpinBox | QDoubleSpinBox, name: str) -> None:
        spin.valueChanged.connect(lambda value: setattr(self.state, name, value))

        def to_widget(value: Any) -> None:
            with QSignalBlocker(spin):
                spin.setValue(value)

        getattr(self.state.events, name).connect(to_widget)
        to_widget(getattr(self.state, name))

    @staticmethod
    def _set_combo(combo: QComboBox, value: Any) -> None:
        index = combo.findData(value)
        if index < 0 and isinstance(value, int):  # a loaded operator's unusual scale
            combo.addItem(f"×{value}", value)
            index = combo.count() - 1
        if index >= 0 and index != combo.currentIndex():
            with QSignalBlocker(combo):
                combo.setCurrentIndex(index)

    # ------------------------------------------------------------------ viewer and layers
    def _connect_viewer(self) -> None:
        events = self.viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved, events.reordered):
            self._connect(emitter, self._on_layers_changed)
        for layer in self.viewer.layers:
            self._connect(layer.events.name, self._on_layers_changed)

    def _connect(self, emitter: Any, callback: Callable[..., Any]) -> None:
        emitter.connect(callback)
        self._external.append((emitter, callback))

    def _on_layers_changed(self, event: Any = None) -> None:
        kind = getattr(event, "type", None)
        if kind == "inserted":
            self._connect(event.value.events.name, self._on_layers_changed)
        elif kind == "removed":
            gone = [c for c in self._external if c[0] is event.value.events.name]
            _disconnect_all(gone)
            self._external[:] = [c for c in self._external if c not in gone]
        self._refresh_layer_choices()

    def _image_layers(self) -> list[Any]:
        from napari.layers import Image

        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Image)
            and not layer.rgb
            and len(full_resolution(layer).shape) in (2, 3)
        ]

    def _shapes_layers(self) -> list[Any]:
        from napari.layers import Shapes

        return [layer for layer in self.viewer.layers if isinstance(layer, Shapes)]

    def _refresh_layer_choices(self) -> None:
        images = self._image_layers()
        names = [layer.name for layer in images]
        shapes = [layer.name for layer in self._shapes_layers()]
        by_role = {_role(layer): layer.name for layer in images}
        reference_default = by_role.get("reference", names[0] if names else _NONE)
        hr_default = by_role.get("truth", reference_default)
        others = [n for n in names if n != hr_default]
        lr_default = by_role.get("lr", others[0] if others else hr_default)
        self._fill(self.reference_layer_combo, "reference_layer", names, reference_default)
        self._fill(self.pair_hr_combo, "pair_hr_layer", names, hr_default)
        self._fill(self.pair_lr_combo, "pair_lr_layer", names, lr_default)
        whole = "(whole image)"
        self._fill(self.reference_shapes_combo, "reference_shapes", shapes, _NONE, whole)
        self._fill(self.pair_hr_shapes_combo, "pair_hr_shapes", shapes, _NONE, whole)
        self._fill(self.pair_lr_shapes_combo, "pair_lr_shapes", shapes, _NONE, whole)
        self._watch_reference_layers()
        self._update_patch_label()

    def _fill(
        self,
        combo: QComboBox,
        name: str,
        choices: Sequence[str],
        default: str,
        none_text: str | None = None,
    ) -> None:
        """Refill a layer combo box, keeping the state's choice while that layer exists."""
        current = getattr(self.state, name)
        with QSignalBlocker(combo):
            combo.clear()
            if none_text is not None:
                combo.addItem(none_text, _NONE)
            elif not choices:
                combo.addItem("(no image layer)", _NONE)
            for choice in choices:
                combo.addItem(choice, choice)
        value = current if (current in choices or current == _NONE and none_text) else default
        if not choices and none_text is None:
            value = _NONE
        self._set_combo(combo, value)
        if value != current:
            setattr(self.state, name, value)

    def _layer(self, name: str, what: str) -> Any:
        if not name or name not in self.viewer.layers:
            raise InputError(f"no {what} layer chosen: open one in napari and choose it")
        return self.viewer.layers[name]

    def _watch(self, emitter: Any, callback: Callable[..., Any]) -> None:
        emitter.connect(callback)
        self._watched.append((emitter, callback))

    def _watch_reference_layers(self, *_args: Any) -> None:
        """Follow edits of the reference layer and its Shapes layer (for the patch count)."""
        _disconnect_all(self._watched)
        self._watched.clear()
        for name in (self.state.reference_layer, self.state.reference_shapes):
            if name and name in self.viewer.layers:
                events = self.viewer.layers[name].events
                for kind in ("data", "scale", "translate", "affine", "highlight"):
                    if hasattr(events, kind):
                        self._watch(getattr(events, kind), self._update_patch_label)

    def _on_reference_layer_changed(self, name: str) -> None:
        depth = 0
        if name and name in self.viewer.layers:
            shape = full_resolution(self.viewer.layers[name]).shape
            depth = int(shape[0]) if len(shape) == 3 else 0
        for spin in (self.slice_start_spin, self.slice_stop_spin):
            with QSignalBlocker(spin):
                spin.setRange(0, max(depth - 1, 0))
        for widget in self._slice_widgets:
            widget.setVisible(depth > 0)
        self._use_all_slices()
        self._watch_reference_layers()
        self._update_patch_label()

    def _use_all_slices(self) -> None:
        name = self.state.reference_layer
        shape: tuple[int, ...] = ()
        if name and name in self.viewer.layers:
            shape = tuple(full_resolution(self.viewer.layers[name]).shape)
        self.state.slice_start = 0
        self.state.slice_stop = max(int(shape[0]) - 1, 0) if len(shape) == 3 else 0

    def _use_current_slice(self) -> None:
        name = self.state.reference_layer
        if name and name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if len(full_resolution(layer).shape) == 3:
                index = _current_slice(layer, self.viewer)
                self.state.slice_start = self.state.slice_stop = index

    def _on_scale_changed(self, scale: int) -> None:
        self.state.sigma = default_sigma(scale)

    def _guess_pair_scale(self, *_args: Any) -> None:
        """Preset the estimation scale from the layers' pixel sizes (LR / HR, if integer)."""
        names = (self.state.pair_hr_layer, self.state.pair_lr_layer)
        if not all(name and name in self.viewer.layers for name in names):
            return
        hr, lr = (self.viewer.layers[name] for name in names)
        ratio = float(lr.scale[-1]) / float(hr.scale[-1])
        if ratio >= 2 and abs(ratio - round(ratio)) < 1e-6:
            self.state.pair_scale = int(round(ratio))

    # ------------------------------------------------------------------ reference
    def _reference_geometry(self) -> tuple[Any, tuple[slice, ...], tuple[int, ...]]:
        layer = self._layer(self.state.reference_layer, "HR image")
        shapes = None
        if self.state.reference_shapes:
            shapes = self._layer(self.state.reference_shapes, "Shapes")
        index, shape = reference_region(
            layer, shapes, (self.state.slice_start, self.state.slice_stop)
        )
        return layer, index, shape

    def patch_count(self) -> int:
        """Number of 6×6 patches of the current reference region (0 when it is too small).

        Raises
        ------
        InputError
            No layer chosen or a rectangle outside the image.
        """
        from napari_wpp.core.patches import count_patches

        _, _, shape = self._reference_geometry()
        return count_patches(shape, PATCH_SIZE)

    def _update_patch_label(self, *_args: Any) -> None:
        from napari_wpp.core.patches import count_patches

        try:
            _, _, shape = self._reference_geometry()
            count = count_patches(shape, PATCH_SIZE)
        except InputError as exc:
            self.patch_label.setText(str(exc))
            self.patch_label.setStyleSheet("color: #e8a33d;")
            return
        size = f"{shape[-2]}×{shape[-1]} px"
        if len(shape) == 3:
            size += f" × {shape[0]} slice{'s' if shape[0] != 1 else ''}"
        if count == 0:
            self.patch_label.setText(
                f"Region {size}: smaller than a {PATCH_SIZE}×{PATCH_SIZE} patch"
            )
            self.patch_label.setStyleSheet("color: #e8a33d;")
        else:
            self.patch_label.setText(
                f"Region {size} → {count:,} patches of {PATCH_SIZE}×{PATCH_SIZE}"
            )
            self.patch_label.setStyleSheet("")

    def use_as_reference(self) -> ReferenceSelection | None:
        """Cut, normalise and store the reference region in ``session.reference``.

        The normalisation is :meth:`Normalisation.from_array` of the whole layer data; the
        region is mapped to float32 [0, 1] with it (a single slice becomes a 2D array).

        Returns
        -------
        ReferenceSelection or None
            The new reference, or ``None`` after a notification (no layer, region smaller
            than a patch, ...).
        """
        from napari_wpp.core.intensity import Normalisation
        from napari_wpp.core.patches import count_patches

        try:
            layer, index, shape = self._reference_geometry()
            count = count_patches(shape, PATCH_SIZE)
            if count == 0:
                raise InputError(
                    f"the reference region is {shape[-2]}×{shape[-1]} px, smaller than a "
                    f"{PATCH_SIZE}×{PATCH_SIZE} patch: draw a larger rectangle"
                )
            data = full_resolution(layer)
            normalisation = Normalisation.from_array(np.asarray(data))
            region = normalisation.apply(np.asarray(data[index]))
            if region.ndim == 3 and region.shape[0] == 1:
                region = region[0]
            selection = ReferenceSelection(
                regions=[np.ascontiguousarray(region)],
                normalisation=normalisation.to_dict(),
                source=layer.name,
                n_patches=int(count),
            )
        except Exception as exc:  # noqa: BLE001 - shown as a notification, never a traceback
            notify_error(exc)
            return None
        self.session.reference = selection
        return selection

    # ------------------------------------------------------------------ operators
    def use_parametric_operator(self) -> GaussianDownsampling | None:
        """Build the Gaussian operator of the current parameters into ``session.operator``."""
        try:
            operator = self.state.parametric_operator()
        except Exception as exc:  # noqa: BLE001 - notification
            notify_error(exc)
            return None
        self.session.operator = operator
        return operator

    def _pair_inputs(self) -> tuple[Any, Any, tuple, tuple, Any, Any]:
        """(HR plane, LR plane, HR crop, LR crop, HR layer, LR layer) for the estimation."""
        hr_layer = self._layer(self.state.pair_hr_layer, "HR image")
        lr_layer = self._layer(self.state.pair_lr_layer, "LR image")
        if hr_layer.name == lr_layer.name:
            raise InputError("HR and LR are the same layer: choose the registered LR image")
        planes = []
        for layer in (hr_layer, lr_layer):
            data = full_resolution(layer)
            if len(data.shape) == 3:
                data = data[_current_slice(layer, self.viewer)]
            planes.append(data)
        boxes = []
        for name in (self.state.pair_hr_shapes, self.state.pair_lr_shapes):
            boxes.append(rectangle_world_box(self._layer(name, "Shapes")) if name else None)
        hr_crop, lr_crop = pair_regions(hr_layer, lr_layer, *boxes)
        q = int(self.state.pair_scale)
        hr_shape = tuple(s.stop - s.start for s in hr_crop)
        lr_shape = tuple(s.stop - s.start for s in lr_crop)
        native = (hr_shape[0] // q, hr_shape[1] // q)
        if lr_shape == native and hr_shape != (native[0] * q, native[1] * q):
            hr_crop = tuple(slice(s.start, s.start + n * q) for s, n in zip(hr_crop, native))
        elif lr_shape not in (native, hr_shape):
            raise InputError(
                f"HR region {hr_shape[0]}×{hr_shape[1]} and LR region {lr_shape[0]}×"
                f"{lr_shape[1]} do not match scale ×{q}: check the scale, the layers' "
                "registration or the rectangles"
            )
        return planes[0], planes[1], hr_crop, lr_crop, hr_layer, lr_layer

    def estimate(self) -> Any:
        """Estimate the operator of the chosen pair in a napari thread worker.

        The kernel appears as the image layer ``"<LR name> kernel"`` and the residual rms in
        the widget; :attr:`estimation_finished` is emitted at the end (with the estimate or
        the exception).

        Returns
        -------
        FunctionWorker or None
            The started worker, or ``None`` after a notification (bad input, or an estimation
            already running).
        """
        from napari.qt.threading import create_worker

        if self.estimation_worker is not None:
            notify_error(InputError("an estimation is already running: wait for it to finish"))
            return None
        try:
            hr_plane, lr_plane, hr_crop, lr_crop, hr_layer, lr_layer = self._pair_inputs()
        except Exception as exc:  # noqa: BLE001 - notification
            notify_error(exc)
            return None
        self._estimate_source = {
            "hr": hr_layer.name,
            "lr": lr_layer.name,
            "hr_region": [[s.start, s.stop] for s in hr_crop],
            "lr_region": [[s.start, s.stop] for s in lr_crop],
        }
        worker = create_worker(
            _estimate_job,
            hr_plane,
            lr_plane,
            hr_crop,
            lr_crop,
            int(self.state.pair_scale),
            int(self.state.pair_kernel_size),
            _progress={"desc": "Estimating the forward operator"},
            _connect={"errored": self._on_estimation_errored},
            _start_thread=False,
        )
        worker.returned.connect(self._on_estimation_returned)
        worker.finished.connect(self._on_estimation_finished)
        self.estimation_worker = worker
        self.estimate_button.setEnabled(False)
        self.estimate_label.setText("Estimating…")
        worker.start()
        return worker

    def _on_estimation_returned(self, result: Any) -> None:
        if isinstance(result, BaseException):
            self._estimation_failed(result)
            return
        self.last_estimate = result
        self._show_kernel(result)
        self.use_estimated_button.setEnabled(True)
        self.estimate_label.setText(
            f"Residual rms {result.residual_rms:.4g} · kernel "
            f"{result.kernel.shape[0]}×{result.kernel.shape[1]}, sum {result.kernel_sum:.3f}, "
            f"bias {result.bias:.4f}"
        )
        self.estimation_finished.emit(result)

    def _on_estimation_errored(self, exc: BaseException) -> None:
        self._estimation_failed(exc)

    def _estimation_failed(self, exc: BaseException) -> None:
        self.estimate_label.setText("Estimation failed (see the notification).")
        notify_error(exc)
        self.estimation_finished.emit(exc)

    def _on_estimation_finished(self) -> None:
        self.estimation_worker = None
        self.estimate_button.setEnabled(True)

    def _show_kernel(self, estimate: OperatorEstimate) -> None:
        """Add or update the small image layer of the estimated kernel above the HR layer."""
        from napari.layers import Image

        source = self._estimate_source
        name = f"{source.get('lr', 'estimated')} kernel"
        kernel = np.asarray(estimate.kernel, dtype=np.float32)
        hr_name = source.get("hr")
        scale = (1.0, 1.0)
        translate = (0.0, 0.0)
        if hr_name in self.viewer.layers:
            hr_layer = self.viewer.layers[hr_name]
            scale = tuple(float(abs(s)) for s in hr_layer.scale[-2:])
            corner = np.asarray(hr_layer.data_to_world([0.0] * hr_layer.ndim), dtype=np.float64)
            top = float(corner[-2]) - (kernel.shape[0] + 4) * scale[0]  # just above the image
            translate = (top, float(corner[-1]))
        metadata = {
            "napari_wpp": {
                "role": "kernel",
                "kernel_sum": estimate.kernel_sum,
                "bias": estimate.bias,
                "residual_rms": estimate.residual_rms,
                "method": estimate.method,
                **source,
            }
        }
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], Image):
            layer = self.viewer.layers[name]
            layer.data = kernel
            layer.scale = scale
            layer.translate = translate
            layer.metadata = metadata
            layer.reset_contrast_limits()
        else:
            self.viewer.add_image(
                kernel,
                name=name,
                colormap="magma",
                scale=scale,
                translate=translate,
                metadata=metadata,
            )

    def use_estimated_operator(self) -> ForwardOperator | None:
        """Put the last estimated operator into ``session.operator``."""
        if self.last_estimate is None:
            notify_error(InputError("no estimated operator yet: press Estimate first"))
            return None
        self.session.operator = self.last_estimate.operator
        return self.last_estimate.operator

    # ------------------------------------------------------------------ files
    def save_operator(self, path: str | Path) -> Path | None:
        """Write ``session.operator`` as the CLI's operator JSON.

        An estimated operator also records its fit (residual rms, kernel sum, source layers)
        under ``"fit"``, as ``napari-wpp estimate-operator`` does.

        Returns
        -------
        Path or None
            The written file, or ``None`` after a notification.
        """
        from napari.utils.notifications import show_info

        from napari_wpp.io import write_operator

        try:
            operator = self.session.operator
            if operator is None:
                raise InputError(
                    "no operator to save yet: use the parametric operator or estimate one first"
                )
            target = Path(path).expanduser()
            if target.suffix.lower() != ".json":
                raise InputError(f"cannot save the operator as {target.name}: use a .json name")
            extra = None
            if self.last_estimate is not None and operator is self.last_estimate.operator:
                summary = self.last_estimate.to_dict()
                extra = {
                    "fit": {
                        "kernel_sum": summary["kernel_sum"],
                        "residual_rms": summary["residual_rms"],
                        "kernel_peak": summary["kernel_peak"],
                        "kernel_peak_index": summary["kernel_peak_index"],
                        **self._estimate_source,
                    }
                }
            written = write_operator(target, operator, extra=extra)
        except Exception as exc:  # noqa: BLE001 - notification
            notify_error(exc)
            return None
        show_info(f"operator saved to {written}")
        return written

    def load_operator(self, path: str | Path) -> ForwardOperator | None:
        """Read an operator JSON (CLI format) into ``session.operator``.

        A Gaussian operator also fills the parametric fields of the widget.

        Returns
        -------
        ForwardOperator or None
            The operator, or ``None`` after a notification.
        """
        from napari_wpp.core.operators import GaussianDownsampling
        from napari_wpp.io import read_operator

        try:
            operator = read_operator(path)
        except Exception as exc:  # noqa: BLE001 - notification
            notify_error(exc)
            return None
        if isinstance(operator, GaussianDownsampling):
            self.state.scale = operator.scale  # sets σ to its default, overwritten next
            self.state.sigma = float(operator.sigma[0])
            self.state.kernel_size = operator.kernel_size
            self.state.anchor = operator.anchor
            self.state.padding = operator.padding
        self.session.operator = operator
        return operator

    def _save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save operator", "operator.json", "Operator JSON (*.json)"
        )
        if path:
            if Path(path).suffix.lower() != ".json":
                path += ".json"
            self.save_operator(path)

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Load operator", "", "Operator JSON (*.json);;All files (*)"
        )
        if path:
            self.load_operator(path)

    # ------------------------------------------------------------------ session summary
    def _update_session_summary(self, *_args: Any) -> None:
        reference = self.session.reference
        operator = self.session.operator
        if reference is None:
            reference_text = "not chosen"
        else:
            shapes = ", ".join("×".join(str(n) for n in r.shape) for r in reference.regions)
            reference_text = f"{reference.source} ({shapes}), {reference.n_patches:,} patches"
        self.session_reference_label.setText(reference_text)
        self.session_operator_label.setText(
            "not chosen" if operator is None else describe_operator(operator)
        )
