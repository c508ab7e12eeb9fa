"""``napari-wpp evaluate``: PSNR, SSIM and blur effect of a prediction; readouts without ground
truth.

Compare PRED with GT after cropping a border. Stacks (Z, H, W) are a test set: the figures are
means over the slices, with their std and per-slice lists (and, with --std, the coverage of
every slice). Both are put on a [0, 1] scale: integer images by their dtype range; float images
as they are when GT lies in [0, 1], otherwise by GT's min/max (a float PRED with an integer GT
is taken as [0, 1] when it lies there, otherwise on GT's dtype scale). Without ground truth:
--lr LR with the operator flags reports the rms of f(PRED) − LR beside the noise level
(data_rms, noise), --reference REF the patch distance of PRED to the reference beside the
distances between the reference's own crops (patch_distance, reference_band).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from napari_wpp.cli import _common
from napari_wpp.cli.transport import patch_type
from napari_wpp.core.config import ReadoutSpec, help_text
from napari_wpp.core.errors import InputError


def add_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """The options of ``napari-wpp evaluate``."""
    p.add_argument("pred", metavar="PRED", help="predicted image (2D or 3D)")
    p.add_argument("gt", metavar="GT", nargs="?", help="ground-truth image of the same shape")
    p.add_argument(
        "--crop",
        type=_common.crop_type,
        default=40,
        metavar="N",
        help="border ignored (default 40)",
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
    free = p.add_argument_group("readouts without ground truth")
    free.add_argument("--lr", metavar="LR", help="LR image of PRED: report data_rms and noise")
    free.add_argument("--reference", metavar="REF", help="clean reference: patch distance")
    free.add_argument(
        "--noise",
        type=_common.noise_type,
        metavar="SIGMA",
        help=help_text(ReadoutSpec, "noise"),
    )
    _common.add_spec_option(free, ReadoutSpec, "patch_size", type=patch_type, metavar="P")
    _common.add_operator_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


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


def _evaluation_ranges(pred: Any, gt: Any) -> tuple[tuple[float, float], tuple[float, float], str]:
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

    std = np.asarray(_common.read_input(path_text, "--std image").array)
    if std.shape != pred_shape:
        raise InputError(
            f"--std image {_common.shape_text(std.shape)} and PRED "
            f"{_common.shape_text(pred_shape)} differ in "
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

    samples = np.asarray(_common.read_input(path_text, "--samples stack").array)
    if samples.ndim != len(gt_shape) + 1 or samples.shape[1:] != tuple(gt_shape):
        raise InputError(
            f"--samples stack {_common.shape_text(samples.shape)} does not hold samples of GT "
            f"{_common.shape_text(gt_shape)}: stack the K samples on the first axis, "
            f"shape K×{_common.shape_text(gt_shape)}"
        )
    if samples.dtype.kind in "ui":
        info = np.iinfo(samples.dtype)
        return _to01(samples, float(info.min), float(info.max))
    return _to01(samples, *pred_range)


def _metrics(pred01: Any, gt01: Any, crop: int) -> dict[str, float]:
    """Metrics of a 2D pair, or the mean over the slices of a 3D pair."""
    from napari_wpp.core.metrics import evaluate

    return {k: float(v) for k, v in evaluate(pred01, gt01, crop=crop).items()}


def run(args: argparse.Namespace) -> int:
    if args.gt is None:
        if args.lr is None and args.reference is None:
            raise InputError(
                "nothing to compare PRED with: give GT, or --lr LR (with the operator flags) "
                "and/or --reference REF"
            )
        for flag, value in (("--std", args.std), ("--samples", args.samples)):
            if value is not None:
                raise InputError(f"{flag} needs the ground truth GT: give GT or drop {flag}")
    readouts = _readouts(args) if args.lr is not None or args.reference is not None else None
    if args.gt is None:
        payload: dict[str, Any] = dict(readouts or {})
        _common.emit(args, payload, "\n".join(_readout_lines(payload)))
        return _common.EXIT_OK
    return _evaluate_with_truth(args, readouts)


def _evaluate_with_truth(args: argparse.Namespace, readouts: dict[str, Any] | None) -> int:
    import numpy as np

    pred_data = _common.read_input(args.pred, "PRED image")
    gt_data = _common.read_input(args.gt, "GT image")
    pred, gt = np.asarray(pred_data.array), np.asarray(gt_data.array)
    if pred.shape != gt.shape:
        raise InputError(
            f"PRED {_common.shape_text(pred.shape)} and GT "
            f"{_common.shape_text(gt.shape)} differ in shape: "
            "compare images of the same size"
        )
    if 2 * args.crop + 7 > min(gt.shape[-2:]):
        raise InputError(
            f"--crop {args.crop} leaves too little of a {_common.shape_text(gt.shape[-2:])} image: "
            f"use --crop {max(0, (min(gt.shape[-2:]) - 7) // 2)} or less"
        )
    if args.samples is not None and gt.ndim != 2:
        raise InputError(
            f"--samples needs 2D images but GT is {_common.shape_text(gt.shape)}: evaluate "
            "the samples "
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
    if gt.ndim == 3:
        payload["test_set"] = _test_set_figures(pred01, gt01, std01, args.crop)
        lines += _test_set_lines(payload["test_set"])
    if samples01 is not None:
        payload["samples"] = _sample_figures(samples01, gt01, args.crop)
        lines.append(
            f"samples      PSNR {payload['samples']['psnr_mean']:.2f} dB, "
            f"SSIM {payload['samples']['ssim_mean']:.4f} "
            f"(mean of {payload['samples']['count']} single samples)"
        )
    lines.append(f"(crop {args.crop} px, {how})")
    if readouts is not None:
        payload.update(readouts)
        lines += _readout_lines(readouts)
    _common.emit(args, payload, "\n".join(lines))
    return _common.EXIT_OK


def _readouts(args: argparse.Namespace) -> dict[str, Any]:
    """``data_rms``/``noise`` (with --lr) and ``patch_distance``/``reference_band`` (with
    --reference) of PRED on its [0, 1] scale."""
    import numpy as np

    from napari_wpp.jobs.transport import (
        lr_normalisation,
        measure_readouts,
        transport_normalisation,
    )

    pred = np.asarray(_common.read_input(args.pred, "PRED image").array)
    norm = transport_normalisation(pred)
    pred01 = norm.apply(pred)
    lr01 = operator = ref01 = None
    if args.lr is not None:
        lr = np.asarray(_common.read_input(args.lr, "--lr image").array)
        lr01 = lr_normalisation(lr, norm).apply(lr, clip=False)
        operator = _common.operator_from_args(args)
    if args.reference is not None:
        ref = np.asarray(_common.read_input(args.reference, "--reference image").array)
        ref01 = transport_normalisation(ref).apply(ref)
    spec = ReadoutSpec(patch_size=args.patch_size, noise=args.noise)
    out = measure_readouts(spec, pred01, lr01, operator, ref01)
    out["readout_normalisation"] = norm.to_dict()
    return out


def _readout_lines(r: dict[str, Any]) -> list[str]:
    lines = []
    if r.get("data_rms") is not None:
        ratio = r["data_rms"] / r["noise"] if r["noise"] else float("inf")
        lines.append(
            f"data rms     {r['data_rms']:.4f} = {ratio:.2f}× the noise {r['noise']:.4f} "
            f"({r['noise_source']}; [0, 1] scale)"
        )
    if r.get("patch_distance") is not None:
        d, band = r["patch_distance"], r["reference_band"]
        for key in ("gelbrich", "sliced"):
            b = band[key]
            lines.append(
                f"{key + ' W2':<12} {d[key]:.4f} to the reference (reference to itself "
                f"{b['low']:.4f}–{b['high']:.4f}, middle {b['middle']:.4f})"
            )
    return lines


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


def _test_set_figures(pred01: Any, gt01: Any, std01: Any, crop: int) -> dict[str, Any]:
    """Per-slice figures of a (Z, H, W) test set and their mean ± std (population std)."""
    import numpy as np

    from napari_wpp.core.metrics import evaluate_slices

    per_slice: dict[str, list[float]] = evaluate_slices(pred01, gt01, crop=crop)
    if std01 is not None:
        from napari_wpp.core.uncertainty import calibration

        figures = [calibration(g, p, s, crop=crop) for g, p, s in zip(gt01, pred01, std01)]
        for k in (1, 2, 3):
            per_slice[f"coverage_{k}sd"] = [float(f[f"coverage_{k}sd"]) for f in figures]
    summary: dict[str, Any] = {"slices": len(per_slice["psnr"]), "per_slice": per_slice}
    for name, values in per_slice.items():
        summary[f"{name}_mean"] = float(np.mean(values))
        summary[f"{name}_std"] = float(np.std(values))
    return summary


def _test_set_lines(figures: dict[str, Any]) -> list[str]:
    def line(label: str, name: str, unit: str, digits: int, factor: float = 1.0) -> str:
        mean, std = factor * figures[f"{name}_mean"], factor * figures[f"{name}_std"]
        return f"{label}{mean:.{digits}f} ± {std:.{digits}f}{unit}"

    lines = [
        f"test set     {figures['slices']} slices, mean ± std over slices:",
        line("  PSNR       ", "psnr", " dB", 2),
        line("  SSIM       ", "ssim", "", 4),
        line("  blur       ", "blur_effect", "", 4),
    ]
    if "coverage_1sd_mean" in figures:
        for k in (1, 2):
            lines.append(line(f"  within {k} std ", f"coverage_{k}sd", " %", 1, 100.0))
    return lines
