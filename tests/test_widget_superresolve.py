"""The Superresolve dock widget: geometry, provenance, in-place updates, zarr, cancel, errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_wpp.core.inference import run_superresolve  # noqa: E402
from napari_wpp.core.intensity import Normalisation  # noqa: E402
from napari_wpp.core.models import build_model  # noqa: E402
from napari_wpp.core.operators import GaussianDownsampling  # noqa: E402
from napari_wpp.core.training import TrainingState  # noqa: E402
from napari_wpp.io import open_zarr_array, save_model  # noqa: E402
from napari_wpp.jobs.predict import input_normalisation  # noqa: E402
from napari_wpp.widgets._session import session_for  # noqa: E402
from napari_wpp.widgets.superresolve import SuperresolveWidget  # noqa: E402

TIMEOUT_MS = 60_000
Q = 4
SCALE = (1.0, 2.0, 2.0)
TRANSLATE = (5.0, 1.0, -3.0)
UINT8_NORM = {"low": 0.0, "high": 255.0, "dtype": "uint8"}


def _state(model: torch.nn.Module | None = None, normalisation=UINT8_NORM) -> TrainingState:
    torch.manual_seed(0)
    model = model or build_model("wppnet", scale=Q, features=8, blocks=2)
    config = model.config() if hasattr(model, "config") else {"scale": Q}
    return TrainingState(
        kind=getattr(model, "kind", "wppnet"),
        model=model.eval(),
        model_config=config,
        operator=GaussianDownsampling(Q, 2.0).to_dict(),
        lam=0.02,
        config={},
        step=7,
        elapsed_s=1.0,
        normalisation=normalisation,
    )


@pytest.fixture
def stack() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(3, 10, 12), dtype=np.uint8)


@pytest.fixture
def setup(make_napari_viewer, stack):
    viewer = make_napari_viewer()
    viewer.add_image(stack, name="LR", scale=SCALE, translate=TRANSLATE, contrast_limits=(0, 255))
    session = session_for(viewer)
    session.model = _state()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Superresolve")
    assert isinstance(widget, SuperresolveWidget)
    widget.settings.device = "cpu"
    widget.settings.batch_size = 2
    return viewer, session, widget


def _run(qtbot, widget: SuperresolveWidget):
    with qtbot.waitSignal(widget.superresolve_finished, timeout=TIMEOUT_MS) as blocker:
        assert widget.run() is not None
    return blocker.args[0]


def _expected(session, data: np.ndarray, axis: int = 0) -> np.ndarray:
    norm = Normalisation.from_dict(session.model.normalisation)
    return run_superresolve(session.model.model, data, axis=axis, device="cpu", normalisation=norm)


def test_stack_geometry_metadata_and_rerun_in_place(setup, qtbot, stack, errors) -> None:
    viewer, session, widget = setup
    assert widget.settings.input_layer == "LR"
    layer = _run(qtbot, widget)
    assert layer is not None and layer.name == "LR superresolved"
    out = viewer.layers["LR superresolved"]
    assert out.data.shape == (3, 40, 48) and out.data.dtype == np.uint8
    assert np.array_equal(np.asarray(out.data), _expected(session, stack))
    assert tuple(out.scale) == pytest.approx((1.0, 0.5, 0.5))
    shift = 2.0 * (Q - 1) / (2 * Q)
    assert tuple(out.translate) == pytest.approx((5.0, 1.0 - shift, -3.0 - shift))
    meta = out.metadata["napari_wpp"]
    assert meta["role"] == "superresolved" and meta["source"] == "LR"
    assert meta["model_kind"] == "wppnet" and meta["scale"] == Q
    assert meta["operator"] == session.model.operator
    assert meta["model_file"] is None  # the session's model was never saved
    assert meta["normalisation"] == UINT8_NORM and meta["axis"] == 0 and meta["slice"] is None

    # current slice only: the same layer, one slice placed at its z
    widget.settings.extent = "slice"
    viewer.dims.set_point(0, 5.0 + 2.0)  # world z of data slice 2
    again = _run(qtbot, widget)
    assert getattr(again, "__wrapped__", again) is out and len(viewer.layers) == 2
    assert out.data.shape == (1, 40, 48)
    assert np.array_equal(out.data[0], _expected(session, stack[2]))
    assert tuple(out.translate) == pytest.approx((7.0, 1.0 - shift, -3.0 - shift))
    assert out.metadata["napari_wpp"]["slice"] == 2
    assert errors == []


def test_other_axis_and_model_file(setup, qtbot, stack, tmp_path) -> None:
    viewer, session, widget = setup
    path = save_model(tmp_path / "tiny.safetensors", session.model)
    session.model = None
    assert widget.load_model(path) is not None
    assert widget.settings.model_source == "file"
    widget.settings.axis = 2
    layer = _run(qtbot, widget)
    out = viewer.layers[layer.name]
    assert out.data.shape == (12, 40, 12)
    assert tuple(out.scale) == pytest.approx((0.25, 0.5, 2.0))
    assert out.translate[2] == pytest.approx(-3.0)
    assert out.translate[0] == pytest.approx(5.0 - 1.0 * (Q - 1) / (2 * Q))
    meta = out.metadata["napari_wpp"]
    assert meta["model_file"] == str(path.resolve()) and meta["axis"] == 2
    assert meta["model_step"] == 7


def test_zarr_output_is_lazy_and_complete(setup, qtbot, stack, tmp_path) -> None:
    dask = pytest.importorskip("dask.array")
    pytest.importorskip("zarr")
    viewer, session, widget = setup
    widget.settings.to_zarr = True
    widget.settings.zarr_path = str(tmp_path / "out.zarr")
    layer = _run(qtbot, widget)
    out = viewer.layers[layer.name]
    assert isinstance(out.data, dask.Array)
    assert out.data.shape == (3, 40, 48) and out.data.dtype == np.uint8
    assert np.array_equal(out.data.compute(), _expected(session, stack))
    assert tuple(out.scale) == pytest.approx((1.0, 0.5, 0.5))
    attrs = dict(open_zarr_array(tmp_path / "out.zarr").attrs)
    assert attrs["napari_wpp"]["complete"] is True
    assert attrs["napari_wpp"]["scale"] == Q
    assert attrs["pixel_size"] == pytest.approx([1.0, 0.5, 0.5])
    assert out.metadata["napari_wpp"]["zarr"] == str(tmp_path / "out.zarr")


def test_zarr_layer_goes_zarr_to_zarr(make_napari_viewer, qtbot, stack, tmp_path) -> None:
    """A layer opened from a zarr array is read slab by slab by io.superresolve_zarr."""
    pytest.importorskip("zarr")
    from napari_wpp.io import create_zarr_array

    source = create_zarr_array(tmp_path / "in.zarr", stack.shape, stack.dtype, (1, 10, 12))
    source[...] = stack
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "in.zarr"), plugin="napari")
    session = session_for(viewer)
    session.model = _state()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Superresolve")
    widget.settings.input_layer = layer.name
    widget.settings.device = "cpu"
    widget.settings.to_zarr = True
    widget.settings.zarr_path = str(tmp_path / "out.zarr")
    out = _run(qtbot, widget)
    assert np.array_equal(np.asarray(out.data), _expected(session, stack))
    attrs = dict(open_zarr_array(tmp_path / "out.zarr").attrs)["napari_wpp"]
    assert attrs["source"] == str((tmp_path / "in.zarr").resolve())  # superresolve_zarr's
    assert attrs["complete"] is True


class _GatedUpsampler(torch.nn.Module):
    """Nearest-neighbour ×4 whose forward waits for GATE (to cancel deterministically)."""

    kind = "gated"
    scale = Q
    gate = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.gate.wait(30)
        return torch.nn.functional.interpolate(x, scale_factor=Q, mode="nearest")


def test_cancel_leaves_layers_unchanged(setup, qtbot) -> None:
    viewer, session, widget = setup
    session.model = _state(_GatedUpsampler())
    widget.settings.batch_size = 1
    _GatedUpsampler.gate.clear()
    with qtbot.waitSignal(widget.superresolve_finished, timeout=TIMEOUT_MS) as blocker:
        assert widget.run() is not None
        widget.cancel()  # the first batch waits on the gate, so the stop comes first
        assert not widget.cancel_button.isEnabled()
        _GatedUpsampler.gate.set()
    assert blocker.args[0] is None
    assert "LR superresolved" not in viewer.layers
    assert "Cancelled" in widget.status_label.text()


def _no_session_model(viewer, session, widget, tmp_path) -> None:
    session.model = None


def _4d_layer(viewer, session, widget, tmp_path) -> None:
    viewer.add_image(np.zeros((2, 2, 8, 8), np.uint8), name="4D")
    widget.settings.input_layer = "4D"


def _zarr_path_without_zarr_suffix(viewer, session, widget, tmp_path) -> None:
    widget.settings.to_zarr = True
    widget.settings.zarr_path = str(tmp_path / "out.tif")


def _nan_layer(viewer, session, widget, tmp_path) -> None:
    """A float layer with NaNs fails inside the worker: a notification as well."""
    viewer.add_image(np.full((4, 4), np.nan, np.float32), name="nan")
    widget.settings.input_layer = "nan"


@pytest.mark.parametrize(
    ("make_bad", "in_worker", "message"),
    [
        (_no_session_model, False, "no model in this session"),
        (_4d_layer, False, "4D"),
        (_zarr_path_without_zarr_suffix, False, ".zarr"),
        (_nan_layer, True, "NaN"),
    ],
)
def test_bad_input_gives_a_notification(
    setup, qtbot, tmp_path, errors, make_bad, in_worker, message
) -> None:
    viewer, session, widget = setup
    make_bad(viewer, session, widget, tmp_path)
    if in_worker:
        assert _run(qtbot, widget) is None
    else:
        assert widget.run() is None
    assert message in errors[-1]
    assert len(errors) == 1 and widget.worker is None
    assert "LR superresolved" not in viewer.layers


def test_missing_model_file_gives_a_notification(setup, tmp_path, errors) -> None:
    _viewer, _session, widget = setup
    assert widget.load_model(tmp_path / "missing.safetensors") is None
    assert "does not exist" in errors[-1] and len(errors) == 1


def test_the_jobs_normalisation_rule() -> None:
    sample = np.linspace(0, 1000, 100, dtype=np.float32)
    norm, how = input_normalisation(np.uint16, UINT8_NORM, sample)
    assert (norm.low, norm.high, norm.dtype) == (0.0, 65535.0, "uint16") and "range" in how
    recorded = {"low": 2.0, "high": 9.0, "dtype": "float32"}
    norm, how = input_normalisation(np.float32, recorded, sample)
    assert (norm.low, norm.high) == (2.0, 9.0) and "model" in how
    norm, how = input_normalisation(np.float32, UINT8_NORM, sample)
    assert norm.low == pytest.approx(np.percentile(sample, 0.1)) and "percentiles" in how


@pytest.mark.parametrize("as_zarr", [False, True])
def test_cli_and_widget_give_the_same_prediction(
    make_napari_viewer, qtbot, tmp_path, capsys, as_zarr
) -> None:
    """The same float stack through 'napari-wpp predict' and the Superresolve widget."""
    pytest.importorskip("zarr")
    import json

    import tifffile

    from napari_wpp.cli import main
    from napari_wpp.io import create_zarr_array

    rng = np.random.default_rng(3)
    stack = (rng.random((20, 10, 12)) * 40.0 - 5.0).astype(np.float32)  # > 16 slices
    state = _state(normalisation={"low": 0.0, "high": 255.0, "dtype": "uint8"})
    model_file = save_model(tmp_path / "m.safetensors", state)
    if as_zarr:
        source = tmp_path / "in.zarr"
        array = create_zarr_array(
            source,
            stack.shape,
            stack.dtype,
            (1, 10, 12),
            {"pixel_size": [2.0, 0.5, 0.5], "unit": "µm"},
        )
        array[...] = stack
    else:
        source = tmp_path / "in.tif"
        tifffile.imwrite(source, stack)
    cli_out = tmp_path / "cli.zarr"
    code = main(
        [
            "predict",
            str(model_file),
            str(source),
            "--out",
            str(cli_out),
            "--axis",
            "1",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--json",
        ]
    )
    assert code == 0
    payload = json.loads(capsys.readouterr().out)

    viewer = make_napari_viewer()
    if as_zarr:
        (layer,) = viewer.open(str(source), plugin="napari")
    else:
        layer = viewer.add_image(tifffile.imread(source), name="in")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Superresolve")
    widget.load_model(model_file)
    widget.settings.input_layer = layer.name
    widget.settings.device = "cpu"
    widget.settings.axis = 1
    widget.settings.batch_size = 2
    widget.settings.to_zarr = True
    widget.settings.zarr_path = str(tmp_path / "widget.zarr")
    out = _run(qtbot, widget)
    assert out is not None

    cli_attrs = dict(open_zarr_array(cli_out).attrs)
    widget_attrs = dict(open_zarr_array(tmp_path / "widget.zarr").attrs)
    meta = out.metadata["napari_wpp"]
    assert meta["normalisation"] == cli_attrs["napari_wpp"]["normalisation"]
    assert meta["normalisation_from"] == payload["normalisation"]
    assert "percentiles" in payload["normalisation"]
    assert np.array_equal(
        np.asarray(open_zarr_array(cli_out)[...]),
        np.asarray(open_zarr_array(tmp_path / "widget.zarr")[...]),
    )
    for key in (
        "scale",
        "axis",
        "model",
        "tile",
        "normalisation",
        "version",
        "complete",
        "slices_done",
    ):
        assert cli_attrs["napari_wpp"][key] == widget_attrs["napari_wpp"][key], key
    assert cli_attrs["napari_wpp"]["model_file"] == widget_attrs["napari_wpp"]["model_file"]
    if as_zarr:
        assert cli_attrs["pixel_size"] == widget_attrs["pixel_size"] == [0.5, 0.5, 0.125]
        assert cli_attrs["unit"] == widget_attrs["unit"] == "µm"
        assert cli_attrs["napari_wpp"]["source"] == widget_attrs["napari_wpp"]["source"]


def test_2d_image(make_napari_viewer, qtbot) -> None:
    viewer = make_napari_viewer()
    image = np.linspace(0.0, 3.0, 9 * 7, dtype=np.float32).reshape(9, 7)
    viewer.add_image(image, name="plane", scale=(0.5, 0.5), translate=(2.0, 0.0))
    session = session_for(viewer)
    session.model = _state(normalisation={"low": 0.0, "high": 3.0, "dtype": "float32"})
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Superresolve")
    widget.settings.device = "cpu"
    widget.settings.extent = "slice"  # ignored for a 2D image
    layer = _run(qtbot, widget)
    out = viewer.layers[layer.name]
    assert out.data.shape == (36, 28) and out.data.dtype == np.float32
    assert np.allclose(out.data, _expected(session, image))
    shift = 0.5 * (Q - 1) / (2 * Q)
    assert tuple(out.scale) == pytest.approx((0.125, 0.125))
    assert tuple(out.translate) == pytest.approx((2.0 - shift, -shift))
    assert out.metadata["napari_wpp"]["normalisation_from"].startswith("model's range")


def _change_spec_default(monkeypatch, name: str, value) -> None:
    """What editing the default of ``PredictSpec.<name>`` in its source does, undone after."""
    import dataclasses

    from napari_wpp.core.config import PredictSpec

    names = [item.name for item in dataclasses.fields(PredictSpec)]
    defaults = list(PredictSpec.__init__.__defaults__)
    defaults[names.index(name)] = value
    monkeypatch.setattr(PredictSpec.__dataclass_fields__[name], "default", value)
    monkeypatch.setattr(PredictSpec, name, value)
    monkeypatch.setattr(PredictSpec.__init__, "__defaults__", tuple(defaults))


def test_a_spec_default_changes_the_cli_help_the_form_and_the_runs(
    make_napari_viewer, qtbot, tmp_path, capsys, monkeypatch
) -> None:
    """Only the spec's default of batch_size changes: --help, the form and both runs follow."""
    import re

    import tifffile

    import napari_wpp.jobs.predict as jobs
    import napari_wpp.widgets.superresolve as superresolve_module
    from napari_wpp.cli import main

    _change_spec_default(monkeypatch, "batch_size", 3)
    specs = []
    real_job = jobs.predict_job

    def spy(spec, *args, **kwargs):
        specs.append(spec)
        yield from real_job(spec, *args, **kwargs)

    monkeypatch.setattr(jobs, "predict_job", spy)
    monkeypatch.setattr(superresolve_module, "predict_job", spy)

    assert main(["predict", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert re.search(r"--batch-size B slices per forward pass;[^-]*\(default 3\)", help_text)

    model_file = save_model(tmp_path / "m.safetensors", _state())
    image = np.random.default_rng(0).integers(0, 256, (5, 6, 7), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "in.tif", image)
    out = tmp_path / "out.tif"
    assert (
        main(
            [
                "predict",
                str(model_file),
                str(tmp_path / "in.tif"),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert specs[-1].batch_size == 3

    viewer = make_napari_viewer()
    viewer.add_image(image, name="LR")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wpp", "Superresolve")
    assert widget.form.batch_size.value == 3 and widget.settings.batch_size == 3
    assert "(default 3)" in widget.form.batch_size.tooltip
    widget.load_model(model_file)
    widget.settings.device = "cpu"
    assert _run(qtbot, widget) is not None
    assert len(specs) == 2 and specs[-1].batch_size == 3
