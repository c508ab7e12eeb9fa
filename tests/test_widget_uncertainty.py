"""The Uncertainty dock widget: samples, mean and std layers, statistics, calibration, errors."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_wpp.core.inference import run_sample  # noqa: E402
from napari_wpp.core.intensity import Normalisation  # noqa: E402
from napari_wpp.core.uncertainty import calibration, edge_flat_std_ratio  # noqa: E402
from napari_wpp.data import synthetic_material  # noqa: E402
from napari_wpp.widgets._session import session_for  # noqa: E402
from napari_wpp.widgets.uncertainty import (  # noqa: E402
    UncertaintyWidget,
    share_above,
    truth_index,
)

TIMEOUT_MS = 60_000
Q = 4
LR_NAME = "LR"
LR_SCALE = (1.0, 4.0, 4.0)
LR_TRANSLATE = (2.0, 1.5, 1.5)  # the ×4 LR grid over an HR truth at translate (2, 0, 0)
TRUTH_TRANSLATE = (2.0, 0.0, 0.0)
TINY_FLOW = {"steps": 1, "hidden": 8, "cond_features": 4, "mean_features": 8, "mean_blocks": 2}


@pytest.fixture(scope="module")
def material():
    return synthetic_material(shape=(3, 64, 64), scale=Q, seed=3)


@pytest.fixture(scope="module")
def flow_state(material):
    """A WPPFlow trained for 2 steps by the core training loop (untrained quality is fine)."""
    from napari_wpp.core.training import TrainingConfig, run_training

    norm = Normalisation.from_array(material.lr)
    config = TrainingConfig(
        model="wppflow",
        steps=2,
        batch_size=2,
        crop_size=12,
        n_reference_patches=200,
        psi_passes=1,
        patches_per_step=1500,
        mixed_precision="off",
        device="cpu",
        model_options=TINY_FLOW,
    )
    reference = (material.reference[:48, :48] / 255.0).astype(np.float32)
    final = run_training(
        norm.apply(material.lr),
        reference,
        material.operator,
        config,
        normalisation=norm.to_dict(),
    )
    return final.state


@pytest.fixture
def setup(make_napari_viewer, material, flow_state):
    viewer = make_napari_viewer()
    viewer.add_image(
        material.lr,
        name=LR_NAME,
        scale=LR_SCALE,
        translate=LR_TRANSLATE,
        contrast_limits=(0, 255),
        metadata={"napari_wpp": {"role": "lr"}},
    )
    viewer.add_image(
        material.hr,
        name="truth",
        translate=TRUTH_TRANSLATE,
        metadata={"napari_wpp": {"role": "truth"}},
    )
    session = session_for(viewer)
    session.model = flow_state
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Uncertainty")
    assert isinstance(widget, UncertaintyWidget)
    widget.settings.device = "cpu"
    widget.settings.k = 3
    widget.settings.batch_size = 2
    return viewer, session, widget


def _run(qtbot, widget: UncertaintyWidget):
    with qtbot.waitSignal(widget.uncertainty_finished, timeout=TIMEOUT_MS) as blocker:
        assert widget.run() is not None
    return blocker.args[0]


def _expected(flow_state, lr_region: np.ndarray, k: int, slice_index: int, seed: int = 0):
    norm = Normalisation.from_array(lr_region)
    return norm, run_sample(
        flow_state.model,
        norm.apply(lr_region),
        k,
        seed=seed,
        device="cpu",
        keep_samples=True,
        slice_index=slice_index,
    )


def test_opens_with_the_sample_roles(setup) -> None:
    viewer, session, widget = setup
    assert widget.session is session
    assert widget.settings.input_layer == LR_NAME  # the layer whose role is "lr"
    assert widget.settings.truth_layer == "truth"  # the layer whose role is "truth"
    assert widget.settings.region_shapes == ""  # whole slice until a rectangle is chosen
    assert "WPPFlow" in widget.model_label.text()
    # "none" chosen by the user stays chosen when the layer list changes
    widget.settings.truth_layer = ""
    viewer.add_image(np.zeros((4, 4), np.uint8), name="other")
    assert widget.settings.truth_layer == ""
    assert widget.statistics() is None


def test_slice_layers_geometry_statistics_and_calibration(
    setup, qtbot, material, flow_state, errors
) -> None:
    viewer, session, widget = setup
    widget.settings.keep_samples = True
    widget.settings.seed = 5
    viewer.dims.set_point(0, LR_TRANSLATE[0] + 1.0)  # data slice 1
    mean_layer = _run(qtbot, widget)
    assert errors == []
    assert mean_layer is not None and mean_layer.name == "LR mean"
    norm, expected = _expected(flow_state, material.lr[1], 3, slice_index=1, seed=5)

    mean = viewer.layers["LR mean"]
    std = viewer.layers["LR std"]
    samples = viewer.layers["LR samples"]
    assert mean.data.shape == (1, 64, 64) and mean.data.dtype == np.uint8
    assert std.data.shape == (1, 64, 64) and std.data.dtype == np.float32
    assert samples.data.shape == (3, 1, 64, 64)
    assert np.array_equal(mean.data[0], norm.invert(expected.mean))
    np.testing.assert_allclose(std.data[0], expected.std * 255.0, rtol=1e-5, atol=1e-4)
    assert np.array_equal(samples.data[:, 0], norm.invert(expected.samples))
    # superresolved geometry over the slice: it overlays the HR truth pixel for pixel
    assert tuple(mean.scale) == pytest.approx((1.0, 1.0, 1.0))
    assert tuple(mean.translate) == pytest.approx((3.0, 0.0, 0.0))
    assert tuple(std.translate) == pytest.approx((3.0, 0.0, 0.0))
    assert tuple(samples.scale) == pytest.approx((1.0, 1.0, 1.0, 1.0))
    assert tuple(samples.translate) == pytest.approx((0.0, 3.0, 0.0, 0.0))
    assert std.colormap.name == "magma" and std.blending == "additive"
    meta = mean.metadata["napari_wpp"]
    assert meta["role"] == "superresolved" and meta["statistic"] == "mean"
    assert meta["source"] == LR_NAME and meta["model_kind"] == "wppflow"
    assert meta["slice"] == 1 and meta["k"] == 3 and meta["seed"] == 5
    assert meta["scale"] == Q and meta["ground_truth"] == "truth"
    assert meta["normalisation"] == norm.to_dict()
    assert std.metadata["napari_wpp"]["statistic"] == "std"
    assert samples.metadata["napari_wpp"]["sample_axis"] == 0

    # statistics: max std, share above the threshold (live), calibration against the truth
    stats = widget.statistics()
    assert stats["max_std"] == pytest.approx(float(std.data.max()))
    threshold = 0.05 * 255.0
    assert stats["threshold"] == pytest.approx(threshold)
    assert stats["share_above"] == pytest.approx(float(np.mean(std.data > threshold)))
    widget.settings.threshold_percent = 0.0
    assert widget.statistics()["share_above"] == pytest.approx(float(np.mean(std.data > 0)))
    assert "%" in widget.share_label.text()
    truth01 = Normalisation.from_array(material.hr).apply(material.hr[1], clip=False)
    reference = calibration(truth01, expected.mean, expected.std)
    reference.update(edge_flat_std_ratio(truth01, expected.std))
    for key in ("coverage_1sd", "coverage_3sd", "std_error_pearson", "edge_flat_ratio"):
        assert stats[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6)
    assert not widget.calibration_box.isHidden()
    assert "Gaussian 68.3 %" in widget.coverage_labels[0].text()

    # the overlay checkbox switches the std layer's blending
    widget.overlay_check.value = False
    assert std.blending == "translucent"

    # a rectangle, no samples: the same mean/std layers are updated in place
    rectangle = np.array([[8.0, 16.0], [8.0, 40.0], [40.0, 40.0], [40.0, 16.0]])
    viewer.add_shapes([rectangle], shape_type="rectangle", name="roi")
    widget.settings.region_shapes = "roi"
    widget.settings.keep_samples = False
    again = _run(qtbot, widget)
    assert getattr(again, "__wrapped__", again) is mean
    assert "LR samples" not in viewer.layers  # stale samples of the first run are gone
    # LR pixel centres 1.5 + 4·i inside y ∈ [8, 40] and x ∈ [16, 40]: rows 2..9, columns 4..9
    assert mean.data.shape == (1, 32, 24) and std.data.shape == (1, 32, 24)
    assert tuple(mean.translate) == pytest.approx((3.0, 8.0, 16.0))
    assert std.blending == "translucent"
    norm, expected = _expected(flow_state, material.lr[1, 2:10, 4:10], 3, slice_index=1, seed=5)
    assert np.array_equal(mean.data[0], norm.invert(expected.mean))
    assert mean.metadata["napari_wpp"]["region"]["rows"] == [2, 10]
    assert mean.metadata["napari_wpp"]["region"]["columns"] == [4, 10]
    assert errors == []


def test_2d_layer_and_model_file(make_napari_viewer, qtbot, material, flow_state, tmp_path):
    from napari_wpp.io import save_model

    viewer = make_napari_viewer()
    viewer.add_image(material.lr[0], name="plane", scale=(0.5, 0.5), translate=(1.0, -2.0))
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Uncertainty")
    path = save_model(tmp_path / "flow.safetensors", flow_state)
    assert widget.load_model(path) is not None
    widget.settings.device = "cpu"
    widget.settings.k = 2
    widget.settings.keep_samples = True
    mean = _run(qtbot, widget)
    assert mean.data.shape == (64, 64)
    samples = viewer.layers["plane samples"]
    assert samples.data.shape == (2, 64, 64)
    shift = 0.5 * (Q - 1) / (2 * Q)
    assert tuple(mean.scale) == pytest.approx((0.125, 0.125))
    assert tuple(mean.translate) == pytest.approx((1.0 - shift, -2.0 - shift))
    assert tuple(samples.translate) == pytest.approx((0.0, 1.0 - shift, -2.0 - shift))
    assert mean.metadata["napari_wpp"]["model_file"] == str(path.resolve())
    assert mean.metadata["napari_wpp"]["slice"] is None
    assert widget.calibration_box.isHidden()  # no ground truth
    assert widget.statistics()["max_std"] > 0


def test_cancel_leaves_layers_unchanged(setup, qtbot) -> None:
    viewer, session, widget = setup
    widget.settings.k = 400
    widget.settings.batch_size = 1
    with qtbot.waitSignal(widget.uncertainty_finished, timeout=TIMEOUT_MS) as blocker:
        assert widget.run() is not None
        widget.cancel()
        assert not widget.cancel_button.isEnabled()
    assert blocker.args[0] is None
    assert "LR mean" not in viewer.layers and "LR std" not in viewer.layers
    assert "Cancelled" in widget.status_label.text()
    assert widget.worker is None and widget.run_button.isEnabled()


def _no_session_model(viewer, session, widget) -> None:
    session.model = None


def _a_wppnet(viewer, session, widget) -> None:
    from napari_wpp.core.models import build_model
    from napari_wpp.core.training import TrainingState

    net = build_model("wppnet", scale=Q, features=8, blocks=2)
    session.model = TrainingState(
        kind="wppnet",
        model=net,
        model_config=net.config(),
        operator={},
        lam=0.02,
        config={},
        step=1,
        elapsed_s=0.0,
    )
    assert "not a WPPFlow" in widget.model_label.text()


def _tiny_rectangle(viewer, session, widget) -> None:
    viewer.add_shapes(
        [np.array([[0.0, 0.0], [0.0, 6.0], [6.0, 6.0], [6.0, 0.0]])],
        shape_type="rectangle",
        name="tiny",
    )
    widget.settings.region_shapes = "tiny"
    assert "smaller than 4×4" in widget.region_label.text()


def _truth_off_the_grid(viewer, session, widget) -> None:
    viewer.add_image(np.zeros((3, 32, 32), np.uint8), name="coarse", scale=(1.0, 2.0, 2.0))
    widget.settings.truth_layer = "coarse"


def _negative_temperature(viewer, session, widget) -> None:
    widget.settings.temperature = -1.0  # the spin box refuses it; a script may not


@pytest.mark.parametrize(
    ("make_bad", "in_worker", "message"),
    [
        (_no_session_model, False, "no model in this session"),
        (_a_wppnet, False, "not a WPPFlow"),
        (_tiny_rectangle, False, "draw a larger rectangle"),
        (_truth_off_the_grid, False, "not on the superresolved pixel grid"),
        (_negative_temperature, True, "temperature"),
    ],
)
def test_bad_input_gives_a_notification(setup, qtbot, errors, make_bad, in_worker, message):
    viewer, session, widget = setup
    make_bad(viewer, session, widget)
    if in_worker:
        assert _run(qtbot, widget) is None
    else:
        assert widget.run() is None
    assert message in errors[-1]
    assert len(errors) == 1 and widget.worker is None
    assert "LR mean" not in viewer.layers


def test_missing_model_file_gives_a_notification(setup, tmp_path, errors) -> None:
    _viewer, _session, widget = setup
    assert widget.load_model(tmp_path / "missing.safetensors") is None
    assert "does not exist" in errors[-1] and len(errors) == 1


def test_truth_index_and_share_above() -> None:
    from napari.layers import Image

    from napari_wpp.core.errors import InputError

    truth = Image(np.zeros((5, 40, 30), np.uint8), name="t", translate=(1.0, -2.0, 3.0))
    index = truth_index(truth, (1.0, 1.0, 1.0), (3.0, 2.0, 5.0), (8, 6))
    assert index == (2, slice(4, 12), slice(2, 8))
    with pytest.raises(InputError, match="does not cover"):
        truth_index(truth, (1.0, 1.0, 1.0), (3.0, 2.0, 5.0), (80, 6))
    with pytest.raises(InputError, match="pixel grid"):
        truth_index(truth, (1.0, 0.5, 0.5), (3.0, 2.0, 5.0), (8, 6))
    with pytest.raises(InputError, match="pixel grid"):
        truth_index(truth, (1.0, 1.0, 1.0), (3.0, 2.5, 5.0), (8, 6))
    plane = Image(np.zeros((40, 30), np.uint8), name="p")
    with pytest.raises(InputError, match="3D but the LR layer is 2D"):
        truth_index(truth, (1.0, 1.0), (0.0, 0.0), (8, 6))
    assert truth_index(plane, (1.0, 1.0, 1.0), (7.0, 1.0, 2.0), (8, 6)) == (
        slice(1, 9),
        slice(2, 8),
    )
    std = np.array([[0.0, 1.0], [2.0, 3.0]])
    assert share_above(std, 1.0) == 0.5 and share_above(std, -1.0) == 1.0
    assert share_above(np.zeros((0,)), 0.0) == 0.0


def test_perception_panel_moves_the_mean(setup, qtbot, material) -> None:
    viewer, _session, widget = setup
    viewer.add_image(material.reference, name="REF")
    panel = widget.transport_panel
    panel.reference.reset_choices()
    panel.reference.value = "REF"
    mean_layer = _run(qtbot, widget)
    qtbot.waitUntil(lambda: panel.preparing is None, timeout=TIMEOUT_MS)  # in a worker
    assert panel.cache is not None, panel.readout.text()
    before = np.array(mean_layer.data)
    panel.slider.value = 0.0
    assert not np.array_equal(mean_layer.data, before)
    np.testing.assert_array_equal(np.squeeze(mean_layer.data), panel.blended(0.0))
    panel.slider.value = 1.0
    np.testing.assert_array_equal(mean_layer.data, before)


def test_a_calibrated_model_shows_the_calibrated_std_and_its_promise(
    make_napari_viewer, qtbot, material, flow_state
) -> None:
    import dataclasses

    from napari_wpp.core.calibration import StdCalibration

    viewer = make_napari_viewer()
    viewer.add_image(material.lr[0], name="plane")
    session = session_for(viewer)
    calibration = StdCalibration(2.0, 0.5, 0.01, 1.2, (0.69, 0.95, 0.99), (0.3, 0.5, 0.6), 500, 16)
    session.model = dataclasses.replace(flow_state, calibration=calibration.to_dict())
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Uncertainty")
    widget.settings.device = "cpu"
    widget.settings.k = 2
    mean = _run(qtbot, widget)
    calibrated, raw = viewer.layers["plane calibrated std"], viewer.layers["plane raw std"]
    assert calibrated.visible and not raw.visible and "plane std" not in viewer.layers
    spread = widget.last_maps.intensity_range
    expected = calibration.calibrated_std(raw.data, mean.data.astype(np.float64), unit=spread)
    # the mean layer is rounded to the input's integers: its gradient differs a little
    np.testing.assert_allclose(calibrated.data, expected, rtol=0.1, atol=0.01 * spread)
    assert "69.0 / 95.0 / 99.0 %" in widget.promise_label.text()
