"""Several processes under torchrun: joining the process group and summing across ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass

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

    def max(self, value: int) -> int:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: torch.device) -> Distributed:
    """Join the torchrun process group when WORLD_SIZE > 1: NCCL on GPUs (`device` is already
    this process's `cuda:LOCAL_RANK` and its current device, see resolve_device), gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(int(os.environ["RANK"]), world, device)
