"""napari dock widgets of napari-wpp (Qt and napari live here and below, never in ``core``).

Every widget reads and writes one :class:`~napari_wpp.widgets._session.WPPSession` per
viewer, turns its fields into the same config objects the CLI builds, and runs the core
generators in napari thread workers.
"""

from napari_wpp.widgets._triton import load_triton_safely

load_triton_safely()  # before napari's canvas loads Mesa's LLVM, where possible
