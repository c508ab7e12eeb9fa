"""The checks panel of the Reference & operator dock: suitability layer and σ check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_wpp.core.operators import GaussianDownsampling, add_noise  # noqa: E402
from napari_wpp.data import synthetic_volume  # noqa: E402
from napari_wpp.widgets.reference_operator import ReferenceOperatorWidget  # noqa: E402


@pytest.fixture
def dock(make_napari_viewer):
    viewer = make_napari_viewer()
    hr = synthetic_volume((2, 240, 240), phases=3, seed=1)
    operator = GaussianDownsampling(4, 2.0, 16)
    with torch.no_grad():
        lr = add_noise(operator(torch.from_numpy(hr[0] / 255.0).float()), 0.01, seed=0)
    lr8 = np.clip(np.rint(lr.numpy() * 255), 0, 255).astype(np.uint8)
    viewer.add_image(hr[1], name="reference")
    viewer.add_image(lr8, name="lr", scale=(4, 4))
    widget = ReferenceOperatorWidget(viewer)
    widget.settings.reference_layer = "reference"
    widget.settings.check_lr_layer = "lr"
    return viewer, widget


def finished(qtbot, panel, worker) -> object:
    """The result of the panel's worker, once the GUI thread has shown it."""
    assert worker is not None
    qtbot.waitUntil(lambda: panel.worker is None, timeout=120_000)
    assert panel.map_button.enabled and panel.sigma_button.enabled
    assert len(panel.results) == 1
    return panel.results[0]


def test_suitability_layer_over_the_lr_layer(dock, qtbot) -> None:
    viewer, widget = dock
    assert widget.checks.map_suitability() is None  # no reference, no operator yet
    widget.use_as_reference()
    widget.settings.scale, widget.settings.sigma = 4, 2.0
    widget.use_parametric_operator()
    result = finished(qtbot, widget.checks, widget.checks.map_suitability())
    layer = viewer.layers["lr suitability"]
    assert layer.data.shape == (60, 60)
    assert np.array_equal(layer.data, result.score_map[0])
    assert tuple(layer.scale) == (4, 4)
    assert result.verdict in widget.checks.label.text()
    assert f"{result.median_score:.2f}" in widget.checks.label.text()


def test_sigma_check_warns_about_a_far_sigma(dock, qtbot) -> None:
    _, widget = dock
    widget.use_as_reference()
    widget.settings.scale, widget.settings.sigma = 4, 4.0
    worker = widget.checks.check_sigma()
    assert not widget.checks.sigma_button.enabled  # busy while the worker runs
    fit = finished(qtbot, widget.checks, worker)
    assert abs(fit.sigma - 2.0) < 0.5
    assert "far from" in widget.checks.label.text()
    widget.settings.sigma = round(fit.sigma, 2)
    finished(qtbot, widget.checks, widget.checks.check_sigma())
    assert "far from" not in widget.checks.label.text()
