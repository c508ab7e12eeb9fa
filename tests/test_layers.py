"""Geometry of superresolved layers and in-place layer updates (napari_wpp.widgets._layers)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_wpp.core.errors import InputError  # noqa: E402
from napari_wpp.widgets._layers import (  # noqa: E402
    add_or_update_image,
    current_index,
    grown_axes,
    offset_translate,
    superresolved_geometry,
)


def test_grown_axes() -> None:
    assert grown_axes(2, None) == (True, True)
    assert grown_axes(3, 0) == (False, True, True)
    assert grown_axes(3, 1) == (True, False, True)
    assert grown_axes(3, -1) == (True, True, False)
    with pytest.raises(InputError):
        grown_axes(4, 0)
    with pytest.raises(InputError):
        grown_axes(3, 3)


@pytest.mark.parametrize("q", [2, 3, 4])
def test_superresolved_pixel_centres_tile_the_source_pixels(q: int) -> None:
    """The q output pixels of one source pixel are centred inside its footprint, evenly."""
    scale, translate = (3.0, 2.0, 0.5), (10.0, -1.0, 4.0)
    new_scale, new_translate = superresolved_geometry(scale, translate, q, (False, True, True))
    assert new_scale[0] == scale[0] and new_translate[0] == translate[0]
    for axis in (1, 2):
        s, t = scale[axis], translate[axis]
        # world centres of the q output pixels covering source pixel i = 5
        i = 5
        out_centres = new_translate[axis] + new_scale[axis] * (q * i + np.arange(q))
        footprint = (t + s * (i - 0.5), t + s * (i + 0.5))
        assert np.allclose(out_centres.mean(), t + s * i)
        assert out_centres.min() > footprint[0] and out_centres.max() < footprint[1]
        assert np.allclose(np.diff(out_centres), s / q)
        # the output footprints end exactly where the source's do
        assert np.isclose(out_centres[0] - new_scale[axis] / 2, footprint[0])


def test_superresolved_geometry_leading_axis_and_errors() -> None:
    scale, translate = superresolved_geometry((2.0, 2.0), (1.0, 1.0), 2, (True, True), 1)
    assert scale == (1.0, 1.0, 1.0)
    assert translate == (0.0, 0.5, 0.5)
    with pytest.raises(InputError):
        superresolved_geometry((1.0, 1.0), (0.0,), 2, (True, True))
    with pytest.raises(InputError):
        superresolved_geometry((1.0, 1.0), (0.0, 0.0), 0, (True, True))


def test_offset_translate() -> None:
    assert offset_translate((1.0, 2.0, 4.0), (5.0, 1.0, 0.0), (3, 2, 1)) == (8.0, 5.0, 4.0)


def test_add_or_update_image_in_place(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    first = add_or_update_image(
        viewer,
        "out",
        np.zeros((2, 4, 4), np.uint8),
        scale=(1, 0.5, 0.5),
        translate=(0, 0.25, 0.25),
        metadata={"napari_wpp": {"run": 1}},
    )
    second = add_or_update_image(
        viewer,
        "out",
        np.ones((3, 6, 6), np.uint8),
        scale=(2, 1, 1),
        translate=(1, 0, 0),
        metadata={"napari_wpp": {"run": 2}},
        contrast_limits=(0, 255),
    )
    assert second is first and len(viewer.layers) == 1
    assert second.data.shape == (3, 6, 6)
    assert tuple(second.scale) == (2, 1, 1) and tuple(second.translate) == (1, 0, 0)
    assert second.metadata["napari_wpp"]["run"] == 2
    assert tuple(second.contrast_limits) == (0, 255)
    # another dimensionality replaces the layer at the same place in the list
    viewer.add_points(np.zeros((1, 3)), name="pts")
    viewer.layers.move(1, 0)
    third = add_or_update_image(
        viewer, "out", np.ones((6, 6), np.float32), scale=(1, 1), translate=(0, 0)
    )
    assert third is not first and third.ndim == 2
    assert [layer.name for layer in viewer.layers] == ["pts", "out"]


def test_current_index(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.zeros((5, 4, 4)), scale=(2, 1, 1), translate=(10, 0, 0))
    viewer.dims.set_point(0, 14.0)
    assert current_index(layer, viewer, 0) == 2
    viewer.dims.set_point(0, 100.0)
    assert current_index(layer, viewer, 0) == 4


def test_region_text_counts_patches_and_slices() -> None:
    from napari_wpp.widgets._regions import region_text

    assert region_text((20, 30), 375, 6) == ("Region 20×30 px → 375 patches of 6×6", True)
    assert region_text((1, 20, 20), 225, 6)[0].startswith("Region 20×20 px × 1 slice →")
    assert region_text((3, 20, 20), 675, 6)[0].startswith("Region 20×20 px × 3 slices →")
    assert region_text((4, 4), 0, 6) == ("Region 4×4 px: smaller than a 6×6 patch", False)


class _Layer:
    """A stand-in for a napari layer: a name, a role, a pixel size."""

    def __init__(self, name: str, role: str | None = None, pixel: float = 1.0) -> None:
        self.name = name
        self.metadata = {"napari_wpp": {"role": role}} if role else {}
        self.scale = (pixel, pixel)


@pytest.mark.parametrize(
    ("hr_pixel", "lr_pixel", "scale"),
    [(1.0, 4.0, 4), (0.5, 1.0, 2), (1.0, 1.0, None), (1.0, 2.5, None), (2.0, 1.0, None)],
)
def test_pixel_size_ratio_is_an_integer_scale_or_none(hr_pixel, lr_pixel, scale) -> None:
    from napari_wpp.widgets._regions import pixel_size_ratio

    assert pixel_size_ratio(_Layer("hr", pixel=hr_pixel), _Layer("lr", pixel=lr_pixel)) == scale


@pytest.mark.parametrize(
    ("roles", "hr", "lr"),
    [
        ({"a": None, "b": None}, "a", "b"),
        ({"a": "lr", "b": "reference", "c": "truth"}, "c", "a"),
        ({"a": None, "b": "reference"}, "b", "a"),
        ({"only": None}, "only", "only"),
    ],
)
def test_pair_defaults_prefer_truth_and_lr_roles(roles, hr, lr) -> None:
    from napari_wpp.widgets._layers import pair_hr_default, pair_lr_default

    layers = [_Layer(name, role) for name, role in roles.items()]
    assert (pair_hr_default(layers), pair_lr_default(layers)) == (hr, lr)
