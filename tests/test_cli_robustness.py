"""The command line against hostile but fair input (issue 14): one line, nothing lost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from cli_helpers import assert_bad_input, run_cli
from safetensors import safe_open
from safetensors.torch import save_file

from napari_wpp import io
from napari_wpp.core.models import build_model
from napari_wpp.core.training import TrainingState


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build_model("wppnet", scale=2, features=8, blocks=2)
    state = TrainingState(
        kind="wppnet", model=model, model_config=model.config(), operator={}, lam=0.02,
        config={}, step=1, elapsed_s=1.0, normalisation=None, priors=[], optimizer=None,
        rng=None, history=[],
    )  # fmt: skip
    return io.save_model(tmp_path_factory.mktemp("m") / "tiny.safetensors", state)


def _crafted(src: Path, dst: Path, **changes: object) -> Path:
    with safe_open(str(src), framework="pt") as handle:
        meta = json.loads(handle.metadata()["napari_wpp"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    for key, value in changes.items():
        if key in meta.get("model_config", {}) or key in ("features", "blocks"):
            meta["model_config"][key] = value
        else:
            meta[key] = value
    save_file(tensors, str(dst), metadata={"napari_wpp": json.dumps(meta)})
    return dst


@pytest.mark.parametrize(
    "changes",
    [{"features": 4000}, {"n_priors": 10**9}, {"blocks": 3_000_000}, {"elapsed_s": "abc"}],
    ids=["features", "n_priors", "blocks", "elapsed"],
)
def test_predict_refuses_a_crafted_model_file(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_model: Path, changes: dict
) -> None:
    crafted = _crafted(tiny_model, tmp_path / "sent.safetensors", **changes)
    image = tmp_path / "lr.tif"
    tifffile.imwrite(image, np.zeros((16, 16), np.uint8))
    out = tmp_path / "sr.tif"
    code, stdout, err = run_cli(capsys, "predict", crafted, image, "--out", out)
    assert_bad_input(code, stdout, err, "sent.safetensors")
    assert "damaged metadata" in err or "do not fit" in err
    assert not out.exists()


def test_train_resume_refuses_a_crafted_model_file(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_model: Path
) -> None:
    crafted = _crafted(tiny_model, tmp_path / "sent.safetensors", n_priors=10**9)
    lr = tmp_path / "lr.tif"
    tifffile.imwrite(lr, (np.random.default_rng(0).random((2, 16, 16)) * 255).astype(np.uint8))
    ref = tmp_path / "ref.tif"
    tifffile.imwrite(ref, (np.random.default_rng(1).random((48, 48)) * 255).astype(np.uint8))
    code, stdout, err = run_cli(
        capsys, "train", "--lr-data", lr, "--reference", ref, "--scale", 2,
        "--resume", crafted, "--out", tmp_path / "new.safetensors", "--steps", 1,
    )  # fmt: skip
    assert_bad_input(code, stdout, err, "sent.safetensors", "n_priors")
