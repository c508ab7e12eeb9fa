"""Specs and jobs of degrade, estimate-operator and reconstruct (one source of each default)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_wpp.cli import build_parser, main
from napari_wpp.cli._common import operator_spec_from_args
from napari_wpp.core.config import (
    DegradeSpec,
    EstimateSpec,
    OperatorSpec,
    ReconstructSpec,
    default_sigma,
    help_text,
)
from napari_wpp.core.errors import InputError
from napari_wpp.io import ImageData
from napari_wpp.jobs.degrade import DegradeResult, degrade_job
from napari_wpp.jobs.estimate import OperatorEstimated, estimate_job
from napari_wpp.jobs.notices import JobProgress
from napari_wpp.jobs.operator import build_operator, scaled_pixel_size
from napari_wpp.jobs.predict import OutputWritten
from napari_wpp.jobs.reconstruct import ReconstructResult, reconstruct_job
from tests.cli_helpers import run_cli


def _help(capsys: pytest.CaptureFixture, command: str) -> str:
    assert main([command, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())


def _set_default(monkeypatch: pytest.MonkeyPatch, spec: type, name: str, value: object) -> None:
    monkeypatch.setattr(spec.__dataclass_fields__[name], "default", value)


# --------------------------------------------------------------------------- specs
def test_specs_import_without_torch() -> None:
    code = "import sys, napari_wpp.core.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_variational_config_defaults_come_from_the_spec() -> None:
    from napari_wpp.core.reconstruct import DEFAULT_LAMBDA, VariationalConfig

    config = VariationalConfig()
    spec = ReconstructSpec()
    assert DEFAULT_LAMBDA == spec.lam == config.lam == 0.008
    for name in ("iterations", "minutes", "seed", "device"):
        assert getattr(config, name) == getattr(spec, name)
    assert VariationalConfig.from_spec(spec, levels=1).levels == 1


def test_sigma_follows_the_scale_by_one_rule() -> None:
    from napari_wpp.data import default_sigma as data_default_sigma

    assert [default_sigma(q) for q in (4, 6, 8)] == [2.0, 3.0, 4.0]
    assert OperatorSpec(scale=6).resolved_sigma == 3.0 == data_default_sigma(6)
    assert OperatorSpec(scale=6, sigma=1.5).resolved_sigma == 1.5


@pytest.mark.parametrize(
    ("command", "spec", "name", "value"),
    [
        ("degrade", OperatorSpec, "kernel_size", 12),
        ("reconstruct", OperatorSpec, "padding", "reflect"),
        ("reconstruct", ReconstructSpec, "lam", 0.02),
        ("degrade", DegradeSpec, "noise", 0.05),
        ("estimate-operator", EstimateSpec, "kernel_size", 9),
    ],
)
def test_a_spec_default_changes_help_and_parsed_options(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    command: str,
    spec: type,
    name: str,
    value: object,
) -> None:
    before = _help(capsys, command)
    assert help_text(spec, name) in before
    _set_default(monkeypatch, spec, name, value)
    after = _help(capsys, command)
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    assert help_text(spec, name) in after and f"(default {shown})" in after
    required = {
        "degrade": ["in.tif", "--out", "o.tif", "--scale", "4"],
        "reconstruct": ["--lr", "a", "--reference", "b", "--scale", "4", "--out", "o.tif"],
        "estimate-operator": ["--hr", "a", "--lr", "b", "--scale", "2", "--out", "o.json"],
    }
    args = build_parser().parse_args([command, *required[command]])
    assert getattr(args, name) == value


def test_a_changed_default_reaches_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """ReconstructSpec.lam and OperatorSpec.kernel_size changed: the job gets them."""
    import napari_wpp.jobs.reconstruct as job_module

    _set_default(monkeypatch, ReconstructSpec, "lam", 0.03)
    _set_default(monkeypatch, OperatorSpec, "kernel_size", 10)
    seen = {}

    def fake_job(spec, operator, lr, reference, out, stop=None, **kwargs):
        seen.update(spec=spec, operator=operator)
        yield ReconstructResult(np.zeros((8, 8), np.uint8), 4, 1, 0.0, False, spec.lam)

    monkeypatch.setattr(job_module, "reconstruct_job", fake_job)
    tifffile.imwrite(tmp_path / "lr.tif", np.zeros((8, 8), np.uint8))
    code, out, _err = run_cli(
        capsys,
        "reconstruct",
        "--lr",
        tmp_path / "lr.tif",
        "--reference",
        tmp_path / "lr.tif",
        "--scale",
        4,
        "--out",
        tmp_path / "sr.tif",
        "--json",
    )
    assert code == 0
    assert seen["spec"] == ReconstructSpec(lam=0.03)
    assert seen["operator"].kernel_size == 10
    assert json.loads(out)["lambda"] == 0.03


def test_operator_spec_from_args_refuses_both_and_neither() -> None:
    parser = build_parser()
    base = ["degrade", "in.tif", "--out", "o.tif"]
    with pytest.raises(InputError, match="not both"):
        operator_spec_from_args(parser.parse_args([*base, "--operator", "a.json", "--scale", "2"]))
    with pytest.raises(InputError, match="no forward operator"):
        operator_spec_from_args(parser.parse_args(base))
    spec = operator_spec_from_args(parser.parse_args([*base, "--scale", "6", "--anchor", "corner"]))
    assert spec == OperatorSpec(scale=6, anchor="corner")
    assert build_operator(spec).sigma[0] == 3.0


# --------------------------------------------------------------------------- jobs
def test_degrade_job_keeps_dtype_and_scales_the_pixel_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 255, (3, 32, 32), dtype=np.uint8)
    source = ImageData(stack, pixel_size=(1.5, 1.5), unit="µm")
    out = tmp_path / "lr.tif"
    operator = build_operator(OperatorSpec(scale=4))
    events = list(degrade_job(DegradeSpec(noise=0.01, seed=1), operator, source, out=out))
    assert [e.done for e in events if isinstance(e, JobProgress)] == [1, 2, 3]
    result = next(e for e in events if isinstance(e, DegradeResult))
    assert result.image.shape == (3, 8, 8) and result.image.dtype == np.uint8
    assert result.pixel_size == (6.0, 6.0) and result.unit == "µm"
    assert events[-1] == OutputWritten({"result": out})
    assert np.array_equal(tifffile.imread(out), result.image)


def test_degrade_job_refuses_an_image_smaller_than_the_scale() -> None:
    operator = build_operator(OperatorSpec(scale=8))
    with pytest.raises(InputError, match="smaller than the scale 8"):
        list(degrade_job(DegradeSpec(), operator, ImageData(np.zeros((4, 4), np.float32))))


def test_estimate_job_on_a_region_normalises_by_the_whole_plane(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    hr = rng.random((64, 64)).astype(np.float32) * 3
    operator = build_operator(OperatorSpec(scale=2, kernel_size=8))
    import torch

    lr = operator(torch.from_numpy(hr)).numpy()
    region = (slice(8, 56), slice(8, 56))
    lr_region = (slice(4, 28), slice(4, 28))
    out = tmp_path / "op.json"
    events = list(
        estimate_job(EstimateSpec(scale=2, kernel_size=7), hr, lr, region, lr_region, out, {"a": 1})
    )
    estimated = events[0]
    assert isinstance(estimated, OperatorEstimated)
    assert set(estimated.summary) == {
        "kernel_sum",
        "bias",
        "residual_rms",
        "kernel_peak",
        "kernel_peak_index",
        "lr_noise_model",
    }
    written = json.loads(out.read_text())
    assert written["fit"]["a"] == 1 and "bias" not in written["fit"]
    assert written["fit"]["residual_rms"] == estimated.summary["residual_rms"]
    # the 24² LR region holds the LR noise model (8×8 DCT variances of the residual)
    assert estimated.summary["lr_noise_model"] is True
    assert np.asarray(written["noise_variance"]).shape == (8, 8)


@pytest.mark.parametrize(
    ("hr_shape", "lr_shape", "kernel", "message"),
    [((32, 32), (10, 10), 5, "do not match scale 2"), ((32, 32), (16, 16), 40, "kernel size 40")],
)
def test_estimate_job_refuses_bad_pairs(hr_shape, lr_shape, kernel, message) -> None:
    spec = EstimateSpec(scale=2, kernel_size=kernel)
    with pytest.raises(InputError, match=message):
        list(estimate_job(spec, np.zeros(hr_shape), np.zeros(lr_shape)))


def test_reconstruct_job_returns_the_input_dtype_and_stops(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    reference = rng.integers(0, 255, (48, 48), dtype=np.uint8)
    lr = ImageData(rng.integers(0, 255, (12, 12), dtype=np.uint8), pixel_size=(4.0, 4.0))
    operator = build_operator(OperatorSpec(scale=2))
    spec = dataclasses.replace(ReconstructSpec(), iterations=2, device="cpu")
    small = {"n_reference_patches": 200, "patches_per_iteration": 200, "levels": 1}
    events = list(reconstruct_job(spec, operator, lr, reference, tmp_path / "sr.tif", **small))
    result = next(e for e in events if isinstance(e, ReconstructResult))
    assert result.image.dtype == np.uint8 and result.image.shape == (24, 24)
    assert result.pixel_size == (2.0, 2.0) and result.iterations == 2
    assert tifffile.imread(tmp_path / "sr.tif").shape == (24, 24)
    stop = threading.Event()
    stop.set()
    events = list(reconstruct_job(spec, operator, lr, reference, stop=stop, **small))
    assert events[-1].stopped_early and events[-1].iterations == 0


def test_scaled_pixel_size() -> None:
    assert scaled_pixel_size(None, 2) is None
    assert scaled_pixel_size(1.5, 2) == 3.0
    assert scaled_pixel_size((1.0, 2.0, 3.0), 0.5) == (1.0, 1.0, 1.5)


def test_spec_from_takes_the_fields_its_source_has() -> None:
    import argparse

    from napari_wpp.core.config import OperatorSpec, ReconstructSpec, default_of, spec_from

    args = argparse.Namespace(scale=3, sigma=1.5, kernel_size=9, anchor="corner", other=1)
    spec = spec_from(args, OperatorSpec, path=None)
    assert (spec.scale, spec.sigma, spec.kernel_size, spec.anchor) == (3, 1.5, 9, "corner")
    assert spec.padding == default_of(OperatorSpec, "padding") and spec.path is None
    reconstruct = spec_from(argparse.Namespace(lam=0.5, seed=4), ReconstructSpec, minutes=2.0)
    assert (reconstruct.lam, reconstruct.seed, reconstruct.minutes) == (0.5, 4, 2.0)
