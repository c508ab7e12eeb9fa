"""Tests of the command line (``napari-wpp``): real runs on tiny images and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from cli_helpers import assert_bad_input as _assert_bad_input
from cli_helpers import run_cli as _run

from napari_wpp import cli
from napari_wpp.cli import main
from napari_wpp.core.errors import InputError

# --------------------------------------------------------------------------- helpers


def _smooth_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth random float image in [0, 1] (low-pass filtered noise)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(shape)
    h, w = shape[-2:]
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    lowpass = np.exp(-(fy**2 + fx**2) / (2 * 0.08**2))
    smooth = np.real(np.fft.ifft2(np.fft.fft2(noise) * lowpass))
    smooth -= smooth.min()
    return (smooth / smooth.max()).astype(np.float32)


def _uint8(image: np.ndarray) -> np.ndarray:
    return np.round(image * 255).astype(np.uint8)





@pytest.fixture
def hr_tif(tmp_path: Path) -> Path:
    """A 64×64 uint8 HR image with a pixel size of 1.625 µm."""
    path = tmp_path / "hr.tif"
    tifffile.imwrite(
        path,
        _uint8(_smooth_image((64, 64))),
        imagej=True,
        resolution=(1 / 1.625, 1 / 1.625),
        metadata={"unit": "micron"},
    )
    return path


@pytest.fixture
def operators():
    return pytest.importorskip("napari_wpp.core.operators")


# --------------------------------------------------------------------------- help and usage


def test_help_of_every_subcommand(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    commands = (
        "degrade", "estimate-operator", "reconstruct", "train", "predict", "evaluate", "demo"
    )
    for command in commands:
        assert command in out
        code, sub_out, _ = _run(capsys, command, "--help")
        assert code == 0
        assert sub_out.startswith(f"usage: napari-wpp {command}")


def test_module_entry_point_help_in_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "napari_wpp.cli", "evaluate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    assert "--crop" in result.stdout


def test_missing_subcommand_is_one_error_line(capsys: pytest.CaptureFixture) -> None:
    _assert_bad_input(*_run(capsys))


def test_unknown_option_is_one_error_line(capsys: pytest.CaptureFixture) -> None:
    _assert_bad_input(*_run(capsys, "evaluate", "a.tif", "b.tif", "--bogus"), "--bogus")


# --------------------------------------------------------------------------- degrade


def test_degrade_2d_matches_operator_and_scales_pixel_size(
    capsys: pytest.CaptureFixture, tmp_path: Path, hr_tif: Path, operators
) -> None:
    from napari_wpp.io import read_image

    out = tmp_path / "lr.tif"
    code, stdout, _ = _run(capsys, "degrade", hr_tif, "--out", out, "--scale", 4, "--sigma", 2)
    assert code == 0, stdout
    result = read_image(out)
    assert result.array.dtype == np.uint8
    assert result.array.shape == (16, 16)
    assert result.pixel_size == pytest.approx((6.5, 6.5))
    assert result.unit == "µm"
    # The same operator applied by hand (uint8 → [0, 1] → f → round to uint8).
    hr = tifffile.imread(hr_tif).astype(np.float32) / 255
    op = operators.GaussianDownsampling(4, 2.0)
    with torch.no_grad():
        expected = op(torch.from_numpy(hr)).numpy()
    expected = np.round(np.clip(expected, 0, 1) * 255)
    assert np.abs(result.array.astype(float) - expected).max() <= 1


def test_degrade_keeps_a_constant_image_constant(
    capsys: pytest.CaptureFixture, tmp_path: Path, operators
) -> None:
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, np.full((48, 48), 1000, dtype=np.uint16))
    out = tmp_path / "flat_lr.tif"
    code, _, err = _run(capsys, "degrade", path, "--out", out, "--scale", 3, "--sigma", 1.5)
    assert code == 0, err
    low = tifffile.imread(out)
    assert low.dtype == np.uint16 and low.shape == (16, 16)
    assert np.all(low == 1000)


def test_degrade_3d_float_stack_with_seeded_noise(
    capsys: pytest.CaptureFixture, tmp_path: Path, operators
) -> None:
    stack = _smooth_image((3, 32, 32), seed=1)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    outs = [tmp_path / f"stack_lr{i}.tif" for i in range(3)]
    seeds = (7, 7, 8)
    for out, seed in zip(outs, seeds):
        code, stdout, err = _run(
            capsys,
            "degrade",
            path,
            "--out",
            out,
            "--scale",
            2,
            "--noise",
            0.05,
            "--seed",
            seed,
            "--json",
        )
        assert code == 0, err
        payload = json.loads(stdout)
        assert payload["shape"] == [3, 16, 16]
    a, b, c = (tifffile.imread(o) for o in outs)
    assert a.dtype == np.float32 and a.shape == (3, 16, 16)
    np.testing.assert_array_equal(a, b)  # same seed, same result
    assert not np.array_equal(a, c)
    # Noise of the requested size on the normalised scale (float range via percentiles).
    clean = tmp_path / "clean.tif"
    assert _run(capsys, "degrade", path, "--out", clean, "--scale", 2)[0] == 0
    lo, hi = np.percentile(stack, [0.1, 99.9])
    residual = (a - tifffile.imread(clean)) / (hi - lo)
    assert residual.std() == pytest.approx(0.05, rel=0.15)


def test_degrade_with_operator_json(
    capsys: pytest.CaptureFixture, tmp_path: Path, hr_tif: Path, operators
) -> None:
    from napari_wpp.io import write_operator

    op_path = tmp_path / "op.json"
    write_operator(op_path, operators.GaussianDownsampling(2, 1.0))
    out_json, out_flags = tmp_path / "a.tif", tmp_path / "b.tif"
    assert _run(capsys, "degrade", hr_tif, "--out", out_json, "--operator", op_path)[0] == 0
    assert _run(capsys, "degrade", hr_tif, "--out", out_flags, "--scale", 2, "--sigma", 1)[0] == 0
    np.testing.assert_array_equal(tifffile.imread(out_json), tifffile.imread(out_flags))


@pytest.mark.realdata
def test_degrade_reproduces_published_lr_with_corner_operator(
    capsys: pytest.CaptureFixture, tmp_path: Path, operators, shared_file
) -> None:
    hr, lr = shared_file("sic/hr_SiC.png"), shared_file("sic/lr_SiC_x4.png")
    from napari_wpp.io import read_image

    out = tmp_path / "lr.tif"
    code, _, err = _run(
        capsys,
        "degrade",
        hr,
        "--out",
        out,
        "--scale",
        4,
        "--sigma",
        2,
        "--anchor",
        "corner",
    )
    assert code == 0, err
    ours = tifffile.imread(out).astype(np.float64) / 255
    published = read_image(lr).array.astype(np.float64) / 255
    assert ours.shape == published.shape == (150, 150)
    # Published: noise 0.01 plus 8-bit quantisation leaves residual std 0.0101.
    assert 0.009 < float(np.std(ours - published)) < 0.0115


# --------------------------------------------------------------------------- estimate-operator


def test_estimate_operator_on_synthetic_pair(
    capsys: pytest.CaptureFixture, tmp_path: Path, operators
) -> None:
    from napari_wpp.io import read_operator

    hr = _smooth_image((96, 96), seed=3)
    op = operators.GaussianDownsampling(2, 1.0)
    with torch.no_grad():
        lr = op(torch.from_numpy(hr)).numpy()
    hr_path, lr_path, out = tmp_path / "hr.tif", tmp_path / "lr.tif", tmp_path / "op.json"
    # float images in [0, 1]: write them as float32 with the exact range pinned by 0 and 1 pixels
    tifffile.imwrite(hr_path, hr)
    tifffile.imwrite(lr_path, lr.astype(np.float32))
    code, stdout, err = _run(
        capsys,
        "estimate-operator",
        "--hr",
        hr_path,
        "--lr",
        lr_path,
        "--scale",
        2,
        "--kernel-size",
        9,
        "--out",
        out,
        "--json",
    )
    assert code == 0, err
    payload = json.loads(stdout)
    assert {"kernel_sum", "bias", "residual_rms"} <= set(payload)
    assert all(np.isfinite(payload[k]) for k in ("kernel_sum", "bias", "residual_rms"))
    assert payload["residual_rms"] < 0.05
    estimated = read_operator(out)
    assert estimated.scale == 2
    with torch.no_grad():
        fitted = estimated(torch.from_numpy(hr)).numpy()
    assert fitted.shape == lr.shape
    saved = json.loads(out.read_text())
    assert saved["fit"]["kernel_sum"] == pytest.approx(payload["kernel_sum"])
    assert saved["bias"] == pytest.approx(payload["bias"])


@pytest.mark.realdata
@pytest.mark.slow
def test_estimate_operator_on_registered_sandstone_pair(
    capsys: pytest.CaptureFixture, tmp_path: Path, shared_file
) -> None:
    hr = shared_file("fs_registered_pair/FS_HR_estimate_operator.png")
    lr = shared_file("fs_registered_pair/FS_LR_estimate_operator.png")
    out = tmp_path / "fs.json"
    code, stdout, err = _run(
        capsys, "estimate-operator", "--hr", hr, "--lr", lr, "--scale", 2, "--out", out, "--json"
    )
    assert code == 0, err
    payload = json.loads(stdout)
    # Published estimate (../shared/data/README.md): sum 1.7735, bias -0.22338, residual 0.0232.
    assert payload["kernel_sum"] == pytest.approx(1.7735, abs=0.01)
    assert payload["bias"] == pytest.approx(-0.22338, abs=0.005)
    assert payload["residual_rms"] == pytest.approx(0.0232, abs=0.002)
    assert payload["kernel_peak_index"] == [6, 6]


def test_estimate_operator_size_mismatch(
    capsys: pytest.CaptureFixture, tmp_path: Path, hr_tif: Path
) -> None:
    lr = tmp_path / "lr.tif"
    tifffile.imwrite(lr, np.zeros((20, 20), dtype=np.uint8))
    out = tmp_path / "op.json"
    result = _run(
        capsys, "estimate-operator", "--hr", hr_tif, "--lr", lr, "--scale", 4, "--out", out
    )
    _assert_bad_input(*result, "16×16")
    assert not out.exists()


# --------------------------------------------------------------------------- evaluate


def test_evaluate_matches_scikit_image(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from skimage.measure import blur_effect
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    truth = _uint8(_smooth_image((64, 64), seed=4))
    rng = np.random.default_rng(5)
    pred = np.clip(truth + rng.integers(-20, 21, truth.shape), 0, 255).astype(np.uint8)
    gt_path, pred_path = tmp_path / "gt.tif", tmp_path / "pred.png"
    tifffile.imwrite(gt_path, truth)
    import imageio.v3 as iio

    iio.imwrite(pred_path, pred)
    code, stdout, err = _run(capsys, "evaluate", pred_path, gt_path, "--crop", 8, "--json")
    assert code == 0, err
    payload = json.loads(stdout)
    t = truth[8:-8, 8:-8] / 255.0
    p = pred[8:-8, 8:-8] / 255.0
    assert payload["psnr"] == pytest.approx(peak_signal_noise_ratio(t, p, data_range=1), abs=1e-6)
    assert payload["ssim"] == pytest.approx(structural_similarity(t, p, data_range=1), abs=1e-6)
    assert payload["blur_effect"] == pytest.approx(blur_effect(p), abs=1e-6)
    # The text form shows the same PSNR.
    code, text, _ = _run(capsys, "evaluate", pred_path, gt_path, "--crop", 8)
    assert code == 0 and f"{payload['psnr']:.2f} dB" in text


def test_evaluate_float_images_outside_unit_range(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    from skimage.metrics import peak_signal_noise_ratio

    truth = _smooth_image((48, 48), seed=6) * 3000.0 + 500.0
    pred = truth + np.random.default_rng(7).normal(0, 30.0, truth.shape).astype(np.float32)
    tifffile.imwrite(tmp_path / "gt.tif", truth.astype(np.float32))
    tifffile.imwrite(tmp_path / "pred.tif", pred.astype(np.float32))
    code, stdout, err = _run(
        capsys, "evaluate", tmp_path / "pred.tif", tmp_path / "gt.tif", "--crop", 4, "--json"
    )
    assert code == 0, err
    lo, hi = float(truth.min()), float(truth.max())
    t = (truth[4:-4, 4:-4] - lo) / (hi - lo)
    p = np.clip((pred[4:-4, 4:-4] - lo) / (hi - lo), 0, 1)
    expected = peak_signal_noise_ratio(t, p, data_range=1)
    assert json.loads(stdout)["psnr"] == pytest.approx(expected, abs=1e-3)


def test_normalise_for_evaluation_rules() -> None:
    gt8 = np.array([[0, 255]], dtype=np.uint8)
    p, g, _ = cli.normalise_for_evaluation(np.array([[0.0, 0.5]], dtype=np.float32), gt8)
    np.testing.assert_allclose(p, [[0.0, 0.5]])  # float in [0, 1]: as is
    np.testing.assert_allclose(g, [[0.0, 1.0]])
    p, _, _ = cli.normalise_for_evaluation(np.array([[0.0, 51.0]], dtype=np.float32), gt8)
    np.testing.assert_allclose(p, [[0.0, 0.2]])  # float on the GT's 0..255 scale
    p, _, _ = cli.normalise_for_evaluation(np.array([[0, 13107]], dtype=np.uint16), gt8)
    np.testing.assert_allclose(p, [[0.0, 0.2]])  # integers: their own dtype range
    with pytest.raises(InputError):
        cli.normalise_for_evaluation(np.ones((2, 2), "f4"), np.full((2, 2), 5.0, "f4"))


def test_evaluate_shape_mismatch(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((32, 32), np.uint8))
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((32, 40), np.uint8))
    _assert_bad_input(
        *_run(capsys, "evaluate", tmp_path / "a.tif", tmp_path / "b.tif", "--crop", 2), "shape"
    )


def test_evaluate_crop_too_large(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((32, 32), np.uint8))
    _assert_bad_input(*_run(capsys, "evaluate", tmp_path / "a.tif", tmp_path / "a.tif"), "--crop")


# --------------------------------------------------------------------------- reconstruct


@pytest.fixture
def small_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A 16×16 uint8 LR image (×2) and a 48×48 uint8 reference."""
    lr = tmp_path / "small_lr.tif"
    ref = tmp_path / "small_ref.tif"
    tifffile.imwrite(lr, _uint8(_smooth_image((16, 16), seed=8)))
    tifffile.imwrite(ref, _uint8(_smooth_image((48, 48), seed=9)))
    return lr, ref


def test_reconstruct_three_iterations(
    capsys: pytest.CaptureFixture, tmp_path: Path, small_pair: tuple[Path, Path], operators
) -> None:
    lr, ref = small_pair
    out = tmp_path / "sr.tif"
    code, stdout, err = _run(
        capsys,
        "reconstruct",
        "--lr",
        lr,
        "--reference",
        ref,
        "--scale",
        2,
        "--iterations",
        3,
        "--device",
        "cpu",
        "--lambda",
        0.05,
        "--out",
        out,
        "--json",
    )
    assert code == 0, err
    payload = json.loads(stdout)  # stdout is exactly one JSON object
    assert payload["iterations"] == 3
    assert payload["lambda"] == 0.05
    assert payload["device"] == "cpu"
    assert payload["out"] == str(out)
    assert payload["seconds"] > 0
    result = tifffile.imread(out)
    assert result.dtype == np.uint8 and result.shape == (32, 32)
    # Three small Adam steps from the aligned bicubic start stay close to the LR content.
    low = tifffile.imread(lr).astype(float)
    assert abs(result.astype(float).mean() - low.mean()) < 10


def test_reconstruct_with_the_sliced_patch_distance(
    capsys: pytest.CaptureFixture, tmp_path: Path, small_pair: tuple[Path, Path], operators
) -> None:
    lr, ref = small_pair
    out = tmp_path / "sliced.tif"
    common = ("--lr", lr, "--reference", ref, "--scale", 2, "--iterations", 3, "--device", "cpu")
    code, _, err = _run(
        capsys, "reconstruct", *common, "--patch-distance", "sliced", "--projections", 0,
        "--out", out,
    )
    assert code == 0, err
    assert tifffile.imread(out).shape == (32, 32)
    code, _, err = _run(capsys, "reconstruct", *common, "--projections", -1, "--out", out)
    assert code == 2 and "--projections" in err


def test_reconstruct_one_slice_of_a_stack(
    capsys: pytest.CaptureFixture, tmp_path: Path, small_pair: tuple[Path, Path], operators
) -> None:
    lr, ref = small_pair
    stack = tmp_path / "stack.tif"
    planes = [_uint8(_smooth_image((16, 16), seed=s)) for s in (1, 2, 3)]
    tifffile.imwrite(stack, np.stack(planes), photometric="minisblack")
    common = ["--reference", ref, "--scale", 2, "--iterations", 2, "--device", "cpu"]
    out = tmp_path / "sr.tif"
    _assert_bad_input(*_run(capsys, "reconstruct", "--lr", stack, *common, "--out", out), "--slice")
    _assert_bad_input(
        *_run(capsys, "reconstruct", "--lr", stack, "--slice", 3, *common, "--out", out), "0 to 2"
    )
    _assert_bad_input(
        *_run(capsys, "reconstruct", "--lr", lr, "--slice", 0, *common, "--out", out), "2D"
    )
    assert not out.exists()
    code, _, err = _run(capsys, "reconstruct", "--lr", stack, "--slice", 1, *common, "--out", out)
    assert code == 0, err
    result = tifffile.imread(out).astype(float)
    assert result.shape == (32, 32)
    # the chosen slice, not another one, was reconstructed
    errors = [abs(result.mean() - plane.astype(float).mean()) for plane in planes]
    assert int(np.argmin(errors)) == 1


def test_reconstruct_small_reference(
    capsys: pytest.CaptureFixture, tmp_path: Path, small_pair: tuple[Path, Path], operators
) -> None:
    lr, _ = small_pair
    ref = tmp_path / "tiny_ref.tif"
    tifffile.imwrite(ref, np.zeros((4, 40), np.uint8))
    out = tmp_path / "sr.tif"
    result = _run(capsys, "reconstruct", "--lr", lr, "--reference", ref, "--scale", 2, "--out", out)
    _assert_bad_input(*result, "patch")
    assert not out.exists()


def test_reconstruct_unknown_device(
    capsys: pytest.CaptureFixture, tmp_path: Path, small_pair: tuple[Path, Path], operators
) -> None:
    lr, ref = small_pair
    out = tmp_path / "sr.tif"
    result = _run(
        capsys,
        "reconstruct",
        "--lr",
        lr,
        "--reference",
        ref,
        "--scale",
        2,
        "--device",
        "tpu",
        "--out",
        out,
    )
    _assert_bad_input(*result, "device")
    assert not out.exists()


def test_reconstruct_needs_2d_lr(
    capsys: pytest.CaptureFixture, tmp_path: Path, small_pair: tuple[Path, Path], operators
) -> None:
    _, ref = small_pair
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((3, 16, 16), np.uint8), photometric="minisblack")
    out = tmp_path / "sr.tif"
    result = _run(
        capsys, "reconstruct", "--lr", stack, "--reference", ref, "--scale", 2, "--out", out
    )
    _assert_bad_input(*result, "2D")
    assert not out.exists()


# --------------------------------------------------------------------------- bad input, shared


def _degrade_args(tmp_path: Path, image: Path, *extra: object) -> list[object]:
    return ["degrade", image, "--out", tmp_path / "out.tif", *extra]


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--scale", "2.5"), "integer"),
        (("--scale", "1"), "≥ 2"),
        (("--scale", "four"), "integer"),
        (("--scale", "4", "--sigma", "0"), "> 0"),
        (("--scale", "4", "--sigma", "-1"), "> 0"),
        (("--scale", "4", "--sigma", "nan"), "> 0"),
        (("--scale", "4", "--noise", "-0.1"), "≥ 0"),
        ((), "--operator"),
        (("--scale", "4", "--operator", "op.json"), "not both"),
    ],
)
def test_degrade_bad_flags(
    capsys: pytest.CaptureFixture, tmp_path: Path, hr_tif: Path, flags: tuple, fragment: str
) -> None:
    _assert_bad_input(*_run(capsys, *_degrade_args(tmp_path, hr_tif, *flags)), fragment)
    assert not (tmp_path / "out.tif").exists()


def test_missing_input_file(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    result = _run(capsys, *_degrade_args(tmp_path, tmp_path / "nope.tif", "--scale", 2))
    _assert_bad_input(*result, "does not exist")
    assert not (tmp_path / "out.tif").exists()


def test_unreadable_input_file(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    bad = tmp_path / "garbage.tif"
    bad.write_bytes(b"this is not a tiff file at all" * 10)
    result = _run(capsys, *_degrade_args(tmp_path, bad, "--scale", 2))
    _assert_bad_input(*result, "garbage.tif")
    assert not (tmp_path / "out.tif").exists()


def test_input_not_2d_or_3d(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    path = tmp_path / "four_d.tif"
    tifffile.imwrite(path, np.zeros((2, 5, 16, 16), np.uint8), photometric="minisblack")
    _assert_bad_input(*_run(capsys, *_degrade_args(tmp_path, path, "--scale", 2)), "shape")
    assert not (tmp_path / "out.tif").exists()


def test_nan_pixels(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    image = np.ones((32, 32), np.float32)
    image[3, 4] = np.nan
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, image)
    _assert_bad_input(*_run(capsys, *_degrade_args(tmp_path, path, "--scale", 2)), "nan")
    assert not (tmp_path / "out.tif").exists()
    ok = tmp_path / "ok.tif"
    tifffile.imwrite(ok, np.ones((32, 32), np.float32))
    _assert_bad_input(*_run(capsys, "evaluate", path, ok, "--crop", 2), "nan")


@pytest.mark.parametrize("content", ["{not json", '{"kind": "no-such-operator"}', "[1, 2, 3]", ""])
def test_malformed_operator_json(
    capsys: pytest.CaptureFixture, tmp_path: Path, hr_tif: Path, content: str, operators
) -> None:
    op = tmp_path / "op.json"
    op.write_text(content)
    result = _run(capsys, *_degrade_args(tmp_path, hr_tif, "--operator", op))
    _assert_bad_input(*result, "op.json")
    assert not (tmp_path / "out.tif").exists()


def test_output_in_missing_folder(capsys: pytest.CaptureFixture, tmp_path: Path, hr_tif: Path):
    out = tmp_path / "missing" / "out.tif"
    result = _run(capsys, "degrade", hr_tif, "--out", out, "--scale", 2)
    _assert_bad_input(*result, "does not exist")
    assert not out.parent.exists()


def test_output_must_be_tiff(capsys: pytest.CaptureFixture, tmp_path: Path, hr_tif: Path):
    out = tmp_path / "out.png"
    _assert_bad_input(*_run(capsys, "degrade", hr_tif, "--out", out, "--scale", 2), ".tif")
    assert not out.exists()


def test_unexpected_error_is_one_line_and_debug_reraises(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(args):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(cli.evaluate, "run", boom)
    code, out, err = _run(capsys, "evaluate", "a.tif", "b.tif")
    lines = err.strip().splitlines()
    assert code == 1 and out == ""
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "kaboom second line" in lines[0] and "--debug" in lines[0]
    with pytest.raises(RuntimeError, match="kaboom"):
        main(["evaluate", "a.tif", "b.tif", "--debug"])


# --------------------------------------------------------------------------- progress


class _FakeStream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.text = ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("tty", [False, True])
def test_progress_bar(monkeypatch: pytest.MonkeyPatch, tty: bool) -> None:
    stream = _FakeStream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    bar = cli.ProgressBar("work")
    for i in range(1, 501):
        bar.update(i / 500, f"it {i}")
    bar.close()
    if tty:  # one line redrawn in place, ending at 100 % and a newline
        assert stream.text.count("\n") == 1 and stream.text.endswith("\n")
        assert "\r" in stream.text
        assert "100% it 500" in stream.text.split("\r")[-1]
    else:  # a line per tenth of the work, no carriage returns
        lines = stream.text.splitlines()
        assert "\r" not in stream.text
        assert 10 <= len(lines) <= 11
        assert "100% it 500" in lines[-1]


# --------------------------------------------------------------------------- demo


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [(("--size", "66"), "multiple of 4"), (("--out", "missing/demo"), "does not exist")],
)
def test_demo_bad_input(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv, fragment
) -> None:
    monkeypatch.chdir(tmp_path)
    _assert_bad_input(*_run(capsys, "demo", *argv), fragment)
    assert list(tmp_path.iterdir()) == []


def test_bad_input_in_a_fresh_process(tmp_path: Path) -> None:
    """The real console path: one stderr line and exit code 2, nothing else printed."""
    result = subprocess.run(
        [sys.executable, "-m", "napari_wpp.cli", "evaluate", str(tmp_path / "a.tif"), "b.tif"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")


def test_demo_tiny_budget(capsys: pytest.CaptureFixture, tmp_path: Path, operators) -> None:
    pytest.importorskip("napari_wpp.data")
    folder = tmp_path / "demo"
    code, stdout, err = _run(
        capsys,
        "demo",
        "--out",
        folder,
        "--minutes",
        0.02,
        "--size",
        64,
        "--device",
        "cpu",
        "--json",
    )
    assert code == 0, err
    payload = json.loads(stdout)
    for name in ("truth", "lr", "bicubic", "wpp"):
        path = folder / f"{name}.tif"
        assert path.exists()
        assert payload["files"][name] == str(path)
    assert tifffile.imread(folder / "truth.tif").shape == (64, 64)
    assert tifffile.imread(folder / "lr.tif").shape == (16, 16)
    assert tifffile.imread(folder / "wpp.tif").shape == (64, 64)
    png = folder / "comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in ("bicubic", "wpp"):
        assert set(payload["metrics"][method]) == {"psnr", "ssim", "blur_effect"}
        assert 5 < payload["metrics"][method]["psnr"] < 60
    assert payload["iterations"] >= 1


def test_lambda_help_matches_library_default(capsys: pytest.CaptureFixture) -> None:
    from napari_wpp.core.reconstruct import DEFAULT_LAMBDA

    assert main(["reconstruct", "--help"]) == 0
    assert f"default {DEFAULT_LAMBDA:g}" in " ".join(capsys.readouterr().out.split())
