"""The "Reference & operator" dock widget: HR reference region and forward operator.

The widget keeps its choices in :class:`ReferenceOperatorSettings` (an evented dataclass whose
operator fields default to :class:`~napari_wpp.core.config.OperatorSpec`'s and
:class:`~napari_wpp.core.config.EstimateSpec`'s) and writes what it produces into the viewer's
shared :class:`~napari_wpp.widgets._session.WPPSession`:

* ``session.reference``: an HR image layer (2D or 3D), optionally cut by a Shapes rectangle
  (see :mod:`napari_wpp.widgets._regions`) and a slice range, normalised to [0, 1];
* ``session.operator``: the operator of the spec, built by
  :func:`napari_wpp.jobs.operator.build_operator` as for the CLI's operator flags, or the
  operator estimated from a registered HR/LR pair by :func:`napari_wpp.jobs.estimate.
  estimate_job` (the job of ``napari-wpp estimate-operator``) in a stoppable thread worker.

Operators save and load as the CLI's operator JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import Container, FloatSpinBox, PushButton, SpinBox
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QGroupBox

from napari_wpp.core.config import (
    ANCHORS,
    PADDINGS,
    SCALES,
    EstimateSpec,
    OperatorSpec,
    bounds,
    default_sigma,
    help_text,
)
from napari_wpp.core.errors import InputError
from napari_wpp.jobs.estimate import OperatorEstimated, estimate_job, fit_record
from napari_wpp.jobs.operator import build_operator, describe_operator
from napari_wpp.widgets._base import NO_LAYER, JobDockWidget, JobLaunch, LayerChoice, or_notify
from napari_wpp.widgets._forms import field_widget, spec_form
from napari_wpp.widgets._layers import (
    add_or_update_kernel,
    chosen_layer,
    current_index,
    greyscale_images,
    layer_files,
    layer_with_role,
    pair_hr_default,
    pair_lr_default,
    shapes_layers,
    shown_plane,
    stack_depth,
)
from napari_wpp.widgets._layout import ask_file_path, group_box, note_label, scrolled_column
from napari_wpp.widgets._regions import (
    pair_regions,
    pixel_size_ratio,
    rectangle_world_box,
    reference_region,
    reference_selection,
    region_text,
    registered_crops,
    world_box_to_slices,
)
from napari_wpp.widgets._settings import ReferenceOperatorSettings
from napari_wpp.widgets._suitability_panel import SuitabilityPanel

if TYPE_CHECKING:
    import napari

    from napari_wpp.core.operator_estimation import OperatorEstimate
    from napari_wpp.core.operators import ForwardOperator
    from napari_wpp.widgets._session import ReferenceSelection

__all__ = [
    "PATCH_SIZE",
    "ReferenceOperatorSettings",
    "ReferenceOperatorWidget",
    "describe_operator",
    "pair_regions",
    "rectangle_world_box",
    "reference_region",
    "world_box_to_slices",
]

#: Side of the patches whose distribution the WPP prior matches.
PATCH_SIZE = 6
WARNING_STYLE = "color: #e8a33d;"
ANCHOR_TEXTS = {"center": "center (default)", "corner": "corner (published data)"}


def _scale_choices() -> list[tuple[str, int]]:
    return [(f"×{q}", q) for q in SCALES]


def _estimation(spec: EstimateSpec, hr: Any, lr: Any, hr_crop: tuple, lr_crop: tuple, _stop: Any):
    """Worker body: the estimation job on the chosen planes (a stop has nothing to stop)."""
    yield from estimate_job(spec, hr, lr, hr_crop, lr_crop)


# --------------------------------------------------------------------------- widget
class ReferenceOperatorWidget(JobDockWidget):
    """Dock widget: choose the HR reference and the forward operator of a session.

    Public methods (used by the buttons and by scripts/tests): :meth:`use_as_reference`,
    :meth:`use_parametric_operator`, :meth:`estimate`, :meth:`use_estimated_operator`,
    :meth:`save_operator`, :meth:`load_operator`, :meth:`patch_count`. Errors become napari
    notifications; the methods then return ``None``.

    Attributes
    ----------
    last_estimate
        The last :class:`~napari_wpp.core.operator_estimation.OperatorEstimate`, or ``None``.
    estimation_finished
        Qt signal emitted when an estimation ends, with the estimate or the exception.
    """

    estimation_finished = Signal(object)
    job_title = "an estimation"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, ReferenceOperatorSettings())
        self.last_estimate: OperatorEstimate | None = None
        self._last_fit: dict[str, Any] = {}
        boxes = [self._reference_box(), self._parametric_box(), self._estimation_box()]
        self.checks = SuitabilityPanel(self)
        scrolled_column(self, [*boxes, self.checks.box, self._session_box()], spacing=10)
        self.watch_layers(self._refresh_layers)
        self.watch_layers(self._update_patch_label, "data", "scale", "translate", "affine")
        events = self.settings.events
        self.listen(events.reference_layer, self._on_reference_layer_changed)
        for name in ("reference_shapes", "slice_start", "slice_stop"):
            self.listen(getattr(events, name), self._update_patch_label)
        self.listen(
            events.scale, lambda scale: setattr(self.settings, "sigma", default_sigma(scale))
        )
        self.listen(events.pair_hr_layer, self._guess_pair_scale)
        self.listen(events.pair_lr_layer, self._guess_pair_scale)
        self.listen(self.session.events.reference, self._update_session_summary)
        self.listen(self.session.events.operator, self._update_session_summary)
        self._on_reference_layer_changed(self.settings.reference_layer)
        self._update_session_summary()
        self._update_controls()

    estimation_worker = property(
        lambda self: self.worker, doc="The running estimation worker, or ``None``."
    )

    # ------------------------------------------------------------------ UI
    def _layer_choice(self, setting: str, label: str, default: Any, shapes: bool) -> Any:
        if shapes:
            choice = LayerChoice(
                self,
                setting,
                shapes_layers,
                lambda _layers: NO_LAYER,
                empty_text="(whole image)",
                optional=True,
                label=label,
            )
        else:
            choice = LayerChoice(self, setting, greyscale_images, default, label=label)
        setattr(self, f"{setting}_choice", choice)
        return choice.combo

    def _reference_box(self) -> QGroupBox:
        self.reference_shapes_combo = self._layer_choice("reference_shapes", "Region", None, True)
        self.slice_start_spin = self.bind("slice_start", SpinBox(label="First slice", max=0))
        self.slice_stop_spin = self.bind("slice_stop", SpinBox(label="Last slice", max=0))
        self.current_slice_button = PushButton(text="Current slice")
        self.current_slice_button.tooltip = "Use only the slice shown in the viewer"
        self.all_slices_button = PushButton(text="All slices")
        self.current_slice_button.changed.connect(self._use_current_slice)
        self.all_slices_button.changed.connect(self._use_all_slices)
        self.slice_buttons = Container(
            widgets=[self.current_slice_button, self.all_slices_button], layout="horizontal"
        )
        reference = self._layer_choice(
            "reference_layer", "HR image", layer_with_role("reference"), False
        )
        form = Container(
            widgets=[
                reference,
                self.reference_shapes_combo,
                self.slice_start_spin,
                self.slice_stop_spin,
                self.slice_buttons,
            ]
        )
        self.patch_label = note_label()
        self.use_reference_button = PushButton(text="Use as reference")
        self.use_reference_button.changed.connect(self.use_as_reference)
        return group_box(
            "Reference (high resolution)", form, self.patch_label, self.use_reference_button
        )

    def _parametric_box(self) -> QGroupBox:
        self.scale_combo = field_widget(OperatorSpec, "scale", choices=_scale_choices())
        low, high = bounds(OperatorSpec, "sigma")
        self.sigma_spin = FloatSpinBox(
            label="σ", min=low, max=high, step=0.25, tooltip=help_text(OperatorSpec, "sigma")
        )
        self.sigma_spin.native.setSuffix(" px")
        anchors = [(ANCHOR_TEXTS.get(a, a), a) for a in ANCHORS]
        self.form = spec_form(
            OperatorSpec,
            ["kernel_size", "anchor", "padding"],
            anchor={"label": "Anchoring", "choices": anchors},
            padding={"choices": list(PADDINGS)},
        )
        self.form.insert(0, self.scale_combo)
        self.form.insert(1, self.sigma_spin)
        self.bind("sigma", self.sigma_spin)
        self.bind_form(self.form)
        self.kernel_spin, self.anchor_combo = self.form.kernel_size, self.form.anchor
        self.padding_combo = self.form.padding
        self.use_parametric_button = PushButton(text="Use parametric operator")
        self.use_parametric_button.changed.connect(self.use_parametric_operator)
        return group_box(
            "Operator: Gaussian blur + subsampling", self.form, self.use_parametric_button
        )

    def _estimation_box(self) -> QGroupBox:
        self.pair_form = spec_form(
            EstimateSpec,
            ["scale", "kernel_size"],
            scale={"choices": _scale_choices()},
            kernel_size={"tooltip": "Side of the estimated kernel in HR pixels"},
        )
        self.bind_form(self.pair_form, scale="pair_scale", kernel_size="pair_kernel_size")
        combos = [
            self._layer_choice("pair_hr_layer", "HR image", pair_hr_default, False),
            self._layer_choice("pair_hr_shapes", "HR region", None, True),
            self._layer_choice("pair_lr_layer", "LR image", pair_lr_default, False),
            self._layer_choice("pair_lr_shapes", "LR region", None, True),
        ]
        for index, combo in enumerate(combos):
            self.pair_form.insert(index, combo)
        hint = note_label(
            "The LR image is HR / scale in size or resampled onto the HR grid. One "
            "rectangle cuts both layers where they overlay; 3D layers use the slice shown."
        )
        self.use_estimated_button = PushButton(text="Use estimated operator", enabled=False)
        self.use_estimated_button.changed.connect(self.use_estimated_operator)
        controls = self.job_controls("Estimate", self.use_estimated_button.native)
        self.estimate_button, self.estimate_label = self.run_button, self.status_label
        self.estimate_label.setText("No estimate yet.")
        return group_box(
            "Operator: estimated from a registered pair", self.pair_form, hint, controls
        )

    def _session_box(self) -> QGroupBox:
        self.session_reference_label = note_label()
        self.session_operator_label = note_label()
        save = PushButton(text="Save operator…")
        load = PushButton(text="Load operator…")
        save.changed.connect(self._save_dialog)
        load.changed.connect(self._load_dialog)
        buttons = Container(widgets=[save, load], layout="horizontal")
        return group_box(
            "Session (shared by the napari-wpp widgets)",
            self.session_reference_label,
            self.session_operator_label,
            buttons,
        )

    # ------------------------------------------------------------------ layers
    def _refresh_layers(self, *_args: Any) -> None:
        for name in ("reference_layer", "reference_shapes", "pair_hr_layer", "pair_hr_shapes"):
            getattr(self, f"{name}_choice").refresh()
        self.pair_lr_layer_choice.refresh()
        self.pair_lr_shapes_choice.refresh()
        self.checks.lr_choice.refresh()
        self._update_patch_label()

    def _layer(self, name: str, what: str) -> Any:
        return chosen_layer(self.viewer, name, f"{what} layer")

    def _reference_depth(self) -> int:
        name = self.settings.reference_layer
        return stack_depth(self.viewer.layers[name]) if name in self.viewer.layers else 0

    def _on_reference_layer_changed(self, *_args: Any) -> None:
        depth = self._reference_depth()
        for widget in (self.slice_start_spin, self.slice_stop_spin):
            widget.max = max(depth - 1, 0)
        for widget in (self.slice_start_spin, self.slice_stop_spin, self.slice_buttons):
            widget.visible = depth > 0
        self._use_all_slices()
        self._update_patch_label()

    def _use_all_slices(self, *_args: Any) -> None:
        self.settings.slice_start = 0
        self.settings.slice_stop = max(self._reference_depth() - 1, 0)

    def _use_current_slice(self, *_args: Any) -> None:
        if self._reference_depth():
            layer = self.viewer.layers[self.settings.reference_layer]
            index = current_index(layer, self.viewer)
            self.settings.slice_start = self.settings.slice_stop = index

    def _guess_pair_scale(self, *_args: Any) -> None:
        """Preset the estimation scale from the layers' pixel sizes (LR / HR, if integer)."""
        names = (self.settings.pair_hr_layer, self.settings.pair_lr_layer)
        if all(name and name in self.viewer.layers for name in names):
            scale = pixel_size_ratio(*(self.viewer.layers[name] for name in names))
            self.settings.pair_scale = scale or self.settings.pair_scale

    # ------------------------------------------------------------------ reference
    def _reference_geometry(self) -> tuple[Any, tuple[slice, ...], tuple[int, ...]]:
        layer = self._layer(self.settings.reference_layer, "HR image")
        shapes_name = self.settings.reference_shapes
        shapes = self._layer(shapes_name, "Shapes") if shapes_name else None
        slices = (self.settings.slice_start, self.settings.slice_stop)
        index, shape = reference_region(layer, shapes, slices)
        return layer, index, shape

    def patch_count(self) -> int:
        """Number of 6×6 patches of the current reference region (0 when it is too small).

        Raises
        ------
        InputError
            No layer chosen or a rectangle outside the image.
        """
        from napari_wpp.core.patches import count_patches

        return count_patches(self._reference_geometry()[2], PATCH_SIZE)

    def _update_patch_label(self, *_args: Any) -> None:
        try:
            shape = self._reference_geometry()[2]
        except InputError as exc:
            text, holds_a_patch = str(exc), False
        else:
            from napari_wpp.core.patches import count_patches

            text, holds_a_patch = region_text(shape, count_patches(shape, PATCH_SIZE), PATCH_SIZE)
        self.patch_label.setText(text)
        self.patch_label.setStyleSheet("" if holds_a_patch else WARNING_STYLE)

    def use_as_reference(self, *_args: Any) -> ReferenceSelection | None:
        """Cut, normalise (by the whole layer) and store the region in ``session.reference``.

        Returns ``None`` after a notification (no layer, region smaller than a patch, ...).
        """
        selection = or_notify(lambda: reference_selection(*self._reference_geometry(), PATCH_SIZE))
        if selection is not None:
            self.session.reference = selection
        return selection

    # ------------------------------------------------------------------ operators
    def use_parametric_operator(self, *_args: Any) -> ForwardOperator | None:
        """Build the Gaussian operator of the current parameters into ``session.operator``."""
        operator = or_notify(build_operator, self.settings.operator_spec())
        if operator is not None:
            self.session.operator = operator
        return operator

    def _pair_inputs(self) -> tuple[Any, Any, tuple, tuple, Any, Any]:
        """(HR plane, LR plane, HR crop, LR crop, HR layer, LR layer) for the estimation."""
        hr_layer = self._layer(self.settings.pair_hr_layer, "HR image")
        lr_layer = self._layer(self.settings.pair_lr_layer, "LR image")
        if hr_layer.name == lr_layer.name:
            raise InputError("HR and LR are the same layer: choose the registered LR image")
        planes = [shown_plane(layer, self.viewer) for layer in (hr_layer, lr_layer)]
        boxes = [
            rectangle_world_box(self._layer(name, "Shapes")) if name else None
            for name in (self.settings.pair_hr_shapes, self.settings.pair_lr_shapes)
        ]
        q = int(self.settings.pair_scale)
        hr_crop, lr_crop = registered_crops(hr_layer, lr_layer, q, *boxes)
        return planes[0], planes[1], hr_crop, lr_crop, hr_layer, lr_layer

    def estimate(self) -> Any:
        """Estimate the operator of the chosen pair in a thread worker (see :meth:`run`).

        The kernel appears as the image layer ``"<LR name> kernel"``; :attr:`estimation_finished`
        is emitted at the end. Returns the worker, or ``None`` after a notification.
        """
        return self.run()

    def prepare_run(self) -> JobLaunch:
        """The estimation job of the chosen pair (``InputError`` names the fix)."""
        hr, lr, hr_crop, lr_crop, hr_layer, lr_layer = self._pair_inputs()
        source = {
            "hr": hr_layer.name,
            "lr": lr_layer.name,
            "hr_region": [[s.start, s.stop] for s in hr_crop],
            "lr_region": [[s.start, s.stop] for s in lr_crop],
        }
        args = (self.settings.estimate_spec(), np.asarray(hr), np.asarray(lr), hr_crop, lr_crop)
        return JobLaunch(
            _estimation,
            args,
            1,
            "Estimating the forward operator",
            "Estimating…",
            {"source": source},
        )

    def on_job_event(self, item: Any) -> None:
        """Show the estimated kernel and remember the estimate."""
        if isinstance(item, OperatorEstimated):
            self.last_estimate = item.estimate
            self._last_fit = fit_record(item.summary, self.current_run["source"])
            layer = add_or_update_kernel(self.viewer, item.estimate, self.current_run["source"])
            self.current_run.update(finished=item, layer=layer)
            self.use_estimated_button.enabled = True

    def done_text(self, run: dict[str, Any]) -> str:
        """The fit of the last estimate."""
        est = run["finished"].estimate
        return (
            f"Residual rms {est.residual_rms:.4g} · kernel {est.kernel.shape[0]}×"
            f"{est.kernel.shape[1]}, sum {est.kernel_sum:.3f}, bias {est.bias:.4f}"
            + (
                " · LR noise model kept (a WPPNet denoises its input with it)"
                if est.operator.noise_variance is not None
                else ""
            )
        )

    def fail(self, exc: BaseException) -> None:
        """Remember the failure (for :attr:`estimation_finished`) and notify."""
        self.current_run["error"] = exc
        super().fail(exc)

    def _on_job_ended(self) -> None:
        super()._on_job_ended()
        run = self.current_run
        self.estimation_finished.emit(run.get("error") or self.last_estimate)

    def use_estimated_operator(self, *_args: Any) -> ForwardOperator | None:
        """Put the last estimated operator into ``session.operator``."""
        if self.last_estimate is None:
            return or_notify(self._raise, "no estimated operator yet: press Estimate first")
        self.session.operator = self.last_estimate.operator
        return self.last_estimate.operator

    @staticmethod
    def _raise(message: str) -> None:
        raise InputError(message)

    # ------------------------------------------------------------------ files
    def _save(self, path: str | Path) -> Path:
        from napari.utils.notifications import show_info

        from napari_wpp.io import check_not_an_input, write_operator

        operator = self.session.operator
        if operator is None:
            self._raise(
                "no operator to save yet: use the parametric operator or estimate one first"
            )
        target = Path(path).expanduser()
        if target.suffix.lower() != ".json":
            self._raise(f"cannot save the operator as {target.name}: use a .json name")
        check_not_an_input([target], layer_files(self.viewer))
        estimated = self.last_estimate is not None and operator is self.last_estimate.operator
        written = write_operator(
            target, operator, extra={"fit": self._last_fit} if estimated else None
        )
        show_info(f"operator saved to {written}")
        return written

    def save_operator(self, path: str | Path) -> Path | None:
        """Write ``session.operator`` as the CLI's operator JSON (an estimate with its fit).

        Returns the written file, or ``None`` after a notification.
        """
        return or_notify(self._save, path)

    def _load(self, path: str | Path) -> ForwardOperator:
        from napari_wpp.core.operators import GaussianDownsampling
        from napari_wpp.io import read_operator

        operator = read_operator(path)
        if isinstance(operator, GaussianDownsampling):
            if operator.scale not in SCALES:
                self.scale_combo.set_choice(f"×{operator.scale}", operator.scale)
            self.settings.show_gaussian(operator)
        self.session.operator = operator
        return operator

    def load_operator(self, path: str | Path) -> ForwardOperator | None:
        """Read an operator JSON (CLI format) into ``session.operator`` (a Gaussian one also
        fills the parametric fields). Returns ``None`` after a notification."""
        return or_notify(self._load, path)

    def _save_dialog(self, *_args: Any) -> None:
        path = ask_file_path(self, "Save operator", True, "Operator JSON (*.json)", "operator.json")
        if path:
            self.save_operator(path)

    def _load_dialog(self, *_args: Any) -> None:
        path = ask_file_path(self, "Load operator", False, "Operator JSON (*.json)", "")
        if path:
            self.load_operator(path)

    # ------------------------------------------------------------------ session summary
    def _update_session_summary(self, *_args: Any) -> None:
        reference, operator = self.session.reference, self.session.operator
        reference_text = "not chosen" if reference is None else reference.summary()
        self.session_reference_label.setText(f"Reference: {reference_text}")
        operator_text = "not chosen" if operator is None else describe_operator(operator)
        self.session_operator_label.setText(f"Operator: {operator_text}")
