"""Collectives for state that data-parallel training must keep identical on every rank.

Under ``torchrun`` each rank sees its own shard of a global batch. DistributedDataParallel averages
the gradients; what it does not see is the state that moves outside gradient descent: EMA codebook
statistics, usage counts, data-based initialisation and dead-code restarts. Those are made global
here, so that after every step each rank holds the codebook a single process would hold on the
whole batch:

* statistics that are sums over examples (assignment counts, feature sums) are all-reduced;
* decisions that draw random numbers (k-means++ seeding, which codes restart where) are taken on
  rank 0 from the rows of all ranks (gathered in rank order, so the gathered batch is the global one)
  and broadcast.

Every function is the identity when no process group is initialised, so single-process code pays
nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def active() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files."""
    return rank() == 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """``tensor`` summed over ranks, in place (returned for convenience)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_rows(tensor: Tensor) -> Tensor:
    """The rows ``(n, ...)`` of every rank concatenated in rank order (rows may differ in number)."""
    if not active():
        return tensor
    counts = [torch.zeros((), dtype=torch.long, device=tensor.device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor(tensor.shape[0], device=tensor.device))
    most = int(max(counts))
    padded = torch.zeros((most, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(n)] for part, n in zip(parts, counts, strict=True)])


def broadcast_(*tensors: Tensor) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values."""
    if active():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def barrier() -> None:
    if active():
        dist.barrier()
