"""``napari-wpp train``: train a WPPNet or a WPPFlow on LR data."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from napari_wpp.cli._common import (
    EXIT_OK,
)
from napari_wpp.cli._common import ProgressBar as _ProgressBar
from napari_wpp.cli._common import add_operator_flags as _add_operator_flags
from napari_wpp.cli._common import check_device as _check_device
from napari_wpp.cli._common import check_output as _check_output
from napari_wpp.cli._common import drive as _drive
from napari_wpp.cli._common import emit as _emit
from napari_wpp.cli._common import lambda_type as _lambda
from napari_wpp.cli._common import minutes_type as _minutes
from napari_wpp.cli._common import noise_type as _noise
from napari_wpp.cli._common import number_type as _number
from napari_wpp.cli._common import one_line as _one_line
from napari_wpp.cli._common import operator_from_args as _operator_from_args
from napari_wpp.cli._common import positive_types as _positive
from napari_wpp.cli._common import read_input as _read
from napari_wpp.cli._common import seed_type as _seed
from napari_wpp.core.errors import InputError

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


_rho = _number(float, 0.0, True, "e.g. --rho 100")


_steps = _number(int, 1, True, "e.g. --steps 500")


_checkpoint_minutes = _number(float, 0.0, True, "e.g. --checkpoint-minutes 5 (0: only at the end)")


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``train`` subcommand to ``sub``."""
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
    p.add_argument("--out", required=True, metavar="MODEL.safetensors", help="model file to write")
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
    loss_text = f"; data {losses['data_term']:.3e}, wpp {losses['wpp_term']:.3e}" if last else ""
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
