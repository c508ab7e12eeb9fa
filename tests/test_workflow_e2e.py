"""The whole napari workflow through the widgets' public methods, on small sample data.

Sample data from the manifest → Reference & operator → a few training steps of a WPPNet and
of a WPPFlow in the Train widget → Superresolve → Uncertainty; the layers' shapes, scale,
translate and provenance are checked at every stage. Workers are waited on through their
widgets' Qt signals (no sleeps).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import napari_wpp.data  # noqa: E402
from napari_wpp.core.operators import GaussianDownsampling  # noqa: E402
from napari_wpp.io import read_model_metadata  # noqa: E402
from napari_wpp.widgets._session import session_for  # noqa: E402

TIMEOUT_MS = 120_000
Q = 4
SHAPE = (3, 64, 64)  # HR (Z, H, W) of the small sample: LR slices of 16 × 16
REFERENCE = "synthetic HR reference"
LR = f"synthetic LR stack (x{Q})"
TRUTH = "synthetic HR truth"
TINY_NET = {"features": 8, "blocks": 2}
TINY_FLOW = {"steps": 1, "hidden": 8, "cond_features": 4, "mean_features": 8, "mean_blocks": 2}


@pytest.fixture
def small_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the sample-data contribution produce a small material (same layers and roles)."""
    full_size = napari_wpp.data.synthetic_material

    def small(*args, **kwargs):
        return full_size(shape=SHAPE, scale=Q, seed=3)

    monkeypatch.setattr(napari_wpp.data, "synthetic_material", small)



def _train(qtbot, widget, kind: str, path, options: dict) -> object:
    s = widget.settings
    s.model = kind
    s.budget_unit = "steps"
    s.budget = 2
    s.batch_size = 2
    s.crop_size = 12
    s.n_reference_patches = 200
    s.preview_every = 1
    s.device = "cpu"
    s.save_path = str(path)
    s.model_options = dict(options)
    s.config_overrides = {"patches_per_step": 1500, "mixed_precision": "off", "psi_passes": 1}
    with qtbot.waitSignal(widget.training_finished, timeout=TIMEOUT_MS) as blocker:
        assert widget.start() is not None
    state = blocker.args[0]
    assert state is not None and state.kind == kind and state.step == 2
    return state


@pytest.mark.slow
def test_reference_to_uncertainty(make_napari_viewer, qtbot, tmp_path, small_sample, errors):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-wpp", "synthetic_material")
    lr_layer, truth_layer = viewer.layers[LR], viewer.layers[TRUTH]
    assert lr_layer.data.shape == (3, 16, 16)
    assert tuple(lr_layer.scale) == pytest.approx((1.0, Q, Q))
    session = session_for(viewer)

    # 1. reference (the whole HR reference image) and the parametric ×4 operator
    _, reference = viewer.window.add_plugin_dock_widget("napari-wpp", "Reference & operator")
    assert reference.settings.reference_layer == REFERENCE
    selection = reference.use_as_reference()
    assert selection is not None and selection.regions[0].shape == (64, 64)
    assert selection.n_patches == 59 * 59 == reference.patch_count()
    operator = reference.use_parametric_operator()
    assert isinstance(operator, GaussianDownsampling) and operator.scale == Q
    assert session.reference is selection and session.operator is operator

    # 2. a few WPPNet steps in the Train widget; previews overlay the LR stack
    _, train = viewer.window.add_plugin_dock_widget("napari-wpp", "Train")
    assert train.settings.lr_layer == LR
    viewer.dims.set_point(0, 1.0)
    net_path = tmp_path / "net.safetensors"
    net_state = _train(qtbot, train, "wppnet", net_path, TINY_NET)
    assert session.model is net_state and session.model_path == str(net_path)
    assert read_model_metadata(net_path)["kind"] == "wppnet"
    preview = viewer.layers[f"{LR} preview"]
    assert preview.data.shape == (1, 64, 64)
    assert tuple(preview.scale) == pytest.approx((1.0, 1.0, 1.0))
    assert tuple(preview.translate) == pytest.approx((1.0, 0.0, 0.0))

    # 3. superresolve the whole stack with the session's WPPNet: it overlays the HR truth
    _, superresolve = viewer.window.add_plugin_dock_widget("napari-wpp", "Superresolve")
    assert superresolve.settings.input_layer == LR
    superresolve.settings.device = "cpu"
    superresolve.settings.extent = "stack"
    with qtbot.waitSignal(superresolve.superresolve_finished, timeout=TIMEOUT_MS) as blocker:
        assert superresolve.run() is not None
    result = blocker.args[0]
    assert result is not None and result.name == f"{LR} superresolved"
    assert result.data.shape == truth_layer.data.shape == SHAPE
    assert result.data.dtype == np.uint8
    assert tuple(result.scale) == pytest.approx(tuple(truth_layer.scale))
    assert tuple(result.translate) == pytest.approx(tuple(truth_layer.translate))
    meta = result.metadata["napari_wpp"]
    assert meta["role"] == "superresolved" and meta["source"] == LR
    assert meta["model_kind"] == "wppnet" and meta["model_file"] == str(net_path.resolve())
    assert meta["scale"] == Q and meta["operator"] == operator.to_dict()

    # 4. a few WPPFlow steps in the same Train widget
    flow_path = tmp_path / "flow.safetensors"
    flow_state = _train(qtbot, train, "wppflow", flow_path, TINY_FLOW)
    assert session.model is flow_state
    assert read_model_metadata(flow_path)["kind"] == "wppflow"

    # 5. posterior samples, mean and std of the current slice, against the HR truth
    _, uncertainty = viewer.window.add_plugin_dock_widget("napari-wpp", "Uncertainty")
    assert uncertainty.settings.input_layer == LR
    assert uncertainty.settings.truth_layer == TRUTH
    uncertainty.settings.device = "cpu"
    uncertainty.settings.k = 3
    uncertainty.settings.keep_samples = True
    viewer.dims.set_point(0, 2.0)
    with qtbot.waitSignal(uncertainty.uncertainty_finished, timeout=TIMEOUT_MS) as blocker:
        assert uncertainty.run() is not None
    mean = blocker.args[0]
    assert mean is not None and mean.name == f"{LR} mean"
    std = viewer.layers[f"{LR} std"]
    samples = viewer.layers[f"{LR} samples"]
    assert mean.data.shape == std.data.shape == (1, 64, 64)
    assert samples.data.shape == (3, 1, 64, 64)
    for layer in (mean, std):
        assert tuple(layer.scale) == pytest.approx((1.0, 1.0, 1.0))
        assert tuple(layer.translate) == pytest.approx((2.0, 0.0, 0.0))  # slice 2 of the truth
    assert tuple(samples.scale) == pytest.approx((1.0, 1.0, 1.0, 1.0))
    assert tuple(samples.translate) == pytest.approx((0.0, 2.0, 0.0, 0.0))
    for layer, statistic in ((mean, "mean"), (std, "std"), (samples, "samples")):
        info = layer.metadata["napari_wpp"]
        assert info["statistic"] == statistic and info["source"] == LR
        assert info["model_kind"] == "wppflow" and info["model_file"] == str(flow_path.resolve())
        assert info["slice"] == 2 and info["k"] == 3 and info["ground_truth"] == TRUTH
    assert std.colormap.name == "magma"
    assert (np.asarray(std.data) >= 0).all() and float(np.asarray(std.data).max()) > 0
    stats = uncertainty.statistics()
    assert stats is not None and 0.0 <= stats["share_above"] <= 1.0
    assert 0.0 <= stats["coverage_1sd"] <= stats["coverage_2sd"] <= stats["coverage_3sd"] <= 1.0
    assert not np.isnan(stats["edge_flat_ratio"]) and stats["max_std"] > 0
    assert errors == []
