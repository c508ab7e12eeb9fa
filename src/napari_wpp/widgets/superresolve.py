"""The "Superresolve" dock widget: apply a trained model to an image layer, slice by slice.

It shows a model source (:class:`~napari_wpp.widgets._model_source.ModelSourcePanel`: the
session's model or a model file), the input layer with the prediction form of
:class:`~napari_wpp.core.config.PredictSpec`, and runs :func:`napari_wpp.jobs.predict.
predict_job`, the job of ``napari-wpp predict`` (in memory, or into a zarr array for
stacks too large for memory), with progress (also in napari's activity dock) and Cancel.

Intensities are handled by the job's one rule (:func:`napari_wpp.jobs.predict.
input_normalisation`, computed on the whole layer even when one slice is run) and the result
has the input's dtype. The output layer ``"<source> superresolved"`` overlays the source (scale
``s / q``, translate ``t − s·(q − 1) / (2q)`` on the superresolved axes, see
:mod:`napari_wpp.widgets._layers`), carries its provenance in ``metadata["napari_wpp"]`` and is
updated in place when the widget runs again. A zarr result is shown lazily (dask).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, LineEdit, PushButton
from psygnal import evented
from qtpy.QtWidgets import QFileDialog, QGroupBox

from napari_wpp.core.config import PredictSpec
from napari_wpp.core.errors import InputError
from napari_wpp.jobs.predict import (
    NormalisationChosen,
    OutputWritten,
    PredictSource,
    PredictTarget,
    predict_job,
)
from napari_wpp.widgets._base import NO_LAYER, JobLaunch, LayerChoice, job_finished_alias
from napari_wpp.widgets._forms import device_choices, spec_default, spec_form, spec_from_values
from napari_wpp.widgets._layers import (
    crop_geometry,
    current_index,
    full_resolution,
    greyscale_images,
    layer_files,
    layer_with_role,
    show_result,
    superresolved_provenance,
)
from napari_wpp.widgets._layout import group_box, scrolled_column, shrinkable
from napari_wpp.widgets._model_source import ModelDockWidget, ModelSourcePanel
from napari_wpp.widgets._transport_panel import TransportPanel

if TYPE_CHECKING:
    import napari


__all__ = ["SuperresolveSettings", "SuperresolveWidget", "output_name"]

EXTENTS = (("Current slice", "slice"), ("Whole stack", "stack"))
#: The prediction fields the widget shows (the sampling fields are the Uncertainty widget's).
FORM_FIELDS = ("axis", "tile", "batch_size", "device")


def output_name(source: str) -> str:
    """Name of the superresolved layer of the layer ``source``."""
    return f"{source} superresolved"


@evented
@dataclass
class SuperresolveSettings:
    """The Superresolve widget's choices (the prediction fields default to the spec's).

    Parameters
    ----------
    model_source
        ``"session"`` (the session's model) or ``"file"`` (``model_file``).
    model_file
        Path of a ``.safetensors`` model file.
    input_layer
        Name of the image layer to superresolve (2D image or 3D stack).
    axis, tile, batch_size, device
        The :class:`~napari_wpp.core.config.PredictSpec` fields (``tile`` 0: whole slices).
    extent
        ``"slice"``: only the slice shown in the viewer; ``"stack"``: every slice.
    to_zarr, zarr_path
        Write a whole-stack result to this zarr array and show it lazily.
    """

    model_source: str = "session"
    model_file: str = ""
    input_layer: str = NO_LAYER
    axis: int = field(default_factory=spec_default(PredictSpec, "axis"))
    extent: str = "stack"
    tile: int = field(default_factory=spec_default(PredictSpec, "tile"))
    batch_size: int = field(default_factory=spec_default(PredictSpec, "batch_size"))
    device: str = field(default_factory=spec_default(PredictSpec, "device"))
    to_zarr: bool = False
    zarr_path: str = ""


class SuperresolveWidget(ModelDockWidget):
    """Dock widget: superresolve an image layer with the session's model or a model file.

    Public methods (used by the buttons and by scripts/tests): :meth:`run`, :meth:`cancel`,
    :meth:`load_model`, :meth:`shutdown`. Errors become napari notifications; the methods
    then return ``None``. :attr:`superresolve_finished` is emitted at the end of a run with
    the output layer (``None`` when the run failed or was cancelled).
    """

    job_title = "superresolution"
    superresolve_finished = job_finished_alias("Qt signal: a run ended (output layer or None).")
    progress_unit = "slices"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, SuperresolveSettings())
        self.model_panel = ModelSourcePanel(self)
        self.model_label = self.model_panel.label
        self.transport_panel = TransportPanel(napari_viewer)
        scrolled_column(
            self,
            [self.model_panel, self._input_box(), self._output_box(), self.transport_panel],
        )
        self.superresolve_finished.connect(self._attach_transport)
        self.watch_layers(self._refresh_layers)
        self.listen_settings(
            self._update_controls, "model_source", "model_file", "input_layer", "extent", "to_zarr"
        )
        self._update_controls()

    # ------------------------------------------------------------------ UI
    def _input_box(self) -> QGroupBox:
        self.layer_choice = LayerChoice(
            self, "input_layer", greyscale_images, layer_with_role("lr"), label="Image layer"
        )
        self.form = self.bind_form(
            spec_form(
                PredictSpec,
                FORM_FIELDS,
                axis={"label": "Slice axis", "min": 0},
                tile={"label": "Tiles (px, 0: off)"},
                device={"choices": device_choices()},
            )
        )
        self.form.insert(0, self.layer_choice.combo)
        self.extent = self.bind(
            "extent", shrinkable(ComboBox(label="Superresolve", choices=EXTENTS))
        )
        self.form.insert(2, self.extent)
        return group_box("Input", self.form)

    def _output_box(self) -> QGroupBox:
        self.zarr_check = self.bind(
            "to_zarr", CheckBox(text="Write the stack to a zarr array (shown lazily)")
        )
        self.zarr_check.tooltip = "For stacks too large for memory; only for the whole stack"
        self.zarr_edit = self.bind("zarr_path", LineEdit())
        self.zarr_edit.native.setPlaceholderText("result.zarr")
        self.zarr_browse = PushButton(text="…")
        self.zarr_browse.native.setMaximumWidth(32)
        self.zarr_browse.changed.connect(self._choose_zarr_path)
        row = Container(widgets=[self.zarr_edit, self.zarr_browse], layout="horizontal")
        row.margins = (0, 0, 0, 0)
        form = Container(widgets=[self.zarr_check, row], labels=False)
        form.margins = (0, 0, 0, 0)
        return group_box("Output", form, self.job_controls("Superresolve"))

    def _refresh_layers(self, *_args: Any) -> None:
        self.layer_choice.refresh()
        self._update_controls()

    def _update_controls(self, *_args: Any) -> None:
        super()._update_controls()
        running = self.worker is not None
        name = self.settings.input_layer
        ndim = 0
        if name and name in self.viewer.layers:
            ndim = len(getattr(full_resolution(self.viewer.layers[name]), "shape", ()))
        stack = ndim == 3
        self.form.axis.enabled = self.extent.enabled = stack and not running
        whole = not stack or self.settings.extent == "stack"
        self.zarr_check.enabled = whole and not running
        zarr = whole and self.settings.to_zarr and not running
        self.zarr_edit.enabled = self.zarr_browse.enabled = zarr

    # ------------------------------------------------------------------ running
    def prepare_run(self) -> JobLaunch:
        """Check the choices and describe the superresolution job (``InputError``: the fix)."""
        s = self.settings
        layer, state, model_file, q = self.model_and_input("input layer")
        data = full_resolution(layer)
        ndim = len(data.shape)
        axis = int(s.axis) if ndim == 3 else 0
        if ndim == 3 and not 0 <= axis < 3:
            raise InputError(f"slice axis {axis} is out of range: use 0, 1 or 2")
        whole = ndim == 2 or s.extent == "stack"
        index = None
        start = [0] * ndim
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
            start[axis] = index
            what = f"slice {index} (axis {axis}) of {layer.name}"
        spec = spec_from_values(
            PredictSpec,
            {"axis": axis, "tile": s.tile, "batch_size": s.batch_size, "device": s.device},
        )
        provenance = superresolved_provenance(
            layer.name,
            state,
            model_file,
            q,
            axis=axis if ndim == 3 else None,
            slice=index,
            tile=spec.tile,
        )
        zarr_out = zarr_in = None
        if whole and s.to_zarr:
            zarr_out, zarr_in = self._zarr_paths(layer, data)
            provenance["zarr"] = str(zarr_out)
        source = PredictSource(
            data=run_data,
            name=str(zarr_in.resolve()) if zarr_in is not None else layer.name,
            zarr_path=zarr_in,
            pixel_size=tuple(float(v) for v in layer.scale),
            volume=data,
        )
        target = PredictTarget(
            path=zarr_out,
            provenance={"model_file": model_file, "model_step": int(state.step)},
        )
        return JobLaunch(
            predict_job,
            (spec, state.model, state.normalisation, source, target),
            total=slices,
            activity="Superresolving",
            status=f"Superresolving {what}…",
            context={
                "layer_name": layer.name,
                "spec": spec,
                "axis": axis,
                "index": index,
                "zarr_out": zarr_out,
                "slices": slices,
                "geometry": crop_geometry(layer, start, q, axis),
                "contrast_limits": tuple(float(v) for v in layer.contrast_limits),
                "provenance": provenance,
            },
        )

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
        from napari_wpp.io import check_not_an_input

        check_not_an_input([out], [("input", zarr_in), *layer_files(self.viewer)])
        return out, zarr_in

    # ------------------------------------------------------------------ worker events
    def on_job_event(self, item: Any) -> None:
        """Show progress, then the result layer (in memory or lazily from the zarr array)."""
        from napari_wpp.core.inference import InferenceFinished, InferenceProgress

        run = self.current_run
        if isinstance(item, NormalisationChosen):
            run["provenance"]["normalisation"] = item.normalisation
            run["provenance"]["normalisation_from"] = item.how
        elif isinstance(item, InferenceProgress):
            self.show_progress(item.done, item.total, item.elapsed_s, "Slice")
        elif isinstance(item, InferenceFinished):
            run["finished"] = item
            if not item.stopped_early and item.result is not None:
                result = item.result
                if run["index"] is not None:
                    result = np.expand_dims(result, run["axis"])
                self._set_output(result)
        elif isinstance(item, OutputWritten):
            import dask.array as da

            from napari_wpp.io import open_zarr_array

            self._set_output(da.from_zarr(open_zarr_array(item.paths["result"])))

    def _set_output(self, data: Any) -> None:
        run = self.current_run
        run["layer"] = show_result(self.viewer, output_name(run["layer_name"]), data, run)

    def _attach_transport(self, layer: Any) -> None:
        """Put the perception ↔ fidelity panel on a new result (prepared when a reference
        or transport file is chosen)."""
        run = self.current_run
        if layer is None or "normalisation" not in run["provenance"]:
            return
        from napari_wpp.core.operators import operator_from_dict

        try:
            state, _ = self.model_panel.state()
            operator = operator_from_dict(dict(state.operator))
        except (InputError, TypeError, ValueError, AttributeError):
            operator = None  # no operator recorded: no data residual
        source = self.viewer.layers[run["layer_name"]]
        axis = run["axis"] if layer.ndim == 3 else None
        panel = self.transport_panel
        panel.attach(layer, run["provenance"]["normalisation"], axis, source, operator)
        if panel.transport_file.value.strip() or panel.reference.value not in (None, "(none)"):
            if isinstance(layer.data, np.ndarray):
                panel._guarded(panel.prepare)

    def done_text(self, run: dict[str, Any]) -> str:
        """``Done in 1.2 s: <layer>`` with its shape, dtype and zarr array."""
        layer = run["layer"]
        where = f" ({run['zarr_out']})" if run.get("zarr_out") else ""
        shape = " × ".join(str(n) for n in layer.data.shape)
        return (
            f"Done in {run['finished'].elapsed_s:.1f} s: {layer.name}\n{shape} "
            f"{layer.data.dtype}{where}"
        )

    def _choose_zarr_path(self, *_args: Any) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Write the result to", "result.zarr", "")
        if path:
            if Path(path).suffix.lower() != ".zarr":
                path += ".zarr"
            self.settings.zarr_path = path
