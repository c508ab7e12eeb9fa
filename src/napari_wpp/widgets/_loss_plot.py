"""The Train widget's live loss plot: data term and WPP term per step (log y, matplotlib)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

__all__ = ["PLOT_INTERVAL_S", "LossPlot"]

#: Seconds between two redraws of the loss plot.
PLOT_INTERVAL_S = 0.25


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
        self.figure.subplots_adjust(left=0.2, right=0.96, top=0.88, bottom=0.19)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self._dirty = False
        self._last_draw = 0.0
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.redraw)

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
        """Append history records (``step``, ``data_term``, ``wpp_term``) and redraw."""
        for record in records:
            if "step" in record and "data_term" in record:
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
            y = np.where(y > 0, y, np.nan)  # log axis: hide zeros and negative estimates
            line.set_data(steps, y)
        ax = self.axes
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
