"""Superresolution of images and volumes with a trained model, slice by slice.

A model maps one LR slice ``(B, 1, h, w)`` to ``(B, 1, q·h, q·w)``. Volumes are cut into
slices along one ``axis`` (that axis keeps its size; the two others grow ``q`` times), slices
are batched through the model in float32 under :func:`torch.inference_mode`, and each slice may
be processed in *tiles* of ``tile`` LR pixels. A tile is cut from the image with a halo of at
least the model's receptive radius (clipped at the image border, where the network's own zero
padding then applies exactly as in a whole-slice run), and only its central part is kept, so
tiled and whole-slice results agree to float32 rounding.

Three ways to run:

* :func:`superresolve` (generator of :class:`InferenceProgress` / :class:`InferenceFinished`)
  and :func:`run_superresolve` for numpy arrays in memory; :func:`superresolve_slice` for one
  normalised 2D slice;
* :func:`superresolve_dask` builds a lazy ``dask.array`` (one task per slab of slices; the
  model travels as plain weights and is rebuilt once per worker process), so a
  ``dask.distributed`` cluster runs it unchanged;
* :func:`superresolve_into` computes such an array slab by slab into any array-like target
  (a zarr array, a memory map, ...), with progress events and stop checks between slabs.
  :func:`napari_wpp.jobs.zarr_layout.superresolve_zarr` wraps it for zarr paths.

A WPPFlow draws posterior samples instead: :func:`sample` (generator) and :func:`run_sample`
give the pixelwise mean and standard deviation of ``k`` samples of one normalised 2D image
(streaming moments; the samples themselves only when asked), :func:`sample_volume` does the
same slice by slice for volumes in memory and :func:`sample_into` for out-of-core volumes
(:func:`napari_wpp.jobs.zarr_layout.sample_zarr` for zarr paths). The latent of every sample
is drawn for
the whole slice from ``(seed, slice index)`` first, so results do not depend on batch size or
tiling; tiles get a halo of :func:`flow_receptive_radius`.

With a :class:`~napari_wpp.core.intensity.Normalisation`, inputs of the raw dtype are mapped to
``[0, 1]`` and outputs go back to the input dtype (rounded and clipped for integers); without
one, inputs must already be normalised floats and outputs are float32. ``dask`` is imported only
by the dask functions (optional dependency).
"""

from __future__ import annotations

from napari_wpp.core.inference.common import (
    InferenceEvent,
    InferenceFinished,
    InferenceProgress,
    ModelSpec,
    flow_receptive_radius,
    is_flow,
    model_halo,
    model_scale,
    output_dtype,
    output_shape,
)
from napari_wpp.core.inference.sampling import (
    SampleResult,
    SamplingEvent,
    SamplingFinished,
    SamplingProgress,
    run_sample,
    run_sample_volume,
    sample,
    sample_into,
    sample_volume,
    slice_generator,
)
from napari_wpp.core.inference.superresolution import (
    run_superresolve,
    superresolve,
    superresolve_dask,
    superresolve_into,
    superresolve_slice,
)

__all__ = [
    "InferenceProgress",
    "InferenceFinished",
    "InferenceEvent",
    "ModelSpec",
    "model_scale",
    "model_halo",
    "output_shape",
    "output_dtype",
    "superresolve_slice",
    "superresolve",
    "run_superresolve",
    "superresolve_dask",
    "superresolve_into",
    "SamplingProgress",
    "SamplingFinished",
    "SamplingEvent",
    "SampleResult",
    "is_flow",
    "flow_receptive_radius",
    "slice_generator",
    "sample",
    "run_sample",
    "sample_volume",
    "run_sample_volume",
    "sample_into",
]
