"""``napari-wpp train``: train a WPPNet or a WPPFlow on LR data, or a PatchNR prior.

Train a WPPNet (or, with --model wppflow, a conditional normalizing flow that draws posterior
samples) on a 2D LR image or a 3D LR stack with the Wasserstein Patch Prior of an HR reference
of the same material. The model file records the operator, the LR data's intensity normalisation
and the training state; it is written every --checkpoint-minutes and at the end, also when
Ctrl-C stops the run. --model patchnr trains a learned patch prior for `reconstruct --prior` on
the reference's patches, or without --reference on the LR data's own (zero-shot).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from napari_wpp.cli import _common
from napari_wpp.core.config import CHECKPOINT_MINUTES, default_of, help_text
from napari_wpp.core.errors import InputError

#: Training flags whose default and help come from the spec: (flag, argparse dest, field).
SPEC_FLAGS = (
    ("--model", "model", "model"),
    ("--minutes", "minutes", "minutes"),
    ("--steps", "steps", "steps"),
    ("--lambda", "lam", "lam"),
    ("--rho", "rho", "rho"),
    ("--mean-warmup", "mean_warmup", "mean_warmup"),
    ("--calibration-holdout", "calibration_holdout", "calibration_holdout"),
    ("--noise", "noise", "noise_std"),
    ("--batch-size", "batch_size", "batch_size"),
    ("--crop-size", "crop_size", "crop_size"),
    ("--reference-patches", "reference_patches", "n_reference_patches"),
    ("--psi-passes", "psi_passes", "psi_passes"),
    ("--patch-distance", "patch_distance", "patch_distance"),
    ("--projections", "projections", "projections"),
    ("--hidden", "hidden", "patchnr_hidden"),
    ("--patch-batch", "patch_batch", "patchnr_batch"),
    ("--device", "device", "device"),
    ("--seed", "seed", "seed"),
    ("--no-lr-denoise", "lr_denoise", "lr_denoise"),
)


def _spec() -> type:
    """The spec class of a training run (looked up at call time)."""
    from napari_wpp.core import config

    return config.TrainSpec


def _help(name: str, extra: str = "") -> str:
    """The help of the spec field ``name`` (with its default), then ``extra``."""
    return help_text(_spec(), name) + extra


_rho = _common.number_type(float, 0.0, True, "e.g. --rho 100")
_steps = _common.number_type(int, 1, True, "e.g. --steps 500")
_positive_int = _common.number_type(int, 1, True, "e.g. --hidden 256")
_checkpoint_minutes = _common.number_type(
    float, 0.0, True, "e.g. --checkpoint-minutes 5 (0: only at the end)"
)


def add_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """The options of ``napari-wpp train``."""
    p.add_argument(
        "--lr-data",
        metavar="LR",
        help="LR image (2D) or stack (3D), TIFF or PNG (a patchnr with --reference needs none)",
    )
    p.add_argument(
        "--reference",
        metavar="REF",
        help="HR reference image or stack (a patchnr without it learns the LR data: zero-shot)",
    )
    _common.add_operator_flags(p)
    p.add_argument("--out", required=True, metavar="MODEL.safetensors", help="model file to write")
    p.add_argument(
        "--model", metavar="KIND", help=_help("model", "; --resume keeps the file's kind")
    )
    p.add_argument("--minutes", type=_common.minutes_type, metavar="M", help=_help("minutes"))
    p.add_argument("--steps", type=_steps, metavar="N", help=_help("steps"))
    p.add_argument("--lambda", dest="lam", type=_train_lambda, metavar="L", help=_help("lam"))
    p.add_argument("--rho", type=_train_rho, metavar="R", help=_help("rho"))
    p.add_argument("--mean-warmup", type=_mean_warmup, metavar="F", help=_help("mean_warmup"))
    p.add_argument(
        "--calibration-holdout",
        type=_calibration_holdout,
        metavar="F",
        help=_help("calibration_holdout"),
    )
    p.add_argument(
        "--noise",
        "--noise-std",
        dest="noise",
        type=_common.noise_type,
        metavar="SIGMA",
        help=_help("noise_std"),
    )
    for flag, metavar, field_name in (
        ("--batch-size", "B", "batch_size"),
        ("--crop-size", "C", "crop_size"),
        ("--reference-patches", "M", "n_reference_patches"),
        ("--psi-passes", "P", "psi_passes"),
    ):
        positive = _common.positive_types[flag]
        p.add_argument(flag, type=positive, metavar=metavar, help=_help(field_name))
    _common.add_patch_distance_flags(p, _spec(), spec_defaults=False)
    p.add_argument("--hidden", type=_positive_int, metavar="H", help=_help("patchnr_hidden"))
    p.add_argument("--patch-batch", type=_positive_int, metavar="B", help=_help("patchnr_batch"))
    p.add_argument("--device", metavar="DEVICE", help=_help("device"))
    p.add_argument("--seed", type=_common.seed_type, metavar="N", help=_help("seed"))
    p.add_argument(
        "--no-lr-denoise",
        dest="lr_denoise",
        action="store_const",
        const=False,
        help="do not keep the operator's LR noise model (a wppnet then superresolves the LR "
        "input as it is; operators estimated from a registered pair carry one)",
    )
    p.add_argument(
        "--resume",
        metavar="MODEL",
        help="continue the run saved in this model file (same operator and settings)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out model file (without it, an existing file other than "
        "the --resume one is refused)",
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


def _mean_warmup(text: str) -> float:
    """``--mean-warmup`` of ``train``: a share of the budget in [0, 1)."""
    hint = "a share of the budget in [0, 1), e.g. --mean-warmup 0.3 (0: no warm-up)"
    value = _common.parsed(float, text, f"expected {hint}, got {text!r}")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be {hint}, got {text}")
    return value


def _calibration_holdout(text: str) -> float:
    """``--calibration-holdout`` of ``train``: a share of the reference's columns in [0, 0.5]."""
    hint = "a share of the reference's columns in [0, 0.5], e.g. 0.15 (0: no calibration)"
    value = _common.parsed(float, text, f"expected {hint}, got {text!r}")
    if not 0.0 <= value <= 0.5:
        raise argparse.ArgumentTypeError(f"must be {hint}, got {text}")
    return value


def _number_or_auto(number: Callable[[str], float], example: str) -> Callable[[str], float | str]:
    """An argparse ``type``: ``auto``, or a number ≥ 0 that ``number`` reads."""

    def parse(text: str) -> float | str:
        if text.strip().lower() == "auto":
            return "auto"
        try:
            return number(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"expected a number ≥ 0 or 'auto', got {text!r}: {example}"
            ) from None

    return parse


#: ``--lambda`` of ``train``: a number ≥ 0 or ``auto``.
_train_lambda = _number_or_auto(_common.lambda_type, "e.g. --lambda 0.02 or --lambda auto")
#: ``--rho`` of ``train``: a number ≥ 0 or ``auto``.
_train_rho = _number_or_auto(_rho, "e.g. --rho 100 or --rho auto")


def _given_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The spec fields set by flags (the others take the spec's defaults)."""
    return {
        field: getattr(args, dest)
        for _flag, dest, field in SPEC_FLAGS
        if getattr(args, dest, None) is not None
    }


def _check_model_kind(kind: str) -> str:
    """The ``--model`` of ``train``: one of the trainable kinds."""
    from napari_wpp.core.config.training import TRAINABLE_MODELS

    if kind in TRAINABLE_MODELS:
        return kind
    raise InputError(f"unknown --model {kind!r}: use --model {' or '.join(TRAINABLE_MODELS)}")


def _check_prior_weight_flags(args: argparse.Namespace, kind: str) -> None:
    """``--lambda`` belongs to wppnet, ``--rho`` to wppflow; σ > 0 for a flow; the PatchNR
    flags to patchnr, which alone trains without a reference."""
    network_flags = (
        ("--lambda", args.lam),
        ("--rho", args.rho),
        ("--mean-warmup", args.mean_warmup),
        ("--calibration-holdout", args.calibration_holdout),
    )
    if kind == "patchnr":
        for flag, value in network_flags:
            if value is not None:
                raise InputError(
                    f"{flag} is a setting of wppnet/wppflow training: drop it for patchnr (its "
                    "weight is reconstruct's --patchnr-lambda)"
                )
    else:
        for flag, value in (("--hidden", args.hidden), ("--patch-batch", args.patch_batch)):
            if value is not None:
                raise InputError(f"{flag} belongs to patchnr: drop it, or add --model patchnr")
        if args.reference is None:
            raise InputError(
                f"a {kind} learns from an HR reference: give --reference REF (only --model "
                "patchnr trains without one, zero-shot on the LR data)"
            )
    if args.lr_data is None and kind != "patchnr":
        raise InputError(f"a {kind} learns from LR data: give --lr-data LR")
    if args.lr_data is None and args.reference is None:
        raise InputError(
            "a patchnr learns from --reference REF, or zero-shot from --lr-data LR: give one"
        )
    if kind == "wppnet" and args.rho is not None:
        raise InputError("--rho is the prior weight of wppflow: use --lambda with wppnet")
    if kind == "wppnet" and args.mean_warmup is not None:
        raise InputError("--mean-warmup belongs to wppflow: drop it, or add --model wppflow")
    if kind == "wppnet" and args.calibration_holdout is not None:
        raise InputError(
            "--calibration-holdout belongs to wppflow: drop it, or add --model wppflow"
        )
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


def _resume_operator(args: argparse.Namespace, state: Any, name: str) -> Any:
    """The model file's operator, or the asked one when it is the same."""
    from napari_wpp.core.operators import operator_from_dict

    asked_none = args.operator is None and args.scale is None and args.sigma is None
    if not state.operator and asked_none:  # a PatchNR trained without an operator
        return None
    saved = operator_from_dict(state.operator)
    if asked_none:
        return saved
    asked = _common.operator_from_args(args)
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
        ("--patch-distance", "patch_distance", args.patch_distance),
        ("--projections", "projections", args.projections),
        ("--mean-warmup", "mean_warmup", args.mean_warmup),
        ("--calibration-holdout", "calibration_holdout", args.calibration_holdout),
        ("--hidden", "patchnr_hidden", args.hidden),
        ("--patch-batch", "patchnr_batch", args.patch_batch),
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


def _describe_training(event: Any) -> tuple[float, str] | None:
    from napari_wpp.core.training import TrainingProgress, rate_text

    if isinstance(event, TrainingProgress):
        if event.nll is not None:  # a PatchNR
            total = "" if event.total_steps is None else f"/{event.total_steps}"
            rate = f" · {rate_text(event.steps_per_s)}" if event.steps_per_s else ""
            held = "" if event.heldout_nll is None else f" · held-out {event.heldout_nll:.4g}"
            return event.fraction, f"step {event.step}{total}{rate} · NLL {event.nll:.4g}{held}"
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


def _write_failure(event: Any, kept_step: int | None) -> str:
    """The line for a model file that could not be written: why, and what the file keeps."""
    import errno

    error = event.error
    reason = _common.one_line(error.strerror or str(error)) if isinstance(error, OSError) else ""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        fix = "free disk space or choose another --out"
    else:
        fix = "check the path"
    if not event.path.exists():
        kept = "nothing was saved"
    elif kept_step is None:
        kept = f"{event.path.name} is unchanged"
    else:
        kept = f"{event.path.name} keeps the last checkpoint (step {kept_step})"
    return f"cannot write {str(event.path)!r} ({reason}): {fix}; {kept}"


def _run_job(
    spec: Any,
    source: Any,
    operator: Any,
    out: Path | None,
    resume: Any = None,
    group: Any = None,
    label: str = "train",
    inputs: Sequence[tuple[str, Any]] = (),
) -> tuple[Any, int, Any]:
    """Run :func:`napari_wpp.jobs.train.train_job`, showing progress on rank 0.

    The model file is written in the worker thread, so Ctrl-C (which stops training after the
    current step) still ends with the file written; a file that cannot be written stops the
    run. Returns the final event, the number of checkpoints written and the std calibration
    fitted at the end of a WPPFlow run (its :class:`CalibrationFitted` event, or ``None``).
    """
    from napari_wpp.core.training import TrainingFinished
    from napari_wpp.jobs.calibration import CalibrationFitted
    from napari_wpp.jobs.train import ModelFileFailed, ModelFileWritten, train_job

    written = [0]
    fitted: list[Any] = [None]  # the std calibration fitted at the end of a WPPFlow run
    kept_step: list[int | None] = [None]  # step of the last state written to `out`
    main_rank = group is None or group.is_main

    def events(stop: threading.Event) -> Iterable[Any]:
        for event in train_job(spec, source, operator, out, stop, resume, group, inputs):
            if isinstance(event, ModelFileWritten):
                written[0] += 0 if event.final else 1
                kept_step[0] = event.step
            elif isinstance(event, CalibrationFitted):
                fitted[0] = event
            elif isinstance(event, ModelFileFailed):
                if isinstance(event.error, OSError):
                    raise InputError(_write_failure(event, kept_step[0])) from event.error
                raise event.error
            yield event

    final = _common.drive(
        events,
        _common.ProgressBar(label, silent=not main_rank),
        describe=_describe_training,
        finished=TrainingFinished,
        stopping="stopping after this step; the model file will still be written",
    )
    return final, written[0], fitted[0]


def run(args: argparse.Namespace) -> int:
    """``napari-wpp train``; under ``torchrun`` one data-parallel rank of the run."""
    from napari_wpp.jobs.train import data_parallel

    asked_device = _given_fields(args).get("device", default_of(_spec(), "device"))
    with data_parallel(asked_device) as (device, group):
        return _train_command(args, device, group)


def _check_replaces(out: Path, args: argparse.Namespace, kind: str) -> None:
    """Refuse to replace an existing model file without ``--overwrite``.

    Resuming may replace the resumed file or a model of the same ``kind``; a new run, another
    kind or a file that is not a readable model needs ``--overwrite``.
    """
    if args.overwrite or not (out.exists() or out.is_symlink()):
        return
    if args.resume is None:
        raise InputError(
            f"--out {args.out!r} exists: add --overwrite to replace it, --resume {args.out} to "
            "continue training it, or choose another --out"
        )
    resumed = Path(args.resume).expanduser()
    try:
        if os.path.samefile(out, resumed):
            return
    except OSError:
        pass
    from napari_wpp.io import read_model_metadata

    try:
        existing = str(read_model_metadata(out).get("kind"))
    except InputError:
        existing = "file that is not a model"
    if existing != kind:
        raise InputError(
            f"--out {args.out!r} is an existing {existing}, not a {kind} like --resume: add "
            "--overwrite to replace it, or choose another --out"
        )


def _train_command(args: argparse.Namespace, device: str, group: Any) -> int:
    import numpy as np

    from napari_wpp.jobs.train import TrainSource, check_resume_budget, load_resume

    out = _common.check_output(args.out, "model file", suffixes=(".safetensors",))
    if args.model is not None:
        _check_model_kind(args.model)
    resume = None
    if args.resume is not None:
        name = Path(args.resume).name
        resume = load_resume(args.resume, label=f"--resume {name}")
        kind = str(resume.kind)
        _check_prior_weight_flags(args, kind)
        operator = _resume_operator(args, resume, name)
        _check_resume_settings(args, resume, name)
    else:
        kind = args.model or default_of(_spec(), "model")
        _check_prior_weight_flags(args, kind)
        given = args.operator is not None or args.scale is not None
        # a PatchNR prior records the operator it is meant for when one is given
        operator = _common.operator_from_args(args) if kind != "patchnr" or given else None
    _check_replaces(out, args, kind)
    spec = _spec()(
        **{
            **_given_fields(args),
            "model": kind,
            "device": device,
            "checkpoint_minutes": args.checkpoint_minutes or None,
        }
    )
    if resume is not None:
        check_resume_budget(spec, resume, name, "--steps", "--minutes")
    lr = None
    if args.lr_data is not None:
        lr = np.asarray(_common.read_input(args.lr_data, "LR data", ndims=(2, 3)).array)
    reference = None
    if args.reference is not None:
        reference = np.asarray(_common.read_input(args.reference, "reference", ndims=(2, 3)).array)
    source = TrainSource(lr, reference)
    main_rank = group is None or group.is_main
    if "auto" in (args.lam, args.rho) and resume is None and main_rank:
        flag = "--lambda" if args.lam == "auto" else "--rho"
        sys.stderr.write(f"choosing λ on the reference ({flag} auto)...\n")
        sys.stderr.flush()
    first_step = resume.step if resume is not None else 0
    inputs = [("LR data", args.lr_data), ("reference", args.reference)]
    final, checkpoints, fitted = _run_job(spec, source, operator, out, resume, group, inputs=inputs)
    if not main_rank:  # rank 0 reports for all
        return _common.EXIT_OK
    if group is not None and group.active:
        device = f"{device} ×{group.world_size}"
    state = final.state
    last = state.history[-1] if state.history else {}
    stopped = bool(final.stopped_early)
    if state.kind == "patchnr":
        _report_patchnr(args, out, state, device, stopped, first_step, checkpoints)
        return _common.EXIT_OK
    q = int(operator.scale)
    losses = {k: last.get(k) for k in ("data_term", "wpp_term", "loss")}
    flow = state.kind == "wppflow"
    noise_std = (state.config or {}).get("noise_std", spec.noise_std)
    weight_text = f"ρ = {state.lam:g}, σ = {noise_std:g}" if flow else f"λ = {state.lam:g}"
    loss_text = f"; data {losses['data_term']:.3e}, wpp {losses['wpp_term']:.3e}" if last else ""
    _common.emit(
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
            "calibration": None if fitted is None else fitted.calibration.to_dict(),
            "calibration_seconds": None if fitted is None else float(fitted.seconds),
        },
        f"wrote {out} ({state.kind} ×{q}) after {state.step} steps in {state.elapsed_s:.1f} s "
        f"({weight_text}, {device}){loss_text}"
        + (" [stopped early]" if stopped else "")
        + ("" if fitted is None else f"\n{fitted.text()}"),
    )
    return _common.EXIT_OK


def _report_patchnr(
    args: argparse.Namespace,
    out: Path,
    state: Any,
    device: str,
    stopped: bool,
    first_step: int,
    checkpoints: int,
) -> None:
    """The last line (or JSON) of a PatchNR training run."""
    last = state.history[-1] if state.history else {}
    held = [r["heldout_nll"] for r in state.history if r.get("heldout_nll") is not None]
    mode = "zero-shot" if args.reference is None else "reference"
    nll_text = f"; NLL {last['nll']:.4g}" if "nll" in last else ""
    held_text = f", held-out NLL {held[-1]:.4g}" if held else ""
    _common.emit(
        args,
        {
            "out": str(out),
            "model": "patchnr",
            "mode": mode,
            "steps": int(state.step),
            "steps_this_run": int(state.step) - first_step,
            "seconds": float(state.elapsed_s),
            "nll": last.get("nll"),
            "heldout_nll": held[-1] if held else None,
            "hidden": state.model_config.get("hidden"),
            "device": device,
            "stopped_early": stopped,
            "resumed_from": args.resume,
            "checkpoints": checkpoints,
        },
        f"wrote {out} (patchnr, {mode}) after {state.step} steps in {state.elapsed_s:.1f} s "
        f"({device}){nll_text}{held_text}" + (" [stopped early]" if stopped else ""),
    )
