"""Data-parallel training helpers: the same trainer code runs as one process or under ``torchrun
--nproc_per_node N`` / ``accelerate launch`` (both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
Shared by the phase-2 and phase-3 trainers.

Typical use::

    ctx = init_distributed("cuda")              # single process when WORLD_SIZE is unset
    model = wrap_ddp(model.to(ctx.device), ctx)
    sampler = make_sampler(len(dataset), ctx, seed=0)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        ...                                     # log / save only where ctx.is_main
    barrier(ctx)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

__all__ = [
    "derived_seed",
    "DistContext",
    "all_gather_objects",
    "all_gather_tensors",
    "all_reduce_mean",
    "barrier",
    "init_distributed",
    "make_sampler",
    "shutdown_distributed",
    "unwrap",
    "wrap_ddp",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the process that logs, shows progress and writes files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | torch.device | None = None) -> DistContext:
    """Join the process group the launcher describes in the environment, or run as a single process.

    With ``WORLD_SIZE`` > 1 in the environment (torchrun, accelerate launch) the default process group is
    initialised from it (``env://``) unless it already is: backend ``nccl`` for CUDA devices, ``gloo``
    otherwise. A CUDA device is then pinned to ``cuda:LOCAL_RANK``.

    Args:
        device: the device asked for (``"cpu"``, ``"cuda"``, ``"cuda:1"``...); None means CPU.

    Returns:
        The process's :class:`DistContext`.
    """
    device = torch.device(device if device is not None else "cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not dist.is_initialized():
        return DistContext(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
        logger.debug("joined process group (%s): rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    """Destroy the default process group if one is initialised (call once at the end of a script)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel(module)`` when running distributed, else ``module`` itself.

    The module must already be on ``ctx.device``; gradients are averaged over the processes.
    """
    if not ctx.distributed:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or ``module`` itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def make_sampler(num_items: int, ctx: DistContext, *, seed: int, shuffle: bool = True) -> DistributedSampler:
    """A seeded sampler giving each process its share of ``range(num_items)``; call ``set_epoch`` per epoch.

    Every process gets ``ceil(num_items / world_size)`` indices (a few repeated to even them out), and the
    order of an epoch depends only on ``seed`` and the epoch number, so a resumed run sees the same order.
    """
    return DistributedSampler(range(num_items), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle,
                              seed=seed, drop_last=False)


def barrier(ctx: DistContext) -> None:
    """Wait for every process (no-op for a single process)."""
    if ctx.distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of ``value`` over the processes (``value`` itself for a single process), on ``value``'s device."""
    if not ctx.distributed:
        return value
    total = value.detach().to(ctx.device, copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total / ctx.world_size).to(value.device)


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``; picklable objects (RNG states, small dicts) only."""
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def all_gather_tensors(value: torch.Tensor, ctx: DistContext) -> list[torch.Tensor]:
    """``[value of rank 0, value of rank 1, ...]``; every process must pass a tensor of the same shape.

    With NCCL the tensors travel on ``ctx.device`` and come back there.
    """
    if not ctx.distributed:
        return [value]
    value = value.to(ctx.device).contiguous()
    gathered = [torch.empty_like(value) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, value)
    return gathered


def derived_seed(*keys: int) -> int:
    """A 32-bit seed determined by ``keys`` alone (e.g. run seed, step, view), so that what it draws does not depend
    on how many processes share the work."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
