"""Several processes under torchrun: joining the process group, summing and agreeing across
ranks, and leaving the group."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """This process's place among the ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (the values themselves in a single process)."""
        if self.world == 1 or not values:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors on this process's device, each summed in place over the ranks."""
        if self.world > 1:
            for value in sums.values():
                dist.all_reduce(value)
        return sums

    def max(self, values: list[int]) -> list[int]:
        """Each value's maximum over the ranks, in one collective."""
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.world > 1:  # where setup_distributed always gives the device
            cuda = self.device.type == "cuda"
            # NCCL's barrier on this rank's own GPU (it would guess one from the rank)
            dist.barrier(device_ids=[self.device.index] if cuda else None)

    def close(self) -> None:
        """Leave the process group (PyTorch warns at exit, and some NCCL versions hang, where a
        process ends without)."""
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device: torch.device, timeout: timedelta | None = None) -> Distributed:
    """Join the torchrun process group when WORLD_SIZE > 1: NCCL on GPUs (`device` is already
    this process's `cuda:LOCAL_RANK` and its current device, see resolve_device; NCCL is told
    so, which also lets it connect at once), gloo on CPUs. `timeout`: how long a collective
    may wait for the other ranks (PyTorch's default, 10 to 30 minutes, where None)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(device=device)
    if not dist.is_initialized():
        waits = {} if timeout is None else {"timeout": timeout}
        if device.type == "cuda":
            bound = "device_id" in inspect.signature(dist.init_process_group).parameters
            dist.init_process_group("nccl", **({"device_id": device} if bound else {}), **waits)
        else:
            dist.init_process_group("gloo", **waits)
    return Distributed(int(os.environ["RANK"]), world, device)
