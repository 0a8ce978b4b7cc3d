"""Class-sharded classifier heads: a sharded classifier (heads/sharded.py) + a loss (heads/losses/) of the
binary family (SphereFace2, the product: heads/binary.py) or the softmax family (Partial-FC ArcFace /
CosFace, the baseline: heads/softmax.py). heads/registry.py turns config names into those objects.

from fr_dist.heads import create_head, list_heads
head = create_head("sphereface2", embedding_size=512, num_classes=93431, process_group=pg)
"""

from __future__ import annotations

from fr_dist.heads import losses  # noqa: F401  (registers every loss)
from fr_dist.heads.binary_head import BinaryHead
from fr_dist.heads.losses.partial_fc import MarginSoftmax, PartialFCHead
from fr_dist.heads.losses.sphereface2 import SphereFace2, SphereFace2Head, sphereface2_bias_init
from fr_dist.heads.registry import head_class, list_losses
from fr_dist.heads.sharded import OptimizerContract, ShardedClassifier, init_weight_rows
from fr_dist.heads.softmax import SoftmaxHead
from fr_dist.heads.softmax_ce import distributed_cross_entropy

__all__ = [
    "SphereFace2Head",
    "PartialFCHead",
    "BinaryHead",
    "SoftmaxHead",
    "SphereFace2",
    "MarginSoftmax",
    "ShardedClassifier",
    "OptimizerContract",
    "sphereface2_bias_init",
    "distributed_cross_entropy",
    "init_weight_rows",
    "create_head",
    "list_heads",
]


def list_heads() -> list[str]:
    return list_losses()


def create_head(name: str, **kwargs) -> ShardedClassifier:
    """Build a head by registry name (``head.name``); unknown names list the known ones."""
    return head_class(name)(**kwargs)
