"""Sharded extraction over the processes ``torchrun`` launches: each rank extracts its own cache shards.

    torchrun --standalone --nproc-per-node 8 -m featcache extract MODEL DATA --layers layer3

Every rank computes the same cache key. Rank 0 takes the entry's lock (the ranks act as one writer)
and fixes the shard size; shards are dealt round-robin, each rank runs the backbone on its own GPU
(``cuda:LOCAL_RANK``) over the rows of its shards, and rank 0 commits the manifest once every rank has
written. The entry is the one a single process would write: same key, same rows in the same order.
A rank that dies leaves its finished shards; the next run, with any number of processes, extracts
only the missing ones. Multi-node runs need a cache folder that every node sees.

Coordination uses a gloo group, so it works on CPU-only machines too, beside any NCCL group of yours.
From Python, every rank runs::

    ranks = ranks_from_env()
    feats = extract(backbone, samples, config, ranks=ranks)
    ranks.close()
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .._util import FeatcacheError


def _timeout() -> timedelta:
    """How long a rank waits at a barrier for the others (the slowest rank's share of the extraction):
    ``$FEATCACHE_DIST_TIMEOUT_H`` hours, 12 by default."""
    text = os.environ.get("FEATCACHE_DIST_TIMEOUT_H", "12")
    try:
        hours = float(text)
    except ValueError:
        hours = -1.0
    if hours <= 0:
        raise FeatcacheError(f"FEATCACHE_DIST_TIMEOUT_H={text!r} is not a positive number of hours")
    return timedelta(hours=hours)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the extraction processes.

    Example:
        >>> ranks = ranks_from_env()  # None unless launched by torchrun with several processes
        >>> ranks.owns(shard=5) if ranks else True  # doctest: +SKIP
    """

    rank: int
    world: int
    local_rank: int
    group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, shard: int) -> bool:
        """Shards are dealt round-robin, so every rank gets a similar share of any contiguous range."""
        return shard % self.world == self.rank

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def close(self) -> None:
        """Wait for every rank, then leave the process group (call it on every rank, after success).

        Exiting without it lets rank 0, which serves ``torchrun``'s rendezvous store, quit while another
        rank still talks to it, and the gloo threads can abort the process at shutdown.
        """
        global _RANKS
        self.barrier()
        dist.destroy_process_group(self.group)
        _RANKS = None

    def agree(self, value: Any, what: str) -> None:
        """Raise on every rank unless every rank holds the same ``value`` (e.g. the cache key)."""
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value, group=self.group)
        if any(v != values[0] for v in values):
            seen = ", ".join(f"rank {i}: {v}" for i, v in enumerate(values))
            raise FeatcacheError(
                f"the ranks disagree on the {what} ({seen}); "
                "give every rank the same model, data and flags (and the same --device)"
            )

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a decision all ranks must take alike)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


_RANKS: Ranks | None = None


def ranks_from_env() -> Ranks | None:
    """The process group ``torchrun`` describes (``WORLD_SIZE`` > 1), joined once; None otherwise.

    Sets this process's CUDA device to ``LOCAL_RANK`` so ``--device auto``/``cuda`` means its own GPU.

    Example:
        >>> ranks = ranks_from_env()
        >>> ranks is None or ranks.world > 1
        True
    """
    global _RANKS
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if _RANKS is not None:
        return _RANKS
    if not dist.is_available():
        raise FeatcacheError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if "MASTER_ADDR" not in os.environ:
        raise FeatcacheError(
            f"WORLD_SIZE={world} but MASTER_ADDR is not set: launch with "
            "`torchrun --standalone --nproc-per-node N -m featcache extract ...`"
        )
    if dist.is_initialized():  # the caller's own group (maybe NCCL): barriers go through a gloo one beside it
        group = dist.new_group(backend="gloo", timeout=_timeout())
    else:
        dist.init_process_group("gloo", timeout=_timeout())
        group = None
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
    _RANKS = Ranks(dist.get_rank(), dist.get_world_size(), local, group)
    return _RANKS
