"""Contiguous, uneven class sharding (insightface arithmetic) and re-sharding helpers.

Rank ``r`` of ``W`` owns classes ``[start_r, start_r + n_r)`` with
``n_r = K // W + (r < K % W)`` and ``start_r = (K // W) * r + min(r, K % W)``.
K < W is allowed: the last ``W - K`` ranks own zero classes.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["class_range", "shard_ranges", "shard_of_class", "reshard", "assemble"]


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(class_start, num_local) of ``rank``."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (1 if rank < extra else 0)


def shard_ranges(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    """[(class_start, num_local)] for every rank."""
    return [class_range(num_classes, r, world_size) for r in range(world_size)]


def shard_of_class(labels: torch.Tensor, num_classes: int, world_size: int) -> torch.Tensor:
    """Owning rank of each class id."""
    base, extra = divmod(num_classes, world_size)
    big = (base + 1) * extra  # classes held by the first ``extra`` ranks
    if base == 0:
        return labels.clone()
    return torch.where(labels < big, labels // (base + 1), extra + (labels - big) // base)


def assemble(shards: Sequence[torch.Tensor], starts: Sequence[int], num_classes: int) -> torch.Tensor:
    """Concatenate row shards saved with their class starts into the full [K, ...] tensor."""
    order = sorted(range(len(shards)), key=lambda i: starts[i])
    full = torch.cat([shards[i] for i in order], dim=0)
    if full.shape[0] != num_classes:
        raise ValueError(f"shards cover {full.shape[0]} rows, expected {num_classes}")
    return full


def reshard(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of a full [K, ...] tensor (a copy)."""
    start, n = class_range(full.shape[0], rank, world_size)
    return full[start : start + n].clone()
