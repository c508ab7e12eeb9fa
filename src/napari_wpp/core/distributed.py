"""Data-parallel training over several processes (GPUs) with ``torch.distributed``.

A run launched by ``torchrun --nproc-per-node G napari-wpp train ...`` starts G processes
(ranks) with the environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init_from_environment` joins them into one process
group (NCCL between CUDA devices, Gloo on CPUs) and returns a :class:`DataParallel` that the
training loop uses for its few collectives:

* :meth:`DataParallel.all_reduce_sum`: the ψ passes' argmin counts and cost sums (every rank
  then applies the identical ψ step) and the logged losses;
* :meth:`DataParallel.main_decision`: rank 0's stop decision and budget fraction, so that all
  ranks take the same learning rate and stop at the same step.

The network's gradients are averaged by ``DistributedDataParallel`` itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from napari_wpp.core.errors import InputError

#: Environment variables a ``torchrun`` launch sets for every rank.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DataParallel:
    """Where this process stands in a data-parallel run (one process: the defaults).

    Parameters
    ----------
    rank
        Index of this process among all of them (0: the main process, which prints and
        writes files).
    world_size
        Number of processes; each trains on its own share of every step's crops.
    local_rank
        Index of this process on its machine (its CUDA device).
    device
        Device of the collectives' tensors: this rank's CUDA device with NCCL, the CPU with
        Gloo.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def active(self) -> bool:
        """Whether there is more than one process (collectives are needed)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that prints and writes files."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over all ranks (a new tensor; the input is left as it is)."""
        if not self.active:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        """The mean of ``tensor`` over all ranks."""
        if not self.active:
            return tensor
        return self.all_reduce_sum(tensor) / self.world_size

    def main_decision(self, decision: int, fraction: float) -> tuple[int, float]:
        """Rank 0's ``decision`` (a small integer code) and budget ``fraction``, on every rank.

        A two-element broadcast per step: every rank then stops at the same step and decays
        its learning rate by the same factor, whatever its own clock says.
        """
        if not self.active:
            return decision, fraction
        control = torch.tensor([decision, fraction], dtype=torch.float64, device=self.device)
        dist.broadcast(control, src=0)
        values = control.cpu()
        return int(round(float(values[0]))), float(values[1])


#: The single-process run (no collectives).
SINGLE_PROCESS = DataParallel()


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    if not all(name in os.environ for name in LAUNCH_VARIABLES):
        return False
    return int(os.environ["WORLD_SIZE"]) > 1


def rank_device(name: str, local_rank: int, world_size: int) -> str:
    """The device of one rank: ``cuda:LOCAL_RANK`` for ``"auto"`` or ``"cuda"`` on CUDA.

    Raises
    ------
    InputError
        For an explicit ``cuda:N`` with several processes (each rank takes its own device).
    """
    if world_size <= 1:
        return name
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    if name.startswith("cuda:"):
        raise InputError(
            f"--device {name} with {world_size} processes: use --device cuda (each process "
            "takes the GPU of its LOCAL_RANK)"
        )
    if name == "cuda":
        raise InputError("--device cuda asked for but this machine has no CUDA: use cpu")
    return "cpu" if name == "auto" else name


def current() -> DataParallel:
    """The data-parallel state of an initialised process group (one process otherwise)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE_PROCESS
    world_size = dist.get_world_size()
    if world_size <= 1:
        return SINGLE_PROCESS
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    nccl = dist.get_backend() == "nccl"
    return DataParallel(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        device=f"cuda:{local_rank}" if nccl else "cpu",
    )


def init_from_environment(device: str) -> DataParallel:
    """Join the process group of a ``torchrun`` launch (no-op without one).

    Parameters
    ----------
    device
        The device this rank trains on (from :func:`rank_device`): NCCL for CUDA devices,
        Gloo otherwise.

    Returns
    -------
    DataParallel
        This rank's place; :data:`SINGLE_PROCESS` when not launched by ``torchrun``.
    """
    if not launched():
        return current()
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return current()


def shutdown() -> None:
    """Leave the process group (after the last collective)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
