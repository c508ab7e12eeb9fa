"""Test-set benchmark: mean ± std PSNR / SSIM / blur effect over many real SiC slices.

Run ``python benchmarks/bench_test_set.py --model sic15.safetensors`` (``--help`` for options).
Every step is the command line's, run in this process:

1. the first ``--slices`` slices of ``sic_stack_hr.tif`` (../shared/data/sic) are degraded with
   the published SiC ×4 operator (Gaussian σ = 2, 16 × 16 kernel, corner anchoring, circular
   padding) plus N(0, 0.01²) noise (``napari-wpp degrade``, seed 0, 8-bit like the papers' LR);
2. with ``--train-minutes M`` a WPPNet is first trained by the README command
   (``train_lr_SiC_x4.tif``, ``ref_SiC.png``, seed 0; ``--steps`` caps it for smoke tests);
3. the model superresolves the LR stack (``napari-wpp predict``), and with ``--wpp-minutes``
   or ``--wpp-iterations`` variational WPP reconstructs every slice (``napari-wpp
   reconstruct --slice i``: 100 slices × 10 minutes is 17 CPU hours); with ``--prior P``
   variational PatchNR does the same with the prior ``P`` (``--prior-iterations``, default
   150 as in ``bench_patchnr.py``);
4. ``napari-wpp evaluate PRED HR --json`` gives the per-slice figures (40-pixel border
   cropped) and their mean ± std.

The published 100-slice averages (WPPNet paper): WPPNet 28.00 dB, WPP 27.73 dB.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from shared_data import DATA_ROOT

from napari_wpp.cli import main as napari_wpp

SIC = DATA_ROOT / "sic"
#: The published SiC ×4 operator and noise, as command-line flags.
OPERATOR = ["--scale", "4", "--sigma", "2", "--kernel-size", "16", "--anchor", "corner"]
OPERATOR += ["--padding", "circular"]


def run(*argv: object) -> dict:
    """``napari-wpp argv… --json`` in this process; its JSON output (exit on failure)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = napari_wpp([str(a) for a in argv] + ["--json"])
    if code != 0:
        raise SystemExit(f"napari-wpp {argv[0]} failed with exit code {code}")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_set(work: Path, slices: int) -> tuple[Path, Path]:
    """HR stack of the first ``slices`` slices and its degraded LR stack (uint8 TIFFs)."""
    source = SIC / "sic_stack_hr.tif"
    if not source.is_file():
        raise SystemExit(f"{source} not found (see ../shared/data/README.md)")
    hr = tifffile.imread(source)[:slices]
    hr_path, lr_path = work / "hr.tif", work / "lr.tif"
    tifffile.imwrite(hr_path, hr)
    run("degrade", hr_path, "--out", lr_path, *OPERATOR, "--noise", "0.01", "--seed", "0")
    return hr_path, lr_path


def train(work: Path, minutes: float, steps: int | None) -> Path:
    """The README's WPPNet training run (SiC ×4), with ``minutes`` of budget."""
    model = work / "wppnet.safetensors"
    budget = ["--minutes", str(minutes)] + ([] if steps is None else ["--steps", str(steps)])
    run(
        "train", "--lr-data", SIC / "train_lr_SiC_x4.tif", "--reference", SIC / "ref_SiC.png",
        *OPERATOR, *budget, "--seed", "0", "--out", model,
    )  # fmt: skip
    return model


def reconstruct_stack(
    work: Path, lr_path: Path, slices: int, name: str, prior: list[str], budget: list[str]
) -> Path:
    """Variational reconstruction of every LR slice with ``prior`` (its flags), stacked."""
    planes = []
    for i in range(slices):
        out = work / f"{name}_{i:03d}.tif"
        run(
            "reconstruct", "--lr", lr_path, *(["--slice", i] if slices > 1 else []), *prior,
            *OPERATOR, *budget, "--seed", "0", "--out", out,
        )  # fmt: skip
        planes.append(tifffile.imread(out))
        print(f"{name}: slice {i + 1}/{slices} reconstructed", file=sys.stderr, flush=True)
    path = work / f"{name}.tif"
    tifffile.imwrite(path, np.stack(planes))
    return path


def budget_flags(minutes: float | None, iterations: int | None) -> list[str]:
    """``--minutes`` and ``--iterations`` as given."""
    return (["--minutes", str(minutes)] if minutes else []) + (
        ["--iterations", str(iterations)] if iterations else []
    )


def summary(name: str, figures: dict) -> dict:
    test = figures["test_set"]
    line = (
        f"{name:8s} {test['slices']} slices: PSNR {test['psnr_mean']:.2f} ± "
        f"{test['psnr_std']:.2f} dB, SSIM {test['ssim_mean']:.4f} ± {test['ssim_std']:.4f}, "
        f"blur {test['blur_effect_mean']:.4f} ± {test['blur_effect_std']:.4f}"
    )
    print(line, file=sys.stderr)
    return {"method": name, **test}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="trained WPPNet (.safetensors) to evaluate")
    parser.add_argument("--train-minutes", type=float, help="train the README WPPNet first")
    parser.add_argument("--steps", type=int, help="step cap of --train-minutes (smoke tests)")
    parser.add_argument("--slices", type=int, default=100, help="test slices (default 100)")
    parser.add_argument("--wpp-minutes", type=float, help="also variational WPP, per slice")
    parser.add_argument("--wpp-iterations", type=int, help="also variational WPP, per slice")
    parser.add_argument("--prior", help="also variational PatchNR with this prior, per slice")
    parser.add_argument("--prior-iterations", type=int, default=150, help="(default 150)")
    parser.add_argument("--work", help="folder for the stacks (default: a temporary one)")
    args = parser.parse_args()
    if (
        args.model is None
        and args.train_minutes is None
        and not (args.wpp_minutes or args.wpp_iterations or args.prior)
    ):
        parser.error("give --model, --train-minutes, --wpp-minutes/--wpp-iterations or --prior")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        hr_path, lr_path = test_set(work, args.slices)
        slices = int(tifffile.imread(hr_path).shape[0])
        results = []
        model = Path(args.model) if args.model else None
        if args.train_minutes is not None:
            model = train(work, args.train_minutes, args.steps)
        if model is not None:
            pred = work / "wppnet.tif"
            run("predict", model, lr_path, "--out", pred)
            results.append(summary("wppnet", run("evaluate", pred, hr_path)))
        if args.wpp_minutes or args.wpp_iterations:
            budget = budget_flags(args.wpp_minutes, args.wpp_iterations)
            reference = ["--reference", SIC / "ref_SiC.png"]
            pred = reconstruct_stack(work, lr_path, slices, "wpp", reference, budget)
            results.append(summary("wpp", run("evaluate", pred, hr_path)))
        if args.prior:
            budget = budget_flags(None, args.prior_iterations)
            pred = reconstruct_stack(
                work, lr_path, slices, "patchnr", ["--prior", args.prior], budget
            )
            results.append(summary("patchnr", run("evaluate", pred, hr_path)))
    print(json.dumps({"slices": slices, "results": results}))


if __name__ == "__main__":
    main()
