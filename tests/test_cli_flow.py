"""``napari-wpp train --model wppflow`` and ``predict`` with a WPPFlow (tiny flows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from cli_helpers import assert_bad_input, run_cli

from napari_wpp import io
from napari_wpp.core import training
from napari_wpp.core.inference import run_sample
from napari_wpp.core.intensity import Normalisation

TINY = {"steps": 1, "hidden": 8, "cond_features": 4, "mean_features": 8, "mean_blocks": 2}
FAST = ("--batch-size", "2", "--reference-patches", "200", "--psi-passes", "1", "--device", "cpu")


@pytest.fixture(scope="module")
def material():
    """A ×2 synthetic material: LR stack 3×24×24 uint8, reference 48×48 uint8."""
    from napari_wpp.data import synthetic_material

    return synthetic_material(shape=(3, 48, 48), scale=2, noise=0.01, seed=0)


@pytest.fixture
def files(tmp_path: Path, material) -> dict[str, Path]:
    paths = {"lr": tmp_path / "lr.tif", "lr2d": tmp_path / "lr2d.tif", "ref": tmp_path / "ref.tif"}
    for name, array in (("lr", material.lr), ("lr2d", material.lr[1]), ("ref", material.reference)):
        tifffile.imwrite(paths[name], array, photometric="minisblack")
    return paths


@pytest.fixture
def tiny_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """``train`` builds tiny flows (the CLI trains the published sizes)."""
    from cli_helpers import train_spec_with

    from napari_wpp.core import config

    monkeypatch.setattr(config, "TrainSpec", train_spec_with(model_options=TINY))


@pytest.fixture(scope="module")
def flow_file(tmp_path_factory: pytest.TempPathFactory, material) -> Path:
    """A tiny WPPFlow ×2 trained for 2 steps through the library, saved as ``train`` does."""
    folder = tmp_path_factory.mktemp("flow")
    norm = Normalisation.from_array(material.lr)
    config = training.TrainingConfig(
        model="wppflow", steps=2, batch_size=2, n_reference_patches=200, psi_passes=1,
        device="cpu", model_options=TINY,
    )
    final = training.run_training(
        norm.apply(material.lr),
        Normalisation.from_array(material.reference).apply(material.reference),
        material.operator,
        config,
        normalisation=norm.to_dict(),
    )
    return io.save_model(folder / "flow.safetensors", final.state)


@pytest.fixture(scope="module")
def net_file(tmp_path_factory: pytest.TempPathFactory, material) -> Path:
    """A tiny WPPNet ×2 (untrained is enough for refusals)."""
    from napari_wpp.core.models.wppnet import WPPNet

    folder = tmp_path_factory.mktemp("net")
    model = WPPNet(scale=2, features=4, blocks=1)
    state = training.TrainingState(
        kind="wppnet", model=model, model_config=model.config(),
        operator=material.operator.to_dict(), lam=0.02, config={}, step=0, elapsed_s=0.0,
        normalisation=Normalisation.from_array(material.lr).to_dict(),
    )
    return io.save_model(folder / "net.safetensors", state, include_training_state=False)


def _train(capsys, files, out: Path, *extra: object) -> tuple[int, str, str]:
    return run_cli(
        capsys, "train", "--lr-data", files["lr"], "--reference", files["ref"], "--out", out,
        *FAST, *extra,
    )


def _predict(capsys, model: Path, image: Path, out: Path, *extra: object) -> dict:
    code, stdout, err = run_cli(capsys, "predict", model, image, "--out", out, "--json", *extra)
    assert code == 0, err
    return json.loads(stdout)


# --------------------------------------------------------------------------- train


def test_train_a_flow_and_resume_it(
    capsys, tmp_path: Path, files: dict[str, Path], tiny_training: None
) -> None:
    out = tmp_path / "flow.safetensors"
    code, stdout, err = _train(
        capsys, files, out, "--model", "wppflow", "--scale", 2, "--steps", 2, "--json"
    )
    assert code == 0, err
    payload = json.loads(stdout)
    assert payload["model"] == "wppflow" and payload["steps"] == 2
    # the published weighting per LR pixel, for crops clipped to the 24-pixel LR image
    rho = training.published_rho(0.01, 24)
    assert payload["rho"] == pytest.approx(rho) == pytest.approx(100 / (0.01**2 * 24**2))
    assert payload["lambda"] is None and payload["noise_std"] == 0.01
    assert "logdet" in err  # the flow's progress line
    meta = io.read_model_metadata(out)
    assert meta["kind"] == "wppflow" and meta["lam"] == pytest.approx(rho)
    assert meta["config"]["model"] == "wppflow" and meta["model_config"]["hidden"] == 8
    # resume: the kind comes from the file, the step count goes on
    code, stdout, err = _train(capsys, files, out, "--resume", out, "--steps", 3, "--json")
    assert code == 0, err
    payload = json.loads(stdout)
    assert payload["model"] == "wppflow" and payload["steps"] == 3
    assert payload["steps_this_run"] == 1 and payload["rho"] == pytest.approx(rho)
    assert io.read_model_metadata(out)["step"] == 3
    # resume refusals
    for extra, fragments in (
        (("--model", "wppnet"), ("--model wppnet", "resumed wppflow")),
        (("--rho", 5), ("--rho 5", "ρ = 1736")),
        (("--noise", 0.05), ("--noise 0.05", "σ = 0.01")),
        (("--lambda", 0.1), ("--lambda", "wppnet")),
        (("--mean-warmup", 0.1), ("--mean-warmup 0.1", "0.3")),
    ):
        assert_bad_input(
            *_train(capsys, files, out, "--resume", out, "--steps", 5, *extra), *fragments
        )


def test_train_a_flow_with_rho_and_noise(
    capsys, tmp_path: Path, files: dict[str, Path], tiny_training: None
) -> None:
    out = tmp_path / "flow.safetensors"
    code, stdout, err = _train(
        capsys, files, out, "--model", "wppflow", "--scale", 2, "--steps", 2,
        "--rho", 40, "--noise-std", 0.02, "--mean-warmup", 0.5,
    )
    assert code == 0, err
    assert "ρ = 40" in stdout and "σ = 0.02" in stdout
    assert "step 1/2 (mean warm-up) · " in err and "step 2/2 (spread) · " in err
    meta = io.read_model_metadata(out)
    assert meta["lam"] == 40.0 and meta["config"]["noise_std"] == 0.02
    # one warm-up step of the mean network, then one of the flow with the mean frozen
    assert meta["config"]["mean_warmup"] == 0.5 and meta["mean_frozen"] is True
    assert ["logdet" in record for record in meta["history"]] == [False, True]


def test_resuming_a_flow_saved_before_the_warmup_refuses_a_warmup(
    capsys, tmp_path: Path, files: dict[str, Path], tiny_training: None
) -> None:
    """A flow file without ``mean_warmup`` trained everything together: it resumes that way."""
    out = tmp_path / "flow.safetensors"
    code, _, err = _train(
        capsys, files, out, "--model", "wppflow", "--scale", 2, "--steps", 1, "--mean-warmup", 0
    )
    assert code == 0, err
    state = io.load_model(out)
    del state.config["mean_warmup"]  # as written before the warm-up existed
    old = io.save_model(tmp_path / "old.safetensors", state)
    assert_bad_input(
        *_train(capsys, files, out, "--resume", old, "--steps", 2, "--mean-warmup", 0.3),
        "--mean-warmup 0.3",
        "0.0",
    )
    code, _, err = _train(capsys, files, out, "--resume", old, "--steps", 2)
    assert code == 0, err
    assert "(spread)" not in err and "(mean warm-up)" not in err


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (("--rho", 10), ("--rho", "wppflow", "--lambda")),
        (("--model", "wppflow", "--lambda", 0.02), ("--lambda", "wppnet", "--rho")),
        (("--model", "wppflow", "--noise", 0), ("σ > 0", "--noise")),
        (("--model", "wppflow", "--rho", "lots"), ("'auto'", "--rho")),
        (("--model", "wppflow", "--rho", -1), ("--rho",)),
        (("--model", "realnvp"), ("unknown --model", "wppflow")),
        (("--mean-warmup", 0.2), ("--mean-warmup", "wppflow")),
        (("--model", "wppflow", "--mean-warmup", 1), ("--mean-warmup", "[0, 1)")),
        (("--model", "wppflow", "--mean-warmup", "half"), ("--mean-warmup", "[0, 1)")),
    ],
)
def test_train_refusals(capsys, tmp_path: Path, files: dict[str, Path], extra, fragments) -> None:
    out = tmp_path / "m.safetensors"
    assert_bad_input(*_train(capsys, files, out, "--scale", 2, "--steps", 1, *extra), *fragments)
    assert not out.exists()


# --------------------------------------------------------------------------- predict


def test_predict_2d_uint8_writes_mean_std_and_samples(
    capsys, tmp_path: Path, files: dict[str, Path], flow_file: Path, material
) -> None:
    out = tmp_path / "sr.tif"
    payload = _predict(
        capsys, flow_file, files["lr2d"], out, "--samples", 3, "--seed", 4, "--save-samples"
    )
    std_path, samples_path = tmp_path / "sr_std.tif", tmp_path / "sr_samples.tif"
    assert payload["out"] == str(out) and payload["std"] == str(std_path)
    assert payload["samples"] == str(samples_path) and payload["k"] == 3
    assert payload["seed"] == 4 and payload["temperature"] == 1.0
    mean, std = tifffile.imread(out), tifffile.imread(std_path)
    samples = tifffile.imread(samples_path)
    assert mean.shape == std.shape == (48, 48)
    assert mean.dtype == np.uint8 and std.dtype == np.float32
    assert samples.shape == (3, 48, 48) and samples.dtype == np.uint8  # not read as RGB
    # the std is in grey levels: 255 × the std in normalised units
    model = io.load_model(flow_file).model
    norm = Normalisation.from_array(material.lr)
    unit = run_sample(model, norm.apply(material.lr[1]), 3, seed=4, device="cpu")
    np.testing.assert_allclose(std, unit.std * 255.0, rtol=1e-4, atol=1e-3)
    assert std.mean() > 1.0
    # the mean is the mean of the samples (up to the rounding to integers)
    assert np.abs(samples.astype(np.float64).mean(0) - mean).max() <= 1.0
    assert np.array_equal(mean, norm.invert(unit.mean))


def test_predict_float_input_mean_is_the_mean_of_the_samples(
    capsys, tmp_path: Path, files: dict[str, Path], flow_file: Path, material
) -> None:
    image = tmp_path / "lr_float.tif"
    tifffile.imwrite(image, material.lr[0].astype(np.float32) * 2.0, photometric="minisblack")
    out = tmp_path / "sr.tif"
    _predict(capsys, flow_file, image, out, "--samples", 4, "--save-samples")
    mean = tifffile.imread(out)
    std = tifffile.imread(tmp_path / "sr_std.tif")
    samples = tifffile.imread(tmp_path / "sr_samples.tif")
    assert mean.dtype == samples.dtype == np.float32 and samples.shape == (4, 48, 48)
    scale = float(np.abs(samples).max())
    np.testing.assert_allclose(mean, samples.mean(0), atol=1e-5 * scale)
    np.testing.assert_allclose(std, samples.std(0, ddof=1), atol=1e-4 * scale)


def test_predict_defaults_to_eight_samples_and_seed_reproduces(
    capsys, tmp_path: Path, files: dict[str, Path], flow_file: Path
) -> None:
    first = _predict(capsys, flow_file, files["lr2d"], tmp_path / "a.tif")
    assert first["k"] == 8 and first["samples"] is None
    assert not (tmp_path / "a_samples.tif").exists()
    _predict(capsys, flow_file, files["lr2d"], tmp_path / "b.tif")
    _predict(capsys, flow_file, files["lr2d"], tmp_path / "c.tif", "--seed", 1)
    _predict(capsys, flow_file, files["lr2d"], tmp_path / "d.tif", "--tile", 5)
    std = {name: tifffile.imread(tmp_path / f"{name}_std.tif") for name in "abcd"}
    assert np.array_equal(std["a"], std["b"])
    assert not np.allclose(std["a"], std["c"])
    np.testing.assert_allclose(std["d"], std["a"], atol=1e-2)  # tiles: same latents
    code, stdout, _ = run_cli(capsys, "predict", flow_file, files["lr2d"], "--out",
                              tmp_path / "e.tif", "--temperature", 0)
    assert code == 0 and "8 posterior samples" in stdout
    assert tifffile.imread(tmp_path / "e_std.tif").max() < 1e-2


def test_predict_3d_stack_along_an_axis(
    capsys, tmp_path: Path, files: dict[str, Path], flow_file: Path
) -> None:
    out = tmp_path / "vol.tif"
    payload = _predict(
        capsys, flow_file, files["lr"], out, "--samples", 2, "--axis", 2, "--save-samples"
    )
    assert payload["shape"] == [6, 48, 24] and payload["slices"] == 24
    assert tifffile.imread(out).shape == (6, 48, 24)
    assert tifffile.imread(tmp_path / "vol_std.tif").shape == (6, 48, 24)
    assert tifffile.imread(tmp_path / "vol_samples.tif").shape == (2, 6, 48, 24)


def test_predict_zarr_to_zarr_out_of_core_matches_tiff(
    capsys, tmp_path: Path, files: dict[str, Path], flow_file: Path, material
) -> None:
    zarr = pytest.importorskip("zarr")
    source = zarr.open_array(str(tmp_path / "lr.zarr"), mode="w", shape=material.lr.shape,
                             chunks=(1, 24, 24), dtype=np.uint8)
    source[...] = material.lr
    payload = _predict(capsys, flow_file, tmp_path / "lr.zarr", tmp_path / "sr.zarr",
                       "--samples", 2, "--save-samples")
    assert payload["std"] == str(tmp_path / "sr_std.zarr")
    _predict(capsys, flow_file, files["lr"], tmp_path / "sr.tif", "--samples", 2,
             "--save-samples")
    _predict(capsys, flow_file, files["lr"], tmp_path / "mem.zarr", "--samples", 2)
    for name in ("sr", "sr_std", "sr_samples"):
        out_of_core = zarr.open_array(str(tmp_path / f"{name}.zarr"), mode="r")[...]
        expected = tifffile.imread(tmp_path / f"{name}.tif")
        assert out_of_core.dtype == expected.dtype
        np.testing.assert_allclose(out_of_core, expected, atol=1e-3)
    attrs = dict(zarr.open_array(str(tmp_path / "sr_std.zarr"), mode="r").attrs)
    assert attrs["napari_wpp"]["statistic"] == "std" and attrs["napari_wpp"]["complete"]
    in_memory = zarr.open_array(str(tmp_path / "mem_std.zarr"), mode="r")
    assert in_memory.dtype == np.float32 and in_memory.shape == (3, 48, 48)
    assert not (tmp_path / "mem_samples.zarr").exists()
    assert not list(tmp_path.glob(".*partial*"))


def test_sampling_flags_with_a_network_are_refused(
    capsys, tmp_path: Path, files: dict[str, Path], net_file: Path
) -> None:
    out = tmp_path / "sr.tif"
    for extra in (("--samples", 4), ("--save-samples",), ("--temperature", 0.5), ("--seed", 1)):
        assert_bad_input(
            *run_cli(capsys, "predict", net_file, files["lr2d"], "--out", out, *extra),
            extra[0],
            "wppflow",
        )
    assert not out.exists()
    assert_bad_input(
        *run_cli(capsys, "predict", net_file, files["lr2d"], "--out", out, "--samples", 0),
        "--samples",
    )


def test_flow_outputs_must_not_overwrite_the_input(
    capsys, tmp_path: Path, files: dict[str, Path], flow_file: Path
) -> None:
    image = tmp_path / "x_std.tif"
    image.write_bytes(files["lr2d"].read_bytes())
    before = image.read_bytes()
    assert_bad_input(
        *run_cli(capsys, "predict", flow_file, image, "--out", tmp_path / "x.tif"), "is the input"
    )
    assert image.read_bytes() == before and not (tmp_path / "x.tif").exists()


def test_stopped_sampling_writes_nothing(
    capsys, tmp_path: Path, files: dict[str, Path], flow_file: Path, material,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the stop event (the first Ctrl-C) ends sampling early: exit 130, no outputs."""
    zarr = pytest.importorskip("zarr")
    from napari_wpp.core import inference
    from napari_wpp.jobs import predict as zarr_jobs

    def stopping(real):
        def run(*args, stop=None, **kwargs):
            assert stop is not None
            stop.set()
            yield from real(*args, stop=stop, **kwargs)

        return run

    monkeypatch.setattr(inference, "sample_volume", stopping(inference.sample_volume))
    monkeypatch.setattr(zarr_jobs, "sample_zarr", stopping(zarr_jobs.sample_zarr))
    source = zarr.open_array(str(tmp_path / "lr.zarr"), mode="w", shape=material.lr.shape,
                             chunks=(1, 24, 24), dtype=np.uint8)
    source[...] = material.lr
    for image, out in ((files["lr"], tmp_path / "sr.tif"), (tmp_path / "lr.zarr",
                                                             tmp_path / "sr.zarr")):
        code, stdout, err = run_cli(capsys, "predict", flow_file, image, "--out", out,
                                    "--samples", 2, "--save-samples")
        assert code == 130 and stdout == "", err
        assert err.strip().splitlines() == [
            f"error: interrupted: {out} was not written (no partial output is kept)"
        ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr.tif", "lr.zarr", "lr2d.tif",
                                                          "ref.tif"]


def test_train_calibrates_the_std_and_predict_writes_both(
    capsys, tmp_path: Path, files: dict[str, Path], material, tiny_training: None
) -> None:
    reference = tmp_path / "wide_ref.tif"
    wide = np.tile(material.reference, (2, 5))[:96, :240]  # room for a 36-column strip at ×2
    tifffile.imwrite(reference, wide, photometric="minisblack")
    out = tmp_path / "flow.safetensors"
    wide_files = {**files, "ref": reference}
    code, stdout, err = _train(
        capsys, wide_files, out, "--model", "wppflow", "--scale", 2, "--steps", 1,
        "--calibration-holdout", 0.2, "--json",
    )
    assert code == 0, err
    payload = json.loads(stdout)
    assert payload["calibration"]["samples"] == 16 and payload["calibration_seconds"] > 0
    assert io.read_model_metadata(out)["config"]["calibration_holdout"] == 0.2
    result = _predict(capsys, out, files["lr2d"], tmp_path / "sr.tif", "--samples", 2)
    assert result["raw_std"].endswith("sr_raw_std.tif") and result["calibration"] is not None
    raw, calibrated = tifffile.imread(result["raw_std"]), tifffile.imread(result["std"])
    assert raw.shape == calibrated.shape and not np.array_equal(raw, calibrated)
    code, stdout, err = _train(
        capsys, files, tmp_path / "net.safetensors", "--model", "wppnet", "--scale", 2,
        "--calibration-holdout", 0.1,
    )
    assert_bad_input(code, stdout, err, "--calibration-holdout belongs to wppflow")
    code, stdout, err = _train(
        capsys, files, out, "--model", "wppflow", "--scale", 2, "--calibration-holdout", 0.9
    )
    assert code == 2 and "[0, 0.5]" in err
