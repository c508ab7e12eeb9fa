"""α curves of the Gaussian patch transport on SiC ×4 (perception ↔ fidelity), beside a blur.

Run ``python benchmarks/bench_transport_alpha.py --model MODEL.safetensors`` (a WPPNet ×4
trained on SiC, e.g. the README's 15-minute command), or without ``--model`` to train one for
``--train-minutes`` (default 3) on ``train_lr_SiC_x4.tif`` first. ``--flow-model`` adds the
posterior mean of a WPPFlow ×4. For each input (bicubic upsampling of ``lr_SiC_x4.png`` in
register with the published corner operator, the WPPNet output, the WPPFlow mean) it prints,
for α from −0.5 to 1.5 (α = 1 unchanged, α = 0 fully transported; source statistics = the
input's own 6×6 patches, target = all patches of ``ref_SiC.png``, floor 1e-4):

* PSNR and blur effect against ``hr_SiC.png`` (40-pixel border cropped),
* data rms: rms of f(x) − y with the corner operator (σ = 2, kernel 16) against the LR image,
  beside its noise level 0.0101 (README of the data),
* the Gelbrich patch distance to the reference beside the reference's own band;

then the same input blurred by a Gaussian of σ 0.25…1 (the plain-blur baseline), the default
α (where the distance meets the middle of the band) with and without data-consistency steps
stopped at the noise level, and whether the bars of issue 16 hold.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from shared_data import DATA_ROOT

from napari_wpp.core.metrics import blur_effect, psnr
from napari_wpp.core.operators import GaussianDownsampling, upsample_aligned
from napari_wpp.core.patch_distance import (
    blend_distances,
    data_rms,
    default_alpha,
    gelbrich_distance,
    reference_band,
)
from napari_wpp.core.transport import GaussianTransport, blend, data_consistency, patch_statistics

SIC = DATA_ROOT / "sic"
NOISE = 0.0101  # the known residual std of lr_SiC_x4 (../shared/data/README.md)
ALPHAS = (-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
BLURS = (0.25, 0.5, 0.75, 1.0)
PATCH = 6


def load(name: str) -> np.ndarray:
    return np.asarray(Image.open(SIC / name), dtype=np.float32) / 255.0


def operator() -> GaussianDownsampling:
    return GaussianDownsampling(4, 2.0, 16, anchor="corner", padding="circular")


def superresolve(model_path: Path, lr_path: Path, flow: bool) -> np.ndarray:
    """``napari-wpp predict`` of the LR image ([0, 1] float32)."""
    import tifffile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pred.tif"
        cmd = [sys.executable, "-m", "napari_wpp.cli", "predict", str(model_path)]
        cmd += [str(lr_path), "--out", str(out), "--device", "cpu"]
        if flow:
            cmd += ["--samples", "16"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return tifffile.imread(out).astype(np.float32) / 255.0


def train(minutes: float, out: Path) -> None:
    cmd = [sys.executable, "-m", "napari_wpp.cli", "train", "--lr-data"]
    cmd += [str(SIC / "train_lr_SiC_x4.tif"), "--reference", str(SIC / "ref_SiC.png")]
    cmd += ["--scale", "4", "--sigma", "2", "--anchor", "corner", "--out", str(out)]
    cmd += ["--minutes", str(minutes), "--device", "cpu"]
    print(f"training a WPPNet for {minutes} minutes: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def row(label: str, x: np.ndarray, hr, lr, op, target) -> dict[str, float]:
    figures = {
        "psnr": psnr(np.clip(x, 0, 1), hr),
        "blur": blur_effect(np.clip(x, 0, 1)),
        "rms": data_rms(x, lr, op),
        "dist": gelbrich_distance(patch_statistics(x, PATCH), target),
    }
    print(
        f"  {label:<22} PSNR {figures['psnr']:6.2f}  blur {figures['blur']:.3f}  "
        f"data rms {figures['rms']:.4f} ({figures['rms'] / NOISE:4.2f}× noise)  "
        f"patch distance {figures['dist']:.4f}",
        flush=True,
    )
    return figures


def curve(name: str, x: np.ndarray, hr, lr, op, ref_stats, band) -> dict[str, object]:
    print(f"\n{name}")
    start = time.perf_counter()
    transport = GaussianTransport.fit(patch_statistics(x, PATCH), ref_stats)
    moved = transport.apply(x)
    print(
        f"  (‖T − I‖ = {transport.distance_from_identity():.2f}, fit and apply "
        f"{time.perf_counter() - start:.1f} s)"
    )
    rows = {a: row(f"α = {a:+.2f}", blend(x, moved, a), hr, lr, op, ref_stats) for a in ALPHAS}
    for sigma in BLURS:
        row(f"Gaussian blur σ {sigma:g}", gaussian_filter(x, sigma), hr, lr, op, ref_stats)
    grid = np.linspace(0.0, 1.0, 41)
    alpha = default_alpha(grid, blend_distances(x, moved, ref_stats, grid), band.middle)
    chosen = blend(x, moved, alpha)
    auto = row(f"default α = {alpha:.3f}", chosen, hr, lr, op, ref_stats)
    fitted = data_consistency(chosen, lr, op, steps=10, noise=NOISE)
    row("  + data steps", fitted, hr, lr, op, ref_stats)
    in_01 = [a for a in ALPHAS if 0.0 <= a <= 1.0]
    rms = [rows[a]["rms"] for a in in_01]
    diffs = np.diff(rms)
    monotone = bool(np.all(diffs <= 1e-6) or np.all(diffs >= -1e-6))
    return {"rows": rows, "alpha": alpha, "auto": auto, "monotone": monotone}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="WPPNet ×4 model file (else one is trained)")
    parser.add_argument("--flow-model", type=Path, help="WPPFlow ×4 model file (optional)")
    parser.add_argument("--train-minutes", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (SIC / "hr_SiC.png").is_file():
        raise SystemExit(f"{SIC} not found (see ../shared/data/README.md)")
    hr, lr, ref = load("hr_SiC.png"), load("lr_SiC_x4.png"), load("ref_SiC.png")
    op = operator()
    ref_stats = patch_statistics(ref, PATCH)
    band = reference_band(ref, PATCH)
    summary = band.to_dict()["gelbrich"]
    print(
        f"reference band (2×2 crops of ref_SiC): {summary['low']:.4f}–{summary['high']:.4f}, "
        f"middle {summary['middle']:.4f}; hr_SiC's own distance "
        f"{gelbrich_distance(patch_statistics(hr, PATCH), ref_stats):.4f}; hr_SiC's data rms "
        f"{data_rms(hr, lr, op):.4f}"
    )
    inputs = {}
    with torch.no_grad():
        inputs["bicubic"] = upsample_aligned(torch.from_numpy(lr), op).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = Path(tmp) / "wppnet.safetensors"
            train(args.train_minutes, model)
        inputs[f"WPPNet ({model.name})"] = superresolve(model, SIC / "lr_SiC_x4.png", False)
        if args.flow_model is not None:
            inputs["WPPFlow mean of 16"] = superresolve(
                args.flow_model, SIC / "lr_SiC_x4.png", True
            )
    results = {name: curve(name, x, hr, lr, op, ref_stats, band) for name, x in inputs.items()}
    print("\nbars")
    for name, r in results.items():
        print(f"  {name}: data rms monotone in α on [0, 1]: {r['monotone']}")
    bic = results["bicubic"]["rows"]
    print(
        f"  bicubic: α = 0 beats α = 1 in PSNR ({bic[0.0]['psnr']:.2f} vs {bic[1.0]['psnr']:.2f}):"
        f" {bic[0.0]['psnr'] > bic[1.0]['psnr']}; in blur ({bic[0.0]['blur']:.3f} vs "
        f"{bic[1.0]['blur']:.3f}): {bic[0.0]['blur'] < bic[1.0]['blur']}"
    )
    for name, r in results.items():
        if name.startswith("WPP"):
            ratio = r["auto"]["rms"] / NOISE
            print(
                f"  {name}: default α {r['alpha']:.3f} keeps data rms ≤ 1.2× noise: "
                f"{ratio <= 1.2} ({ratio:.2f}×; at α = 1 {r['rows'][1.0]['rms'] / NOISE:.2f}×)"
            )


if __name__ == "__main__":
    main()
