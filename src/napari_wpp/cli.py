"""Command line interface: ``napari-wpp <subcommand> ...``.

Every subcommand validates its input before doing any work, prints results on stdout (one JSON
object with ``--json``), progress on stderr, and exits with

* 0 on success,
* 2 on bad input (one ``error: ...`` line on stderr that names the fix),
* 1 on an unexpected failure (one ``error: ...`` line; ``--debug`` shows the traceback),
* 130 when interrupted before anything could be saved.

Heavy modules (torch, the core, file formats) are imported inside the subcommands so that
``napari-wpp --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from napari_wpp import __version__
from napari_wpp.core.errors import DivergenceError, InputError

PROG = "napari-wpp"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

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
#: Defaults of ``napari-wpp train`` shown in its help (those of ``TrainingConfig`` on a CPU,
#: checked by a test; kept here so that ``--help`` does not import torch).
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 500,
    "batch_size": 8,
    "crop_size": 25,
    "n_reference_patches": 5_000,
    "psi_passes": 2,
    "seed": 0,
}
#: Defaults that differ on CUDA (``core.training.DEVICE_DEFAULTS["cuda"]``, checked by a test).
TRAIN_CUDA_DEFAULTS: dict[str, Any] = {
    "batch_size": 25,
    "n_reference_patches": 10_000,
    "psi_passes": 5,
}
#: Minutes between two writes of the model file during ``napari-wpp train``.
CHECKPOINT_MINUTES = 5.0
#: Model kinds ``napari-wpp train`` knows (``core.training.TRAINABLE_MODELS``, checked by a
#: test; kept here so that ``--help`` does not import torch).
TRAINABLE_MODELS = ("wppnet", "wppflow")
#: The published flow's ρ per LR crop (``core.training.PUBLISHED_RHO_PER_CROP``, checked by a
#: test); ``train --rho`` defaults to it, converted per LR pixel.
PUBLISHED_RHO_PER_CROP = 100.0
#: WPPFlow's default mean warm-up share (``core.training.DEFAULT_MEAN_WARMUP``, checked by a
#: test).
DEFAULT_MEAN_WARMUP = 0.3
#: Default noise level σ of ``train --noise`` (``TrainingConfig.noise_std``, checked by a test).
DEFAULT_NOISE_STD = 0.01
#: Posterior samples ``predict`` draws with a WPPFlow when ``--samples`` is not given.
DEFAULT_FLOW_SAMPLES = 8


# --------------------------------------------------------------------------- argument parsing


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one ``error: ...`` line (exit code 2)."""

    def error(self, message: str) -> NoReturn:  # noqa: D102 (argparse API)
        sys.stderr.write(f"error: {_one_line(message)} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_BAD_INPUT)


def _scale(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"scale must be an integer ≥ 2, got {text!r}: use e.g. --scale 4"
        ) from None
    if not value.is_integer() or value < 2:
        raise argparse.ArgumentTypeError(
            f"scale must be an integer ≥ 2, got {text}: use e.g. --scale 2, 3, 4, 6 or 8"
        )
    return int(value)


def _number(kind: type, minimum: float, inclusive: bool, hint: str) -> Callable[[str], Any]:
    """An argparse ``type`` that parses ``kind`` and enforces a lower bound."""
    bound = f"≥ {minimum:g}" if inclusive else f"> {minimum:g}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'} {bound}, "
                f"got {text!r}: {hint}"
            ) from None
        ok = value >= minimum if inclusive else value > minimum
        if not ok or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}: {hint}")
        return value

    parse.__name__ = kind.__name__
    return parse


_sigma = _number(float, 0.0, False, "the blur width σ in HR pixels, e.g. --sigma 2")
_noise = _number(float, 0.0, True, "the noise std on the [0, 1] scale, e.g. --noise 0.01")
_lambda = _number(float, 0.0, True, "e.g. --lambda 0.02")
_rho = _number(float, 0.0, True, "e.g. --rho 100")
_temperature = _number(float, 0.0, True, "e.g. --temperature 1 (0 gives the mode)")
_minutes = _number(float, 0.0, False, "e.g. --minutes 2")
_iterations = _number(int, 1, True, "e.g. --iterations 300")
_kernel = _number(int, 1, True, "e.g. --kernel-size 16")
_crop = _number(int, 0, True, "the border to ignore in pixels, e.g. --crop 40")
_seed = _number(int, 0, True, "e.g. --seed 0")
_steps = _number(int, 1, True, "e.g. --steps 500")
_positive = {
    name: _number(int, 1, True, f"e.g. {name} {value}")
    for name, value in (
        ("--batch-size", 8),
        ("--crop-size", 25),
        ("--reference-patches", 5000),
        ("--psi-passes", 2),
        ("--tile", 256),
        ("--samples", 8),
    )
}
_checkpoint_minutes = _number(float, 0.0, True, "e.g. --checkpoint-minutes 5 (0: only at the end)")


def _mean_warmup(text: str) -> float:
    """``--mean-warmup`` of ``train``: a share of the budget in [0, 1)."""
    hint = "a share of the budget in [0, 1), e.g. --mean-warmup 0.3 (0: no warm-up)"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {hint}, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be {hint}, got {text}")
    return value


def _train_lambda(text: str) -> float | str:
    """``--lambda`` of ``train``: a number ≥ 0 or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return _lambda(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a number ≥ 0 or 'auto', got {text!r}: e.g. --lambda 0.02 or --lambda auto"
        ) from None


def _train_rho(text: str) -> float | str:
    """``--rho`` of ``train``: a number ≥ 0 or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return _rho(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a number ≥ 0 or 'auto', got {text!r}: e.g. --rho 100 or --rho auto"
        ) from None


def _add_operator_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "forward operator", "either --operator OP.json or --scale (with --sigma)"
    )
    group.add_argument(
        "--operator", metavar="OP.json", help="operator JSON (from estimate-operator)"
    )
    group.add_argument(
        "--scale", type=_scale, metavar="Q", help="integer downsampling factor q ≥ 2"
    )
    group.add_argument(
        "--sigma",
        type=_sigma,
        metavar="S",
        help="Gaussian blur σ in HR pixels (default q/2: 2 for ×4, 3 for ×6, 4 for ×8)",
    )
    group.add_argument(
        "--kernel-size", type=_kernel, default=16, metavar="K", help="kernel side (default 16)"
    )
    group.add_argument(
        "--anchor",
        choices=("center", "corner"),
        default="center",
        help="kernel anchoring; 'corner' reproduces the published data (default center)",
    )
    group.add_argument(
        "--padding",
        choices=("circular", "reflect", "zeros"),
        default="circular",
        help="border handling of the blur (default circular)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``napari-wpp`` argument parser with all subcommands."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of unexpected errors",
    )
    parser = _Parser(
        prog=PROG,
        description="Superresolution of material scans with Wasserstein Patch Priors.",
        epilog=f"Run '{PROG} <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of unexpected errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "degrade",
        parents=[common],
        help="blur, downsample and add noise to an HR image or stack",
        description="Apply a forward operator (and noise) to a 2D image or, slice by slice, "
        "to a 3D stack. The output TIFF has the input's dtype; the pixel size is multiplied "
        "by the scale.",
    )
    p.add_argument("input", metavar="INPUT", help="HR image or stack (TIFF, PNG, ...)")
    p.add_argument("--out", required=True, metavar="OUT.tif", help="output TIFF")
    _add_operator_flags(p)
    p.add_argument(
        "--noise",
        type=_noise,
        default=0.0,
        metavar="SIGMA",
        help="Gaussian noise std on the [0, 1] intensity scale (default 0)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="noise seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(handler=_cmd_degrade)

    p = sub.add_parser(
        "estimate-operator",
        parents=[common],
        help="estimate blur kernel and bias from a registered HR/LR pair",
        description="Estimate y ≈ S(k * x + b) from a registered pair: a K×K kernel k, a "
        "bias b and Fourier downsampling S by the scale. The LR image is either HR/scale in "
        "size or registered and resampled onto the HR grid (same size as HR).",
    )
    p.add_argument("--hr", required=True, metavar="HR", help="HR image (2D)")
    p.add_argument("--lr", required=True, metavar="LR", help="registered LR image (2D)")
    p.add_argument("--scale", required=True, type=_scale, metavar="Q", help="integer factor ≥ 2")
    p.add_argument(
        "--kernel-size", type=_kernel, default=15, metavar="K", help="kernel side (default 15)"
    )
    p.add_argument("--out", required=True, metavar="OP.json", help="operator JSON to write")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(handler=_cmd_estimate_operator)

    p = sub.add_parser(
        "reconstruct",
        parents=[common],
        help="variational WPP superresolution of one LR image",
        description="Superresolve one 2D LR image with the variational Wasserstein Patch "
        "Prior, using an HR reference of the same material. The output TIFF has the LR "
        "image's dtype and intensity range.",
    )
    p.add_argument(
        "--lr", required=True, metavar="LR", help="LR image (2D, or a 3D stack with --slice)"
    )
    p.add_argument(
        "--slice",
        type=int,
        metavar="Z",
        help="index of the slice to reconstruct when LR is a 3D stack",
    )
    p.add_argument("--reference", required=True, metavar="REF", help="HR reference image or stack")
    _add_operator_flags(p)
    p.add_argument(
        "--lambda",
        dest="lam",
        type=_lambda,
        metavar="L",
        help="weight λ of the patch prior, mean data term (default 0.008)",
    )
    p.add_argument(
        "--minutes",
        type=_minutes,
        metavar="M",
        help="time budget in minutes (with --iterations: whichever ends first)",
    )
    p.add_argument(
        "--iterations",
        type=_iterations,
        metavar="N",
        help="iteration budget (with neither budget: the library default iterations)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--out", required=True, metavar="OUT.tif", help="output TIFF")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(handler=_cmd_reconstruct)

    d = TRAIN_DEFAULTS
    p = sub.add_parser(
        "train",
        parents=[common],
        help="train a WPPNet or a WPPFlow on LR data (no paired HR data needed)",
        description="Train a WPPNet (or, with --model wppflow, a conditional normalizing flow "
        "that draws posterior samples) on a 2D LR image or a 3D LR stack with the Wasserstein "
        "Patch Prior of an HR reference of the same material. The model file records the "
        "operator, the LR data's intensity normalisation and the training state; it is "
        "written every --checkpoint-minutes and at the end, also when Ctrl-C stops the run.",
    )
    p.add_argument(
        "--lr-data", required=True, metavar="LR", help="LR image (2D) or stack (3D), TIFF or PNG"
    )
    p.add_argument("--reference", required=True, metavar="REF", help="HR reference image or stack")
    _add_operator_flags(p)
    p.add_argument(
        "--out", required=True, metavar="MODEL.safetensors", help="model file to write"
    )
    p.add_argument(
        "--model",
        metavar="KIND",
        help="wppnet (a CNN, default) or wppflow (a conditional normalizing flow: posterior "
        "samples, mean and standard deviation with 'predict'); --resume keeps the file's kind",
    )
    p.add_argument(
        "--minutes",
        type=_minutes,
        metavar="M",
        help="time budget in minutes (with --steps: whichever ends first)",
    )
    p.add_argument(
        "--steps",
        type=_steps,
        metavar="N",
        help=f"step budget (with neither budget: {d['steps']} steps); budgets count the whole "
        "run, including the steps of a --resume file",
    )
    p.add_argument(
        "--lambda",
        dest="lam",
        type=_train_lambda,
        metavar="L",
        help="wppnet: weight λ of the patch prior, mean data term, or 'auto' (chosen on the "
        "reference; default 12.5 / crop-size², 0.02 for 25-pixel crops)",
    )
    p.add_argument(
        "--rho",
        type=_train_rho,
        metavar="R",
        help=f"wppflow: weight ρ of the patch prior in the flow's loss per LR pixel, "
        f"data/(2σ²) + ρ·W₂² − log-det/n_LR, or 'auto' (the λ chosen on the reference divided "
        f"by 2σ²; default: the published weighting, ρ = {PUBLISHED_RHO_PER_CROP:g} per LR crop, "
        f"which is {PUBLISHED_RHO_PER_CROP:g}/(σ²·crop²) per LR pixel: 1600 for σ = 0.01 and "
        "25-pixel crops)",
    )
    p.add_argument(
        "--mean-warmup",
        type=_mean_warmup,
        metavar="F",
        help=f"wppflow: share of the budget that trains the flow's mean network alone, as a "
        f"WPPNet, before it is frozen and the flow learns the spread around it (default "
        f"{DEFAULT_MEAN_WARMUP:g}; 0: train everything together)",
    )
    p.add_argument(
        "--noise",
        "--noise-std",
        dest="noise",
        type=_noise,
        metavar="SIGMA",
        help=f"noise std σ of the LR data on the [0, 1] intensity scale, as in 'degrade "
        f"--noise' (default {DEFAULT_NOISE_STD:g}): the σ of wppflow's data term, and used by "
        "--lambda/--rho auto",
    )
    p.add_argument(
        "--batch-size",
        type=_positive["--batch-size"],
        metavar="B",
        help=f"LR crops per step, per process under torchrun (default {d['batch_size']}; "
        f"{TRAIN_CUDA_DEFAULTS['batch_size']} on CUDA)",
    )
    p.add_argument(
        "--crop-size",
        type=_positive["--crop-size"],
        metavar="C",
        help=f"side of the LR crops in LR pixels (default {d['crop_size']}; clipped to the data)",
    )
    p.add_argument(
        "--reference-patches",
        type=_positive["--reference-patches"],
        metavar="M",
        help=f"random reference patches used by the prior (default {d['n_reference_patches']}; "
        f"{TRAIN_CUDA_DEFAULTS['n_reference_patches']} on CUDA)",
    )
    p.add_argument(
        "--psi-passes",
        type=_positive["--psi-passes"],
        metavar="P",
        help=f"dual (ψ) ascent passes per step (default {d['psi_passes']}; "
        f"{TRAIN_CUDA_DEFAULTS['psi_passes']} on CUDA)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument(
        "--seed",
        type=_seed,
        metavar="N",
        help=f"seed of every random choice (default {d['seed']})",
    )
    p.add_argument(
        "--resume",
        metavar="MODEL",
        help="continue the run saved in this model file (same operator and settings)",
    )
    p.add_argument(
        "--checkpoint-minutes",
        type=_checkpoint_minutes,
        default=CHECKPOINT_MINUTES,
        metavar="X",
        help=f"write the model file every X minutes during training (default "
        f"{CHECKPOINT_MINUTES:g}; 0: only at the end)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser(
        "predict",
        parents=[common],
        help="superresolve an image, stack or zarr volume with a trained model",
        description="Superresolve a 2D image or, slice by slice, a 3D stack (TIFF/PNG) or a "
        "zarr array with a model file written by 'train'. Integer inputs are normalised by "
        "their dtype range; float inputs by the model's recorded float range, else by their "
        "own 0.1/99.9 percentiles. The output has the input's dtype and intensity range. "
        "With a wppflow model, OUT is the pixelwise mean of --samples posterior samples, "
        "<OUT stem>_std<ext> their standard deviation (float32, in the input's intensity "
        "units: grey levels for integer inputs) and, with --save-samples, "
        "<OUT stem>_samples<ext> the samples (sample axis first, the input's dtype).",
    )
    p.add_argument("model", metavar="MODEL", help="model file (.safetensors) from 'train'")
    p.add_argument(
        "input", metavar="INPUT", help="LR image or stack (TIFF, PNG) or a .zarr array"
    )
    p.add_argument(
        "--out", required=True, metavar="OUT", help="output .tif/.tiff or .zarr (a zarr array)"
    )
    p.add_argument(
        "--axis",
        type=int,
        metavar="A",
        help="axis of a 3D input cut into slices; it keeps its size, the two others grow "
        "(default 0)",
    )
    p.add_argument(
        "--tile",
        type=_positive["--tile"],
        metavar="T",
        help="process each slice in tiles of T LR pixels (with a halo; same result, less "
        "memory; default: whole slices)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive["--batch-size"],
        default=4,
        metavar="B",
        help="slices per forward pass; posterior samples per pass for a wppflow (default 4)",
    )
    flow = p.add_argument_group("wppflow models (posterior samples)")
    flow.add_argument(
        "--samples",
        type=_positive["--samples"],
        metavar="K",
        help=f"number of posterior samples per slice (default {DEFAULT_FLOW_SAMPLES}; 1 gives "
        "a std of 0)",
    )
    flow.add_argument(
        "--temperature",
        type=_temperature,
        metavar="T",
        help="latent temperature: samples from T·N(0, I) (default 1; 0: every sample is the "
        "mode)",
    )
    flow.add_argument(
        "--seed",
        type=_seed,
        metavar="N",
        help="seed of the latents; the same seed gives the same samples (default 0)",
    )
    flow.add_argument(
        "--save-samples",
        action="store_true",
        help="also write the samples to <OUT stem>_samples<ext> (K times the output's size)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(handler=_cmd_predict)

    p = sub.add_parser(
        "evaluate",
        parents=[common],
        help="PSNR, SSIM and blur effect of a prediction against ground truth",
        description="Compare PRED with GT after cropping a border. Both are put on a [0, 1] "
        "scale: integer images by their dtype range; float images as they are when GT lies "
        "in [0, 1], otherwise by GT's min/max (a float PRED with an integer GT is taken as "
        "[0, 1] when it lies there, otherwise on GT's dtype scale).",
    )
    p.add_argument("pred", metavar="PRED", help="predicted image (2D or 3D)")
    p.add_argument("gt", metavar="GT", help="ground-truth image of the same shape")
    p.add_argument(
        "--crop", type=_crop, default=40, metavar="N", help="border ignored (default 40)"
    )
    p.add_argument(
        "--std",
        metavar="STD",
        help="pixelwise posterior standard deviation of PRED (same shape, in PRED's intensity "
        "units): also report the coverage of GT within 1/2/3 std, the std-error correlation "
        "and the edge/flat std ratio",
    )
    p.add_argument(
        "--samples",
        metavar="SAMPLES",
        help="posterior samples of a 2D PRED as a (K, H, W) stack in PRED's intensity units: "
        "also report the mean PSNR and SSIM of single samples",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(handler=_cmd_evaluate)

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="end-to-end demo on a synthetic material",
        description="Make a synthetic material stack and degrade it; reconstruct one slice "
        "with variational WPP, train a WPPNet on the LR stack and superresolve the slice with "
        "it, and compare both with bicubic upsampling and the truth. Writes "
        "truth/lr/bicubic/wpp/wppnet TIFFs, the model file and comparison.png into DIR.",
    )
    p.add_argument(
        "--out",
        default="napari-wpp-demo",
        metavar="DIR",
        help="output folder (default ./napari-wpp-demo; created if missing)",
    )
    p.add_argument(
        "--minutes",
        type=_minutes,
        default=DEMO_MINUTES,
        metavar="M",
        help=f"total time budget: a third for variational WPP, two thirds for WPPNet "
        f"training (default {DEMO_MINUTES:g})",
    )
    p.add_argument(
        "--size",
        type=_number(int, 48, True, "e.g. --size 192"),
        default=DEMO_SIZE,
        metavar="N",
        help=f"side of the HR slice in pixels (default {DEMO_SIZE})",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(handler=_cmd_demo)
    return parser


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_BAD_INPUT
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.handler(args) or EXIT_OK)
    except InputError as exc:
        if debug:
            raise
        _fail(str(exc))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if debug:
            raise
        _fail("interrupted")
        return EXIT_INTERRUPTED
    except DivergenceError as exc:
        if debug:
            raise
        _fail(str(exc))
        return EXIT_FAILURE
    except MemoryError:
        if debug:
            raise
        _fail("out of memory: use a smaller image, fewer reference patches or a larger machine")
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 -- last resort: one line, never a traceback
        if debug:
            raise
        _fail(
            f"unexpected {type(exc).__name__}: {_one_line(str(exc)) or 'no message'} "
            f"(rerun with --debug for the traceback and report it)"
        )
        return EXIT_FAILURE


def _fail(message: str) -> None:
    _end_progress_line()
    sys.stderr.write(f"error: {_one_line(message)}\n")
    sys.stderr.flush()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- output helpers


def _jsonable(value: Any) -> Any:
    """Plain JSON types; non-finite floats become ``None`` (strict JSON has no inf/nan)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    """Print the result: ``payload`` as one JSON object with ``--json``, else ``text``."""
    _end_progress_line()
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(_jsonable(payload)) + "\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


_open_bar: _ProgressBar | None = None


def _end_progress_line() -> None:
    if _open_bar is not None:
        _open_bar.close()


class _ProgressBar:
    """A text progress bar on stderr.

    On a terminal it redraws one line (``\\r``); otherwise it prints a line at every tenth of
    the work and at most every ``interval_s`` seconds in between.
    """

    def __init__(
        self, label: str, width: int = 24, interval_s: float = 60.0, silent: bool = False
    ) -> None:
        self.label = label
        self.silent = silent
        self.width = width
        self.interval_s = interval_s
        self.stream = sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.start = time.perf_counter()
        self._last_draw = -math.inf
        self._last_tenth = -1
        self._drawn = False
        self._width_drawn = 0
        global _open_bar
        _open_bar = self

    def update(self, fraction: float, detail: str = "") -> None:
        """Show ``fraction`` (0..1) of the work done and a short ``detail``."""
        if self.silent:  # a data-parallel rank other than 0
            return
        fraction = min(max(float(fraction), 0.0), 1.0)
        now = time.perf_counter()
        elapsed = now - self.start
        if self.tty:
            if now - self._last_draw < 0.1 and fraction < 1.0:
                return
            filled = int(round(fraction * self.width))
            bar = "#" * filled + "-" * (self.width - filled)
            line = f"{self.label} [{bar}] {100 * fraction:3.0f}% {detail} {elapsed:.0f}s"
            line = line[:160]
            self.stream.write("\r" + line.ljust(self._width_drawn))
            self._width_drawn = len(line)
            self._drawn = True
        else:
            tenth = int(fraction * 10)
            if tenth <= self._last_tenth and now - self._last_draw < self.interval_s:
                return
            self._last_tenth = max(tenth, self._last_tenth)
            self.stream.write(f"{self.label}: {100 * fraction:3.0f}% {detail} {elapsed:.0f}s\n")
        self._last_draw = now
        self.stream.flush()

    def close(self) -> None:
        """End the bar (a newline on a terminal)."""
        global _open_bar
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False
        if _open_bar is self:
            _open_bar = None


# --------------------------------------------------------------------------- input checks


def _check_output(
    path_text: str, what: str = "output", suffixes: tuple[str, ...] = (".tif", ".tiff")
) -> Path:
    """Validate an output file path (folder exists, file type) before any work is done."""
    path = Path(path_text).expanduser()
    if suffixes and path.suffix.lower() not in suffixes:
        raise InputError(
            f"{what} {path_text!r} must end in {' or '.join(suffixes)}: e.g. "
            f"{path.with_suffix(suffixes[0]).name}"
        )
    if path.is_dir():
        raise InputError(f"{what} {path_text!r} is a folder: give a file name, e.g. {path}/out.tif")
    parent = path.parent
    if not parent.is_dir():
        raise InputError(
            f"{what} folder {str(parent)!r} does not exist: create it first or choose another path"
        )
    if not os.access(parent, os.W_OK):
        raise InputError(f"{what} folder {str(parent)!r} is not writable: choose another path")
    return path


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, so no half-written ``path`` remains."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(
            f"cannot write {str(path)!r} ({_one_line(str(exc))}): check the path"
        ) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def _read(path_text: str, what: str, ndims: Iterable[int] = (2, 3)) -> Any:
    """Read and check an image: it exists, is readable, has a supported shape, is finite."""
    import numpy as np

    from napari_wpp.io import read_image

    ndims = tuple(ndims)
    path = Path(path_text).expanduser()
    if not path.exists():
        raise InputError(f"{what} {path_text!r} does not exist: check the path")
    if path.is_dir():
        raise InputError(f"{what} {path_text!r} is a folder: give an image file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {path_text!r} is not readable: check its permissions")
    try:
        data = read_image(path)
    except InputError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, EOFError) as exc:
        raise InputError(
            f"cannot read {what} {path_text!r} ({type(exc).__name__}: {_one_line(str(exc))[:120]})"
            ": give a TIFF or PNG image"
        ) from exc
    array = np.asarray(data.array)
    if array.dtype.kind not in "uif":
        raise InputError(
            f"{what} {path_text!r} has dtype {array.dtype}: give a grayscale integer or float image"
        )
    if array.ndim not in ndims:
        colour = array.ndim == 3 and array.shape[-1] in (3, 4) and 3 not in ndims
        wanted = " or ".join(f"{n}D" for n in ndims)
        raise InputError(
            f"{what} {path_text!r} has shape {array.shape} ({array.ndim}D) but {wanted} is needed"
            + (
                ": convert colour images to grayscale"
                if colour
                else ": give a single-channel image"
            )
        )
    if min(array.shape) < 1:
        raise InputError(f"{what} {path_text!r} is empty (shape {array.shape}): give an image")
    return data  # NaN/Inf pixels are refused by read_image


def _operator_from_args(args: argparse.Namespace) -> Any:
    """The forward operator from ``--operator`` or ``--scale/--sigma/...``."""
    from napari_wpp.core.operators import GaussianDownsampling
    from napari_wpp.io import read_operator

    if args.operator is not None:
        if args.scale is not None or args.sigma is not None:
            raise InputError("give either --operator OP.json or --scale/--sigma, not both")
        path = Path(args.operator).expanduser()
        if not path.is_file():
            raise InputError(f"operator file {args.operator!r} does not exist: check the path")
        try:
            operator = read_operator(path)
        except InputError as exc:
            message = str(exc)
            if path.name not in message:
                message = f"operator file {args.operator!r}: {message}"
            raise InputError(message) from exc
        except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise InputError(
                f"operator file {args.operator!r} is not a valid operator JSON "
                f"({type(exc).__name__}: {_one_line(str(exc))[:120]}): write one with "
                f"'{PROG} estimate-operator' or use --scale/--sigma"
            ) from exc
        scale = getattr(operator, "scale", None)
        if not isinstance(scale, int) or scale < 2:
            raise InputError(
                f"operator file {args.operator!r} has scale {scale!r}: the scale must be an "
                "integer ≥ 2"
            )
        return operator
    if args.scale is None:
        raise InputError("no forward operator: give --operator OP.json or --scale Q [--sigma S]")
    sigma = args.sigma if args.sigma is not None else args.scale / 2.0
    try:
        return GaussianDownsampling(
            args.scale,
            sigma,
            kernel_size=args.kernel_size,
            anchor=args.anchor,
            padding=args.padding,
        )
    except InputError:
        raise
    except ValueError as exc:
        raise InputError(f"invalid operator parameters: {_one_line(str(exc))}") from exc


def _scaled_pixel_size(pixel_size: Any, factor: float, ndim: int) -> Any:
    """Pixel size with its in-plane (last two) axes multiplied by ``factor``."""
    if pixel_size is None:
        return None
    if isinstance(pixel_size, (int, float)):
        return float(pixel_size) * factor
    values = [float(v) for v in pixel_size]
    n = min(2, len(values))
    return type(pixel_size)(values[:-n] + [v * factor for v in values[-n:]]) if n else pixel_size


def _write_image(path: Path, array: Any, pixel_size: Any = None, unit: Any = None) -> None:
    """Write a TIFF (``napari_wpp.io.write_image`` writes atomically)."""
    from napari_wpp.io import write_image

    try:
        write_image(path, array, pixel_size=pixel_size, unit=unit)
    except OSError as exc:
        raise InputError(
            f"cannot write {str(path)!r} ({_one_line(str(exc))}): check the path"
        ) from exc


def _shape_text(shape: Sequence[int]) -> str:
    return "×".join(str(int(s)) for s in shape)


# --------------------------------------------------------------------------- degrade


def _cmd_degrade(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from napari_wpp.core.intensity import Normalisation
    from napari_wpp.core.operators import add_noise

    out = _check_output(args.out)
    operator = _operator_from_args(args)
    data = _read(args.input, "input image")
    array = np.asarray(data.array)
    q = int(operator.scale)
    if min(array.shape[-2:]) < q:
        raise InputError(
            f"input image {_shape_text(array.shape[-2:])} is smaller than the scale {q}: "
            "give a larger image or a smaller --scale"
        )
    norm = Normalisation.from_array(array)
    slices = array[None] if array.ndim == 2 else array
    results = []
    bar = _ProgressBar("degrade") if len(slices) > 1 else None
    for i, hr_slice in enumerate(slices):
        hr = torch.from_numpy(np.ascontiguousarray(norm.apply(hr_slice), dtype=np.float32))
        with torch.no_grad():
            lr = operator(hr)
            if args.noise > 0:
                lr = add_noise(lr, args.noise, seed=args.seed + i)
        results.append(lr.detach().cpu().numpy())
        if bar is not None:
            bar.update((i + 1) / len(slices), f"slice {i + 1}/{len(slices)}")
    if bar is not None:
        bar.close()
    low = np.stack(results) if array.ndim == 3 else results[0]
    if array.dtype.kind in "ui":
        low = np.clip(low, 0.0, 1.0)
    low = np.asarray(norm.invert(low)).astype(array.dtype, copy=False)
    pixel_size = _scaled_pixel_size(data.pixel_size, q, array.ndim)
    _write_image(out, low, pixel_size=pixel_size, unit=data.unit)
    _emit(
        args,
        {"out": str(out), "shape": list(low.shape), "scale": q, "noise": args.noise},
        f"wrote {out} ({_shape_text(low.shape)}, {low.dtype}, ×{q} down"
        + (f", noise {args.noise:g})" if args.noise else ")"),
    )
    return EXIT_OK


# --------------------------------------------------------------------------- estimate-operator


def _cmd_estimate_operator(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_wpp.core.intensity import Normalisation
    from napari_wpp.core.operators import estimate_operator
    from napari_wpp.io import write_operator

    out = _check_output(args.out, "operator file", suffixes=(".json",))
    hr_data = _read(args.hr, "HR image", ndims=(2,))
    lr_data = _read(args.lr, "LR image", ndims=(2,))
    hr, lr = np.asarray(hr_data.array), np.asarray(lr_data.array)
    q = args.scale
    native = tuple(s // q for s in hr.shape)
    if min(native) < 1 or tuple(lr.shape) not in (native, tuple(hr.shape)):
        raise InputError(
            f"HR {_shape_text(hr.shape)} and LR {_shape_text(lr.shape)} do not match scale {q}: "
            f"the LR image must be {_shape_text(native)} (HR / {q}) or, resampled onto the HR "
            f"grid, {_shape_text(hr.shape)}"
        )
    if args.kernel_size > min(hr.shape):
        raise InputError(
            f"kernel size {args.kernel_size} exceeds the HR image {_shape_text(hr.shape)}: "
            "use a smaller --kernel-size"
        )
    hr_n = Normalisation.from_array(hr).apply(hr)
    lr_n = Normalisation.from_array(lr).apply(lr)
    estimate = estimate_operator(hr_n, lr_n, q, kernel_size=args.kernel_size)
    summary = estimate.to_dict()
    results = {
        "kernel_sum": float(summary["kernel_sum"]),
        "bias": float(summary["bias"]),
        "residual_rms": float(summary["residual_rms"]),
        "kernel_peak": float(summary["kernel_peak"]),
        "kernel_peak_index": [int(i) for i in summary["kernel_peak_index"]],
    }
    fit = {k: v for k, v in results.items() if k != "bias"}  # the operator stores its bias
    try:
        write_operator(out, estimate.operator, extra={"fit": {**fit, "hr": args.hr, "lr": args.lr}})
    except OSError as exc:
        raise InputError(
            f"cannot write {str(out)!r} ({_one_line(str(exc))}): check the path"
        ) from exc
    _emit(
        args,
        {**results, "scale": q, "kernel_size": args.kernel_size, "out": str(out)},
        f"kernel sum    {results['kernel_sum']:.4f}\n"
        f"kernel peak   {results['kernel_peak']:.4f} at {tuple(results['kernel_peak_index'])}\n"
        f"bias          {results['bias']:.5f}\n"
        f"residual rms  {results['residual_rms']:.4f}\n"
        f"wrote {out}",
    )
    return EXIT_OK


# --------------------------------------------------------------------------- reconstruct


def _describe_reconstruction(event: Any) -> tuple[float, str] | None:
    """Progress fraction and detail of a reconstruction event (``None``: not a progress one)."""
    from napari_wpp.core.reconstruct import ReconstructionProgress

    if isinstance(event, ReconstructionProgress):
        return (
            event.fraction,
            f"it {event.iteration} data {event.data_term:.2e} wpp {event.wpp_term:.2e}",
        )
    return None


def _drive(
    events: Callable[[threading.Event], Iterable[Any]],
    bar: _ProgressBar,
    describe: Callable[[Any], tuple[float, str] | None] | None = None,
    finished: type | tuple[type, ...] | None = None,
    stopping: str = "stopping after this iteration",
) -> Any:
    """Run a generator of core events in a worker thread, showing progress.

    Parameters
    ----------
    events
        Called with the stop event in the worker thread; returns the events.
    bar
        Progress bar fed with ``describe(event)``.
    describe
        ``(fraction, detail)`` of a progress event, ``None`` for other events (default: the
        reconstruction's events).
    finished
        Type(s) of the final event (default ``ReconstructionFinished``).
    stopping
        What the first Ctrl-C message says happens next.

    Ctrl-C asks the generator to stop (it still yields its final event); a second Ctrl-C
    aborts. Returns the final event.
    """
    if describe is None or finished is None:
        from napari_wpp.core.reconstruct import ReconstructionFinished

        describe = describe or _describe_reconstruction
        finished = finished or ReconstructionFinished

    stop = threading.Event()
    inbox: queue.Queue = queue.Queue()
    done = object()

    def work() -> None:
        try:
            for event in events(stop):
                inbox.put(event)
        except BaseException as exc:  # noqa: BLE001 -- handed to the main thread
            inbox.put(exc)
        finally:
            inbox.put(done)

    # Ctrl-C sets `stop` through a SIGINT handler, so it never lands as a KeyboardInterrupt in
    # the middle of the loop below (which would leave the worker running into shutdown); the
    # loop reports it at its next turn. A second Ctrl-C aborts.
    requested = threading.Event()

    def on_sigint(_signum: int, _frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        stop.set()

    handled = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if handled else None
    worker = threading.Thread(target=work, name="napari-wpp-worker", daemon=True)
    worker.start()
    final = None
    announced = False
    try:
        while True:
            try:
                event = inbox.get(timeout=0.25)
            except queue.Empty:
                event = None
            except KeyboardInterrupt:  # without the handler (not the main thread)
                if stop.is_set():
                    raise
                requested.set()
                stop.set()
                event = None
            if requested.is_set() and not announced:
                announced = True
                bar.close()
                sys.stderr.write(f"{stopping} (Ctrl-C again to abort)...\n")
            if event is None:
                continue
            if event is done:
                break
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, finished):
                final = event
                continue
            progress = describe(event)
            if progress is not None:
                bar.update(*progress)
        worker.join()
    finally:
        if handled:
            signal.signal(signal.SIGINT, previous)
    bar.close()
    if final is None:
        raise RuntimeError("the run ended without a result")
    return final


def _check_device(name: str) -> str:
    from napari_wpp.core.devices import resolve_device

    return str(resolve_device(name))


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_wpp.core.intensity import Normalisation

    out = _check_output(args.out)
    device = _check_device(args.device)
    operator = _operator_from_args(args)
    lr_data = _read(args.lr, "LR image", ndims=(2, 3))
    ref_data = _read(args.reference, "reference", ndims=(2, 3))
    lr, ref = np.asarray(lr_data.array), np.asarray(ref_data.array)
    if lr.ndim == 3:
        if args.slice is None:
            raise InputError(
                f"LR image {args.lr!r} is a {_shape_text(lr.shape)} stack: choose the slice to "
                "reconstruct with --slice Z"
            )
        if not -lr.shape[0] <= args.slice < lr.shape[0]:
            raise InputError(
                f"--slice {args.slice} is outside the stack of {lr.shape[0]} slices: "
                f"use 0 to {lr.shape[0] - 1}"
            )
        lr = lr[args.slice]
    elif args.slice is not None:
        raise InputError(f"--slice is for 3D stacks but {args.lr!r} is 2D: drop --slice")

    from napari_wpp.core.reconstruct import (
        DEFAULT_LAMBDA,
        VariationalConfig,
        reconstruct_variational,
    )

    config = VariationalConfig(
        lam=args.lam,
        iterations=args.iterations,
        minutes=args.minutes,
        seed=args.seed,
        device=args.device,
    )
    p = config.patch_size  # a reference smaller than a patch is refused by the core
    q = int(operator.scale)
    if min(lr.shape) * q < p:
        raise InputError(
            f"LR image {_shape_text(lr.shape)} at ×{q} is smaller than the {p}×{p} patch: "
            "give a larger LR image"
        )
    norm = Normalisation.from_array(lr)
    lr_n = np.asarray(norm.apply(lr), dtype=np.float32)
    ref_n = np.asarray(Normalisation.from_array(ref).apply(ref), dtype=np.float32)
    finished = _drive(
        lambda stop: reconstruct_variational(lr_n, ref_n, operator, config, stop=stop),
        _ProgressBar("reconstruct"),
    )
    image = np.asarray(finished.image, dtype=np.float32)
    if lr.dtype.kind in "ui":
        image = np.clip(image, 0.0, 1.0)
    result = np.asarray(norm.invert(image)).astype(lr.dtype, copy=False)
    pixel_size = _scaled_pixel_size(lr_data.pixel_size, 1.0 / q, 2)
    _write_image(out, result, pixel_size=pixel_size, unit=lr_data.unit)
    lam = args.lam if args.lam is not None else DEFAULT_LAMBDA
    stopped = bool(getattr(finished, "stopped_early", False))
    _emit(
        args,
        {
            "out": str(out),
            "shape": list(result.shape),
            "scale": q,
            "iterations": int(finished.iterations),
            "seconds": float(finished.elapsed_s),
            "lambda": lam,
            "device": device,
            "stopped_early": stopped,
        },
        f"wrote {out} ({_shape_text(result.shape)}, {result.dtype}) after "
        f"{finished.iterations} iterations in {finished.elapsed_s:.1f} s (λ = {lam:g}, {device})"
        + (" [stopped early]" if stopped else ""),
    )
    return EXIT_OK


# --------------------------------------------------------------------------- train


def _check_model_kind(kind: str) -> str:
    """The ``--model`` of ``train``: one of :data:`TRAINABLE_MODELS`."""
    if kind in TRAINABLE_MODELS:
        return kind
    raise InputError(f"unknown --model {kind!r}: use --model {' or '.join(TRAINABLE_MODELS)}")


def _check_prior_weight_flags(args: argparse.Namespace, kind: str) -> None:
    """``--lambda`` belongs to wppnet, ``--rho`` to wppflow; σ > 0 for a flow."""
    if kind == "wppnet" and args.rho is not None:
        raise InputError("--rho is the prior weight of wppflow: use --lambda with wppnet")
    if kind == "wppnet" and args.mean_warmup is not None:
        raise InputError("--mean-warmup belongs to wppflow: drop it, or add --model wppflow")
    if kind == "wppflow" and args.lam is not None:
        raise InputError("--lambda is the prior weight of wppnet: use --rho with wppflow")
    if kind == "wppflow" and args.noise is not None and not args.noise > 0:
        raise InputError("wppflow needs a noise std σ > 0 for its data term: e.g. --noise 0.01")


def _operator_text(data: dict[str, Any]) -> str:
    """A short description of an operator dict, e.g. ``×4 Gaussian σ 2``."""
    scale = data.get("scale")
    if data.get("kind") == "gaussian":
        sigma = data.get("sigma")
        sigma_text = "/".join(f"{v:g}" for v in sigma) if isinstance(sigma, list) else f"{sigma:g}"
        return (
            f"×{scale} Gaussian σ {sigma_text}, kernel {data.get('kernel_size')}, "
            f"{data.get('anchor')}, {data.get('padding')}"
        )
    if data.get("kind") == "fourier":
        kernel = data.get("kernel") or []
        side = f"{len(kernel)}×{len(kernel[0])}" if kernel and isinstance(kernel[0], list) else "?"
        return f"×{scale} estimated {side} kernel"
    return f"×{scale} {data.get('kind')}"


def _load_resume(path_text: str) -> Any:
    """The training state of a ``--resume`` file; refuses files that cannot be resumed."""
    from napari_wpp.io import load_model, read_model_metadata

    meta = read_model_metadata(path_text)
    name = Path(path_text).name
    if meta.get("kind") not in TRAINABLE_MODELS:
        raise InputError(
            f"--resume {name} is a {meta.get('kind')} model: only "
            f"{' and '.join(TRAINABLE_MODELS)} runs can be resumed"
        )
    if not meta.get("training_state"):
        raise InputError(
            f"--resume {name} holds no training state (it was saved for prediction only): "
            "start a new run without --resume"
        )
    state = load_model(path_text, device="cpu")
    if not state.priors or state.optimizer is None:
        raise InputError(
            f"--resume {name} lacks its ψ or optimizer state: start a new run without --resume"
        )
    return state


def _resume_operator(args: argparse.Namespace, state: Any, name: str) -> Any:
    """The model file's operator, or the asked one when it is the same."""
    from napari_wpp.core.operators import operator_from_dict

    saved = operator_from_dict(state.operator)
    if args.operator is None and args.scale is None and args.sigma is None:
        return saved
    asked = _operator_from_args(args)
    if int(asked.scale) != int(saved.scale):
        raise InputError(
            f"{name} was trained for ×{saved.scale} ({_operator_text(saved.to_dict())}), you "
            f"asked ×{asked.scale}: drop the operator flags to resume with the model's operator, "
            "or train a new model without --resume"
        )
    if asked.to_dict() != saved.to_dict():
        raise InputError(
            f"{name} was trained with {_operator_text(saved.to_dict())}, you asked "
            f"{_operator_text(asked.to_dict())}: drop the operator flags to resume with the "
            "model's operator, or train a new model without --resume"
        )
    return saved


def _check_resume_settings(args: argparse.Namespace, state: Any, name: str) -> None:
    """Refuse training settings that differ from the resumed run's (they would be ignored)."""
    from napari_wpp.core.training import saved_config

    saved = state.config or {}
    effective = saved_config(state)
    flags = (
        ("--batch-size", "batch_size", args.batch_size),
        ("--crop-size", "crop_size", args.crop_size),
        ("--reference-patches", "n_reference_patches", args.reference_patches),
        ("--psi-passes", "psi_passes", args.psi_passes),
        ("--mean-warmup", "mean_warmup", args.mean_warmup),
        ("--seed", "seed", args.seed),
    )
    for flag, key, value in flags:
        if value is not None and value != getattr(effective, key):
            raise InputError(
                f"{flag} {value} differs from the resumed run's {getattr(effective, key)}: "
                f"drop {flag} (a resumed run keeps its settings) or train a new model without "
                "--resume"
            )
    if args.model is not None and args.model != state.kind:
        raise InputError(
            f"--model {args.model} differs from the resumed {state.kind} run: drop --model or "
            "train a new model without --resume"
        )
    if args.lam is not None and args.lam not in (saved.get("lam"), state.lam):
        raise InputError(
            f"--lambda {args.lam} differs from the resumed run's λ = {state.lam:g}: drop "
            "--lambda or train a new model without --resume"
        )
    if args.rho is not None and args.rho not in (saved.get("rho"), state.lam):
        raise InputError(
            f"--rho {args.rho} differs from the resumed run's ρ = {state.lam:g}: drop "
            "--rho or train a new model without --resume"
        )
    if args.noise is not None and "noise_std" in saved and args.noise != saved["noise_std"]:
        raise InputError(
            f"--noise {args.noise:g} differs from the resumed run's σ = {saved['noise_std']:g}: "
            "drop --noise or train a new model without --resume"
        )
    steps = args.steps
    if steps is None and args.minutes is None:
        steps = TRAIN_DEFAULTS["steps"]
    if steps is not None and state.step >= steps:
        raise InputError(
            f"{name} has already trained {state.step} steps and the budget is {steps} "
            "(budgets count the whole run): give a larger --steps"
        )
    if args.minutes is not None and state.elapsed_s >= 60.0 * args.minutes:
        raise InputError(
            f"{name} has already trained {state.elapsed_s / 60:.1f} minutes and the budget is "
            f"{args.minutes:g} (budgets count the whole run): give a larger --minutes"
        )


def _save_model(path: Path, state: Any) -> None:
    from napari_wpp.io import save_model

    try:
        save_model(path, state)
    except OSError as exc:
        raise InputError(
            f"cannot write {str(path)!r} ({_one_line(str(exc))}): check the path"
        ) from exc


def _describe_training(event: Any) -> tuple[float, str] | None:
    from napari_wpp.core.training import TrainingProgress, rate_text

    if isinstance(event, TrainingProgress):
        logdet = "" if event.logdet is None else f" logdet {event.logdet:.3g}"
        phase = "" if event.phase is None else f" ({event.phase})"
        total = "" if event.total_steps is None else f"/{event.total_steps}"
        rate = f" · {rate_text(event.steps_per_s)}" if event.steps_per_s else ""
        device = f" · {event.device}" if event.device else ""
        return (
            event.fraction,
            f"step {event.step}{total}{phase}{rate}{device} · data {event.data_term:.2e} "
            f"wpp {event.wpp_term:.2e}{logdet}",
        )
    return None


def _train_model(
    lr: Any,
    reference: Any,
    operator: Any,
    config: Any,
    out: Path | None,
    resume: Any = None,
    normalisation: dict[str, Any] | None = None,
    label: str = "train",
    data_parallel: Any = None,
) -> tuple[Any, int]:
    """Drive :func:`napari_wpp.core.training.train`, writing ``out`` at checkpoints and at the end.

    The model file is written in the worker thread, so Ctrl-C (which stops training after the
    current step) still ends with the file written. Returns the final event and the number of
    checkpoints written. Under ``torchrun`` (``data_parallel`` with several ranks) only rank 0
    shows progress and writes ``out``.
    """
    from napari_wpp.core.training import TrainingCheckpoint, TrainingFinished, train

    written = [0]

    main_rank = data_parallel is None or data_parallel.is_main
    if not main_rank:
        out = None

    def events(stop: threading.Event) -> Iterable[Any]:
        for event in train(
            lr,
            reference,
            operator,
            config,
            stop=stop,
            resume=resume,
            normalisation=normalisation,
            data_parallel=data_parallel,
        ):
            if out is not None and isinstance(event, TrainingCheckpoint):
                _save_model(out, event.state)
                written[0] += 1
            elif out is not None and isinstance(event, TrainingFinished):
                _save_model(out, event.state)
            yield event

    final = _drive(
        events,
        _ProgressBar(label, silent=not main_rank),
        describe=_describe_training,
        finished=TrainingFinished,
        stopping="stopping after this step; the model file will still be written",
    )
    return final, written[0]


def _cmd_train(args: argparse.Namespace) -> int:
    """``napari-wpp train``; under ``torchrun`` one data-parallel rank of the run."""
    from napari_wpp.core import distributed

    if not distributed.launched():
        return _train_command(args, _check_device(args.device), None)
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = _check_device(distributed.rank_device(args.device, local_rank, world_size))
    data_parallel = distributed.init_from_environment(device)
    try:
        return _train_command(args, device, data_parallel)
    finally:
        distributed.shutdown()


def _train_command(args: argparse.Namespace, device: str, data_parallel: Any) -> int:
    import numpy as np

    from napari_wpp.core.intensity import Normalisation
    from napari_wpp.core.training import TrainingConfig

    out = _check_output(args.out, "model file", suffixes=(".safetensors",))
    if args.model is not None:
        _check_model_kind(args.model)
    resume = None
    if args.resume is not None:
        name = Path(args.resume).name
        resume = _load_resume(args.resume)
        kind = str(resume.kind)
        _check_prior_weight_flags(args, kind)
        operator = _resume_operator(args, resume, name)
        _check_resume_settings(args, resume, name)
    else:
        kind = args.model or "wppnet"
        _check_prior_weight_flags(args, kind)
        operator = _operator_from_args(args)
    lr_data = _read(args.lr_data, "LR data", ndims=(2, 3))
    ref_data = _read(args.reference, "reference", ndims=(2, 3))
    lr, ref = np.asarray(lr_data.array), np.asarray(ref_data.array)
    if resume is not None and resume.normalisation is not None:
        norm = Normalisation.from_dict(resume.normalisation)
        if np.dtype(norm.dtype) != lr.dtype:
            raise InputError(
                f"LR data {args.lr_data!r} are {lr.dtype} but {Path(args.resume).name} was "
                f"trained on {norm.dtype} data: resume with the same LR data"
            )
    else:
        norm = Normalisation.from_array(lr)
    lr_n = np.asarray(norm.apply(lr), dtype=np.float32)
    ref_n = np.asarray(Normalisation.from_array(ref).apply(ref), dtype=np.float32)

    d = TRAIN_DEFAULTS
    config = TrainingConfig(
        model=kind,
        lam=args.lam,
        rho=args.rho,
        mean_warmup=DEFAULT_MEAN_WARMUP if args.mean_warmup is None else args.mean_warmup,
        noise_std=DEFAULT_NOISE_STD if args.noise is None else args.noise,
        steps=args.steps,
        minutes=args.minutes,
        batch_size=args.batch_size,  # None: the device's default
        crop_size=args.crop_size or d["crop_size"],
        n_reference_patches=args.reference_patches,
        psi_passes=args.psi_passes,
        seed=args.seed if args.seed is not None else d["seed"],
        device=device,
        checkpoint_minutes=args.checkpoint_minutes or None,
    )
    main_rank = data_parallel is None or data_parallel.is_main
    if "auto" in (args.lam, args.rho) and resume is None and main_rank:
        flag = "--lambda" if args.lam == "auto" else "--rho"
        sys.stderr.write(f"choosing λ on the reference ({flag} auto)...\n")
        sys.stderr.flush()
    first_step = resume.step if resume is not None else 0
    final, checkpoints = _train_model(
        lr_n,
        ref_n,
        operator,
        config,
        out,
        resume=resume,
        normalisation=norm.to_dict(),
        data_parallel=data_parallel,
    )
    if not main_rank:  # rank 0 reports for all
        return EXIT_OK
    if data_parallel is not None and data_parallel.active:
        device = f"{device} ×{data_parallel.world_size}"
    state = final.state
    last = state.history[-1] if state.history else {}
    stopped = bool(final.stopped_early)
    q = int(operator.scale)
    losses = {k: last.get(k) for k in ("data_term", "wpp_term", "loss")}
    flow = state.kind == "wppflow"
    noise_std = (state.config or {}).get("noise_std", config.noise_std)
    weight_text = f"ρ = {state.lam:g}, σ = {noise_std:g}" if flow else f"λ = {state.lam:g}"
    loss_text = (
        f"; data {losses['data_term']:.3e}, wpp {losses['wpp_term']:.3e}"
        if last
        else ""
    )
    _emit(
        args,
        {
            "out": str(out),
            "model": state.kind,
            "scale": q,
            "steps": int(state.step),
            "steps_this_run": int(state.step) - first_step,
            "seconds": float(state.elapsed_s),
            **losses,
            "lambda": None if flow else float(state.lam),
            "rho": float(state.lam) if flow else None,
            "noise_std": float(noise_std),
            "device": device,
            "stopped_early": stopped,
            "resumed_from": args.resume,
            "checkpoints": checkpoints,
        },
        f"wrote {out} ({state.kind} ×{q}) after {state.step} steps in {state.elapsed_s:.1f} s "
        f"({weight_text}, {device}){loss_text}" + (" [stopped early]" if stopped else ""),
    )
    return EXIT_OK


# --------------------------------------------------------------------------- predict


def _check_predict_output(path_text: str) -> tuple[Path, bool]:
    """The output path of ``predict`` and whether it is a zarr array (checked before work)."""
    path = Path(path_text).expanduser()
    if path.suffix.lower() != ".zarr":
        return _check_output(path_text, suffixes=(".tif", ".tiff", ".zarr")), False
    parent = path.parent
    if not parent.is_dir():
        raise InputError(
            f"output folder {str(parent)!r} does not exist: create it first or choose another path"
        )
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder {str(parent)!r} is not writable: choose another path")
    if path.exists() and not _replaceable_zarr(path):
        raise InputError(
            f"output {path_text!r} exists and is not a zarr array: choose another path"
        )
    return path, True


def _replaceable_zarr(path: Path) -> bool:
    """Whether ``path`` is an empty folder or a zarr array/group (zarr v2 or v3 metadata)."""
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    return any((path / name).is_file() for name in (".zarray", ".zgroup", "zarr.json"))


def _model_for_prediction(path_text: str) -> tuple[dict[str, Any], Any]:
    """Metadata and state of a model file that ``predict`` can run."""
    from napari_wpp.io import load_model, read_model_metadata

    meta = read_model_metadata(path_text)
    kind = meta.get("kind")
    name = Path(path_text).name
    if kind not in TRAINABLE_MODELS:
        raise InputError(
            f"{name} holds a model of unknown kind {kind!r}: update napari-wpp or use a "
            f"{' or '.join(TRAINABLE_MODELS)} model"
        )
    return meta, load_model(path_text, device="cpu")


def _check_flow_flags(args: argparse.Namespace, kind: str, name: str) -> None:
    """Refuse the sampling flags of ``predict`` for a model that draws no samples."""
    if kind == "wppflow":
        return
    given = [
        flag
        for flag, value in (
            ("--samples", args.samples),
            ("--temperature", args.temperature),
            ("--seed", args.seed),
            ("--save-samples", args.save_samples or None),
        )
        if value is not None
    ]
    if given:
        raise InputError(
            f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for wppflow models but "
            f"{name} is a {kind}, which draws no samples: drop {given[0]} or use a wppflow "
            f"model (train one with '{PROG} train --model wppflow')"
        )


def _suffixed_path(out: Path, label: str) -> Path:
    """``<OUT stem>_<label><ext>`` next to ``out``."""
    return out.with_name(f"{out.stem}_{label}{out.suffix}")


def _predict_normalisation(dtype: Any, recorded: Any, sample: Callable[[], Any]) -> tuple[Any, str]:
    """The input's normalisation and how it was chosen (see ``predict --help``)."""
    import numpy as np

    from napari_wpp.core.intensity import Normalisation

    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        return Normalisation.from_array(np.zeros(1, dtype)), f"{dtype} range"
    try:
        recorded_kind = np.dtype(str(recorded.get("dtype"))).kind
    except (AttributeError, TypeError):  # no (valid) normalisation recorded
        recorded_kind = None
    if recorded_kind == "f":
        norm = Normalisation.from_dict(recorded)
        return norm, f"model's range [{norm.low:g}, {norm.high:g}]"
    norm = Normalisation.from_array(sample())
    return norm, f"input's percentiles [{norm.low:g}, {norm.high:g}]"


def _sample_slices(array: Any, limit: int = 16) -> Any:
    """Up to ``limit`` evenly spaced slices along axis 0 (all of a 2D array), in memory."""
    import numpy as np

    if len(array.shape) == 2:
        return np.asarray(array[...])
    index = np.unique(np.linspace(0, array.shape[0] - 1, min(limit, array.shape[0])).astype(int))
    return np.stack([np.asarray(array[int(i)]) for i in index])


def _grown_axes(ndim: int, axis: int | None) -> list[bool]:
    """Which axes are superresolved: both of a 2D image, all but ``axis`` of a volume."""
    if ndim == 2:
        return [True, True]
    return [i != axis for i in range(3)]


def _describe_inference(event: Any) -> tuple[float, str] | None:
    from napari_wpp.core.inference import InferenceProgress

    if isinstance(event, InferenceProgress):
        return event.done / max(event.total, 1), f"slice {event.done}/{event.total}"
    return None


def _replace_zarr(tmp: Path, out: Path) -> None:
    """Move the finished zarr array ``tmp`` to ``out`` (replacing a zarr array there)."""
    import shutil

    if out.exists():
        if not _replaceable_zarr(out):
            raise InputError(f"output {str(out)!r} is not a zarr array any more: not replaced")
        shutil.rmtree(out)
    os.replace(tmp, out)


def _cmd_predict(args: argparse.Namespace) -> int:
    import shutil

    import numpy as np

    from napari_wpp.core.inference import (
        InferenceFinished,
        output_shape,
        superresolve,
    )

    out, out_zarr = _check_predict_output(args.out)
    device = _check_device(args.device)
    meta, state = _model_for_prediction(args.model)
    _check_flow_flags(args, str(state.kind), Path(args.model).name)
    flow = state.kind == "wppflow"
    extra_outputs: dict[str, Path] = {}
    if flow:
        extra_outputs["std"] = _suffixed_path(out, "std")
        if args.save_samples:
            extra_outputs["samples"] = _suffixed_path(out, "samples")
        for path in extra_outputs.values():
            _check_predict_output(str(path))
    model = state.model
    q = int(model.scale)

    in_path = Path(args.input).expanduser()
    in_zarr = in_path.suffix.lower() == ".zarr" or in_path.is_dir()
    pixel_size: list[float] | None = None
    unit = None
    if in_zarr:
        from napari_wpp.io import open_zarr_array

        source = open_zarr_array(in_path)
        if out_zarr and out.resolve() == in_path.resolve():
            raise InputError(f"--out {args.out!r} is the input: choose another output path")
        shape, dtype = tuple(int(n) for n in source.shape), np.dtype(source.dtype)
        attrs = dict(source.attrs)
        size = attrs.get("pixel_size")
        if isinstance(size, (list, tuple)) and len(size) == len(shape):
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in size):
                pixel_size = [float(v) for v in size]
                unit = attrs.get("unit") if isinstance(attrs.get("unit"), str) else None
        what = f"zarr array {args.input!r}"
    else:
        data = _read(args.input, "input image", ndims=(2, 3))
        array = np.asarray(data.array)
        shape, dtype = array.shape, array.dtype
        if data.pixel_size is not None:
            pixel_size = [float(v) for v in data.pixel_size]  # (y, x)
        unit = data.unit
        what = f"input image {args.input!r}"
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise InputError(
            f"{what} has shape {tuple(shape)}: give a 2D image or a 3D stack (Z, Y, X)"
        )
    if dtype.kind not in "uif":
        raise InputError(f"{what} has dtype {dtype}: give a grayscale integer or float image")
    ndim = len(shape)
    if ndim == 2:
        if args.axis not in (None, 0):
            raise InputError(f"--axis is for 3D stacks but {what} is 2D: drop --axis")
        axis = None
    else:
        axis = 0 if args.axis is None else args.axis
        if not -3 <= axis < 3:
            raise InputError(
                f"--axis {args.axis} is out of range for the 3D {what}: use 0, 1 or 2"
            )
        axis %= 3
    recorded = meta.get("normalisation")
    norm, how = _predict_normalisation(
        dtype, recorded, lambda: _sample_slices(source) if in_zarr else array
    )
    if isinstance(recorded, dict) and dtype.kind in "ui" and recorded.get("dtype") != dtype.name:
        sys.stderr.write(
            f"note: the model was trained on {recorded.get('dtype')} data; {what} is {dtype} "
            f"and is normalised by its own dtype range\n"
        )
    grow = _grown_axes(ndim, axis)
    result_shape = output_shape(shape, q, axis or 0)
    slices = 1 if ndim == 2 else shape[axis]
    if flow:
        for path in (out, *extra_outputs.values()):
            if path.resolve() == in_path.resolve():
                raise InputError(f"output {str(path)!r} is the input: choose another --out")
        return _predict_flow(
            args,
            state,
            out,
            extra_outputs,
            out_zarr,
            in_path,
            source if in_zarr else array,
            in_zarr,
            norm,
            how,
            axis,
            tuple(result_shape),
            slices,
            pixel_size,
            unit,
            device,
        )

    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial.zarr") if out_zarr else None
    if tmp is not None and tmp.exists():
        shutil.rmtree(tmp)
    try:
        if in_zarr and out_zarr:
            from napari_wpp.io import superresolve_zarr

            finished = _drive(
                lambda stop: superresolve_zarr(
                    model,
                    in_path,
                    tmp,
                    axis=axis or 0,
                    tile=args.tile,
                    normalisation=norm,
                    device=device,
                    stop=stop,
                    slices_per_chunk=args.batch_size,
                ),
                _ProgressBar("predict"),
                describe=_describe_inference,
                finished=InferenceFinished,
                stopping=f"stopping after this batch; {out} will not be written",
            )
        else:
            volume = np.asarray(source[...]) if in_zarr else array
            finished = _drive(
                lambda stop: superresolve(
                    model,
                    volume,
                    axis=axis or 0,
                    tile=args.tile,
                    batch_size=args.batch_size,
                    device=device,
                    normalisation=norm,
                    stop=stop,
                ),
                _ProgressBar("predict"),
                describe=_describe_inference,
                finished=InferenceFinished,
                stopping=f"stopping after this batch; {out} will not be written",
            )
        if finished.stopped_early:
            _fail(f"interrupted: {out} was not written (no partial output is kept)")
            return EXIT_INTERRUPTED
        if out_zarr:
            if finished.result is not None:  # an in-memory result goes into a new zarr array
                from napari_wpp import __version__
                from napari_wpp.io import create_zarr_array

                attrs: dict[str, Any] = {
                    "napari_wpp": {
                        "scale": q,
                        "axis": axis,
                        "source": str(in_path.resolve()),
                        "model": {"kind": state.kind, "config": state.model_config},
                        "model_file": str(Path(args.model).expanduser().resolve()),
                        "tile": args.tile,
                        "normalisation": norm.to_dict(),
                        "version": __version__,
                        "complete": True,
                        "slices_done": slices,
                    }
                }
                if pixel_size is not None and len(pixel_size) == ndim:
                    attrs["pixel_size"] = [
                        v / q if g else v for v, g in zip(pixel_size, grow, strict=True)
                    ]
                    if unit:
                        attrs["unit"] = unit
                chunks = tuple(
                    1 if ndim == 3 and i == axis else n for i, n in enumerate(result_shape)
                )
                target = create_zarr_array(tmp, result_shape, finished.result.dtype, chunks, attrs)
                target[...] = finished.result
            _replace_zarr(tmp, out)
            tmp = None
            out_dtype = np.dtype(dtype)
        else:
            result = finished.result
            tiff_size = None
            if pixel_size is not None:
                yx, grow_yx = pixel_size[-2:], grow[-2:]
                tiff_size = tuple(v / q if g else v for v, g in zip(yx, grow_yx, strict=True))
            _write_image(out, result, pixel_size=tiff_size, unit=unit)
            out_dtype = result.dtype
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    axes = "both axes" if ndim == 2 else f"the axes other than {axis}"
    _emit(
        args,
        {
            "out": str(out),
            "shape": list(result_shape),
            "dtype": str(out_dtype),
            "scale": q,
            "axis": axis,
            "slices": slices,
            "seconds": float(finished.elapsed_s),
            "device": device,
            "normalisation": how,
            "model": str(args.model),
        },
        f"wrote {out} ({_shape_text(result_shape)}, {out_dtype}, ×{q} on {axes}) in "
        f"{finished.elapsed_s:.1f} s on {device} (intensities: {how})",
    )
    return EXIT_OK


def _describe_sampling(event: Any) -> tuple[float, str] | None:
    from napari_wpp.core.inference import SamplingProgress

    if isinstance(event, SamplingProgress):
        per_slice = max(event.total // max(event.slices_total, 1), 1)
        detail = f"sample {event.done}/{event.total}"
        if event.slices_total > 1:
            current = min(event.slices_done + 1, event.slices_total)
            done_here = event.done - (current - 1) * per_slice
            detail = f"slice {current}/{event.slices_total} sample {done_here}/{per_slice}"
        return event.done / max(event.total, 1), detail
    return None


def _predict_flow(
    args: argparse.Namespace,
    state: Any,
    out: Path,
    extra_outputs: dict[str, Path],
    out_zarr: bool,
    in_path: Path,
    source: Any,
    in_zarr: bool,
    norm: Any,
    how: str,
    axis: int | None,
    result_shape: tuple[int, ...],
    slices: int,
    pixel_size: list[float] | None,
    unit: str | None,
    device: str,
) -> int:
    """``predict`` with a WPPFlow: mean, std and (optionally) samples of K posterior samples."""
    import shutil

    import numpy as np

    from napari_wpp.core.inference import SamplingFinished, sample_volume

    model = state.model
    q = int(model.scale)
    k = args.samples if args.samples is not None else DEFAULT_FLOW_SAMPLES
    temperature = 1.0 if args.temperature is None else float(args.temperature)
    seed = 0 if args.seed is None else int(args.seed)
    ndim = len(result_shape)
    grow = _grown_axes(ndim, axis)
    outputs = {"mean": out, **extra_outputs}
    stopping = f"stopping after this batch; {out} will not be written"
    tmps: dict[str, Path] = {}
    if out_zarr:
        for name, path in outputs.items():
            tmps[name] = path.with_name(f".{path.name}.{os.getpid()}.partial.zarr")
            if tmps[name].exists():
                shutil.rmtree(tmps[name])
    try:
        if in_zarr and out_zarr:
            from napari_wpp.io import sample_zarr

            finished = _drive(
                lambda stop: sample_zarr(
                    model,
                    in_path,
                    tmps["mean"],
                    tmps["std"],
                    k,
                    samples_path=tmps.get("samples"),
                    axis=axis or 0,
                    temperature=temperature,
                    seed=seed,
                    batch_size=args.batch_size,
                    tile=args.tile,
                    normalisation=norm,
                    device=device,
                    stop=stop,
                ),
                _ProgressBar("predict"),
                describe=_describe_sampling,
                finished=SamplingFinished,
                stopping=stopping,
            )
        else:
            volume = np.asarray(source[...]) if in_zarr else source
            finished = _drive(
                lambda stop: sample_volume(
                    model,
                    volume,
                    k,
                    axis=axis or 0,
                    temperature=temperature,
                    seed=seed,
                    batch_size=args.batch_size,
                    tile=args.tile,
                    keep_samples="samples" in outputs,
                    device=device,
                    normalisation=norm,
                    stop=stop,
                ),
                _ProgressBar("predict"),
                describe=_describe_sampling,
                finished=SamplingFinished,
                stopping=stopping,
            )
        if finished.stopped_early:
            _fail(f"interrupted: {out} was not written (no partial output is kept)")
            return EXIT_INTERRUPTED
        result = finished.result
        arrays = {} if result is None else {
            "mean": result.mean,
            "std": result.std,
            "samples": result.samples,
        }
        if out_zarr:
            if result is not None:
                from napari_wpp import __version__
                from napari_wpp.io import create_zarr_array

                for name in outputs:
                    array = arrays[name]
                    lead = 1 if name == "samples" else 0
                    attrs: dict[str, Any] = {
                        "napari_wpp": {
                            "scale": q,
                            "axis": axis,
                            "source": str(in_path.resolve()),
                            "model": {"kind": state.kind, "config": state.model_config},
                            "model_file": str(Path(args.model).expanduser().resolve()),
                            "statistic": name,
                            "k": k,
                            "temperature": temperature,
                            "seed": seed,
                            "tile": args.tile,
                            "normalisation": norm.to_dict(),
                            "version": __version__,
                            "complete": True,
                            "slices_done": slices,
                        }
                    }
                    if pixel_size is not None and len(pixel_size) == ndim:
                        attrs["pixel_size"] = [1.0] * lead + [
                            v / q if g else v for v, g in zip(pixel_size, grow, strict=True)
                        ]
                        if unit:
                            attrs["unit"] = unit
                    chunks = (1,) * lead + tuple(
                        1 if ndim == 3 and i == axis else n for i, n in enumerate(result_shape)
                    )
                    target = create_zarr_array(tmps[name], array.shape, array.dtype, chunks, attrs)
                    target[...] = array
            for name, path in outputs.items():
                _replace_zarr(tmps.pop(name), path)
        else:
            assert result is not None
            tiff_size = None
            if pixel_size is not None:
                yx, grow_yx = pixel_size[-2:], grow[-2:]
                tiff_size = tuple(v / q if g else v for v, g in zip(yx, grow_yx, strict=True))
            for name, path in outputs.items():
                _write_image(path, arrays[name], pixel_size=tiff_size, unit=unit)
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    mean_dtype = np.dtype(source.dtype)
    std_units = (
        f"grey levels of {mean_dtype}" if mean_dtype.kind in "ui" else "input intensity units"
    )
    written = ", ".join(f"{name} {path}" for name, path in outputs.items())
    axes = "both axes" if ndim == 2 else f"the axes other than {axis}"
    _emit(
        args,
        {
            "out": str(out),
            "std": str(outputs["std"]),
            "samples": str(outputs["samples"]) if "samples" in outputs else None,
            "k": k,
            "temperature": temperature,
            "seed": seed,
            "shape": list(result_shape),
            "dtype": str(mean_dtype),
            "std_dtype": "float32",
            "std_units": std_units,
            "scale": q,
            "axis": axis,
            "slices": slices,
            "seconds": float(finished.elapsed_s),
            "device": device,
            "normalisation": how,
            "model": str(args.model),
            "kind": state.kind,
        },
        f"wrote the mean and std of {k} posterior samples (temperature {temperature:g}, seed "
        f"{seed}): {written} ({_shape_text(result_shape)}, ×{q} on {axes}; std float32 in "
        f"{std_units}) in {finished.elapsed_s:.1f} s on {device} (intensities: {how})",
    )
    return EXIT_OK


# --------------------------------------------------------------------------- evaluate


def normalise_for_evaluation(pred: Any, gt: Any) -> tuple[Any, Any, str]:
    """Put a prediction and its ground truth on a common [0, 1] scale.

    Parameters
    ----------
    pred, gt
        Arrays of the same shape (any numeric dtypes).

    Returns
    -------
    pred01, gt01, how
        float32 arrays and a short description of the mapping used.

    Notes
    -----
    Integer arrays are divided by their dtype's maximum (e.g. 255 for uint8; signed integers
    map their dtype range onto [0, 1]). A float GT within [0, 1] is used as is; otherwise GT's
    min/max define the range, and a float PRED is mapped with the same affine map. A float
    PRED with an integer GT is used as is when it lies in [0, 1], otherwise on GT's dtype scale.
    """
    pred_range, gt_range, how = _evaluation_ranges(pred, gt)
    return _to01(pred, *pred_range), _to01(gt, *gt_range), how


def _evaluation_ranges(
    pred: Any, gt: Any
) -> tuple[tuple[float, float], tuple[float, float], str]:
    """The ranges ``(lo, hi)`` that :func:`normalise_for_evaluation` maps onto [0, 1].

    Returns PRED's range, GT's range and a short description. A standard deviation or samples
    in PRED's units are put on the same scale by PRED's range.
    """
    import numpy as np

    def dtype_range(dtype: Any) -> tuple[float, float]:
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)

    if gt.dtype.kind in "ui":
        gt_range = dtype_range(gt.dtype)
        how = f"{gt.dtype} range [{gt_range[0]:g}, {gt_range[1]:g}]"
        if pred.dtype.kind in "ui":
            return dtype_range(pred.dtype), gt_range, how
        if float(pred.min()) >= 0.0 and float(pred.max()) <= 1.0:
            return (0.0, 1.0), gt_range, how + "; PRED taken as [0, 1]"
        return gt_range, gt_range, how
    gmin, gmax = float(gt.min()), float(gt.max())
    if gmin >= 0.0 and gmax <= 1.0:
        gt_range, how = (0.0, 1.0), "float [0, 1]"
    elif gmax > gmin:
        gt_range, how = (gmin, gmax), f"GT min/max [{gmin:g}, {gmax:g}]"
    else:
        raise InputError(
            f"ground truth is constant ({gmin:g}) outside [0, 1]: metrics need a value range"
        )
    pred_range = dtype_range(pred.dtype) if pred.dtype.kind in "ui" else gt_range
    return pred_range, gt_range, how


def _to01(array: Any, lo: float, hi: float) -> Any:
    import numpy as np

    return ((np.asarray(array, dtype=np.float64) - lo) / (hi - lo)).astype(np.float32)


def _read_std(path_text: str, pred_shape: tuple[int, ...], pred_range: tuple[float, float]) -> Any:
    """Read ``--std`` and put it on PRED's [0, 1] scale (divided by PRED's range, not shifted)."""
    import numpy as np

    std = np.asarray(_read(path_text, "--std image").array)
    if std.shape != pred_shape:
        raise InputError(
            f"--std image {_shape_text(std.shape)} and PRED {_shape_text(pred_shape)} differ in "
            "shape: give the standard deviation map of PRED"
        )
    if float(std.min()) < 0.0:
        raise InputError(
            f"--std image {path_text!r} has negative values (min {float(std.min()):g}): "
            "give a standard deviation map (>= 0)"
        )
    lo, hi = pred_range
    return (std.astype(np.float64) / (hi - lo)).astype(np.float32)


def _read_samples(
    path_text: str, gt_shape: tuple[int, ...], pred_range: tuple[float, float]
) -> Any:
    """Read ``--samples`` (K, H, W) and map them like PRED (integer files by their dtype)."""
    import numpy as np

    samples = np.asarray(_read(path_text, "--samples stack").array)
    if samples.ndim != len(gt_shape) + 1 or samples.shape[1:] != tuple(gt_shape):
        raise InputError(
            f"--samples stack {_shape_text(samples.shape)} does not hold samples of GT "
            f"{_shape_text(gt_shape)}: stack the K samples on the first axis, "
            f"shape K×{_shape_text(gt_shape)}"
        )
    if samples.dtype.kind in "ui":
        info = np.iinfo(samples.dtype)
        return _to01(samples, float(info.min), float(info.max))
    return _to01(samples, *pred_range)


def _metrics(pred01: Any, gt01: Any, crop: int) -> dict[str, float]:
    """Metrics of a 2D pair, or the mean over the slices of a 3D pair."""
    from napari_wpp.core.metrics import evaluate

    return {k: float(v) for k, v in evaluate(pred01, gt01, crop=crop).items()}


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    pred_data = _read(args.pred, "PRED image")
    gt_data = _read(args.gt, "GT image")
    pred, gt = np.asarray(pred_data.array), np.asarray(gt_data.array)
    if pred.shape != gt.shape:
        raise InputError(
            f"PRED {_shape_text(pred.shape)} and GT {_shape_text(gt.shape)} differ in shape: "
            "compare images of the same size"
        )
    if 2 * args.crop + 7 > min(gt.shape[-2:]):
        raise InputError(
            f"--crop {args.crop} leaves too little of a {_shape_text(gt.shape[-2:])} image: "
            f"use --crop {max(0, (min(gt.shape[-2:]) - 7) // 2)} or less"
        )
    if args.samples is not None and gt.ndim != 2:
        raise InputError(
            f"--samples needs 2D images but GT is {_shape_text(gt.shape)}: evaluate the samples "
            "of one slice as a (K, H, W) stack"
        )
    pred_range, gt_range, how = _evaluation_ranges(pred, gt)
    pred01, gt01 = _to01(pred, *pred_range), _to01(gt, *gt_range)
    std01 = None if args.std is None else _read_std(args.std, pred.shape, pred_range)
    samples01 = None if args.samples is None else _read_samples(args.samples, gt.shape, pred_range)
    metrics = _metrics(pred01, gt01, args.crop)
    payload: dict[str, Any] = {
        "psnr": metrics["psnr"],
        "ssim": metrics["ssim"],
        "blur_effect": metrics["blur_effect"],
        "crop": args.crop,
        "normalisation": how,
    }
    lines = [
        f"PSNR         {metrics['psnr']:.2f} dB",
        f"SSIM         {metrics['ssim']:.4f}",
        f"blur effect  {metrics['blur_effect']:.4f}",
    ]
    if std01 is not None:
        figures = _uncertainty_figures(gt01, pred01, std01, args.crop)
        payload["uncertainty"] = figures
        lines += _uncertainty_lines(figures)
    if samples01 is not None:
        payload["samples"] = _sample_figures(samples01, gt01, args.crop)
        lines.append(
            f"samples      PSNR {payload['samples']['psnr_mean']:.2f} dB, "
            f"SSIM {payload['samples']['ssim_mean']:.4f} "
            f"(mean of {payload['samples']['count']} single samples)"
        )
    lines.append(f"(crop {args.crop} px, {how})")
    _emit(args, payload, "\n".join(lines))
    return EXIT_OK


def _uncertainty_figures(gt01: Any, pred01: Any, std01: Any, crop: int) -> dict[str, Any]:
    """Calibration of the std against the actual error and the edge/flat std ratio."""
    from napari_wpp.core.uncertainty import calibration, edge_flat_std_ratio

    figures: dict[str, Any] = dict(calibration(gt01, pred01, std01, crop=crop))
    figures.update(edge_flat_std_ratio(gt01, std01, crop=crop))
    figures["units"] = "PRED's [0, 1] evaluation scale"
    return figures


def _uncertainty_lines(figures: dict[str, Any]) -> list[str]:
    def correlation(key: str) -> str:
        value = float(figures[key])
        return f"{value:.3f}" if math.isfinite(value) else "n/a (constant std or error)"

    coverage = " / ".join(f"{100 * figures[f'coverage_{k}sd']:.1f}" for k in (1, 2, 3))
    expected = " / ".join(f"{100 * figures[f'expected_{k}sd']:.1f}" for k in (1, 2, 3))
    return [
        f"coverage     {coverage} % of GT within 1/2/3 std (calibrated: {expected} %)",
        f"std ~ error  Pearson {correlation('std_error_pearson')}, "
        f"Spearman {correlation('std_error_spearman')}",
        f"mean std     {figures['mean_std']:.4f} (mean |error| {figures['mean_abs_error']:.4f}, "
        "[0, 1] scale)",
        f"edge/flat    std ratio {figures['edge_flat_ratio']:.2f} "
        f"(strongest {100 * figures['edge_fraction']:.0f} % edges {figures['edge_mean_std']:.4f}, "
        f"flattest {100 * figures['flat_fraction']:.0f} % {figures['flat_mean_std']:.4f})",
    ]


def _sample_figures(samples01: Any, gt01: Any, crop: int) -> dict[str, Any]:
    """PSNR and SSIM of every single sample against GT, and their means."""
    import numpy as np

    from napari_wpp.core.metrics import psnr, ssim

    psnrs = [psnr(sample, gt01, crop=crop) for sample in samples01]
    ssims = [ssim(sample, gt01, crop=crop) for sample in samples01]
    return {
        "count": len(psnrs),
        "psnr_mean": float(np.mean(psnrs)),
        "ssim_mean": float(np.mean(ssims)),
        "psnr": psnrs,
        "ssim": ssims,
    }


# --------------------------------------------------------------------------- demo


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


def _cmd_demo(args: argparse.Namespace) -> int:
    folder = Path(args.out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out {args.out!r} is a file: give a folder")
    if not folder.parent.is_dir():
        raise InputError(
            f"parent folder {str(folder.parent)!r} of --out does not exist: create it first"
        )
    device = _check_device(args.device)
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
    finished = _drive(
        lambda stop: reconstruct_variational(lr, reference, operator, config, stop=stop),
        _ProgressBar("reconstruct"),
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
    trained, _ = _train_model(lr_stack, reference, operator, train_config, None, label="train")
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
        _write_image(files[name], image)
    files["model"] = folder / "wppnet.safetensors"
    _save_model(files["model"], state)

    def title(name: str, label: str) -> str:
        m = scores[name]
        if name == "truth":
            return f"{label}\nblur {m['blur_effect']:.3f}"
        return f"{label}\n{m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}, blur {m['blur_effect']:.3f}"

    lr_view = np.kron(np.clip(lr, 0, 1), np.ones((4, 4), dtype=np.float32))
    files["figure"] = folder / "comparison.png"
    _write_atomically(
        files["figure"],
        lambda tmp: _comparison_figure(
            tmp,
            [
                (f"LR ×4 ({_shape_text(lr.shape)})", lr_view),
                (title("bicubic", "bicubic"), np.clip(bicubic, 0, 1)),
                (title("wpp", f"variational WPP ({finished.iterations} it)"), np.clip(wpp, 0, 1)),
                (title("wppnet", f"WPPNet ({state.step} steps)"), np.clip(wppnet, 0, 1)),
                (title("truth", "truth"), truth),
            ],
        ),
    )
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
    _emit(
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
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover - python -m napari_wpp.cli
    sys.exit(main())
