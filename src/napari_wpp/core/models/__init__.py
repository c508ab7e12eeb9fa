"""Trainable models: WPPNet (CNN), WPPFlow (conditional normalizing flow) and PatchNR (a
normalizing flow on patches, the learned patch prior)."""

from __future__ import annotations

from typing import Any

import torch

from napari_wpp.core.errors import InputError
from napari_wpp.core.models.patchnr import PatchNR
from napari_wpp.core.models.wppflow import WPPFlow
from napari_wpp.core.models.wppnet import WPPNet

#: Model kinds by name, as stored in model files.
MODEL_KINDS: dict[str, type[torch.nn.Module]] = {
    "wppnet": WPPNet,
    "wppflow": WPPFlow,
    "patchnr": PatchNR,
}
#: Constructor arguments that count repeated parts (each part holds at least one weight
#: tensor): a model file's metadata cannot ask for more of them than it stores tensors.
MODEL_COUNT_OPTIONS: dict[str, tuple[str, ...]] = {
    "wppnet": ("blocks",),
    "wppflow": ("steps", "edge_shifts", "mean_blocks"),
    "patchnr": ("blocks",),
}


def build_model(kind: str, **config: Any) -> torch.nn.Module:
    """A fresh model of ``kind`` built from its constructor arguments."""
    if kind not in MODEL_KINDS:
        raise InputError(f"unknown model kind {kind!r}: use one of {', '.join(MODEL_KINDS)}")
    try:
        return MODEL_KINDS[kind](**config)
    except TypeError as exc:
        raise InputError(f"model configuration {config} does not fit {kind!r}: {exc}") from None
