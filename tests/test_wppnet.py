"""WPPNet architecture: parameter counts, shapes, receptive field, bad input."""

from __future__ import annotations

import pytest
import torch

from napari_wpp.core.errors import InputError
from napari_wpp.core.models import build_model
from napari_wpp.core.models.wppnet import (
    SUPPORTED_SCALES,
    WPPNet,
    count_parameters,
    receptive_radius,
)


def expected_parameters(scale: int, features: int = 64, blocks: int = 10) -> int:
    """Count from the architecture (WPPNets paper, docs/algorithms.md), layer by layer."""
    block = 15 * features * features  # 1×3 + 3×1 + 3×3 without bias
    count = 15 * features + (blocks - 1) * block
    factors = {2: [2], 3: [3], 4: [2, 2], 6: [2, 3], 8: [2, 2, 2]}[scale]
    for r in factors:  # conv 3×3 with bias to r² · features
        count += 9 * features * features * r * r + features * r * r
    count += 4 * 9 * features * features  # two branches of two 3×3 convs
    count += 2 * 9 * features * features + 9 * features  # reconstruction convs
    return count


@pytest.mark.parametrize("scale", SUPPORTED_SCALES)
def test_parameter_count_matches_the_architecture(scale: int) -> None:
    assert count_parameters(WPPNet(scale)) == expected_parameters(scale)


def test_published_sizes() -> None:
    # the WPPNets paper: about 1.07 M at ×4, 0.92 M at ×2, 1.26 M at ×6
    assert round(count_parameters(WPPNet(4)) / 1e6, 2) == 1.07
    assert round(count_parameters(WPPNet(2)) / 1e6, 2) == 0.92
    assert round(count_parameters(WPPNet(6)) / 1e6, 2) == 1.26


@pytest.mark.parametrize("scale", SUPPORTED_SCALES)
def test_fully_convolutional_output_shape(scale: int) -> None:
    net = WPPNet(scale, features=8, blocks=2)
    with torch.no_grad():
        out = net(torch.rand(2, 1, 7, 11))
    assert out.shape == (2, 1, 7 * scale, 11 * scale)


def test_offset_is_applied_to_input_and_output() -> None:
    torch.manual_seed(0)
    plain = WPPNet(2, features=8, blocks=2, offset=0.0)
    shifted = WPPNet(2, features=8, blocks=2, offset=0.5)
    shifted.load_state_dict(plain.state_dict())
    x = torch.rand(1, 1, 9, 9)
    with torch.no_grad():
        assert torch.allclose(shifted(x), plain(x - 0.5) + 0.5, atol=1e-6)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_receptive_radius_bounds_the_influence_of_a_pixel(scale: int) -> None:
    torch.manual_seed(1)
    net = WPPNet(scale, features=4, blocks=3).double()
    radius = receptive_radius(net)
    size, centre = 2 * radius + 9, radius + 4
    x = torch.rand(1, 1, size, size, dtype=torch.float64)
    bumped = x.clone()
    bumped[0, 0, centre, centre] += 1.0
    with torch.no_grad():
        diff = (net(bumped) - net(x)).abs()[0, 0]
    rows, cols = torch.nonzero(diff > 0, as_tuple=True)
    # HR pixel i belongs to LR pixel i // scale; every change lies within the radius
    assert rows.numel() > 0
    assert int((rows // scale - centre).abs().max()) <= radius
    assert int((cols // scale - centre).abs().max()) <= radius
    # and the radius is not grossly over-estimated
    assert int((rows // scale - centre).abs().max()) >= radius - 2


def test_bad_scale_and_input() -> None:
    with pytest.raises(InputError, match="scale 5"):
        WPPNet(5)
    net = WPPNet(2, features=4, blocks=1)
    with pytest.raises(InputError, match="batch, 1, h, w"):
        net(torch.rand(1, 3, 8, 8))
    with pytest.raises(InputError, match="unknown model kind"):
        build_model("unet")
    with pytest.raises(InputError, match="does not fit"):
        build_model("wppnet", colour=True)


def test_build_model_round_trips_config() -> None:
    net = WPPNet(3, features=8, blocks=2, offset=0.5)
    again = build_model("wppnet", **net.config())
    assert again.config() == net.config()
    assert count_parameters(again) == count_parameters(net)
