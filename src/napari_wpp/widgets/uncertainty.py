"""The "Uncertainty" dock widget: posterior samples, mean and std of a WPPFlow.

It shows a WPPFlow source (the session's model or a model file), the region (an LR layer's
current slice, or the part of it under a Shapes rectangle, found through the layers'
world/data transforms so scaled and translated layers work; 3D stacks are cut along axis 0),
the sampling form of :class:`~napari_wpp.core.config.PredictSpec`, and runs
:func:`napari_wpp.jobs.uncertainty.uncertainty_job` in a thread worker (progress, also in
napari's activity dock, and Cancel).

Intensities are handled as ``napari-wpp predict`` does; the mean and the samples come back in
the input's dtype, the standard deviation as float32 in the input's intensity units. Results
appear as the layers

* ``"<source> mean"`` (grey, the source's contrast limits),
* ``"<source> std"`` (colormap magma; with "overlay std on mean" it is blended additively over
  the mean),
* ``"<source> samples"`` (optional; sample axis first),

with the superresolved geometry of :mod:`napari_wpp.widgets._layers` placed over the region,
provenance in ``metadata["napari_wpp"]`` (role ``"superresolved"`` and a ``"statistic"``),
updated in place when the widget runs again.

The widget shows the largest std and the share of the region whose std lies above a threshold
(a percentage of the intensity range, recomputed as the threshold changes). With a ground-truth
layer on the superresolved pixel grid (the sample data's "HR truth"), it also shows the
calibration figures of :mod:`napari_wpp.core.uncertainty`: the share of pixels whose truth lies
within 1, 2 and 3 std of the mean against a Gaussian's, the correlation of the std with the
actual error and the edge/flat std ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, Container, FloatSpinBox
from psygnal import evented
from qtpy.QtWidgets import QGroupBox, QLabel

from napari_wpp.core.config import PredictSpec
from napari_wpp.core.errors import InputError
from napari_wpp.jobs.uncertainty import (
    SamplingRegion,
    UncertaintyFinished,
    UncertaintyMaps,
    region_statistics,
    share_above,
    statistics_texts,
    uncertainty_job,
)
from napari_wpp.widgets._base import (
    NO_LAYER,
    JobLaunch,
    LayerChoice,
    job_finished_alias,
    rectangle_choice,
)
from napari_wpp.widgets._forms import device_choices, spec_default, spec_form, spec_from_values
from napari_wpp.widgets._layers import (
    MIN_REGION,
    PROVENANCE_KEY,
    add_or_update_image,
    checked_image,
    chosen_layer,
    crop_geometry,
    full_resolution,
    greyscale_images,
    layer_with_role,
    slice_region,
    superresolved_provenance,
    truth_index,
)
from napari_wpp.widgets._layout import (
    NOTE_STYLE,
    form_layout,
    group_box,
    note_label,
    scrolled_column,
)
from napari_wpp.widgets._model_source import ModelDockWidget, ModelSourcePanel
from napari_wpp.widgets._transport_panel import TransportPanel

if TYPE_CHECKING:
    import napari


__all__ = [
    "MIN_REGION",
    "UncertaintySettings",
    "UncertaintyWidget",
    "output_names",
    "share_above",
    "truth_index",
]

#: The sampling fields of the spec the widget shows, and the settings holding them.
SPEC_SETTINGS = {
    "samples": "k",
    "temperature": "temperature",
    "seed": "seed",
    "batch_size": "batch_size",
    "tile": "tile",
    "device": "device",
    "keep_samples": "keep_samples",
}


def output_names(source: str) -> dict[str, str]:
    """Names of the layers computed from the layer ``source`` (``mean``, ``std``, ``samples``)."""
    return {what: f"{source} {what}" for what in ("mean", "std", "samples")}


def _spec_setting(name: str) -> Any:
    return field(default_factory=spec_default(PredictSpec, name))


@evented
@dataclass
class UncertaintySettings:
    """The Uncertainty widget's choices (the sampling fields default to the spec's).

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
    k, temperature, seed, keep_samples
        The spec's ``samples``, ``temperature``, ``seed`` and ``keep_samples``.
    overlay_std
        Blend the std layer additively over the mean.
    threshold_percent
        Threshold of the "share above" statistic, in percent of the intensity range.
    batch_size, tile, device
        The spec's fields of the same names (``tile`` 0: the whole region).
    """

    model_source: str = "session"
    model_file: str = ""
    input_layer: str = NO_LAYER
    region_shapes: str = NO_LAYER
    truth_layer: str = NO_LAYER
    # what is drawn and kept, how it is shown, how it is computed
    k: int = _spec_setting("samples")
    temperature: float = _spec_setting("temperature")
    seed: int = _spec_setting("seed")
    keep_samples: bool = _spec_setting("keep_samples")
    overlay_std: bool = True
    threshold_percent: float = 5.0
    batch_size: int = _spec_setting("batch_size")
    tile: int = _spec_setting("tile")
    device: str = _spec_setting("device")


class UncertaintyWidget(ModelDockWidget):
    """Dock widget: posterior mean, standard deviation and samples of a WPPFlow.

    Public methods (used by the buttons and by scripts/tests): :meth:`run`, :meth:`cancel`,
    :meth:`load_model`, :meth:`shutdown`, :meth:`statistics`. Errors become napari
    notifications; the methods then return ``None``. :attr:`uncertainty_finished` is emitted
    at the end of a run with the mean layer (``None`` when the run failed or was cancelled);
    :attr:`last_maps` holds the :class:`~napari_wpp.jobs.uncertainty.UncertaintyMaps` of the
    last finished run.
    """

    job_title = "sampling"
    uncertainty_finished = job_finished_alias("Qt signal: a run ended (mean layer or None).")
    progress_unit = "samples"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, UncertaintySettings())
        self.last_maps: UncertaintyMaps | None = None
        self.model_panel = ModelSourcePanel(
            self, "wppflow", "WPPFlow model", placeholder="flow.safetensors"
        )
        self.model_label = self.model_panel.label
        self.transport_panel = TransportPanel(napari_viewer)
        boxes = [self.model_panel, self._region_box(), self._sampling_box()]
        scrolled_column(self, [*boxes, self._statistics_box(), self.transport_panel])
        self.watch_layers(self._refresh_layers, "data")
        self.listen(self.viewer.dims.events.current_step, self._update_region_label)
        self.listen_settings(self._update_region_label, "input_layer", "region_shapes")
        self.listen_settings(self._update_controls, "model_source", "model_file", "input_layer")
        self.listen_settings(self._apply_overlay, "overlay_std")
        self.listen_settings(self._show_statistics, "threshold_percent")
        self._refresh_layers()
        self._show_statistics()

    # ------------------------------------------------------------------ UI
    def _region_box(self) -> QGroupBox:
        self.layer_choice = LayerChoice(
            self,
            "input_layer",
            greyscale_images,
            layer_with_role("lr"),
            label="LR layer",
            tooltip="LR image or stack; a stack is sampled at the current slice",
        )
        self.shapes_choice = rectangle_choice(self)
        self.truth_choice = LayerChoice(
            self,
            "truth_layer",
            greyscale_images,
            layer_with_role("truth", first=False),
            empty_text="(none)",
            optional=True,
            label="Ground truth",
            tooltip="HR ground truth on the superresolved grid: shows how well the std is "
            "calibrated",
        )
        choices = [self.layer_choice, self.shapes_choice, self.truth_choice]
        form = Container(widgets=[choice.combo for choice in choices])
        form.margins = (0, 0, 0, 0)
        self.region_label = note_label(selectable=True)
        return group_box("Region", form, self.region_label)

    def _sampling_box(self) -> QGroupBox:
        self.form = spec_form(
            PredictSpec,
            list(SPEC_SETTINGS),
            samples={"label": "Samples K"},
            tile={"label": "Tiles (px, 0: off)"},
            device={"choices": device_choices()},
            keep_samples={"text": "Show every sample (layer, sample axis first)"},
        )
        self.bind_form(self.form, **SPEC_SETTINGS)
        self.overlay_check = self.bind(
            "overlay_std", CheckBox(text="Overlay std on mean (additive blending)")
        )
        self.form.append(self.overlay_check)
        return group_box("Sampling", self.form, self.job_controls("Draw samples"))

    def _statistics_box(self) -> QGroupBox:
        threshold = FloatSpinBox(label="Std threshold (% of range)", min=0.0, max=100.0, step=0.5)
        threshold.tooltip = "Share of the area whose std exceeds this share of the intensity range"
        self.threshold = self.bind("threshold_percent", threshold)
        self.max_std_label = QLabel("–")
        self.share_label = QLabel("–")
        self.calibration_box = QGroupBox("Calibration against the ground truth")
        calibration = form_layout(self.calibration_box)
        self.coverage_labels = [QLabel("–") for _k in (1, 2, 3)]
        for k, label in zip((1, 2, 3), self.coverage_labels):
            calibration.addRow(f"Within {k} sd", label)
        self.correlation_label = QLabel("–")
        calibration.addRow("Std ~ |error|", self.correlation_label)
        self.edge_flat_label = QLabel("–")
        calibration.addRow("Edge/flat std", self.edge_flat_label)
        self.calibration_note = note_label(selectable=True)
        calibration.addRow(self.calibration_note)
        threshold_row = Container(widgets=[self.threshold])
        threshold_row.margins = (0, 0, 0, 0)
        box = group_box("Statistics", threshold_row)
        figures = QGroupBox()
        figures.setFlat(True)
        rows = form_layout(figures)
        rows.setContentsMargins(0, 0, 0, 0)
        rows.addRow("Max std", self.max_std_label)
        rows.addRow("Area above", self.share_label)
        box.layout().addWidget(figures)
        box.layout().addWidget(self.calibration_box)
        return box

    # ------------------------------------------------------------------ layers and labels
    def _refresh_layers(self, *_args: Any) -> None:
        for choice in (self.layer_choice, self.shapes_choice, self.truth_choice):
            choice.refresh()
        self._update_controls()
        self._update_region_label()

    def _region(self, layer: Any) -> tuple[int | None, slice, slice]:
        """Slice index (``None`` for 2D) and the rows and columns of the region."""
        return slice_region(self.viewer, layer, self.settings.region_shapes)

    def _update_region_label(self, *_args: Any) -> None:
        try:
            layer = checked_image(self.viewer, self.settings.input_layer, "LR layer")
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

    # ------------------------------------------------------------------ statistics
    def statistics(self) -> dict[str, float] | None:
        """Figures of the last run (``None`` before one finished); see
        :func:`~napari_wpp.jobs.uncertainty.region_statistics`."""
        if self.last_maps is None:
            return None
        return region_statistics(self.last_maps, self.settings.threshold_percent)

    def _show_statistics(self, *_args: Any) -> None:
        figures = self.statistics()
        maps = self.last_maps
        has_truth = maps is not None and (maps.figures is not None or maps.figures_error)
        self.calibration_box.setVisible(bool(has_truth))
        if figures is None or maps is None:
            self.max_std_label.setText("–")
            self.share_label.setText("–")
            return
        truth_name = self.current_run.get("truth_name") or "the ground truth"
        texts = statistics_texts(figures, maps, truth_name)
        self.max_std_label.setText(texts["max_std"])
        self.share_label.setText(texts["share_above"])
        for k, label in zip((1, 2, 3), self.coverage_labels):
            label.setText(texts.get(f"coverage_{k}sd", "–"))
        self.correlation_label.setText(texts.get("correlation", "–"))
        self.edge_flat_label.setText(texts.get("edge_flat", "–"))
        self.calibration_note.setText(texts.get("note", ""))

    def _apply_overlay(self, *_args: Any) -> None:
        name = self.current_run.get("names", {}).get("std")
        if name and name in self.viewer.layers:
            self.viewer.layers[name].blending = self._std_blending()

    def _std_blending(self) -> str:
        return "additive" if self.settings.overlay_std else "translucent"

    # ------------------------------------------------------------------ running
    def prepare_run(self) -> JobLaunch:
        """Check the choices and describe the sampling job (``InputError``: the fix)."""
        s = self.settings
        layer, state, model_file, q = self.model_and_input("LR layer")
        data = full_resolution(layer)
        index, rows, cols = self._region(layer)
        ndim = len(data.shape)
        if index is None:
            region = data[rows, cols]
            start: list[int] = [rows.start, cols.start]
        else:
            region = data[index, rows, cols]
            start = [index, rows.start, cols.start]
        out_scale, out_translate = crop_geometry(layer, start, q, 0)
        plane_shape = (q * (rows.stop - rows.start), q * (cols.stop - cols.start))
        truth = None
        if s.truth_layer:
            truth_layer = chosen_layer(self.viewer, s.truth_layer, "ground-truth layer")
            t_index = truth_index(truth_layer, out_scale, out_translate, plane_shape)
            truth = full_resolution(truth_layer)[t_index]
        spec = spec_from_values(
            PredictSpec, {name: getattr(s, setting) for name, setting in SPEC_SETTINGS.items()}
        )
        provenance = superresolved_provenance(
            layer.name,
            state,
            model_file,
            q,
            axis=0 if index is not None else None,
            slice=index,
            region={
                "rows": [rows.start, rows.stop],
                "columns": [cols.start, cols.stop],
                "shapes": s.region_shapes or None,
            },
            k=spec.samples,
            temperature=spec.temperature,
            seed=spec.seed,
            tile=spec.tile,
            ground_truth=s.truth_layer or None,
        )
        where = f"rows {rows.start}–{rows.stop - 1}, columns {cols.start}–{cols.stop - 1}"
        if index is not None:
            where = f"slice {index}, {where}"
        what = f"{layer.name} ({where})"
        sampled = SamplingRegion(region, data, 0 if index is None else int(index), truth)
        return JobLaunch(
            uncertainty_job,
            (spec, state.model, state.normalisation, sampled),
            total=spec.samples,
            activity="Posterior samples",
            status=f"Drawing {spec.samples} samples of {what}…",
            context={
                "names": output_names(layer.name),
                "spec": spec,
                "truth_name": s.truth_layer,
                "ndim": ndim,
                "geometry": (out_scale, out_translate),
                "contrast_limits": tuple(float(v) for v in layer.contrast_limits),
                "provenance": provenance,
                "what": what,
            },
        )

    # ------------------------------------------------------------------ worker events
    def on_job_event(self, item: Any) -> None:
        """Show progress, then the mean, std (and samples) layers and the statistics."""
        from napari_wpp.core.inference import SamplingProgress

        if isinstance(item, SamplingProgress):
            self.show_progress(item.done, item.total, item.elapsed_s, "Sample")
        elif isinstance(item, UncertaintyFinished):
            self.current_run["finished"] = item
            if item.maps is not None:
                self._show_maps(item.maps)

    def _show_maps(self, maps: UncertaintyMaps) -> None:
        run = self.current_run
        names = run["names"]
        base = dict(run["provenance"])
        base["normalisation"] = maps.normalisation
        base["normalisation_from"] = maps.normalisation_from
        scale, translate = run["geometry"]

        def show(what: str, array: np.ndarray, meta: dict, lead: int = 0, **options: Any) -> Any:
            placed = array if run["ndim"] == 2 else np.expand_dims(array, -3)
            return add_or_update_image(
                self.viewer,
                names[what],
                placed,
                scale=(1.0,) * lead + scale,
                translate=(0.0,) * lead + translate,
                metadata={PROVENANCE_KEY: {**base, "statistic": what, **meta}},
                **options,
            )

        grey = {"contrast_limits": run["contrast_limits"], "colormap": "gray"}
        if maps.samples is not None:
            show("samples", maps.samples, {"sample_axis": 0}, 1, **grey)
        else:
            self._remove_stale(names["samples"])
        mean_layer = show("mean", maps.mean, {}, **grey)
        std_high = maps.max_std if maps.max_std > 0 else 1.0
        std_layer = show(
            "std",
            maps.std,
            {"units": "input intensity"},
            contrast_limits=(0.0, std_high),
            colormap="magma",
        )
        std_layer.colormap = "magma"
        std_layer.blending = self._std_blending()
        self.last_maps = maps
        run["layer"] = mean_layer
        self.transport_panel.attach(  # the mean's own region: no LR crop for a data residual
            mean_layer, maps.normalisation, 0 if run["ndim"] == 3 else None
        )
        if self.transport_panel.reference.value not in (None, "(none)"):
            self.transport_panel._guarded(self.transport_panel.prepare)
        self._show_statistics()

    def _remove_stale(self, name: str) -> None:
        """Remove a samples layer of an earlier run (its samples no longer match)."""
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            info = (getattr(layer, "metadata", None) or {}).get(PROVENANCE_KEY, {})
            if isinstance(info, dict) and info.get("statistic") == "samples":
                self.viewer.layers.remove(layer)

    def done_text(self, run: dict[str, Any]) -> str:
        """``Done in 1.2 s: K samples of <layer> (<region>)``."""
        return (
            f"Done in {run['finished'].elapsed_s:.1f} s: {run['spec'].samples} samples of "
            f"{run['what']}"
        )
