"""The widget base: forms from specs, settings binding, layer choices and their lifetime."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from psygnal import evented  # noqa: E402

from napari_wpp.core.config import PredictSpec, bounds, help_text  # noqa: E402
from napari_wpp.widgets._base import NO_LAYER, JobDockWidget, LayerChoice  # noqa: E402
from napari_wpp.widgets._forms import (  # noqa: E402
    read_spec,
    spec_default,
    spec_form,
    spec_from_values,
)


def test_form_from_spec_round_trip_and_bounds(qtbot) -> None:
    form = spec_form(PredictSpec, tile={"label": "Tiles (0: off)"})
    assert [widget.name for widget in form] == [f.name for f in dataclasses.fields(PredictSpec)]
    assert read_spec(form, PredictSpec()) == PredictSpec()  # None tile shown as 0 and back
    for name in ("batch_size", "samples", "seed", "temperature"):
        assert (form[name].min, form[name].max) == bounds(PredictSpec, name)
        assert form[name].value == getattr(PredictSpec(), name)
        assert form[name].tooltip == help_text(PredictSpec, name)
    assert form.tile.min == 0 and form.tile.label == "Tiles (0: off)"
    changed = PredictSpec(tile=32, batch_size=2, temperature=0.5, keep_samples=True, seed=9)
    for field in dataclasses.fields(changed):
        form[field.name].value = getattr(changed, field.name) or 0
    assert read_spec(form, PredictSpec()) == changed
    form.tile.value = 0
    assert read_spec(form, changed).tile is None
    assert spec_from_values(PredictSpec, {"tile": 0, "samples": 3}) == PredictSpec(samples=3)


def test_a_changed_spec_default_shows_in_the_form(qtbot, monkeypatch) -> None:
    monkeypatch.setattr(PredictSpec.__dataclass_fields__["batch_size"], "default", 7)
    monkeypatch.setattr(PredictSpec.__dataclass_fields__["tile"], "default", 64)
    form = spec_form(PredictSpec, ["batch_size", "tile"])
    assert form.batch_size.value == 7 and form.tile.value == 64
    assert "(default 7)" in form.batch_size.tooltip
    assert spec_default(PredictSpec, "batch_size")() == 7


@evented
@dataclass
class _Settings:
    image: str = NO_LAYER
    truth: str = NO_LAYER
    batch_size: int = dataclasses.field(default_factory=spec_default(PredictSpec, "batch_size"))


class _Widget(JobDockWidget):
    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer, _Settings())
        images = lambda viewer: [layer for layer in viewer.layers if layer.ndim == 2]  # noqa: E731
        self.image_choice = LayerChoice(self, "image", images)
        self.truth_choice = LayerChoice(
            self, "truth", images, lambda layers: "truth", empty_text="(none)", optional=True
        )
        self.batch = self.bind("batch_size", spec_form(PredictSpec, ["batch_size"]).batch_size)
        self.job_controls("Run")
        self.watch_layers(self.refresh)

    def refresh(self, *_args) -> None:
        self.image_choice.refresh()
        self.truth_choice.refresh()


def test_binding_and_layer_choices(make_napari_viewer, qtbot) -> None:
    viewer = make_napari_viewer()
    widget = _Widget(viewer)
    qtbot.addWidget(widget)
    assert widget.settings.image == NO_LAYER and widget.image_choice.combo.value == NO_LAYER
    viewer.add_image(np.zeros((4, 4)), name="a")
    viewer.add_image(np.zeros((4, 4)), name="truth")
    assert widget.settings.image == "a" and widget.settings.truth == "truth"
    widget.settings.truth = NO_LAYER  # the user's "none" stays chosen
    viewer.add_image(np.zeros((4, 4)), name="b")
    assert widget.settings.truth == NO_LAYER
    viewer.layers["a"].name = "renamed"
    assert widget.settings.image == "renamed"
    assert widget.image_choice.combo.choices == ("renamed", "truth", "b")
    # settings ↔ widget; a value the spin box refuses stays in the settings for the job's check
    widget.batch.value = 3
    assert widget.settings.batch_size == 3
    widget.settings.batch_size = 5
    assert widget.batch.value == 5
    widget.settings.batch_size = 0
    assert widget.settings.batch_size == 0 and widget.batch.value == 5


def test_viewer_callbacks_are_disconnected_when_the_widget_is_destroyed(
    make_napari_viewer, qtbot
) -> None:
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 4)), name="a")
    inserted = viewer.layers.events.inserted
    name_events = viewer.layers["a"].events.name
    session_events = JobDockWidget(viewer, _Settings()).session.events.model
    before = (len(inserted.callbacks), len(name_events.callbacks), len(session_events))
    dock = viewer.window.add_dock_widget(_Widget(viewer), name="base")
    widget = dock.widget()
    widget.listen(session_events, widget.refresh)
    assert len(inserted.callbacks) > before[0] and len(name_events.callbacks) > before[1]
    assert len(widget.connections) > 0
    viewer.window.remove_dock_widget(dock)
    qtbot.waitUntil(lambda: len(inserted.callbacks) == before[0], timeout=5000)
    assert len(name_events.callbacks) == before[1] and len(session_events) == before[2]
    viewer.add_image(np.zeros((4, 4)), name="after")  # no callback of the widget runs
