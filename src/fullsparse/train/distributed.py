"""Data-parallel runs under ``torchrun``: process group, DDP wrapping, metric reduction.

``torchrun --nproc_per_node N -m fullsparse train ...`` sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; :func:`init_distributed` reads them and
joins the group (gloo on CPU, nccl on CUDA). Without them (or with ``WORLD_SIZE=1``) every
function here is a no-op, so the training loop has one code path.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fullsparse.errors import UserError

__all__ = [
    "DistInfo",
    "init_distributed",
    "shutdown_distributed",
    "all_reduce_sum",
    "any_rank",
    "broadcast_buffers",
    "barrier",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: True when this process started the process group (and so must destroy it).
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group described by the torchrun environment (if any)."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistInfo()
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if dist.is_initialized():  # the caller set the group up itself
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=False)
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise UserError(
                f"WORLD_SIZE={world_size} but {var} is not set; start with "
                "torchrun --nproc_per_node N -m fullsparse train ..."
            )
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s)"
            )
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=30),
    )
    return DistInfo(rank, world_size, local_rank, owns_group=True)


def shutdown_distributed(info: DistInfo, synchronize: bool = False) -> None:
    """Destroy the process group this process started. ``synchronize``: all ranks got
    here normally, so meet at a barrier first; gloo can abort a process ("terminate called
    without an active exception") when one rank tears down while another still has work in
    flight. After an error there is no barrier: the other ranks may never arrive."""
    if info.owns_group and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (float64, so counts stay exact)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on some rank (keeps ranks in lock-step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them at the start of each training forward, so after the last step each
    rank holds statistics updated by its own batch; evaluation and the checkpoint (rank 0's)
    must agree.
    """
    if not info.enabled:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
