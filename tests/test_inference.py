"""Tiled, batched and out-of-core superresolution (core.inference, io zarr helpers)."""

from __future__ import annotations

import json
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from napari_wpp.core.errors import InputError
from napari_wpp.core.inference import (
    InferenceFinished,
    InferenceProgress,
    ModelSpec,
    model_halo,
    output_shape,
    run_superresolve,
    superresolution,
    superresolve,
    superresolve_dask,
    superresolve_slice,
)
from napari_wpp.core.inference import common as inference_common
from napari_wpp.core.intensity import Normalisation
from napari_wpp.core.models.wppnet import WPPNet, receptive_radius


def tiny_model(scale: int = 2, seed: int = 0) -> WPPNet:
    """A random WPPNet whose outputs are of order 1 (so a 1e-5 tolerance means something)."""
    torch.manual_seed(seed)
    model = WPPNet(scale=scale, features=8, blocks=2)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    probe = torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        peak = model(probe).abs().max()
        model.reconstruction[-1].weight /= peak
    return model


class NearestUpsampler(nn.Module):
    """Pixel replication by ``scale``: exact inverse of subsampling, for round-trip tests."""

    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.scale, 2).repeat_interleave(self.scale, 3)


@pytest.fixture(scope="module")
def model2() -> WPPNet:
    return tiny_model(2)


def rand(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def finish(events: list) -> InferenceFinished:
    assert isinstance(events[-1], InferenceFinished)
    assert all(isinstance(e, InferenceProgress) for e in events[:-1])
    return events[-1]


# ----------------------------------------------------------------------------- tiles


@pytest.mark.parametrize("scale", [2, 3])
def test_receptive_radius_bounds_the_influence_of_a_pixel(scale: int) -> None:
    model = tiny_model(scale)
    c = 30
    base = np.zeros((61, 61), np.float32)
    poked = base.copy()
    poked[c, c] = 1.0
    diff = superresolve_slice(model, poked, device="cpu") - superresolve_slice(
        model, base, device="cpu"
    )
    ys, xs = np.nonzero(np.abs(diff) > 0)
    reach = max(np.abs(ys // scale - c).max(), np.abs(xs // scale - c).max())
    assert 0 < reach <= receptive_radius(model)


@pytest.mark.parametrize(("scale", "shape", "tile"), [(2, (37, 29), 8), (3, (23, 31), 7)])
def test_tiled_equals_whole_slice(scale: int, shape: tuple[int, int], tile: int) -> None:
    model = tiny_model(scale)
    image = rand(shape, seed=scale)
    whole = superresolve_slice(model, image, device="cpu")
    tiled = superresolve_slice(model, image, tile=tile, device="cpu")
    assert whole.shape == tiled.shape == (scale * shape[0], scale * shape[1])
    assert whole.dtype == tiled.dtype == np.float32
    assert np.abs(whole).max() > 0.1  # outputs of order 1
    assert np.abs(tiled - whole).max() <= 1e-5
    wider = superresolve_slice(model, image, tile=tile, halo=receptive_radius(model) + 3)
    assert np.abs(wider - whole).max() <= 1e-5


def test_too_small_halo_is_refused_and_would_be_wrong(model2: WPPNet) -> None:
    radius = receptive_radius(model2)
    with pytest.raises(InputError, match="receptive radius"):
        superresolve_slice(model2, rand((20, 20)), tile=8, halo=radius - 1)
    assert model_halo(model2) == radius
    image = rand((37, 29), seed=3)
    whole = superresolve_slice(model2, image, device="cpu")
    net = inference_common._inference_copy(model2, torch.device("cpu"))
    with torch.no_grad():
        lr_t = torch.from_numpy(image)[None, None]
        short = superresolution._tiled_forward(net, lr_t, 2, 8, radius - 2)
    assert np.abs(short[0, 0].numpy() - whole).max() > 1e-4  # the equality test can fail


def test_bad_slice_inputs(model2: WPPNet) -> None:
    with pytest.raises(InputError, match="2D"):
        superresolve_slice(model2, rand((2, 8, 8)))
    with pytest.raises(InputError, match="float"):
        superresolve_slice(model2, np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match="tile"):
        superresolve_slice(model2, rand((8, 8)), tile=0)
    with pytest.raises(InputError, match="halo"):
        superresolve_slice(NearestUpsampler(), rand((8, 8)), tile=4)
    with pytest.raises(InputError, match="NaN"):
        superresolve_slice(model2, np.full((8, 8), np.nan, np.float32))


def test_callers_model_is_not_modified(model2: WPPNet) -> None:
    model2.train()
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    superresolve_slice(model2, rand((12, 12)), tile=5, device="cpu")
    run_superresolve(model2, rand((3, 12, 12)), device="cpu")
    assert model2.training
    assert all(p.requires_grad for p in model2.parameters())
    assert all(torch.equal(before[k], v) for k, v in model2.state_dict().items())
    model2.eval()


# ----------------------------------------------------------------------------- volumes


def test_2d_image_gives_the_slice_result(model2: WPPNet) -> None:
    image = rand((19, 22), seed=5)
    events = list(superresolve(model2, image, device="cpu"))
    result = finish(events).result
    assert result is not None and result.shape == (38, 44)
    assert np.abs(result - superresolve_slice(model2, image, device="cpu")).max() <= 1e-5


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_volume_along_each_axis_equals_per_slice(model2: WPPNet, axis: int) -> None:
    volume = rand((5, 9, 11), seed=7)
    original = volume.copy()
    events = list(superresolve(model2, volume, axis=axis, batch_size=2, device="cpu"))
    result = finish(events).result
    ax = axis % 3
    expected_shape = tuple(n if i == ax else 2 * n for i, n in enumerate(volume.shape))
    assert result is not None and result.shape == expected_shape
    assert result.shape == output_shape(volume.shape, 2, axis)
    n = volume.shape[ax]
    assert [e.done for e in events[:-1]] == list(range(2, n, 2)) + [n]
    assert all(e.total == n for e in events[:-1])
    for k in range(n):
        lr = np.take(volume, k, axis=ax)
        sr = np.take(result, k, axis=ax)
        assert np.abs(sr - superresolve_slice(model2, lr, device="cpu")).max() <= 1e-5
    np.testing.assert_array_equal(volume, original)


def test_tiled_volume_equals_untiled(model2: WPPNet) -> None:
    volume = rand((3, 21, 17), seed=8)
    whole = run_superresolve(model2, volume, axis=1, device="cpu")
    tiled = run_superresolve(model2, volume, axis=1, tile=6, batch_size=3, device="cpu")
    assert np.abs(tiled - whole).max() <= 1e-5


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_normalisation_round_trip_restores_dtype_and_range(dtype: type) -> None:
    info = np.iinfo(dtype)
    rng = np.random.default_rng(2)
    volume = rng.integers(info.min, info.max, size=(4, 6, 7), endpoint=True).astype(dtype)
    volume[0, 0, 0], volume[0, 0, 1] = info.min, info.max
    norm = Normalisation.from_array(volume)
    result = run_superresolve(NearestUpsampler(2), volume, normalisation=norm, device="cpu")
    assert result.dtype == volume.dtype and result.shape == (4, 12, 14)
    np.testing.assert_array_equal(result[:, ::2, ::2], volume)  # exact inverse: same values
    assert result.min() == info.min and result.max() == info.max


def test_normalisation_with_a_network_saturates_and_rounds(model2: WPPNet) -> None:
    volume = np.random.default_rng(3).integers(0, 256, (3, 10, 10)).astype(np.uint8)
    norm = Normalisation.from_array(volume)
    result = run_superresolve(model2, volume, normalisation=norm, device="cpu")
    floats = run_superresolve(model2, norm.apply(volume), device="cpu")
    expected = np.clip(np.rint(floats.astype(np.float64) * 255), 0, 255)
    assert result.dtype == np.uint8
    assert np.abs(result.astype(float) - expected).max() <= 1  # float32 rounding at .5
    assert (floats < 0).any() or (floats > 1).any()  # clipping was exercised


def test_float_volume_with_normalisation_returns_to_its_range() -> None:
    volume = (1000 + 500 * rand((2, 8, 8))).astype(np.float64)
    norm = Normalisation.from_array(volume, value_range=(1000.0, 1500.0))
    result = run_superresolve(NearestUpsampler(2), volume, normalisation=norm, device="cpu")
    assert result.dtype == np.float64
    np.testing.assert_allclose(result[:, ::2, ::2], volume, rtol=1e-6)


def test_bad_volume_inputs(model2: WPPNet) -> None:
    ints = np.zeros((2, 8, 8), np.uint16)
    with pytest.raises(InputError, match="normalisation"):
        run_superresolve(model2, ints)
    with pytest.raises(InputError, match="differs"):
        run_superresolve(model2, ints, normalisation=Normalisation(0, 255, "uint8"))
    with pytest.raises(InputError, match="axis"):
        run_superresolve(model2, rand((2, 8, 8)), axis=3)
    with pytest.raises(InputError, match="shape"):
        run_superresolve(model2, rand((2, 2, 8, 8)))
    with pytest.raises(InputError, match="batch_size"):
        run_superresolve(model2, rand((2, 8, 8)), batch_size=0)


def test_stop_event_stops_between_batches(model2: WPPNet) -> None:
    volume = rand((8, 10, 10), seed=4)
    stop = threading.Event()
    events = []
    for event in superresolve(model2, volume, batch_size=2, device="cpu", stop=stop):
        events.append(event)
        if isinstance(event, InferenceProgress) and event.done == 4:
            stop.set()
    last = finish(events)
    assert last.stopped_early and last.result is None
    assert [e.done for e in events[:-1]] == [2, 4]
    events = list(superresolve(model2, volume, device="cpu", stop=stop))  # already set
    assert len(events) == 1 and events[0].stopped_early


# ----------------------------------------------------------------------------- dask and zarr


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_dask_equals_in_memory(model2: WPPNet, axis: int) -> None:
    da = pytest.importorskip("dask.array")
    volume = rand((4, 10, 9), seed=9)
    lazy = superresolve_dask(model2, da.from_array(volume, chunks=(3, 5, 5)), axis=axis)
    assert lazy.dtype == np.float32
    assert lazy.shape == output_shape(volume.shape, 2, axis)
    assert lazy.numblocks[axis] == volume.shape[axis]  # one slice per chunk
    assert all(len(c) == 1 for i, c in enumerate(lazy.chunks) if i != axis)
    result = lazy.compute(scheduler="threads")
    expected = run_superresolve(model2, volume, axis=axis, device="cpu")
    assert np.abs(result - expected).max() <= 1e-5


def test_dask_tiled_with_normalisation(model2: WPPNet) -> None:
    da = pytest.importorskip("dask.array")
    volume = np.random.default_rng(1).integers(0, 256, (3, 13, 11)).astype(np.uint8)
    norm = Normalisation.from_array(volume)
    lazy = superresolve_dask(model2, da.from_array(volume), tile=5, normalisation=norm)
    assert lazy.dtype == np.uint8
    expected = run_superresolve(model2, volume, normalisation=norm, device="cpu")
    assert np.abs(lazy.compute().astype(int) - expected).max() <= 1


def test_model_spec_rebuilds_the_same_model(model2: WPPNet) -> None:
    import pickle

    spec = pickle.loads(pickle.dumps(ModelSpec.from_model(model2)))
    assert spec.token == ModelSpec.from_model(model2).token
    rebuilt = spec.build("cpu")
    x = torch.rand(1, 1, 9, 9)
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in rebuilt.state_dict().items())
    with torch.no_grad():  # the rebuilt copy runs channels-last on CPU: same float32 arithmetic
        assert (rebuilt(x) - model2.eval()(x)).abs().max() <= 1e-5
    with pytest.raises(InputError, match="config"):
        ModelSpec.from_model(NearestUpsampler())


def write_zarr(path: Path, volume: np.ndarray, chunks: tuple[int, ...], **attrs) -> None:
    from napari_wpp.io import create_zarr_array

    array = create_zarr_array(path, volume.shape, volume.dtype, chunks, attrs)
    array[:] = volume


def test_zarr_out_of_core_matches_in_memory_one_chunk_per_task(
    model2: WPPNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("zarr")
    pytest.importorskip("dask")
    from napari_wpp.io import open_zarr_array
    from napari_wpp.jobs.zarr_layout import superresolve_zarr

    volume = rand((16, 96, 96), seed=11)
    write_zarr(tmp_path / "in.zarr", volume, (1, 96, 96), pixel_size=[3.0, 2.0, 2.0], unit="µm")
    seen: list[tuple[int, ...]] = []
    block_function = superresolution._superresolve_block

    def spy(block: np.ndarray, *args, **kwargs) -> np.ndarray:
        seen.append(block.shape)
        return block_function(block, *args, **kwargs)

    monkeypatch.setattr(superresolution, "_superresolve_block", spy)
    run = superresolve_zarr(model2, tmp_path / "in.zarr", tmp_path / "out.zarr", scheduler="sync")
    events = list(run)  # warm up (imports, caches) before measuring memory
    tracemalloc.start()
    events = list(
        superresolve_zarr(model2, tmp_path / "in.zarr", tmp_path / "out.zarr", scheduler="sync")
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert not finish(events).stopped_early and finish(events).result is None
    assert [e.done for e in events[:-1]] == list(range(1, 17))
    assert seen == [(1, 96, 96)] * 32  # every task got one slice, never the volume
    out = open_zarr_array(tmp_path / "out.zarr")
    expected = run_superresolve(model2, volume, device="cpu")
    assert out.shape == expected.shape and out.dtype == np.float32
    assert np.abs(out[:] - expected).max() <= 1e-5
    # about two output slices plus a fixed overhead (~0.2 MB), independent of the slice count
    assert peak < expected.nbytes / 3
    attrs = dict(out.attrs)
    assert attrs["pixel_size"] == [3.0, 1.0, 1.0] and attrs["unit"] == "µm"
    prov = attrs["napari_wpp"]
    assert prov["scale"] == 2 and prov["axis"] == 0 and prov["complete"]
    assert prov["slices_done"] == 16
    assert Path(prov["source"]) == (tmp_path / "in.zarr").resolve()
    assert prov["model"]["config"] == model2.config()


@pytest.mark.parametrize("axis", [1, 2])
def test_zarr_other_axes_with_normalisation(model2: WPPNet, tmp_path: Path, axis: int) -> None:
    pytest.importorskip("zarr")
    pytest.importorskip("dask")
    from napari_wpp.io import open_zarr_array
    from napari_wpp.jobs.zarr_layout import superresolve_zarr

    volume = np.random.default_rng(5).integers(0, 65536, (5, 9, 8)).astype(np.uint16)
    write_zarr(tmp_path / "in.zarr", volume, (2, 4, 4), pixel_size=[4.0, 2.0, 1.0])
    norm = Normalisation.from_array(volume)
    events = list(
        superresolve_zarr(
            model2, tmp_path / "in.zarr", tmp_path / "o.zarr", axis=axis, tile=4,
            normalisation=norm, chunks_per_step=3,
        )
    )  # fmt: skip
    n = volume.shape[axis]
    assert [e.done for e in events[:-1]] == list(range(3, n, 3)) + [n]
    out = open_zarr_array(tmp_path / "o.zarr")
    expected = run_superresolve(model2, volume, axis=axis, normalisation=norm, device="cpu")
    assert out.dtype == np.uint16 and out.shape == expected.shape
    assert np.abs(out[:].astype(int) - expected).max() <= 1
    size = [4.0 / 2, 2.0 / 2, 1.0 / 2]
    size[axis] *= 2
    assert out.attrs["pixel_size"] == size
    assert out.attrs["napari_wpp"]["normalisation"] == norm.to_dict()


def test_zarr_stop_keeps_written_slabs_and_marks_incomplete(model2: WPPNet, tmp_path: Path) -> None:
    pytest.importorskip("zarr")
    pytest.importorskip("dask")
    from napari_wpp.io import open_zarr_array
    from napari_wpp.jobs.zarr_layout import superresolve_zarr

    volume = rand((6, 8, 8), seed=12)
    write_zarr(tmp_path / "in.zarr", volume, (1, 8, 8))
    stop = threading.Event()
    events = []
    for event in superresolve_zarr(model2, tmp_path / "in.zarr", tmp_path / "o.zarr", stop=stop):
        events.append(event)
        if isinstance(event, InferenceProgress) and event.done == 2:
            stop.set()
    assert finish(events).stopped_early and len(events) == 3
    out = open_zarr_array(tmp_path / "o.zarr")
    prov = out.attrs["napari_wpp"]
    assert prov["complete"] is False and prov["slices_done"] == 2
    expected = run_superresolve(model2, volume[:2], device="cpu")
    assert np.abs(out[:2] - expected).max() <= 1e-5
    assert not out[2:].any()  # unwritten slabs read as the fill value


def test_bad_zarr_paths(tmp_path: Path, model2: WPPNet) -> None:
    zarr = pytest.importorskip("zarr")
    pytest.importorskip("dask")
    from napari_wpp.io import create_zarr_array, open_zarr_array
    from napari_wpp.jobs.zarr_layout import superresolve_zarr

    zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("x")
    (tmp_path / "file.tif").write_bytes(b"II*\x00")
    (tmp_path / "broken.zarr").mkdir()
    (tmp_path / "broken.zarr" / "zarr.json").write_text("{not json")
    cases = {
        "missing.zarr": "does not exist",
        "group.zarr": "group",
        "plain": "not a zarr array",
        "file.tif": "not a zarr array",
        "broken.zarr": "zarr",
    }
    for name, match in cases.items():
        with pytest.raises(InputError, match=match) as info:
            open_zarr_array(tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="does not exist"):
        next(superresolve_zarr(model2, tmp_path / "missing.zarr", tmp_path / "o.zarr"))
    write_zarr(tmp_path / "in.zarr", rand((2, 4, 4)), (1, 4, 4))
    with pytest.raises(InputError, match="is the input"):
        next(superresolve_zarr(model2, tmp_path / "in.zarr", tmp_path / "in.zarr"))
    for name in ("plain", "file.tif"):  # never overwritten
        with pytest.raises(InputError, match="not a zarr array"):
            create_zarr_array(tmp_path / name, (2, 2), "float32", (1, 2))
    assert (tmp_path / "plain" / "x.txt").read_text() == "x"
    with pytest.raises(InputError, match="already exists"):
        create_zarr_array(tmp_path / "in.zarr", (2, 2), "float32", (1, 2), overwrite=False)
    with pytest.raises(InputError, match="does not exist"):
        create_zarr_array(tmp_path / "no" / "o.zarr", (2, 2), "float32", (1, 2))
    assert json.loads((tmp_path / "in.zarr" / "zarr.json").read_text())["node_type"] == "array"


@pytest.mark.slow
def test_distributed_cluster_gives_the_same_result(model2: WPPNet, tmp_path: Path) -> None:
    pytest.importorskip("zarr")
    distributed = pytest.importorskip("distributed")
    da = pytest.importorskip("dask.array")
    from napari_wpp.io import open_zarr_array
    from napari_wpp.jobs.zarr_layout import superresolve_zarr

    volume = rand((4, 12, 10), seed=13)
    write_zarr(tmp_path / "in.zarr", volume, (1, 12, 10))
    expected = run_superresolve(model2, volume, device="cpu")
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        lazy = superresolve_dask(model2, da.from_array(volume, chunks=(1, 12, 10)))
        result = client.compute(lazy).result()
        events = list(
            superresolve_zarr(
                model2,
                tmp_path / "in.zarr",
                tmp_path / "o.zarr",
                scheduler=client,
                chunks_per_step=2,
            )
        )
        workers = client.run(lambda: __import__("os").getpid())
    assert len(set(workers.values())) == 2
    assert np.abs(result - expected).max() <= 1e-5
    assert not finish(events).stopped_early
    assert np.abs(open_zarr_array(tmp_path / "o.zarr")[:] - expected).max() <= 1e-5


def test_superresolve_into_any_array_target(model2: WPPNet) -> None:
    pytest.importorskip("dask")
    from napari_wpp.core.inference import output_dtype, superresolve_into

    volume = rand((3, 7, 9), seed=14)
    target = np.full(output_shape(volume.shape, 2, 2), np.nan, output_dtype(volume.dtype, None))
    events = list(superresolve_into(model2, volume, target, axis=2, chunks_per_step=4))
    assert [e.done for e in events[:-1]] == [4, 8, 9]
    expected = run_superresolve(model2, volume, axis=2, device="cpu")
    assert np.abs(target - expected).max() <= 1e-5
    with pytest.raises(InputError, match="target has shape"):
        next(superresolve_into(model2, volume, np.zeros((3, 7, 9), np.float32)))
    with pytest.raises(InputError, match="target has dtype"):
        next(superresolve_into(model2, volume, np.zeros((3, 14, 18), np.float64)))


def test_zarr_2d_image(model2: WPPNet, tmp_path: Path) -> None:
    pytest.importorskip("zarr")
    pytest.importorskip("dask")
    from napari_wpp.io import open_zarr_array
    from napari_wpp.jobs.zarr_layout import superresolve_zarr

    image = rand((13, 10), seed=15)
    write_zarr(tmp_path / "in.zarr", image, (8, 8), pixel_size=[2.0, 3.0])
    events = list(superresolve_zarr(model2, tmp_path / "in.zarr", tmp_path / "o.zarr", tile=4))
    assert [(e.done, e.total) for e in events[:-1]] == [(1, 1)]
    out = open_zarr_array(tmp_path / "o.zarr")
    assert np.abs(out[:] - superresolve_slice(model2, image, device="cpu")).max() <= 1e-5
    assert out.attrs["pixel_size"] == [1.0, 1.5] and out.attrs["napari_wpp"]["axis"] is None
