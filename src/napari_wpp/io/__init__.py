"""Reading and writing images (PNG, TIFF), forward operators (JSON) and model files.

Every user mistake (missing or corrupt file, wrong extension, unsupported shape, NaN pixels)
raises :class:`napari_wpp.core.errors.InputError` with a one-line message naming the fix.
Writes are atomic: the data goes to a temporary file in the target directory, which then
replaces the target, so an interrupted write never leaves a half-written file behind.
"""

from napari_wpp.io.files import (
    atomic_write,
    check_not_an_input,
    explained_write_errors,
    one_line,
    output_lock,
    remove_stale_leftovers,
)
from napari_wpp.io.images import IMAGE_EXTENSIONS, ImageData, read_image, write_image
from napari_wpp.io.models import (
    MAX_HISTORY,
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    MODEL_METADATA_KEY,
    MODEL_SUFFIX,
    load_model,
    read_model_metadata,
    save_model,
)
from napari_wpp.io.operators import read_operator, write_operator
from napari_wpp.io.zarr_arrays import (
    PIXEL_SIZE_ATTR,
    PROVENANCE_ATTR,
    create_zarr_array,
    open_zarr_array,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_HISTORY",
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "MODEL_METADATA_KEY",
    "MODEL_SUFFIX",
    "PIXEL_SIZE_ATTR",
    "PROVENANCE_ATTR",
    "ImageData",
    "atomic_write",
    "check_not_an_input",
    "create_zarr_array",
    "explained_write_errors",
    "load_model",
    "one_line",
    "open_zarr_array",
    "output_lock",
    "read_image",
    "read_model_metadata",
    "read_operator",
    "remove_stale_leftovers",
    "save_model",
    "write_image",
    "write_operator",
]
