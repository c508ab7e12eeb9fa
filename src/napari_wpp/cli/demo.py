"""``napari-wpp demo``: end-to-end demo on a synthetic material.

Make a synthetic material stack and degrade it; reconstruct one slice with variational WPP,
train a WPPNet on the LR stack and superresolve the slice with it, and compare both with bicubic
upsampling and the truth. Writes truth/lr/bicubic/wpp/wppnet TIFFs, the model file and
comparison.png into DIR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from napari_wpp.cli import _common
from napari_wpp.cli.train import _run_job
from napari_wpp.core.errors import InputError

#: Default time budget of ``napari-wpp demo`` in minutes (variational WPP and WPPNet training).
DEMO_MINUTES = 3.0
#: Share of the demo's budget that goes to WPPNet training (the rest to variational WPP).
DEMO_TRAIN_SHARE = 2.0 / 3.0
#: Default side of the demo's HR slice.
DEMO_SIZE = 192
#: Slices of the demo's synthetic LR stack (WPPNet's training data).
DEMO_SLICES = 8
#: WPPNet of the demo on a CPU: lighter than the published one (64 features, 10 blocks), so
#: that a few minutes give enough steps; GPUs train the published network.
DEMO_CPU_MODEL: dict[str, Any] = {"features": 32, "blocks": 4, "offset": 0.5}
#: Training settings of the demo (``TrainingConfig`` fields).
DEMO_TRAINING: dict[str, Any] = {"batch_size": 4, "patches_per_step": 6000}


def add_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """The options of ``napari-wpp demo``."""
    p.add_argument(
        "--out",
        default="napari-wpp-demo",
        metavar="DIR",
        help="output folder (default ./napari-wpp-demo; created if missing)",
    )
    p.add_argument(
        "--minutes",
        type=_common.minutes_type,
        default=DEMO_MINUTES,
        metavar="M",
        help=f"total time budget: a third for variational WPP, two thirds for WPPNet "
        f"training (default {DEMO_MINUTES:g})",
    )
    p.add_argument(
        "--size",
        type=_common.number_type(int, 48, True, "e.g. --size 192"),
        default=DEMO_SIZE,
        metavar="N",
        help=f"side of the HR slice in pixels (default {DEMO_SIZE})",
    )
    p.add_argument("--seed", type=_common.seed_type, default=0, help="seed (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _comparison_figure(path: Path, panels: list[tuple[str, Any]]) -> None:
    """Save a row of grayscale panels (title, image) as a PNG, with matplotlib's Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4 * len(panels), 4.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels))
    for ax, (title, image) in zip(axes, panels):
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    figure.savefig(path, format="png")


def run(args: argparse.Namespace) -> int:
    folder = Path(args.out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out {args.out!r} is a file: give a folder")
    if not folder.parent.is_dir():
        raise InputError(
            f"parent folder {str(folder.parent)!r} of --out does not exist: create it first"
        )
    device = _common.check_device(args.device)
    size = args.size
    if size % 4:
        raise InputError(f"--size {size} is not a multiple of 4 (the demo's scale): use e.g. 192")

    import numpy as np
    import torch

    from napari_wpp.core.inference import run_superresolve
    from napari_wpp.core.intensity import Normalisation
    from napari_wpp.core.metrics import evaluate
    from napari_wpp.core.operators import upsample_aligned
    from napari_wpp.core.reconstruct import (
        DEFAULT_LAMBDA,
        VariationalConfig,
        reconstruct_variational,
    )
    from napari_wpp.core.training import TrainingConfig
    from napari_wpp.data import synthetic_material
    from napari_wpp.io import atomic_write, explained_write_errors, save_model
    from napari_wpp.jobs.train import TrainSource

    train_minutes = args.minutes * DEMO_TRAIN_SHARE
    wpp_minutes = args.minutes - train_minutes
    sys.stderr.write(
        f"demo: synthetic material {DEMO_SLICES}×{size}×{size}, ×4, noise 0.01; "
        f"{wpp_minutes:.2g} min variational WPP, {train_minutes:.2g} min WPPNet training\n"
    )
    material = synthetic_material(
        shape=(DEMO_SLICES, size, size), scale=4, noise=0.01, seed=args.seed
    )

    def unit(array: Any) -> Any:
        array = np.asarray(array)
        return Normalisation.from_array(array).apply(array)

    z = DEMO_SLICES // 2  # the test slice; WPPNet trains on the whole LR stack (no HR data)
    lr_stack = unit(material.lr)
    truth, lr = unit(material.hr[z]), lr_stack[z]
    reference = unit(material.reference)
    operator = material.operator
    with torch.no_grad():
        bicubic = upsample_aligned(torch.from_numpy(lr), operator).cpu().numpy().astype(np.float32)
    config = VariationalConfig(minutes=wpp_minutes, seed=args.seed, device=device)
    finished = _common.drive(
        lambda stop: reconstruct_variational(lr, reference, operator, config, stop=stop),
        _common.ProgressBar("reconstruct"),
    )
    wpp = np.asarray(finished.image, dtype=np.float32)

    small = torch.device(device).type == "cpu"  # a lighter network gets enough steps on a CPU
    train_config = TrainingConfig(
        minutes=train_minutes,
        seed=args.seed,
        device=device,
        model_options=dict(DEMO_CPU_MODEL) if small else {},
        **DEMO_TRAINING,
    )
    source = TrainSource(lr_stack, reference, reference_normalised=True, lr_normalised=True)
    trained, _ = _run_job(train_config, source, operator, None, label="train")
    state = trained.state
    wppnet = run_superresolve(state.model, lr, device=device).astype(np.float32)

    crop = min(40, size // 8)
    methods = ("bicubic", "wpp", "wppnet")
    images = {"bicubic": bicubic, "wpp": wpp, "wppnet": wppnet}
    scores = {name: evaluate(np.clip(images[name], 0, 1), truth, crop=crop) for name in methods}
    scores["truth"] = evaluate(truth, truth, crop=crop)
    scores = {name: {k: float(v) for k, v in m.items()} for name, m in scores.items()}
    folder.mkdir(exist_ok=True)
    files = {}
    for name, image in (("truth", truth), ("lr", lr), *images.items()):
        files[name] = folder / f"{name}.tif"
        _common.write_tiff(files[name], image)
    files["model"] = folder / "wppnet.safetensors"
    save_model(files["model"], state)  # atomic

    def title(name: str, label: str) -> str:
        m = scores[name]
        if name == "truth":
            return f"{label}\nblur {m['blur_effect']:.3f}"
        return f"{label}\n{m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}, blur {m['blur_effect']:.3f}"

    lr_view = np.kron(np.clip(lr, 0, 1), np.ones((4, 4), dtype=np.float32))
    files["figure"] = folder / "comparison.png"
    panels = [
        (f"LR ×4 ({_common.shape_text(lr.shape)})", lr_view),
        (title("bicubic", "bicubic"), np.clip(bicubic, 0, 1)),
        (title("wpp", f"variational WPP ({finished.iterations} it)"), np.clip(wpp, 0, 1)),
        (title("wppnet", f"WPPNet ({state.step} steps)"), np.clip(wppnet, 0, 1)),
        (title("truth", "truth"), truth),
    ]
    with explained_write_errors(files["figure"]):
        atomic_write(files["figure"], lambda tmp: _comparison_figure(tmp, panels))
    rows = [
        f"{'method':<10} {'PSNR':>8} {'SSIM':>7} {'blur':>7}",
        *(
            f"{name:<10} {scores[name]['psnr']:>8.2f} {scores[name]['ssim']:>7.4f} "
            f"{scores[name]['blur_effect']:>7.4f}"
            for name in methods
        ),
        f"{'truth':<10} {'':>8} {'':>7} {scores['truth']['blur_effect']:>7.4f}",
        f"(wpp: {finished.iterations} iterations in {finished.elapsed_s:.1f} s, "
        f"λ = {DEFAULT_LAMBDA:g}; wppnet: {state.step} training steps in {state.elapsed_s:.1f} s "
        f"on {DEMO_SLICES} LR slices, λ = {state.lam:g}; {device}, crop {crop} px; "
        f"files in {folder})",
    ]
    _common.emit(
        args,
        {
            "out": str(folder),
            "files": {k: str(v) for k, v in files.items()},
            "metrics": {
                **{name: scores[name] for name in methods},
                "truth": {"blur_effect": scores["truth"]["blur_effect"]},
            },
            "iterations": int(finished.iterations),
            "seconds": float(finished.elapsed_s),
            "lambda": DEFAULT_LAMBDA,
            "training": {
                "steps": int(state.step),
                "seconds": float(state.elapsed_s),
                "lambda": float(state.lam),
                "model_config": state.model_config,
                "slices": DEMO_SLICES,
                "stopped_early": bool(trained.stopped_early),
            },
            "device": device,
            "size": size,
            "crop": crop,
        },
        "\n".join(rows),
    )
    return _common.EXIT_OK
