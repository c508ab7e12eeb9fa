"""The widgets' save paths never overwrite a file a layer was opened from (issue 14 item 1)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

pytest.importorskip("napari")


def _open_layer(viewer, path: Path, name: str, array: np.ndarray, role: str | None = None):
    """Add ``array`` as a layer whose source is the file ``path`` (as napari's reader does)."""
    from napari.layers._source import layer_source

    tifffile.imwrite(path, array)
    metadata = {"napari_wpp": {"role": role}} if role else {}
    with layer_source(path=str(path)):
        return viewer.add_image(array, name=name, metadata=metadata)


def test_operator_save_refuses_a_layer_file(make_napari_viewer, tmp_path: Path, errors) -> None:
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Reference & operator")
    scan = tmp_path / "scan.tif"
    _open_layer(viewer, scan, "scan", np.arange(64, dtype=np.uint8).reshape(8, 8))
    before = scan.read_bytes()
    link = tmp_path / "op.json"
    os.symlink(scan, link)
    widget.use_parametric_operator()
    assert widget.save_operator(link) is None
    assert len(errors) == 1 and "choose another output path" in errors[0], errors
    assert scan.read_bytes() == before


def test_train_save_path_refuses_a_layer_file(make_napari_viewer, tmp_path: Path, errors) -> None:
    from napari_wpp.data import synthetic_material
    from napari_wpp.widgets._session import ReferenceSelection, session_for

    material = synthetic_material(shape=(3, 64, 64), scale=4, seed=3)
    viewer = make_napari_viewer()
    lr = tmp_path / "lr.tif"
    _open_layer(viewer, lr, "LR", material.lr, role="lr")
    before = lr.read_bytes()
    session = session_for(viewer)
    reference = (material.reference[:48, :48] / 255.0).astype(np.float32)
    session.reference = ReferenceSelection(
        [reference], {"low": 0.0, "high": 255.0, "dtype": "uint8"}, "ref", 1849
    )
    session.operator = material.operator
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Train")
    link = tmp_path / "model.safetensors"
    os.link(lr, link)
    widget.settings.lr_layer = "LR"
    widget.settings.save_path = str(link)
    widget.settings.device = "cpu"
    assert widget.start() is None
    assert len(errors) == 1 and "choose another output path" in errors[0], errors
    assert lr.read_bytes() == before


def test_superresolve_zarr_output_refuses_the_input(
    make_napari_viewer, tmp_path: Path, errors
) -> None:
    import zarr
    from napari.layers._source import layer_source

    from napari_wpp.core.models import build_model
    from napari_wpp.core.operators import GaussianDownsampling
    from napari_wpp.core.training import TrainingState
    from napari_wpp.widgets._session import session_for

    viewer = make_napari_viewer()
    volume = tmp_path / "in.zarr"
    data = np.arange(3 * 10 * 12, dtype=np.uint8).reshape(3, 10, 12)
    zarr.save_array(str(volume), data)
    with layer_source(path=str(volume)):
        viewer.add_image(data, name="LR")
    session_for(viewer).model = TrainingState(
        kind="wppnet",
        model=build_model("wppnet", scale=4, features=8, blocks=2).eval(),
        model_config={"scale": 4, "features": 8, "blocks": 2},
        operator=GaussianDownsampling(4, 2.0).to_dict(),
        lam=0.02,
        config={},
        step=1,
        elapsed_s=1.0,
        normalisation={"low": 0.0, "high": 255.0, "dtype": "uint8"},
    )
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Superresolve")
    widget.settings.device = "cpu"
    widget.settings.to_zarr = True
    widget.settings.zarr_path = str(tmp_path / "." / "in.zarr")
    assert widget.run() is None
    assert len(errors) == 1 and "choose another output path" in errors[0], errors
    assert np.array_equal(np.asarray(zarr.open_array(str(volume), mode="r")), data)


def test_a_questionable_kernel_is_a_warning_notification(
    make_napari_viewer, tmp_path: Path, errors
) -> None:
    import json

    from napari.utils.notifications import NotificationSeverity, notification_manager

    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Reference & operator")
    operator = tmp_path / "zero.json"
    operator.write_text(json.dumps({"kind": "fourier", "scale": 2, "kernel": [[0.0, 0.0]] * 2}))
    warnings_shown: list[str] = []

    def collect(notification) -> None:
        if notification.severity == NotificationSeverity.WARNING:
            warnings_shown.append(str(notification.message))

    notification_manager.notification_ready.connect(collect)
    try:
        assert widget.load_operator(operator) is not None  # accepted: a warning, not an error
    finally:
        notification_manager.notification_ready.disconnect(collect)
    assert errors == []
    assert len(warnings_shown) == 1 and "all zero" in warnings_shown[0], warnings_shown


def test_train_save_path_never_replaces_another_model(
    make_napari_viewer, tmp_path: Path, errors
) -> None:
    """As ``train --out`` without ``--overwrite``: an existing file is not replaced."""
    from napari_wpp.data import synthetic_material
    from napari_wpp.widgets._session import ReferenceSelection, session_for

    material = synthetic_material(shape=(3, 64, 64), scale=4, seed=3)
    viewer = make_napari_viewer()
    viewer.add_image(material.lr, name="LR", metadata={"napari_wpp": {"role": "lr"}})
    session = session_for(viewer)
    reference = (material.reference[:48, :48] / 255.0).astype(np.float32)
    session.reference = ReferenceSelection(
        [reference], {"low": 0.0, "high": 255.0, "dtype": "uint8"}, "ref", 1849
    )
    session.operator = material.operator
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Train")
    existing = tmp_path / "other.safetensors"
    existing.write_bytes(b"someone else's model")
    widget.settings.lr_layer = "LR"
    widget.settings.save_path = str(existing)
    widget.settings.device = "cpu"
    assert widget.start() is None
    assert len(errors) == 1 and "exists" in errors[0] and "other.safetensors" in errors[0]
    assert existing.read_bytes() == b"someone else's model"
