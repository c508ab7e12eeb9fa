"""Nothing lost (issue 14 items 1 and 6): outputs never overwrite inputs, temporary files,
permissions, leftovers, locks, model replacement, the decoded-size guard and warnings."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from cli_helpers import assert_bad_input, run_cli
from PIL import Image

from napari_wpp import io
from napari_wpp.core.errors import InputError
from napari_wpp.core.intensity import Normalisation
from napari_wpp.io import files as io_files

FAST = ("--batch-size", "2", "--reference-patches", "200", "--psi-passes", "1", "--device", "cpu")


@pytest.fixture(scope="module")
def material():
    """A ×2 synthetic material: LR stack 6×24×24 uint8, reference 48×48 uint8."""
    from napari_wpp.data import synthetic_material

    return synthetic_material(shape=(6, 48, 48), scale=2, noise=0.01, seed=0)


@pytest.fixture
def files(tmp_path: Path, material) -> dict[str, Path]:
    paths = {"lr": tmp_path / "lr.tif", "lr2d": tmp_path / "lr2d.tif", "ref": tmp_path / "ref.tif"}
    tifffile.imwrite(paths["lr"], material.lr)
    tifffile.imwrite(paths["lr2d"], material.lr[1])
    tifffile.imwrite(paths["ref"], material.reference)
    return paths


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory, material) -> Path:
    """A small WPPNet ×2 trained for one step."""
    from napari_wpp.core.training import TrainingConfig, run_training

    norm = Normalisation.from_array(material.lr)
    config = TrainingConfig(
        steps=1,
        batch_size=2,
        n_reference_patches=200,
        psi_passes=1,
        device="cpu",
        model_options={"features": 8, "blocks": 2},
    )
    final = run_training(
        norm.apply(material.lr),
        Normalisation.from_array(material.reference).apply(material.reference),
        material.operator,
        config,
        normalisation=norm.to_dict(),
    )
    return io.save_model(tmp_path_factory.mktemp("model") / "model.safetensors", final.state)


def _unchanged(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- outputs vs inputs
@pytest.mark.parametrize("how", ["same", "dot", "hardlink", "symlink"])
def test_degrade_refuses_output_that_is_its_input(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], how: str
) -> None:
    image = files["lr2d"]
    before = image.read_bytes()
    out = {"same": image, "dot": Path(os.path.relpath(image))}.get(how)
    if out is None:
        out = tmp_path / "link.tif"
        (os.link if how == "hardlink" else os.symlink)(image, out)
    result = run_cli(capsys, "degrade", image, "--out", out, "--scale", 2)
    assert_bad_input(*result, "the input image", "choose another output path")
    _unchanged(image, before)


@pytest.mark.parametrize("which", ["lr", "reference"])
def test_reconstruct_refuses_output_that_is_an_input(
    capsys: pytest.CaptureFixture, files: dict[str, Path], which: str
) -> None:
    target = files["lr2d"] if which == "lr" else files["ref"]
    before = target.read_bytes()
    result = run_cli(
        capsys, "reconstruct", "--lr", files["lr2d"], "--reference", files["ref"],
        "--scale", 2, "--iterations", 1, "--device", "cpu", "--out", target,
    )  # fmt: skip
    assert_bad_input(*result, "choose another output path")
    _unchanged(target, before)


def test_estimate_refuses_output_linked_to_an_input(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], material
) -> None:
    hr = tmp_path / "hr.tif"
    tifffile.imwrite(hr, material.reference)
    before = hr.read_bytes()
    out = tmp_path / "op.json"
    os.symlink(hr, out)
    tifffile.imwrite(tmp_path / "lr_small.tif", material.reference[::2, ::2])
    result = run_cli(
        capsys, "estimate-operator", "--hr", hr, "--lr", tmp_path / "lr_small.tif",
        "--scale", 2, "--kernel-size", 5, "--out", out,
    )  # fmt: skip
    assert_bad_input(*result, "the HR image", "choose another output path")
    _unchanged(hr, before)


def test_train_refuses_model_file_linked_to_an_input(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path]
) -> None:
    before = files["ref"].read_bytes()
    out = tmp_path / "model.safetensors"
    os.link(files["ref"], out)
    result = run_cli(
        capsys, "train", "--lr-data", files["lr"], "--reference", files["ref"], "--out", out,
        "--scale", 2, "--steps", 1, "--overwrite", *FAST,
    )  # fmt: skip
    assert_bad_input(*result, "the reference", "choose another output path")
    _unchanged(files["ref"], before)


def test_predict_wppnet_refuses_tiff_output_that_is_its_input(
    capsys: pytest.CaptureFixture, files: dict[str, Path], model_file: Path
) -> None:
    image = files["lr2d"]
    before = image.read_bytes()
    result = run_cli(capsys, "predict", model_file, image, "--out", f"./{os.path.relpath(image)}")
    assert_bad_input(*result, "the input image", "choose another output path")
    _unchanged(image, before)


def test_check_not_an_input_accepts_distinct_files(tmp_path: Path) -> None:
    (tmp_path / "a.tif").write_bytes(b"a")
    io.check_not_an_input([tmp_path / "b.tif", None], [("input", tmp_path / "a.tif")])
    with pytest.raises(InputError, match="is the input"):
        io.check_not_an_input([tmp_path / "." / "a.tif"], [("input", tmp_path / "a.tif")])


# --------------------------------------------------------------------------- temporary files
def test_demo_figure_does_not_follow_planted_symlinks(tmp_path: Path) -> None:
    """Links planted at predictable temporary names next to the figure are never written."""
    from napari_wpp.cli.demo import _comparison_figure

    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    folder = tmp_path / "out"
    folder.mkdir()
    figure = folder / "comparison.png"
    for name in (
        f".comparison.{os.getpid()}.partial.png",
        ".comparison.png.part",
        f".comparison.png.{os.getpid()}.part",
    ):
        os.symlink(outside, folder / name)
    panels = [("a", np.zeros((8, 8), np.float32)), ("b", np.ones((8, 8), np.float32))]
    io.atomic_write(figure, lambda tmp: _comparison_figure(tmp, panels))
    assert outside.read_text() == "keep me"
    assert figure.read_bytes()[:4] == b"\x89PNG"


def test_outputs_respect_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        path = io.write_image(tmp_path / "x.tif", np.zeros((4, 4), np.uint8))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    previous = os.umask(0o022)
    try:
        path = io.write_image(tmp_path / "y.tif", np.zeros((4, 4), np.uint8))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_stale_leftovers_are_removed_on_the_next_write(tmp_path: Path) -> None:
    out = tmp_path / "x.tif"
    stale_part = tmp_path / ".x.tif.abc123.part"
    stale_zarr = tmp_path / ".x.tif.999.partial.zarr"
    fresh_part = tmp_path / ".x.tif.new.part"  # of a run started after this process
    other = tmp_path / ".y.tif.abc.part"  # of another output
    unrelated = tmp_path / "x.tif.part"  # not this tool's pattern
    for path in (stale_part, other, unrelated, fresh_part):
        path.write_bytes(b"junk")
    stale_zarr.mkdir()
    (stale_zarr / "0.0").write_bytes(b"junk")
    old = io_files.PROCESS_STARTED - 3600
    for path in (stale_part, stale_zarr, other, unrelated):
        os.utime(path, (old, old))
    later = time.time() + 5
    os.utime(fresh_part, (later, later))
    io.write_image(out, np.zeros((4, 4), np.uint8))
    assert not stale_part.exists() and not stale_zarr.exists()
    assert other.exists() and unrelated.exists() and fresh_part.exists()
    assert not io_files.lock_path(out).exists()


# --------------------------------------------------------------------------- locks
def test_a_live_lock_refuses_a_second_writer(tmp_path: Path) -> None:
    out = tmp_path / "m.tif"
    io_files.lock_path(out).write_text(f"{os.getppid()}\n")  # a live process other than this one
    with pytest.raises(InputError, match="being written by another napari-wpp run"):
        io.write_image(out, np.zeros((4, 4), np.uint8))
    assert not out.exists()


def test_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "m.tif"
    io_files.lock_path(out).write_text("999999999\n")  # no such process
    io.write_image(out, np.zeros((4, 4), np.uint8))
    assert out.exists() and not io_files.lock_path(out).exists()


def test_train_refuses_an_out_another_run_is_writing(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path]
) -> None:
    out = tmp_path / "m.safetensors"
    io_files.lock_path(out).write_text(f"{os.getppid()}\n")
    result = run_cli(
        capsys, "train", "--lr-data", files["lr"], "--reference", files["ref"], "--out", out,
        "--scale", 2, "--steps", 1, *FAST,
    )  # fmt: skip
    assert_bad_input(*result, "being written by another napari-wpp run", "another output path")
    assert not out.exists()


def test_the_lock_is_reentrant_and_released(tmp_path: Path) -> None:
    out = tmp_path / "a.tif"
    with io_files.output_lock(out):
        assert io_files.lock_path(out).read_text().strip() == str(os.getpid())
        io.write_image(out, np.zeros((4, 4), np.uint8))  # takes the same lock again
        assert io_files.lock_path(out).exists()
    assert not io_files.lock_path(out).exists()


# --------------------------------------------------------------------------- model replacement
def test_train_refuses_to_replace_a_model_without_overwrite(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], model_file: Path
) -> None:
    out = tmp_path / "m.safetensors"
    out.write_bytes(model_file.read_bytes())
    before = out.read_bytes()
    args = ("train", "--lr-data", files["lr"], "--reference", files["ref"], "--out", out)
    result = run_cli(capsys, *args, "--scale", 2, "--steps", 1, "--model", "wppflow", *FAST)
    assert_bad_input(*result, "exists", "--overwrite")
    _unchanged(out, before)
    flow = tmp_path / "flow.safetensors"
    flow_args = ("--model", "wppflow", "--scale", 2, "--steps", 1, "--json", *FAST)
    assert run_cli(capsys, *args[:-1], flow, *flow_args)[0] == 0
    result = run_cli(capsys, *args, "--resume", flow, "--steps", 2, *FAST)
    assert_bad_input(*result, "an existing wppnet, not a wppflow", "--overwrite")
    _unchanged(out, before)
    code, stdout, err = run_cli(
        capsys, *args, "--scale", 2, "--steps", 1, "--overwrite", "--json", *FAST
    )
    assert code == 0, err
    assert json.loads(stdout)["out"] == str(out)
    assert out.read_bytes() != before


# --------------------------------------------------------------------------- decoded size
def test_images_larger_than_the_pixel_limit_are_refused_before_decoding(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from napari_wpp.io import images

    image = tmp_path / "big.tif"
    tifffile.imwrite(image, np.zeros((64, 64), np.uint16), compression="zlib")
    png = tmp_path / "big.png"

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(png)
    decoded: list[Path] = []
    real = tifffile.TiffPageSeries.asarray

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        decoded.append(image)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", spy)
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "1000")
    for path in (image, png):
        result = run_cli(capsys, "degrade", path, "--out", tmp_path / "o.tif", "--scale", 2)
        assert_bad_input(*result, "more than the limit of 1000", "NAPARI_WPP_MAX_PIXELS")
    assert decoded == []
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "5000")
    assert io.read_image(image).array.shape == (64, 64)


# --------------------------------------------------------------------------- warnings
def _warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


@pytest.mark.parametrize(
    "kernel",
    [np.zeros((3, 3)), -np.ones((3, 3)), np.array([[1.0, -1.0], [0.5, -0.5]])],
    ids=["zero", "negative", "zero-sum"],
)
def test_questionable_kernels_warn(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path], kernel: np.ndarray
) -> None:
    operator = tmp_path / "op.json"
    operator.write_text(json.dumps({"kind": "fourier", "scale": 2, "kernel": kernel.tolist()}))
    out = tmp_path / "o.tif"
    code, _, err = run_cli(capsys, "degrade", files["lr2d"], "--operator", operator, "--out", out)
    assert code == 0, err
    lines = _warning_lines(err)
    assert len(lines) == 1 and "kernel" in lines[0] and "op.json" in lines[0], err


def test_a_normal_kernel_does_not_warn(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path]
) -> None:
    operator = tmp_path / "op.json"
    kernel = np.full((3, 3), 1 / 9)
    operator.write_text(json.dumps({"kind": "fourier", "scale": 2, "kernel": kernel.tolist()}))
    code, _, err = run_cli(
        capsys, "degrade", files["lr2d"], "--operator", operator, "--out", tmp_path / "o.tif"
    )
    assert code == 0, err
    assert _warning_lines(err) == []


def test_a_cpu_index_and_a_huge_seed_warn(
    capsys: pytest.CaptureFixture, tmp_path: Path, files: dict[str, Path]
) -> None:
    code, stdout, err = run_cli(
        capsys, "reconstruct", "--lr", files["lr2d"], "--reference", files["ref"],
        "--scale", 2, "--iterations", 1, "--device", "cpu:5", "--seed", 2**64 + 3,
        "--out", tmp_path / "o.tif", "--json",
    )  # fmt: skip
    assert code == 0, err
    lines = _warning_lines(err)
    assert len(lines) == 2, err
    assert any("cpu:5" in line and "--device cpu" in line for line in lines)
    assert any("2**64" in line and " 3 is used" in line for line in lines)
    assert json.loads(stdout)["device"] == "cpu"
