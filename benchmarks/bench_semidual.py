"""Benchmark of the semi-dual engine: exact c-transform speed and ψ solver quality.

Run ``python benchmarks/bench_semidual.py`` (``--help`` for options). Prints

* the speed of ``c_transform_argmin`` against the chunked ``addmm + argmin`` baseline at
  N = 100,000, M = 10,000, d = 36 (same threads, warm-up, interleaved repeats, medians), its
  GFLOP/s-equivalent (2·N·M·d per evaluation) and an exactness check against float64;
* the share of the exact W₂² (Hungarian) reached by each ψ solver after a number of passes
  on 2,000 vs 2,000 real SiC 6×6 patches (needs ../shared/data);
* the cost of the ψ ascent passes of one training step with and without pass pruning
  (``semidual_pruning.PASS_PRUNING``): all 225,625 6×6 patches of 25 SiC crops of 100×100 (sharp HR
  crops, or ``blur``: ×4 average-pooled and bicubic-upsampled, like early network outputs)
  against 10,000 reference patches, ψ warmed up by ASGD, then 20 passes where each pass runs
  the full engine and the pruned tracker on the same ψ (interleaved, same run) and checks
  that they agree.

With ``--device cuda`` (or ``--backend``), the speed part times the GPU paths instead: the
fused Triton kernel (``--backend triton``, also its top-2 kernel alone) and the torch device
path (``device``) against the chunked baseline, in ms per pass (median of repeats, each
between ``torch.cuda.synchronize()`` calls), at ``--sizes`` (default 225,625 × 10,000 and
1,000,000 × 20,000; on the CPU ``--n × --m``), and one ψ ascent pass of
``WassersteinPatchPrior``. Rows checked in float64 on the device: ``--check-rows`` random rows
plus every uncertain row. The solver and pruning parts run on the CPU as before.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from shared_data import DATA_ROOT

from napari_wpp.core.patches import sample_reference_patches
from napari_wpp.core.semidual import WassersteinPatchPrior, c_transform_argmin, exact_w2
from napari_wpp.core.semidual import engine as semidual_engine
from napari_wpp.core.semidual import pruning as semidual_pruning

DATA = DATA_ROOT


def baseline(x: torch.Tensor, y: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """The plain chunked float32 argmin the engine is compared with."""
    c = (y * y).sum(1) - psi
    return torch.cat([torch.addmm(c, ch, y.T, alpha=-2).argmin(1) for ch in x.split(4096)])


def float64_check(x: torch.Tensor, y: torch.Tensor, psi: torch.Tensor, rows: int) -> np.ndarray:
    """Float64 brute-force argmin of the first ``rows`` rows (direct differences)."""
    return semidual_engine._brute_force64(x[:rows], y, psi).numpy()


def speed_inputs(
    data: str, n: int, m: int, d: int, seed: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform random clouds, or real SiC patches (with their exact duplicates) and a ψ.

    Generated patches come from the HR image, or from the HR stack when the image has fewer
    than ``n`` patches. The ψ is warmed up on ``device``.
    """
    g = torch.Generator().manual_seed(seed)
    if data == "random":
        return (
            torch.rand(n, d, generator=g).to(device),
            torch.rand(m, d, generator=g).to(device),
            0.1 * torch.rand(m, generator=g).to(device),
        )
    from PIL import Image

    side = int(round(d**0.5))
    ref = np.asarray(Image.open(DATA / "sic" / "ref_SiC.png"))
    hr = np.asarray(Image.open(DATA / "sic" / "hr_SiC.png"))
    if n > (hr.shape[0] - side + 1) * (hr.shape[1] - side + 1):
        import tifffile

        hr = tifffile.imread(DATA / "sic" / "sic_stack_hr.tif")
    y = sample_reference_patches(ref, m, side, seed=seed).to(device)
    x = sample_reference_patches(hr, n, side, seed=seed + 1).to(device)
    prior = WassersteinPatchPrior(y)
    prior.ascend(x[:20_000], 10)  # a ψ as met during a reconstruction
    return x, y, prior.psi.clone()


def float64_rows(
    x: torch.Tensor, y: torch.Tensor, psi: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Float64 brute-force argmin of some rows on their device (direct differences)."""
    y64, p64 = y.double(), psi.double()
    elems = (1 << 27) if x.device.type == "cuda" else (1 << 22)
    out = [torch.empty(0, dtype=torch.int64, device=x.device)]
    for part in rows.split(max(1, elems // (y.shape[0] * y.shape[1]))):
        diff = x[part].double()[:, None, :] - y64[None]
        out.append(((diff * diff).sum(-1) - p64).argmin(1))
    return torch.cat(out)


def bench_device_speed(
    n: int,
    m: int,
    d: int,
    repeats: int,
    seed: int,
    check_rows: int,
    data: str,
    device: str,
    backends: list[str],
) -> None:
    """GPU paths against the chunked baseline: ms per pass, uncertain rows, float64 check."""
    from napari_wpp.core import semidual_gpu

    x, y, psi = speed_inputs(data, n, m, d, seed, device)
    n = x.shape[0]
    dev = x.device

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    print(f"## c-transform argmin on {data} data, {dev}: N={n:,} M={m:,} d={d}")
    runs = {"baseline (chunked addmm + argmin)": lambda: baseline(x, y, psi)}
    top2 = {"triton": semidual_gpu.triton_top2, "device": semidual_gpu.device_top2}
    for b in backends:
        runs[f"exact, backend {b}"] = lambda b=b: c_transform_argmin(x, y, psi, backend=b)
        if b == "triton":
            runs["  triton top-2 kernel only"] = lambda: semidual_gpu.triton_top2(x, y, psi)
    prior = WassersteinPatchPrior(y)
    prior.psi.copy_(psi)
    prior.ascend(x, 1)  # scale set, kernels compiled
    runs["psi ascent pass (auto)"] = lambda: prior.ascend(x, 1)
    results = {name: f() for name, f in runs.items()}  # warm-up (compiles kernels)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, f in runs.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times[name].append(1e3 * (time.perf_counter() - t0))
    for name, ts in times.items():
        print(
            f"{name:34s} median {statistics.median(ts):9.2f} ms/pass  "
            f"(runs {', '.join(f'{v:.2f}' for v in ts)})"
        )
    g = torch.Generator().manual_seed(seed)
    sample = torch.randperm(n, generator=g)[:check_rows].to(dev)
    for b in backends:
        with semidual_engine._ieee_fp32_matmul(dev):
            _, flags = top2[b](x, y, psi)
        uncertain = torch.nonzero(flags).squeeze(1)
        rows = torch.unique(torch.cat([sample, uncertain]))
        got = results[f"exact, backend {b}"]
        same = int((got[rows] == float64_rows(x, y, psi, rows)).sum())
        print(
            f"backend {b}: uncertain rows {uncertain.numel():,} "
            f"({100 * uncertain.numel() / n:.2f} %), exact on {same:,}/{rows.numel():,} "
            "float64-checked rows (random + all uncertain)"
        )
    base = results["baseline (chunked addmm + argmin)"]
    same = int((base[sample] == float64_rows(x, y, psi, sample)).sum())
    print(f"baseline (float32 only): exact on {same:,}/{sample.numel():,} random rows")


def bench_speed(
    n: int, m: int, d: int, repeats: int, seed: int, check_rows: int, data: str = "random"
) -> None:
    x, y, psi = speed_inputs(data, n, m, d, seed)
    n = x.shape[0]
    print(
        f"## c-transform argmin on {data} data: N={n:,} M={m:,} d={d}, "
        f"torch threads={torch.get_num_threads()}"
    )
    engines = {"engine (torch, default)": lambda: c_transform_argmin(x, y, psi)}
    if semidual_engine._faiss_available():
        engines["engine (faiss backend)"] = lambda: c_transform_argmin(x, y, psi, backend="faiss")
    ref = baseline(x, y, psi)  # warm-up
    results = {name: f() for name, f in engines.items()}  # warm-up
    times: dict[str, list[float]] = {"baseline": [], **{k: [] for k in engines}}
    for _ in range(repeats):
        for name, f in [("baseline", lambda: baseline(x, y, psi)), *engines.items()]:
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    flops = 2.0 * n * m * d
    tb = statistics.median(times["baseline"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(
            f"{name:26s} median {t:7.3f} s  (runs {', '.join(f'{v:.2f}' for v in ts)})  "
            f"{flops / t / 1e9:6.1f} GFLOP/s-eq  speed-up vs baseline {tb / t:4.2f}x"
        )
    want = float64_check(x, y, psi, check_rows)
    for name, r in results.items():
        same = int((r[:check_rows].numpy() == want).sum())
        print(f"{name}: exact on {same}/{check_rows} float64-checked rows")
    same = int((ref[:check_rows].numpy() == want).sum())
    print(f"baseline (float32 only): exact on {same}/{check_rows} rows")
    agree = {
        name: float((r == results[next(iter(results))]).float().mean())
        for name, r in results.items()
    }
    print(f"agreement between engines on all rows: {agree}")


def bench_solvers(n: int, marks: list[int], solvers: list[str]) -> None:
    sic = DATA / "sic"
    if not (sic / "ref_SiC.png").exists():
        print(f"## solvers: skipped, real data not found in {sic}")
        return
    from PIL import Image

    ref = np.asarray(Image.open(sic / "ref_SiC.png"))
    hr = np.asarray(Image.open(sic / "hr_SiC.png"))
    y = sample_reference_patches(ref, n, 6, seed=1)
    x = sample_reference_patches(hr, n, 6, seed=2)
    w2 = exact_w2(x, y)
    print(f"## psi solvers: {n:,} vs {n:,} real SiC 6x6 patches, exact W2^2 = {w2:.6f}")
    print("share of exact W2^2 (%) at psi after k passes, from psi = 0")
    print(f"{'solver':8s} " + " ".join(f"{k:>6d}" for k in marks))
    for solver in solvers:
        prior = WassersteinPatchPrior(y, solver=solver)
        shares, done = [], 0
        for k in marks:
            prior.ascend(x, k - done)
            done = k
            shares.append(100.0 * prior.value(x) / w2)
        print(f"{solver:8s} " + " ".join(f"{s:6.1f}" for s in shares), flush=True)


def pass_inputs(data: str, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """225,625 generated-like patches of 25 crops and ``m`` reference patches (6×6)."""
    import torch.nn.functional as F
    from PIL import Image

    from napari_wpp.core.patches import extract_patches

    if (DATA / "sic" / "ref_SiC.png").exists():
        hr = np.asarray(Image.open(DATA / "sic" / "hr_SiC.png"), dtype=np.float32) / 255
        ref = np.asarray(Image.open(DATA / "sic" / "ref_SiC.png"), dtype=np.float32) / 255
    else:  # synthetic stand-in
        from napari_wpp.data import synthetic_material

        material = synthetic_material(shape=(1, 400, 400), scale=4, seed=seed)
        hr = material.hr[0].astype(np.float32) / 255
        ref = material.reference.astype(np.float32) / 255
    rng = np.random.default_rng(seed)
    tops = rng.integers(0, hr.shape[0] - 100, 25)
    lefts = rng.integers(0, hr.shape[1] - 100, 25)
    crops = torch.from_numpy(np.stack([hr[t : t + 100, s : s + 100] for t, s in zip(tops, lefts)]))
    crops = crops[:, None]
    if data == "blur":
        crops = F.interpolate(F.avg_pool2d(crops, 4), scale_factor=4, mode="bicubic")
    x = extract_patches(crops, 6).contiguous()
    y = sample_reference_patches(ref, m, 6, seed=seed)
    return x, y


def bench_passes(data: str, m: int, passes: int, warm: int, solver: str, seed: int) -> None:
    x, y = pass_inputs(data, m, seed)
    prior = WassersteinPatchPrior(y, solver=solver)
    prior.ascend(x[:: max(1, x.shape[0] // 20_000)], warm)  # a warm ψ, as across steps
    print(
        f"## psi ascent passes on {data} patches: N={x.shape[0]:,} M={m:,} d={x.shape[1]}, "
        f"{solver}, {passes} passes, torch threads={torch.get_num_threads()}"
    )
    tracker = semidual_pruning._PassTracker(x, y)
    full, pruned = [], []
    with torch.no_grad():
        for _ in range(passes):
            t0 = time.perf_counter()
            want = c_transform_argmin(x, y, prior.psi)
            t1 = time.perf_counter()
            got = tracker(prior.psi)
            t2 = time.perf_counter()
            if not torch.equal(got, want):
                raise AssertionError("pruned pass differs from the engine")
            full.append(t1 - t0)
            pruned.append(t2 - t1)
            counts = torch.bincount(want, minlength=m).to(torch.float32)
            prior._step(1.0 / m - counts / x.shape[0])
    later = pruned[1:]
    print(f"full pass (engine):       median {statistics.median(full):6.3f} s")
    print(f"pruned, first (baseline): {pruned[0]:6.3f} s")
    if later:
        print(
            f"pruned, passes 2..{passes}:    mean {statistics.mean(later):6.3f} s, "
            f"{statistics.mean(later) / statistics.mean(full[1:]):.3f} of a full pass"
        )
    print(
        f"{passes} passes: engine {sum(full):.2f} s, pruned {sum(pruned):.2f} s, "
        f"speed-up {sum(full) / sum(pruned):.2f}x (all passes equal)"
    )
    stats = tracker.stats
    print(f"re-scored listed pairs per pass: {stats['pairs'][1:]}")
    print(f"rows re-scored in full per pass: {stats['full_rows'][1:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="generated patches N")
    parser.add_argument("--m", type=int, default=10_000, help="reference patches M")
    parser.add_argument("--d", type=int, default=36, help="patch dimension d")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--check-rows", type=int, default=20_000, help="rows checked in float64")
    parser.add_argument("--solver-n", type=int, default=2000, help="patches per cloud for solvers")
    parser.add_argument(
        "--passes", type=str, default="1,5,10,20,50,100,1000", help="pass counts to report"
    )
    parser.add_argument("--solvers", type=str, default="adam,asgd,gd")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-solvers", action="store_true")
    parser.add_argument("--skip-prune", action="store_true", help="skip the pass-pruning bench")
    parser.add_argument("--prune-data", default="sic,blur", help="sic and/or blur patches")
    parser.add_argument("--prune-passes", type=int, default=20, help="ψ passes timed")
    parser.add_argument("--prune-warm", type=int, default=50, help="warm-up ASGD passes")
    parser.add_argument("--prune-solver", default="asgd", help="ψ solver of the passes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda: the GPU paths' speed bench"
    )
    parser.add_argument(
        "--backend",
        default=None,
        help="GPU paths timed, comma-separated: triton, device (default off the CPU: both, "
        "triton where usable); on the CPU, a backend runs the GPU speed bench at --n x --m",
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help="NxM pairs of the GPU speed bench (default off the CPU: 225625x10000,1000000x20000)",
    )
    parser.add_argument(
        "--data",
        default="random,sic",
        help="speed inputs: random (uniform), sic (real patches, needs ../shared/data) or both",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        if semidual_engine._faiss_available():
            import faiss

            faiss.omp_set_num_threads(args.threads)
    gpu_bench = args.device != "cpu" or args.backend is not None
    if not args.skip_speed and gpu_bench:
        from napari_wpp.core import semidual_gpu

        if args.backend is not None:
            backends = args.backend.split(",")
        else:
            usable = semidual_gpu.triton_usable(torch.device(args.device))
            backends = ["triton", "device"] if usable else ["device"]
        if args.sizes is not None:
            sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
        elif args.device != "cpu":
            sizes = [(225_625, 10_000), (1_000_000, 20_000)]
        else:
            sizes = [(args.n, args.m)]
        for n, m in sizes:
            for data in args.data.split(","):
                if data == "sic" and not (DATA / "sic" / "ref_SiC.png").exists():
                    print(f"## speed on sic data: skipped, real data not found in {DATA}")
                    continue
                bench_device_speed(
                    n, m, args.d, args.repeats, args.seed, args.check_rows, data,
                    args.device, backends,
                )  # fmt: skip
    elif not args.skip_speed:
        for data in args.data.split(","):
            if data == "sic" and not (DATA / "sic" / "ref_SiC.png").exists():
                print(f"## speed on sic data: skipped, real data not found in {DATA}")
                continue
            bench_speed(args.n, args.m, args.d, args.repeats, args.seed, args.check_rows, data)
    if not args.skip_solvers:
        marks = sorted(int(v) for v in args.passes.split(","))
        bench_solvers(args.solver_n, marks, args.solvers.split(","))
    if not args.skip_prune:
        for data in args.prune_data.split(","):
            bench_passes(
                data, args.m, args.prune_passes, args.prune_warm, args.prune_solver, args.seed
            )


if __name__ == "__main__":
    main()
