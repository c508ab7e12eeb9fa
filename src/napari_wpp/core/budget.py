"""Step and time budgets of iterative runs, with the cosine step decay over the budget.

Shared by the variational reconstruction and network training: a run stops at whichever of
its step and time budgets ends first, reports the fraction done, and decays its step size
(cosine) from the full value to a fraction of it over that same budget.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class Budget:
    """A step budget and/or a time budget, counted from construction.

    Parameters
    ----------
    steps, minutes
        The budgets (``None``: no such limit). With neither, ``default_steps`` steps.
    default_steps
        Step budget used when neither is given.
    elapsed_before
        Seconds already spent (a resumed run counts its earlier time against the budget).
    """

    def __init__(
        self,
        steps: int | None,
        minutes: float | None,
        default_steps: int,
        elapsed_before: float = 0.0,
    ) -> None:
        if steps is None and minutes is None:
            steps = default_steps
        self.max_steps = steps
        self.max_seconds = None if minutes is None else 60.0 * minutes
        self.elapsed_before = float(elapsed_before)
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds spent, including ``elapsed_before``."""
        return self.elapsed_before + time.perf_counter() - self._start

    def exhausted(self, step: int) -> bool:
        """Whether a run that has done ``step`` steps must stop."""
        if self.max_steps is not None and step >= self.max_steps:
            return True
        return self.max_seconds is not None and self.elapsed() >= self.max_seconds

    def out_of_time(self) -> bool:
        """Whether the time budget (if any) is spent."""
        return self.max_seconds is not None and self.elapsed() >= self.max_seconds

    def stopper(self, stop: threading.Event | None = None) -> Callable[[], bool]:
        """A ``should_stop`` for long inner loops: the stop event is set or the time is up.

        Inner loops (the ψ ascent passes of one step) ask it between their passes, so that a
        time budget and a stop request are honoured within a pass, not only between steps.
        """

        def should_stop() -> bool:
            return (stop is not None and stop.is_set()) or self.out_of_time()

        return should_stop

    def fraction(self, step: int) -> float:
        """Share of the budget used, in [0, 1] (the larger of steps and time)."""
        parts = []
        if self.max_steps:
            parts.append(step / self.max_steps)
        if self.max_seconds:
            parts.append(self.elapsed() / self.max_seconds)
        return min(1.0, max(parts, default=1.0))

    def cosine_decay(self, step: int, final_fraction: float) -> float:
        """Step-size factor: 1 at the start, ``final_fraction`` at the end (cosine)."""
        return cosine_factor(self.fraction(step), final_fraction)


def cosine_factor(fraction: float, final_fraction: float) -> float:
    """Cosine step-size factor at ``fraction`` ∈ [0, 1] (clipped) of a schedule.

    1 at the start, ``final_fraction`` at the end.
    """
    fraction = min(1.0, max(0.0, fraction))
    decay = 0.5 * (1.0 + math.cos(math.pi * fraction))
    return final_fraction + (1.0 - final_fraction) * decay
