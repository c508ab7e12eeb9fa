"""Benchmark of slice-wise inference: speed against a plain loop, memory of out-of-core runs.

Run ``python benchmarks/bench_inference.py`` (``--help`` for options). Prints

* output megavoxels per second of :func:`run_superresolve` (batched, optionally tiled) and of a
  plain loop of ``model(slice)`` calls under ``torch.no_grad`` on the same volume, measured in
  the same run (warm-up, interleaved repeats, medians), their ratio and the largest difference
  of the results, for the default WPPNet(scale=4) architecture (random weights: speed does not
  depend on them) on LR slices of ``sic_stack_hr.tif`` degraded with GaussianDownsampling(4, 2)
  (random slices when ../shared/data is absent);
* the peak resident memory of an in-memory run and of an out-of-core zarr run
  (:func:`napari_wpp.jobs.zarr_layout.superresolve_zarr`, one slice per chunk) on the same
  zarr volume, each
  in its own subprocess, as growth over the process's own baseline (imports, model and one
  warm-up slice) next to the volume sizes and the chunk budget (one input plus one output
  slice). By default this part uses a light WPPNet(4, features=8, blocks=2) so that the volume
  can be much larger than a chunk within seconds; ``--ooc-features 64 --ooc-blocks 10`` runs the
  full architecture.

``--denoise-cost`` instead times a WPPNet ×2 (default size) on whole LR slices with and
without its LR noise model (``--denoise-sizes``, default 413 and 1024), and the denoiser alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from shared_data import DATA_ROOT

from napari_wpp.core.inference import run_superresolve
from napari_wpp.core.models.wppnet import WPPNet

DATA = DATA_ROOT / "sic" / "sic_stack_hr.tif"
SCALE = 4


def lr_volume(slices: int, size: int, data: str, seed: int) -> tuple[np.ndarray, str]:
    """``(slices, size, size)`` float32 LR volume in [0, 1] and a description of its source."""
    if data in ("auto", "sic") and DATA.is_file():
        import tifffile

        from napari_wpp.core.operators import GaussianDownsampling

        with tifffile.TiffFile(DATA) as tif:
            n = min(slices, len(tif.pages))
            hr = np.stack([tif.pages[i].asarray() for i in range(n)])
        side = SCALE * size
        if hr.shape[1] < side or hr.shape[2] < side:
            raise SystemExit(f"--size {size} too large for {DATA.name} ({hr.shape[1:]})")
        y0, x0 = (hr.shape[1] - side) // 2, (hr.shape[2] - side) // 2
        hr = hr[:, y0 : y0 + side, x0 : x0 + side].astype(np.float32) / 255.0
        with torch.no_grad():
            lr = GaussianDownsampling(SCALE, 2.0)(torch.from_numpy(hr)).numpy()
        lr = np.clip(lr, 0.0, 1.0).astype(np.float32)
        if n < slices:  # repeat real slices when more are asked for than the stack holds
            lr = np.concatenate([lr] * -(-slices // n))[:slices]
        return lr, f"{DATA.name} slices degraded by GaussianDownsampling(4, 2.0)"
    if data == "sic":
        raise SystemExit(f"{DATA} not found (see ../shared/data/README.md)")
    rng = np.random.default_rng(seed)
    return rng.random((slices, size, size), dtype=np.float32), "uniform random"


def plain_loop(model: torch.nn.Module, volume: np.ndarray) -> np.ndarray:
    """The baseline: one ``model(slice)`` call per slice under ``torch.no_grad``."""
    out = []
    with torch.no_grad():
        for s in volume:
            out.append(model(torch.from_numpy(s)[None, None])[0, 0].numpy())
    return np.stack(out)


def speed(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    model = WPPNet(scale=SCALE).eval()  # the default architecture (64 features, 10 blocks)
    volume, source = lr_volume(args.slices, args.size, args.data, args.seed)
    n_out = volume.shape[0] * (SCALE * volume.shape[1]) * (SCALE * volume.shape[2])
    print(
        f"inference speed: WPPNet(scale={SCALE}) default architecture, {volume.shape[0]} LR "
        f"slices of {volume.shape[1]}x{volume.shape[2]} ({source}), {torch.get_num_threads()} "
        f"torch threads, CPU float32"
    )

    def ours(batch_size: int, tile: int | None) -> np.ndarray:
        return run_superresolve(model, volume, batch_size=batch_size, tile=tile, device="cpu")

    methods = {"plain loop model(slice)": lambda: plain_loop(model, volume)}
    methods["run_superresolve (batch 1)"] = lambda: ours(1, None)
    methods[f"run_superresolve (batch {args.batch_size})"] = lambda: ours(args.batch_size, None)
    if args.tile:
        name = f"run_superresolve (batch {args.batch_size}, tile {args.tile})"
        methods[name] = lambda: ours(args.batch_size, args.tile)
    warm = volume[:1]
    plain_loop(model, warm)
    run_superresolve(model, warm, tile=args.tile, device="cpu")
    times: dict[str, list[float]] = {k: [] for k in methods}
    diffs: dict[str, float] = {}
    for _ in range(args.repeats):
        reference = None
        for name, fn in methods.items():
            t0 = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - t0)
            if reference is None:
                reference = result
            diffs[name] = float(np.abs(result - reference).max())
    base = statistics.median(times["plain loop model(slice)"])
    print(f"{'method':<44} {'median s':>9} {'Mvox/s out':>11} {'speed-up':>9} {'max diff':>9}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(
            f"{name:<44} {t:>9.2f} {n_out / t / 1e6:>11.3f} {base / t:>8.2f}x {diffs[name]:>9.1e}"
        )
    print(f"(medians of {args.repeats} interleaved repeats; max diff against the plain loop)")


# ----------------------------------------------------------------------------- memory


def child(args: argparse.Namespace) -> None:
    """Subprocess body: one in-memory or out-of-core run, peak RSS growth printed as JSON."""
    from napari_wpp.io import open_zarr_array
    from napari_wpp.jobs.zarr_layout import superresolve_zarr

    torch.manual_seed(args.seed)
    model = WPPNet(scale=SCALE, features=args.ooc_features, blocks=args.ooc_blocks).eval()
    work = Path(args.child_dir)
    source = open_zarr_array(work / "in.zarr")
    # warm-up: imports, oneDNN kernels, allocator pools of one slice
    if args.child == "memory":
        run_superresolve(model, source[:4], tile=args.tile, device="cpu")  # a full batch
    else:
        for _ in superresolve_zarr(
            model, work / "warm.zarr", work / "warm_out.zarr", tile=args.tile
        ):
            pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if args.child == "memory":
        result = run_superresolve(model, source[:], tile=args.tile, device="cpu")
        checksum = float(result.astype(np.float64).sum())
    else:
        for _ in superresolve_zarr(model, work / "in.zarr", work / "out.zarr", tile=args.tile):
            pass
        out = open_zarr_array(work / "out.zarr")
        checksum = float(sum(out[i].astype(np.float64).sum() for i in range(out.shape[0])))
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kb": before, "after_kb": after, "s": seconds, "sum": checksum}))


def memory(args: argparse.Namespace) -> None:
    from napari_wpp.io import create_zarr_array

    n, size = args.ooc_slices, args.ooc_size
    in_bytes = n * size * size * 4
    out_bytes = in_bytes * SCALE * SCALE
    budget = (size * size + (SCALE * size) ** 2) * 4
    print(
        f"out-of-core memory: WPPNet(scale={SCALE}, features={args.ooc_features}, "
        f"blocks={args.ooc_blocks}), {n} slices of {size}x{size} float32; input "
        f"{in_bytes / 2**20:.1f} MiB, output {out_bytes / 2**20:.1f} MiB, chunk budget "
        f"{budget / 2**20:.2f} MiB (one input + one output slice)"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rng = np.random.default_rng(args.seed)
        array = create_zarr_array(work / "in.zarr", (n, size, size), "float32", (1, size, size))
        for i in range(n):
            array[i] = rng.random((size, size), dtype=np.float32)
        warm = create_zarr_array(work / "warm.zarr", (1, size, size), "float32", (1, size, size))
        warm[0] = rng.random((size, size), dtype=np.float32)
        for kind in ("memory", "zarr"):
            cmd = [sys.executable, __file__, "--child", kind, "--child-dir", tmp]
            cmd += ["--ooc-features", str(args.ooc_features), "--ooc-blocks", str(args.ooc_blocks)]
            cmd += ["--seed", str(args.seed)] + (["--tile", str(args.tile)] if args.tile else [])
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{kind} child failed:\n{done.stderr}")
            rows.append((kind, json.loads(done.stdout.strip().splitlines()[-1])))
    print(f"{'run':<28} {'s':>7} {'peak RSS MiB':>13} {'growth MiB':>11} {'growth/output':>14}")
    for kind, r in rows:
        growth = (r["after_kb"] - r["before_kb"]) * 1024
        name = "in memory (run_superresolve)" if kind == "memory" else "zarr (superresolve_zarr)"
        print(
            f"{name:<28} {r['s']:>7.2f} {r['after_kb'] / 1024:>13.1f} {growth / 2**20:>11.1f} "
            f"{growth / out_bytes:>14.2f}"
        )
    same = abs(rows[0][1]["sum"] - rows[1][1]["sum"]) <= 1e-5 * max(1.0, abs(rows[0][1]["sum"]))
    print(f"both runs give the same output sum: {same}\n")


def denoise_cost(args: argparse.Namespace) -> None:
    """Seconds per LR slice of a WPPNet ×2 with and without its LR noise model (the DCT
    denoiser of an estimated operator), whole slices, interleaved repeats, medians."""
    from napari_wpp.core.inference import superresolve_slice

    torch.manual_seed(args.seed)
    net = WPPNet(2, denoise_block=8)
    variance = np.full((8, 8), 1e-4)
    rng = np.random.default_rng(args.seed)
    print("| LR slice | network alone (s) | with the denoiser (s) | ratio | denoiser alone (s) |")
    print("|---|---|---|---|---|")
    for side in args.denoise_sizes:
        image = rng.random((side, side), dtype=np.float32)
        times: dict[str, list[float]] = {"plain": [], "denoised": [], "alone": []}
        for _ in range(args.repeats + 1):  # the first round warms up and is dropped
            for name in times:
                net.set_noise_variance(np.zeros((8, 8)) if name == "plain" else variance)
                start = time.perf_counter()
                if name == "alone":
                    from napari_wpp.core.lr_denoise import denoise_image

                    denoise_image(image, variance)
                else:
                    superresolve_slice(net, image)
                times[name].append(time.perf_counter() - start)
        plain, denoised, alone = (statistics.median(times[k][1:]) for k in times)
        print(f"| {side}² | {plain:.2f} | {denoised:.2f} | {denoised / plain:.3f} | {alone:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=8, help="LR slices of the speed test")
    parser.add_argument("--size", type=int, default=64, help="LR slice side (150 = full SiC)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tile", type=int, default=None, help="tile side in LR pixels")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", choices=("auto", "sic", "random"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ooc-slices", type=int, default=48, help="slices of the zarr volume")
    parser.add_argument("--ooc-size", type=int, default=128, help="LR side of the zarr volume")
    parser.add_argument("--ooc-features", type=int, default=8)
    parser.add_argument("--ooc-blocks", type=int, default=2)
    parser.add_argument(
        "--denoise-cost", action="store_true", help="only the LR denoiser's cost per slice"
    )
    parser.add_argument("--denoise-sizes", type=int, nargs="+", default=[413, 1024])
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", choices=("memory", "zarr"), help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.denoise_cost:
        denoise_cost(args)
        return
    # memory first: a child's getrusage peak starts at its parent's RSS at fork time on Linux,
    # so the children are started while this process is still small
    if not args.skip_memory:
        memory(args)
    if not args.skip_speed:
        speed(args)


if __name__ == "__main__":
    main()
