"""Tests of model files: one ``.safetensors`` file with JSON metadata, never pickled."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from safetensors.torch import save_file

import napari_wpp
from napari_wpp import io
from napari_wpp.core.errors import InputError
from napari_wpp.core.models.wppnet import WPPNet
from napari_wpp.core.operators import GaussianDownsampling
from napari_wpp.core.semidual import WassersteinPatchPrior
from napari_wpp.core.training import TrainingConfig, TrainingState

PATCH_DIM = 9  # 3×3 patches in the toy prior


def _loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) - 0.5).square().mean()


def _make_state(seed: int = 0) -> tuple[TrainingState, torch.optim.Adam, WassersteinPatchPrior]:
    """A tiny one-step-state state with a real Adam step and a ψ state."""
    torch.manual_seed(seed)
    model = WPPNet(scale=2, features=8, blocks=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 1, 8, 8, generator=g)
    optimizer.zero_grad()
    _loss(model, x).backward()
    optimizer.step()

    prior = WassersteinPatchPrior(torch.rand(40, PATCH_DIM, generator=g))
    prior.loss_and_ascend(torch.rand(30, PATCH_DIM, generator=g), 2)
    rng = torch.Generator().manual_seed(seed + 7)
    torch.rand(3, generator=rng)

    operator = GaussianDownsampling(scale=2, sigma=1.0, kernel_size=6)
    state = TrainingState(
        kind="wppnet",
        model=model,
        model_config=model.config(),
        operator=operator.to_dict(),
        lam=0.02,
        config=TrainingConfig(steps=1, model_options={"features": 8, "blocks": 2}).to_dict(),
        step=1,
        elapsed_s=0.25,
        normalisation={"low": 0.0, "high": 255.0, "dtype": "uint8"},
        priors=[prior.state_dict()],
        optimizer=copy.deepcopy(optimizer.state_dict()),
        rng=rng.get_state(),
        history=[{"step": 1, "elapsed_s": 0.25, "data_term": 0.1, "wpp_term": 0.2, "loss": 0.3}],
    )
    return state, optimizer, prior


@pytest.fixture(scope="module")
def base_state() -> TrainingState:
    return _make_state()[0]


@pytest.fixture
def state(base_state: TrainingState) -> TrainingState:
    """A private copy of the module's state (tests may change it)."""
    return copy.deepcopy(base_state)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory, base_state: TrainingState) -> Path:
    """A model file shared by the tests that only read it."""
    return io.save_model(tmp_path_factory.mktemp("model") / "model.safetensors", base_state)


def _one_line_error(func, *args, match: str | None = None, **kwargs) -> str:
    with pytest.raises(InputError, match=match) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def _read_raw(path: Path) -> tuple[dict, bytes]:
    """Header JSON and data bytes of a safetensors file, parsed by hand."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _rewrite(src: Path, dst: Path, edit_meta=None, edit_tensors=None) -> Path:
    """Copy a model file, editing its metadata and/or tensors."""
    with safetensors.safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["napari_wpp"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_meta is not None:
        edit_meta(meta)
    if edit_tensors is not None:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata={"napari_wpp": json.dumps(meta)})
    return dst


# ---------------------------------------------------------------- round trip
def test_round_trip_restores_model_and_training_state(tmp_path: Path, state) -> None:
    path = io.save_model(tmp_path / "model.safetensors", state)
    assert path == tmp_path / "model.safetensors" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp left

    loaded = io.load_model(path)
    assert isinstance(loaded.model, WPPNet) and not loaded.model.training
    original = state.model.state_dict()
    restored = loaded.model.state_dict()
    assert original.keys() == restored.keys()
    for name, value in original.items():
        assert restored[name].dtype == value.dtype
        assert torch.equal(restored[name], value), name
    x = torch.rand(1, 1, 11, 9, generator=torch.Generator().manual_seed(1))
    state.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(x), state.model(x))

    assert len(loaded.priors) == 1
    assert loaded.priors[0].keys() == state.priors[0].keys()
    for name, value in state.priors[0].items():
        got = loaded.priors[0][name]
        assert got.dtype == value.dtype and got.shape == value.shape
        assert torch.equal(got, value), name
    assert loaded.rng is not None and torch.equal(loaded.rng, state.rng)
    assert loaded.rng.dtype == torch.uint8

    saved_opt, got_opt = state.optimizer, loaded.optimizer
    assert got_opt is not None and got_opt["state"].keys() == saved_opt["state"].keys()
    for index, values in saved_opt["state"].items():
        assert got_opt["state"][index].keys() == values.keys()
        for name, value in values.items():
            assert torch.equal(got_opt["state"][index][name], value)
            assert got_opt["state"][index][name].shape == value.shape  # 0-dim step kept
    assert got_opt["param_groups"] == saved_opt["param_groups"]

    for name in ("kind", "model_config", "operator", "lam", "config", "step", "elapsed_s",
                 "normalisation", "history"):
        assert getattr(loaded, name) == getattr(state, name), name


def test_adam_and_prior_resume_like_the_original(tmp_path: Path) -> None:
    state, optimizer, prior = _make_state()
    loaded = io.load_model(io.save_model(tmp_path / "m.safetensors", state))

    resumed_opt = torch.optim.Adam(loaded.model.parameters())
    resumed_opt.load_state_dict(loaded.optimizer)
    assert resumed_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    for model, opt in ((state.model, optimizer), (loaded.model, resumed_opt)):
        model.train()
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()
    for (name, a), b in zip(state.model.named_parameters(), loaded.model.parameters(),
                            strict=True):
        assert torch.equal(a, b), name
    assert float(resumed_opt.state_dict()["state"][0]["step"]) == 2.0

    resumed_prior = WassersteinPatchPrior(prior.reference)
    resumed_prior.load_state_dict(loaded.priors[0])
    patches = torch.rand(30, PATCH_DIM, generator=torch.Generator().manual_seed(6))
    assert torch.equal(prior.loss_and_ascend(patches, 2), resumed_prior.loss_and_ascend(patches, 2))
    assert torch.equal(prior.psi, resumed_prior.psi)

    generator = torch.Generator()
    generator.set_state(loaded.rng)
    reference = torch.Generator()
    reference.set_state(state.rng)
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=reference))


def test_without_training_state_is_small_and_deployable(tmp_path: Path, state) -> None:
    full = io.save_model(tmp_path / "full.safetensors", state)
    small = io.save_model(tmp_path / "small.safetensors", state, include_training_state=False)
    assert small.stat().st_size < full.stat().st_size
    header, _ = _read_raw(small)
    assert all(k == "__metadata__" or k.startswith("model.") for k in header)

    loaded = io.load_model(small)
    assert loaded.priors == [] and loaded.optimizer is None and loaded.rng is None
    for name, value in state.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value)
    meta = io.read_model_metadata(small)
    assert meta["training_state"] is False and meta["n_priors"] == 0
    assert meta["optimizer"] is None
    assert io.read_model_metadata(full)["training_state"] is True


def test_tensor_names_and_pure_safetensors_layout(model_file: Path, state) -> None:
    header, data = _read_raw(model_file)
    names = set(header) - {"__metadata__"}
    assert {f"model.{k}" for k in state.model.state_dict()} <= names
    assert {f"prior.0.{k}" for k in state.priors[0]} <= names
    assert {f"optimizer.0.{k}" for k in state.optimizer["state"][0]} <= names
    assert "rng" in names
    assert header["optimizer.0.step"]["shape"] == []
    # the data section is exactly the tensors' bytes: nothing else hides in the file
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and spans[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert set(header["__metadata__"]) == {"napari_wpp"}
    json.loads(header["__metadata__"]["napari_wpp"], parse_constant=pytest.fail)


def test_load_never_unpickles(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("model files must never be unpickled")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = io.load_model(model_file)
    assert loaded.optimizer is not None and len(loaded.priors) == 1
    assert io.read_model_metadata(model_file)["kind"] == "wppnet"


def test_save_does_not_modify_the_state(tmp_path: Path, state) -> None:
    state.model.train()
    weights = {k: v.clone() for k, v in state.model.state_dict().items()}
    before = {
        name: copy.deepcopy(getattr(state, name))
        for name in ("model_config", "operator", "config", "normalisation", "priors",
                     "optimizer", "rng", "history", "lam", "step", "elapsed_s", "kind")
    }
    io.save_model(tmp_path / "m.safetensors", state)
    io.save_model(tmp_path / "s.safetensors", state, include_training_state=False)
    assert state.model.training
    for name, value in state.model.state_dict().items():
        assert torch.equal(value, weights[name])
    for name, value in before.items():
        now = getattr(state, name)
        if name == "priors":
            assert all(
                a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                for a, b in zip(now, value, strict=True)
            )
        elif name == "optimizer":
            assert now["param_groups"] == value["param_groups"]
            for i, entry in value["state"].items():
                assert all(torch.equal(now["state"][i][k], v) for k, v in entry.items())
        elif name == "rng":
            assert torch.equal(now, value)
        else:
            assert now == value, name


def test_loaded_model_shares_no_memory_with_the_state(tmp_path: Path, state) -> None:
    loaded = io.load_model(io.save_model(tmp_path / "m.safetensors", state))
    with torch.no_grad():
        next(loaded.model.parameters()).add_(1.0)
    assert not torch.equal(next(loaded.model.parameters()), next(state.model.parameters()))


def test_overwrite_is_atomic_and_replaces(tmp_path: Path, state) -> None:
    a, b = state, copy.deepcopy(state)
    with torch.no_grad():
        for param in b.model.parameters():
            param.mul_(-2.0)
    path = tmp_path / "m.safetensors"
    io.save_model(path, a)
    io.save_model(path, b)
    loaded = io.load_model(path)
    for name, value in b.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


# ---------------------------------------------------------------- metadata
def test_read_model_metadata_describes_the_model(
    model_file: Path, state, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = safetensors.safe_open

    class NoTensors:
        def __init__(self, *args, **kwargs):
            self._handle = real_open(*args, **kwargs)

        def __enter__(self):
            self._inner = self._handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self._handle.__exit__(*exc)

        def metadata(self):
            return self._inner.metadata()

        def keys(self):
            return self._inner.keys()

        def get_tensor(self, name):
            raise AssertionError("read_model_metadata must not read tensors")

    monkeypatch.setattr(safetensors, "safe_open", NoTensors)
    meta = io.read_model_metadata(model_file)
    assert meta["format"] == "napari-wpp-model" and meta["format_version"] == 1
    assert meta["napari_wpp_version"] == napari_wpp.__version__
    assert meta["kind"] == "wppnet" and meta["scale"] == 2
    assert meta["model_config"] == state.model_config
    assert meta["operator"] == state.operator
    assert meta["lam"] == state.lam and meta["step"] == state.step
    assert meta["normalisation"] == state.normalisation
    assert meta["config"] == state.config
    assert meta["n_priors"] == 1 and meta["training_state"] is True
    assert meta["optimizer"]["param_groups"][0]["params"] == list(
        range(len(list(state.model.parameters())))
    )
    assert meta["history"] == state.history and meta["history_length"] == 1
    assert isinstance(meta["created"], str) and meta["created"][:2] == "20"


def test_long_history_is_thinned_and_non_finite_values_stay_valid_json(
    tmp_path: Path, state
) -> None:
    n = 5 * io.MAX_HISTORY + 3
    state.history = [{"step": i + 1, "loss": 1.0 / (i + 1)} for i in range(n)]
    state.history[-1]["psnr"] = float("inf")
    state.history[0]["loss"] = float("nan")
    path = io.save_model(tmp_path / "m.safetensors", state)
    assert len(state.history) == n  # the state keeps its full history
    header, _ = _read_raw(path)
    json.loads(header["__metadata__"]["napari_wpp"], parse_constant=pytest.fail)
    meta = io.read_model_metadata(path)
    steps = [r["step"] for r in meta["history"]]
    assert len(steps) <= io.MAX_HISTORY and steps[0] == 1 and steps[-1] == n
    assert steps == sorted(set(steps))
    assert meta["history_length"] == n
    assert meta["history"][-1]["psnr"] is None and meta["history"][0]["loss"] is None
    assert io.load_model(path).history == meta["history"]


# ---------------------------------------------------------------- bad files
@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model", "model.safetensors.tmp"])
def test_wrong_suffix_is_refused(tmp_path: Path, state, name: str) -> None:
    message = _one_line_error(io.save_model, tmp_path / name, state)
    assert ".safetensors" in message
    assert list(tmp_path.iterdir()) == []


def test_save_into_missing_directory(tmp_path: Path, state) -> None:
    message = _one_line_error(io.save_model, tmp_path / "nope" / "m.safetensors", state)
    assert "does not exist" in message


@pytest.mark.parametrize("reader", [io.load_model, io.read_model_metadata])
def test_missing_file_and_directory(tmp_path: Path, reader) -> None:
    assert "does not exist" in _one_line_error(reader, tmp_path / "gone.safetensors")
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    assert "not a file" in _one_line_error(reader, folder)


def _random_bytes(path: Path, model_file: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())


def _tiff(path: Path, model_file: Path) -> None:
    path.write_bytes(b"")
    io.write_image(path.with_suffix(".tif"), np.zeros((8, 8), np.uint8))
    os.replace(path.with_suffix(".tif"), path)


def _empty(path: Path, model_file: Path) -> None:
    path.write_bytes(b"")


def _truncated_data(path: Path, model_file: Path) -> None:
    path.write_bytes(model_file.read_bytes()[:-17])


def _truncated_header(path: Path, model_file: Path) -> None:
    raw = model_file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(raw[: 8 + n // 2])


def _garbled_header(path: Path, model_file: Path) -> None:
    raw = bytearray(model_file.read_bytes())
    raw[9:20] = b"\xff" * 11
    path.write_bytes(bytes(raw))


def _json_text(path: Path, model_file: Path) -> None:
    path.write_text(json.dumps({"kind": "wppnet"}))


@pytest.mark.parametrize(
    "make",
    [_random_bytes, _tiff, _empty, _truncated_data, _truncated_header, _garbled_header,
     _json_text],
)
@pytest.mark.parametrize("reader", [io.load_model, io.read_model_metadata])
def test_corrupt_files_raise_one_line_input_errors(
    tmp_path: Path, model_file: Path, make, reader
) -> None:
    bad = tmp_path / "bad.safetensors"
    make(bad, model_file)
    message = _one_line_error(reader, bad)
    assert "bad.safetensors" in message
    assert "again" in message


@pytest.mark.parametrize("reader", [io.load_model, io.read_model_metadata])
def test_a_tiff_named_as_tiff_is_refused(tmp_path: Path, reader) -> None:
    path = io.write_image(tmp_path / "scan.tif", np.zeros((8, 8), np.uint8))
    assert "scan.tif" in _one_line_error(reader, path)


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"napari_wpp": '{"a": 1}'}])
@pytest.mark.parametrize("reader", [io.load_model, io.read_model_metadata])
def test_foreign_safetensors_file(tmp_path: Path, metadata, reader) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(path), metadata=metadata)
    message = _one_line_error(reader, path, match="not a napari-wpp model file")
    assert "foreign.safetensors" in message and "napari-wpp train" in message


def test_damaged_metadata_json(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"model.w": torch.zeros(2)}, str(path), metadata={"napari_wpp": "{not json"})
    message = _one_line_error(io.read_model_metadata, path, match="damaged")
    assert "m.safetensors" in message


def test_newer_format_version_asks_for_an_update(tmp_path: Path, model_file: Path) -> None:
    def bump(meta: dict) -> None:
        meta["format_version"] = io.MODEL_FORMAT_VERSION + 1

    path = _rewrite(model_file, tmp_path / "future.safetensors", edit_meta=bump)
    for reader in (io.load_model, io.read_model_metadata):
        message = _one_line_error(reader, path, match="update napari-wpp")
        assert "future.safetensors" in message and str(io.MODEL_FORMAT_VERSION + 1) in message


@pytest.mark.parametrize("version", [0, "1", None, 1.5])
def test_invalid_format_version(tmp_path: Path, model_file: Path, version) -> None:
    def edit(meta: dict) -> None:
        meta["format_version"] = version

    path = _rewrite(model_file, tmp_path / "v.safetensors", edit_meta=edit)
    _one_line_error(io.read_model_metadata, path, match="damaged")


def test_unknown_model_kind(tmp_path: Path, model_file: Path) -> None:
    def edit(meta: dict) -> None:
        meta["kind"] = "unet9000"

    path = _rewrite(model_file, tmp_path / "k.safetensors", edit_meta=edit)
    assert io.read_model_metadata(path)["kind"] == "unet9000"  # metadata is still readable
    message = _one_line_error(io.load_model, path, match="unknown kind")
    assert "k.safetensors" in message and "'unet9000'" in message


@pytest.mark.parametrize(
    "config",
    [{"scale": 2, "features": 16, "blocks": 2}, {"scale": 2, "features": 8, "blocks": 3},
     {"scale": 4, "features": 8, "blocks": 2}],
)
def test_weights_that_do_not_fit_the_config(tmp_path: Path, model_file: Path, config) -> None:
    def edit(meta: dict) -> None:
        meta["model_config"] = config

    path = _rewrite(model_file, tmp_path / "w.safetensors", edit_meta=edit)
    message = _one_line_error(io.load_model, path, match="do not fit")
    assert "w.safetensors" in message


@pytest.mark.parametrize("config", [{"scale": 5}, {"scale": 2, "colour": True}])
def test_invalid_model_config(tmp_path: Path, model_file: Path, config) -> None:
    def edit(meta: dict) -> None:
        meta["model_config"] = config

    path = _rewrite(model_file, tmp_path / "c.safetensors", edit_meta=edit)
    message = _one_line_error(io.load_model, path, match="invalid wppnet configuration")
    assert "c.safetensors" in message


def test_missing_and_unexpected_tensors(tmp_path: Path, model_file: Path) -> None:
    def drop(tensors: dict) -> None:
        del tensors[next(k for k in tensors if k.startswith("model."))]

    path = _rewrite(model_file, tmp_path / "d.safetensors", edit_tensors=drop)
    _one_line_error(io.load_model, path, match="missing")

    def extra(tensors: dict) -> None:
        tensors["surprise"] = torch.zeros(1)

    path = _rewrite(model_file, tmp_path / "e.safetensors", edit_tensors=extra)
    _one_line_error(io.load_model, path, match="unexpected tensor 'surprise'")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_model_saves_and_loads_onto_the_gpu(tmp_path: Path, state) -> None:
    cpu_model = copy.deepcopy(state.model).eval()
    state.model = state.model.to("cuda")
    loaded = io.load_model(io.save_model(tmp_path / "g.safetensors", state), device="cuda")
    assert next(state.model.parameters()).is_cuda  # the state's model stayed where it was
    assert next(loaded.model.parameters()).is_cuda
    x = torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x.cuda()).cpu(), cpu_model(x))


# ---------------------------------------------------------------- crafted files
@pytest.fixture(scope="module")
def flow_file(tmp_path_factory: pytest.TempPathFactory, base_state: TrainingState) -> Path:
    """A tiny WPPFlow model file (weights only)."""
    from napari_wpp.core.models import build_model

    config = {"scale": 2, "steps": 1, "hidden": 4, "cond_features": 4, "edge_shifts": 1,
              "mean_features": 4, "mean_blocks": 1}  # fmt: skip
    flow = build_model("wppflow", **config)
    state = dataclasses.replace(
        base_state, kind="wppflow", model=flow, model_config=flow.config(), priors=[],
        optimizer=None, rng=None,
    )  # fmt: skip
    return io.save_model(tmp_path_factory.mktemp("flow") / "flow.safetensors", state)


@pytest.mark.parametrize(
    ("which", "key", "value"),
    [
        ("wppnet", "features", 4000),
        ("wppnet", "blocks", 3_000_000),
        ("wppnet", "features", 1e300),
        ("wppnet", "offset", float("nan")),
        ("wppflow", "edge_shifts", 200_000),
        ("wppflow", "hidden", 1500),
    ],
)
def test_crafted_model_config_is_refused_before_building(
    tmp_path: Path, model_file: Path, flow_file: Path, which: str, key: str, value: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Values the stored weights cannot hold are refused without building the model."""
    from napari_wpp.core import models

    def edit(meta: dict) -> None:
        meta["model_config"][key] = value

    src = model_file if which == "wppnet" else flow_file
    path = _rewrite(src, tmp_path / "crafted.safetensors", edit_meta=edit)
    real_build = models.build_model
    built: list[str] = []

    def spy(kind: str, **config):
        built.append(str(torch.get_default_device()))
        return real_build(kind, **config)

    monkeypatch.setattr(models, "build_model", spy)
    message = _one_line_error(io.load_model, path)
    assert "crafted.safetensors" in message
    assert "damaged metadata" in message or "do not fit" in message
    assert all(device == "meta" for device in built), built  # never built for real


def test_crafted_prior_count_is_refused(tmp_path: Path, model_file: Path) -> None:
    def edit(meta: dict) -> None:
        meta["n_priors"] = 10**9

    path = _rewrite(model_file, tmp_path / "p.safetensors", edit_meta=edit)
    message = _one_line_error(io.load_model, path, match="damaged metadata")
    assert "p.safetensors" in message and "n_priors" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("elapsed_s", "abc"),
        ("lam", "0.1"),
        ("history", {"step": 1}),
        ("optimizer", {"param_groups": [], "extra_state": {"zero": {}}}),
        ("optimizer", {"param_groups": ["not a group"]}),
    ],
)
def test_damaged_metadata_values_name_the_file(
    tmp_path: Path, model_file: Path, key: str, value: object
) -> None:
    def edit(meta: dict) -> None:
        meta[key] = value

    path = _rewrite(model_file, tmp_path / "v.safetensors", edit_meta=edit)
    message = _one_line_error(io.load_model, path, match="has damaged metadata")
    assert "model file v.safetensors" in message
