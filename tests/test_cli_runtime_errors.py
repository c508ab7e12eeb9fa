"""Issue 14, items 2 and 5: warnings for featureless references, no "unexpected … report it"
for bad input (allocation failures, over-long names, a full disk while saving)."""

from __future__ import annotations

import dataclasses
import errno
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from cli_helpers import assert_bad_input
from cli_helpers import run_cli as _run

from napari_wpp import io
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


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "unexpected" not in lines[0] and "report it" not in lines[0], lines[0]
    return lines[0]


def test_an_allocation_failure_is_out_of_memory_with_the_size(capsys, images) -> None:
    """torch's CPU allocator refuses ~80 TB: the out-of-memory line, not "report it"."""
    code, out, err = _reconstruct(capsys, images, "ref", "--scale", 100000)
    line = _one_error_line(err)
    assert code == 1 and out == ""
    assert line.startswith("error: out of memory (asked for ") and "TiB" in line, line
    assert "--scale" in line


def test_allocation_failures_are_recognised() -> None:
    from napari_wpp.core.allocation import allocation_size, is_allocation_failure

    cpu = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 80000000000 bytes. Error code 12"
    )
    cuda = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 8 GiB total)")
    assert is_allocation_failure(cpu) and allocation_size(cpu) == 80_000_000_000
    assert is_allocation_failure(cuda) and allocation_size(cuda) == 2 * 2**30
    assert is_allocation_failure(MemoryError()) and allocation_size(MemoryError()) is None
    assert not is_allocation_failure(RuntimeError("shapes do not match"))


def test_a_file_name_over_255_bytes_is_one_line(capsys, images, tmp_path) -> None:
    out = tmp_path / ("a" * 300 + ".tif")
    code, stdout, err = _run(capsys, "degrade", images["ref"], "--scale", 2, "--out", out)
    assert_bad_input(code, stdout, err, "too long", "255")


def test_a_full_disk_at_the_final_save_says_what_was_kept(
    capsys, images, tmp_path, monkeypatch
) -> None:
    """The checkpoints fit, the final state does not: the line says the file keeps step 2."""
    real = io.save_model
    calls = []

    def disk_fills_up(path, state, include_training_state=True):
        calls.append(state.step)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, state, include_training_state)

    monkeypatch.setattr(io, "save_model", disk_fills_up)
    out = tmp_path / "m.safetensors"
    code, stdout, err = _run(
        capsys, "train", "--lr-data", images["lr"], "--reference", images["ref"], "--scale", 2,
        "--out", out, "--steps", 2, "--checkpoint-minutes", 1e-6, "--batch-size", 2,
        "--reference-patches", 200, "--psi-passes", 1, "--device", "cpu",
    )  # fmt: skip
    assert calls == [1, 2, 2]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and stdout == "" and len(errors) == 1, err
    for fragment in ("no space left", "free disk space", "keeps the last checkpoint (step 2)"):
        assert fragment in errors[0].lower(), errors[0]
    assert io.read_model_metadata(out)["step"] == 2


def test_the_widgets_show_an_allocation_failure_as_out_of_memory_with_the_size() -> None:
    from napari_wpp.widgets._notify import error_message

    cpu = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 81920000000000 bytes. Error code 12"
    )
    assert error_message(cpu).startswith("out of memory (asked for 74.5 TiB): use a smaller")


@pytest.fixture
def overflowing_operator(tmp_path: Path) -> Path:
    """An operator file whose kernel overflows float32 on any image."""
    import torch

    from napari_wpp.core.operators import FourierDownsampling

    path = tmp_path / "overflow.json"
    io.write_operator(path, FourierDownsampling(2, torch.full((5, 5), 3e38)))
    return path


def test_nan_made_by_an_operator_blames_the_operator_not_the_image(
    capsys, images, overflowing_operator, tmp_path
) -> None:
    floats = tmp_path / "floats.tif"
    tifffile.imwrite(floats, np.random.default_rng(3).random((32, 32)).astype(np.float32))
    out = tmp_path / "low.tif"
    code, stdout, err = _run(
        capsys, "degrade", floats, "--operator", overflowing_operator, "--out", out
    )
    assert_bad_input(code, stdout, err, "operator file overflow.json", "NaN/Inf")
    assert "nan_to_num" not in err and not out.exists()
    code, stdout, err = _run(
        capsys, "reconstruct", "--lr", images["lr"], "--reference", images["ref"],
        "--operator", overflowing_operator, "--iterations", 1, "--device", "cpu", "--out", out,
    )  # fmt: skip
    assert_bad_input(code, stdout, err, "operator file overflow.json", "NaN/Inf")


def test_a_kernel_far_larger_than_the_image_is_refused_before_padding(
    capsys, images, tmp_path
) -> None:
    """``--kernel-size 100000000`` padded 12 GB before the allocator refused the next step.

    The operator now refuses it before sampling its taps (that alone took 10 s and 1.6 GB).
    """
    out = tmp_path / "low.tif"
    code, stdout, err = _run(
        capsys, "degrade", images["ref"], "--scale", 2, "--kernel-size", 100000000, "--out", out
    )
    assert_bad_input(code, stdout, err, "kernel size 100000000", "at most 4096")


def test_decoder_log_lines_are_dropped_or_folded_into_the_one_line(
    capsys, images, tmp_path, monkeypatch
) -> None:
    """tifffile logs a warning while reading: no stray stderr line; on failure it is folded."""
    import logging

    from napari_wpp.io import images as image_io

    real_reader = image_io._read_tiff

    def noisy_reader(path):
        logging.getLogger("tifffile").warning("TiffPage 0: <tifffile.TiffTag 270> invalid value")
        return real_reader(path)

    monkeypatch.setattr(image_io, "_read_tiff", noisy_reader)
    out = tmp_path / "low.tif"
    code, stdout, err = _run(capsys, "degrade", images["ref"], "--scale", 2, "--out", out)
    assert code == 0 and "TiffPage" not in err and "TiffPage" not in stdout, err

    def failing_reader(path):
        logging.getLogger("tifffile").warning("TiffPage 0: data is truncated")
        raise ValueError("failed to read 100 bytes")

    monkeypatch.setattr(image_io, "_read_tiff", failing_reader)
    code, stdout, err = _run(capsys, "degrade", images["ref"], "--scale", 2, "--out", out)
    assert_bad_input(code, stdout, err, "failed to read 100 bytes", "data is truncated")
