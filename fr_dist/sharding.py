"""Contiguous, uneven class sharding (insightface arithmetic): the home of row arithmetic.

Rank ``r`` of ``W`` owns classes ``[start_r, start_r + n_r)`` with
``n_r = K // W + (r < K % W)`` and ``start_r = (K // W) * r + min(r, K % W)``.
K < W is allowed: the last ``W - K`` ranks own zero classes.

Re-sharding (checkpoints saved on W ranks loaded on W', a full [K, D] matrix loaded into a
shard) is :func:`copy_rows`: rows of one range copied into the overlapping rows of another.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["class_range", "overlap", "copy_rows"]


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(class_start, num_local) of ``rank``."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (1 if rank < extra else 0)


def overlap(a_start: int, a_count: int, b_start: int, b_count: int) -> Optional[tuple[int, int]]:
    """[lo, hi) of the classes that rows ``[a_start, +a_count)`` and ``[b_start, +b_count)`` share."""
    lo, hi = max(a_start, b_start), min(a_start + a_count, b_start + b_count)
    return (lo, hi) if hi > lo else None


@torch.no_grad()
def copy_rows(dst: torch.Tensor, dst_start: int, src: torch.Tensor, src_start: int) -> int:
    """Copy the rows of ``src`` (classes ``[src_start, +len(src))``) that ``dst`` (classes
    ``[dst_start, +len(dst))``) also holds into ``dst`` (cast to its dtype); returns the row count.

    Works for any per-row tensor [n, ...]: weights, momentum, Adam moments, master rows.
    """
    ov = overlap(dst_start, dst.shape[0], src_start, src.shape[0])
    if ov is None:
        return 0
    lo, hi = ov
    dst[lo - dst_start : hi - dst_start] = src[lo - src_start : hi - src_start].to(dst.dtype)  # [hi-lo, ...]
    return hi - lo
