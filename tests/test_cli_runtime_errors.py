"""Issue 14, items 2 and 5: warnings for featureless references, no "unexpected … report it"
for bad input (allocation failures, over-long names, a full disk while saving)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from cli_helpers import run_cli as _run

from napari_wpp.core.config import OperatorSpec, ReconstructSpec
from napari_wpp.io import ImageData
from napari_wpp.jobs.notices import JobWarning
from napari_wpp.jobs.operator import build_operator
from napari_wpp.jobs.reconstruct import reconstruct_job


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    paths = {
        "lr": tmp_path / "lr.tif",
        "ref": tmp_path / "ref.tif",
        "flat": tmp_path / "flat.tif",
    }
    tifffile.imwrite(paths["lr"], rng.integers(0, 255, (16, 16), dtype=np.uint8))
    tifffile.imwrite(paths["ref"], rng.integers(0, 255, (48, 48), dtype=np.uint8))
    tifffile.imwrite(paths["flat"], np.full((48, 48), 128, np.uint8))
    return paths


def _reconstruct(capsys, images, reference: str, *extra: object) -> tuple[int, str, str]:
    out = images["lr"].parent / "sr.tif"
    return _run(
        capsys, "reconstruct", "--lr", images["lr"], "--reference", images[reference],
        "--scale", 2, "--iterations", 1, "--device", "cpu", "--out", out, "--json", *extra,
    )  # fmt: skip


def test_a_featureless_reference_is_a_warning_not_an_error(capsys, images) -> None:
    code, out, err = _reconstruct(capsys, images, "flat")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "featureless" in warnings[0], err
    assert json.loads(out)["iterations"] == 1
    code, out, err = _reconstruct(capsys, images, "ref")
    assert code == 0 and "warning:" not in err, err


def test_reconstruct_job_yields_the_featureless_warning() -> None:
    lr = ImageData(np.random.default_rng(1).random((12, 12)).astype(np.float32))
    spec = dataclasses.replace(ReconstructSpec(), iterations=1, device="cpu")
    small = {"n_reference_patches": 100, "patches_per_iteration": 100, "levels": 1}
    operator = build_operator(OperatorSpec(scale=2))
    flat = list(reconstruct_job(spec, operator, lr, np.zeros((32, 32)), **small))
    assert sum(isinstance(e, JobWarning) for e in flat) == 1
    textured = np.random.default_rng(2).random((32, 32))
    assert not any(isinstance(e, JobWarning) for e in reconstruct_job(
        spec, operator, lr, textured, **small
    ))  # fmt: skip
