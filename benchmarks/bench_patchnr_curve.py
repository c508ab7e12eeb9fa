"""PatchNR's quality against minutes on this machine: several budgets of ``bench_patchnr.py``.

Each point is one run of ``bench_patchnr.py`` (prior training, then the reconstruction of
``lr_SiC_x4.png``, scored against hr_SiC with a 40-pixel border cropped) with a budget of
``--points`` (``MINUTES:ITERATIONS``: prior training minutes and reconstruction iterations;
default ``1:40,3:80,6:120``). The script prints a table of PSNR, SSIM and blur effect against
the measured minutes (training + reconstruction) and draws PSNR and blur effect against them
with matplotlib (``--plot PNG``, default ``docs/images/patchnr_quality_minutes.png``).

    python benchmarks/bench_patchnr_curve.py                 # about 17 minutes on 2 CPU cores
    python benchmarks/bench_patchnr_curve.py --points 0.1:3  # smoke test

Run it on a quiet machine: every budget is wall-clock minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def point(minutes: float, iterations: int, seed: str) -> dict:
    """One run of ``bench_patchnr.py`` with this budget; its JSON figures."""
    done = subprocess.run(
        [sys.executable, str(HERE / "bench_patchnr.py"), "--train-minutes", str(minutes),
         "--iterations", str(iterations), "--seed", seed, "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"bench_patchnr.py failed: {done.stderr.strip()[-2000:]}")
    print(done.stdout.strip().rsplit("\n", 1)[0], flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["train_minutes"] + r["reconstruct_minutes"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2), constrained_layout=True)
    left.plot(minutes, [r["psnr"] for r in rows], "o-")
    left.axhline(28.0, color="grey", ls="--", lw=1, label="bar 28.0 dB")
    left.set(xlabel="minutes (prior + reconstruction), 2 CPU cores", ylabel="PSNR (dB)")
    left.legend()
    right.plot(minutes, [r["blur_effect"] for r in rows], "o-", color="tab:orange")
    right.axhline(0.39, color="grey", ls="--", lw=1, label="bar 0.39")
    right.set(xlabel="minutes (prior + reconstruction), 2 CPU cores", ylabel="blur effect")
    right.legend()
    fig.suptitle("PatchNR on SiC ×4 (lr_SiC_x4 against hr_SiC)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", default="1:40,3:80,6:120", help="MINUTES:ITERATIONS,...")
    parser.add_argument("--seed", default="0")
    parser.add_argument(
        "--plot", type=Path, default=HERE.parent / "docs" / "images" / "patchnr_quality_minutes.png"
    )
    args = parser.parse_args()
    budgets = []
    for item in args.points.split(","):
        minutes, iterations = item.split(":")
        budgets.append((float(minutes), int(iterations)))
    rows = []
    for minutes, iterations in budgets:
        row = point(minutes, iterations, args.seed)
        rows.append({"budget_minutes": minutes, **row})
    print("\n| prior minutes | steps | iterations | total minutes | PSNR | SSIM | blur |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        total = r["train_minutes"] + r["reconstruct_minutes"]
        print(
            f"| {r['budget_minutes']:g} | {r['steps']} | {r['iterations']} | {total:.1f} | "
            f"{r['psnr']:.2f} | {r['ssim']:.4f} | {r['blur_effect']:.3f} |"
        )
    plot(rows, args.plot)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
