"""What the Train widget shows: the live loss plot, the preview layer, session and model.

:class:`LossPlot` draws the data term and the WPP term per step (log y, matplotlib), or for a
PatchNR the training and held-out patch NLL (linear y);
:func:`preview_crop` cuts the central crop of the LR slice shown, whose network output
:func:`show_preview` puts over the LR layer as ``"<LR name> preview"``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from napari_wpp.widgets._layers import (
    PROVENANCE_KEY,
    add_or_update_image,
    current_index,
    offset_translate,
    superresolved_geometry,
)

__all__ = [
    "MODEL_NAMES",
    "PLOT_INTERVAL_S",
    "PREVIEW_SIDE",
    "LossPlot",
    "model_text",
    "preview_crop",
    "session_text",
    "show_preview",
    "theme_colors",
]

#: How the widgets name the trainable model kinds.
MODEL_NAMES = {
    "wppnet": "WPPNet",
    "wppflow": "WPPFlow (uncertainty)",
    "patchnr": "PatchNR (learned prior)",
}

#: Seconds between two redraws of the loss plot.
PLOT_INTERVAL_S = 0.25
#: Largest side (LR pixels) of the preview crop.
PREVIEW_SIDE = 128


class LossPlot(QWidget):
    """Live plot of the data term and the WPP term per step (log y), matplotlib Qt canvas."""

    def __init__(self, theme: dict[str, str] | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        colors = {"background": "#23242b", "foreground": "#2e333e", "text": "#f0f1f2"}
        colors.update(theme or {})
        self.steps: list[int] = []
        self.data_terms: list[float] = []
        self.wpp_terms: list[float] = []
        self.figure = Figure(figsize=(3.6, 2.6), dpi=100, facecolor=colors["background"])
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.axes = self.figure.add_subplot(1, 1, 1)
        ax = self.axes
        ax.set_facecolor(colors["foreground"])
        for spine in ax.spines.values():
            spine.set_color(colors["text"])
        ax.tick_params(colors=colors["text"], labelsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("step", color=colors["text"], fontsize=9)
        ax.set_ylabel("loss", color=colors["text"], fontsize=9)
        ax.grid(True, which="major", alpha=0.25)
        (self.data_line,) = ax.plot([], [], color="#4fc3f7", lw=1.4, label="data term")
        (self.wpp_line,) = ax.plot([], [], color="#ffb74d", lw=1.4, label="WPP term")
        legend = ax.legend(
            loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False
        )
        for text in legend.get_texts():
            text.set_color(colors["text"])
        self.legend = legend
        self.nll_mode = False
        self.figure.subplots_adjust(left=0.2, right=0.96, top=0.88, bottom=0.19)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self._dirty = False
        self._last_draw = 0.0
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.redraw)

    def show_nll(self, nll: bool) -> None:
        """Plot a PatchNR's training and held-out NLL (linear y) instead of the two terms."""
        self.nll_mode = bool(nll)
        ax = self.axes
        ax.set_yscale("linear" if nll else "log")
        ax.set_ylabel("patch NLL" if nll else "loss", color=ax.yaxis.label.get_color())
        names = ("training NLL", "held-out NLL") if nll else ("data term", "WPP term")
        self.wpp_line.set_marker("o" if nll else "None")
        self.wpp_line.set_markersize(3)
        for line, text, name in zip(
            (self.data_line, self.wpp_line), self.legend.get_texts(), names, strict=True
        ):
            line.set_label(name)
            text.set_text(name)
        self.clear()

    def clear(self) -> None:
        """Forget every point."""
        self.steps.clear()
        self.data_terms.clear()
        self.wpp_terms.clear()
        self.redraw()

    def add(self, step: int, data_term: float, wpp_term: float) -> None:
        """Append one step (redrawn at most every :data:`PLOT_INTERVAL_S`)."""
        self.steps.append(int(step))
        self.data_terms.append(float(data_term))
        self.wpp_terms.append(float(wpp_term))
        self._schedule()

    def extend(self, records: Sequence[dict[str, Any]]) -> None:
        """Append history records (``step``, ``data_term``, ``wpp_term``; a PatchNR's ``nll``,
        ``heldout_nll``) and redraw."""
        for record in records:
            if "step" in record and "nll" in record:
                self.steps.append(int(record["step"]))
                self.data_terms.append(float(record["nll"]))
                held = record.get("heldout_nll")
                self.wpp_terms.append(np.nan if held is None else float(held))
            elif "step" in record and "data_term" in record:
                self.steps.append(int(record["step"]))
                self.data_terms.append(float(record["data_term"]))
                self.wpp_terms.append(float(record.get("wpp_term", np.nan)))
        self.redraw()

    def _schedule(self) -> None:
        wait = PLOT_INTERVAL_S - (time.perf_counter() - self._last_draw)
        if wait <= 0:
            self.redraw()
        elif not self._timer.isActive():
            self._timer.start(int(wait * 1000) + 1)

    def redraw(self) -> None:
        """Redraw the lines now."""
        self._timer.stop()
        self._last_draw = time.perf_counter()
        steps = np.asarray(self.steps, dtype=np.float64)
        for line, values in ((self.data_line, self.data_terms), (self.wpp_line, self.wpp_terms)):
            y = np.asarray(values, dtype=np.float64)
            if not self.nll_mode:
                y = np.where(y > 0, y, np.nan)  # log axis: hide zeros and negative estimates
                line.set_data(steps, y)
            else:  # the held-out NLL only on the steps that scored it
                shown = np.isfinite(y)
                line.set_data(steps[shown], y[shown])
        ax = self.axes
        if self.nll_mode:
            finite = [v for v in (*self.data_terms, *self.wpp_terms) if math.isfinite(v)]
            if len(steps):
                ax.set_xlim(float(steps.min()), max(float(steps.max()), float(steps.min()) + 1))
            if finite:
                low, high = min(finite), max(finite)
                pad = max(0.05 * (high - low), 0.5)
                ax.set_ylim(low - pad, high + pad)
            self.canvas.draw_idle()
            return
        positive = [v for v in (*self.data_terms, *self.wpp_terms) if v > 0 and math.isfinite(v)]
        if len(steps):
            right = float(steps.max())
            left = float(steps.min())
            ax.set_xlim(left, right if right > left else left + 1)
        if positive:
            low, high = min(positive), max(positive)
            if high <= low * 1.01:
                low, high = low / 2, high * 2
            ax.set_ylim(low / 1.5, high * 1.5)
        self.canvas.draw_idle()


def preview_crop(layer: Any, lr: np.ndarray, viewer: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Central crop (≤ :data:`PREVIEW_SIDE` px) of the LR slice shown, and where it sits."""
    z = current_index(layer, viewer, axis=0) if lr.ndim == 3 else None
    plane = lr if z is None else lr[z]
    h, w = plane.shape
    ch, cw = min(PREVIEW_SIDE, h), min(PREVIEW_SIDE, w)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    placement = {
        "start": (y0, x0) if z is None else (z, y0, x0),
        "scale": tuple(float(v) for v in layer.scale),
        "translate": tuple(float(v) for v in layer.translate),
        "contrast_limits": tuple(float(v) for v in layer.contrast_limits),
        "slice": z,
    }
    return np.array(plane[y0 : y0 + ch, x0 : x0 + cw]), placement


def show_preview(viewer: Any, image: np.ndarray, run: dict[str, Any]) -> Any:
    """Add or update the preview layer of ``image`` (normalised units) over the LR layer.

    ``run`` holds ``placement`` (from :func:`preview_crop`; ``None``: no preview),
    ``normalisation`` (a dict or ``None``), ``scale`` (q), ``layer_name`` and ``spec``.
    Returns the layer, or ``None`` without a placement.
    """
    from napari_wpp.core.intensity import Normalisation

    placement = run.get("placement")
    if placement is None:
        return None
    data = np.asarray(image, dtype=np.float32)
    if run.get("normalisation") is not None:
        data = Normalisation.from_dict(run["normalisation"]).invert(data)
    start = placement["start"]
    grown = (True, True) if len(start) == 2 else (False, True, True)
    if len(start) == 3:
        data = data[None]
    crop_translate = offset_translate(placement["scale"], placement["translate"], start)
    scale, translate = superresolved_geometry(
        placement["scale"], crop_translate, run["scale"], grown
    )
    provenance = {
        "role": "preview",
        "source": run["layer_name"],
        "scale": run["scale"],
        "slice": placement["slice"],
        "crop_start": [int(v) for v in start],
        "model": run["spec"].model,
    }
    return add_or_update_image(
        viewer,
        f"{run['layer_name']} preview",
        data,
        scale=scale,
        translate=translate,
        metadata={PROVENANCE_KEY: provenance},
        contrast_limits=placement["contrast_limits"],
        colormap="gray",
    )


def theme_colors(viewer: Any) -> dict[str, str]:
    """``background``, ``foreground`` and ``text`` colours of the viewer's theme ({} if none)."""
    try:
        from napari.utils.theme import get_theme

        theme = get_theme(viewer.theme)
        return {k: getattr(theme, k).as_hex() for k in ("background", "foreground", "text")}
    except Exception:  # noqa: BLE001 - cosmetic: the plot falls back to the dark theme's
        return {}


def session_text(session: Any) -> str:
    """The session's reference and operator in one line."""
    reference, operator = session.reference, session.operator
    ref_text = "not chosen"
    if reference is not None:
        ref_text = f"{reference.source or 'chosen'} ({reference.n_patches:,} patches)"
    op_text = "not chosen"
    if operator is not None:
        data = operator.to_dict()
        op_text = f"×{data.get('scale')} {data.get('kind', type(operator).__name__)}"
    return f"Reference: {ref_text} · Operator: {op_text} (Reference & operator widget)"


def model_text(state: Any, path: str | None) -> str:
    """The session's model (kind, scale, steps, λ) and its file."""
    if state is None:
        return "No model yet: train one or load a model file."
    if state.kind == "patchnr":
        config = state.model_config
        return (
            f"{MODEL_NAMES['patchnr']} {config.get('patch_size')}×{config.get('patch_size')} "
            f"patches, hidden {config.get('hidden')}, {state.step} steps"
            + (f"\n{path}" if path else "\n(not saved)")
        )
    return (
        f"{MODEL_NAMES.get(state.kind, state.kind)} ×{state.model_config.get('scale', '?')}, "
        f"{state.step} steps, λ {state.lam:.3g}" + (f"\n{path}" if path else "\n(not saved)")
    )
