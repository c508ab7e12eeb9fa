"""The "Checks without ground truth" panel of the Reference & operator dock.

With the session's reference and operator and an LR layer, it maps how well the reference
explains the LR data (:func:`napari_wpp.core.suitability.suitability`, a layer over the LR
layer, the summary in a label) and searches the blur σ under which the reference best matches
the data (:func:`napari_wpp.core.suitability.estimate_blur_sigma`), warning when the typed σ
is far from it. Both run on the LR slice shown, in a thread worker (seconds to tens of seconds
on a 150² slice): napari stays responsive, and the buttons wait until the check has ended.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from magicgui.widgets import Container, PushButton
from qtpy.QtWidgets import QGroupBox

from napari_wpp.core.config import BlurCheckSpec, SuitabilitySpec
from napari_wpp.core.errors import InputError
from napari_wpp.jobs.suitability import sigma_warning
from napari_wpp.widgets._base import LayerChoice, or_notify
from napari_wpp.widgets._forms import read_spec, spec_form
from napari_wpp.widgets._layers import greyscale_images, pair_lr_default, shown_plane
from napari_wpp.widgets._layout import group_box, note_label
from napari_wpp.widgets._notify import notify_error, notify_warning
from napari_wpp.widgets._workers import StoppableWorker, WorkerFailure, start_job

__all__ = ["SuitabilityPanel"]

#: Display range of the score map (0 .. twice the upper end of "partly").
MAP_LIMITS = (0.0, 16.0)


class SuitabilityPanel:
    """The panel's widgets and actions, owned by the Reference & operator dock ``owner``."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.worker: StoppableWorker | None = None
        self.results: list[Any] = []
        self.lr_choice = LayerChoice(
            owner, "check_lr_layer", greyscale_images, pair_lr_default, label="LR data"
        )
        self.form = spec_form(SuitabilitySpec, ["noise_std"])
        self.form.insert(0, self.lr_choice.combo)
        self.map_button = PushButton(text="Map suitability")
        self.sigma_button = PushButton(text="Check σ")
        self.map_button.changed.connect(self.map_suitability)
        self.sigma_button.changed.connect(self.check_sigma)
        self.label = note_label("Uses the session's reference and operator.")
        buttons = Container(widgets=[self.map_button, self.sigma_button], layout="horizontal")
        self.box: QGroupBox = group_box(
            "Checks without ground truth", self.form, buttons, self.label
        )

    def _inputs(self) -> tuple[Any, np.ndarray, Any]:
        """(LR layer, its shown plane normalised to [0, 1], the reference as float32)."""
        from napari_wpp.core.intensity import Normalisation

        session, viewer = self.owner.session, self.owner.viewer
        name = self.owner.settings.check_lr_layer
        if not name or name not in viewer.layers:
            raise InputError("no LR data layer chosen: open the LR data and choose it")
        if session.reference is None:
            raise InputError("no reference yet: press 'Use as reference' first")
        layer = viewer.layers[name]
        data = np.asarray(layer.data)
        plane = np.asarray(shown_plane(layer, viewer))
        lr = Normalisation.from_array(data).apply(plane)
        reference = max(session.reference.regions, key=lambda region: region.size)
        return layer, lr, reference

    def _start(
        self, compute: Callable[[], Any], show: Callable[[Any], None], what: str
    ) -> StoppableWorker:
        """Run ``compute()`` in a worker; ``show(result)`` in the GUI thread when it is done."""
        self.map_button.enabled = self.sigma_button.enabled = False
        self.label.setText(f"{what}…")
        self.results: list[Any] = []

        def job() -> Any:
            yield compute()

        def on_yield(value: Any) -> None:
            if isinstance(value, WorkerFailure):
                self.label.setText(f"{what} failed.")
                notify_error(value.error)
            else:
                self.results.append(value)
                or_notify(show, value)

        def on_finish() -> None:
            self.worker = None
            self.map_button.enabled = self.sigma_button.enabled = True

        self.worker = start_job(
            job, stop=threading.Event(), on_yield=on_yield, on_finish=on_finish, name=what
        )
        return self.worker

    def _start_map(self) -> StoppableWorker:
        from napari_wpp.core.suitability import suitability

        operator = self.owner.session.operator
        if operator is None:
            raise InputError("no operator yet: use the parametric or an estimated operator first")
        layer, lr, reference = self._inputs()
        spec = read_spec(self.form, SuitabilitySpec())
        return self._start(
            lambda: suitability(lr, reference, operator, spec),
            lambda result: self._show_map(layer, result),
            "Mapping suitability",
        )

    def _show_map(self, layer: Any, result: Any) -> None:
        name = f"{layer.name} suitability"
        viewer = self.owner.viewer
        scale, translate = tuple(layer.scale)[-2:], tuple(layer.translate)[-2:]
        if name in viewer.layers:
            viewer.layers[name].data = result.score_map[0]
        else:
            viewer.add_image(
                result.score_map[0], name=name, colormap="inferno", opacity=0.6,
                contrast_limits=MAP_LIMITS, scale=scale, translate=translate, blending="additive",
            )  # fmt: skip
        self.label.setText(
            f"Median score {result.median_score:.2f}: {result.verdict} (≤ 4 suits, ≤ 8 partly); "
            f"{100 * result.unexplained:.0f} % of LR pixels above 8"
        )

    def map_suitability(self, *_args: Any) -> StoppableWorker | None:
        """Start mapping the suitability of the session's reference for the shown LR slice.

        Returns the worker (its result lands in :attr:`results`), or ``None`` after a
        notification on bad input.
        """
        return or_notify(self._start_map)

    def _start_sigma(self) -> StoppableWorker:
        from napari_wpp.core.suitability import estimate_blur_sigma

        _, lr, reference = self._inputs()
        settings = self.owner.settings
        spec = BlurCheckSpec(scale=int(settings.scale), kernel_size=int(settings.kernel_size))
        typed = settings.operator_spec().resolved_sigma
        return self._start(
            lambda: estimate_blur_sigma(lr, reference, spec),
            lambda fit: self._show_sigma(fit, typed),
            "Searching the blur σ",
        )

    def _show_sigma(self, fit: Any, typed: float) -> None:
        warning = sigma_warning(typed, fit.sigma)
        text = f"σ best matching the data: {fit.sigma:.2f} px (typed {typed:g} px)"
        self.label.setText(text + (f" — {warning}" if warning else ""))
        if warning:
            notify_warning(warning)

    def check_sigma(self, *_args: Any) -> StoppableWorker | None:
        """Start the search of the blur σ of the parametric operator's scale (shown LR slice).

        Returns the worker, or ``None`` after a notification on bad input.
        """
        return or_notify(self._start_sigma)
