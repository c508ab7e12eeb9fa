"""``napari-wpp transport fit|apply``, ``evaluate`` without ground truth, transport files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from cli_helpers import assert_bad_input, run_cli
from toy_images import texture

from napari_wpp.core.errors import InputError
from napari_wpp.core.operators import GaussianDownsampling


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    """A blurry uint8 'prediction' stack, a sharp reference and a fitted transport file."""
    paths = {
        "pred": tmp_path / "pred.tif",
        "pred2d": tmp_path / "pred2d.tif",
        "ref": tmp_path / "ref.tif",
        "t": tmp_path / "t.json",
    }
    stack = texture((3, 64, 72), 2.5, 0)
    tifffile.imwrite(paths["pred"], stack, photometric="minisblack")
    tifffile.imwrite(paths["pred2d"], stack[1])
    tifffile.imwrite(paths["ref"], texture((96, 96), 0.8, 1))
    return paths


def _fit(capsys, files, *extra) -> dict:
    code, out, err = run_cli(
        capsys,
        "transport", "fit", "--source", files["pred"], "--reference", files["ref"],
        "--out", files["t"], "--patch-size", 4, "--json", *extra,
    )  # fmt: skip
    assert code == 0, err
    return json.loads(out)


def test_fit_writes_a_transport_file_that_reads_back(capsys, files) -> None:
    from napari_wpp.io.transport import read_transport

    report = _fit(capsys, files)
    assert report["source_patches"] == 3 * 61 * 69
    assert report["distance_from_identity"] > 0.1
    content = read_transport(files["t"])
    assert content.transport.patch_size == 4
    assert content.normalisation["dtype"] == "uint8"
    band = content.band["gelbrich"]
    assert band["low"] <= band["middle"] <= band["high"]
    assert content.provenance["reference"] == str(files["ref"].resolve())


def test_apply_at_alpha_one_is_the_input_and_stacks_go_slice_by_slice(
    capsys, files, tmp_path
) -> None:
    _fit(capsys, files)
    same, moved, single = tmp_path / "a1.tif", tmp_path / "a0.tif", tmp_path / "s0.tif"
    t = files["t"]
    for pred, alpha, out in ((files["pred"], 1, same), (files["pred"], 0, moved)):
        code, _, err = run_cli(
            capsys, "transport", "apply", pred, "--transport", t, "--alpha", alpha, "--out", out
        )
        assert code == 0, err
    code, _, err = run_cli(
        capsys, "transport", "apply", files["pred2d"], "--transport", t, "--alpha", 0, "--out",
        single,
    )  # fmt: skip
    assert code == 0, err
    pred = tifffile.imread(files["pred"])
    np.testing.assert_array_equal(tifffile.imread(same), pred)
    out = tifffile.imread(moved)
    assert out.dtype == np.uint8 and out.shape == pred.shape
    assert np.abs(out.astype(float) - pred).mean() > 1.0
    np.testing.assert_array_equal(out[1], tifffile.imread(single))

    # the transport sharpens: the stack's high frequencies grow towards the reference's
    def detail(a: np.ndarray) -> float:
        return float(np.abs(np.diff(a.astype(float), axis=-1)).mean())

    sharp = detail(tifffile.imread(files["ref"]))
    assert detail(pred) < detail(out) < sharp


def test_apply_zarr_to_zarr_matches_the_tiff_route(capsys, files, tmp_path) -> None:
    zarr = pytest.importorskip("zarr")
    _fit(capsys, files)
    src = tmp_path / "pred.zarr"
    stack = tifffile.imread(files["pred"])
    z = zarr.open_array(str(src), mode="w", shape=stack.shape, chunks=(1, 64, 72), dtype="u1")
    z[...] = stack
    z.attrs["pixel_size"] = [1.0, 0.5, 0.5]
    out_z, out_t = tmp_path / "out.zarr", tmp_path / "out.tif"
    for src_path, out in ((src, out_z), (files["pred"], out_t)):
        code, out_text, err = run_cli(
            capsys, "transport", "apply", src_path, "--transport", files["t"], "--out", out,
            "--json",
        )  # fmt: skip
        assert code == 0, err
        report = json.loads(out_text)
        assert 0.0 <= report["alpha"] <= 1.0 and report["alpha_how"].startswith("auto")
    result = zarr.open_array(str(out_z), mode="r")
    np.testing.assert_array_equal(result[...], tifffile.imread(out_t))
    assert result.attrs["pixel_size"] == [1.0, 0.5, 0.5]
    assert result.attrs["napari_wpp"]["transport"]["alpha"] == report["alpha"]
    assert not list(tmp_path.glob(".*partial*"))


def test_data_steps_bring_the_residual_to_the_noise(capsys, files, tmp_path) -> None:
    _fit(capsys, files)
    operator = GaussianDownsampling(2, 1.0, 6)
    pred = tifffile.imread(files["pred2d"]).astype(np.float32) / 255
    truth = texture((64, 72), 1.2, 7).astype(np.float32) / 255
    with torch.no_grad():
        lr = operator(torch.from_numpy(truth)).numpy()
    tifffile.imwrite(tmp_path / "lr.tif", lr.astype(np.float32))
    tifffile.imwrite(tmp_path / "pred.tif", pred)
    out = tmp_path / "dc.tif"
    code, _, err = run_cli(
        capsys, "transport", "apply", tmp_path / "pred.tif", "--transport", files["t"],
        "--alpha", 1, "--lr", tmp_path / "lr.tif", "--data-steps", 20, "--noise", 0.02,
        "--scale", 2, "--sigma", 1, "--kernel-size", 6, "--out", out,
    )  # fmt: skip
    assert code == 0, err
    from napari_wpp.core.patch_distance import data_rms

    before = data_rms(pred, lr, operator)
    after = data_rms(tifffile.imread(out), lr, operator)
    assert before > 0.03
    assert after == pytest.approx(0.02, rel=0.1)


def test_bad_inputs_are_one_line_errors(capsys, files, tmp_path) -> None:
    _fit(capsys, files)
    out = tmp_path / "o.tif"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    args = ("transport", "apply", files["pred"], "--out", out)
    assert_bad_input(*run_cli(capsys, *args, "--transport", bad), "not valid JSON")
    bad.write_text(json.dumps({"format": "something else"}))
    assert_bad_input(*run_cli(capsys, *args, "--transport", bad), "not a napari-wpp transport")
    d = json.loads(files["t"].read_text())
    d["source"]["mean"] = d["source"]["mean"][:-1]
    bad.write_text(json.dumps(d))
    assert_bad_input(*run_cli(capsys, *args, "--transport", bad), "source statistics")
    code, out_text, err = run_cli(capsys, *args, "--transport", files["t"], "--alpha", 2)
    assert code == 2 and "alpha" in err
    assert_bad_input(*run_cli(capsys, *args, "--transport", files["t"], "--data-steps", 3), "--lr")
    assert_bad_input(
        *run_cli(
            capsys, "transport", "apply", files["pred"], "--transport", files["t"], "--out",
            files["pred"],
        ),
        "overwrite",
    )  # fmt: skip


def test_read_transport_refuses_non_finite_statistics(files, capsys) -> None:
    from napari_wpp.io.transport import read_transport

    _fit(capsys, files)
    d = json.loads(files["t"].read_text())
    d["target"]["covariance"][0][0] = None
    files["t"].write_text(json.dumps(d))
    with pytest.raises(InputError, match="target statistics"):
        read_transport(files["t"])


def test_evaluate_without_ground_truth(capsys, files, tmp_path) -> None:
    operator = GaussianDownsampling(2, 1.0, 6)
    pred = tifffile.imread(files["pred2d"])
    with torch.no_grad():
        lr = operator(torch.from_numpy(pred.astype(np.float32) / 255)).numpy()
    noise = np.random.default_rng(3).normal(scale=0.01, size=lr.shape)
    tifffile.imwrite(tmp_path / "lr.tif", np.clip(lr + noise, 0, 1).astype(np.float32))
    code, out, err = run_cli(
        capsys, "evaluate", files["pred2d"], "--lr", tmp_path / "lr.tif", "--scale", 2,
        "--sigma", 1, "--kernel-size", 6, "--reference", files["ref"], "--patch-size", 4,
        "--noise", 0.01, "--json",
    )  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    assert r["noise"] == 0.01 and r["noise_source"] == "given"
    assert r["data_rms"] == pytest.approx(0.01, rel=0.2)  # PRED is the truth: only noise left
    band = r["reference_band"]["gelbrich"]
    # a blurry image is much farther from the sharp reference than the reference from itself
    assert r["patch_distance"]["gelbrich"] > band["high"]
    assert r["patch_distance"]["sliced"] > r["reference_band"]["sliced"]["high"]
    code, text, err = run_cli(capsys, "evaluate", files["pred2d"], "--reference", files["ref"])
    assert code == 0 and "to the reference" in text and "data rms" not in text
    assert_bad_input(*run_cli(capsys, "evaluate", files["pred2d"]), "GT")
    assert_bad_input(
        *run_cli(capsys, "evaluate", files["pred2d"], "--reference", files["ref"], "--std", "x"),
        "--std",
    )


def test_predict_alpha_needs_transport(capsys, tmp_path) -> None:
    code, out, err = run_cli(
        capsys, "predict", tmp_path / "m.safetensors", tmp_path / "in.tif", "--out",
        tmp_path / "o.tif", "--alpha", 0.5,
    )  # fmt: skip
    assert code == 2 and "error:" in err
