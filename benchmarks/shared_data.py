"""Where the benchmarks find the real data: ``../shared/data`` or ``$NAPARI_WPP_DATA``.

Set ``NAPARI_WPP_DATA`` to a copy of that folder on a machine where the checkout has no
``../shared`` beside it (e.g. a GPU machine that gets only the working tree).
"""

from __future__ import annotations

import os
from pathlib import Path

#: The folder holding ``sic/`` and ``fs_registered_pair/`` (see its README).
DATA_ROOT = Path(
    os.environ.get("NAPARI_WPP_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
