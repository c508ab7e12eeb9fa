"""Keep Triton from crashing napari: load it before Mesa's LLVM, or not at all.

Triton's compiler library carries its own copy of LLVM. Loaded into a process that already
holds Mesa's ``libLLVM`` (the OpenGL driver napari's canvas uses under Xvfb, remote desktops,
virtual machines: software rendering), it crashes the process (segmentation fault). torch
imports Triton on its own when it is installed (its Linux CUDA wheels ship it), for example
when a training run builds its optimiser in a thread worker. So before any job runs, Triton
is imported while that is still safe, or blocked when Mesa's LLVM is already mapped: torch
and napari-wpp then run without it (the GPU c-transform uses its torch path).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

__all__ = ["load_triton_safely"]

#: What a process map line of Mesa's LLVM library contains.
_MESA_LLVM = "libLLVM"


def _llvm_loaded() -> bool:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: no Mesa/Triton clash known there
        return False
    return _MESA_LLVM in maps


def load_triton_safely() -> bool:
    """Import Triton now if that is safe, else make every later import fail cleanly.

    Returns
    -------
    bool
        Whether Triton is usable in this process.
    """
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None
    if importlib.util.find_spec("triton") is None:
        return False
    if _llvm_loaded():
        sys.modules["triton"] = None  # type: ignore[assignment]  # import triton → ImportError
        warnings.warn(
            "Triton is not used in this napari session: the OpenGL driver's LLVM is loaded "
            "and Triton's would crash the process (GPU runs use the torch c-transform)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    import triton  # noqa: F401

    return True
