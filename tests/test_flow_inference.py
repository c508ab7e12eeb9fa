"""Posterior sampling with a WPPFlow: core.inference.sample*, jobs sample_zarr, model files."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_wpp import io
from napari_wpp.core import inference
from napari_wpp.core.errors import InputError
from napari_wpp.core.inference import (
    SampleResult,
    SamplingFinished,
    SamplingProgress,
    flow_receptive_radius,
    model_halo,
    run_sample,
    run_sample_volume,
    sample,
    sample_into,
    sample_volume,
    slice_generator,
)
from napari_wpp.core.intensity import Normalisation
from napari_wpp.core.models.wppflow import WPPFlow
from napari_wpp.core.models.wppnet import WPPNet
from napari_wpp.jobs.zarr_layout import sample_zarr

TINY = {"steps": 1, "hidden": 8, "cond_features": 4, "mean_features": 8, "mean_blocks": 2}


def tiny_flow(scale: int = 2, seed: int = 0, **options: object) -> WPPFlow:
    """A tiny flow with every weight moved off its initialisation (zero-initialised subnets
    would make the couplings identities and hide their reach)."""
    torch.manual_seed(seed)
    flow = WPPFlow(scale=scale, **{**TINY, **options})
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return flow.eval()


@pytest.fixture(scope="module")
def flow2() -> WPPFlow:
    return tiny_flow(2)


def rand(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def events_of(generator) -> tuple[list, SamplingFinished]:
    events = list(generator)
    assert isinstance(events[-1], SamplingFinished)
    assert all(isinstance(e, SamplingProgress) for e in events[:-1])
    return events[:-1], events[-1]


# --------------------------------------------------------------------------- one image


def test_mean_and_std_are_those_of_the_samples(flow2: WPPFlow) -> None:
    image = rand((12, 14))
    progress, finished = events_of(sample(flow2, image, 5, batch_size=2, keep_samples=True,
                                          device="cpu"))
    result = finished.result
    assert isinstance(result, SampleResult) and not finished.stopped_early
    assert [e.done for e in progress] == [2, 4, 5] and progress[-1].total == 5
    assert progress[-1].slices_done == 1
    assert result.samples is not None and result.samples.shape == (5, 24, 28)
    assert result.mean.dtype == result.std.dtype == np.float32
    np.testing.assert_allclose(result.mean, result.samples.mean(0), atol=1e-6)
    np.testing.assert_allclose(result.std, result.samples.std(0, ddof=1), atol=1e-6)
    assert result.std.min() > 0  # the samples differ
    assert (result.k, result.temperature, result.seed) == (5, 1.0, 0)


def test_samples_are_kept_only_when_asked(flow2: WPPFlow) -> None:
    result = run_sample(flow2, rand((8, 8)), 3, device="cpu")
    assert result.samples is None and result.mean.shape == (16, 16)


def test_seed_reproduces_and_batch_size_does_not_matter(flow2: WPPFlow) -> None:
    image = rand((10, 12), seed=1)
    a = run_sample(flow2, image, 4, seed=7, batch_size=1, keep_samples=True, device="cpu")
    b = run_sample(flow2, image, 4, seed=7, batch_size=3, keep_samples=True, device="cpu")
    c = run_sample(flow2, image, 4, seed=8, batch_size=3, keep_samples=True, device="cpu")
    np.testing.assert_allclose(a.samples, b.samples, atol=1e-5)
    assert np.abs(a.samples - c.samples).max() > 1e-3


def test_a_sample_is_the_flow_at_the_seeds_latent(flow2: WPPFlow) -> None:
    image = rand((8, 10), seed=2)
    result = run_sample(flow2, image, 1, seed=3, keep_samples=True, device="cpu")
    with torch.no_grad():
        expected = flow2.sample(
            torch.from_numpy(image)[None, None], generator=slice_generator(3, 0)
        )[0, 0].numpy()
    np.testing.assert_allclose(result.samples[0], expected, atol=1e-5)
    assert np.all(result.std == 0)  # one sample


def test_temperature_zero_gives_the_mode(flow2: WPPFlow) -> None:
    image = rand((8, 8), seed=3)
    result = run_sample(flow2, image, 3, temperature=0.0, device="cpu")
    with torch.no_grad():
        mode = flow2.mode_sample(torch.from_numpy(image)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(result.mean, mode, atol=1e-5)
    assert np.abs(result.std).max() < 1e-5
    hot = run_sample(flow2, image, 3, temperature=2.0, device="cpu")
    warm = run_sample(flow2, image, 3, temperature=1.0, device="cpu")
    assert hot.std.mean() > warm.std.mean()


@pytest.mark.parametrize("scale", [2, 4])
def test_receptive_radius_bounds_the_reach_of_lr_and_latent(scale: int) -> None:
    flow = tiny_flow(scale, steps=2)
    radius = flow_receptive_radius(flow)
    assert model_halo(flow) == radius
    size, centre = 2 * radius + 6, radius + 3
    lr = torch.rand(1, 1, size, size, requires_grad=True)
    z = torch.randn(1, 1, scale * size, scale * size, requires_grad=True)
    x, _ = flow(z, lr)
    cell = slice(scale * centre, scale * centre + scale)
    x[0, 0, cell, cell].sum().backward()
    for grad, factor in ((lr.grad, 1), (z.grad, scale)):
        ys, xs = np.nonzero(grad[0, 0].abs().numpy() > 0)
        reach = max(np.abs(ys // factor - centre).max(), np.abs(xs // factor - centre).max())
        assert 0 < reach <= radius


@pytest.mark.parametrize(("scale", "shape", "tile"), [(2, (40, 43), 9), (4, (33, 30), 8)])
def test_tiled_equals_whole_slice(scale: int, shape: tuple[int, int], tile: int) -> None:
    flow = tiny_flow(scale, seed=scale)
    image = rand(shape, seed=scale)
    whole = run_sample(flow, image, 3, batch_size=2, keep_samples=True, device="cpu")
    tiled = run_sample(flow, image, 3, batch_size=3, tile=tile, keep_samples=True, device="cpu")
    np.testing.assert_allclose(tiled.samples, whole.samples, atol=1e-4)
    np.testing.assert_allclose(tiled.mean, whole.mean, atol=1e-4)
    np.testing.assert_allclose(tiled.std, whole.std, atol=1e-4)


def test_too_small_halo_is_refused(flow2: WPPFlow) -> None:
    radius = flow_receptive_radius(flow2)
    with pytest.raises(InputError, match="receptive radius"):
        run_sample(flow2, rand((8, 8)), 2, tile=4, halo=radius - 1, device="cpu")


def test_inputs_and_model_are_not_modified(flow2: WPPFlow) -> None:
    image = rand((8, 8))
    before_image = image.copy()
    before_state = copy.deepcopy(flow2.state_dict())
    run_sample(flow2, image, 2, device="cpu")
    assert np.array_equal(image, before_image)
    for name, value in flow2.state_dict().items():
        assert torch.equal(value, before_state[name])
    assert not flow2.training


def test_stop_ends_the_run_without_a_result(flow2: WPPFlow) -> None:
    stop = threading.Event()
    stop.set()
    _, finished = events_of(sample(flow2, rand((8, 8)), 4, stop=stop, device="cpu"))
    assert finished.stopped_early and finished.result is None
    stop.clear()
    events = []
    for event in sample(flow2, rand((8, 8)), 6, batch_size=2, stop=stop, device="cpu"):
        events.append(event)
        stop.set()  # after the first batch
    assert [type(e) for e in events] == [SamplingProgress, SamplingFinished]
    assert events[-1].stopped_early and events[0].done == 2


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"k": 0}, "positive integer"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"seed": -2}, "seed"),
        ({"batch_size": 0}, "batch_size"),
        ({"tile": 0}, "tile"),
    ],
)
def test_bad_parameters(flow2: WPPFlow, kwargs: dict, fragment: str) -> None:
    params = {"k": 2, **kwargs}
    with pytest.raises(InputError, match=fragment):
        run_sample(flow2, rand((8, 8)), device="cpu", **params)


def test_bad_images_and_wrong_model_kinds(flow2: WPPFlow) -> None:
    with pytest.raises(InputError, match="2D image"):
        run_sample(flow2, rand((2, 8, 8)), 2, device="cpu")
    with pytest.raises(InputError, match="normalised float"):
        run_sample(flow2, np.zeros((8, 8), np.uint8), 2, device="cpu")
    with pytest.raises(InputError, match="NaN"):
        run_sample(flow2, np.full((8, 8), np.nan, np.float32), 2, device="cpu")
    net = WPPNet(scale=2, features=4, blocks=1)
    with pytest.raises(InputError, match="not a WPPFlow"):
        run_sample(net, rand((8, 8)), 2, device="cpu")
    with pytest.raises(InputError, match="conditional flow"):
        inference.run_superresolve(flow2, rand((8, 8)), device="cpu")
    with pytest.raises(InputError, match="conditional flow"):
        inference.superresolve_slice(flow2, rand((8, 8)), device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling_matches_cpu_and_is_reproducible(flow2: WPPFlow) -> None:
    image = rand((16, 12), seed=11)
    cpu = run_sample(flow2, image, 3, seed=2, keep_samples=True, device="cpu")
    gpu = run_sample(flow2, image, 3, seed=2, keep_samples=True, device="cuda")
    again = run_sample(flow2, image, 3, seed=2, tile=5, keep_samples=True, device="cuda")
    # same latents (CPU RNG); tolerances allow for TF32 convolutions on the GPU
    np.testing.assert_allclose(gpu.samples, cpu.samples, atol=1e-2)
    np.testing.assert_allclose(again.samples, gpu.samples, atol=1e-2)
    np.testing.assert_allclose(gpu.std, cpu.std, atol=1e-2)
    assert next(flow2.parameters()).device.type == "cpu"


# --------------------------------------------------------------------------- volumes


@pytest.mark.parametrize("axis", [0, 2])
def test_volume_slices_equal_single_images(flow2: WPPFlow, axis: int) -> None:
    volume = rand((3, 8, 4), seed=4)
    result = run_sample_volume(
        flow2, volume, 3, axis=axis, seed=5, batch_size=2, keep_samples=True, device="cpu"
    )
    shape = inference.output_shape(volume.shape, 2, axis)
    assert result.mean.shape == result.std.shape == shape
    assert result.samples is not None and result.samples.shape == (3, *shape)
    for i in range(volume.shape[axis]):
        single = run_sample(
            flow2, np.take(volume, i, axis=axis), 3, seed=5, keep_samples=True,
            slice_index=i, device="cpu",
        )
        np.testing.assert_allclose(np.take(result.mean, i, axis=axis), single.mean, atol=1e-5)
        np.testing.assert_allclose(np.take(result.std, i, axis=axis), single.std, atol=1e-5)
        np.testing.assert_allclose(
            np.take(result.samples, i, axis=axis + 1), single.samples, atol=1e-5
        )


def test_2d_image_through_sample_volume_is_slice_zero(flow2: WPPFlow) -> None:
    image = rand((8, 8), seed=6)
    volume = run_sample_volume(flow2, image, 3, seed=1, device="cpu")
    single = run_sample(flow2, image, 3, seed=1, device="cpu")
    np.testing.assert_allclose(volume.mean, single.mean, atol=1e-6)
    np.testing.assert_allclose(volume.std, single.std, atol=1e-6)


def test_volume_with_normalisation_gives_input_dtype_and_grey_level_std(flow2: WPPFlow) -> None:
    volume = (rand((2, 8, 8), seed=7) * 200 + 20).astype(np.uint8)
    norm = Normalisation.from_array(volume)
    raw = run_sample_volume(
        flow2, volume, 3, normalisation=norm, keep_samples=True, device="cpu"
    )
    unit = run_sample_volume(flow2, norm.apply(volume), 3, keep_samples=True, device="cpu")
    assert raw.mean.dtype == np.uint8 and raw.samples.dtype == np.uint8
    assert raw.std.dtype == np.float32
    np.testing.assert_allclose(raw.std, unit.std * 255.0, rtol=1e-5, atol=1e-3)
    assert np.array_equal(raw.mean, norm.invert(unit.mean))
    assert np.array_equal(raw.samples, norm.invert(unit.samples))


def test_volume_stop_and_progress(flow2: WPPFlow) -> None:
    progress, finished = events_of(
        sample_volume(flow2, rand((2, 8, 8)), 3, batch_size=2, device="cpu")
    )
    assert [(e.done, e.slices_done) for e in progress] == [(2, 0), (3, 1), (5, 1), (6, 2)]
    assert all(e.total == 6 and e.slices_total == 2 for e in progress)
    stop = threading.Event()
    stop.set()
    _, finished = events_of(sample_volume(flow2, rand((2, 8, 8)), 3, stop=stop, device="cpu"))
    assert finished.stopped_early and finished.result is None


def test_sample_into_any_array_targets(flow2: WPPFlow) -> None:
    volume = (rand((2, 6, 8), seed=8) * 255).astype(np.uint8)
    norm = Normalisation.from_array(volume)
    expected = run_sample_volume(
        flow2, volume, 3, axis=1, normalisation=norm, keep_samples=True, device="cpu"
    )
    shape = inference.output_shape(volume.shape, 2, 1)
    mean, std = np.zeros(shape, np.uint8), np.zeros(shape, np.float32)
    samples = np.zeros((3, *shape), np.uint8)
    _, finished = events_of(
        sample_into(flow2, volume, mean, std, 3, samples_target=samples, axis=1,
                    normalisation=norm, device="cpu")
    )
    assert finished.result is None and not finished.stopped_early
    assert np.array_equal(mean, expected.mean) and np.array_equal(samples, expected.samples)
    np.testing.assert_allclose(std, expected.std, atol=1e-4)
    with pytest.raises(InputError, match="std target has dtype"):
        list(sample_into(flow2, volume, mean, std.astype(np.float64), 3, axis=1,
                         normalisation=norm, device="cpu"))
    with pytest.raises(InputError, match="mean target has shape"):
        list(sample_into(flow2, volume, mean[:1], std, 3, axis=1, normalisation=norm,
                         device="cpu"))


def test_sample_zarr_matches_in_memory_and_writes_samples_only_when_asked(
    flow2: WPPFlow, tmp_path: Path
) -> None:
    zarr = pytest.importorskip("zarr")
    volume = (rand((3, 8, 6), seed=9) * 255).astype(np.uint8)
    source = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=volume.shape,
                             chunks=(1, 8, 6), dtype=np.uint8)
    source[...] = volume
    source.attrs["pixel_size"] = [2.0, 1.0, 1.0]
    norm = Normalisation.from_array(volume)
    expected = run_sample_volume(
        flow2, volume, 3, seed=4, normalisation=norm, keep_samples=True, device="cpu"
    )
    _, finished = events_of(
        sample_zarr(flow2, tmp_path / "in.zarr", tmp_path / "mean.zarr",
                       tmp_path / "std.zarr", 3, samples_path=tmp_path / "samples.zarr",
                       seed=4, normalisation=norm, batch_size=2)
    )
    assert not finished.stopped_early
    mean = zarr.open_array(str(tmp_path / "mean.zarr"), mode="r")
    std = zarr.open_array(str(tmp_path / "std.zarr"), mode="r")
    samples = zarr.open_array(str(tmp_path / "samples.zarr"), mode="r")
    assert np.array_equal(mean[...], expected.mean)
    np.testing.assert_allclose(std[...], expected.std, atol=1e-4)
    assert samples.shape == (3, 3, 16, 12) and np.array_equal(samples[...], expected.samples)
    provenance = dict(std.attrs)["napari_wpp"]
    assert provenance["statistic"] == "std" and provenance["complete"]
    assert provenance["k"] == 3 and provenance["slices_done"] == 3
    assert list(mean.attrs["pixel_size"]) == [2.0, 0.5, 0.5]
    # without samples_path no samples array; a stopped run is marked incomplete
    stop = threading.Event()
    events = []
    for event in sample_zarr(flow2, tmp_path / "in.zarr", tmp_path / "m2.zarr",
                                tmp_path / "s2.zarr", 2, normalisation=norm, stop=stop):
        events.append(event)
        if isinstance(event, SamplingProgress) and event.slices_done == 1:
            stop.set()
    assert events[-1].stopped_early
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.zarr", "m2.zarr", "mean.zarr", "s2.zarr", "samples.zarr", "std.zarr"
    ]
    partial = dict(zarr.open_array(str(tmp_path / "m2.zarr"), mode="r").attrs)["napari_wpp"]
    assert partial["complete"] is False and partial["slices_done"] == 1
    with pytest.raises(InputError, match="distinct"):
        next(sample_zarr(flow2, tmp_path / "in.zarr", tmp_path / "a.zarr",
                            tmp_path / "a.zarr", 2, normalisation=norm))


# --------------------------------------------------------------------------- model files


def test_trained_flow_round_trips_through_a_model_file(tmp_path: Path) -> None:
    from napari_wpp.core.training import TrainingConfig, run_training
    from napari_wpp.data import synthetic_material

    material = synthetic_material(shape=(2, 48, 48), scale=2, noise=0.01, seed=0)
    norm = Normalisation.from_array(material.lr)
    config = TrainingConfig(
        model="wppflow", steps=2, batch_size=2, n_reference_patches=200, psi_passes=1,
        device="cpu", model_options=TINY,
    )
    final = run_training(
        norm.apply(material.lr),
        Normalisation.from_array(material.reference).apply(material.reference),
        material.operator,
        config,
        normalisation=norm.to_dict(),
    )
    path = io.save_model(tmp_path / "flow.safetensors", final.state)
    meta = io.read_model_metadata(path)
    assert meta["kind"] == "wppflow" and meta["scale"] == 2
    assert meta["lam"] == pytest.approx(100 / (0.01**2 * 24**2))  # published, 24-px crops
    assert meta["mean_frozen"] is True  # step 1 warm-up, step 2 spread
    loaded = io.load_model(path)
    assert isinstance(loaded.model, WPPFlow) and loaded.kind == "wppflow"
    assert loaded.priors and loaded.optimizer is not None
    image = norm.apply(material.lr[0])
    before = run_sample(final.state.model, image, 3, seed=2, keep_samples=True, device="cpu")
    after = run_sample(loaded.model, image, 3, seed=2, keep_samples=True, device="cpu")
    assert np.array_equal(before.samples, after.samples)
