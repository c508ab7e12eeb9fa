"""The "Reconstruct" dock widget: variational superresolution of the current slice or a rectangle.

It runs :func:`napari_wpp.jobs.reconstruct.reconstruct_job`, the job of ``napari-wpp
reconstruct``, on the slice shown of an LR layer (or the part of it under the rectangle of a
Shapes layer), with the session's forward operator and one
of two priors: the WPP of the session's reference, or a trained PatchNR (the session's model or
a model file, :class:`~napari_wpp.widgets._model_source.ModelSourcePanel`). The form comes from
:class:`~napari_wpp.core.config.ReconstructSpec`. The result becomes the layer
``"<LR name> reconstructed"`` over the LR layer, or over the rectangle's pixels (updated in
place by the next run).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox
from psygnal import evented
from qtpy.QtWidgets import QGroupBox

from napari_wpp.core.config import ReconstructSpec
from napari_wpp.core.errors import InputError
from napari_wpp.widgets._base import (
    NO_LAYER,
    JobLaunch,
    LayerChoice,
    job_finished_alias,
    rectangle_choice,
)
from napari_wpp.widgets._forms import device_choices, spec_default, spec_form, spec_from_values
from napari_wpp.widgets._layers import (
    checked_image,
    crop_geometry,
    full_resolution,
    greyscale_images,
    layer_with_role,
    show_result,
    slice_region,
)
from napari_wpp.widgets._layout import group_box, scrolled_column, shrinkable
from napari_wpp.widgets._model_source import ModelDockWidget, ModelSourcePanel

if TYPE_CHECKING:
    import napari

__all__ = ["PRIORS", "ReconstructSettings", "ReconstructWidget", "output_name"]

PRIORS = (("WPP of the session's reference", "wpp"), ("PatchNR (learned prior)", "patchnr"))
#: The spec fields of the form.
FORM_FIELDS = (
    "lam",
    "patchnr_lam",
    "patchnr_patches",
    "patchnr_step",
    "iterations",
    "seed",
    "device",
)


def output_name(source: str) -> str:
    """Name of the reconstructed layer of the layer ``source``."""
    return f"{source} reconstructed"


@evented
@dataclass
class ReconstructSettings:
    """The Reconstruct widget's choices (the reconstruction fields default to the spec's).

    Parameters
    ----------
    prior
        ``"wpp"`` (the session's reference) or ``"patchnr"`` (the model source below).
    model_source, model_file
        Where the PatchNR comes from: ``"session"`` or ``"file"`` (``model_file``).
    input_layer
        Name of the LR image layer (2D image or 3D stack: the slice shown on axis 0).
    region_shapes
        Name of a Shapes layer whose rectangle cuts the slice; ``""``: the whole slice.
    lam, patchnr_lam, patchnr_patches, patchnr_step, iterations, seed, device
        The :class:`~napari_wpp.core.config.ReconstructSpec` fields.
    """

    prior: str = "patchnr"
    model_source: str = "session"
    model_file: str = ""
    input_layer: str = NO_LAYER
    region_shapes: str = NO_LAYER
    lam: float = field(default_factory=spec_default(ReconstructSpec, "lam"))
    patchnr_lam: float = field(default_factory=spec_default(ReconstructSpec, "patchnr_lam"))
    patchnr_patches: int = field(default_factory=spec_default(ReconstructSpec, "patchnr_patches"))
    patchnr_step: float = field(default_factory=spec_default(ReconstructSpec, "patchnr_step"))
    iterations: int = field(default_factory=spec_default(ReconstructSpec, "iterations"))
    seed: int = field(default_factory=spec_default(ReconstructSpec, "seed"))
    device: str = field(default_factory=spec_default(ReconstructSpec, "device"))


class ReconstructWidget(ModelDockWidget):
    """Dock widget: reconstruct the current slice of an LR layer (or a rectangle of it) with the
    WPP or a PatchNR.

    Public methods: :meth:`run`, :meth:`cancel`, :meth:`load_model`, :meth:`shutdown`.
    :attr:`reconstruct_finished` is emitted at the end of a run with the output layer (``None``
    when it failed).
    """

    job_title = "reconstruction"
    reconstruct_finished = job_finished_alias("Qt signal: a run ended (output layer or None).")
    progress_unit = "iterations"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, ReconstructSettings())
        self.model_panel = ModelSourcePanel(
            self, kind="patchnr", title="PatchNR prior", placeholder="prior.safetensors"
        )
        scrolled_column(self, [self._input_box(), self.model_panel])
        self.watch_layers(self._refresh_layers)
        self.listen_settings(self._update_controls, "prior", "model_source")
        self._update_controls()

    def _refresh_layers(self, *_args: Any) -> None:
        self.layer_choice.refresh()
        self.shapes_choice.refresh()

    def _input_box(self) -> QGroupBox:
        self.layer_choice = LayerChoice(
            self, "input_layer", greyscale_images, layer_with_role("lr"), label="LR layer"
        )
        self.shapes_choice = rectangle_choice(self)
        self.prior_choice = self.bind("prior", shrinkable(ComboBox(label="Prior", choices=PRIORS)))
        self.form = self.bind_form(
            spec_form(
                ReconstructSpec,
                FORM_FIELDS,
                lam={"label": "WPP λ"},
                patchnr_lam={"label": "PatchNR λ"},
                patchnr_patches={"label": "Patches / iteration", "step": 5000},
                patchnr_step={"label": "PatchNR step", "step": 0.005},
                device={"choices": device_choices()},
            )
        )
        self.form.insert(0, self.layer_choice.combo)
        self.form.insert(1, self.shapes_choice.combo)
        self.form.insert(2, self.prior_choice)
        controls = self.job_controls("Reconstruct")
        self.progress_bar.setFormat("%p%")  # the share of the budget
        return group_box("Current slice (or a rectangle of it)", self.form, controls)

    def _update_controls(self, *_args: Any) -> None:
        super()._update_controls()
        patchnr = self.settings.prior == "patchnr"
        self.model_panel.setVisible(patchnr)
        for name, shown in (("lam", not patchnr), ("patchnr_lam", patchnr)):
            getattr(self.form, name).enabled = shown and self.worker is None
        for name in ("patchnr_patches", "patchnr_step"):
            getattr(self.form, name).enabled = patchnr and self.worker is None

    # ------------------------------------------------------------------ running
    def prepare_run(self) -> JobLaunch:
        """Check the choices and describe the reconstruction job (``InputError``: the fix)."""
        from napari_wpp.core.devices import resolve_device
        from napari_wpp.io import ImageData
        from napari_wpp.jobs.reconstruct import reconstruct_job

        s = self.settings
        layer = checked_image(self.viewer, s.input_layer, "LR layer")
        operator = self.session.operator
        if operator is None:
            raise InputError(
                "no forward operator chosen: set one in the Reference & operator widget"
            )
        resolve_device(s.device)
        state, model_file, reference = None, None, None
        if s.prior == "patchnr":
            state, model_file = self.model_panel.state()
        else:
            chosen = self.session.reference
            if chosen is None or not chosen.regions:
                raise InputError(
                    "no HR reference chosen: choose one in the Reference & operator widget, or "
                    "use a PatchNR prior"
                )
            reference = np.asarray(chosen.regions[0], np.float32)  # the first region
        data = full_resolution(layer)
        index, rows, cols = slice_region(self.viewer, layer, s.region_shapes)
        plane = np.asarray((data if index is None else data[index])[rows, cols])
        start = [rows.start, cols.start] if index is None else [index, rows.start, cols.start]
        spec = spec_from_values(ReconstructSpec, {n: getattr(s, n) for n in FORM_FIELDS})
        lr = ImageData(array=plane)
        q = int(operator.scale)
        what = layer.name if index is None else f"slice {index} of {layer.name}"
        if plane.shape != tuple(data.shape[-2:]):
            what = (
                f"rows {rows.start}–{rows.stop - 1}, columns {cols.start}–{cols.stop - 1} of {what}"
            )
        return JobLaunch(
            functools.partial(reconstruct_job, prior=state),
            (spec, operator, lr, reference, None),
            total=1000,
            activity="Reconstructing",
            status=f"Reconstructing {what} with the {'PatchNR' if state else 'WPP'} prior…",
            context={
                "layer_name": layer.name,
                "index": index,
                "geometry": crop_geometry(layer, start, q, 0 if index is not None else None),
                "contrast_limits": tuple(float(v) for v in layer.contrast_limits),
                "provenance": {
                    "role": "reconstructed",
                    "source": layer.name,
                    "slice": index,
                    "rows": [rows.start, rows.stop],
                    "cols": [cols.start, cols.stop],
                    "prior": s.prior,
                    "prior_file": model_file,
                    "spec": spec.__dict__,
                },
            },
        )

    def on_job_event(self, item: Any) -> None:
        """Show progress, then the result layer."""
        from napari_wpp.core.reconstruct import ReconstructionProgress
        from napari_wpp.jobs.reconstruct import ReconstructResult

        run = self.current_run
        if isinstance(item, ReconstructionProgress):
            self.show_progress(int(1000 * item.fraction), 1000, item.elapsed_s, "Iteration")
        elif isinstance(item, ReconstructResult):
            run["finished"] = item
            result = item.image if run["index"] is None else item.image[None]
            run["layer"] = show_result(self.viewer, output_name(run["layer_name"]), result, run)

    def done_text(self, run: dict[str, Any]) -> str:
        """``Done: N iterations in T s → <layer>``."""
        finished = run["finished"]
        how = "Stopped" if finished.stopped_early else "Done"
        return (
            f"{how}: {finished.iterations} iterations in {finished.elapsed_s:.1f} s → "
            f"{run['layer'].name}"
        )
