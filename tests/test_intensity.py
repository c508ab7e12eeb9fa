"""Tests of the intensity normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wpp.core.errors import InputError
from napari_wpp.core.intensity import Normalisation


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [("uint8", 0, 255), ("uint16", 0, 65535), ("int16", -32768, 32767), ("int8", -128, 127)],
)
def test_integer_uses_dtype_range(dtype: str, low: int, high: int) -> None:
    a = np.array([[3, 7], [9, 11]], dtype=dtype)
    n = Normalisation.from_array(a)
    assert (n.low, n.high, n.dtype) == (low, high, dtype)
    out = n.apply(a)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (a.astype(np.float64) - low) / (high - low), rtol=1e-6)


def test_uint8_values_and_round_trip() -> None:
    a = np.arange(256, dtype=np.uint8).reshape(16, 16)
    n = Normalisation.from_array(a)
    out = n.apply(a)
    assert out[0, 0] == 0.0 and out[-1, -1] == 1.0
    assert out.ravel()[51] == pytest.approx(51 / 255)
    back = n.invert(out)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, a)


def test_uint16_round_trip() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 65536, size=(5, 8, 9), dtype=np.uint16)
    n = Normalisation.from_array(a)
    np.testing.assert_array_equal(n.invert(n.apply(a)), a)


def test_invert_rounds_and_clips_integers() -> None:
    n = Normalisation(0.0, 255.0, "uint8")
    out = n.invert(np.array([-0.5, 0.0, 0.5, 0.5019, 1.0, 1.7], dtype=np.float32))
    np.testing.assert_array_equal(out, np.array([0, 0, 128, 128, 255, 255], dtype=np.uint8))


def test_invert_accepts_torch_tensor() -> None:
    torch = pytest.importorskip("torch")
    n = Normalisation(0.0, 255.0, "uint8")
    out = n.invert(torch.tensor([0.0, 1.0]))
    np.testing.assert_array_equal(out, np.array([0, 255], dtype=np.uint8))


def test_float_percentiles() -> None:
    a = np.linspace(-2.0, 3.0, 10001, dtype=np.float64)
    n = Normalisation.from_array(a, percentiles=(1.0, 99.0))
    assert n.dtype == "float64"
    assert n.low == pytest.approx(-2.0 + 0.05, abs=1e-9)
    assert n.high == pytest.approx(3.0 - 0.05, abs=1e-9)
    out = n.apply(a)
    assert out.min() == 0.0 and out.max() == 1.0  # clipped outside the percentiles
    mid = np.array([0.5], dtype=np.float64)
    np.testing.assert_allclose(n.apply(mid), [(0.5 - n.low) / (n.high - n.low)], rtol=1e-6)
    np.testing.assert_allclose(n.invert(n.apply(mid)), mid, rtol=1e-6)
    assert n.invert(n.apply(mid)).dtype == np.float64


def test_float_default_percentiles_robust_to_outlier() -> None:
    a = np.zeros((100, 100), dtype=np.float32)
    a[:, 50:] = 1.0
    a[0, 0] = 1000.0  # a single hot pixel must not set the range
    n = Normalisation.from_array(a)
    assert n.high == pytest.approx(1.0)
    assert n.low == pytest.approx(0.0)


def test_float_value_range() -> None:
    a = np.array([[0.25, 0.5]], dtype=np.float32)
    n = Normalisation.from_array(a, value_range=(0.0, 2.0))
    assert (n.low, n.high) == (0.0, 2.0)
    np.testing.assert_allclose(n.apply(a), [[0.125, 0.25]])
    assert n.apply(a, clip=False).dtype == np.float32


def test_constant_float_image() -> None:
    a = np.full((4, 4), 3.5, dtype=np.float32)
    n = Normalisation.from_array(a)
    assert n.high > n.low
    np.testing.assert_array_equal(n.apply(a), np.zeros((4, 4), np.float32))


def test_inputs_never_modified() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    copy = a.copy()
    n = Normalisation.from_array(a, value_range=(0.0, 11.0))
    out = n.apply(a)
    out[...] = -1
    np.testing.assert_array_equal(a, copy)
    normed = np.linspace(0, 1, 12, dtype=np.float32)
    ncopy = normed.copy()
    n.invert(normed)
    np.testing.assert_array_equal(normed, ncopy)


def test_dict_round_trip() -> None:
    n = Normalisation.from_array(np.zeros((2, 2), np.uint16))
    d = n.to_dict()
    assert d == {"low": 0.0, "high": 65535.0, "dtype": "uint16"}
    assert Normalisation.from_dict(d) == n


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((3, 3), dtype=bool),
        np.zeros((3, 3), dtype=np.complex64),
        np.array([[1, "a"]], dtype=object),
        np.array([[0.0, np.nan]], dtype=np.float32),
        np.array([[0.0, np.inf]], dtype=np.float64),
        np.zeros((0, 3), dtype=np.float32),
    ],
)
def test_bad_arrays_raise_one_line(array: np.ndarray) -> None:
    with pytest.raises(InputError) as info:
        Normalisation.from_array(array)
    assert "\n" not in str(info.value)


def test_nan_message_names_fix() -> None:
    with pytest.raises(InputError, match="NaN or Inf"):
        Normalisation.from_array(np.array([np.nan, 1.0]))


@pytest.mark.parametrize(
    "d",
    [
        {"low": 0.0, "high": 1.0},
        {"low": 1.0, "high": 1.0, "dtype": "uint8"},
        {"low": "x", "high": 1.0, "dtype": "uint8"},
        {"low": 0, "high": 1, "dtype": "bool"},
        [],
    ],
)
def test_bad_dicts_raise(d: object) -> None:
    with pytest.raises(InputError):
        Normalisation.from_dict(d)  # type: ignore[arg-type]


def test_bad_value_range() -> None:
    with pytest.raises(InputError):
        Normalisation.from_array(np.zeros(3, np.float32), value_range=(1.0, 1.0))
