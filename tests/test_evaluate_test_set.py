"""``napari-wpp evaluate PRED_STACK GT_STACK``: a test set, mean ± std over slices."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from cli_helpers import run_cli

from napari_wpp.core.metrics import evaluate_slices, psnr


@pytest.fixture
def stacks(tmp_path):
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.2, 0.8, size=(4, 64, 64)).astype(np.float32)
    noise = np.array([0.01, 0.02, 0.05, 0.1], dtype=np.float32)[:, None, None]
    pred = np.clip(gt + noise * rng.standard_normal(gt.shape), 0, 1).astype(np.float32)
    std = np.broadcast_to(noise, gt.shape).astype(np.float32)
    paths = {name: tmp_path / f"{name}.tif" for name in ("gt", "pred", "std")}
    for name, array in (("gt", gt), ("pred", pred), ("std", std)):
        tifffile.imwrite(paths[name], array)
    return paths, gt, pred


def test_per_slice_figures_match_the_2d_metric(stacks) -> None:
    _, gt, pred = stacks
    figures = evaluate_slices(pred, gt, crop=4)
    assert len(figures["psnr"]) == 4
    for i in range(4):
        assert figures["psnr"][i] == pytest.approx(psnr(pred[i], gt[i], crop=4))
    assert figures["psnr"] == sorted(figures["psnr"], reverse=True)  # more noise, lower PSNR


def test_cli_reports_mean_std_and_slices(capsys, stacks) -> None:
    paths, gt, pred = stacks
    code, out, _ = run_cli(
        capsys, "evaluate", paths["pred"], paths["gt"], "--crop", 4, "--std", paths["std"],
        "--json",
    )  # fmt: skip
    assert code == 0
    payload = json.loads(out)
    test_set = payload["test_set"]
    per_slice = [psnr(pred[i], gt[i], crop=4) for i in range(4)]
    assert test_set["slices"] == 4
    assert test_set["per_slice"]["psnr"] == pytest.approx(per_slice)
    assert test_set["psnr_mean"] == pytest.approx(payload["psnr"])
    assert test_set["psnr_std"] == pytest.approx(np.std(per_slice))
    assert test_set["psnr_std"] > 1.0  # the slices differ
    coverage = test_set["per_slice"]["coverage_1sd"]
    assert len(coverage) == 4 and all(0.55 < c < 0.8 for c in coverage)  # calibrated std


def test_cli_text_of_a_test_set(capsys, stacks) -> None:
    paths, _, _ = stacks
    code, out, _ = run_cli(capsys, "evaluate", paths["pred"], paths["gt"], "--crop", 4)
    assert code == 0
    assert "4 slices" in out and "±" in out


def test_a_2d_image_has_no_test_set(capsys, tmp_path, stacks) -> None:
    _, gt, pred = stacks
    tifffile.imwrite(tmp_path / "g.tif", gt[0])
    tifffile.imwrite(tmp_path / "p.tif", pred[0])
    code, out, _ = run_cli(
        capsys, "evaluate", tmp_path / "p.tif", tmp_path / "g.tif", "--crop", 4, "--json"
    )
    assert code == 0 and "test_set" not in json.loads(out)
