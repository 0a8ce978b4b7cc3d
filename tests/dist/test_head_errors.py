"""Errors that involve several ranks are raised on every rank with a clear message, never a hang."""

from __future__ import annotations

import pytest
import torch

from fr_dist.heads import PartialFCHead, SphereFace2Head
from fr_dist.testing import spawn_gloo

pytestmark = pytest.mark.dist


def _rank_fn(rank, world):
    out = {}
    for name, cls in (("sf2", SphereFace2Head), ("pfc", PartialFCHead)):
        head = cls(embedding_size=8, num_classes=11)
        # batch size differs between ranks
        try:
            head(torch.randn(4 + rank, 8), torch.zeros(4 + rank, dtype=torch.long))
            out[f"{name}_batch"] = "no error"
        except ValueError as e:
            out[f"{name}_batch"] = str(e)
        # a label out of range on rank 1 only: every rank sees it after the gather
        y = torch.tensor([0, 1, 2]) if rank == 0 else torch.tensor([0, 11, 2])
        try:
            head(torch.randn(3, 8), y)
            out[f"{name}_label"] = "no error"
        except ValueError as e:
            out[f"{name}_label"] = str(e)
        # and the head still works afterwards (no collective left half-done)
        out[f"{name}_ok"] = float(head(torch.randn(3, 8), torch.tensor([0, 5, 10])))
    return out


def test_mismatched_batches_and_labels_raise_on_every_rank():
    res = spawn_gloo(_rank_fn, 2, timeout_s=60)
    for r in res:
        for name in ("sf2", "pfc"):
            assert "batches differ between ranks" in r[f"{name}_batch"]
            assert (
                "rank 0: batch 4" in r[f"{name}_batch"] and "rank 1: batch 5" in r[f"{name}_batch"]
            )
            assert (
                "label 11 outside [0, 11)" in r[f"{name}_label"]
                and "(rank 1)" in r[f"{name}_label"]
            )
    assert res[0]["sf2_ok"] == res[1]["sf2_ok"]
