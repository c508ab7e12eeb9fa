"""The sliced patch distance against the exact W₂² prior: quality at equal minutes, step cost.

Three measurements, each run in its own subprocess:

* ``--minutes 5,15`` (default): the README's SiC ×4 WPPNet command (``train_lr_SiC_x4.tif``,
  ``ref_SiC.png``, corner operator σ = 2, kernel 16, circular; the device's defaults, seed 0)
  trained once per patch distance (``--distances exact,sliced``) and budget, then
  ``lr_SiC_x4.png`` superresolved and scored against ``hr_SiC.png`` (40-pixel border, as
  ``napari-wpp evaluate``): PSNR, SSIM, blur effect, steps, seconds per step, and the rms of
  f(x) − y on the test LR image (noise 0.0101).
* ``--step-cost``: seconds per call of the prior alone on real patches (the device's number of
  generated patches from a bicubic ``lr_SiC_x4`` upsampling against its reference patches,
  ψ warmed up first for the exact prior): the exact ``loss_and_ascend`` with the device's ψ
  passes, and the sliced loss for several numbers of projections, each with its backward.
  ``--device cuda`` measures it on the GPU.
* ``--variational 150``: the variational reconstruction (defaults: two levels, 25,000
  patches per iteration and level) of a 256² crop of ``hr_SiC.png`` degraded by the centred
  ×4 Gaussian (σ 2) plus noise 0.01, against ``ref_SiC.png``, with each distance for the same
  number of iterations: PSNR, blur, data rms and seconds per iteration (a per-step quality
  comparison that a loaded machine's speed does not change).
* ``--flow-probe``: WPPFlow training (same data) with the exact prior, the sliced prior, and
  the exact prior plus ``--flow-weight`` times the sliced one, jointly trained
  (``--mean-warmup``, default 0: the setting the mean warm-up was introduced to stabilise)
  for ``--minutes``; prints the PSNR of the mode (temperature 0) and of the mean of 8
  samples, the samples' mean std and whether the run diverged.

    python benchmarks/bench_sliced_prior.py --minutes 5,15
    python benchmarks/bench_sliced_prior.py --step-cost [--device cuda]
    python benchmarks/bench_sliced_prior.py --variational 150 --no-train
    python benchmarks/bench_sliced_prior.py --flow-probe --minutes 2
    python benchmarks/bench_sliced_prior.py --minutes 0.2 --step-cost   # smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch
from shared_data import DATA_ROOT

DATA = DATA_ROOT / "sic"
#: Noise std of lr_SiC_x4.png (data/README.md).
NOISE = 0.0101


def load_sic() -> tuple[np.ndarray, np.ndarray, object]:
    """Training crops, reference and the published ×4 operator."""
    import imageio.v3 as iio
    import tifffile

    from napari_wpp.core.operators import GaussianDownsampling

    operator = GaussianDownsampling(4, 2.0, kernel_size=16, anchor="corner", padding="circular")
    lr = tifffile.imread(DATA / "train_lr_SiC_x4.tif").astype(np.float32) / 255
    ref = iio.imread(DATA / "ref_SiC.png").astype(np.float32) / 255
    return lr, ref, operator


def test_pair() -> tuple[np.ndarray, np.ndarray]:
    import imageio.v3 as iio

    lr = iio.imread(DATA / "lr_SiC_x4.png").astype(np.float32) / 255
    truth = iio.imread(DATA / "hr_SiC.png").astype(np.float32) / 255
    return lr, truth


def scores(pred: np.ndarray, lr: np.ndarray, truth: np.ndarray, operator) -> dict[str, float]:
    """PSNR, SSIM, blur (40-pixel border) and the data rms of ``pred``."""
    from napari_wpp.core.metrics import evaluate
    from napari_wpp.core.patch_distance import data_rms

    out = evaluate(np.clip(pred, 0, 1), truth, crop=40)
    out["data_rms"] = data_rms(np.ascontiguousarray(pred), lr, operator)  # no padded border
    return out


# --------------------------------------------------------------------------- children


def train_child(distance: str, minutes: float, device: str, seed: int) -> dict:
    """The README's WPPNet run with one patch distance; scores on the test slice."""
    from napari_wpp.core.inference import run_superresolve
    from napari_wpp.core.training import TrainingConfig, run_training

    lr, ref, operator = load_sic()
    config = TrainingConfig(minutes=minutes, seed=seed, device=device, patch_distance=distance)
    state = run_training(lr, ref, operator, config).state
    test_lr, truth = test_pair()
    pred = run_superresolve(state.model, test_lr, device=device)
    out = scores(pred, test_lr, truth, operator)
    out.update(steps=state.step, s_per_step=state.elapsed_s / max(1, state.step))
    return out


class ExactPlusSliced:
    """The exact prior plus ``weight`` times the sliced one (a probe, not a product feature)."""

    def __init__(self, exact, sliced, weight: float) -> None:
        self.exact, self.sliced, self.weight = exact, sliced, weight

    def loss_and_ascend(self, patches, passes=1, should_stop=None):
        exact = self.exact.loss_and_ascend(patches, passes, should_stop)
        return exact + self.weight * self.sliced.loss(patches)

    def state_dict(self):
        return {**self.exact.state_dict(), **self.sliced.state_dict()}

    def load_state_dict(self, state):
        self.exact.load_state_dict(state)
        self.sliced.load_state_dict(state)


def flow_child(variant: str, minutes: float, device: str, seed: int, warmup: float) -> dict:
    """A WPPFlow run with the prior ``variant`` (exact, sliced or exact+sliced:W)."""
    from napari_wpp.core.errors import DivergenceError
    from napari_wpp.core.inference import run_sample
    from napari_wpp.core.semidual import SlicedPatchPrior, WassersteinPatchPrior
    from napari_wpp.core.training import TrainingConfig, TrainingFinished, train
    from napari_wpp.core.training import setup as training_setup

    distance = "sliced" if variant == "sliced" else "exact"
    if variant.startswith("exact+sliced:"):
        weight = float(variant.split(":")[1])
        build = training_setup.build_patch_prior

        def combined(name, patches, projections=64, seed=0, reduce_sum=None, **options):
            exact = build("exact", patches, reduce_sum=reduce_sum, **options)
            assert isinstance(exact, WassersteinPatchPrior)
            sliced = SlicedPatchPrior(patches, n_projections=projections, seed=seed)
            return ExactPlusSliced(exact, sliced, weight)

        training_setup.build_patch_prior = combined
    lr, ref, operator = load_sic()
    config = TrainingConfig(
        model="wppflow",
        minutes=minutes,
        seed=seed,
        device=device,
        patch_distance=distance,
        mean_warmup=warmup,
    )
    state, history, diverged = None, [], ""
    try:
        for event in train(lr, ref, operator, config):
            if isinstance(event, TrainingFinished):
                state = event.state
    except DivergenceError as exc:
        diverged = str(exc)[:80]
    if state is None:
        return {"diverged": diverged or "no state"}
    history = state.history
    test_lr, truth = test_pair()
    mode = run_sample(state.model, test_lr, 1, temperature=0.0, device=device).mean
    result = run_sample(state.model, test_lr, 8, seed=1, device=device)
    out = {f"mode_{k}": v for k, v in scores(mode, test_lr, truth, operator).items()}
    out.update({f"mean_{k}": v for k, v in scores(result.mean, test_lr, truth, operator).items()})
    tail = history[-20:]
    out.update(
        steps=state.step,
        s_per_step=state.elapsed_s / max(1, state.step),
        std=float(result.std[40:-40, 40:-40].mean()),
        wpp_term=float(np.mean([h["wpp_term"] for h in tail])),
        negative_wpp_steps=sum(h["wpp_term"] < 0 for h in history),
        diverged=diverged,
    )
    return out


def variational_child(distance: str, iterations: int, device: str, seed: int) -> dict:
    """Variational WPP of a degraded 256² SiC crop with one patch distance."""
    import imageio.v3 as iio

    from napari_wpp.core.operators import GaussianDownsampling, add_noise
    from napari_wpp.core.reconstruct import VariationalConfig, run_reconstruction

    truth = iio.imread(DATA / "hr_SiC.png").astype(np.float32)[100:356, 100:356] / 255
    ref = iio.imread(DATA / "ref_SiC.png").astype(np.float32) / 255
    operator = GaussianDownsampling(4, 2.0)
    lr = add_noise(operator(torch.from_numpy(truth)), 0.01, seed=seed).numpy()
    config = VariationalConfig(
        iterations=iterations, patch_distance=distance, seed=seed, device=device
    )
    result = run_reconstruction(lr, ref, operator, config)
    out = scores(result.image, lr, truth, operator)
    out.update(s_per_iteration=result.elapsed_s / max(1, result.iterations))
    return out


def _timed(function, repeats: int, device: torch.device) -> float:
    """Median seconds of ``function()`` over ``repeats`` calls (after one warm-up call)."""
    function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def step_cost_child(device_name: str, repeats: int) -> dict:
    """Seconds per prior call (loss and its backward) on real SiC patches."""
    from napari_wpp.core.operators import upsample_aligned
    from napari_wpp.core.patches import strided_patches
    from napari_wpp.core.semidual import SlicedPatchPrior, WassersteinPatchPrior
    from napari_wpp.core.training import TrainingConfig
    from napari_wpp.core.training.data import reference_patches

    device = torch.device(device_name)
    config = TrainingConfig().for_device(device)
    lr, ref, operator = load_sic()
    test_lr, _ = test_pair()
    ref_patches = reference_patches([ref], config.n_reference_patches, 6, 0).to(device)
    with torch.no_grad():
        image = upsample_aligned(torch.from_numpy(test_lr), operator).float()
    target = config.patches_per_step or None
    images = image[None, None].expand(4, 1, *image.shape).contiguous()
    patches = strided_patches(images, 6, target, torch.Generator().manual_seed(0)).to(device)
    rows: dict[str, float] = {"n_generated": patches.shape[0], "n_reference": ref_patches.shape[0]}

    exact = WassersteinPatchPrior(ref_patches, scale_momentum=0.1)
    exact.ascend(patches, 20)  # ψ near its optimum for these patches, as within a run

    def exact_call() -> None:
        x = patches.clone().requires_grad_(True)
        exact.loss_and_ascend(x, config.psi_passes).backward()

    rows[f"exact, {config.psi_passes} ψ passes"] = _timed(exact_call, repeats, device)
    for k in (16, 64, 256):
        sliced = SlicedPatchPrior(ref_patches, n_projections=k)

        def sliced_call(prior: SlicedPatchPrior = sliced) -> None:
            x = patches.clone().requires_grad_(True)
            prior.loss(x).backward()

        rows[f"sliced, {k} random + 36 principal directions"] = _timed(sliced_call, repeats, device)
    return rows


# --------------------------------------------------------------------------- main


def run_child(*argv: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *argv], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "?"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", default="5,15", help="comma-separated training budgets")
    parser.add_argument("--distances", default="exact,sliced")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds of the runs")
    parser.add_argument("--step-cost", action="store_true", help="the prior's cost per call")
    parser.add_argument("--no-train", action="store_true", help="skip the training table")
    parser.add_argument(
        "--variational", type=int, default=0, help="iterations of the variational comparison"
    )
    parser.add_argument("--flow-probe", action="store_true", help="WPPFlow stabiliser probe")
    parser.add_argument("--flow-variants", default="exact,sliced,exact+sliced:0.1")
    parser.add_argument("--mean-warmup", type=float, default=0.0, help="flow probe warm-up")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per step cost")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "train":
            result = train_child(rest[0], float(rest[1]), args.device, int(rest[2]))
        elif kind == "variational":
            result = variational_child(rest[0], int(rest[1]), args.device, int(rest[2]))
        elif kind == "flow":
            result = flow_child(rest[0], float(rest[1]), args.device, int(rest[2]), float(rest[3]))
        else:
            result = step_cost_child(args.device, args.repeats)
        print(json.dumps(result))
        return
    where = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    if args.device.startswith("cuda"):
        where = f"{torch.cuda.get_device_name(torch.device(args.device))}, {where}"
    print(f"# sliced vs exact patch distance, SiC ×4, device {args.device}, {where}")
    budgets = [float(m) for m in args.minutes.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.step_cost:
        print("## prior cost per call (loss + backward), median seconds")
        row = run_child("cost", "--device", args.device, "--repeats", str(args.repeats))
        for name, value in row.items():
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            print(f"{name:<50} {text:>10}")
    if args.variational:
        print(f"## variational WPP, 256² SiC crop, {args.variational} iterations per distance")
        print(f"{'distance':<8} {'seed':>4} {'s/it':>6} {'PSNR':>6} {'SSIM':>6} {'blur':>6} rms")
        for distance in args.distances.split(","):
            for seed in seeds:
                argv = ("variational", distance, str(args.variational), str(seed))
                row = run_child(*argv, "--device", args.device)
                if "error" in row:
                    print(f"{distance:<8} {seed:4d} failed: {row['error']}")
                    continue
                print(
                    f"{distance:<8} {seed:4d} {row['s_per_iteration']:6.3f} {row['psnr']:6.2f} "
                    f"{row['ssim']:6.4f} {row['blur_effect']:6.3f} {row['data_rms']:.4f}"
                )
    if args.flow_probe:
        print(f"## WPPFlow, mean warm-up {args.mean_warmup:g}: exact, sliced, exact + w·sliced")
        for minutes in budgets:
            for variant in args.flow_variants.split(","):
                for seed in seeds:
                    argv = ("flow", variant, f"{minutes:g}", str(seed), f"{args.mean_warmup:g}")
                    row = run_child(*argv, "--device", args.device)
                    print(json.dumps({"variant": variant, "minutes": minutes, "seed": seed, **row}))
        return
    if args.no_train:
        return
    print("## WPPNet, README command, lr_SiC_x4 vs hr_SiC (40 px border)")
    header = f"{'distance':<8} {'min':>5} {'seed':>4} {'steps':>6} {'s/step':>7} "
    print(header + f"{'PSNR':>6} {'SSIM':>6} {'blur':>6} {'data rms':>8}")
    for minutes in budgets:
        for distance in args.distances.split(","):
            for seed in seeds:
                row = run_child(
                    "train", distance, f"{minutes:g}", str(seed), "--device", args.device
                )
                if "error" in row:
                    print(f"{distance:<8} {minutes:5g} {seed:4d} failed: {row['error']}")
                    continue
                print(
                    f"{distance:<8} {minutes:5g} {seed:4d} {row['steps']:6d} "
                    f"{row['s_per_step']:7.3f} {row['psnr']:6.2f} {row['ssim']:6.4f} "
                    f"{row['blur_effect']:6.3f} {row['data_rms']:8.4f}"
                )
    print(f"(truth: blur 0.321, data rms {NOISE} = the noise; bicubic about 25.2 dB)")


if __name__ == "__main__":
    main()
