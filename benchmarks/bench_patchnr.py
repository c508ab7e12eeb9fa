"""PatchNR on SiC ×4: train the prior, reconstruct ``lr_SiC_x4.png``, score it against hr_SiC.

The whole pipeline runs through the command line, as a user would (files in
``../shared/data/sic/`` or ``$NAPARI_WPP_DATA/sic``; the published corner operator σ = 2,
kernel 16, circular padding):

    napari-wpp train --model patchnr --reference ref_SiC.png --minutes T --out prior.safetensors
    napari-wpp reconstruct --lr lr_SiC_x4.png --prior prior.safetensors --scale 4 --sigma 2 \\
        --kernel-size 16 --anchor corner --padding circular --iterations N --out sr.tif
    napari-wpp evaluate sr.tif hr_SiC.png --json          # 40-pixel border cropped

and prints PSNR / SSIM / blur effect with the minutes spent (prior training + reconstruction,
wall clock of each command). ``--zero-shot`` trains on ``lr_SiC_x4.png`` itself (8 rotations and
flips) instead of the reference. Spec defaults are used where no flag is given here; the
budget this script states is the one to quote.

    python benchmarks/bench_patchnr.py                       # reference prior, the stated budget
    python benchmarks/bench_patchnr.py --zero-shot
    python benchmarks/bench_patchnr.py --train-minutes 0.2 --iterations 5   # smoke test

Bars (issue 15, 2 CPU cores): ≥ 28.0 dB and blur ≤ 0.39 within 60 minutes in all (aim: ≤ 25);
zero-shot ≥ 27.3 dB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared_data import DATA_ROOT

DATA = DATA_ROOT / "sic"
OPERATOR = (
    "--scale", "4", "--sigma", "2", "--kernel-size", "16", "--anchor", "corner",
    "--padding", "circular",
)  # fmt: skip
#: The stated budget (tuned on 2 shared CPU cores, docs/benchmarks.md): prior training
#: minutes, reconstruction iterations and the reconstruction flags beyond the spec's defaults.
BUDGET = {"train_minutes": 10.0, "iterations": 150, "reconstruct": ()}
#: Zero-shot: the published zero-shot schedule (λ_sum 0.25 on 150² LR pixels, 60 Adam steps of
#: 0.01) on a prior trained on as many patches as the published one (10,000 steps of 128 =
#: 5,000 of our 256), within 5 minutes. A 150² LR image has only 21,000 patches: trained for
#: 5 quiet minutes (18,000 steps) the prior overfits them and the result drops to 27.15 dB.
ZERO_SHOT_BUDGET = {
    "train_minutes": 5.0,
    "train_steps": 5000,
    "iterations": 60,
    "reconstruct": ("--patchnr-lambda", "1.1e-5", "--patchnr-step", "0.01"),
}


def _run(argv: list[str]) -> tuple[float, dict]:
    """Run ``napari-wpp argv --json``; the wall-clock seconds and the JSON report."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "napari_wpp.cli", *argv, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"napari-wpp {argv[0]} failed ({done.returncode}): {done.stderr.strip()}")
    return seconds, json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zero-shot", action="store_true", help="train on lr_SiC_x4 itself")
    parser.add_argument("--train-minutes", type=float, help="default: the stated budget")
    parser.add_argument("--train-steps", type=int, help="step cap (default: the stated budget)")
    parser.add_argument("--iterations", type=int, help="default: the stated budget")
    parser.add_argument("--hidden", type=int, help="hidden width (default: the spec's)")
    parser.add_argument("--patchnr-lambda", help="λ of the prior (default: the spec's)")
    parser.add_argument("--patchnr-patches", help="patches per iteration (default: the spec's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", default="0")
    parser.add_argument("--keep", metavar="DIR", help="keep the prior and the result here")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    budget = ZERO_SHOT_BUDGET if args.zero_shot else BUDGET
    train_minutes = args.train_minutes or budget["train_minutes"]
    train_steps = args.train_steps or budget.get("train_steps")
    iterations = args.iterations or budget["iterations"]

    lr, ref, hr = DATA / "lr_SiC_x4.png", DATA / "ref_SiC.png", DATA / "hr_SiC.png"
    for path in (lr, ref, hr):
        if not path.exists():
            sys.exit(f"{path} is missing: set NAPARI_WPP_DATA to the shared data folder")
    threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count())
    folder = Path(args.keep or tempfile.mkdtemp(prefix="bench_patchnr_"))
    folder.mkdir(parents=True, exist_ok=True)
    prior, sr = folder / "prior.safetensors", folder / "sr.tif"

    source = ["--lr-data", str(lr), *OPERATOR] if args.zero_shot else ["--reference", str(ref)]
    train = ["train", "--model", "patchnr", *source, "--minutes", str(train_minutes)]
    train += ["--device", args.device, "--seed", args.seed, "--out", str(prior), "--overwrite"]
    if train_steps:
        train += ["--steps", str(train_steps)]
    if args.hidden:
        train += ["--hidden", str(args.hidden)]
    train_s, trained = _run(train)
    reconstruct = ["reconstruct", "--lr", str(lr), "--prior", str(prior), *OPERATOR]
    reconstruct += ["--iterations", str(iterations), "--device", args.device]
    reconstruct += list(budget["reconstruct"])
    reconstruct += ["--seed", args.seed, "--out", str(sr)]
    if args.patchnr_lambda:
        reconstruct += ["--patchnr-lambda", args.patchnr_lambda]
    if args.patchnr_patches:
        reconstruct += ["--patchnr-patches", args.patchnr_patches]
    reco_s, reconstructed = _run(reconstruct)
    _, metrics = _run(["evaluate", str(sr), str(hr)])

    mode = "zero-shot (lr_SiC_x4)" if args.zero_shot else "reference (ref_SiC)"
    print(f"PatchNR {mode}, {args.device}, {threads} threads")
    print(
        f"  prior: {trained['steps']} steps, hidden {trained['hidden']}, held-out NLL "
        f"{trained['heldout_nll']:.2f}, {train_s / 60:.1f} min"
    )
    print(
        f"  reconstruction: {reconstructed['iterations']} iterations, λ "
        f"{reconstructed['lambda']:.3g}, {reco_s / 60:.1f} min"
    )
    print(
        f"  PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.4f}  blur "
        f"{metrics['blur_effect']:.4f}  (crop 40)   total {(train_s + reco_s) / 60:.1f} min"
    )
    if args.json:
        figures = {
            "train_minutes": train_s / 60,
            "reconstruct_minutes": reco_s / 60,
            "steps": trained["steps"],
            "iterations": reconstructed["iterations"],
            **{name: metrics[name] for name in ("psnr", "ssim", "blur_effect")},
        }
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
