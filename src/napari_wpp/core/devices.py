"""Choice of the torch device for every entry point."""

from __future__ import annotations

import torch

from napari_wpp.core.errors import InputError


def available_devices() -> list[str]:
    """Names of the devices usable on this machine ("cpu", "cuda:0", ..., "mps")."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Turn a device name into a ``torch.device``.

    Parameters
    ----------
    name
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:i"`` or ``"mps"``.

    Raises
    ------
    InputError
        For an unknown name or a device this machine does not have.
    """
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu" and device.index not in (None, 0):
        import warnings

        from napari_wpp.core.errors import QuestionableInputWarning

        warnings.warn(
            f"device {name!r}: the CPU has no index {device.index} (all cores are one device); "
            "using the CPU: write --device cpu",
            QuestionableInputWarning,
            stacklevel=2,
        )
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"device {name!r} asked for but this machine has no CUDA: use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(
                f"device {name!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError(
                f"device {name!r} asked for but MPS is not available: use --device cpu"
            )
    elif device.type != "cpu":
        raise InputError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device
