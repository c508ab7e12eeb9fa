"""The Train dock widget: training in a worker, live plot, preview layer, stop, files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_wpp.core.errors import InputError  # noqa: E402
from napari_wpp.data import synthetic_material  # noqa: E402
from napari_wpp.io import load_model, read_model_metadata  # noqa: E402
from napari_wpp.widgets._session import ReferenceSelection, session_for  # noqa: E402
from napari_wpp.widgets.train import TrainWidget, default_model_path, parse_lambda  # noqa: E402

TIMEOUT_MS = 60_000
LR_NAME = "LR stack"
LR_SCALE = (1.0, 4.0, 4.0)
LR_TRANSLATE = (0.0, 1.5, 1.5)


@pytest.fixture(scope="module")
def material():
    return synthetic_material(shape=(3, 64, 64), scale=4, seed=3)


def _open_widget(viewer) -> TrainWidget:
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Train")
    assert isinstance(widget, TrainWidget)
    return widget


def _tiny(widget: TrainWidget, save_path: Path, steps: int, preview_every: int = 1) -> None:
    s = widget.settings
    s.budget_unit = "steps"
    s.budget = steps
    s.batch_size = 2
    s.crop_size = 12
    s.n_reference_patches = 200
    s.preview_every = preview_every
    s.device = "cpu"
    s.save_path = str(save_path)
    s.model_options = {"features": 8, "blocks": 2}
    s.config_overrides = {"patches_per_step": 1500, "mixed_precision": "off"}


@pytest.fixture
def setup(make_napari_viewer, material):
    viewer = make_napari_viewer()
    viewer.add_image(
        material.lr,
        name=LR_NAME,
        scale=LR_SCALE,
        translate=LR_TRANSLATE,
        contrast_limits=(0, 255),
        metadata={"napari_wpp": {"role": "lr"}},
    )
    session = session_for(viewer)
    reference = (material.reference[:48, :48] / 255.0).astype(np.float32)
    session.reference = ReferenceSelection(
        [reference], {"low": 0.0, "high": 255.0, "dtype": "uint8"}, "ref", 1849
    )
    session.operator = material.operator
    return viewer, session


def test_settings_helpers(tmp_path) -> None:
    assert parse_lambda("") is None
    assert parse_lambda(" Auto ") == "auto"
    assert parse_lambda("0.02") == pytest.approx(0.02)
    for bad in ("abc", "-1", "nan"):
        with pytest.raises(InputError):
            parse_lambda(bad)
    path = default_model_path("LR stack (x4)", "wppnet", tmp_path)
    assert path.parent == tmp_path and path.suffix == ".safetensors"
    assert " " not in path.name and path.name.startswith("LR-stack-x4-wppnet-")


def test_prior_weight_is_lambda_for_a_net_and_rho_for_a_flow(setup) -> None:
    viewer, _session = setup
    widget = _open_widget(viewer)
    s = widget.settings
    s.lam = "40"
    s.model = "wppnet"
    config = s.training_config()
    assert config.lam == 40.0 and config.rho is None
    assert widget.lam_label.value == "λ"
    s.model = "wppflow"
    config = s.training_config()
    assert config.rho == 40.0 and config.lam is None
    assert widget.lam_label.value == "ρ" and "100" in widget.lam_edit.native.placeholderText()


def test_mean_warmup_is_a_flow_setting(setup) -> None:
    from napari_wpp.core import training

    viewer, _session = setup
    widget = _open_widget(viewer)
    s = widget.settings
    s.model = "wppnet"
    assert widget.warmup_spin.native.isHidden() and widget.warmup_label.native.isHidden()
    s.model = "wppflow"
    assert not widget.warmup_spin.native.isHidden()
    assert s.training_config().mean_warmup == training.DEFAULT_MEAN_WARMUP
    widget.warmup_spin.value = 0.5  # the spin box drives the settings
    assert s.mean_warmup == 0.5 and s.training_config().mean_warmup == 0.5
    s.mean_warmup = 0.0  # and the settings the spin box
    assert widget.warmup_spin.value == 0.0 and widget.warmup_spin.native.text() == "none"


def test_patch_distance_is_a_choice_of_the_form(setup) -> None:
    viewer, _session = setup
    widget = _open_widget(viewer)
    combo = widget.form.patch_distance
    assert combo.value == "exact" and list(combo.choices) == ["exact", "sliced"]
    assert widget.settings.training_config().patch_distance == "exact"
    combo.value = "sliced"  # the combo box drives the settings and the run's spec
    assert widget.settings.training_config().patch_distance == "sliced"
    widget.settings.patch_distance = "exact"
    assert combo.value == "exact"


def test_denoising_the_lr_input_is_a_wppnet_checkbox(setup) -> None:
    viewer, _session = setup
    widget = _open_widget(viewer)
    box = widget.form.lr_denoise
    assert box.value is True and widget.settings.training_config().lr_denoise is True
    box.value = False  # the check box drives the settings and the run's spec
    assert widget.settings.training_config().lr_denoise is False
    assert not box.native.isHidden()
    widget.settings.model = "wppflow"  # a flow does not denoise its input: no check box
    assert box.native.isHidden()
    widget.settings.model = "wppnet"
    assert not box.native.isHidden()


def test_a_spec_default_changes_the_form_and_the_run(setup, monkeypatch) -> None:
    """Editing a default of the training spec is the only edit the widget needs."""
    from cli_helpers import train_spec_with

    from napari_wpp.core import config

    viewer, _session = setup
    widget = _open_widget(viewer)
    assert widget.form.crop_size.value == 25 and widget.settings.training_config().crop_size == 25
    monkeypatch.setattr(config, "TrainSpec", train_spec_with(crop_size=12, mean_warmup=0.5))
    widget = TrainWidget(viewer)  # a new widget (napari reuses its open dock)
    assert widget.form.crop_size.value == 12 and widget.warmup_spin.value == 0.5
    widget.settings.model = "wppflow"
    spec = widget.settings.training_config()
    assert spec.crop_size == 12 and spec.mean_warmup == 0.5


def test_train_preview_plot_and_resume(setup, qtbot, tmp_path, errors) -> None:
    viewer, session = setup
    widget = _open_widget(viewer)
    assert widget.settings.lr_layer == LR_NAME  # the layer whose role is "lr"
    viewer.dims.set_point(0, 2.0)
    save_path = tmp_path / "tiny.safetensors"
    _tiny(widget, save_path, steps=3)
    previews = []
    widget.preview_updated.connect(previews.append)

    with qtbot.waitSignal(widget.training_finished, timeout=TIMEOUT_MS) as blocker:
        assert widget.start() is not None
        assert widget.start() is None  # a second run is refused while one runs
    state = blocker.args[0]
    assert errors == ["training is already running: stop it first"]
    assert state is not None and state.step == 3
    assert session.model is state
    assert session.model_path == str(save_path) and save_path.is_file()
    assert read_model_metadata(save_path)["step"] == 3

    # the live plot got one point per step, with positive losses
    assert widget.plot.steps == [1, 2, 3]
    assert all(v > 0 for v in widget.plot.data_terms)
    assert len(widget.plot.wpp_terms) == 3

    # preview layer: the current slice's central crop, superresolved ×4 over the LR layer
    assert len(previews) == 3
    layer = viewer.layers[f"{LR_NAME} preview"]
    # updated in place (the widget sees napari's public proxy of the layer)
    assert all(getattr(p, "__wrapped__", p) is layer for p in previews)
    assert layer.data.shape == (1, 64, 64) and layer.data.dtype == np.uint8
    assert tuple(layer.scale) == pytest.approx((1.0, 1.0, 1.0))
    # crop starts at LR pixel 0 (the LR slice is 16 px, smaller than the crop limit)
    assert tuple(layer.translate) == pytest.approx((2.0, 1.5 - 4 * 3 / 8, 1.5 - 4 * 3 / 8))
    assert layer.metadata["napari_wpp"]["role"] == "preview"
    assert layer.metadata["napari_wpp"]["slice"] == 2

    # resume continues from session.model for the budget, more steps on top
    widget.settings.budget = 2
    with qtbot.waitSignal(widget.training_finished, timeout=TIMEOUT_MS) as blocker:
        assert widget.resume() is not None
    resumed = blocker.args[0]
    assert resumed.step == 5 and session.model is resumed
    assert widget.plot.steps == [1, 2, 3, 4, 5]
    assert read_model_metadata(save_path)["step"] == 5
    assert len(errors) == 1


def test_status_shows_steps_per_second_and_device(setup, qtbot, tmp_path) -> None:
    viewer, _session = setup
    widget = _open_widget(viewer)
    _tiny(widget, tmp_path / "rate.safetensors", steps=2, preview_every=0)
    texts: list[str] = []
    set_text = widget.status_label.setText
    widget.status_label.setText = lambda text: (texts.append(text), set_text(text))
    with qtbot.waitSignal(widget.training_finished, timeout=TIMEOUT_MS):
        assert widget.start() is not None
    progress = [t for t in texts if t.startswith("Step 2/2")]
    assert progress, texts
    assert re.match(r"Step 2/2 · [0-9.]+ (steps/s|s/step) · cpu · data ", progress[-1])


def test_stop_midway_keeps_a_checkpoint(setup, qtbot, tmp_path) -> None:
    viewer, session = setup
    widget = _open_widget(viewer)
    save_path = tmp_path / "stopped.safetensors"
    _tiny(widget, save_path, steps=100_000, preview_every=0)
    with qtbot.waitSignal(widget.training_finished, timeout=TIMEOUT_MS) as blocker:
        widget.start()
        qtbot.waitUntil(lambda: len(widget.plot.steps) >= 2, timeout=TIMEOUT_MS)
        widget.stop()
        assert not widget.stop_button.isEnabled()
    state = blocker.args[0]
    assert 2 <= state.step < 100_000
    assert session.model is state and session.model_path == str(save_path)
    loaded = load_model(save_path)
    assert loaded.step == state.step and loaded.kind == "wppnet"
    assert loaded.priors and loaded.optimizer is not None  # resumable
    assert f"{LR_NAME} preview" not in viewer.layers  # previews were off
    assert "Stopped" in widget.status_label.text()


def test_closing_napari_stops_training_cleanly(setup, qtbot, tmp_path) -> None:
    viewer, _session = setup
    widget = _open_widget(viewer)
    save_path = tmp_path / "closed.safetensors"
    _tiny(widget, save_path, steps=100_000, preview_every=0)
    worker = widget.start()
    qtbot.waitUntil(lambda: len(widget.plot.steps) >= 1, timeout=TIMEOUT_MS)
    viewer.close()  # napari cancels its tasks: the worker ends its step and writes the file
    assert worker.done_event.is_set()
    assert worker.stop_event.is_set()
    assert 1 <= read_model_metadata(save_path)["step"] < 100_000


def test_save_and_load_model(setup, qtbot, tmp_path, errors) -> None:
    viewer, session = setup
    widget = _open_widget(viewer)
    assert widget.save_model(tmp_path / "none.safetensors") is None  # no model yet
    _tiny(widget, tmp_path / "run.safetensors", steps=2, preview_every=0)
    with qtbot.waitSignal(widget.training_finished, timeout=TIMEOUT_MS):
        widget.start()
    copy = widget.save_model(tmp_path / "copy.safetensors")
    assert copy is not None and session.model_path == str(copy)
    session.model = None
    loaded = widget.load_model(copy)
    assert loaded is not None and session.model is loaded and loaded.step == 2
    assert widget.plot.steps == [1, 2]  # the file's loss history is plotted
    assert widget.resume_button.isEnabled()
    assert widget.load_model(tmp_path / "missing.safetensors") is None
    assert widget.save_model(tmp_path / "model.txt") is None
    assert len(errors) == 3 and "does not exist" in errors[1] and "safetensors" in errors[2]


def _no_operator(widget, session, tmp_path) -> None:
    session.operator = None


def _no_reference(widget, session, tmp_path) -> None:
    session.reference = None


def _4d_layer(widget, session, tmp_path) -> None:
    widget.viewer.add_image(np.zeros((2, 2, 8, 8), np.uint8), name="4D")
    widget.settings.lr_layer = "4D"


def _points_layer(widget, session, tmp_path) -> None:
    # napari has no 1D image layers: a layer of another type is refused the same way
    widget.viewer.add_points(np.zeros((2, 2)), name="points")
    widget.settings.lr_layer = "points"


def _bad_lambda(widget, session, tmp_path) -> None:
    widget.settings.lam = "lots"


def _missing_folder(widget, session, tmp_path) -> None:
    widget.settings.save_path = str(tmp_path / "missing-folder" / "m.safetensors")


@pytest.mark.parametrize(
    ("spoil", "fragments"),
    [
        (_no_operator, ("operator",)),
        (_no_reference, ("reference",)),
        (_4d_layer, ("4D", "2D image or a 3D stack")),
        (_points_layer, ("not a greyscale image layer",)),
        (_bad_lambda, ("λ",)),
        (_missing_folder, ("does not exist",)),
    ],
)
def test_bad_input_gives_notifications(setup, tmp_path, errors, spoil, fragments) -> None:
    viewer, session = setup
    widget = _open_widget(viewer)
    _tiny(widget, tmp_path / "bad.safetensors", steps=2)
    spoil(widget, session, tmp_path)
    assert widget.start() is None
    assert all(fragment in errors[-1] for fragment in fragments)
    assert len(errors) == 1 and widget.worker is None


def test_resume_without_a_model_and_a_failing_run_give_notifications(
    setup, qtbot, tmp_path, errors
) -> None:
    viewer, _session = setup
    widget = _open_widget(viewer)
    _tiny(widget, tmp_path / "bad.safetensors", steps=2)
    assert widget.resume() is None  # no model yet
    assert "no model to resume" in errors[-1]

    # an error inside the worker (crops too small for the blur) is a notification too
    widget.settings.crop_size = 4
    with qtbot.waitSignal(widget.training_finished, timeout=TIMEOUT_MS) as blocker:
        assert widget.start() is not None
    assert blocker.args[0] is None
    assert "too small" in errors[-1]
    assert "failed" in widget.status_label.text()
    assert len(errors) == 2 and widget.worker is None


def test_2d_lr_image_preview(setup, qtbot, tmp_path, material) -> None:
    viewer, session = setup
    viewer.add_image(material.lr[0], name="plane", scale=(4.0, 4.0), translate=(1.5, 1.5))
    widget = _open_widget(viewer)
    widget.settings.lr_layer = "plane"
    _tiny(widget, tmp_path / "plane.safetensors", steps=1)
    with qtbot.waitSignal(widget.training_finished, timeout=TIMEOUT_MS) as blocker:
        widget.start()
    assert blocker.args[0].step == 1
    layer = viewer.layers["plane preview"]
    assert layer.data.shape == (64, 64)
    assert tuple(layer.scale) == pytest.approx((1.0, 1.0))
    assert tuple(layer.translate) == pytest.approx((0.0, 0.0))


@pytest.fixture
def warnings_shown():
    """Messages of every warning notification napari shows during the test."""
    from napari.utils.notifications import NotificationSeverity, notification_manager

    messages: list[str] = []

    def collect(notification) -> None:
        if notification.severity == NotificationSeverity.WARNING:
            messages.append(str(notification.message))

    notification_manager.notification_ready.connect(collect)
    yield messages
    notification_manager.notification_ready.disconnect(collect)


def test_stop_ends_a_step_with_absurd_psi_passes(setup, qtbot, tmp_path) -> None:
    """Stop is honoured inside the ψ ascent of a step (issue 14): no wait for 10⁵ passes."""
    viewer, _session = setup
    widget = _open_widget(viewer)
    save_path = tmp_path / "absurd.safetensors"
    _tiny(widget, save_path, steps=100_000, preview_every=0)
    widget.settings.config_overrides = {
        **widget.settings.config_overrides,
        "psi_passes": 100_000,
    }
    with qtbot.waitSignal(widget.training_finished, timeout=20_000) as blocker:
        widget.start()
        qtbot.wait(2_000)  # inside the first step's ascent
        widget.stop()
    assert blocker.args[0].step == 1
    assert read_model_metadata(save_path)["step"] == 1


def test_a_featureless_reference_is_a_warning_notification(
    setup, qtbot, tmp_path, errors, warnings_shown
) -> None:
    viewer, session = setup
    session.reference = ReferenceSelection(
        [np.full((48, 48), 0.5, np.float32)], {"low": 0.0, "high": 255.0, "dtype": "uint8"},
        "flat", 1849,
    )  # fmt: skip
    widget = _open_widget(viewer)
    _tiny(widget, tmp_path / "flat.safetensors", steps=1, preview_every=0)
    with qtbot.waitSignal(widget.training_finished, timeout=TIMEOUT_MS):
        widget.start()
    assert errors == []
    assert len([m for m in warnings_shown if "featureless" in m]) == 1, warnings_shown
