"""PatchNR in napari: the Train widget's model choice with the live NLL plot, and the
Reconstruct widget on the current slice with the trained prior."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_wpp.data import synthetic_material  # noqa: E402
from napari_wpp.io import read_model_metadata  # noqa: E402
from napari_wpp.widgets._session import ReferenceSelection, session_for  # noqa: E402
from napari_wpp.widgets.reconstruct import ReconstructWidget, output_name  # noqa: E402
from napari_wpp.widgets.train import TrainWidget  # noqa: E402

TIMEOUT_MS = 60_000
LR_NAME = "LR stack"


@pytest.fixture(scope="module")
def material():
    return synthetic_material(shape=(3, 64, 64), scale=4, seed=3)


@pytest.fixture
def setup(make_napari_viewer, material):
    viewer = make_napari_viewer()
    viewer.add_image(
        material.lr,
        name=LR_NAME,
        scale=(1.0, 4.0, 4.0),
        contrast_limits=(0, 255),
        metadata={"napari_wpp": {"role": "lr"}},
    )
    session = session_for(viewer)
    session.operator = material.operator
    return viewer, session


def _train(viewer, qtbot, tmp_path, steps: int = 260):
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Train")
    assert isinstance(widget, TrainWidget)
    s = widget.settings
    s.model = "patchnr"
    assert widget.lam_edit.native.isHidden()  # a PatchNR's weight is the reconstruction's
    assert widget.plot.nll_mode and widget.plot.axes.get_yscale() == "linear"
    s.budget_unit, s.budget, s.device = "steps", steps, "cpu"
    s.save_path = str(tmp_path / "prior.safetensors")
    s.config_overrides = {"patchnr_hidden": 16, "patchnr_batch": 64}
    with qtbot.waitSignal(widget.training_finished, timeout=TIMEOUT_MS) as blocker:
        assert widget.start() is not None
    return widget, blocker.args[0]


def test_train_a_reference_prior_with_the_nll_plot(setup, qtbot, tmp_path, material) -> None:
    viewer, session = setup
    reference = (material.reference[:48, :48] / 255.0).astype(np.float32)
    session.reference = ReferenceSelection(
        [reference], {"low": 0.0, "high": 255.0, "dtype": "uint8"}, "ref", 1849
    )
    widget, state = _train(viewer, qtbot, tmp_path)
    assert state is not None and state.kind == "patchnr" and state.step == 260
    assert session.model is state
    assert read_model_metadata(tmp_path / "prior.safetensors")["kind"] == "patchnr"
    # one training NLL per step; the held-out NLL at step 250 and at the end
    assert widget.plot.steps == list(range(1, 261))
    held = [v for v in widget.plot.wpp_terms if np.isfinite(v)]
    assert len(held) == 2
    assert widget.plot.data_line.get_xdata().size == 260
    assert widget.plot.wpp_line.get_xdata().size == 2
    assert "NLL" in widget.status_label.text()
    assert f"{LR_NAME} preview" not in viewer.layers  # a prior has no preview


def test_zero_shot_prior_then_reconstruct_the_current_slice(setup, qtbot, tmp_path, errors) -> None:
    viewer, session = setup
    assert session.reference is None  # no reference: zero-shot on the LR layer
    _widget, state = _train(viewer, qtbot, tmp_path, steps=20)
    assert state is not None and state.kind == "patchnr"

    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Reconstruct")
    assert isinstance(widget, ReconstructWidget)
    s = widget.settings
    assert s.input_layer == LR_NAME and s.prior == "patchnr"
    s.iterations, s.device = 4, "cpu"
    viewer.dims.set_point(0, 1.0)
    with qtbot.waitSignal(widget.reconstruct_finished, timeout=TIMEOUT_MS) as blocker:
        assert widget.run() is not None
    layer = blocker.args[0]
    assert layer is not None and layer.name == output_name(LR_NAME)
    assert layer.data.shape == (1, 64, 64) and layer.data.dtype == np.uint8
    assert layer.metadata["napari_wpp"]["slice"] == 1
    assert layer.metadata["napari_wpp"]["prior"] == "patchnr"
    assert tuple(layer.translate)[0] == pytest.approx(1.0)
    assert not errors

    # a rectangle: LR pixel centres 4·i inside y ∈ [8, 40], x ∈ [16, 40] are rows 2..9 and
    # columns 4..9; the result covers exactly their world extent, on the same layer
    rectangle = np.array([[8.0, 16.0], [8.0, 40.0], [40.0, 40.0], [40.0, 16.0]])
    viewer.add_shapes([rectangle], shape_type="rectangle", name="roi")
    assert "roi" in widget.shapes_choice.combo.choices
    s.region_shapes = "roi"
    with qtbot.waitSignal(widget.reconstruct_finished, timeout=TIMEOUT_MS) as blocker:
        assert widget.run() is not None
    cropped = blocker.args[0]
    assert cropped.name == layer.name and cropped.data.shape == (1, 32, 24)
    assert getattr(cropped, "__wrapped__", cropped) is getattr(layer, "__wrapped__", layer)
    meta = cropped.metadata["napari_wpp"]
    assert meta["rows"] == [2, 10] and meta["cols"] == [4, 10] and meta["slice"] == 1
    lr_layer = viewer.layers[LR_NAME]
    np.testing.assert_allclose(
        cropped.data_to_world([0, -0.5, -0.5]), lr_layer.data_to_world([1, 1.5, 3.5])
    )
    np.testing.assert_allclose(
        cropped.data_to_world([0, 31.5, 23.5]), lr_layer.data_to_world([1, 9.5, 9.5])
    )
    assert not errors

    # the WPP prior needs a reference: one line naming the fix
    s.prior = "wpp"
    assert widget.run() is None
    assert errors and "no HR reference chosen" in errors[-1]


def test_a_patchnr_is_refused_by_superresolve(setup, qtbot, tmp_path, errors) -> None:
    viewer, _session = setup
    _train(viewer, qtbot, tmp_path, steps=5)
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Superresolve")
    assert widget.run() is None
    assert errors and "PatchNR prior, not a superresolution network" in errors[-1]
