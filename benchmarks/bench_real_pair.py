"""WPPNet on a real registered scan pair (Fontainebleau sandstone, ×2), through the CLI.

The protocol of docs/benchmarks.md ("A real registered scan pair"), on
``../shared/data/fs_registered_pair`` (HR 1652², LR registered onto the HR grid):

1. ``estimate-operator`` on the left half of the pair (HR 1652 × 826 and the LR on its grid);
2. the LR reduced to its own 826² grid (the published anti-aliased reduction), 8-bit;
3. ``train`` a WPPNet on the top-right LR quadrant (413²) with the HR top-left quadrant (826²)
   as reference, ``--minutes M``, defaults otherwise (``--lam`` overrides λ);
4. ``predict`` the held-out bottom-right LR quadrant and ``evaluate`` it against the real HR
   bottom-right quadrant (826², 40-px border cropped); the bicubic of the LR, corrected with
   the estimated kernel sum and bias, and the HR scan's own blur effect are printed beside it.

Run: ``python benchmarks/bench_real_pair.py --minutes 5 [--seed 0] [--lam auto|0.02]
[--work DIR]`` (the files go to DIR, default a temporary folder).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=None, help="also a step budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lam", default=None, help="λ for train --lambda (default: the spec's)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the files")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="real_pair_"))
    work.mkdir(parents=True, exist_ok=True)
    files = prepare(work)
    op_path = work / "operator.json"
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
    }
    train_args = ["train", *_flags(**options), "--overwrite"]
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
        f"λ = {trained['lambda']:.4g}"
    )
    print(f"| {label} | {net['psnr']:.2f} | {net['ssim']:.4f} | {net['blur_effect']:.3f} |")
    print(f"| (HR scan itself) | | | {hr_self['blur_effect']:.3f} |")


if __name__ == "__main__":
    main()
