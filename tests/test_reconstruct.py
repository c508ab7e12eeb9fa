"""Variational WPP reconstruction: events, budgets, determinism, quality."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_wpp.core.errors import InputError
from napari_wpp.core.metrics import evaluate
from napari_wpp.core.operators import GaussianDownsampling, add_noise, upsample_aligned
from napari_wpp.core.reconstruct import (
    ReconstructionFinished,
    ReconstructionPreview,
    ReconstructionProgress,
    VariationalConfig,
    reconstruct_variational,
    run_reconstruction,
)
from napari_wpp.data import synthetic_volume

SMALL = dict(n_reference_patches=2000, patches_per_iteration=4000, device="cpu")


@pytest.fixture(scope="module")
def problem() -> tuple[np.ndarray, np.ndarray, np.ndarray, GaussianDownsampling]:
    """A 96×96 synthetic HR slice, its ×4 LR observation and a separate reference slice."""
    volume = synthetic_volume((12, 96, 96), seed=3).astype(np.float32) / 255
    truth, reference = volume[2], volume[10]
    operator = GaussianDownsampling(4, 2.0)
    lr = add_noise(operator(torch.from_numpy(truth)), 0.01, seed=0).numpy()
    return lr, reference, truth, operator


def test_events_shapes_and_budget(problem) -> None:
    lr, reference, _, operator = problem
    config = VariationalConfig(iterations=6, preview_every=3, **SMALL)
    events = list(reconstruct_variational(lr, reference, operator, config))
    progress = [e for e in events if isinstance(e, ReconstructionProgress)]
    previews = [e for e in events if isinstance(e, ReconstructionPreview)]
    assert [e.iteration for e in progress] == list(range(1, 7))
    assert [e.iteration for e in previews] == [3, 6]
    assert progress[-1].fraction == pytest.approx(1.0)
    final = events[-1]
    assert isinstance(final, ReconstructionFinished)
    assert final.iterations == 6 and not final.stopped_early
    assert final.image.shape == (96, 96) and final.image.dtype == np.float32
    np.testing.assert_array_equal(previews[-1].image, final.image)


def test_inputs_are_not_modified(problem) -> None:
    lr, reference, _, operator = problem
    lr_copy, ref_copy = lr.copy(), reference.copy()
    run_reconstruction(lr, reference, operator, VariationalConfig(iterations=2, **SMALL))
    np.testing.assert_array_equal(lr, lr_copy)
    np.testing.assert_array_equal(reference, ref_copy)


def test_same_seed_same_result(problem) -> None:
    lr, reference, _, operator = problem
    config = VariationalConfig(iterations=5, seed=7, **SMALL)
    first = run_reconstruction(lr, reference, operator, config).image
    second = run_reconstruction(lr, reference, operator, config).image
    np.testing.assert_array_equal(first, second)
    other = run_reconstruction(
        lr, reference, operator, VariationalConfig(iterations=5, seed=8, **SMALL)
    )
    assert not np.array_equal(first, other.image)


def test_stop_event_returns_result_so_far(problem) -> None:
    lr, reference, _, operator = problem
    stop = threading.Event()
    events = reconstruct_variational(
        lr, reference, operator, VariationalConfig(iterations=1000, **SMALL), stop=stop
    )
    for event in events:
        if isinstance(event, ReconstructionProgress) and event.iteration == 3:
            stop.set()
        if isinstance(event, ReconstructionFinished):
            final = event
    assert final.stopped_early and final.iterations == 3
    assert np.isfinite(final.image).all()


@pytest.mark.parametrize(("distance", "iterations"), [("exact", 60), ("sliced", 200)])
def test_reconstruction_beats_bicubic_and_fits_the_data(
    problem, distance: str, iterations: int
) -> None:
    """The sliced prior needs more (cheaper) iterations: 22.9 dB after 60, 23.7 after 200."""
    lr, reference, truth, operator = problem
    config = VariationalConfig(iterations=iterations, levels=1, patch_distance=distance, **SMALL)
    result = run_reconstruction(lr, reference, operator, config).image
    bicubic = upsample_aligned(torch.from_numpy(lr), operator).numpy()
    ours = evaluate(result, truth, crop=8)
    base = evaluate(bicubic, truth, crop=8)
    assert ours["psnr"] > base["psnr"] + 0.5
    assert ours["blur_effect"] < base["blur_effect"]
    residual = operator(torch.from_numpy(result)).numpy() - lr
    assert np.sqrt(np.mean(residual**2)) < 0.02  # about the noise level (0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=np.zeros((2, 8, 8), np.float32)), "must be 2D"),
        (dict(reference=np.zeros((4, 4), np.float32)), "smaller than the 6×6 patch"),
        (dict(lr=np.full((24, 24), np.nan, np.float32)), "NaN or Inf"),
        (dict(config=VariationalConfig(lam=-1.0)), "lambda"),
        (dict(config=VariationalConfig(patch_distance="near")), "patch distance 'near'"),
        (dict(config=VariationalConfig(device="tpu")), "device"),
    ],
)
def test_bad_input_is_one_line(problem, kwargs, message) -> None:
    lr, reference, _, operator = problem
    args = dict(lr=lr, reference=reference, operator=operator, config=VariationalConfig(**SMALL))
    args.update(kwargs)
    with pytest.raises(InputError, match=message) as info:
        next(reconstruct_variational(**args))
    assert "\n" not in str(info.value)


@pytest.mark.slow
@pytest.mark.realdata
def test_sic_crop_improves_on_bicubic(sic_dir) -> None:
    """Real SiC ×4 (published corner operator), 50 iterations on a 200×200 crop."""
    from skimage.io import imread

    hr = imread(sic_dir / "hr_SiC.png").astype(np.float32) / 255
    lr = imread(sic_dir / "lr_SiC_x4.png").astype(np.float32) / 255
    ref = imread(sic_dir / "ref_SiC.png").astype(np.float32) / 255
    operator = GaussianDownsampling(4, 2.0, 16, anchor="corner", padding="circular")
    # LR pixel i samples HR around 4 i + 7.5 in both frames, so the crop starts at HR 4·25 = 100
    lr_crop = lr[25:75, 25:75]
    config = VariationalConfig(
        iterations=50, n_reference_patches=4000, patches_per_iteration=8000, device="cpu"
    )
    result = run_reconstruction(lr_crop, ref, operator, config).image
    truth = hr[100:300, 100:300]
    bicubic = upsample_aligned(torch.from_numpy(lr_crop), operator).numpy()
    ours, base = evaluate(result, truth, crop=24), evaluate(bicubic, truth, crop=24)
    assert ours["psnr"] > base["psnr"] + 1.0
    assert ours["blur_effect"] < base["blur_effect"] - 0.05
