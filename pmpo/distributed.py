"""Multi-process training with ``torch.distributed``: set up from torchrun's environment.

``torchrun --nproc_per_node=K -m pmpo train ...`` starts K copies of the command; each reads
RANK / WORLD_SIZE / LOCAL_RANK from the environment. Without those variables (a plain
``pmpo train``) everything here is a no-op and the code runs as one process, so the engine
never needs two code paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .device import resolve_device
from .errors import InputError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def info() -> DistInfo:
    """Rank and world size of the initialised process group; one process (rank 0 of 1) otherwise."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo(0, 1, 0)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def init_from_env(device: str | torch.device = "auto") -> torch.device:
    """Join the process group torchrun describes and return this process's device.

    NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU. Called once per process
    by the commands that train or evaluate; a single process returns the requested device.
    """
    want = resolve_device(device)
    if not launched_by_torchrun():
        return want
    if not dist.is_available():
        raise InputError("this PyTorch build has no torch.distributed; run without torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if want.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InputError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible; "
                "use --nproc_per_node <= the number of GPUs"
            )
        want = torch.device("cuda", local_rank)
        torch.cuda.set_device(want)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want.type == "cuda" else "gloo")
    return want


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place and returned; identity for one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj):
    """Rank 0's value of a small picklable object on every process (used for run decisions)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
