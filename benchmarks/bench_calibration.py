"""Is the calibrated WPPFlow std calibrated? A reliability diagram on SiC ×4 against hr_SiC.

Takes a WPPFlow trained with a held-out reference strip (``napari-wpp train --model wppflow``,
default ``--calibration-holdout``), draws 16 posterior samples of ``lr_SiC_x4.png`` through
the predict job (seed 0; or reads the files of an earlier ``napari-wpp predict`` with
``--mean``), and compares the raw and the calibrated std with the actual error of the mean
against ``hr_SiC.png`` (on the [0, 1] scale, 40 pixels cropped from every side, as
``napari-wpp evaluate --std``). hr_SiC is used here only to measure: the calibration was
fitted on the held-out strip of ref_SiC.

Prints the coverage within 1, 2 and 3 std (raw, calibrated, Gaussian), the calibration's own
held-out figures from the model file, the PSNR of the mean, and writes

* ``docs/images/calibration_reliability.png``: observed against nominal coverage of the
  central Gaussian intervals, raw and calibrated (matplotlib);
* ``docs/images/calibration_maps.png``: hr_SiC, the mean, |error|, the raw and the calibrated
  std and the suitability map of lr_SiC_x4 against ref_SiC (a 150-pixel crop).

Usage: ``python benchmarks/bench_calibration.py FLOW.safetensors [--mean mean.tif]
[--images docs/images]``
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile
from shared_data import DATA_ROOT

CROP = 40
NOMINAL = np.linspace(0.02, 0.995, 60)


def _gaussian_k(p: np.ndarray) -> np.ndarray:
    """Half-widths (in std) of the central Gaussian intervals of probability ``p``."""
    from scipy.special import erfinv

    return math.sqrt(2.0) * erfinv(p)


def _observed(error: np.ndarray, std: np.ndarray, p: np.ndarray) -> np.ndarray:
    ratio = np.sort((np.abs(error) / np.maximum(std, 1e-12)).ravel())
    return np.searchsorted(ratio, _gaussian_k(p), side="right") / ratio.size


def _sampled(model_path: Path, lr_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Mean, calibrated std and raw std of 16 samples through the predict job (in memory)."""
    from napari_wpp.core.config import PredictSpec
    from napari_wpp.io import load_model
    from napari_wpp.jobs.calibration import model_calibration
    from napari_wpp.jobs.predict import PredictSource, PredictTarget, predict_job

    state = load_model(model_path)
    calibration = model_calibration(state)
    if calibration is None:
        raise SystemExit(f"{model_path.name} carries no std calibration: train it with a holdout")
    lr = iio.imread(lr_path)
    spec = PredictSpec(samples=16, seed=0, device="cpu")
    start = time.perf_counter()
    events = list(
        predict_job(
            spec,
            state.model,
            state.normalisation,
            PredictSource(lr, lr_path.name),
            PredictTarget(),
            calibration=calibration,
        )
    )
    result = events[-1].result
    return result.mean, result.std, result.raw_std, time.perf_counter() - start


def _suitability(model_path: Path) -> np.ndarray:
    """The suitability map of lr_SiC_x4 against ref_SiC with the model's operator."""
    from napari_wpp.core.config import SuitabilitySpec
    from napari_wpp.core.operators import operator_from_dict
    from napari_wpp.io import read_model_metadata
    from napari_wpp.jobs.suitability import SuitabilityMapped, suitability_job

    operator = operator_from_dict(read_model_metadata(model_path)["operator"])
    lr = iio.imread(DATA_ROOT / "sic" / "lr_SiC_x4.png")
    reference = iio.imread(DATA_ROOT / "sic" / "ref_SiC.png")
    for event in suitability_job(SuitabilitySpec(), operator, lr, reference):
        if isinstance(event, SuitabilityMapped):
            return np.asarray(event.result.score_map[0])
    raise RuntimeError("the suitability job gave no map")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a WPPFlow model file with a std calibration")
    parser.add_argument("--mean", type=Path, help="mean.tif of `predict --samples 16` (optional)")
    parser.add_argument("--images", type=Path, default=Path("docs/images"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_wpp.core.metrics import psnr
    from napari_wpp.io import load_model
    from napari_wpp.jobs.calibration import model_calibration

    truth = iio.imread(DATA_ROOT / "sic" / "hr_SiC.png").astype(np.float64) / 255.0
    if args.mean is not None:
        stem = args.mean.with_suffix("")
        mean = tifffile.imread(args.mean)
        std = tifffile.imread(f"{stem}_std{args.mean.suffix}")
        raw = tifffile.imread(f"{stem}_raw_std{args.mean.suffix}")
        source = f"read from {args.mean}"
    else:
        mean, std, raw, seconds = _sampled(args.model, DATA_ROOT / "sic" / "lr_SiC_x4.png")
        source = f"sampling 16 × 600²: {seconds:.1f} s"
    mean01 = np.asarray(mean, np.float64) / 255.0
    std01, raw01 = np.asarray(std, np.float64) / 255.0, np.asarray(raw, np.float64) / 255.0
    inner = (slice(CROP, -CROP), slice(CROP, -CROP))
    error = (mean01 - truth)[inner]
    calibration = model_calibration(load_model(args.model))

    print(f"model {args.model}  ({source})")
    print(f"mean PSNR {psnr(mean01, truth, crop=CROP):.2f} dB ({CROP}-pixel crop)")
    print(
        f"calibration σ_cal = {calibration.coverage_scale:.3g}·√(({calibration.std_scale:.3g}·σ)²"
        f" + ({calibration.gradient_scale:.3g}·|∇|)² + {calibration.floor:.3g}²)"
    )
    print("                   within 1 / 2 / 3 std")
    gauss = " / ".join(f"{100 * math.erf(k / math.sqrt(2)):5.1f}" for k in (1, 2, 3))
    print(f"Gaussian           {gauss} %")
    for label, values in (
        ("held-out, raw   ", calibration.raw_coverage),
        ("held-out, calib.", calibration.coverage),
    ):
        print(f"{label}   {' / '.join(f'{100 * v:5.1f}' for v in values)} %  (ref_SiC strip)")
    for label, s in (("hr_SiC, raw     ", raw01), ("hr_SiC, calib.  ", std01)):
        shares = [float(np.mean(np.abs(error) <= k * s[inner])) for k in (1, 2, 3)]
        print(
            f"{label}   {' / '.join(f'{100 * v:5.1f}' for v in shares)} %  "
            f"(mean std {s[inner].mean():.4f}, mean |error| {np.abs(error).mean():.4f})"
        )

    args.images.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=110)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated Gaussian")
    ax.plot(NOMINAL, _observed(error, raw01[inner], NOMINAL), color="tab:red", label="raw std")
    ax.plot(
        NOMINAL, _observed(error, std01[inner], NOMINAL), color="tab:blue", label="calibrated std"
    )
    nominal3 = [math.erf(k / math.sqrt(2)) for k in (1, 2, 3)]
    ax.scatter(
        nominal3,
        calibration.coverage,
        color="tab:blue",
        marker="x",
        zorder=3,
        label="held-out ref_SiC strip (1/2/3 std)",
    )
    ax.set_xlabel("nominal coverage of the Gaussian interval")
    ax.set_ylabel("observed share of hr_SiC pixels inside")
    ax.set_title("WPPFlow std on SiC ×4, 16 samples", fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    reliability = args.images / "calibration_reliability.png"
    fig.savefig(reliability)
    plt.close(fig)

    score = _suitability(args.model)
    view = (slice(200, 350), slice(200, 350))
    lr_view = (slice(50, 88), slice(50, 88))
    std_high = float(np.percentile(std01[view], 99))
    panels = [
        ("hr_SiC (truth)", truth[view], "gray", (0, 1)),
        ("posterior mean", mean01[view], "gray", (0, 1)),
        ("|error|", np.abs(mean01 - truth)[view], "magma", (0, std_high)),
        ("raw std", raw01[view], "magma", (0, std_high)),
        ("calibrated std", std01[view], "magma", (0, std_high)),
        ("suitability (LR grid)", score[lr_view], "viridis", (0, float(np.percentile(score, 99)))),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.6), dpi=100)
    for ax, (title, image, cmap, limits) in zip(axes, panels, strict=True):
        ax.imshow(image, cmap=cmap, vmin=limits[0], vmax=limits[1], interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    maps = args.images / "calibration_maps.png"
    fig.savefig(maps)
    plt.close(fig)
    print(f"suitability median {np.median(score):.3g} (about 1: explained up to the noise)")
    print(f"wrote {reliability} and {maps}")


if __name__ == "__main__":
    main()
