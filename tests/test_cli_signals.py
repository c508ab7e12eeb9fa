"""Nothing hung (issue 14): budgets and Ctrl-C inside long ψ ascents, a second Ctrl-C, SIGTERM.

Each test runs ``napari-wpp train`` in a subprocess; a hang shows as the ``communicate``
timeout (far above what the run needs), never as a timing assertion.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tifffile

from napari_wpp import io

pytestmark = pytest.mark.slow

SMALL = ("--batch-size", "2", "--reference-patches", "200", "--device", "cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LR stack 6×48×48 and reference 96×96 of a ×2 synthetic material."""
    from napari_wpp.data import synthetic_material

    folder = tmp_path_factory.mktemp("signals")
    material = synthetic_material(shape=(6, 96, 96), scale=2, noise=0.01, seed=0)
    tifffile.imwrite(folder / "lr.tif", material.lr)
    tifffile.imwrite(folder / "ref.tif", material.reference)
    return {"lr": folder / "lr.tif", "ref": folder / "ref.tif"}


def _start_training(files: dict[str, Path], out: Path, *extra: object) -> subprocess.Popen:
    argv = [
        sys.executable, "-m", "napari_wpp.cli", "train", "--lr-data", files["lr"],
        "--reference", files["ref"], "--scale", 2, "--out", out, "--checkpoint-minutes", 0,
        "--json", *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        [str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen, timeout_s: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _wait_for_line(proc: subprocess.Popen, fragment: str) -> str:
    """Read stderr lines until one contains ``fragment`` (the run has got that far)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if fragment in line:
            return line
    raise AssertionError(f"{fragment!r} never came on stderr: {''.join(seen)}")


def test_a_time_budget_ends_a_step_with_absurd_psi_passes(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    """``--psi-passes 100000 --minutes 0.05``: the ascent stops at the deadline (was hours)."""
    out = tmp_path / "m.safetensors"
    proc = _start_training(files, out, *SMALL, "--psi-passes", 100000, "--minutes", 0.05)
    stdout, stderr = _finish(proc, timeout_s=120)
    assert proc.returncode == 0, stderr
    payload = json.loads(stdout)
    assert payload["steps"] >= 1
    assert io.read_model_metadata(out)["step"] == payload["steps"]


def test_ctrl_c_ends_a_step_with_absurd_psi_passes(tmp_path: Path, files: dict[str, Path]) -> None:
    """The first Ctrl-C is honoured inside the ψ ascent; the model is still written."""
    out = tmp_path / "m.safetensors"
    proc = _start_training(files, out, *SMALL, "--psi-passes", 100000, "--minutes", 30)
    time.sleep(12)  # well into the first step (no progress line comes before it ends)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    stdout, stderr = _finish(proc, timeout_s=60)
    assert proc.returncode == 0, stderr
    assert "stopping after this step" in stderr
    payload = json.loads(stdout)
    assert payload["stopped_early"] is True
    assert io.read_model_metadata(out)["step"] == payload["steps"]


def test_sigterm_stops_like_ctrl_c_and_writes_a_valid_model(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    """SIGTERM (batch schedulers) keeps the training done: the model file is written."""
    out = tmp_path / "m.safetensors"
    proc = _start_training(files, out, *SMALL, "--psi-passes", 1, "--steps", 100000)
    _wait_for_line(proc, "step 1")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = _finish(proc, timeout_s=120)
    assert proc.returncode == 0, stderr
    payload = json.loads(stdout)
    assert payload["stopped_early"] is True and 1 <= payload["steps"] < 100000
    state = io.load_model(out)
    assert state.step == payload["steps"]


def test_a_second_ctrl_c_exits_130_at_once_without_an_abort(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    """Two Ctrl-C inside a long step: exit 130, no ``terminate called`` (SIGABRT, 134)."""
    out = tmp_path / "m.safetensors"
    heavy = ("--batch-size", 32, "--crop-size", 48, "--psi-passes", 1, "--device", "cpu")
    proc = _start_training(files, out, *heavy, "--steps", 100000)
    _wait_for_line(proc, "step 1")  # steps take seconds: both signals land in step 2
    proc.send_signal(signal.SIGINT)
    _wait_for_line(proc, "stopping after this step")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = _finish(proc, timeout_s=30)
    assert proc.returncode == 130, stderr
    assert "terminate called" not in stderr and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted")
    assert stdout == ""
    assert not out.exists()
