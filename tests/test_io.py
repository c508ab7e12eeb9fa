"""Tests of image and operator file I/O."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_wpp import io
from napari_wpp.core.errors import InputError


def _one_line_error(func, *args, match: str | None = None, **kwargs) -> str:
    with pytest.raises(InputError, match=match) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------- TIFF round trips
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "float64", "int16"])
@pytest.mark.parametrize("shape", [(7, 9), (3, 7, 9)])
def test_tiff_round_trip_keeps_dtype_and_pixel_size(
    tmp_path: Path, dtype: str, shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(0)
    a = (rng.random(shape) * 200).astype(dtype)
    a_copy = a.copy()
    out = io.write_image(tmp_path / "x.tif", a, pixel_size=(1.625, 0.8125), unit="um")
    assert out == tmp_path / "x.tif"
    np.testing.assert_array_equal(a, a_copy)  # input untouched
    d = io.read_image(out)
    assert d.array.dtype == np.dtype(dtype)
    assert d.array.shape == shape
    np.testing.assert_array_equal(d.array, a)
    assert d.pixel_size == pytest.approx((1.625, 0.8125), rel=1e-9)
    assert d.unit == "µm"
    assert d.path == out


def test_tiff_without_pixel_size(tmp_path: Path) -> None:
    a = np.arange(20, dtype=np.uint16).reshape(4, 5)
    d = io.read_image(io.write_image(tmp_path / "x.tiff", a))
    np.testing.assert_array_equal(d.array, a)
    assert d.pixel_size is None and d.unit is None


def test_write_4d_samples(tmp_path: Path) -> None:
    a = np.zeros((2, 3, 4, 5), np.float32)
    a[1, 2, 3, 4] = 1.0
    path = io.write_image(tmp_path / "samples.tif", a)
    np.testing.assert_array_equal(tifffile.imread(path), a)


def test_reads_imagej_metadata_written_elsewhere(tmp_path: Path) -> None:
    a = np.zeros((2, 6, 8), np.uint8)
    path = tmp_path / "ij.tif"
    tifffile.imwrite(
        path, a, imagej=True, resolution=(1 / 0.5, 1 / 0.25), metadata={"unit": "micron"}
    )
    d = io.read_image(path)
    assert d.pixel_size == pytest.approx((0.25, 0.5))
    assert d.unit == "µm"


def test_reads_resolution_unit_centimetre(tmp_path: Path) -> None:
    path = tmp_path / "cm.tif"
    # 2 µm pixels = 5000 pixels per centimetre
    tifffile.imwrite(
        path, np.zeros((4, 4), np.uint8), resolution=(5000, 2500), resolutionunit="CENTIMETER"
    )
    d = io.read_image(path)
    assert d.pixel_size == pytest.approx((4.0, 2.0))
    assert d.unit == "µm"


@pytest.mark.realdata
def test_real_stack_tiff(shared_file) -> None:
    d = io.read_image(shared_file("sic/train_lr_SiC_x8.tif"))
    assert d.array.shape == (270, 20, 20) and d.array.dtype == np.uint8
    assert d.pixel_size is None  # resolution tags (1, 1), no unit


# ---------------------------------------------------------------- PNG
@pytest.mark.realdata
def test_real_sic_pngs(shared_file) -> None:
    hr = io.read_image(shared_file("sic/hr_SiC.png"))
    assert hr.array.shape == (600, 600) and hr.array.dtype == np.uint8
    lr = io.read_image(shared_file("sic/lr_SiC_x4.png"))
    assert lr.array.shape == (150, 150)
    # independent check of the pixel values
    np.testing.assert_array_equal(lr.array, iio.imread(shared_file("sic/lr_SiC_x4.png")))
    assert 20 < hr.array.mean() < 235 and hr.array.std() > 10


def test_png_16bit(tmp_path: Path) -> None:
    a = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    iio.imwrite(tmp_path / "a.png", a)
    d = io.read_image(tmp_path / "a.png")
    assert d.array.dtype == np.uint16
    np.testing.assert_array_equal(d.array, a)


def test_png_grey_rgb_takes_one_channel(tmp_path: Path) -> None:
    g = np.arange(48, dtype=np.uint8).reshape(6, 8)
    iio.imwrite(tmp_path / "rgb.png", np.stack([g, g, g], -1))
    np.testing.assert_array_equal(io.read_image(tmp_path / "rgb.png").array, g)
    iio.imwrite(tmp_path / "rgba.png", np.stack([g, g, g, np.full_like(g, 255)], -1))
    np.testing.assert_array_equal(io.read_image(tmp_path / "rgba.png").array, g)


def test_png_colour_and_transparent_rejected(tmp_path: Path) -> None:
    g = np.arange(48, dtype=np.uint8).reshape(6, 8)
    iio.imwrite(tmp_path / "col.png", np.stack([g, g, g + 1], -1))
    _one_line_error(io.read_image, tmp_path / "col.png", match="greyscale")
    alpha = np.full_like(g, 255)
    alpha[0, 0] = 0
    iio.imwrite(tmp_path / "t.png", np.stack([g, g, g, alpha], -1))
    _one_line_error(io.read_image, tmp_path / "t.png", match="alpha")


# ---------------------------------------------------------------- bad inputs
def test_missing_file(tmp_path: Path) -> None:
    _one_line_error(io.read_image, tmp_path / "nope.png", match="does not exist")


def test_unsupported_extension(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"xx")
    msg = _one_line_error(io.read_image, tmp_path / "a.jpg")
    assert ".tif" in msg


def test_directory_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "d.tif").mkdir()
    _one_line_error(io.read_image, tmp_path / "d.tif")


@pytest.mark.parametrize("name", ["bad.png", "bad.tif"])
def test_corrupt_files(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"this is not an image\n" * 10)
    _one_line_error(io.read_image, tmp_path / name, match="cannot read")


def test_truncated_png(tmp_path: Path) -> None:
    iio.imwrite(
        tmp_path / "full.png", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    )
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _one_line_error(io.read_image, tmp_path / "cut.png")


def test_4d_tiff_rejected(tmp_path: Path) -> None:
    a = np.zeros((2, 4, 6, 5), np.uint8)
    tifffile.imwrite(tmp_path / "4d.tif", a, photometric="minisblack")
    _one_line_error(io.read_image, tmp_path / "4d.tif", match="2D image")


def test_nan_tiff_rejected(tmp_path: Path) -> None:
    a = np.zeros((4, 4), np.float32)
    a[1, 1] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", a)
    _one_line_error(io.read_image, tmp_path / "nan.tif", match="NaN")


def test_write_missing_directory(tmp_path: Path) -> None:
    _one_line_error(
        io.write_image,
        tmp_path / "no" / "x.tif",
        np.zeros((2, 2), np.uint8),
        match="create it first",
    )


@pytest.mark.parametrize(
    ("name", "array", "kwargs"),
    [
        ("x.png", np.zeros((2, 2), np.uint8), {}),
        ("x.tif", np.zeros(4, np.uint8), {}),
        ("x.tif", np.zeros((2, 2), np.complex64), {}),
        ("x.tif", np.zeros((2, 2), np.uint8), {"pixel_size": (0.0, 1.0)}),
        ("x.tif", np.zeros((2, 2), np.uint8), {"pixel_size": "big"}),
    ],
)
def test_write_bad_inputs(tmp_path: Path, name: str, array: np.ndarray, kwargs: dict) -> None:
    _one_line_error(io.write_image, tmp_path / name, array, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.tif"
    io.write_image(target, np.ones((4, 4), np.uint8))
    before = target.read_bytes()

    def broken(path, data, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", broken)
    with pytest.raises(OSError, match="disk full"):
        io.write_image(target, np.zeros((8, 8), np.uint8))
    assert target.read_bytes() == before  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tif"]  # no temp file left


# ---------------------------------------------------------------- operators
@pytest.fixture
def operators():
    return pytest.importorskip("napari_wpp.core.operators")


def test_operator_round_trip(tmp_path: Path, operators) -> None:
    import torch

    op = operators.GaussianDownsampling(4, 2.0, anchor="center")
    path = io.write_operator(tmp_path / "op.json", op, extra={"residual_rms": 0.01})
    d = json.loads(path.read_text())
    assert d["residual_rms"] == 0.01
    for key, value in op.to_dict().items():
        assert d[key] == value
    back = io.read_operator(path)
    x = torch.rand(1, 32, 32)
    torch.testing.assert_close(back(x), op(x))


def test_read_operator_bad_files(tmp_path: Path, operators) -> None:
    _one_line_error(io.read_operator, tmp_path / "missing.json", match="does not exist")
    (tmp_path / "bad.json").write_text("{not json")
    _one_line_error(io.read_operator, tmp_path / "bad.json", match="not valid JSON")
    (tmp_path / "list.json").write_text("[1, 2]")
    _one_line_error(io.read_operator, tmp_path / "list.json")
    (tmp_path / "empty.json").write_text("{}")
    _one_line_error(io.read_operator, tmp_path / "empty.json")


def test_write_operator_missing_directory(tmp_path: Path, operators) -> None:
    op = operators.GaussianDownsampling(2, 1.0, anchor="center")
    _one_line_error(io.write_operator, tmp_path / "no" / "op.json", op, match="create it first")


def test_three_slice_stack_written_with_tifffile_defaults_stays_a_stack(tmp_path) -> None:
    """tifffile tags a (3, Y, X) uint8 array as planar RGB; it is a stack of slices here."""
    import warnings

    stack = np.arange(3 * 8 * 9, dtype=np.uint8).reshape(3, 8, 9)
    path = tmp_path / "three.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tifffile.imwrite(path, stack)
    np.testing.assert_array_equal(io.read_image(path).array, stack)
    same = np.stack([stack[0]] * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tifffile.imwrite(path, same)
    assert io.read_image(path).array.shape == (3, 8, 9)
