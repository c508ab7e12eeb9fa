"""The base of the napari-wpp dock widgets: settings binding, layer choices, jobs, errors.

A dock widget built on :class:`JobDockWidget` says what it shows and which job it runs:

* its choices live in an evented ``settings`` dataclass; :meth:`JobDockWidget.bind` ties a
  magicgui widget to one setting (both ways; scripts and tests set the settings);
* :meth:`JobDockWidget.listen` connects a viewer or session callback and :class:`LayerChoice`
  keeps a combo box of layers up to date; everything connected through them is disconnected
  when the widget is closed, taken out of its dock or destroyed (one lifetime rule for every
  widget; :meth:`JobDockWidget.release` does it);
* :meth:`JobDockWidget.run` calls :meth:`~JobDockWidget.prepare_run`, starts the job it
  returns in a stoppable thread worker (progress bar, napari's activity dock, Cancel) and
  hands the job's events to :meth:`~JobDockWidget.on_job_event`; exceptions, raised while
  preparing or inside the job, become one-line napari notifications naming the fix.

Example
-------
>>> class Blur(JobDockWidget):
...     job_title = "blurring"
...     def __init__(self, napari_viewer):
...         super().__init__(napari_viewer, BlurSettings())
...         self.layer_choice = LayerChoice(self, "input_layer", image_layers)
...         self.bind("sigma", FloatSpinBox())
...     def prepare_run(self):
...         return JobLaunch(blur_job, (self.settings.sigma,), total=1, activity="Blurring")
...     def on_job_event(self, item): ...
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from magicgui.widgets import ComboBox, Container
from magicgui.widgets.bases import ValueWidget
from qtpy.QtCore import QEvent, Qt, Signal
from qtpy.QtGui import QCloseEvent
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from napari_wpp.core.errors import InputError
from napari_wpp.widgets._layout import shrinkable
from napari_wpp.widgets._notify import notified_warnings, notify_error
from napari_wpp.widgets._session import WPPSession, session_for
from napari_wpp.widgets._workers import (
    ActivityProgress,
    JobOwner,
    StoppableWorker,
    WorkerFailure,
    start_job,
)

__all__ = [
    "NO_LAYER",
    "Connections",
    "JobDockWidget",
    "JobLaunch",
    "LayerChoice",
    "bind_setting",
    "job_finished_alias",
    "or_notify",
]

#: Value of a layer choice with no layer ("(none)", "(whole slice)", ...).
NO_LAYER = ""

T = TypeVar("T")


def or_notify(function: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """``function(*args, **kwargs)``, or ``None`` after a napari notification if it raised."""
    try:
        with notified_warnings():
            return function(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - shown as a notification naming the fix
        notify_error(exc)
        return None


class Connections:
    """Callbacks connected to emitters that outlive a widget (viewer, layers, session)."""

    def __init__(self) -> None:
        self._pairs: list[tuple[Any, Callable[..., Any]]] = []

    def connect(self, emitter: Any, callback: Callable[..., Any]) -> None:
        """Connect ``callback`` to ``emitter`` (napari or psygnal) and remember the pair."""
        emitter.connect(callback)
        self._pairs.append((emitter, callback))

    def __len__(self) -> int:
        return len(self._pairs)

    def disconnect_all(self) -> None:
        """Disconnect every remembered callback (idempotent; gone emitters are skipped)."""
        pairs, self._pairs = self._pairs, []
        for emitter, callback in pairs:
            try:
                emitter.disconnect(callback)
            except (RuntimeError, TypeError, ValueError):  # already disconnected or deleted
                pass


def _set_quietly(widget: ValueWidget, value: Any) -> None:
    """Show ``value`` without emitting ``changed``; values the widget refuses are not shown."""
    if widget.value == value:
        return
    with widget.changed.blocked():
        try:
            widget.value = value
        except (ValueError, TypeError):  # out of range or not a choice: a script's value
            pass


def bind_setting(settings: Any, name: str, widget: ValueWidget) -> Callable[[Any], None]:
    """Keep ``widget`` (magicgui) and the evented ``settings.<name>`` in step, both ways.

    The widget shows the setting at once. A value the widget refuses (out of its range) stays
    in the settings, so that the job's check names it.

    Returns
    -------
    callable
        The settings-to-widget callback (connected to ``settings.events.<name>``).
    """

    def to_widget(value: Any) -> None:
        _set_quietly(widget, value)

    widget.changed.connect(lambda value: setattr(settings, name, value))
    getattr(settings.events, name).connect(to_widget)
    to_widget(getattr(settings, name))
    return to_widget


@dataclass
class JobLaunch:
    """What :meth:`JobDockWidget.run` starts.

    Attributes
    ----------
    job
        Generator function; called as ``job(*args, stop_event)``.
    args
        Its arguments before the stop event.
    total
        Steps of a full progress bar (slices, samples).
    activity
        Description in napari's activity dock (e.g. ``"Superresolving"``).
    status
        Status line while it runs.
    context
        What the widget needs when the job's events come back (becomes ``widget.current_run``).
    """

    job: Callable[..., Iterator[Any]]
    args: tuple[Any, ...]
    total: int
    activity: str
    status: str
    context: dict[str, Any] = field(default_factory=dict)


def job_finished_alias(doc: str) -> property:
    """A read-only attribute naming :attr:`JobDockWidget.job_finished` after the widget's job."""
    return property(lambda self: self.job_finished, doc=doc)


class JobDockWidget(JobOwner, QWidget):
    """Base of a dock widget that runs one stoppable job at a time on a napari viewer.

    Subclasses set :attr:`job_title`, build their UI (with :meth:`job_controls` for the run
    and cancel buttons, progress bar and status line) and implement :meth:`prepare_run`,
    :meth:`on_job_event` and :meth:`done_text`.

    Attributes
    ----------
    viewer, session, settings
        The napari viewer, its shared :class:`~napari_wpp.widgets._session.WPPSession` and
        the widget's evented settings.
    worker
        The running worker, or ``None``.
    current_run
        The ``context`` of the last launch plus what its events added (``finished``,
        ``layer``, ``failed``).
    connections
        The :class:`Connections` disconnected when the widget is destroyed.
    job_finished
        Emitted at the end of a run with ``current_run["layer"]`` (``None`` when the run
        failed or was cancelled).
    """

    job_finished = Signal(object)
    #: What the job is called in messages ("superresolution is already running").
    job_title = "the job"
    #: Unit of the progress bar ("%v / %m slices").
    progress_unit = "steps"

    def __init__(self, napari_viewer: Any, settings: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session: WPPSession = session_for(getattr(napari_viewer, "__wrapped__", napari_viewer))
        self.settings = settings
        self.worker: StoppableWorker | None = None
        self.current_run: dict[str, Any] = {}
        self.connections = Connections()
        self._stop = threading.Event()
        self._progress: ActivityProgress | None = None
        self._docked = False
        self.destroyed.connect(
            lambda *_args, stop=self._stop, links=self.connections: (
                stop.set(),
                links.disconnect_all(),
            )
        )

    # ------------------------------------------------------------------ lifetime
    def release(self) -> None:
        """Stop a running job and disconnect every callback connected through the base."""
        self._stop.set()
        self.connections.disconnect_all()

    def event(self, event: QEvent) -> bool:
        """Release when napari takes the widget out of its dock (its parent becomes None)."""
        if event.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif self._docked:
                self.release()
        return super().event(event)

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt API)
        """Release when the widget is closed."""
        self.release()
        super().closeEvent(event)

    # ------------------------------------------------------------------ binding
    def listen(self, emitter: Any, callback: Callable[..., Any]) -> None:
        """Connect ``callback`` to ``emitter`` until the widget is destroyed."""
        self.connections.connect(emitter, callback)

    def listen_settings(self, callback: Callable[..., Any], *names: str) -> None:
        """Call ``callback`` when any of the settings ``names`` changes."""
        for name in names:
            self.listen(getattr(self.settings.events, name), callback)

    def bind(self, name: str, widget: ValueWidget) -> ValueWidget:
        """Bind ``widget`` to ``settings.<name>`` (see :func:`bind_setting`); returns it."""
        bind_setting(self.settings, name, widget)
        return widget

    def bind_form(self, form: Container, **settings_names: str) -> Container:
        """Bind each widget of ``form`` to the setting of its name (or ``settings_names[name]``).

        Widgets without a setting of that name are left unbound; returns ``form``.
        """
        for widget in form:
            name = settings_names.get(widget.name, widget.name)
            if isinstance(widget, ValueWidget) and hasattr(self.settings, name):
                self.bind(name, widget)
        return form

    def watch_layers(self, callback: Callable[..., Any], *layer_events: str) -> None:
        """Call ``callback`` when the layer list or a layer's ``name`` (``layer_events``) change."""
        events = self.viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved, events.reordered):
            self.listen(emitter, callback)

        def watch(layer: Any) -> None:
            for name in ("name", *layer_events):
                emitter = getattr(layer.events, name, None)
                if emitter is not None:
                    self.listen(emitter, callback)

        for layer in self.viewer.layers:
            watch(layer)
        self.listen(events.inserted, lambda event: watch(event.value))

    # ------------------------------------------------------------------ controls
    def job_controls(self, run_text: str, *more_buttons: QWidget) -> QWidget:
        """Run and Cancel buttons (then ``more_buttons``), a progress bar and the status line,
        top to bottom."""
        box = QWidget()
        column = QVBoxLayout(box)
        column.setContentsMargins(0, 0, 0, 0)
        buttons = QHBoxLayout()
        self.run_button = QPushButton(run_text)
        self.cancel_button = QPushButton("Cancel")
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        for button in more_buttons:
            buttons.addWidget(button)
        column.addLayout(buttons)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setTextVisible(True)
        self.progress_bar.setFormat(f"%v / %m {self.progress_unit}")
        column.addWidget(self.progress_bar)
        self.status_label = QLabel("Ready.")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        column.addWidget(self.status_label)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        return box

    def _update_controls(self, *_args: Any) -> None:
        """Enable the buttons for the current state (subclasses extend it)."""
        running = self.worker is not None
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running and not self._stop.is_set())

    def show_progress(self, done: int, total: int, elapsed_s: float, what: str) -> None:
        """Show ``done`` of ``total`` (bar, activity dock, status: "<what> 3 / 8 · 1.2 s")."""
        self.progress_bar.setValue(min(int(done), self.progress_bar.maximum()))
        if self._progress is not None:
            self._progress.set(int(done))
        self.status_label.setText(f"{what} {done} / {total} · {elapsed_s:.1f} s")

    # ------------------------------------------------------------------ running
    def prepare_run(self) -> JobLaunch:
        """Check the choices and say what to run (raise ``InputError`` naming the fix)."""
        raise NotImplementedError

    def on_job_event(self, item: Any) -> None:
        """Handle one event of the job (in the GUI thread); failures are handled already."""
        raise NotImplementedError

    def done_text(self, run: dict[str, Any]) -> str:
        """Status line after a run that produced ``run["layer"]``."""
        return "Done."

    def run(self) -> StoppableWorker | None:
        """Start the job of :meth:`prepare_run` in a thread worker.

        Returns
        -------
        StoppableWorker or None
            The started worker, or ``None`` after a notification.
        """
        if self.worker is not None:
            notify_error(InputError(f"{self.job_title} is already running: wait or cancel it"))
            return None
        launch = or_notify(self.prepare_run)
        if launch is None:
            return None
        self._stop.clear()
        self.current_run = dict(launch.context)
        self.progress_bar.setRange(0, max(int(launch.total), 1))
        self.progress_bar.setValue(0)
        self.status_label.setText(launch.status)
        self._close_progress()
        self._progress = ActivityProgress(launch.total, launch.activity)
        self.worker = start_job(
            launch.job,
            *launch.args,
            self._stop,
            stop=self._stop,
            on_yield=self._on_yielded,
            on_finish=self._on_job_ended,
            name=f"napari-wpp {self.job_title}",
        )
        self._update_controls()
        return self.worker

    def cancel(self) -> None:
        """Stop the running job after its current step (no layer is changed)."""
        self._request_stop()

    def fail(self, exc: BaseException) -> None:
        """Mark the current run as failed and show ``exc`` as a notification."""
        self.current_run["failed"] = True
        notify_error(exc)

    def _on_yielded(self, item: Any) -> None:
        if isinstance(item, WorkerFailure):
            self.fail(item.error)
            return
        from napari_wpp.jobs.notices import JobWarning
        from napari_wpp.widgets._notify import notify_warning

        if isinstance(item, JobWarning):
            notify_warning(item.message)
            return
        try:
            self.on_job_event(item)
        except Exception as exc:  # noqa: BLE001 - e.g. the viewer is closing
            self.fail(exc)

    def _on_job_ended(self) -> None:
        self.worker = None
        self._close_progress()
        run = self.current_run
        finished = run.get("finished")
        layer = run.get("layer")
        if layer is not None and finished is not None:
            self.progress_bar.setValue(self.progress_bar.maximum())
            self.status_label.setText(self.done_text(run))
        elif finished is not None and finished.stopped_early:
            self.status_label.setText("Cancelled: no layer was changed.")
        elif run.get("failed"):
            self.status_label.setText(
                f"{self.job_title.capitalize()} failed (see the notification)."
            )
        self._update_controls()
        self.job_finished.emit(layer)


class LayerChoice:
    """A magicgui combo box of layer names bound to one setting, kept up to date.

    Parameters
    ----------
    owner
        The widget; its ``settings.<setting>`` holds the chosen name (``NO_LAYER``: none).
    setting
        Name of the setting.
    candidates
        The layers offered (called with the viewer on each refresh).
    default
        The name chosen when the current one is gone (called with the candidates).
    empty_text
        Text of the "no layer" entry (always offered when ``optional``; otherwise only
        while there is no candidate).
    optional
        Whether "no layer" is a choice. The default is offered once; after the user chose
        "no layer" it stays chosen when the layer list changes.
    label, tooltip
        Of the combo box (``self.combo``).
    """

    def __init__(
        self,
        owner: JobDockWidget,
        setting: str,
        candidates: Callable[[Any], Sequence[Any]],
        default: Callable[[Sequence[Any]], str] | None = None,
        *,
        empty_text: str = "(no image layer)",
        optional: bool = False,
        label: str = "Layer",
        tooltip: str = "",
    ) -> None:
        self.owner = owner
        self.setting = setting
        self.candidates = candidates
        self.default = default or (lambda layers: layers[0].name if layers else NO_LAYER)
        self.empty_text = empty_text
        self.optional = optional
        self._offered: set[str] = set()
        self.combo = shrinkable(
            ComboBox(name=setting, label=label, tooltip=tooltip or None, choices=self.entries)
        )
        self.refresh()
        owner.bind(setting, self.combo)

    def entries(self, _combo: Any = None) -> list[tuple[str, str]]:
        """The combo box's ``(text, layer name)`` entries, in the layer list's order."""
        names = [layer.name for layer in self.candidates(self.owner.viewer)]
        entries = [(name, name) for name in names]
        if self.optional or not names:
            entries.insert(0, (self.empty_text, NO_LAYER))
        return entries

    def refresh(self) -> None:
        """Offer the current candidates; keep the choice, else choose the default."""
        layers = list(self.candidates(self.owner.viewer))
        names = [layer.name for layer in layers]
        settings = self.owner.settings
        current = getattr(settings, self.setting)
        default = self.default(layers)
        value = current if current in names else default
        if self.optional and current == NO_LAYER:
            value = default if default not in self._offered else NO_LAYER
        self._offered.add(value)
        with self.combo.changed.blocked():
            self.combo.choices = ()  # refilled in the layer list's order, not appended
            self.combo.choices = self.entries  # also what magicgui's reset_choices uses
            if value in names or value == NO_LAYER:
                self.combo.value = value
        if value != current:
            setattr(settings, self.setting, value)


def rectangle_choice(owner: JobDockWidget, setting: str = "region_shapes") -> LayerChoice:
    """The optional choice of a Shapes layer whose rectangle cuts the slice (none: all of it)."""
    from napari.layers import Shapes

    return LayerChoice(
        owner,
        setting,
        lambda viewer: [layer for layer in viewer.layers if isinstance(layer, Shapes)],
        lambda _layers: NO_LAYER,
        empty_text="(whole slice)",
        optional=True,
        label="Rectangle",
        tooltip="A Shapes layer whose rectangle cuts the slice",
    )
