"""Tests of the forward operators, their adjoints, serialisation and estimation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_wpp.core.errors import InputError
from napari_wpp.core.operator_estimation import OperatorEstimate, estimate_operator
from napari_wpp.core.operators import (
    FourierDownsampling,
    GaussianDownsampling,
    add_noise,
    operator_from_dict,
    upsample_aligned,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ANCHORS = ["center", "corner"]
_METHODS = ["published", "refined", "lstsq"]
PADDINGS = ["circular", "reflect", "zeros"]


def _read(path: Path) -> np.ndarray:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (needs ../shared/data next to the repo)")
    import imageio.v3 as iio

    return np.asarray(iio.imread(path))


def _gauss1d(k: int, sigma: float, center: float) -> np.ndarray:
    t = np.arange(k) - center
    g = np.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def _reference_gaussian(
    x: np.ndarray, q: int, sigma: float, k: int, anchor: str, padding: str
) -> np.ndarray:
    """Direct numpy evaluation: pad, correlate with the 2-D kernel, take every q-th pixel."""
    H, W = x.shape
    h, w = H // q, W // q
    if anchor == "center":
        left = (k - q) // 2
        center = left + (q - 1) / 2
    else:
        left, center = 0, (k - 1) / 2
    g = _gauss1d(k, sigma, center)
    kern = np.outer(g, g)
    mode = {"circular": "wrap", "reflect": "reflect", "zeros": "constant"}[padding]
    right_h = q * (h - 1) + k - H - left
    right_w = q * (w - 1) + k - W - left
    assert left >= 0 and right_h >= 0 and right_w >= 0  # test sizes are chosen so
    xp = np.pad(x, ((left, right_h), (left, right_w)), mode=mode)
    out = np.empty((h, w))
    for i in range(h):
        for j in range(w):
            out[i, j] = (xp[q * i : q * i + k, q * j : q * j + k] * kern).sum()
    return out


# --------------------------------------------------------------------------- Gaussian
@pytest.mark.parametrize("anchor", ANCHORS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize(("shape", "q", "k"), [((16, 20), 4, 8), ((13, 17), 3, 7)])
def test_gaussian_matches_direct_numpy(anchor, padding, shape, q, k):
    rng = np.random.default_rng(0)
    x = rng.random(shape)
    op = GaussianDownsampling(q, 1.3, kernel_size=k, anchor=anchor, padding=padding)
    got = op(torch.from_numpy(x)).numpy()
    ref = _reference_gaussian(x, q, 1.3, k, anchor, padding)
    assert got.shape == (shape[0] // q, shape[1] // q)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("anchor", "q", "k", "tol"),
    [
        ("center", 4, 16, 1e-9),
        ("corner", 4, 16, 1e-9),
        ("center", 2, 6, 1e-9),
        ("center", 3, 16, 1e-3),  # k - q odd: Gaussian moved by half a tap, slight truncation
    ],
)
def test_gaussian_sampling_position_on_a_ramp(anchor, q, k, tol):
    # On a linear ramp the blurred value is the sampled coordinate: offset + q * i.
    H = 64
    ramp = torch.arange(H, dtype=torch.float64)[:, None].expand(H, 8).clone()
    op = GaussianDownsampling(q, 2.0, kernel_size=k, anchor=anchor, padding="reflect")
    y = op(ramp)[:, 1]
    i = torch.arange(y.shape[0], dtype=torch.float64)
    expected = op.sampling_offset + q * i
    inner = slice(k // q + 1, y.shape[0] - k // q - 1)
    torch.testing.assert_close(y[inner], expected[inner], rtol=0, atol=tol)
    assert op.sampling_offset == ((q - 1) / 2 if anchor == "center" else (k - 1) / 2)


def test_gaussian_kernel_and_anisotropic_sigma():
    op = GaussianDownsampling(4, (1.0, 3.0), kernel_size=16, anchor="corner")
    kern = op.kernel.double()
    assert kern.shape == (16, 16)
    assert abs(float(kern.sum()) - 1.0) < 1e-6
    t = torch.arange(16, dtype=torch.float64) - 7.5
    var_y = float((kern.sum(1) * t**2).sum())
    var_x = float((kern.sum(0) * t**2).sum())
    assert var_y < var_x
    assert 8.0 < var_x < 9.0  # a 16-tap window truncates sigma=3 slightly


@pytest.mark.parametrize("padding", ["circular", "reflect"])
def test_gaussian_preserves_constants(padding):
    x = torch.full((2, 3, 20, 24), 0.37)
    y = GaussianDownsampling(4, 2.0, padding=padding)(x)
    assert y.shape == (2, 3, 5, 6)
    torch.testing.assert_close(y, torch.full_like(y, 0.37))


@pytest.mark.parametrize("anchor", ANCHORS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize(
    ("shape", "q", "k"), [((24, 20), 4, 16), ((13, 19), 3, 16), ((10, 9), 2, 5), ((6, 7), 3, 16)]
)
def test_gaussian_adjoint_exact(anchor, padding, shape, q, k):
    g = torch.Generator().manual_seed(1)
    op = GaussianDownsampling(q, (1.5, 2.5), kernel_size=k, anchor=anchor, padding=padding)
    x = torch.rand((2, *shape), generator=g, dtype=torch.float64)
    y = torch.rand((2, shape[0] // q, shape[1] // q), generator=g, dtype=torch.float64)
    lhs = float((op(x) * y).sum())
    rhs = float((x * op.adjoint(y, hr_shape=shape)).sum())
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


def test_gaussian_batched_and_differentiable():
    op = GaussianDownsampling(2, 1.0, kernel_size=4, padding="reflect")
    x = torch.rand(2, 3, 8, 10, dtype=torch.float64)
    y = op(x)
    assert y.shape == (2, 3, 4, 5)
    torch.testing.assert_close(y[1, 2], op(x[1, 2]))
    xs = torch.rand(1, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(op, (xs,))


def test_gaussian_float32_output_dtype():
    y = GaussianDownsampling(4, 2.0)(torch.rand(32, 32))
    assert y.dtype == torch.float32


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((1, 2.0), {}),
        ((2.5, 2.0), {}),
        ((True, 2.0), {}),
        ((4, 0.0), {}),
        ((4, -1.0), {}),
        ((4, (1.0,)), {}),
        ((4, "2"), {}),
        ((4, 2.0), {"kernel_size": 0}),
        ((4, 2.0), {"anchor": "left"}),
        ((4, 2.0), {"padding": "edge"}),
    ],
)
def test_gaussian_bad_parameters(args, kwargs):
    with pytest.raises(InputError) as err:
        GaussianDownsampling(*args, **kwargs)
    assert "\n" not in str(err.value)


def test_bad_inputs_raise_input_error():
    op = GaussianDownsampling(4, 2.0)
    with pytest.raises(InputError):
        op(torch.zeros(16, 16, dtype=torch.int64))
    with pytest.raises(InputError):
        op(torch.zeros(16))
    with pytest.raises(InputError):
        op(torch.zeros(3, 3))
    with pytest.raises(InputError):
        op.adjoint(torch.zeros(4, 4), hr_shape=(20, 16))
    with pytest.raises(InputError):
        FourierDownsampling(2, np.ones((5, 5)))(torch.zeros(4, 4))


# --------------------------------------------------------------------------- Fourier
def _smooth_kernel(k: int = 5) -> np.ndarray:
    g = _gauss1d(k, 1.0, (k - 1) / 2)
    kern = np.outer(g, g)
    kern[0, 1] += 0.05  # not symmetric, to test orientation
    return kern


def test_fourier_samples_band_limited_signal_at_qi():
    H, W, q = 24, 18, 3
    f = 2  # well inside the LR band
    r = torch.arange(H, dtype=torch.float64)[:, None]
    x = torch.cos(2 * np.pi * f * r / H).expand(H, W)
    op = FourierDownsampling(q, np.ones((1, 1)))
    y = op(x)
    i = torch.arange(H // q, dtype=torch.float64)[:, None]
    torch.testing.assert_close(y, torch.cos(2 * np.pi * f * q * i / H).expand(H // q, W // q))
    assert op.sampling_offset == 0.0


def test_fourier_kernel_orientation_and_bias():
    q = 2
    x = torch.rand(16, 12, dtype=torch.float64)
    delta = np.zeros((3, 3))
    delta[0, 1] = 1.0  # origin at (1, 1): this tap reads the pixel one row below
    shifted = FourierDownsampling(q, delta, bias=0.25)(x)
    plain = FourierDownsampling(q, np.ones((1, 1)))(torch.roll(x, -1, dims=0))
    torch.testing.assert_close(shifted, plain + 0.25)
    assert FourierDownsampling(q, delta).sampling_offset == pytest.approx(0.5)  # (1 + 0) / 2


def test_fourier_constant_image():
    kern = _smooth_kernel()
    y = FourierDownsampling(4, kern, bias=-0.1)(torch.full((3, 20, 16), 0.5, dtype=torch.float64))
    assert y.shape == (3, 5, 4)
    torch.testing.assert_close(y, torch.full_like(y, 0.5 * kern.sum() - 0.1))


@pytest.mark.parametrize(
    ("shape", "q"), [((16, 12), 2), ((15, 17), 3), ((20, 24), 4), ((14, 10), 2)]
)
def test_fourier_adjoint_exact(shape, q):
    g = torch.Generator().manual_seed(2)
    op = FourierDownsampling(q, _smooth_kernel(), bias=0.3)
    x = torch.rand((2, *shape), generator=g, dtype=torch.float64)
    y = torch.rand((2, shape[0] // q, shape[1] // q), generator=g, dtype=torch.float64)
    lhs = float(((op(x) - op.bias) * y).sum())
    rhs = float((x * op.adjoint(y, hr_shape=shape)).sum())
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


def test_fourier_batched_and_differentiable():
    op = FourierDownsampling(2, _smooth_kernel(3), bias=0.1)
    x = torch.rand(2, 3, 8, 6, dtype=torch.float64)
    y = op(x)
    assert y.shape == (2, 3, 4, 3)
    torch.testing.assert_close(y[0, 1], op(x[0, 1]))
    xs = torch.rand(6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(op, (xs,))


@pytest.mark.parametrize("kernel", [np.ones(3), np.array([[np.nan]]), "abc"])
def test_fourier_bad_kernel(kernel):
    with pytest.raises(InputError):
        FourierDownsampling(2, kernel)


# --------------------------------------------------------------------------- serialisation
@pytest.mark.parametrize(
    "op",
    [
        GaussianDownsampling(4, 2.0, anchor="corner"),
        GaussianDownsampling(3, (1.0, 2.0), kernel_size=9, padding="reflect"),
        GaussianDownsampling(2, 0.8, kernel_size=5, padding="zeros"),
        FourierDownsampling(2, _smooth_kernel(), bias=-0.2),
    ],
)
def test_dict_round_trip(op):
    data = json.loads(json.dumps(op.to_dict()))
    assert data["kind"] in ("gaussian", "fourier")
    back = operator_from_dict(data)
    assert type(back) is type(op)
    assert back.to_dict() == op.to_dict()
    x = torch.rand(2, 24, 18, dtype=torch.float64)
    torch.testing.assert_close(back(x), op(x))
    assert back.sampling_offset == op.sampling_offset


@pytest.mark.parametrize(
    "data",
    [
        {},
        [],
        {"kind": "spline", "scale": 2},
        {"kind": "gaussian", "sigma": 2.0},
        {"kind": "gaussian", "scale": 4},
        {"kind": "gaussian", "scale": "4", "sigma": 2.0},
        {"kind": "gaussian", "scale": 4, "sigma": -2.0},
        {"kind": "gaussian", "scale": 4, "sigma": [1.0, 2.0, 3.0]},
        {"kind": "gaussian", "scale": 4, "sigma": 2.0, "anchor": "middle"},
        {"kind": "gaussian", "scale": 4, "sigma": 2.0, "kernel_size": 2.5},
        {"kind": "fourier", "scale": 2},
        {"kind": "fourier", "kernel": [[1.0]]},
        {"kind": "fourier", "scale": 2, "kernel": "abc"},
        {"kind": "fourier", "scale": 2, "kernel": [[1.0, 2.0], [3.0]]},
        {"kind": "fourier", "scale": 2, "kernel": [[1.0, "a"]]},
        {"kind": "fourier", "scale": 2, "kernel": [[1.0]], "bias": "x"},
        {"kind": "fourier", "scale": 1, "kernel": [[1.0]]},
    ],
)
def test_malformed_dicts(data):
    with pytest.raises(InputError) as err:
        operator_from_dict(data)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- noise
def test_add_noise_reproducible():
    lr = torch.zeros(200, 300)
    a = add_noise(lr, 0.01, seed=3)
    b = add_noise(lr, 0.01, seed=3)
    c = add_noise(lr, 0.01, seed=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert abs(float(a.std()) - 0.01) < 0.0003
    assert abs(float(a.mean())) < 0.0003
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(add_noise(lr, 0.1, generator=g1), add_noise(lr, 0.1, generator=g2))
    assert torch.equal(add_noise(lr, 0.0, seed=1), lr)
    with pytest.raises(InputError):
        add_noise(lr, -0.1)


# --------------------------------------------------------------------------- upsampling
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_upsample_aligned_centered_equals_interpolate(mode):
    lr = torch.rand(2, 7, 9)
    op = GaussianDownsampling(3, 1.0)
    got = upsample_aligned(lr, op, mode=mode)
    ref = F.interpolate(lr[:, None], scale_factor=3, mode=mode, align_corners=False)[:, 0]
    assert got.shape == (2, 21, 27)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_upsample_aligned_corner_is_shifted():
    lr = torch.rand(10, 10, dtype=torch.float64)
    centred = upsample_aligned(lr, GaussianDownsampling(4, 2.0))
    corner = upsample_aligned(lr, GaussianDownsampling(4, 2.0, anchor="corner"))
    # corner offset 7.5 vs centred 1.5: the corner baseline is the centred one moved by 6 px
    torch.testing.assert_close(corner[6:, 6:], centred[:-6, :-6])


def _best_shift(a: torch.Tensor, b: torch.Tensor, r: int = 3, crop: int = 10) -> tuple[int, int]:
    errs = {}
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            d = torch.roll(a, (dy, dx), dims=(0, 1)) - b
            errs[(dy, dx)] = float((d[crop:-crop, crop:-crop] ** 2).mean())
    return min(errs, key=errs.get)


@pytest.mark.parametrize("anchor", ANCHORS)
def test_upsample_aligned_lines_up_with_data(anchor):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 24, 24, generator=g, dtype=torch.float64)
    x = F.interpolate(x, size=(96, 96), mode="bicubic", align_corners=False)[0, 0]
    op = GaussianDownsampling(4, 2.0, anchor=anchor)
    up = upsample_aligned(op(x), op)
    assert _best_shift(up, x) == (0, 0)


# --------------------------------------------------------------------------- estimation
def test_estimate_exact_with_full_window():
    # With the whole grid as window and no regulariser the fit reproduces the LR exactly.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 24, generator=g, dtype=torch.float64) * 0.5 + 0.25
    truth = FourierDownsampling(2, _smooth_kernel(), bias=0.05)
    y = truth(x)
    est = estimate_operator(x.numpy(), y.numpy(), 2, kernel_size=24, eps=0.0)
    assert isinstance(est, OperatorEstimate)
    assert est.residual_rms < 1e-10
    # the DC term: kernel_sum * mean(x) + bias = mean(y)
    assert est.kernel_sum * float(x.mean()) + est.bias == pytest.approx(float(y.mean()), abs=1e-10)


def test_estimate_compact_kernel_and_grids():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 16, 16, generator=g, dtype=torch.float64)
    x = F.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False)[0, 0]
    truth = FourierDownsampling(2, 1.5 * _smooth_kernel(), bias=-0.1)
    y = truth(x).numpy()
    est = estimate_operator(x.numpy(), y, 2, kernel_size=9)
    assert est.kernel.shape == (9, 9)
    assert est.residual_rms < 0.05 * y.std()
    assert est.kernel_sum * float(x.mean()) + est.bias == pytest.approx(float(y.mean()), abs=1e-6)
    # LR on the HR grid (nearest-neighbour enlarged): block averages give back the same LR
    y_hr_grid = np.kron(y, np.ones((2, 2)))
    est2 = estimate_operator(x.numpy(), y_hr_grid, 2, kernel_size=9, reduction="block")
    np.testing.assert_allclose(est2.kernel, est.kernel, atol=1e-12)
    assert est2.bias == pytest.approx(est.bias, abs=1e-12)
    assert json.loads(json.dumps(est.to_dict()))["operator"]["kind"] == "fourier"


def test_estimate_size_not_divisible_by_scale():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 1, 11, 11, generator=g, dtype=torch.float64)
    x = F.interpolate(x, size=(33, 33), mode="bicubic", align_corners=False)[0, 0]
    truth = FourierDownsampling(2, _smooth_kernel(), bias=0.02)
    y = truth(x)
    assert y.shape == (16, 16)
    est = estimate_operator(x.numpy(), y.numpy(), 2, kernel_size=33, eps=0.0)
    assert est.residual_rms < 1e-10  # full window: exact
    assert est.operator.noise_variance is None  # a 16² LR is too small for the noise model
    # LR on the HR grid: both images are cropped to a multiple of the scale
    y_hr_grid = np.kron(y.numpy(), np.ones((2, 2)))
    y_hr_grid = np.pad(y_hr_grid, ((0, 1), (0, 1)), mode="edge")  # 33 x 33, last row unused
    est2 = estimate_operator(x.numpy(), y_hr_grid, 2, kernel_size=5, reduction="block")
    assert est2.kernel.shape == (5, 5)
    assert est2.kernel_sum * float(x[:32, :32].mean()) + est2.bias == pytest.approx(
        float(y.mean()), abs=1e-9
    )


def test_estimate_bad_shapes():
    x = np.zeros((32, 32))
    with pytest.raises(InputError, match=r"\(16, 16\)"):
        estimate_operator(x, np.zeros((15, 16)), 2)
    with pytest.raises(InputError):
        estimate_operator(x, np.zeros((16, 16)), 1)
    with pytest.raises(InputError):
        estimate_operator(x, np.zeros((16, 16)), 2, kernel_size=0)
    with pytest.raises(InputError):
        estimate_operator(np.zeros((4, 4, 3)), np.zeros((2, 2)), 2)


def test_estimate_bad_options():
    x, y = np.zeros((32, 32)), np.zeros((16, 16))
    for kwargs in (
        {"method": "wiener"},
        {"reduction": "bicubic"},
        {"lam": 0.0},
        {"lam": float("nan")},
        {"eps": -1.0},
    ):
        with pytest.raises(InputError) as err:
            estimate_operator(x, y, 2, kernel_size=5, **kwargs)
        assert "\n" not in str(err.value)
    big = np.zeros((140, 140))
    with pytest.raises(InputError, match="method='published'"):
        estimate_operator(big, np.zeros((70, 70)), 2, kernel_size=65)
    est = estimate_operator(big, np.zeros((70, 70)), 2, kernel_size=65, method="published")
    assert est.kernel.shape == (65, 65)


@pytest.mark.parametrize("q", [2, 3, 4])
def test_antialias_reduction_matches_skimage_rescale(q):
    # the published code reduced the LR with skimage's anti-aliased rescale by 1/q
    rescale = pytest.importorskip("skimage.transform").rescale
    from napari_wpp.core.operator_estimation import _reduce_to_lr

    g = np.random.default_rng(q)
    y = g.random((12 * q, 10 * q))
    ref = rescale(y, 1 / q, anti_aliasing=True, order=1, mode="reflect")
    np.testing.assert_allclose(_reduce_to_lr(y, q, "antialias"), ref, atol=1e-12)
    np.testing.assert_allclose(
        _reduce_to_lr(y, q, "block"), y.reshape(12, q, 10, q).mean(axis=(1, 3)), atol=1e-15
    )


def _synthetic_pair(noise: float, seed: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, 32, 32, generator=g, dtype=torch.float64)
    x = F.interpolate(x, size=(128, 128), mode="bicubic", align_corners=False)[0, 0]
    x = (x - x.min()) / (x.max() - x.min())
    kern = 1.5 * np.outer(_gauss1d(7, 1.2, 3.4), _gauss1d(7, 0.9, 2.8))
    y = FourierDownsampling(2, kern, bias=-0.1)(x)
    y = y + noise * torch.randn(y.shape, generator=g, dtype=torch.float64)
    return x.numpy(), y.numpy(), kern


def test_estimate_methods_on_synthetic_pair():
    x, y, kern = _synthetic_pair(noise=0.005)
    truth = FourierDownsampling(2, kern, bias=-0.1)
    ests = {m: estimate_operator(x, y, 2, kernel_size=7, method=m) for m in _METHODS}
    for est in ests.values():  # the bias always reproduces the LR mean
        assert est.kernel_sum * float(x.mean()) + est.bias == pytest.approx(float(y.mean()))
    pub, ref, lsq = ests["published"], ests["refined"], ests["lstsq"]
    assert ref.method == "refined" and ref.to_dict()["method"] == "refined"
    # refined keeps the published gain and offset and never fits worse (same sum, same bias
    # formula, and the published kernel is a feasible point of its least-squares problem)
    assert ref.kernel_sum == pytest.approx(pub.kernel_sum, abs=1e-10)
    assert ref.bias == pytest.approx(pub.bias, abs=1e-10)
    assert ref.residual_rms <= pub.residual_rms + 1e-12
    assert lsq.residual_rms <= ref.residual_rms + 1e-12
    # the unconstrained fit recovers the true gain and offset; residual about the noise level
    assert lsq.kernel_sum == pytest.approx(1.5, rel=0.02)
    assert lsq.bias == pytest.approx(-0.1, abs=0.01)
    assert 0.004 < lsq.residual_rms < 0.0055
    xt = torch.from_numpy(x)
    with torch.no_grad():
        err = {m: float((e.operator(xt) - truth(xt)).pow(2).mean().sqrt()) for m, e in ests.items()}
    assert err["lstsq"] < 0.002
    assert err["refined"] <= err["published"]


def test_estimate_noise_free_lstsq_is_exact():
    # noise-free data from a kernel that fits the window: as the pull towards the published
    # kernel vanishes, the least-squares fit reproduces the LR and the kernel
    x, y, kern = _synthetic_pair(noise=0.0)
    est = estimate_operator(x, y, 2, kernel_size=7, method="lstsq", lam=1e-8)
    assert est.residual_rms < 1e-6
    assert est.kernel_sum == pytest.approx(1.5, abs=1e-5)
    assert est.bias == pytest.approx(-0.1, abs=1e-5)
    np.testing.assert_allclose(est.kernel, kern, atol=0.005)


# --------------------------------------------------------------------------- golden, real data
@pytest.mark.realdata
def test_golden_sic_corner_operator_residual():
    hr = torch.from_numpy(_read(DATA / "sic" / "hr_SiC.png").astype(np.float32) / 255)
    lr = torch.from_numpy(_read(DATA / "sic" / "lr_SiC_x4.png").astype(np.float32) / 255)
    op = GaussianDownsampling(4, 2.0, kernel_size=16, anchor="corner", padding="circular")
    std = float((op(hr) - lr).std())
    assert std <= 0.0103
    wide = GaussianDownsampling(4, 2.5, kernel_size=16, anchor="corner")
    assert float((wide(hr) - lr).std()) == pytest.approx(0.0146, abs=0.0005)


def _psnr(a: torch.Tensor, b: torch.Tensor, crop: int = 40) -> float:
    a = a[crop:-crop, crop:-crop].clamp(0, 1).double()
    b = b[crop:-crop, crop:-crop].double()
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


@pytest.mark.realdata
def test_golden_sic_aligned_bicubic():
    hr = torch.from_numpy(_read(DATA / "sic" / "hr_SiC.png").astype(np.float32) / 255)
    lr = torch.from_numpy(_read(DATA / "sic" / "lr_SiC_x4.png").astype(np.float32) / 255)
    corner = GaussianDownsampling(4, 2.0, anchor="corner")
    assert _psnr(upsample_aligned(lr, corner), hr) == pytest.approx(25.22, abs=0.1)
    # ignoring the corner anchoring loses almost 7 dB (published: 18.48 dB)
    assert _psnr(upsample_aligned(lr, GaussianDownsampling(4, 2.0)), hr) == pytest.approx(
        18.48, abs=0.1
    )
    # the centred operator's baseline lines up with centred data
    centred = GaussianDownsampling(4, 2.0)
    up = upsample_aligned(centred(hr), centred)
    assert _best_shift(up, hr, r=2, crop=40) == (0, 0)
    assert _psnr(up, hr) > 25.0


@pytest.mark.realdata
def test_golden_fs_estimate():
    d = DATA / "fs_registered_pair"
    hr = _read(d / "FS_HR_estimate_operator.png").astype(np.float64) / 255
    lr = _read(d / "FS_LR_estimate_operator.png").astype(np.float64) / 255
    est = estimate_operator(hr, lr, 2, kernel_size=15)
    assert est.kernel.shape == (15, 15)
    assert est.kernel_sum == pytest.approx(1.7735, rel=0.02)
    assert est.bias == pytest.approx(-0.2234, abs=0.01)
    assert est.residual_rms <= 0.024
    peak = np.unravel_index(int(np.argmax(est.kernel)), est.kernel.shape)
    assert max(abs(int(peak[0]) - 7), abs(int(peak[1]) - 7)) <= 1  # near the centre
    assert 0.04 < est.kernel.max() < 0.065  # published peak 0.0499


@pytest.mark.realdata
def test_golden_fs_published_and_refined():
    d = DATA / "fs_registered_pair"
    hr = _read(d / "FS_HR_estimate_operator.png").astype(np.float64) / 255
    lr = _read(d / "FS_LR_estimate_operator.png").astype(np.float64) / 255
    pub = estimate_operator(hr, lr, 2, method="published")
    # with the published anti-aliased reduction of the LR the published numbers are exact
    assert pub.kernel_sum == pytest.approx(1.7735, abs=0.0005)
    assert pub.bias == pytest.approx(-0.22338, abs=0.0005)
    assert pub.residual_rms == pytest.approx(0.0232, abs=0.0001)
    assert float(pub.kernel.max()) == pytest.approx(0.0499, abs=0.0002)
    assert np.unravel_index(int(np.argmax(pub.kernel)), pub.kernel.shape) == (6, 6)
    ref = estimate_operator(hr, lr, 2)  # default: refined
    assert ref.method == "refined"
    assert ref.kernel_sum == pytest.approx(pub.kernel_sum, abs=1e-9)
    assert ref.bias == pytest.approx(pub.bias, abs=1e-9)
    assert ref.residual_rms < pub.residual_rms - 0.0004  # measured 0.02265 vs 0.02323


@pytest.mark.gpu
def test_operators_on_cuda_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = torch.rand(2, 40, 36)
    for op in (
        GaussianDownsampling(4, 2.0, anchor="corner"),
        GaussianDownsampling(2, 1.0, padding="reflect"),
        FourierDownsampling(2, _smooth_kernel(), bias=0.1),
    ):
        y_cpu = op(x)
        op_cuda = op.to("cuda")
        y_gpu = op_cuda(x.cuda())
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            op_cuda.adjoint(y_gpu).cpu(), op.to("cpu").adjoint(y_cpu), rtol=1e-5, atol=1e-5
        )
        up = upsample_aligned(y_gpu, op_cuda)
        assert up.device.type == "cuda"
        torch.testing.assert_close(up.cpu(), upsample_aligned(y_cpu, op), rtol=1e-5, atol=1e-5)


def test_kernel_size_limits_are_absolute_and_relative_to_the_image():
    """Above MAX_KERNEL_SIZE taps the constructor refuses; above 4× a side the forward does."""
    with pytest.raises(InputError, match="kernel size 100000000 is far too large.*4096"):
        GaussianDownsampling(2, 2.0, kernel_size=100_000_000)
    wide = GaussianDownsampling(2, 2.0, kernel_size=1000)
    with pytest.raises(InputError, match="far larger than the image.*at most 256"):
        wide(torch.zeros(64, 64, dtype=torch.float64))
    assert wide(torch.zeros(256, 256, dtype=torch.float64)).shape == (128, 128)
