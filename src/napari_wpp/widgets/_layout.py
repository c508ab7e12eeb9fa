"""Layout helpers shared by the napari-wpp dock widgets (one look for all of them)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QLabel,
    QScrollArea,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

__all__ = [
    "MIN_DOCK_WIDTH",
    "NOTE_STYLE",
    "ask_file_path",
    "choice_combo",
    "form_layout",
    "group_box",
    "note_label",
    "scrolled_column",
    "shrinkable",
]

#: Narrowest width of a dock widget (its forms stay readable; wider docks stretch the fields).
MIN_DOCK_WIDTH = 340
#: Style of secondary text (hints, notes): muted grey on napari's dark and light themes.
NOTE_STYLE = "color: #9aa3ad;"


def scrolled_column(owner: QWidget, boxes: Iterable[QWidget], spacing: int = 8) -> None:
    """Lay ``boxes`` out top to bottom in a frameless scroll area filling ``owner``."""
    content = QWidget()
    column = QVBoxLayout(content)
    column.setSpacing(spacing)
    for box in boxes:
        column.addWidget(box)
    column.addStretch(1)
    scroll = QScrollArea()
    scroll.setWidget(content)
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QScrollArea.Shape.NoFrame)
    outer = QVBoxLayout(owner)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(scroll)
    owner.setMinimumWidth(MIN_DOCK_WIDTH)


def form_layout(box: QGroupBox) -> QFormLayout:
    """A form layout on ``box`` whose fields grow with the dock."""
    form = QFormLayout(box)
    form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    form.setVerticalSpacing(6)
    form.setHorizontalSpacing(10)
    return form


def choice_combo(min_characters: int = 10) -> QComboBox:
    """A combo box that shrinks to ``min_characters`` and otherwise fills its row."""
    combo = QComboBox()
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(min_characters)
    combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    return combo


def shrinkable(combo: Any) -> Any:
    """Let a magicgui combo box shrink like :func:`choice_combo` (long layer names); returns it."""
    native = combo.native
    native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    native.setMinimumContentsLength(10)
    native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    return combo


def note_label(text: str = "", selectable: bool = False) -> QLabel:
    """Word-wrapped secondary text (hints, notes), optionally selectable with the mouse."""
    label = QLabel(text)
    label.setWordWrap(True)
    label.setStyleSheet(NOTE_STYLE)
    if selectable:
        label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


def group_box(title: str, *parts: Any) -> QGroupBox:
    """A group box with ``parts`` (magicgui widgets or Qt widgets) top to bottom."""
    box = QGroupBox(title)
    column = QVBoxLayout(box)
    for part in parts:
        column.addWidget(getattr(part, "native", part))
    return box


def ask_file_path(
    parent: QWidget, title: str, save: bool, file_kinds: str, default_name: str
) -> str:
    """Ask for a file to write (``save``) or to read; ``""`` when the dialog is cancelled.

    A name to write gets the suffix of ``default_name`` when it has another one; a file to
    read may be of any kind (``file_kinds`` first, then "All files").
    """
    if not save:
        path, _ = QFileDialog.getOpenFileName(parent, title, "", f"{file_kinds};;All files (*)")
        return path
    path, _ = QFileDialog.getSaveFileName(parent, title, default_name, file_kinds)
    suffix = Path(default_name).suffix
    if path and Path(path).suffix.lower() != suffix:
        path += suffix
    return path
