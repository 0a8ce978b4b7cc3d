"""Class-sharded classifier heads: SphereFace2 (the product) and Partial-FC softmax (the baseline).

from fr_dist.heads import create_head, list_heads
head = create_head("sphereface2", embedding_size=512, num_classes=93431, process_group=pg)
"""

from __future__ import annotations

import difflib

from fr_dist.heads.base import ShardedClassifier, init_weight_rows
from fr_dist.heads.margins import sphereface2_bias_init
from fr_dist.heads.softmax import PartialFCHead, distributed_cross_entropy, margin_softmax_loss
from fr_dist.heads.sphereface2 import SphereFace2Head, sphereface2_loss, sphereface2_partial_loss

__all__ = [
    "SphereFace2Head",
    "PartialFCHead",
    "ShardedClassifier",
    "sphereface2_loss",
    "sphereface2_partial_loss",
    "sphereface2_bias_init",
    "margin_softmax_loss",
    "distributed_cross_entropy",
    "init_weight_rows",
    "create_head",
    "list_heads",
]

_HEADS = {"sphereface2": SphereFace2Head, "partial_fc": PartialFCHead}


def list_heads() -> list[str]:
    return sorted(_HEADS)


def create_head(name: str, **kwargs) -> ShardedClassifier:
    """Build a head by registry name; unknown names list the known ones."""
    if name not in _HEADS:
        near = difflib.get_close_matches(name, _HEADS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown head {name!r}{hint}; known heads: {list_heads()}")
    return _HEADS[name](**kwargs)
