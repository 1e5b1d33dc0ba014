"""Several processes, one job: torchrun's environment read once, torch.distributed set up from it.

``torchrun --nproc-per-node N -m ddpm_cli train ...`` starts N copies of the command with RANK,
WORLD_SIZE and LOCAL_RANK set (several nodes through torchrun's rendezvous). Training then
splits every global batch across the ranks (DistributedDataParallel averages the gradients);
sampling splits the seeds. Outside torchrun everything here is the one-process identity.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used, so the CLI can ask for its rank without it
    import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """The process that writes files and reports (rank 0)."""
        return self.rank == 0

    def shard(self, total: int) -> slice:
        """This rank's rows of a global batch of ``total`` (equal shares; total must divide evenly)."""
        share = total // self.size
        return slice(self.rank * share, (self.rank + 1) * share)


def world() -> World:
    """The torchrun world this process belongs to (rank 0 of 1 outside torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(device: torch.device) -> World:
    """Join the process group once (NCCL on CUDA, gloo on the CPU) and return the world."""
    import torch

    here = world()
    if here.distributed and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=here.rank, world_size=here.size,
                                             device_id=device if device.type == "cuda" else None)
    return here


def leave() -> None:
    """Tear the process group down, if this process joined one, before the interpreter exits: left
    to exit-time clean-up, gloo's threads can abort the process ("terminate called without an active
    exception") after its work is done. Imports nothing: a process without torch joined nothing."""
    torch = sys.modules.get("torch")
    if torch is not None and _joined():
        torch.distributed.destroy_process_group()


def _joined() -> bool:
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    import torch

    if _joined():
        torch.distributed.barrier()


def gather(value: object) -> list[object]:
    """Every rank's ``value``, in rank order (``[value]`` outside torchrun)."""
    import torch

    if not _joined():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``tensor`` (the same shape on each), concatenated in rank order: the global
    batch of per-sample values (itself outside torchrun)."""
    import torch

    if not _joined():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def average(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over the ranks (itself outside torchrun)."""
    import torch

    if not _joined():
        return tensor
    tensor = tensor.clone()
    torch.distributed.all_reduce(tensor)
    return tensor / torch.distributed.get_world_size()

