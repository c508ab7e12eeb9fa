"""Data-parallel training: W ranks on CPUs (Gloo) reproduce one process with W times the batch."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from napari_wpp.core import distributed
from napari_wpp.core.errors import InputError

WORKER = Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    for name in distributed.LAUNCH_VARIABLES:
        env.pop(name, None)
    return env


def torchrun(ranks: int, *args: str) -> list[str]:
    """The command line of ``torchrun`` with ``ranks`` processes on 127.0.0.1."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(ranks),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *args,
    ]


def _load_worker():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cases of the worker trained by 2 ranks (one torchrun launch for all)."""
    out = tmp_path_factory.mktemp("ranks")
    command = torchrun(2, str(WORKER), str(out))
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.mark.slow  # 6-9 s on two shared cores: one torchrun launch of two ranks
@pytest.mark.parametrize("case", worker.CASES, ids=[c[0] for c in worker.CASES])
def test_two_ranks_reproduce_one_process_with_the_doubled_batch(
    two_ranks: Path, case: tuple
) -> None:
    name, model, psi_mode, patches = case
    b = worker.BATCH_SIZE
    single = worker.run_case(model, psi_mode, 2 * b, 2 * patches, distributed.SINGLE_PROCESS)
    ranks = [torch.load(two_ranks / f"{name}-rank{r}.pt", weights_only=False) for r in range(2)]
    assert single["world_size"] == 1 and [r["world_size"] for r in ranks] == [2, 2]
    for run in ranks:
        assert len(run["history"]) == len(single["history"]) == 4
        for got, want in zip(run["history"], single["history"], strict=True):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
        for got, want in zip(run["psi"], single["psi"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        for key, want in single["weights"].items():
            torch.testing.assert_close(run["weights"][key], want, rtol=1e-3, atol=1e-5)
        assert run["config"]["batch_size"] == b
    # the ranks hold the very same ψ and weights
    torch.testing.assert_close(ranks[0]["psi"], ranks[1]["psi"], rtol=0, atol=0)
    assert ranks[0]["devices"][0] == "cpu ×2" and single["devices"][0] == "cpu"


def test_one_process_needs_no_collectives() -> None:
    dp = distributed.current()
    assert dp == distributed.SINGLE_PROCESS and dp.is_main and not dp.active
    t = torch.arange(3)
    assert dp.all_reduce_sum(t) is t
    assert dp.main_decision(2, 0.5) == (2, 0.5)


def test_rank_devices() -> None:
    assert distributed.rank_device("cpu", 1, 2) == "cpu"
    assert distributed.rank_device("cuda:1", 0, 1) == "cuda:1"
    with pytest.raises(InputError, match="LOCAL_RANK"):
        distributed.rank_device("cuda:1", 0, 2)
    if not torch.cuda.is_available():
        assert distributed.rank_device("auto", 1, 2) == "cpu"


@pytest.mark.slow  # about 20 s on two shared cores: three processes import torch
def test_torchrun_cli_writes_one_model_and_one_progress_stream(tmp_path: Path) -> None:
    import tifffile

    from napari_wpp import io
    from napari_wpp.data import synthetic_material

    m = synthetic_material(shape=(4, 32, 32), scale=2, noise=0.01, seed=0)
    tifffile.imwrite(tmp_path / "lr.tif", m.lr, photometric="minisblack")
    tifffile.imwrite(tmp_path / "ref.tif", m.reference)
    out = tmp_path / "m.safetensors"
    command = torchrun(
        2,
        "-m",
        "napari_wpp.cli",
        "train",
        "--lr-data",
        str(tmp_path / "lr.tif"),
        "--reference",
        str(tmp_path / "ref.tif"),
        "--scale",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--crop-size",
        "12",
        "--reference-patches",
        "200",
        "--psi-passes",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    wrote = [line for line in result.stdout.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1 and "cpu ×2" in wrote[0], result.stdout
    progress = [line for line in result.stderr.splitlines() if "step 2/2" in line]
    assert len(progress) == 1 and "· cpu ×2 ·" in progress[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr.tif", "m.safetensors", "ref.tif"]
    state = io.load_model(out)
    assert state.step == 2 and state.config["batch_size"] == 2
    assert not any(k.startswith("module.") for k in state.model.state_dict())
