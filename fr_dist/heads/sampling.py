"""Partial-FC negative-class sampling (insightface PartialFC_V2.sample), pure tensor math."""

from __future__ import annotations

import torch

__all__ = ["num_sampled", "sample_classes", "sample_negatives"]


def num_sampled(num_local: int, sample_rate: float) -> int:
    """Classes kept per rank per step before positives are forced in: int(sample_rate * n)."""
    return int(sample_rate * num_local)


def sample_classes(
    target_col: torch.Tensor,
    num_local: int,
    sample_rate: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the shard columns used this step and remap the targets.

    target_col [N] in [-1, n). Every positive column present is kept; the rest of the
    ``int(sample_rate * n)`` slots are filled by negatives drawn uniformly without
    replacement. If there are more positives than slots, exactly the positives are kept.
    Returns (index [S] sorted shard columns, remapped target_col [N] in [-1, S)).
    """
    here = target_col >= 0
    positive = torch.unique(target_col[here], sorted=True)  # [P]
    k = num_sampled(num_local, sample_rate)
    if k >= positive.numel():
        # uniform random keys (on CPU so the stream does not depend on the device), positives forced to the top
        perm = torch.rand(num_local, generator=generator).to(target_col.device)  # [n]
        perm[positive] = 2.0
        index = torch.topk(perm, k=k)[1].sort()[0]  # [k]
    else:
        index = positive
    remapped = torch.full_like(target_col, -1)
    remapped[here] = torch.searchsorted(index, target_col[here])
    return index, remapped


def sample_negatives(
    target_col: torch.Tensor,
    num_local: int,
    num_negatives: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SphereFace2 negative sampling with importance weights (unbiased loss and gradient).

    target_col [N] in [-1, n). Every positive class of the shard is kept (weight 1); ``k =
    min(num_negatives, M)`` of the other M = n - P classes are drawn uniformly without
    replacement, so each is included with probability k / M and gets weight M / k.
    Returns (index [S] sorted shard rows, remapped target_col [N] in [-1, S), col_weight [S] float64).
    """
    here = target_col >= 0
    positive = torch.unique(target_col[here], sorted=True)  # [P]
    others = num_local - positive.numel()
    k = max(0, min(int(num_negatives), others))
    # uniform random keys on CPU (the stream does not depend on the device), positives excluded
    keys = torch.rand(num_local, generator=generator).to(target_col.device)  # [n]
    keys[positive] = -1.0
    negative = torch.topk(keys, k=k)[1]  # [k]
    index = torch.cat([positive, negative]).sort()[0]  # [S = P + k]
    col_weight = torch.full(index.shape, others / k if k else 1.0, dtype=torch.float64, device=index.device)
    col_weight[torch.isin(index, positive)] = 1.0
    remapped = torch.full_like(target_col, -1)
    remapped[here] = torch.searchsorted(index, target_col[here])
    return index, remapped, col_weight
