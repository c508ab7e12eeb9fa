"""The npe2 manifest validates and its sample data opens in napari."""

from __future__ import annotations

from pathlib import Path

import pytest

import napari_wpp

MANIFEST = Path(napari_wpp.__file__).with_name("napari.yaml")


def test_manifest_validates() -> None:
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "napari-wpp"
    assert manifest.display_name == "napari WPP"
    keys = [s.key for s in manifest.contributions.sample_data]
    assert "synthetic_material" in keys
    commands = {c.id: c for c in manifest.contributions.commands}
    assert commands["napari-wpp.sample_data"].python_name == "napari_wpp.data:sample_data"
    # every command's python_name resolves to a callable
    for command in commands.values():
        module, _, attr = command.python_name.partition(":")
        obj = __import__(module, fromlist=[attr])
        assert callable(getattr(obj, attr)), command.python_name


def test_manifest_is_discovered_by_entry_point() -> None:
    npe2 = pytest.importorskip("npe2")
    pm = npe2.PluginManager()
    pm.discover()
    assert "napari-wpp" in pm._manifests, "install the package (pip install -e .) first"


def test_top_level_manifest_link() -> None:
    link = Path(__file__).resolve().parents[1] / "napari.yaml"
    if not link.exists():
        pytest.skip("no top-level napari.yaml in this checkout")
    assert link.resolve() == MANIFEST.resolve()


def test_sample_opens_in_viewer(make_napari_viewer) -> None:
    pytest.importorskip("napari_wpp.core.operators")
    viewer = make_napari_viewer()
    viewer.open_sample("napari-wpp", "synthetic_material")
    names = [layer.name for layer in viewer.layers]
    assert len(names) == 3
    lr = next(layer for layer in viewer.layers if "LR" in layer.name)
    hr = next(layer for layer in viewer.layers if "truth" in layer.name)
    assert tuple(lr.scale) == (1.0, 4.0, 4.0)
    assert tuple(lr.translate) == (0.0, 1.5, 1.5)
    assert lr.data.shape == (24, 64, 64) and hr.data.shape == (24, 256, 256)
    # the LR stack covers the same world area as the HR truth (pixel-centre range + one pixel)
    for axis in (1, 2):
        lr_span = lr.extent.world[1][axis] - lr.extent.world[0][axis] + lr.scale[axis]
        hr_span = hr.extent.world[1][axis] - hr.extent.world[0][axis] + hr.scale[axis]
        assert lr_span == pytest.approx(hr_span)
        assert lr.extent.world[0][axis] - lr.scale[axis] / 2 == pytest.approx(-0.5)
