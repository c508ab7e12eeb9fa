"""GPU c-transform paths: the fused Triton kernel (under Triton's CPU interpreter), the torch
device path forced on CPU tensors, their op count per pass, and CUDA checks (marked gpu)."""

from __future__ import annotations

import collections
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from napari_wpp.core.semidual import WassersteinPatchPrior, c_transform_argmin
from napari_wpp.core.semidual import engine as semidual
from napari_wpp.core.semidual import gpu as semidual_gpu

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


def _case(name: str, n: int, m: int, d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Small inputs with the hard cases of real patches.

    ``dup``: 8-bit-like values, duplicated references (exact ties: first index wins), ψ ≠ 0.
    ``near``: references differing by less than float32 can resolve, ψ differing by ulps.
    ``random``: plain uniform clouds and ψ.
    """
    g = torch.Generator().manual_seed(seed)
    if name == "dup":
        x = torch.randint(0, 4, (n, d), generator=g).float()
        y = torch.randint(0, 4, (m, d), generator=g).float()
        half = m // 2
        y[m - half :] = y[:half].clone()  # every point of the first half appears twice
        psi = 0.5 * torch.randint(-2, 3, (m,), generator=g).float()
        psi[m - half :] = psi[:half].clone()
    elif name == "near":
        x = 100.0 + torch.rand(n, d, generator=g)
        base = 100.0 + torch.rand(max(1, m // 4), d, generator=g)
        k = torch.arange(m)
        y = base[k % base.shape[0]].clone()
        y[:, 0] = y[:, 0] + (k % 3).float() * 2e-5  # a few ulps apart
        psi = torch.nextafter(torch.zeros(m), torch.ones(m)) * (k % 2).float()
    else:
        x = torch.rand(n, d, generator=g)
        y = torch.rand(m, d, generator=g)
        psi = 0.1 * torch.rand(m, generator=g)
    return x, y, psi


SHAPES = [(1, 1, 3), (70, 1, 5), (1, 70, 5), (65, 130, 9), (130, 64, 36), (17, 129, 36)]
NAMES = ["dup", "near", "random"]


def _ties_case() -> tuple[torch.Tensor, ...]:
    """Copies of the winner in the same tile and in later tiles (zero ψ)."""
    x, y, _ = _case("random", 40, 200, 6, seed=3)
    y[[5, 9, 70, 199]] = x[0]
    y[[64, 130]] = x[1]
    return x, y, torch.zeros(200)


def interpreted_results() -> dict[str, torch.Tensor]:
    """Triton path on every case; run in a process started with ``TRITON_INTERPRET=1``."""
    out = {}
    for name in NAMES:
        for shape in SHAPES:
            key = f"{name}-{'-'.join(map(str, shape))}"
            out[key] = c_transform_argmin(*_case(name, *shape), backend="triton")
    out["ties"] = c_transform_argmin(*_ties_case(), backend="triton")
    out["ties-flags"] = semidual_gpu.triton_top2(*_ties_case())[1]
    return out


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Results of the Triton kernels in Triton's CPU interpreter.

    The interpreter must be chosen before triton is first imported (its own jit helpers,
    ``tl.argmin`` included, are defined at import), so the kernels run in a fresh process.
    """
    if not HAS_TRITON:
        pytest.skip("triton is not installed (it comes with torch's Linux CUDA wheels)")
    out = tmp_path_factory.mktemp("triton") / "results.pt"
    tests = str(Path(__file__).parent)
    script = (
        f"import sys, torch; sys.path.insert(0, {tests!r}); "
        "from test_semidual_gpu import interpreted_results; "
        f"torch.save(interpreted_results(), {str(out)!r})"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_kernel_exact_under_interpreter(
    interpreted: dict[str, torch.Tensor], name: str, shape: tuple[int, int, int]
) -> None:
    """Fused kernel + float64 re-rank kernel = float64 brute force (block and tile edges)."""
    got = interpreted[f"{name}-{'-'.join(map(str, shape))}"]
    assert got.dtype == torch.int64
    assert torch.equal(got, semidual._brute_force64(*_case(name, *shape)))


def test_triton_first_index_among_ties_across_tiles(interpreted: dict[str, torch.Tensor]) -> None:
    """Copies of the winner in the same tile and in later tiles: the lowest index wins."""
    got = interpreted["ties"]
    assert got[0] == 5 and got[1] == 64
    assert torch.equal(got, semidual._brute_force64(*_ties_case()))
    flags = interpreted["ties-flags"]
    assert flags[0] == 1 and flags[1] == 1  # exact ties are never certified


def test_triton_backend_refused_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, y, psi = _case("random", 4, 5, 3)
    with pytest.raises(semidual.InputError, match="backend='device'"):
        c_transform_argmin(x, y, psi, backend="triton")


@pytest.mark.parametrize("name", ["dup", "near", "random"])
@pytest.mark.parametrize("shape", SHAPES)
def test_device_path_exact_on_cpu_tensors(
    monkeypatch: pytest.MonkeyPatch, name: str, shape: tuple[int, int, int]
) -> None:
    """Torch device path forced on the CPU, small blocks (block edges, M not a multiple)."""
    monkeypatch.setattr(semidual_gpu, "DEVICE_BLOCK_ELEMS", 1000)
    monkeypatch.setattr(semidual_gpu, "RERANK_ELEMS", 500)
    x, y, psi = _case(name, *shape)
    got = c_transform_argmin(x, y, psi, backend="device")
    assert torch.equal(got, semidual._brute_force64(x, y, psi))


def test_device_rerank_falls_back_when_ties_exceed_candidates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More exact copies of the winner than float64 candidates: the brute force decides."""
    monkeypatch.setattr(semidual_gpu, "RERANK_CANDIDATES", 3)
    x, y, psi = _case("random", 30, 50, 4, seed=7)
    y[10:20] = x[0]
    got = c_transform_argmin(x, y, torch.zeros(50), backend="device")
    assert got[0] == 10
    assert torch.equal(got, semidual._brute_force64(x, y, torch.zeros(50)))


def test_float64_inputs_keep_their_precision() -> None:
    """Non-float32 inputs: wider bound, re-rank on the original values."""
    x, y, psi = (t.double() for t in _case("near", 40, 60, 5, seed=2))
    got = c_transform_argmin(x, y, psi, backend="device")
    assert torch.equal(got, semidual._brute_force64(x, y, psi))


class _OpCounter(TorchDispatchMode):
    """Counts the aten operations issued (each is at least one kernel launch on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _device_pass_ops(n: int) -> collections.Counter[str]:
    x, y, psi = _case("dup", n, 64, 6, seed=1)
    with _OpCounter() as counter:
        c_transform_argmin(x, y, psi, backend="device")
    return counter.ops


def test_device_pass_issues_a_bounded_number_of_ops() -> None:
    """No per-block or per-row loop: one pass issues the same ops for N = 1,000 and 50,000."""
    small, large = _device_pass_ops(1_000), _device_pass_ops(50_000)
    assert sum(large.values()) <= sum(small.values()) + 4, (small, large)
    assert sum(large.values()) < 150
    assert large["aten.nonzero.default"] <= 2  # the gather of uncertain rows (+ rare overflow)


@pytest.mark.parametrize("solver", ["adam", "asgd", "gd"])
def test_device_solver_steps_match_host(solver: str) -> None:
    """Each solver's device-scalar step (emulated on CPU tensors) equals the CPU's float step."""
    x, y, _ = _case("random", 150, 40, 4, seed=6)
    host = WassersteinPatchPrior(y, solver=solver)
    dev = WassersteinPatchPrior(y, solver=solver)
    for _ in range(4):
        host.ascend(x, 1)
        idx = c_transform_argmin(x, y, dev.psi)
        costs = ((x - y[idx]) ** 2).sum(1)
        counts = torch.bincount(idx, minlength=40)
        n = torch.tensor(150.0, dtype=torch.float64)
        value = dev._semidual_value(counts, n, costs.double().sum())
        dev._update_scale_on_device(torch.as_tensor(value), costs.double().mean())
        dev._step_on_device(dev._ascent_direction(counts, n))
        torch.testing.assert_close(dev.psi, host.psi, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ CUDA only
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


def _float64_rows(x: torch.Tensor, y: torch.Tensor, psi: torch.Tensor, rows: torch.Tensor):
    """Float64 brute force of some rows on the GPU, in large chunks."""
    y64, p64 = y.double(), psi.double()
    out = []
    chunk = max(1, (1 << 27) // (y.shape[0] * y.shape[1]))
    for part in rows.split(chunk):
        diff = x[part].double()[:, None, :] - y64[None]
        out.append(((diff * diff).sum(-1) - p64).argmin(1))
    return torch.cat(out)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["triton", "device"])
@pytest.mark.parametrize("name", ["dup", "random"])
def test_cuda_exact_on_real_sizes(backend: str, name: str) -> None:
    """N = 225,625, M = 10,000, d = 36: 20,000 random rows and every uncertain row."""
    if backend == "triton" and not semidual_gpu.triton_usable(torch.device("cuda")):
        pytest.skip("triton is not installed")
    x, y, psi = (t.cuda() for t in _case(name, 225_625, 10_000, 36, seed=11))
    if name == "dup":
        x = torch.clamp(x * 60.0 + torch.randint_like(x, 0, 3), 0, 255)
        y = torch.clamp(y * 60.0, 0, 255)
        psi = psi * 500.0
    got = c_transform_argmin(x, y, psi, backend=backend)
    top2 = semidual_gpu.triton_top2 if backend == "triton" else semidual_gpu.device_top2
    with semidual._ieee_fp32_matmul(x.device):
        _, flags = top2(x, y, psi)
    uncertain = torch.nonzero(flags).squeeze(1)
    rows = torch.cat([torch.randperm(x.shape[0], device="cuda")[:20_000], uncertain])
    assert torch.equal(got[rows], _float64_rows(x, y, psi, rows))


@pytest.mark.gpu
@gpu
def test_cuda_pass_and_loss_and_ascend_do_not_sync() -> None:
    """One pass and one loss_and_ascend run under sync debug mode 'error' (Triton path; the
    torch device path syncs once per pass to gather its uncertain rows)."""
    if not semidual_gpu.triton_usable(torch.device("cuda")):
        pytest.skip("triton is not installed")
    x, y, psi = (t.cuda() for t in _case("dup", 20_000, 2_000, 36, seed=12))
    prior = WassersteinPatchPrior(y)
    prior.ascend(x, 2)  # warm-up: kernels compiled, scale set
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        c_transform_argmin(x, y, psi)
        loss = prior.loss_and_ascend(x.requires_grad_(), 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(float(loss))
