"""The TIFF writer contribution keeps the layers' physical pixel size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_wpp.core.errors import InputError
from napari_wpp.io import read_image
from napari_wpp.widgets._writer import pixel_size_from_layer_state, write_tiff


def test_write_tiff_keeps_pixel_size_without_napari(tmp_path: Path) -> None:
    data = np.arange(5 * 12 * 16, dtype=np.uint16).reshape(5, 12, 16)
    attributes = {"scale": [2.0, 0.25, 0.5], "units": None, "rgb": False}
    (written,) = write_tiff(str(tmp_path / "stack.tif"), data, attributes)
    image = read_image(written)
    np.testing.assert_array_equal(image.array, data)
    assert image.pixel_size == pytest.approx((0.25, 0.5))
    assert image.unit is None


def test_unit_scale_without_units_records_nothing() -> None:
    assert pixel_size_from_layer_state({"scale": [1.0, 1.0], "units": None}) == (None, None)


def test_different_yx_units_are_refused() -> None:
    pint = pytest.importorskip("pint")
    ureg = pint.get_application_registry()
    with pytest.raises(InputError, match="units differ"):
        pixel_size_from_layer_state({"scale": [1.0, 2.0], "units": (ureg.nm, ureg.um)})


def test_rgb_layer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="RGB"):
        write_tiff(str(tmp_path / "rgb.tif"), np.zeros((8, 8, 3), np.uint8), {"rgb": True})


def test_viewer_save_keeps_scale_and_units(make_napari_viewer, tmp_path: Path) -> None:
    viewer = make_napari_viewer()
    data = np.random.default_rng(0).random((20, 30)).astype(np.float32)
    layer = viewer.add_image(data, name="scan", scale=(0.8, 0.4), units=("µm", "µm"))
    path = tmp_path / "scan.tif"
    written = viewer.layers.save(str(path), selected=False, plugin="napari-wpp")
    assert [Path(p) for p in written] == [path]
    image = read_image(path)
    np.testing.assert_array_equal(image.array, data)
    assert image.pixel_size == pytest.approx(tuple(layer.scale))
    assert image.unit == "µm"
    # reopened in napari with the same physical geometry through the pixel size
    reread = viewer.add_image(image.array, scale=image.pixel_size)
    assert tuple(reread.scale) == pytest.approx(tuple(layer.scale))


def test_viewer_save_3d_layer_nm(make_napari_viewer, tmp_path: Path) -> None:
    viewer = make_napari_viewer()
    data = np.random.default_rng(1).integers(0, 255, (4, 10, 12), dtype=np.uint8)
    viewer.add_image(data, name="stack", scale=(3.0, 5.0, 5.0), units="nm")
    path = tmp_path / "stack.tiff"
    viewer.layers.save(str(path), selected=False, plugin="napari-wpp")
    image = read_image(path)
    np.testing.assert_array_equal(image.array, data)
    assert image.pixel_size == pytest.approx((5.0, 5.0))
    assert image.unit == "nm"
