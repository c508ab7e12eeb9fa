"""WPPNet on a real registered scan pair (Fontainebleau sandstone, ×2), through the CLI.

The protocol of docs/benchmarks.md ("A real registered scan pair"), on
``../shared/data/fs_registered_pair`` (HR 1652², LR registered onto the HR grid):

1. ``estimate-operator`` on the left half of the pair (HR 1652 × 826 and the LR on its grid);
2. the LR reduced to its own 826² grid (the published anti-aliased reduction), 8-bit;
3. ``train`` a WPPNet on the top-right LR quadrant (413²) with the HR top-left quadrant (826²)
   as reference, ``--minutes M``, defaults otherwise (``--lam`` overrides λ); the operator
   carries the LR noise model of the pair, so the model denoises its LR input at inference;
4. ``predict`` the held-out bottom-right LR quadrant and ``evaluate`` it against the real HR
   bottom-right quadrant (826², 40-px border cropped); the bicubic of the LR, corrected with
   the estimated kernel sum and bias, the same model with its input not denoised, and the HR
   scan's own blur effect are printed beside it.

Run: ``python benchmarks/bench_real_pair.py --minutes 5 [--seed 0] [--lam auto|0.02]
[--work DIR]`` (the files go to DIR, default a temporary folder).

``--diagnose`` adds readouts that use the test HR (never the method): where the output's
error lies in frequency and how it correlates with the HR scan per band, the sub-pixel shift
between f(HR) and the real LR of the test quadrant (the registration's local error under the
operator estimated on the left half), the shift between the WPPNet output and the HR scan, the
PSNR the output would have if it were re-aligned with the HR scan (an oracle), and PSNR and
blur effect of the output after Gaussian blurs (where smoothing the output would land).
``--diagnose-only PRED`` prints them for an existing prediction in ``--work``.

``--compare-denoisers`` feeds the trained network the test LR as measured, through a global
Wiener filter of the pair, and through the DCT denoiser with its two shrinkage rules
(``--compare-only MODEL`` does it for an existing model in ``--work``).

``--curve`` trains with ``--checkpoint-minutes 1``, copies the model file each time it is
rewritten, and afterwards predicts and scores every copy: PSNR and blur effect along the run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from shared_data import DATA_ROOT

DATA = DATA_ROOT / "fs_registered_pair"
SCALE = 2
CROP = 40


def _cli(*args: str) -> dict:
    """Run ``napari-wpp ARGS --json`` and return its JSON (the last line of stdout)."""
    command = [sys.executable, "-m", "napari_wpp.cli", *args, "--json"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _flags(**options: object) -> list[str]:
    """``--name value`` pairs of the options that are not ``None``."""
    return [t for k, v in options.items() if v is not None for t in (f"--{k}", str(v))]


def _write(path: Path, image: np.ndarray) -> Path:
    import tifffile

    tifffile.imwrite(path, image)
    return path


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def prepare(work: Path) -> dict[str, Path]:
    """Write the files of the protocol to ``work`` (operator halves, LR quadrants, HR parts)."""
    import imageio.v3 as iio

    from napari_wpp.core.operator_estimation import _reduce_to_lr

    hr = np.asarray(iio.imread(DATA / "FS_HR_estimate_operator.png"))
    lr = np.asarray(iio.imread(DATA / "FS_LR_estimate_operator.png"))
    n = hr.shape[0] // 2  # 826: HR quadrant side
    m = n // SCALE  # 413: LR quadrant side
    lr_small = _to_uint8(_reduce_to_lr(lr.astype(np.float64) / 255.0, SCALE, "antialias"))
    return {
        "hr_half": _write(work / "hr_left_half.tif", hr[:, :n]),
        "lr_half": _write(work / "lr_left_half.tif", lr[:, :n]),
        "reference": _write(work / "reference_hr_tl.tif", hr[:n, :n]),
        "lr_train": _write(work / "lr_train_tr.tif", lr_small[:m, m:]),
        "lr_test": _write(work / "lr_test_br.tif", lr_small[m:, m:]),
        "hr_test": _write(work / "hr_test_br.tif", hr[n:, n:]),
    }


def bicubic_row(files: dict[str, Path], operator: dict, work: Path) -> dict:
    """Bicubic of the test LR, contrast-corrected with the operator's kernel sum and bias."""
    import tifffile
    import torch

    lr = tifffile.imread(files["lr_test"]).astype(np.float32) / 255.0
    up = torch.nn.functional.interpolate(
        torch.from_numpy(lr)[None, None], scale_factor=SCALE, mode="bicubic", align_corners=False
    )[0, 0].numpy()
    corrected = (up - operator["bias"]) / operator["kernel_sum"]
    path = _write(work / "bicubic.tif", _to_uint8(np.clip(corrected, 0, 1)))
    return _cli("evaluate", str(path), str(files["hr_test"]), "--crop", str(CROP))


def raw_input_row(model: Path, files: dict[str, Path], work: Path) -> dict | None:
    """The same model without its LR noise model: the LR input superresolved as it is."""
    from napari_wpp.io import load_model, save_model

    state = load_model(model)
    if not getattr(state.model, "denoises", False):
        return None
    state.model.set_noise_variance(np.zeros((8, 8)))
    raw_model = save_model(work / f"{model.stem}_raw_input.safetensors", state, False)
    pred = work / f"{model.stem}_raw_input.tif"
    _cli("predict", str(raw_model), str(files["lr_test"]), "--out", str(pred))
    return _cli("evaluate", str(pred), str(files["hr_test"]), "--crop", str(CROP))


def _global_wiener_kernel(fitted: np.ndarray, measured: np.ndarray, tile: int = 32) -> np.ndarray:
    """A linear (global) Wiener filter of the LR, the alternative the DCT denoiser is compared
    with: gains ``clip(Re S_fy / S_yy, 0, 1)`` from half-overlapping Hann-windowed Welch tiles
    of the pair, as an odd ``(tile + 1)²`` kernel with unit sum."""
    window = np.outer(np.hanning(tile), np.hanning(tile))
    cross, power = np.zeros((tile, tile)), np.zeros((tile, tile))
    h, w = measured.shape
    for i in range(0, h - tile + 1, tile // 2):
        for j in range(0, w - tile + 1, tile // 2):
            a, b = fitted[i : i + tile, j : j + tile], measured[i : i + tile, j : j + tile]
            fa, fb = (np.fft.fft2((t - t.mean()) * window) for t in (a, b))
            cross += np.real(fa * np.conj(fb))
            power += np.abs(fb) ** 2
    gains = np.clip(cross / power, 0.0, 1.0)
    gains[0, 0] = 1.0
    periodic = np.real(np.fft.ifft2(gains))
    offsets = np.arange(-(tile // 2), tile // 2 + 1) % tile
    kernel = periodic[np.ix_(offsets, offsets)].copy()
    kernel[[0, -1], :] *= 0.5  # the offsets ±tile/2 share one periodic coefficient
    kernel[:, [0, -1]] *= 0.5
    return kernel / kernel.sum()


def denoiser_rows(files: dict[str, Path], operator_path: Path, model: Path) -> list[str]:
    """PSNR and blur effect of one network fed the test LR as measured and denoised three
    ways: a global Wiener filter of the pair, the DCT denoiser with the Wiener gain, and the
    DCT denoiser with power subtraction (the default)."""
    import tifffile
    import torch
    from skimage.measure import blur_effect
    from skimage.metrics import peak_signal_noise_ratio

    from napari_wpp.core.inference import superresolve_slice
    from napari_wpp.core.lr_denoise import denoise_image
    from napari_wpp.core.operator_estimation import _reduce_to_lr
    from napari_wpp.io import load_model, read_operator

    operator = read_operator(operator_path)
    if operator.noise_variance is None:
        return ["the operator carries no LR noise model: estimate it again"]
    net = load_model(model).model
    if getattr(net, "denoise_block", 0):
        net.set_noise_variance(np.zeros((8, 8)))  # every input below is fed as it is
    hr_half = tifffile.imread(files["hr_half"]).astype(np.float64) / 255.0
    lr_half = tifffile.imread(files["lr_half"]).astype(np.float64) / 255.0
    with torch.no_grad():
        fitted = operator(torch.from_numpy(hr_half)).numpy()
    kernel = _global_wiener_kernel(fitted, _reduce_to_lr(lr_half, SCALE, "antialias"))
    lr = tifffile.imread(files["lr_test"]).astype(np.float32) / 255.0
    hr = tifffile.imread(files["hr_test"]).astype(np.float64) / 255.0
    r = kernel.shape[0] // 2
    with torch.no_grad():
        padded = torch.nn.functional.pad(torch.from_numpy(lr)[None, None], (r,) * 4, "replicate")
        wiener = torch.nn.functional.conv2d(padded, torch.from_numpy(kernel).float()[None, None])
    inputs = {
        "as measured": lr,
        "global Wiener filter of the pair": wiener[0, 0].numpy(),
        "DCT blocks, Wiener gain": denoise_image(lr, operator.noise_variance, "wiener"),
        "DCT blocks, power subtraction (default)": denoise_image(lr, operator.noise_variance),
    }
    inner = (slice(CROP, -CROP), slice(CROP, -CROP))
    rows = ["| LR input | PSNR | blur effect |", "|---|---|---|"]
    for name, image in inputs.items():
        out = np.rint(np.clip(superresolve_slice(net, image), 0, 1) * 255) / 255
        psnr = peak_signal_noise_ratio(hr[inner], out[inner], data_range=1.0)
        rows.append(f"| {name} | {psnr:.2f} | {blur_effect(out[inner]):.3f} |")
    return rows


def train_with_snapshots(train_args: list[str], model: Path) -> tuple[dict, list[Path]]:
    """Run ``train`` with a checkpoint every minute and keep a copy of each checkpoint."""
    import shutil
    import time

    command = [sys.executable, "-m", "napari_wpp.cli", *train_args, "--checkpoint-minutes", "1"]
    process = subprocess.Popen(
        [*command, "--json"], stdout=subprocess.PIPE, text=True
    )  # stderr (progress, and the one-line error of a failed run) goes to the terminal
    copies: list[Path] = []
    seen = None
    while True:
        finished = process.poll() is not None
        stamp = model.stat().st_mtime_ns if model.exists() else None
        if stamp is not None and stamp != seen:
            seen = stamp
            name = f"{model.stem}_snapshot{len(copies) + 1:02d}.safetensors"
            copies.append(model.with_name(name))
            shutil.copyfile(model, copies[-1])
        if finished:
            break
        time.sleep(2.0)
    out = process.stdout.read() if process.stdout else ""
    if process.returncode != 0:
        raise SystemExit(f"train failed ({process.returncode})")
    return json.loads(out.strip().splitlines()[-1]), copies


def curve_rows(copies: list[Path], files: dict[str, Path]) -> list[str]:
    """``| seconds | steps | PSNR | SSIM | blur |`` of each model snapshot on the test quadrant."""
    from safetensors import safe_open

    rows = ["| seconds | steps | PSNR | SSIM | blur effect |", "|---|---|---|---|---|"]
    for copy in copies:
        with safe_open(str(copy), "pt") as handle:
            meta = json.loads(handle.metadata()["napari_wpp"])
        pred = copy.with_suffix(".tif")
        _cli("predict", str(copy), str(files["lr_test"]), "--out", str(pred))
        score = _cli("evaluate", str(pred), str(files["hr_test"]), "--crop", str(CROP))
        rows.append(
            f"| {meta['elapsed_s']:.0f} | {meta['step']} | {score['psnr']:.2f} | "
            f"{score['ssim']:.4f} | {score['blur_effect']:.3f} |"
        )
    return rows


def _pair(values: np.ndarray) -> str:
    return f"({values[0]:+.2f}, {values[1]:+.2f})"


def error_band_rows(out: np.ndarray, hr: np.ndarray) -> list[str]:
    """Where the output's error lies in frequency, and how the output correlates with the HR
    scan per radial band (the LR resolves up to 0.25 cycles per HR pixel at ×2)."""
    inner = (slice(CROP, -CROP), slice(CROP, -CROP))
    a, b = out[inner].astype(np.float64), hr[inner].astype(np.float64)
    fa, fb = np.fft.fft2(a - a.mean()), np.fft.fft2(b - b.mean())
    error = np.abs(fa - fb) ** 2
    fy, fx = np.meshgrid(*(np.fft.fftfreq(n) for n in a.shape), indexing="ij")
    square, radial = np.maximum(np.abs(fy), np.abs(fx)), np.hypot(fy, fx)
    share = [
        100 * error[(square >= lo) & (square < hi)].sum() / error.sum()
        for lo, hi in ((0, 0.125), (0.125, 0.25), (0.25, 1))
    ]
    edges = (0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.25)
    correlation = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        band = (radial >= lo) & (radial < hi)
        num = np.real(fa[band] * np.conj(fb[band])).sum()
        den = np.sqrt((np.abs(fa[band]) ** 2).sum() * (np.abs(fb[band]) ** 2).sum())
        correlation.append(f"{lo:g}–{hi:g}: {num / den:.2f}")
    return [
        f"error of the output by frequency (cycles per HR pixel, square bands): below 0.125 "
        f"{share[0]:.0f} %, 0.125–0.25 {share[1]:.0f} %, above 0.25 (beyond the LR's Nyquist "
        f"frequency) {share[2]:.0f} %",
        "correlation of output and HR scan per radial band: " + ", ".join(correlation),
    ]


def diagnostic_rows(files: dict[str, Path], operator_path: Path, pred: Path) -> list[str]:
    """Readouts on the test quadrant that use its HR: registration, re-alignment, smoothing."""
    import tifffile
    import torch
    from scipy.ndimage import gaussian_filter
    from scipy.ndimage import shift as shift_image
    from skimage.measure import blur_effect
    from skimage.metrics import peak_signal_noise_ratio
    from skimage.registration import phase_cross_correlation

    from napari_wpp.io import read_operator

    operator = read_operator(operator_path)
    hr = tifffile.imread(files["hr_test"]).astype(np.float32) / 255.0
    lr = tifffile.imread(files["lr_test"]).astype(np.float32) / 255.0
    out = tifffile.imread(pred)
    out = out.astype(np.float32) / (255.0 if np.issubdtype(out.dtype, np.integer) else 1.0)
    with torch.no_grad():
        f_hr = operator(torch.from_numpy(hr)).numpy()
    m = 10  # LR border left out of the readouts
    lr_shift = phase_cross_correlation(lr[m:-m, m:-m], f_hr[m:-m, m:-m], upsample_factor=20)[0]
    out_shift = phase_cross_correlation(hr, out, upsample_factor=20)[0]
    inner = (slice(CROP, -CROP), slice(CROP, -CROP))

    def score(image: np.ndarray) -> float:
        return peak_signal_noise_ratio(hr[inner], np.clip(image[inner], 0, 1), data_range=1.0)

    realigned = shift_image(out.astype(np.float64), out_shift, order=3, mode="nearest")
    residual = float(np.sqrt(np.mean((f_hr - lr)[m:-m, m:-m] ** 2)))
    return (
        error_band_rows(out, hr)
        + [
            f"f(HR) against the real LR (test quadrant): shift (y, x) = {_pair(lr_shift)} LR px, "
            f"rms {residual:.4f}",
            f"output against the HR scan: shift (y, x) = {_pair(out_shift)} HR px",
            f"PSNR as predicted {score(out):.2f} dB; re-aligned with the HR scan (oracle) "
            f"{score(realigned):.2f} dB",
        ]
        + [
            f"Gaussian blur σ {sigma:g} of the output: PSNR {score(smooth):.2f} dB, blur effect "
            f"{blur_effect(np.clip(smooth[inner], 0, 1)):.3f}"
            for sigma in (0.5, 0.7, 0.85, 1.0)
            for smooth in [np.rint(gaussian_filter(out.astype(np.float64), sigma) * 255) / 255]
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=None, help="also a step budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lam", default=None, help="λ for train --lambda (default: the spec's)")
    parser.add_argument("--crop-size", type=int, default=None, help="train --crop-size")
    parser.add_argument("--work", type=Path, default=None, help="folder for the files")
    parser.add_argument("--diagnose", action="store_true", help="add the readouts that use HR")
    parser.add_argument("--diagnose-only", type=Path, default=None, metavar="PRED")
    parser.add_argument("--curve", action="store_true", help="score a snapshot every minute")
    parser.add_argument(
        "--compare-denoisers", action="store_true", help="the LR input denoised three ways"
    )
    parser.add_argument("--compare-only", type=Path, default=None, metavar="MODEL")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="real_pair_"))
    work.mkdir(parents=True, exist_ok=True)
    files = prepare(work)
    op_path = work / "operator.json"
    if args.diagnose_only is not None:
        if not op_path.exists():
            raise SystemExit(f"{op_path} is missing: run the benchmark with --work {work} first")
        print("\n".join(diagnostic_rows(files, op_path, args.diagnose_only)))
        return
    if args.compare_only is not None:
        if not op_path.exists():
            raise SystemExit(f"{op_path} is missing: run the benchmark with --work {work} first")
        print("\n".join(denoiser_rows(files, op_path, args.compare_only)))
        return
    hr_half, lr_half = str(files["hr_half"]), str(files["lr_half"])
    estimate = _cli("estimate-operator", *_flags(hr=hr_half, lr=lr_half, scale=SCALE, out=op_path))
    print(f"operator: {json.dumps({k: estimate[k] for k in estimate if k != 'kernel'})}")
    model = work / f"wppnet_seed{args.seed}.safetensors"
    options = {
        "lr-data": files["lr_train"],
        "reference": files["reference"],
        "operator": op_path,
        "minutes": f"{args.minutes:g}",
        "seed": args.seed,
        "out": model,
        "steps": args.steps,
        "lambda": args.lam,
        "crop-size": args.crop_size,
    }
    train_args = ["train", *_flags(**options), "--overwrite"]
    snapshots: list[Path] = []
    if args.curve:
        trained, snapshots = train_with_snapshots(train_args, model)
    else:
        trained = _cli(*train_args)
    print(f"train: {json.dumps(trained)}")
    pred = work / f"pred_seed{args.seed}.tif"
    _cli("predict", str(model), str(files["lr_test"]), "--out", str(pred))
    net = _cli("evaluate", str(pred), str(files["hr_test"]), "--crop", str(CROP))
    bicubic = bicubic_row(files, estimate, work)
    hr_self = _cli("evaluate", str(files["hr_test"]), str(files["hr_test"]), "--crop", str(CROP))
    print("\n| method | PSNR | SSIM | blur effect |\n|---|---|---|---|")
    print(
        f"| bicubic, contrast-corrected | {bicubic['psnr']:.2f} | {bicubic['ssim']:.4f} | "
        f"{bicubic['blur_effect']:.3f} |"
    )
    label = (
        f"WPPNet, {args.minutes:g} min ({trained['steps']} steps), seed {args.seed}, "
        f"λ = {trained['lambda']:.4g}" + (f", crops {args.crop_size}²" if args.crop_size else "")
    )
    print(f"| {label} | {net['psnr']:.2f} | {net['ssim']:.4f} | {net['blur_effect']:.3f} |")
    raw = raw_input_row(model, files, work)
    if raw is not None:
        print(
            f"| the same model, LR input not denoised | {raw['psnr']:.2f} | {raw['ssim']:.4f} | "
            f"{raw['blur_effect']:.3f} |"
        )
    print(f"| (HR scan itself) | | | {hr_self['blur_effect']:.3f} |")
    if snapshots:
        print("\nalong the run (one snapshot a minute):")
        print("\n".join(curve_rows(snapshots, files)))
    if args.diagnose:
        print("\nreadouts that use the test HR:")
        print("\n".join(diagnostic_rows(files, op_path, pred)))
    if args.compare_denoisers:
        print("\nthe same network, its LR input denoised three ways:")
        print("\n".join(denoiser_rows(files, op_path, model)))


if __name__ == "__main__":
    main()
