"""One evented session state per napari viewer, shared by all napari-wpp widgets.

Widgets listen to the fields they depend on (``session.events.<field>.connect(...)``) and
write the fields they produce: the Reference & operator widget sets ``reference`` and
``operator``; the Train widget sets ``model`` (and ``model_path`` once saved); the
Superresolve and Uncertainty widgets read ``model``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from psygnal import evented

if TYPE_CHECKING:
    from napari_wpp.core.operators import ForwardOperator
    from napari_wpp.core.training import TrainingState


@dataclass
class ReferenceSelection:
    """HR reference regions chosen in the viewer, in normalised float32 [0, 1] units.

    Parameters
    ----------
    regions
        One 2D or 3D float32 array per region (their patches are pooled in training).
    normalisation
        :class:`~napari_wpp.core.intensity.Normalisation` dict that mapped the layer's data
        to [0, 1].
    source
        Name of the layer the regions were cut from.
    n_patches
        How many 6×6 patches the regions yield (shown in the widget).
    """

    regions: list[np.ndarray]
    normalisation: dict[str, Any]
    source: str = ""
    n_patches: int = 0

    def summary(self) -> str:
        """``"<source> (<region shapes>), <n> patches"``."""
        shapes = ", ".join("×".join(str(n) for n in region.shape) for region in self.regions)
        return f"{self.source} ({shapes}), {self.n_patches:,} patches"


@evented
@dataclass
class WPPSession:
    """What the napari-wpp widgets of one viewer share.

    Parameters
    ----------
    reference
        The chosen HR reference, or ``None`` before one is chosen.
    operator
        The forward operator (parametric or estimated), or ``None``.
    model
        The current trained or loaded model state (kind, weights, operator, normalisation).
    model_path
        File the current model was saved to or loaded from, if any.
    """

    reference: ReferenceSelection | None = None
    operator: ForwardOperator | None = None
    model: TrainingState | None = None
    model_path: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


_SESSIONS: weakref.WeakKeyDictionary[Any, WPPSession] = weakref.WeakKeyDictionary()


def session_for(viewer: Any) -> WPPSession:
    """The session of ``viewer`` (created on first use, dropped with the viewer).

    napari hands each plugin widget its own proxy of the viewer; the session is keyed on the
    viewer behind it, so every widget of one window shares one session.
    """
    viewer = getattr(viewer, "__wrapped__", viewer)
    session = _SESSIONS.get(viewer)
    if session is None:
        session = WPPSession()
        _SESSIONS[viewer] = session
    return session
