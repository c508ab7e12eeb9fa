"""The perception ↔ fidelity panel of the Superresolve widget, in a real napari viewer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from toy_images import texture

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_wpp.core.models import build_model  # noqa: E402
from napari_wpp.core.operators import GaussianDownsampling  # noqa: E402
from napari_wpp.core.training import TrainingState  # noqa: E402
from napari_wpp.widgets._session import session_for  # noqa: E402
from napari_wpp.widgets.superresolve import SuperresolveWidget  # noqa: E402

TIMEOUT_MS = 60_000
Q = 2


def _state() -> TrainingState:
    torch.manual_seed(0)
    model = build_model("wppnet", scale=Q, features=8, blocks=2)
    return TrainingState(
        kind="wppnet",
        model=model.eval(),
        model_config=model.config(),
        operator=GaussianDownsampling(Q, 1.0, 6).to_dict(),
        lam=0.02,
        config={},
        step=1,
        elapsed_s=1.0,
        normalisation={"low": 0.0, "high": 255.0, "dtype": "uint8"},
    )


def _setup(make_napari_viewer, lr: np.ndarray):
    viewer = make_napari_viewer()
    viewer.add_image(lr, name="LR", contrast_limits=(0, 255))
    viewer.add_image(texture((96, 96), 0.8, 1), name="REF", contrast_limits=(0, 255))
    viewer.layers.selection.active = viewer.layers["LR"]
    session_for(viewer).model = _state()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Superresolve")
    assert isinstance(widget, SuperresolveWidget)
    widget.settings.device = "cpu"
    widget.settings.input_layer = "LR"
    widget.transport_panel.reference.value = "REF"
    return viewer, widget


def _run(qtbot, widget: SuperresolveWidget):
    """Superresolve, and wait for the panel's preparation (a thread worker) to end."""
    with qtbot.waitSignal(widget.superresolve_finished, timeout=TIMEOUT_MS) as blocker:
        assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.transport_panel.preparing is None, timeout=TIMEOUT_MS)
    return blocker.args[0]


def test_slider_moves_the_result_live_and_exports(make_napari_viewer, qtbot, tmp_path) -> None:
    viewer, widget = _setup(make_napari_viewer, texture((40, 44), 1.5, 0))
    layer = _run(qtbot, widget)
    panel = widget.transport_panel
    assert panel.cache is not None, panel.readout.text()  # prepared after the run
    result = panel.cache["original"].copy()
    np.testing.assert_array_equal(layer.data, result)  # α = 1: the network's result
    panel.slider.value = 0.0
    moved = np.array(layer.data)
    assert moved.dtype == np.uint8 and np.abs(moved.astype(float) - result).mean() > 1.0
    np.testing.assert_array_equal(moved, panel.blended(0.0))
    at_0, at_1 = panel.readouts(0.0), panel.readouts(1.0)
    assert at_0["patch_distance"] < at_1["patch_distance"]
    assert at_0["data_rms"] is not None and at_0["noise"] > 0
    # the panel's data rms is the readouts' (away from the border the padding decides)
    from napari_wpp.core.patch_distance import data_rms
    from napari_wpp.jobs.transport import lr_normalisation

    lr = np.asarray(viewer.layers["LR"].data)
    lr01 = lr_normalisation(lr, panel.cache["norm"]).apply(lr, clip=False)
    fully = panel.cache["x"] + panel.cache["delta"]
    expected = data_rms(fully, lr01, panel.target["operator"])
    assert at_0["data_rms"] == pytest.approx(expected, rel=1e-3)
    assert "patch distance" in panel.readout.text() and "data rms" in panel.readout.text()
    alpha = panel.use_default_alpha()
    assert 0.0 <= alpha <= 1.0 and panel.slider.value == pytest.approx(alpha)
    np.testing.assert_array_equal(layer.data, panel.blended(panel.slider.value))
    # the whole result at the slider's α, by the job of `transport apply`
    out = tmp_path / "export.tif"
    worker = panel.export(out, start=False)
    failures: list[BaseException] = []
    worker.errored.connect(failures.append)
    with qtbot.waitSignal(worker.finished, timeout=TIMEOUT_MS):
        worker.start()
    assert not failures
    np.testing.assert_array_equal(tifffile.imread(out), panel.blended(panel.slider.value))
    panel.slider.value = 1.0
    np.testing.assert_array_equal(layer.data, result)
    shot = os.environ.get("NAPARI_WPP_SCREENSHOT")
    if shot:
        panel.slider.value = 0.3
        viewer.window._qt_window.resize(1400, 900)
        Path(shot).write_bytes(b"")
        from PIL import Image

        Image.fromarray(viewer.screenshot(canvas_only=False)).save(shot)


def test_only_the_shown_slice_moves_and_detach_restores(make_napari_viewer, qtbot) -> None:
    viewer, widget = _setup(make_napari_viewer, texture((3, 30, 32), 1.5, 2))
    layer = _run(qtbot, widget)
    panel = widget.transport_panel
    before = np.array(layer.data)
    viewer.dims.set_point(0, 1)
    panel.prepare()
    panel.slider.value = 0.2
    after = np.array(layer.data)
    changed = [not np.array_equal(before[i], after[i]) for i in range(3)]
    assert changed == [False, True, False]
    panel.detach()
    np.testing.assert_array_equal(layer.data, before)
    assert not panel.slider.enabled


def test_without_reference_the_panel_asks_for_one(make_napari_viewer, qtbot) -> None:
    viewer, widget = _setup(make_napari_viewer, texture((24, 24), 1.5, 3))
    widget.transport_panel.reference.value = "(none)"
    _run(qtbot, widget)
    panel = widget.transport_panel
    assert panel.cache is None and panel.prepare_button.enabled
    assert panel._guarded(panel.prepare) is None  # a notification, not an exception
    assert panel.cache is None


def test_prepare_button_works_in_a_worker(make_napari_viewer, qtbot) -> None:
    viewer, widget = _setup(make_napari_viewer, texture((3, 30, 32), 1.5, 4))
    layer = _run(qtbot, widget)
    panel = widget.transport_panel
    before = np.array(layer.data)
    viewer.dims.set_point(0, 2)
    panel.prepare_button.native.click()  # returns at once; the controls wait for the worker
    assert panel.preparing is not None and panel.cache is None
    assert not panel.slider.enabled and not panel.prepare_button.enabled
    assert "Preparing" in panel.readout.text()
    qtbot.waitUntil(lambda: panel.preparing is None, timeout=TIMEOUT_MS)
    assert panel.cache is not None and panel.slider.enabled
    assert panel.cache["where"][0] == 2
    panel.slider.value = 0.0
    assert not np.array_equal(layer.data[2], before[2])
    np.testing.assert_array_equal(layer.data[:2], before[:2])
    # detached while preparing: the late result is dropped, nothing is written
    panel.prepare_button.native.click()
    panel.detach()
    qtbot.wait(50)
    qtbot.waitUntil(lambda: not panel._workers, timeout=TIMEOUT_MS)
    assert panel.cache is None and panel.target is None
    np.testing.assert_array_equal(layer.data, before)
