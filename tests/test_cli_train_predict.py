"""Tests of ``napari-wpp train``, ``predict`` and the WPPNet part of ``demo`` (tiny sizes)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from cli_helpers import assert_bad_input as _assert_bad_input
from cli_helpers import run_cli as _run

from napari_wpp import io
from napari_wpp.cli import main
from napari_wpp.core.intensity import Normalisation

PIXEL = 1.5  # µm, the pixel size of the LR test files
FAST = ("--batch-size", "2", "--reference-patches", "200", "--psi-passes", "1", "--device", "cpu")


# --------------------------------------------------------------------------- helpers





def _write_tif(path: Path, array: np.ndarray, pixel: float | None = PIXEL) -> Path:
    if pixel is None:
        tifffile.imwrite(path, array)
    else:
        axes = "YX" if array.ndim == 2 else "ZYX"
        tifffile.imwrite(
            path,
            array,
            imagej=True,
            resolution=(1 / pixel, 1 / pixel),
            metadata={"unit": "micron", "axes": axes},
        )
    return path


def _tiff_pixel_size(path: Path) -> tuple[float, float]:
    data = io.read_image(path)
    assert data.pixel_size is not None
    return tuple(float(v) for v in data.pixel_size)  # (y, x)


@pytest.fixture(scope="module")
def material():
    """A ×2 synthetic material: LR stack 6×24×24 uint8, reference 48×48 uint8."""
    from napari_wpp.data import synthetic_material

    return synthetic_material(shape=(6, 48, 48), scale=2, noise=0.01, seed=0)


@pytest.fixture
def files(tmp_path: Path, material) -> dict[str, Path]:
    return {
        "lr": _write_tif(tmp_path / "lr.tif", material.lr),
        "lr2d": _write_tif(tmp_path / "lr2d.tif", material.lr[1]),
        "ref": _write_tif(tmp_path / "ref.tif", material.reference, pixel=None),
    }


def _train(
    capsys: pytest.CaptureFixture, files: dict[str, Path], out: Path, *extra: object
) -> tuple[int, str, str]:
    return _run(
        capsys,
        "train",
        "--lr-data",
        files["lr"],
        "--reference",
        files["ref"],
        "--out",
        out,
        *FAST,
        *extra,
    )


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory, material) -> Path:
    """A small WPPNet ×2 (8 features, 2 blocks) trained for 2 steps on the LR stack.

    Trained through the library (the CLI trains the published network size), saved with its
    training state as ``train`` does, so that predict and resume tests stay fast.
    """
    from napari_wpp.core.training import TrainingConfig, run_training

    folder = tmp_path_factory.mktemp("model")
    norm = Normalisation.from_array(material.lr)
    config = TrainingConfig(
        steps=2, batch_size=2, n_reference_patches=200, psi_passes=1, device="cpu",
        model_options={"features": 8, "blocks": 2},
    )
    final = run_training(
        norm.apply(material.lr),
        Normalisation.from_array(material.reference).apply(material.reference),
        material.operator,
        config,
        normalisation=norm.to_dict(),
    )
    return io.save_model(folder / "model.safetensors", final.state)


# --------------------------------------------------------------------------- train


def test_train_writes_a_loadable_model_file(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path]
) -> None:
    out = tmp_path / "model.safetensors"
    code, stdout, err = _train(capsys, files, out, "--scale", 2, "--steps", 2, "--json")
    assert code == 0, err
    payload = json.loads(stdout)
    assert payload["out"] == str(out)
    assert payload["steps"] == payload["steps_this_run"] == 2
    assert payload["model"] == "wppnet" and payload["scale"] == 2
    assert payload["device"] == "cpu" and payload["stopped_early"] is False
    for key in ("data_term", "wpp_term", "loss", "lambda", "seconds"):
        assert np.isfinite(payload[key]), key
    # the default rule with a unit-gain blur, crops clipped to 24
    assert payload["lambda"] == pytest.approx(12.5 / 24**2)

    meta = io.read_model_metadata(out)
    assert meta["kind"] == "wppnet" and meta["scale"] == 2 and meta["step"] == 2
    assert meta["operator"]["scale"] == 2 and meta["operator"]["sigma"] == 1.0
    assert meta["normalisation"] == {"low": 0.0, "high": 255.0, "dtype": "uint8"}
    assert meta["training_state"] is True
    assert meta["config"]["batch_size"] == 2 and meta["config"]["n_reference_patches"] == 200
    state = io.load_model(out)
    assert state.model.scale == 2 and state.step == 2
    assert [r["step"] for r in state.history] == [1, 2]
    assert state.history[-1]["data_term"] == pytest.approx(payload["data_term"])


def test_train_with_the_sliced_patch_distance(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path]
) -> None:
    out = tmp_path / "sliced.safetensors"
    code, stdout, err = _train(
        capsys, files, out, "--scale", 2, "--steps", 2, "--patch-distance", "sliced",
        "--projections", 16, "--json",
    )
    assert code == 0, err
    assert np.isfinite(json.loads(stdout)["wpp_term"])
    meta = io.read_model_metadata(out)
    assert meta["config"]["patch_distance"] == "sliced" and meta["config"]["projections"] == 16
    code, _, err = _train(capsys, files, out, "--resume", out, "--steps", 3)
    assert code == 0, err
    assert io.read_model_metadata(out)["step"] == 3
    code, _, err = _train(capsys, files, out, "--scale", 2, "--patch-distance", "near")
    assert code == 2 and "invalid choice: 'near'" in err


def test_train_text_output_and_progress(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path]
) -> None:
    out = tmp_path / "m.safetensors"
    code, stdout, err = _train(capsys, files, out, "--scale", 2, "--steps", 2, "--lambda", 0.01)
    assert code == 0, err
    assert stdout.startswith(f"wrote {out} (wppnet ×2) after 2 steps")
    assert "λ = 0.01" in stdout and "data " in stdout and "wpp " in stdout
    # the progress line: step/budget, steps per second, device, losses
    assert re.search(r"step 2/2 · [0-9.]+ (steps/s|s/step) · cpu · data ", err), err
    assert io.read_model_metadata(out)["lam"] == pytest.approx(0.01)


def test_train_with_an_operator_json(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], material
) -> None:
    op_path = io.write_operator(tmp_path / "op.json", material.operator)
    out = tmp_path / "m.safetensors"
    code, _, err = _train(capsys, files, out, "--operator", op_path, "--steps", 1)
    assert code == 0, err
    assert io.read_model_metadata(out)["operator"] == material.operator.to_dict()


def test_resume_continues_the_step_count(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], model_file: Path
) -> None:
    out = tmp_path / "more.safetensors"
    # no operator flags: the model file's operator is used
    code, stdout, err = _train(capsys, files, out, "--resume", model_file, "--steps", 4, "--json")
    assert code == 0, err
    payload = json.loads(stdout)
    assert payload["steps"] == 4 and payload["steps_this_run"] == 2
    assert payload["resumed_from"] == str(model_file)
    before, after = io.load_model(model_file), io.load_model(out)
    assert after.step == 4
    assert [r["step"] for r in after.history] == [1, 2, 3, 4]
    assert after.history[:2] == before.history
    assert after.elapsed_s > before.elapsed_s
    assert after.lam == before.lam and after.operator == before.operator
    changed = [
        name
        for name, value in after.model.state_dict().items()
        if not torch.equal(value, before.model.state_dict()[name])
    ]
    assert changed  # the two new steps trained the weights

    # the same operator given explicitly is accepted
    code, _, err = _train(
        capsys, files, tmp_path / "same.safetensors", "--resume", model_file, "--scale", 2,
        "--steps", 3,
    )
    assert code == 0, err
    assert io.read_model_metadata(tmp_path / "same.safetensors")["step"] == 3


def test_resume_refusals(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], model_file: Path
) -> None:
    out = tmp_path / "r.safetensors"
    cases = [
        (("--scale", 4, "--steps", 4), ("trained for ×2", "you asked ×4")),
        (("--scale", 2, "--sigma", 1.5, "--steps", 4), ("trained with", "σ 1.5")),
        (("--steps", 2), ("already trained 2 steps", "--steps")),
        (("--steps", 4, "--batch-size", 3), ("--batch-size 3", "resumed run")),
        (("--steps", 4, "--lambda", 0.5), ("--lambda",)),
        (("--steps", 4, "--patch-distance", "sliced"), ("--patch-distance sliced", "exact")),
    ]
    for extra, fragments in cases:
        _assert_bad_input(*_train(capsys, files, out, "--resume", model_file, *extra), *fragments)
    small = io.save_model(
        tmp_path / "small.safetensors", io.load_model(model_file), include_training_state=False
    )
    _assert_bad_input(
        *_train(capsys, files, out, "--resume", small, "--steps", 4), "no training state"
    )
    _assert_bad_input(
        *_train(capsys, files, out, "--resume", tmp_path / "missing.safetensors", "--steps", 4),
        "does not exist",
    )
    uint16 = _write_tif(tmp_path / "lr16.tif", np.zeros((2, 24, 24), np.uint16))
    _assert_bad_input(
        *_run(
            capsys, "train", "--lr-data", uint16, "--reference", files["ref"], "--out", out,
            "--resume", model_file, "--steps", 4, *FAST,
        ),
        "uint16",
        "uint8",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (("--crop-size", 8), ("too small",)),
        (("--device", "tpu"), ("unknown device",)),
        (("--rho", 100), ("--rho", "wppflow")),
        (("--model", "unet"), ("unknown --model",)),
        (("--lambda", "much"), ("'auto'",)),
        (("--steps", 0), ("--steps",)),
        ((), ("no forward operator",)),
    ],
)
def test_train_bad_input(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], extra, fragments
) -> None:
    out = tmp_path / "m.safetensors"
    scale = () if fragments == ("no forward operator",) else ("--scale", 2)
    _assert_bad_input(*_train(capsys, files, out, *scale, "--steps", 1, *extra), *fragments)
    assert not out.exists()


def test_train_small_lr_data(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path]
) -> None:
    """LR images whose crops are smaller than the patches at HR scale: the core's message."""
    tiny = _write_tif(tmp_path / "tiny.tif", np.full((2, 2), 100, np.uint8))
    out = tmp_path / "m.safetensors"
    code, stdout, err = _run(
        capsys, "train", "--lr-data", tiny, "--reference", files["ref"], "--scale", 2,
        "--out", out, "--steps", 1, *FAST,
    )
    _assert_bad_input(code, stdout, err, "LR crops of 2×2 are too small")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_cuda_without_cuda(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path]
) -> None:
    out = tmp_path / "m.safetensors"
    code, stdout, err = _train(capsys, files, out, "--scale", 2, "--steps", 1, "--device", "cuda")
    _assert_bad_input(code, stdout, err, "no CUDA")
    # predict too
    code, stdout, err = _run(
        capsys, "predict", tmp_path / "any.safetensors", files["lr2d"], "--out",
        tmp_path / "o.tif", "--device", "cuda",
    )
    _assert_bad_input(code, stdout, err, "no CUDA")


@pytest.mark.parametrize("name", ["model.pt", "model.tif", "model"])
def test_train_out_must_be_safetensors(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], name: str
) -> None:
    _assert_bad_input(
        *_train(capsys, files, tmp_path / name, "--scale", 2, "--steps", 1), ".safetensors"
    )
    assert list(tmp_path.glob("model*")) == []


def test_train_help_states_the_spec_defaults(capsys: pytest.CaptureFixture) -> None:
    from napari_wpp.core.config import TrainSpec
    from napari_wpp.core.training import DEFAULT_STEPS, PAPER_LAMBDA_NUMERATOR

    cpu, cuda = TrainSpec().for_device("cpu"), TrainSpec().for_device("cuda")
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"{DEFAULT_STEPS} steps" in text
    assert f"(default {cpu.batch_size}; {cuda.batch_size} on CUDA)" in text
    assert f"(default {cpu.n_reference_patches}; {cuda.n_reference_patches} on CUDA)" in text
    assert f"(default {cpu.psi_passes}; {cuda.psi_passes} on CUDA)" in text
    assert f"default {PAPER_LAMBDA_NUMERATOR:g} · gain² / crop-size²" in text


def test_a_spec_default_changes_the_help_and_the_run(
    capsys: pytest.CaptureFixture,
    files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Editing a default of the training spec is the only edit the CLI needs."""
    from cli_helpers import train_spec_with

    from napari_wpp.core import config

    def crop_help() -> str:
        assert main(["train", "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        return text.split("--crop-size C side", 1)[1].split("--reference-patches", 1)[0]

    assert "(default 25)" in crop_help()
    monkeypatch.setattr(config, "TrainSpec", train_spec_with(crop_size=12, seed=7))
    assert "(default 12)" in crop_help()
    out = tmp_path / "changed.safetensors"
    code, _stdout, err = _train(capsys, files, out, "--scale", 2, "--steps", 1)
    assert code == 0, err
    saved = io.read_model_metadata(out)["config"]
    assert saved["crop_size"] == 12 and saved["seed"] == 7


def test_train_checkpoints_by_time(
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a tiny --checkpoint-minutes the file is written during training, not only at the end."""
    saved: list[int] = []
    real = io.save_model

    def spy(path, state, include_training_state=True):
        saved.append(state.step)
        return real(path, state, include_training_state)

    monkeypatch.setattr(io, "save_model", spy)
    out = tmp_path / "m.safetensors"
    code, stdout, err = _train(
        capsys, files, out, "--scale", 2, "--steps", 3, "--checkpoint-minutes", 1e-6, "--json"
    )
    assert code == 0, err
    assert saved == [1, 2, 3, 3]  # a checkpoint after every step, then the final state
    assert json.loads(stdout)["checkpoints"] == 3

    saved.clear()
    code, _, err = _train(
        capsys, files, out, "--scale", 2, "--steps", 2, "--checkpoint-minutes", 0, "--overwrite"
    )
    assert code == 0, err
    assert saved == [2]


@pytest.mark.slow
def test_ctrl_c_stops_training_and_still_writes_the_model(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    out = tmp_path / "m.safetensors"
    argv = [
        sys.executable, "-m", "napari_wpp.cli", "train", "--lr-data", files["lr"],
        "--reference", files["ref"], "--scale", 2, "--out", out, "--steps", 100000,
        "--checkpoint-minutes", 0, "--json", *FAST,
    ]
    proc = subprocess.Popen(
        [str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        first = proc.stderr.readline()  # the first progress line: training has started
        assert "step 1" in first, first
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "stopping after this step" in stderr
    payload = json.loads(stdout)
    assert payload["stopped_early"] is True
    assert 1 <= payload["steps"] < 100000
    assert io.read_model_metadata(out)["step"] == payload["steps"]


# --------------------------------------------------------------------------- predict


def _expected(model_file: Path, volume: np.ndarray, axis: int = 0) -> np.ndarray:
    from napari_wpp.core.inference import run_superresolve

    state = io.load_model(model_file)
    norm = Normalisation.from_array(volume)
    return run_superresolve(state.model, volume, axis=axis, normalisation=norm, device="cpu")


def test_predict_2d_tiff(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], model_file: Path,
    material,
) -> None:
    out = tmp_path / "sr.tif"
    code, stdout, err = _run(
        capsys, "predict", model_file, files["lr2d"], "--out", out, "--device", "cpu", "--json"
    )
    assert code == 0, err
    payload = json.loads(stdout)
    assert payload["shape"] == [48, 48] and payload["dtype"] == "uint8"
    assert payload["scale"] == 2 and payload["axis"] is None and payload["slices"] == 1
    result = tifffile.imread(out)
    assert result.shape == (48, 48) and result.dtype == np.uint8
    expected = _expected(model_file, material.lr[1])
    assert np.abs(result.astype(int) - expected.astype(int)).max() <= 1
    assert _tiff_pixel_size(out) == pytest.approx((PIXEL / 2, PIXEL / 2))


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_predict_3d_tiff_along_an_axis(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], model_file: Path,
    material, axis: int,
) -> None:
    out = tmp_path / "sr.tiff"
    code, stdout, err = _run(
        capsys, "predict", model_file, files["lr"], "--out", out, "--axis", axis,
        "--batch-size", 5, "--device", "cpu",
    )
    assert code == 0, err
    assert stdout.startswith(f"wrote {out}")
    ax = axis % 3
    shape = tuple(n if i == ax else 2 * n for i, n in enumerate((6, 24, 24)))
    result = tifffile.imread(out)
    assert result.shape == shape and result.dtype == np.uint8
    expected = _expected(model_file, material.lr, axis=ax)
    assert np.abs(result.astype(int) - expected.astype(int)).max() <= 1
    py = PIXEL if ax == 1 else PIXEL / 2
    px = PIXEL if ax == 2 else PIXEL / 2
    assert _tiff_pixel_size(out) == pytest.approx((py, px))


def test_predict_tiles_match_whole_slices(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], model_file: Path
) -> None:
    whole, tiled = tmp_path / "whole.tif", tmp_path / "tiled.tif"
    for out, extra in ((whole, ()), (tiled, ("--tile", 7))):
        code, _, err = _run(capsys, "predict", model_file, files["lr"], "--out", out, *extra)
        assert code == 0, err
    difference = tifffile.imread(whole).astype(int) - tifffile.imread(tiled).astype(int)
    assert np.abs(difference).max() <= 1


def test_predict_float_input_uses_the_models_float_range(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], material,
) -> None:
    """A model trained on float data applies its recorded range to float inputs."""
    lr_float = (material.lr.astype(np.float32) * 4.0 + 100.0)  # range ≈ [100, 1120]
    lr_path = _write_tif(tmp_path / "lrf.tif", lr_float)
    model = tmp_path / "f.safetensors"
    code, _, err = _run(
        capsys, "train", "--lr-data", lr_path, "--reference", files["ref"], "--scale", 2,
        "--out", model, "--steps", 1, *FAST,
    )
    assert code == 0, err
    recorded = io.read_model_metadata(model)["normalisation"]
    assert recorded["dtype"] == "float32"
    out = tmp_path / "sr.tif"
    # a slice with a narrower range than the whole stack: its own percentiles would differ
    single = _write_tif(tmp_path / "one.tif", lr_float[2, :12, :12])
    code, stdout, err = _run(capsys, "predict", model, single, "--out", out, "--json")
    assert code == 0, err
    assert "model's range" in json.loads(stdout)["normalisation"]
    from napari_wpp.core.inference import run_superresolve

    state = io.load_model(model)
    norm = Normalisation.from_dict(recorded)
    expected = run_superresolve(state.model, lr_float[2, :12, :12], normalisation=norm)
    result = tifffile.imread(out)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-3)


@pytest.fixture
def zarr_volume(tmp_path: Path, material) -> Path:
    pytest.importorskip("zarr")
    path = tmp_path / "lr.zarr"
    array = io.create_zarr_array(
        path, material.lr.shape, material.lr.dtype, (1, 24, 24),
        attrs={"pixel_size": [3.0, PIXEL, PIXEL], "unit": "µm"},
    )
    array[...] = material.lr
    return path


def test_predict_zarr_to_zarr_and_tiff(
    capsys: pytest.CaptureFixture, tmp_path: Path, model_file: Path, zarr_volume: Path, material
) -> None:
    zarr = pytest.importorskip("zarr")
    expected = _expected(model_file, material.lr, axis=2)
    out = tmp_path / "sr.zarr"
    code, stdout, err = _run(
        capsys, "predict", model_file, zarr_volume, "--out", out, "--axis", 2, "--json"
    )
    assert code == 0, err
    assert json.loads(stdout)["shape"] == [12, 48, 24]
    result = zarr.open_array(str(out), mode="r")
    assert result.shape == (12, 48, 24) and result.dtype == np.uint8
    assert np.abs(np.asarray(result[...]).astype(int) - expected.astype(int)).max() <= 1
    assert list(result.attrs["pixel_size"]) == pytest.approx([1.5, PIXEL / 2, PIXEL])
    assert result.attrs["napari_wpp"]["complete"] is True
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []

    # predicting again replaces the zarr array
    code, _, err = _run(capsys, "predict", model_file, zarr_volume, "--out", out, "--axis", 2)
    assert code == 0, err

    tif = tmp_path / "sr.tif"
    code, _, err = _run(capsys, "predict", model_file, zarr_volume, "--out", tif, "--axis", 2)
    assert code == 0, err
    assert np.abs(tifffile.imread(tif).astype(int) - expected.astype(int)).max() <= 1
    assert _tiff_pixel_size(tif) == pytest.approx((PIXEL / 2, PIXEL))


def test_predict_tiff_to_zarr(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], model_file: Path,
    material,
) -> None:
    zarr = pytest.importorskip("zarr")
    for source, expected in (
        (files["lr"], _expected(model_file, material.lr)),
        (files["lr2d"], _expected(model_file, material.lr[1])),
    ):
        out = tmp_path / f"{source.stem}.zarr"
        code, _, err = _run(capsys, "predict", model_file, source, "--out", out)
        assert code == 0, err
        result = zarr.open_array(str(out), mode="r")
        assert result.shape == expected.shape and result.dtype == np.uint8
        assert np.abs(np.asarray(result[...]).astype(int) - expected.astype(int)).max() <= 1
        if expected.ndim == 2:  # a 2D TIFF knows both pixel sizes
            assert list(result.attrs["pixel_size"]) == pytest.approx([PIXEL / 2, PIXEL / 2])


def test_model_file_whose_kind_does_not_fit_its_weights_is_refused(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], model_file: Path
) -> None:
    """A WPPNet's weights in a file whose metadata names the wppflow kind."""
    state = dataclasses.replace(io.load_model(model_file), kind="wppflow")
    flow = io.save_model(tmp_path / "flow.safetensors", state)
    assert io.read_model_metadata(flow)["kind"] == "wppflow"
    out = tmp_path / "sr.tif"
    code, stdout, err = _run(capsys, "predict", flow, files["lr2d"], "--out", out)
    _assert_bad_input(code, stdout, err, "flow.safetensors", "invalid wppflow configuration")
    _assert_bad_input(
        *_train(capsys, files, tmp_path / "m.safetensors", "--resume", flow, "--steps", 9),
        "wppflow",
    )
    assert not out.exists()


def test_predict_bad_model_files(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], model_file: Path
) -> None:
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    out = tmp_path / "sr.tif"
    for bad, fragment in (
        (truncated, "truncated.safetensors"),
        (garbage, "garbage.safetensors"),
        (files["lr2d"], "lr2d.tif"),
        (tmp_path / "missing.safetensors", "does not exist"),
    ):
        _assert_bad_input(*_run(capsys, "predict", bad, files["lr2d"], "--out", out), fragment)
    assert not out.exists()


def test_predict_bad_input(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], model_file: Path
) -> None:
    zarr = pytest.importorskip("zarr")
    group = tmp_path / "group.zarr"
    zarr.open_group(str(group), mode="w")
    plain = tmp_path / "plain.zarr"
    plain.mkdir()
    (plain / "notes.txt").write_text("not zarr")
    out = tmp_path / "sr.tif"
    cases = [
        ((files["lr"], "--out", out, "--axis", 3), ("--axis 3", "0, 1 or 2")),
        ((files["lr"], "--out", out, "--axis", -4), ("--axis -4",)),
        ((files["lr2d"], "--out", out, "--axis", 1), ("2D", "drop --axis")),
        ((group, "--out", out), ("group",)),
        ((plain, "--out", out), ("not a zarr array",)),
        ((files["lr2d"], "--out", tmp_path / "sr.png"), (".tif", ".zarr")),
        ((files["lr2d"], "--out", tmp_path / "missing" / "sr.tif"), ("does not exist",)),
        ((files["lr2d"], "--out", plain), ("not a zarr array",)),
        ((files["lr2d"], "--out", out, "--device", "tpu"), ("unknown device",)),
        ((files["lr2d"], "--out", out, "--tile", 0), ("--tile",)),
        ((tmp_path / "missing.tif", "--out", out), ("does not exist",)),
    ]
    for argv, fragments in cases:
        _assert_bad_input(*_run(capsys, "predict", model_file, *argv), *fragments)
    assert not out.exists()
    assert (plain / "notes.txt").read_text() == "not zarr"


def test_predict_stopped_writes_nothing(
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    files: dict[str, Path],
    model_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the stop event ends inference early, no (partial) output is written: exit 130."""
    pytest.importorskip("zarr")
    from napari_wpp.core import inference

    real = inference.superresolve

    def stopped(*args, stop=None, **kwargs):
        assert stop is not None
        stop.set()  # as the first Ctrl-C does
        yield from real(*args, stop=stop, **kwargs)

    monkeypatch.setattr(inference, "superresolve", stopped)
    for out in (tmp_path / "sr.tif", tmp_path / "sr.zarr"):
        code, stdout, err = _run(capsys, "predict", model_file, files["lr"], "--out", out)
        assert code == 130, err
        assert stdout == ""
        assert err.strip().splitlines() == [f"error: interrupted: {out} was not written (no "
                                            "partial output is kept)"]
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


# --------------------------------------------------------------------------- demo


@pytest.mark.slow  # 5 s: two demo runs; test_cli.py's test_demo_tiny_budget stays fast
def test_demo_trains_and_compares_wppnet(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    code, stdout, err = _run(
        capsys, "demo", "--out", folder, "--minutes", 0.03, "--size", 48, "--device", "cpu",
        "--json",
    )
    assert code == 0, err
    payload = json.loads(stdout)
    assert set(payload["metrics"]) == {"bicubic", "wpp", "wppnet", "truth"}
    for method in ("bicubic", "wpp", "wppnet"):
        assert set(payload["metrics"][method]) == {"psnr", "ssim", "blur_effect"}
        assert 5 < payload["metrics"][method]["psnr"] < 60
    assert payload["training"]["steps"] >= 1
    assert tifffile.imread(folder / "wppnet.tif").shape == (48, 48)
    model = folder / "wppnet.safetensors"
    assert payload["files"]["model"] == str(model)
    assert io.read_model_metadata(model)["step"] == payload["training"]["steps"]
    assert (folder / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, stdout, err = _run(capsys, "demo", "--out", folder, "--minutes", 0.03, "--size", 48)
    assert code == 0, err
    assert [line.split()[0] for line in stdout.splitlines()[:5]] == [
        "method", "bicubic", "wpp", "wppnet", "truth",
    ]


def test_help_lists_train_and_predict(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "train" in text and "predict" in text
    for command in ("train", "predict"):
        assert main([command, "--help"]) == 0
        assert "--json" in capsys.readouterr().out


def test_a_damaged_zarr_chunk_is_one_line_naming_the_array(
    capsys: pytest.CaptureFixture, tmp_path: Path, model_file: Path, zarr_volume: Path
) -> None:
    """A chunk that no codec can decode: bad input naming the array, not "report it"."""
    chunk_files = sorted(p for p in zarr_volume.rglob("*") if p.is_file() and ".z" not in p.name
                         and p.name != "zarr.json")  # fmt: skip
    assert chunk_files
    chunk_files[len(chunk_files) // 2].write_bytes(b"not a compressed chunk")
    for out in (tmp_path / "sr.zarr", tmp_path / "sr.tif"):
        code, stdout, err = _run(capsys, "predict", model_file, zarr_volume, "--out", out)
        _assert_bad_input(code, stdout, err, f"zarr array {zarr_volume}", "damaged")


def test_nan_made_by_a_model_is_not_blamed_on_the_image(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], model_file: Path
) -> None:
    """A model whose weights hold a NaN: the line names the model, never "nan_to_num"."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(model_file), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(model_file))
    name = next(k for k, t in tensors.items() if t.is_floating_point() and t.ndim == 4)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    broken = tmp_path / "nan.safetensors"
    save_file(tensors, str(broken), metadata=metadata)
    code, stdout, err = _run(
        capsys, "predict", broken, files["lr2d"], "--out", tmp_path / "o.tif", "--device", "cpu"
    )
    _assert_bad_input(code, stdout, err, "the model or the operator produced them")
    assert "nan_to_num" not in err


def test_lr_noise_model_of_the_operator_is_kept_and_can_be_left_out(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path]
) -> None:
    from napari_wpp.core.operators import FourierDownsampling

    noisy = FourierDownsampling(2, np.ones((5, 5)) / 25, noise_variance=np.full((8, 8), 1e-3))
    op_path = io.write_operator(tmp_path / "op.json", noisy)
    kept, left_out = tmp_path / "kept.safetensors", tmp_path / "left_out.safetensors"
    for out, extra in ((kept, ()), (left_out, ("--no-lr-denoise",))):
        code, _, err = _train(capsys, files, out, "--operator", op_path, "--steps", 1, *extra)
        assert code == 0, err
    assert io.load_model(kept).model.denoises
    assert not getattr(io.load_model(left_out).model, "denoises", False)
    assert io.read_model_metadata(left_out)["config"]["lr_denoise"] is False
    outputs = {}
    for name, extra in (("denoised", ()), ("as_measured", ("--no-lr-denoise",))):
        outputs[name] = tmp_path / f"{name}.tif"
        code, _, err = _run(capsys, "predict", kept, files["lr2d"], "--out", outputs[name], *extra)
        assert code == 0, err
    denoised, as_measured = (tifffile.imread(p).astype(float) for p in outputs.values())
    assert np.abs(denoised - as_measured).max() > 0
    # predicting the input as it is leaves the model file unchanged
    assert io.load_model(kept).model.denoises
