"""``napari-wpp train --model patchnr`` and ``reconstruct --prior`` on real files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from cli_helpers import assert_bad_input, run_cli
from scipy.ndimage import gaussian_filter

from napari_wpp.core.operators import GaussianDownsampling

SMALL = ("--hidden", "16", "--patch-batch", "64", "--device", "cpu")
OPERATOR = ("--scale", "4", "--sigma", "2")


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    hr = gaussian_filter(rng.standard_normal((96, 96)), 1.5)
    hr = (hr - hr.min()) / (hr.max() - hr.min())
    operator = GaussianDownsampling(4, 2.0)
    import torch

    with torch.no_grad():
        lr = operator(torch.from_numpy(hr.astype(np.float32))).numpy()
    ref = tmp_path / "ref.tif"
    lr_path = tmp_path / "lr.tif"
    tifffile.imwrite(ref, (255 * hr).astype(np.uint8))
    tifffile.imwrite(lr_path, (255 * np.clip(lr, 0, 1)).astype(np.uint8))
    return tmp_path, ref, lr_path


def test_reference_prior_then_reconstruct(files, capsys) -> None:
    folder, ref, lr = files
    prior = folder / "prior.safetensors"
    code, out, err = run_cli(
        capsys, "train", "--model", "patchnr", "--reference", ref, "--steps", "30", *SMALL,
        "--out", prior, "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == "patchnr" and report["mode"] == "reference"
    assert report["steps"] == 30 and report["heldout_nll"] is not None
    sr = folder / "sr.tif"
    code, out, err = run_cli(
        capsys, "reconstruct", "--lr", lr, "--prior", prior, *OPERATOR, "--iterations", "3",
        "--out", sr, "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["prior"] == "patchnr" and report["iterations"] == 3
    image = tifffile.imread(sr)
    assert image.shape == (96, 96) and image.dtype == np.uint8
    assert_bad_input(
        *run_cli(capsys, "predict", prior, lr, "--out", folder / "p.tif"),
        "is a PatchNR prior, not a superresolution network",
    )


def test_zero_shot_prior_and_resume(files, capsys) -> None:
    folder, _ref, lr = files
    prior = folder / "zero.safetensors"
    args = ("train", "--model", "patchnr", "--lr-data", lr, *OPERATOR, *SMALL, "--out", prior)
    code, out, err = run_cli(capsys, *args, "--steps", "10", "--json")
    assert code == 0, err
    assert json.loads(out)["mode"] == "zero-shot"
    code, out, err = run_cli(capsys, *args, "--steps", "20", "--resume", prior, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["steps"] == 20 and report["steps_this_run"] == 10
    changed = [a if a != "16" else "32" for a in args]  # another --hidden
    assert_bad_input(
        *run_cli(capsys, *changed, "--steps", "30", "--resume", prior),
        "--hidden 32 differs from the resumed run's 16",
    )


def test_bad_inputs_are_one_line(files, capsys) -> None:
    folder, ref, lr = files
    net = folder / "net.safetensors"
    code, out, err = run_cli(
        capsys, "train", "--lr-data", lr, "--reference", ref, *OPERATOR, "--steps", "1",
        "--batch-size", "1", "--crop-size", "8", "--reference-patches", "50", "--out", net,
    )  # fmt: skip
    assert code == 0, err
    sr = folder / "sr.tif"
    assert_bad_input(
        *run_cli(capsys, "reconstruct", "--lr", lr, "--prior", net, *OPERATOR, "--out", sr),
        "is a wppnet model, not a PatchNR prior",
    )
    prior = folder / "p.safetensors"

    def train_prior(*argv: object) -> tuple[int, str, str]:
        return run_cli(capsys, "train", "--model", "patchnr", *argv, "--out", prior)

    assert_bad_input(*train_prior(), "--reference REF, or zero-shot from --lr-data LR")
    tiny, nan = folder / "tiny.tif", folder / "nan.tif"
    tifffile.imwrite(tiny, np.zeros((4, 40), np.uint8))
    tifffile.imwrite(nan, np.full((40, 40), np.nan, np.float32))
    assert_bad_input(*train_prior("--reference", tiny), "smaller than the 6×6 patch")
    assert_bad_input(*train_prior("--reference", nan), "nan")
    assert_bad_input(
        *train_prior("--reference", ref, "--lambda", "1"), "--lambda is a setting of wppnet/wppflow"
    )
