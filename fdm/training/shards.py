"""How phase 2 splits its views into feature-cache shards and builds each step's batch from them, the same global
batches whatever the number of processes (one shard per process by default)."""

from __future__ import annotations

import torch

from fdm.errors import InputError
from fdm.training.distributed import DistContext, derived_seed

__all__ = ["ShardedBatches", "owned_shards", "shard_ranges"]


def shard_ranges(num_views: int, num_shards: int) -> list[range]:
    """The views of each shard: ``num_shards`` contiguous ranges covering ``range(num_views)``, sizes within 1."""
    return [range(s * num_views // num_shards, (s + 1) * num_views // num_shards) for s in range(num_shards)]


def owned_shards(num_shards: int, ctx: DistContext) -> list[int]:
    """The shards process ``ctx.rank`` encodes and reads: ``s % world_size == rank``."""
    if num_shards % ctx.world_size:
        raise InputError(f"the feature cache has {num_shards} shards, which {ctx.world_size} processes cannot share "
                         f"evenly: use a multiple of the number of processes (default: one shard per process).")
    return list(range(ctx.rank, num_shards, ctx.world_size))


class ShardedBatches:
    """Phase 2's batches over a sharded cache: the same global batches whatever the number of processes.

    Each epoch, every shard's views are shuffled with a generator seeded by ``(seed, epoch, shard)``. Step ``k``'s
    global batch is, for every shard, the ``k``-th slice of ``global_batch / num_shards`` views of its order;
    process ``r`` takes the slices of the shards it owns. One process reading a 2-shard cache and two processes
    reading one shard each therefore train on the same global batches. An epoch ends when the smallest shard
    has no full slice left (the few views left over are seen in later epochs' orders).

    Args:
        shards: the views of each shard (:func:`shard_ranges`).
        batch_size: views per process and step.
        ctx: the process's distributed context.
        seed: seed of the orders.
    """

    def __init__(self, shards: list[range], batch_size: int, ctx: DistContext, *, seed: int):
        self.shards = shards
        self.owned = owned_shards(len(shards), ctx)
        global_batch = batch_size * ctx.world_size
        if global_batch % len(shards):
            raise InputError(f"the global batch ({batch_size} x {ctx.world_size} processes = {global_batch}) must be a "
                             f"multiple of the number of cache shards ({len(shards)}).")
        self.per_shard = global_batch // len(shards)
        smallest = min(len(s) for s in shards)
        if smallest < self.per_shard:
            raise InputError(f"a cache shard holds {smallest} views, fewer than the {self.per_shard} each step takes "
                             f"from it: use a smaller batch or fewer shards.")
        self.steps_per_epoch = smallest // self.per_shard
        self.seed = seed
        self._epoch = -1
        self._orders: dict[int, torch.Tensor] = {}

    def batch(self, step: int) -> list[int]:
        """The view indices this process trains on at (0-based) ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._orders = {s: self._order(s, epoch) for s in self.owned}
        lo, hi = position * self.per_shard, (position + 1) * self.per_shard
        return [int(i) for s in self.owned for i in self._orders[s][lo:hi]]

    def _order(self, shard: int, epoch: int) -> torch.Tensor:
        seed = derived_seed(self.seed, epoch, shard)
        views = self.shards[shard]
        return torch.randperm(len(views), generator=torch.Generator().manual_seed(seed)) + views.start
