"""Triton and Mesa's LLVM in one napari process (widgets/_triton.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from napari_wpp.widgets import _triton


def test_blocked_when_llvm_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    saved = sys.modules.pop("triton", None)
    monkeypatch.setattr(_triton, "_llvm_loaded", lambda: True)
    try:
        with pytest.warns(RuntimeWarning, match="Triton is not used"):
            assert _triton.load_triton_safely() is False
        with pytest.raises(ImportError):
            import triton  # noqa: F401
        assert _triton.load_triton_safely() is False  # blocked once, quietly after
    finally:
        if saved is None:
            sys.modules.pop("triton", None)
        else:
            sys.modules["triton"] = saved


@pytest.mark.slow  # 4-7 s: a fresh interpreter imports napari and torch
@pytest.mark.skipif(
    not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")),
    reason="no display for napari: run the tests under `xvfb-run -a`",
)
def test_training_after_the_canvas_does_not_crash() -> None:
    """A viewer first (Mesa's LLVM under Xvfb), then the plugin and torch's optimiser."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: nothing can clash")
    script = textwrap.dedent(
        """
        import napari
        viewer = napari.Viewer(show=False)
        import napari_wpp.widgets  # noqa: F401
        from napari_wpp.widgets._workers import start_job  # noqa: F401
        import torch
        torch.optim.Adam([torch.zeros(2, requires_grad=True)]).step()
        import torch._dynamo  # noqa: F401  (imports Triton where it is usable)
        print("survived")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "survived" in result.stdout
