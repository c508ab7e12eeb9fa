"""Thin helpers around napari's thread workers for the long-running napari-wpp jobs.

Core generators (training, inference) run in a :class:`StoppableWorker`: a napari
``GeneratorWorker`` whose :meth:`~StoppableWorker.quit` sets the job's ``threading.Event``
instead of abandoning the generator, so that napari's own cancel path (closing the window
cancels registered tasks) lets the job end its current step and finish cleanly (a training
job still writes its model file). Exceptions never reach napari's traceback notification:
the job yields a :class:`WorkerFailure` and the widget shows it with
:func:`~napari_wpp.widgets._notify.notify_error`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from napari.qt.threading import GeneratorWorker, create_worker
from qtpy.QtCore import QTimer

from napari_wpp.widgets._triton import load_triton_safely

__all__ = ["ActivityProgress", "JobOwner", "StoppableWorker", "WorkerFailure", "start_job"]

#: Seconds :meth:`StoppableWorker.quit` waits for a job to end after asking it to stop.
QUIT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class WorkerFailure:
    """Yielded (instead of raised) when a job fails; ``error`` is the exception."""

    error: BaseException


def _guarded_job(
    function: Callable[..., Iterator[Any]], done: threading.Event, *args: Any, **kwargs: Any
) -> Iterator[Any]:
    """Run the generator ``function`` and yield a :class:`WorkerFailure` if it raises."""
    try:
        yield from function(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - handed to the GUI thread as a notification
        yield WorkerFailure(exc)
    finally:
        done.set()


class StoppableWorker(GeneratorWorker):
    """A napari generator worker stopped through a ``threading.Event`` its job checks.

    Attributes
    ----------
    stop_event
        Set by :meth:`stop` and :meth:`quit`; the job ends after its current step.
    done_event
        Set by the worker thread when the job has ended (whatever the reason).
    """

    stop_event: threading.Event
    done_event: threading.Event

    def stop(self) -> None:
        """Ask the job to end after its current step (returns at once)."""
        self.stop_event.set()

    def quit(self, timeout_s: float = QUIT_TIMEOUT_S) -> None:
        """Stop the job and wait (up to ``timeout_s``) until it has ended cleanly.

        napari calls this when its window closes with the job still running; unlike the
        default ``quit`` it never abandons the generator midway, so files it writes at the
        end (model checkpoints) are complete.
        """
        self.stop_event.set()
        if self.is_running:
            self.done_event.wait(timeout_s)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the job has ended; ``False`` when ``timeout_s`` passed first."""
        return self.done_event.wait(timeout_s)


def start_job(
    function: Callable[..., Iterator[Any]],
    *args: Any,
    stop: threading.Event,
    on_yield: Callable[[Any], None],
    on_finish: Callable[[], None],
    name: str = "napari-wpp job",
    **kwargs: Any,
) -> StoppableWorker:
    """Run the generator ``function(*args, **kwargs)`` in a napari thread worker.

    Parameters
    ----------
    function
        Generator function; it must check ``stop`` between steps and end when it is set.
    stop
        The event the job checks.
    on_yield
        Called in the GUI thread with every yielded value (also a :class:`WorkerFailure`).
    on_finish
        Called in the GUI thread once the job has ended.
    name
        What napari shows for the job (e.g. in the dialog when closing during a run).

    Returns
    -------
    StoppableWorker
        The started worker.
    """
    load_triton_safely()  # in the GUI thread, before torch may import it in the worker
    done = threading.Event()

    def job() -> Iterator[Any]:
        yield from _guarded_job(function, done, *args, **kwargs)

    job.__name__ = job.__qualname__ = name
    worker = create_worker(job, _worker_class=StoppableWorker, _start_thread=False)
    worker.stop_event = stop
    worker.done_event = done
    worker.yielded.connect(on_yield)
    worker.finished.connect(on_finish)
    worker.start()
    return worker


class ActivityProgress:
    """A progress bar in napari's activity dock, updated outside of worker-event handlers.

    napari's progress bars process pending Qt events when they change, which would run the
    next worker events (even the end of the job) in the middle of the handler of the current
    one; :meth:`set` therefore only records the value and a zero-delay timer applies it.

    Parameters
    ----------
    total
        Value of a full bar.
    description
        Text shown beside the bar.
    """

    def __init__(self, total: int, description: str) -> None:
        from napari.utils import progress

        self._bar: Any = progress(total=max(int(total), 1), desc=description)
        self._value = 0
        self._description = description
        self._pending = False

    @property
    def value(self) -> int:
        """The last value asked for."""
        return self._value

    def set(self, value: int, description: str | None = None) -> None:
        """Show ``value`` (and ``description``) soon, from the event loop."""
        self._value = int(value)
        if description is not None:
            self._description = description
        if not self._pending and self._bar is not None:
            self._pending = True
            QTimer.singleShot(0, self._apply)

    def _apply(self) -> None:
        self._pending = False
        bar = self._bar
        if bar is None:
            return
        if bar.desc != self._description:
            bar.set_description(self._description)
        if self._value > bar.n:
            bar.update(self._value - bar.n)

    def close(self) -> None:
        """Remove the bar from the activity dock (idempotent)."""
        bar, self._bar = self._bar, None
        if bar is not None:
            try:
                bar.close()
            except RuntimeError:  # the activity dock was deleted with the window
                pass


class JobOwner:
    """Mixin of a dock widget that runs one stoppable worker job at a time.

    The widget provides ``worker`` (the running :class:`StoppableWorker`, or ``None``),
    ``_stop`` (the job's stop event), ``_progress`` (its :class:`ActivityProgress`, or
    ``None``), a ``status_label`` and ``_update_controls()``; :attr:`stopping_text` is shown
    while a stop request waits for the job's current step.
    """

    stopping_text = "Cancelling after this batch…"

    def _close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def _request_stop(self) -> None:
        """Ask the running job to end after its current step (returns at once)."""
        if self.worker is None:
            return
        self._stop.set()
        self.status_label.setText(self.stopping_text)
        self._update_controls()

    def shutdown(self, timeout_s: float = 60.0) -> bool:
        """Stop a running job and wait until it has ended; ``True`` when none is left running.

        Whatever the job writes when it stops (a training's model file) is complete then.
        """
        worker = self.worker
        self._stop.set()
        if worker is None:
            return True
        return worker.wait(timeout_s)
