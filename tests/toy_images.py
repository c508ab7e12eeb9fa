"""Synthetic textures shared by the transport tests."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter


def texture(shape: tuple[int, ...], sigma: float, seed: int) -> np.ndarray:
    """A uint8 texture around 128 (std 40): white noise blurred by ``sigma`` in-plane."""
    rng = np.random.default_rng(seed)
    sig = (0,) * (len(shape) - 2) + (sigma, sigma)
    field = gaussian_filter(rng.normal(size=shape), sig)
    field = (field - field.mean()) / field.std()
    return np.clip(128 + 40 * field, 0, 255).astype(np.uint8)
