"""What superresolution and sampling share: events, model helpers, shapes and dtypes."""

from __future__ import annotations

import copy
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from napari_wpp.core.devices import resolve_device
from napari_wpp.core.errors import InputError
from napari_wpp.core.events import RunFinished
from napari_wpp.core.intensity import Normalisation


@dataclass(frozen=True)
class InferenceProgress:
    """Slices done so far.

    Attributes
    ----------
    done, total
        Slices superresolved and slices in all.
    elapsed_s
        Seconds since the run started.
    """

    done: int
    total: int
    elapsed_s: float


@dataclass(frozen=True, eq=False)
class InferenceFinished(RunFinished):
    """End of a superresolution run: ``result`` is the superresolved array, or ``None``.

    ``None`` when the run was stopped early (a partial array is never returned) or wrote its
    output elsewhere (:func:`superresolve_into`).
    """


#: Events yielded by the inference generators.
InferenceEvent = InferenceProgress | InferenceFinished

# --------------------------------------------------------------------------- model helpers


def model_scale(model: nn.Module) -> int:
    """Superresolution factor ``q`` of ``model`` (its ``scale`` attribute)."""
    scale = getattr(model, "scale", None)
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise InputError(
            f"{type(model).__name__} has no integer 'scale' attribute: use a WPPNet or give the "
            "model a scale"
        )
    return int(scale)


def model_halo(model: nn.Module, halo: int | None = None) -> int:
    """Halo (LR pixels) for tiled inference: ``halo`` checked against the receptive radius.

    Parameters
    ----------
    model
        A WPPNet, or any model with a ``receptive_radius()`` method.
    halo
        Requested halo; ``None`` gives exactly the receptive radius.

    Raises
    ------
    InputError
        When ``halo`` is smaller than the receptive radius (tiles would not match the whole-slice
        result), negative, or not given for a model whose radius is unknown.
    """
    radius = _receptive_radius(model)
    if halo is None:
        if radius is None:
            raise InputError(
                f"receptive radius of {type(model).__name__} unknown: pass halo (LR pixels)"
            )
        return radius
    if isinstance(halo, bool) or not isinstance(halo, (int, np.integer)) or halo < 0:
        raise InputError(f"halo must be a non-negative integer (LR pixels), got {halo!r}")
    if radius is not None and halo < radius:
        raise InputError(
            f"halo {halo} is smaller than the model's receptive radius {radius}: use halo >= "
            f"{radius} (or leave it unset)"
        )
    return int(halo)


def _receptive_radius(model: nn.Module) -> int | None:
    from napari_wpp.core.models.wppnet import WPPNet, receptive_radius

    if isinstance(model, WPPNet):
        return receptive_radius(model)
    method = getattr(model, "receptive_radius", None)
    if callable(method):
        return int(method())
    return flow_receptive_radius(model) if is_flow(model) else None


def _check_tile(tile: int | None) -> int | None:
    if tile is None:
        return None
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise InputError(f"tile must be a positive integer (LR pixels) or None, got {tile!r}")
    return int(tile)


def _check_tiling(model: nn.Module, tile: int | None, halo: int | None) -> tuple[int | None, int]:
    """The checked ``tile`` and the halo of its tiles in LR pixels (0 when nothing is tiled)."""
    tile = _check_tile(tile)
    halo_px = model_halo(model, halo) if (tile is not None or halo is not None) else 0
    return tile, halo_px


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def _forward_in_tiles(
    forward: Callable[[int, int, int, int], Tensor],
    size: tuple[int, int],
    scale: int,
    tile: int | None,
    halo: int,
) -> Tensor:
    """A model's ``(B, C, q·H, q·W)`` output for an LR slice of ``size`` ``(H, W)``.

    ``forward(a0, a1, b0, b1)`` runs the model on LR rows ``a0:a1`` and columns ``b0:b1``. With
    a ``tile``, the slice is cut into square tiles of ``tile`` LR pixels, each run with a
    ``halo`` (clipped at the border) and cropped after the model; otherwise it runs once on the
    whole slice.
    """
    height, width = size
    if tile is None or (tile >= height and tile >= width):
        return forward(0, height, 0, width)
    q = scale
    out: Tensor | None = None
    for y0 in range(0, height, tile):
        y1 = min(y0 + tile, height)
        a0, a1 = max(0, y0 - halo), min(height, y1 + halo)
        for x0 in range(0, width, tile):
            x1 = min(x0 + tile, width)
            b0, b1 = max(0, x0 - halo), min(width, x1 + halo)
            pred = forward(a0, a1, b0, b1)
            if out is None:
                out = pred.new_empty((pred.shape[0], pred.shape[1], q * height, q * width))
            out[:, :, q * y0 : q * y1, q * x0 : q * x1] = pred[
                :, :, q * (y0 - a0) : q * (y1 - a0), q * (x0 - b0) : q * (x1 - b0)
            ]
    assert out is not None
    return out


def _inference_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``model`` in eval mode on ``device`` (the caller's model is never touched).

    On CPU the copy uses the channels-last memory format (oneDNN's fast path for these
    convolutions: about twice the speed of the default layout, same float32 arithmetic).
    """
    net = copy.deepcopy(model).to(device=device, dtype=torch.float32)
    if device.type == "cpu":
        net = net.to(memory_format=torch.channels_last)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A model as plain data: kind, constructor config and weights as numpy arrays.

    This is what travels to dask workers (it pickles without torch objects); :meth:`build`
    rebuilds the model there. ``token`` identifies the weights (a SHA-1 of kind, config and
    every tensor).
    """

    kind: str
    config: dict[str, Any]
    state: dict[str, np.ndarray] = field(repr=False)
    token: str = ""

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelSpec:
        """Spec of a model with a ``kind`` attribute and a ``config()`` method (e.g. WPPNet)."""
        kind = getattr(model, "kind", None)
        config = getattr(model, "config", None)
        if not isinstance(kind, str) or not callable(config):
            raise InputError(
                f"{type(model).__name__} cannot be sent to dask workers: it needs a 'kind' and a "
                "config() method (use a model from napari_wpp.core.models)"
            )
        cfg = dict(config())
        state = {k: v.detach().to("cpu", copy=True).numpy() for k, v in model.state_dict().items()}
        digest = hashlib.sha1(f"{kind}{sorted(cfg.items())}".encode())
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(state[name]).tobytes())
        return cls(kind, cfg, state, digest.hexdigest())

    def build(self, device: str | torch.device = "cpu") -> nn.Module:
        """The model in eval mode on ``device`` (float32, no gradients)."""
        from napari_wpp.core.models import build_model

        net = build_model(self.kind, **self.config)
        net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.state.items()})
        return _inference_copy(net, resolve_device(device))


_MODEL_CACHE: OrderedDict[tuple[str, str], nn.Module] = OrderedDict()
_MODEL_CACHE_LOCK = threading.Lock()
_MODEL_CACHE_SIZE = 2


def _cached_model(spec: ModelSpec, device: str) -> nn.Module:
    """The model of ``spec`` on ``device``, rebuilt at most once per process (small LRU)."""
    key = (spec.token, str(device))
    with _MODEL_CACHE_LOCK:
        net = _MODEL_CACHE.get(key)
        if net is None:
            net = spec.build(device)
            _MODEL_CACHE[key] = net
            while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
                _MODEL_CACHE.popitem(last=False)
        else:
            _MODEL_CACHE.move_to_end(key)
    return net


def is_flow(model: nn.Module) -> bool:
    """Whether ``model`` is a conditional flow (a WPPFlow) rather than a network."""
    from napari_wpp.core.models.wppflow import WPPFlow

    return isinstance(model, WPPFlow)


def _check_network(model: nn.Module) -> None:
    if is_flow(model):
        raise InputError(
            f"{type(model).__name__} is a conditional flow, not a network: draw samples with "
            "napari_wpp.core.inference.sample (or sample_volume)"
        )


def _check_flow(model: nn.Module) -> None:
    if not is_flow(model):
        raise InputError(
            f"{type(model).__name__} is not a WPPFlow and cannot draw samples: use "
            "superresolve for a WPPNet, or train a WPPFlow"
        )


def _conv_radius(module: nn.Module) -> int:
    """Receptive radius (pixels of its own grid) of a chain of convolutions, summed."""
    radius = 0
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            kernel = max(layer.kernel_size)
            dilation = max(layer.dilation)
            radius += (kernel - 1) // 2 * dilation
    return radius


def flow_receptive_radius(model: nn.Module) -> int:
    """A safe bound of a WPPFlow's receptive radius in LR pixels (for tile halos).

    Every output pixel depends on the latent and on the LR image only within this distance
    (measured from the LR pixel it belongs to). The bound follows the flow's structure: the
    condition (the LR feature CNN, the bilinear upsampling and the operator's sampling
    offset), at every level the coupling and injector subnets (each convolution adds one
    pixel of that level's grid, ``1 / 2^l`` LR pixels) and the squeeze cells, then the mean
    WPPNet and the final affine step, then the edge steps (the Sobel pattern of the mean, their
    subnet, and the tile each output pixel shares); one LR pixel is added for the HR-to-LR
    assignment.
    """
    from napari_wpp.core.models.flow_blocks import (
        ActNorm,
        AffineCoupling,
        ConditionalAffineInjector,
        FixedPermutation,
        FlowSequence,
        InvertibleConv1x1,
    )
    from napari_wpp.core.models.wppnet import receptive_radius

    _check_flow(model)
    q = int(model.scale)
    cond = _conv_radius(model.encoder) + 1.0 + abs(float(model.sampling_offset)) / q + 1.0

    def leaves(block: nn.Module) -> Iterator[nn.Module]:
        if isinstance(block, FlowSequence):
            for child in block.blocks:
                yield from leaves(child)
        else:
            yield block

    latent = 0.0
    for level, steps in enumerate(model.level_steps):
        spacing = 1.0 / 2**level
        for block in leaves(steps):
            if isinstance(block, AffineCoupling):
                reach = _conv_radius(block.subnet) * spacing
                latent = max(latent, cond) + reach
            elif isinstance(block, ConditionalAffineInjector):
                latent = max(latent, cond + _conv_radius(block.subnet) * spacing)
            elif not isinstance(block, (ActNorm, InvertibleConv1x1, FixedPermutation)):
                raise InputError(
                    f"unknown flow block {type(block).__name__}: pass halo (LR pixels) "
                    "explicitly for tiled sampling"
                )
        latent += spacing  # the squeeze cell of this level
    mean = float(receptive_radius(model.mean_net))
    final = max(cond, mean) + _conv_radius(model.final.subnet) / q
    sample = max(latent, final)
    for step in model.edge_steps:
        tile = (step.block - 1) / q
        stretch = max(cond, mean) + (1 + _conv_radius(step.subnet)) / q + 2 * tile
        sample = max(sample, stretch) + tile
    return math.ceil(max(sample, mean) + 1.0)


# --------------------------------------------------------------------------- array helpers


def output_dtype(dtype: Any, normalisation: Normalisation | None) -> np.dtype:
    """Dtype of the result for an input of ``dtype``.

    The input dtype with a normalisation (an integer input must have the normalisation's own
    dtype, otherwise its range would be wrong), float32 without one (then the input must be
    floating point, already normalised to ``[0, 1]``).
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "uif":
        raise InputError(
            f"unsupported image dtype {dtype}: use an integer or floating point greyscale image"
        )
    if normalisation is None:
        if dtype.kind != "f":
            raise InputError(
                f"image has integer dtype {dtype} but no normalisation was given: pass the "
                "model's normalisation (or Normalisation.from_array(image))"
            )
        return np.dtype(np.float32)
    norm_dtype = np.dtype(normalisation.dtype)
    if dtype != norm_dtype and (dtype.kind in "ui" or norm_dtype.kind in "ui"):
        raise InputError(
            f"image dtype {dtype} differs from the normalisation's {norm_dtype}: convert the "
            f"image to {norm_dtype} or use Normalisation.from_array(image)"
        )
    return dtype


def _check_axis(axis: int, ndim: int) -> int:
    if ndim == 2:
        return 0
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -3 <= axis < 3:
        raise InputError(f"axis must be 0, 1 or 2 (or -3..-1) for a volume, got {axis!r}")
    return int(axis) % 3


def _check_shape(shape: tuple[int, ...]) -> None:
    if len(shape) not in (2, 3) or any(n == 0 for n in shape):
        raise InputError(
            f"cannot superresolve an array of shape {tuple(shape)}: need a 2D image (Y, X) or "
            "a 3D volume (Z, Y, X)"
        )


def _check_layout(
    shape: tuple[int, ...], dtype: Any, axis: int, normalisation: Normalisation | None
) -> tuple[np.dtype, int]:
    """The output dtype and the checked slice axis of an input of ``shape`` and ``dtype``."""
    _check_shape(shape)
    return output_dtype(dtype, normalisation), _check_axis(axis, len(shape))


def output_shape(shape: tuple[int, ...], scale: int, axis: int = 0) -> tuple[int, ...]:
    """Shape of the result: ``scale`` times larger on every axis except ``axis`` (for 3D)."""
    shape = tuple(int(n) for n in shape)
    _check_shape(shape)
    ax = _check_axis(axis, len(shape))
    if len(shape) == 2:
        return (scale * shape[0], scale * shape[1])
    return tuple(n if i == ax else scale * n for i, n in enumerate(shape))
