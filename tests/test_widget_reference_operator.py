"""The Reference & operator dock widget in a real napari viewer (run under xvfb)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_wpp.core.intensity import Normalisation  # noqa: E402
from napari_wpp.core.operators import (  # noqa: E402
    FourierDownsampling,
    GaussianDownsampling,
)
from napari_wpp.data import default_sigma  # noqa: E402
from napari_wpp.widgets._session import session_for  # noqa: E402
from napari_wpp.widgets.reference_operator import (  # noqa: E402
    ReferenceOperatorWidget,
    pair_regions,
)

DISPLAY_NAME = "Reference & operator"
SHOTS = Path("/tmp/shots")


def _smooth_image(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A random smooth uint8 image (structure at several scales)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(shape)
    image = ndimage.gaussian_filter(noise, sigma=[0] * (len(shape) - 2) + [1.5, 1.5])
    image = (image - image.min()) / (image.max() - image.min())
    return np.rint(image * 255).astype(np.uint8)


@pytest.fixture
def viewer_and_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-wpp", DISPLAY_NAME)
    return viewer, widget


def test_widget_opens_from_manifest(viewer_and_widget) -> None:
    viewer, widget = viewer_and_widget
    assert isinstance(widget, ReferenceOperatorWidget)
    assert widget.session is session_for(viewer)
    # the widget starts with the CLI's defaults
    assert widget.settings.scale == 4 and widget.settings.sigma == default_sigma(4)
    assert widget.settings.anchor == "center"


def test_layer_choices_follow_the_layer_list(viewer_and_widget) -> None:
    viewer, widget = viewer_and_widget
    viewer.add_image(np.zeros((32, 32), np.uint8), name="scan")
    assert widget.settings.reference_layer == "scan"
    assert widget.slice_start_spin.native.isHidden()  # no slice range for a 2D layer
    viewer.layers["scan"].name = "renamed"
    assert widget.settings.reference_layer == "renamed"
    viewer.add_shapes([np.array([[0, 0], [10, 10]])], shape_type="rectangle", name="roi")
    assert widget.reference_shapes_combo.native.findData("roi") >= 0
    assert widget.settings.reference_shapes == ""  # whole image until a rectangle is chosen
    viewer.layers.remove("renamed")
    assert widget.settings.reference_layer == ""
    assert "no HR image layer chosen" in widget.patch_label.text()


def test_reference_from_scaled_layer_and_rectangle(viewer_and_widget) -> None:
    viewer, widget = viewer_and_widget
    data = _smooth_image((60, 80), seed=1)
    viewer.add_image(data, name="hr", scale=(0.5, 0.25), translate=(10.0, 20.0))
    # world rectangle y 15..25, x 22..27 -> data rows 10..30, columns 8..28
    rect = np.array([[15.0, 22.0], [15.0, 27.0], [25.0, 27.0], [25.0, 22.0]])
    viewer.add_shapes([rect], shape_type="rectangle", name="roi")
    widget.settings.reference_layer = "hr"
    widget.settings.reference_shapes = "roi"
    assert widget.patch_count() == (20 - 5) * (20 - 5)
    assert "225 patches" in widget.patch_label.text()

    selection = widget.use_as_reference()
    assert selection is not None and widget.session.reference is selection
    norm = Normalisation.from_dict(selection.normalisation)
    assert (norm.low, norm.high) == (0.0, 255.0)
    (region,) = selection.regions
    assert region.dtype == np.float32 and region.shape == (20, 20)
    np.testing.assert_allclose(region, data[10:30, 8:28] / 255.0, atol=1e-6)
    assert selection.source == "hr" and selection.n_patches == 225
    assert "225 patches" in widget.session_reference_label.text()


def test_reference_3d_slice_range(viewer_and_widget) -> None:
    viewer, widget = viewer_and_widget
    volume = _smooth_image((5, 24, 24), seed=2)
    viewer.add_image(volume, name="stack")
    assert not widget.slice_start_spin.native.isHidden()  # slice rows appear for a 3D layer
    assert (widget.settings.slice_start, widget.settings.slice_stop) == (0, 4)
    viewer.dims.set_current_step(0, 2)
    widget.current_slice_button.native.click()
    assert (widget.settings.slice_start, widget.settings.slice_stop) == (2, 2)
    assert widget.patch_count() == 19 * 19
    widget.settings.slice_start, widget.settings.slice_stop = 1, 3
    selection = widget.use_as_reference()
    assert selection is not None
    assert selection.regions[0].shape == (3, 24, 24)
    assert selection.n_patches == 3 * 19 * 19
    np.testing.assert_allclose(selection.regions[0], volume[1:4] / 255.0, atol=1e-6)


def test_parametric_operator_lands_in_session(viewer_and_widget) -> None:
    _, widget = viewer_and_widget
    widget.scale_combo.native.setCurrentIndex(
        widget.scale_combo.native.findData(6)
    )  # as a user would
    assert widget.settings.scale == 6 and widget.settings.sigma == default_sigma(6)
    widget.sigma_spin.value = 2.5
    widget.settings.kernel_size = 20
    widget.anchor_combo.native.setCurrentIndex(widget.anchor_combo.native.findData("corner"))
    operator = widget.use_parametric_operator()
    assert widget.session.operator is operator
    assert isinstance(operator, GaussianDownsampling)
    expected = GaussianDownsampling(6, 2.5, kernel_size=20, anchor="corner", padding="circular")
    assert operator.to_dict() == expected.to_dict()


def _registered_pair(q: int = 2, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """uint8 HR image and its LR image degraded by a known centred Gaussian operator."""
    hr = _smooth_image((size, size), seed=4)
    operator = GaussianDownsampling(q, 1.0, kernel_size=8)
    with torch.no_grad():
        lr = operator(torch.from_numpy(hr.astype(np.float32) / 255.0)).numpy()
    return hr, np.rint(lr * 255.0).astype(np.uint8)


def test_pair_regions_keep_the_scale(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    q = 2
    hr_layer = viewer.add_image(np.zeros((64, 64), np.float32), name="hr")
    lr_layer = viewer.add_image(
        np.zeros((32, 32), np.float32), name="lr", scale=(q, q), translate=((q - 1) / 2,) * 2
    )
    box = np.array([[9.3, 4.1], [41.7, 50.2]])
    (hr_rows, hr_cols), (lr_rows, lr_cols) = pair_regions(hr_layer, lr_layer, hr_box=box)
    assert hr_rows.stop - hr_rows.start == q * (lr_rows.stop - lr_rows.start)
    assert hr_cols.stop - hr_cols.start == q * (lr_cols.stop - lr_cols.start)
    assert (hr_rows.start, hr_cols.start) == (q * lr_rows.start, q * lr_cols.start)


def test_estimation_runs_in_a_worker(viewer_and_widget, qtbot) -> None:
    viewer, widget = viewer_and_widget
    q = 2
    hr, lr = _registered_pair(q)
    viewer.add_image(hr, name="hr pair")
    viewer.add_image(lr, name="lr pair", scale=(q, q), translate=((q - 1) / 2,) * 2)
    rect = np.array([[4.0, 4.0], [4.0, 60.0], [60.0, 60.0], [60.0, 4.0]])
    viewer.add_shapes([rect], shape_type="rectangle", name="pair roi")
    widget.settings.pair_hr_layer = "hr pair"
    widget.settings.pair_lr_layer = "lr pair"
    widget.settings.pair_hr_shapes = "pair roi"
    assert widget.settings.pair_scale == q  # guessed from the layers' pixel sizes
    widget.settings.pair_kernel_size = 9

    with qtbot.waitSignal(widget.estimation_finished, timeout=60_000) as blocker:
        worker = widget.estimate()
        assert worker is not None
    estimate = blocker.args[0]
    assert not isinstance(estimate, BaseException), estimate
    assert widget.last_estimate is estimate
    qtbot.waitUntil(lambda: widget.estimation_worker is None, timeout=10_000)

    kernel_layer = viewer.layers["lr pair kernel"]
    assert kernel_layer.data.shape == (9, 9)
    assert kernel_layer.metadata["napari_wpp"]["role"] == "kernel"
    assert "Residual rms" in widget.estimate_label.text()
    # the estimate reproduces the pair (residual far below the LR contrast), keeps the
    # intensity scale of the uint8 layers (gain 1) and peaks at the kernel centre
    assert estimate.residual_rms < 0.25 * float(lr.std()) / 255.0
    assert abs(estimate.kernel_sum - 1.0) < 0.05
    peak = np.unravel_index(int(np.argmax(estimate.kernel)), estimate.kernel.shape)
    assert max(abs(int(p) - 4) for p in peak) <= 1

    operator = widget.use_estimated_operator()
    assert isinstance(operator, FourierDownsampling) and widget.session.operator is operator


def _too_small_region(viewer, widget) -> None:
    viewer.add_image(_smooth_image((40, 40), seed=3), name="hr", scale=(2.0, 2.0))
    tiny = np.array([[0.0, 0.0], [0.0, 8.0], [8.0, 8.0], [8.0, 0.0]])  # 4x4 data pixels
    viewer.add_shapes([tiny], shape_type="rectangle", name="roi")
    widget.settings.reference_layer = "hr"
    widget.settings.reference_shapes = "roi"
    assert widget.patch_count() == 0
    assert "smaller than a 6×6 patch" in widget.patch_label.text()


def _unknown_padding(viewer, widget) -> None:
    widget.settings.padding = "mirror"  # not a padding the operator knows


def _mismatched_pair_scale(viewer, widget) -> None:
    hr, lr = _registered_pair(2)
    viewer.add_image(hr, name="hr pair")
    viewer.add_image(lr, name="lr pair")  # not overlaid, no rectangles: whole layers
    widget.settings.pair_hr_layer = "hr pair"
    widget.settings.pair_lr_layer = "lr pair"
    widget.settings.pair_scale = 3


@pytest.mark.parametrize(
    ("choose", "action", "message", "unchanged"),
    [
        pytest.param(
            _too_small_region,
            "use_as_reference",
            "smaller than a 6×6 patch",
            lambda widget: widget.session.reference is None,
            id="region-smaller-than-a-patch",
        ),
        pytest.param(
            _unknown_padding,
            "use_parametric_operator",
            "padding",
            lambda widget: widget.session.operator is None,
            id="unknown-padding",
        ),
        pytest.param(
            _mismatched_pair_scale,
            "estimate",
            "do not match scale ×3",
            lambda widget: widget.estimation_worker is None,
            id="pair-does-not-match-the-scale",
        ),
    ],
)
def test_a_bad_choice_notifies_and_changes_nothing(
    viewer_and_widget, errors, choose, action, message, unchanged
) -> None:
    viewer, widget = viewer_and_widget
    choose(viewer, widget)
    assert getattr(widget, action)() is None
    assert unchanged(widget)
    assert len(errors) == 1 and message in errors[0]


def test_save_load_roundtrip(viewer_and_widget, tmp_path: Path, errors) -> None:
    _, widget = viewer_and_widget
    assert widget.save_operator(tmp_path / "none.json") is None  # nothing to save yet
    assert len(errors) == 1 and "no operator" in errors[0]

    widget.settings.scale = 3
    widget.settings.sigma = 1.7
    widget.settings.padding = "reflect"
    saved = widget.use_parametric_operator()
    path = widget.save_operator(tmp_path / "op.json")
    assert path is not None and json.loads(path.read_text())["kind"] == "gaussian"

    other = ReferenceOperatorWidget(widget.viewer)  # a fresh widget of the same viewer
    other.settings.scale = 8
    loaded = other.load_operator(path)
    assert loaded is not None and loaded.to_dict() == saved.to_dict()
    assert other.session.operator is loaded
    assert (other.settings.scale, other.settings.sigma, other.settings.padding) == (
        3,
        1.7,
        "reflect",
    )
    assert other.sigma_spin.value == pytest.approx(1.7)

    (tmp_path / "bad.json").write_text("{not json")
    assert other.load_operator(tmp_path / "bad.json") is None
    assert len(errors) == 2 and "not valid JSON" in errors[1]
    other.close()
    other.deleteLater()


def test_estimated_operator_saves_with_fit(viewer_and_widget, qtbot, tmp_path: Path) -> None:
    viewer, widget = viewer_and_widget
    hr, lr = _registered_pair(2, size=48)
    viewer.add_image(hr, name="hr pair")
    viewer.add_image(lr, name="lr pair", scale=(2, 2), translate=(0.5, 0.5))
    widget.settings.pair_hr_layer, widget.settings.pair_lr_layer = "hr pair", "lr pair"
    widget.settings.pair_kernel_size = 7
    with qtbot.waitSignal(widget.estimation_finished, timeout=60_000):
        widget.estimate()
    operator = widget.use_estimated_operator()
    path = widget.save_operator(tmp_path / "estimated.json")
    content = json.loads(path.read_text())
    assert content["kind"] == "fourier" and content["fit"]["lr"] == "lr pair"
    loaded = widget.load_operator(path)
    np.testing.assert_allclose(loaded.kernel.numpy(), operator.kernel.numpy())
    assert loaded.bias == pytest.approx(operator.bias)


@pytest.mark.slow
def test_screenshot(make_napari_viewer, qtbot) -> None:
    """Screenshot of the widget over the sample data (looked at by a person, not asserted)."""
    from qtpy.QtWidgets import QLabel

    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-wpp", "synthetic_material")
    _, widget = viewer.window.add_plugin_dock_widget("napari-wpp", DISPLAY_NAME)
    viewer.window.resize(1400, 1000)
    rect = np.array([[40.0, 300.0], [40.0, 460.0], [200.0, 460.0], [200.0, 300.0]])
    viewer.add_shapes(
        [rect],
        shape_type="rectangle",
        name="reference region",
        edge_color="cyan",
        face_color="transparent",
        edge_width=2,
    )
    widget.settings.reference_shapes = "reference region"
    assert widget.use_as_reference() is not None
    # the sample's registered 3D pair (HR truth, LR stack): the slice shown is used
    assert widget.settings.pair_hr_layer == "synthetic HR truth"
    assert widget.settings.pair_lr_layer == "synthetic LR stack (x4)"
    assert widget.settings.pair_scale == 4
    with qtbot.waitSignal(widget.estimation_finished, timeout=60_000) as blocker:
        widget.estimate()
    assert not isinstance(blocker.args[0], BaseException), blocker.args[0]
    assert viewer.layers["synthetic LR stack (x4) kernel"].data.shape == (15, 15)
    widget.use_parametric_operator()
    viewer.reset_view()
    # wait for Qt to lay out the dock (word-wrapped labels get their height a pass later)
    labels = widget.findChildren(QLabel)
    qtbot.waitUntil(
        lambda: all(label.height() >= label.heightForWidth(label.width()) for label in labels),
        timeout=5_000,
    )
    SHOTS.mkdir(parents=True, exist_ok=True)
    image = viewer.screenshot(canvas_only=False)
    import imageio.v3 as iio

    iio.imwrite(SHOTS / "reference_operator.png", image)
    assert image.shape[0] > 400


def test_hints_name_the_fix() -> None:
    from napari_wpp.core.errors import InputError
    from napari_wpp.widgets._notify import error_message, hint_for

    assert "smaller batch" in hint_for(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert "'cpu'" in hint_for(AssertionError("Torch not compiled with CUDA enabled"))
    assert hint_for(InputError("region too small: draw a larger one")) == ""
    assert error_message(InputError("region too small: draw a larger one")) == (
        "region too small: draw a larger one"
    )
    message = error_message(MemoryError("cannot allocate\nsecond line"))
    assert message.startswith("MemoryError: cannot allocate — ") and "\n" not in message


def test_notify_error_reaches_napari_notifications(make_napari_viewer) -> None:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    from napari_wpp.core.errors import InputError
    from napari_wpp.widgets._notify import notify_error

    make_napari_viewer()
    received = []

    def collect(notification) -> None:
        received.append(notification)

    notification_manager.notification_ready.connect(collect)
    try:
        notify_error(InputError("region too small: draw a larger rectangle"))
    finally:
        notification_manager.notification_ready.disconnect(collect)
    assert [n.message for n in received] == ["region too small: draw a larger rectangle"]
    assert received[0].severity == NotificationSeverity.ERROR


@pytest.mark.parametrize(
    ("spec_name", "name", "setting", "value"),
    [
        ("OperatorSpec", "kernel_size", "kernel_size", 20),
        ("OperatorSpec", "padding", "padding", "reflect"),
        ("EstimateSpec", "kernel_size", "pair_kernel_size", 9),
    ],
)
def test_a_spec_default_changes_the_form(
    make_napari_viewer, monkeypatch, spec_name, name, setting, value
) -> None:
    from napari_wpp import core

    spec = getattr(core.config, spec_name)
    monkeypatch.setattr(spec.__dataclass_fields__[name], "default", value)
    widget = ReferenceOperatorWidget(make_napari_viewer())
    assert getattr(widget.settings, setting) == value
    form = widget.form if spec_name == "OperatorSpec" else widget.pair_form
    assert form[name].value == value
    widget.close()
