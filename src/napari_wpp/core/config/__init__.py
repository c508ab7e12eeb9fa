"""Specifications of runs: every default, bound and one-line help in one place (torch-free).

The command line builds its options from these fields (``default``, ``help``) and the dock
widgets their forms (initial values, spin box ranges), so neither repeats a default. Each field
carries ``metadata`` with

* ``help``: one line, without the default (see :func:`help_text`),
* ``min`` / ``max``: inclusive bounds (absent: unbounded),
* ``default_text``: how the default reads in a help text, when ``str(default)`` does not say it,
* ``choices``: the values a field may take (see :func:`choices_of`).
"""

from napari_wpp.core.config.fields import (
    MAX_COUNT,
    MAX_SEED,
    bounds,
    choices_of,
    default_of,
    help_of,
    help_text,
    spec_from,
)
from napari_wpp.core.config.operator import (
    ANCHORS,
    PADDINGS,
    SCALES,
    DegradeSpec,
    EstimateSpec,
    OperatorSpec,
    default_sigma,
)
from napari_wpp.core.config.patch_distance import PATCH_DISTANCES
from napari_wpp.core.config.predict import PredictSpec
from napari_wpp.core.config.reconstruct import FALLBACK_ITERATIONS, ReconstructSpec
from napari_wpp.core.config.suitability import BlurCheckSpec, SuitabilitySpec
from napari_wpp.core.config.training import CHECKPOINT_MINUTES, TrainSpec
from napari_wpp.core.config.transport import ReadoutSpec, TransportSpec

__all__ = [
    "ANCHORS",
    "CHECKPOINT_MINUTES",
    "FALLBACK_ITERATIONS",
    "MAX_COUNT",
    "MAX_SEED",
    "PADDINGS",
    "PATCH_DISTANCES",
    "SCALES",
    "BlurCheckSpec",
    "DegradeSpec",
    "EstimateSpec",
    "OperatorSpec",
    "PredictSpec",
    "ReadoutSpec",
    "ReconstructSpec",
    "SuitabilitySpec",
    "TrainSpec",
    "TransportSpec",
    "bounds",
    "choices_of",
    "default_of",
    "default_sigma",
    "help_of",
    "help_text",
    "spec_from",
]
