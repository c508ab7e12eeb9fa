"""The model-source panel shared by the Superresolve and Uncertainty dock widgets.

It chooses between the session's model (trained or loaded in the Train widget) and a model
file, reads the file with :func:`napari_wpp.io.load_model` (once per file version), says what
model will run and, for a widget that needs one kind (a WPPFlow), refuses the others with a
message naming the fix. The owner's settings hold ``model_source`` and ``model_file``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, Container, LineEdit, PushButton
from qtpy.QtWidgets import QFileDialog, QGroupBox, QVBoxLayout

from napari_wpp.core.errors import InputError
from napari_wpp.widgets._base import JobDockWidget, or_notify
from napari_wpp.widgets._layers import checked_image
from napari_wpp.widgets._layout import note_label, shrinkable

if TYPE_CHECKING:
    from napari_wpp.core.training import TrainingState

__all__ = ["MODEL_NAMES", "MODEL_SOURCES", "ModelDockWidget", "ModelSourcePanel"]

MODEL_SOURCES = (("This session's model", "session"), ("Model file", "file"))
MODEL_NAMES = {"wppnet": "WPPNet", "wppflow": "WPPFlow", "patchnr": "PatchNR"}


class ModelSourcePanel(QGroupBox):
    """Group box: "Use" (session model or file), the file with a "…" button, what will run.

    Parameters
    ----------
    owner
        The dock widget; its settings have ``model_source`` and ``model_file``.
    kind
        The model kind the widget runs (``"wppflow"``), or ``None`` for any.
    title, placeholder
        The box's title and the file field's placeholder.

    Attributes
    ----------
    label
        What model will run (or what to do to get one).
    """

    def __init__(
        self,
        owner: JobDockWidget,
        kind: str | None = None,
        title: str = "Model",
        placeholder: str = "model.safetensors",
    ) -> None:
        super().__init__(title)
        self.owner = owner
        self.kind = kind
        self._what = f"a {MODEL_NAMES[kind]}" if kind else "one"
        self._file_state: TrainingState | None = None
        self._file_key: tuple[str, float] | None = None
        self.source = owner.bind(
            "model_source", shrinkable(ComboBox(label="Use", choices=MODEL_SOURCES))
        )
        self.file_edit = owner.bind("model_file", LineEdit(label="File"))
        self.file_edit.native.setPlaceholderText(placeholder)
        self.browse = PushButton(text="…")
        self.browse.native.setMaximumWidth(32)
        self.browse.changed.connect(self._choose_file)
        file_row = Container(
            widgets=[self.file_edit, self.browse], layout="horizontal", labels=False, label="File"
        )
        file_row.margins = (0, 0, 0, 0)
        form = Container(widgets=[self.source, file_row])
        form.margins = (0, 0, 0, 0)
        self.label = note_label(selectable=True)
        column = QVBoxLayout(self)
        column.addWidget(form.native)
        column.addWidget(self.label)
        settings, session = owner.settings, owner.session
        for emitter in (settings.events.model_source, settings.events.model_file):
            owner.listen(emitter, self.update_label)
        for emitter in (session.events.model, session.events.model_path):
            owner.listen(emitter, self.update_label)
        self.update_label()

    def set_running(self, running: bool) -> None:
        """Enable the file field for a model file while no job runs."""
        from_file = self.owner.settings.model_source == "file"
        self.file_edit.enabled = from_file and not running
        self.browse.enabled = from_file and not running

    # ------------------------------------------------------------------ the model
    def load(self, path: str | Path) -> TrainingState | None:
        """Read a model file and use it (``model_source`` becomes ``"file"``).

        Returns
        -------
        TrainingState or None
            The loaded state, or ``None`` after a notification.
        """
        self.owner.settings.model_file = str(path)
        self.owner.settings.model_source = "file"
        found = or_notify(self.state)
        return None if found is None else found[0]

    def state(self) -> tuple[TrainingState, str | None]:
        """The model to run and its file (``None`` for an unsaved session model).

        Raises
        ------
        InputError
            No model, an unreadable file or a model of another kind; the message names the fix.
        """
        from napari_wpp.io import load_model

        settings = self.owner.settings
        if settings.model_source == "session":
            state = self.owner.session.model
            if state is None:
                raise InputError(
                    f"no model in this session: train {self._what} (Train widget) or choose a "
                    "model file"
                )
            path = self.owner.session.model_path
        else:
            text = settings.model_file.strip()
            if not text:
                raise InputError("no model file chosen: choose a .safetensors model file")
            if not self._file_matches():
                self._file_state = load_model(Path(text).expanduser(), device="cpu")
                self._file_key = self._current_file_key()
                self.update_label()
            assert self._file_state is not None
            state, path = self._file_state, str(Path(text).expanduser().resolve())
        if self.kind is None and state.kind == "patchnr":
            where = "the session's model" if path is None else Path(path).name
            raise InputError(
                f"{where} is a PatchNR prior, not a superresolution network: use it in the "
                "Reconstruct widget, or train a WPPNet"
            )
        if self.kind is not None and state.kind != self.kind:
            where = "the session's model" if path is None else Path(path).name
            raise InputError(
                f"{where} is a {state.kind}, not {self._what}: train {self._what} (Train "
                f"widget) or choose {self._what} model file"
            )
        return state, path

    def _current_file_key(self) -> tuple[str, float] | None:
        path = Path(self.owner.settings.model_file.strip()).expanduser()
        try:
            return (str(path.resolve()), path.stat().st_mtime)
        except OSError:
            return None

    def _file_matches(self) -> bool:
        return self._file_state is not None and self._file_key == self._current_file_key()

    # ------------------------------------------------------------------ label and dialog
    def update_label(self, *_args: Any) -> None:
        """Say which model will run, or what to do to get one."""
        settings = self.owner.settings
        if settings.model_source == "session":
            state = self.owner.session.model
            if state is None:
                self.label.setText(f"No model in this session yet: train or load {self._what}.")
                return
            origin = self.owner.session.model_path or "trained in this session, not saved"
        else:
            state = self._file_state if self._file_matches() else None
            if state is None:
                path = settings.model_file.strip()
                self.label.setText(
                    f"{Path(path).name} is read when you run." if path else "Choose a model file."
                )
                return
            origin = settings.model_file
        scale = state.model_config.get("scale", "?")
        name = MODEL_NAMES.get(state.kind, state.kind)
        if self.kind is not None and state.kind != self.kind:
            self.label.setText(
                f"{state.kind} ×{scale} is not {self._what}: train {self._what} (Train widget) "
                f"or choose {self._what} model file."
            )
            return
        self.label.setText(f"{name} ×{scale}, {state.step} steps\n{origin}")

    def _choose_file(self, *_args: Any) -> None:
        title = f"{MODEL_NAMES[self.kind]} model file" if self.kind else "Model file"
        path, _ = QFileDialog.getOpenFileName(
            self, title, "", "Model files (*.safetensors);;All files (*)"
        )
        if path:
            self.load(path)


class ModelDockWidget(JobDockWidget):
    """A dock widget that runs the model of its :class:`ModelSourcePanel` on an image layer.

    Subclasses create ``self.model_panel`` (a :class:`ModelSourcePanel`) while building
    their UI; their settings have ``input_layer`` and ``device``.
    """

    model_panel: ModelSourcePanel

    def load_model(self, path: str | Path) -> TrainingState | None:
        """Read a model file and use it (``model_source`` becomes ``"file"``).

        Returns
        -------
        TrainingState or None
            The loaded state, or ``None`` after a notification.
        """
        return self.model_panel.load(path)

    def model_and_input(self, what: str) -> tuple[Any, TrainingState, str | None, int]:
        """The checked input layer, the model, its file and its factor (device checked too).

        Raises
        ------
        InputError
            A missing or unusable layer (``what``: how the widget calls it), model or device.
        """
        from napari_wpp.core.devices import resolve_device
        from napari_wpp.core.inference import model_scale

        layer = checked_image(self.viewer, self.settings.input_layer, what)
        state, model_file = self.model_panel.state()
        factor = model_scale(state.model)
        resolve_device(self.settings.device)
        return layer, state, model_file, factor

    def _update_controls(self, *_args: Any) -> None:
        super()._update_controls()
        self.model_panel.set_running(self.worker is not None)
