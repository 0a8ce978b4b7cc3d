"""Single-process reference implementations the head tests compare against (not part of the package).

Dense, plain-autograd forms of the losses, written on the losses' own margins and stages (the margin
value, the binary family's softplus), so each formula has one home; the golden vectors
(tests/golden, OpenSphere / insightface) pin these references independently of the package's passes.
Plus thin adapters for tests written against the former function API of the heads.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from fr_dist.heads.binary import BinaryPlan, BinaryStages, binary_partial_loss
from fr_dist.heads.binary_head import binary_block_loss
from fr_dist.heads.losses.partial_fc import MarginSoftmax
from fr_dist.heads.losses.sphereface2 import SphereFace2
from fr_dist.heads.registry import margin_class

__all__ = [
    "FusedPlan",
    "margin_softmax_loss",
    "sphereface2_fused_partial_loss",
    "sphereface2_loss",
    "sphereface2_partial_loss",
    "sphereface2_target_slope",
    "sphereface2_target_value",
    "straight_through",
]


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Forward ``value``, gradient of ``surrogate`` (d value / d surrogate treated as 1)."""
    return surrogate + (value - surrogate).detach()


def sphereface2_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor,
    lam: float = 0.7,
    r: float = 40.0,
    m: float = 0.4,
    t: float = 3.0,
    lw: float = 50.0,
    margin: str = "C",
    grad: str = "detached",
) -> torch.Tensor:
    """Dense SphereFace2 with plain autograd ops (independent of the fused pass and its closed form).

    embeddings [B, D] (raw), weight [K, D], labels [B] in [0, K), bias [1] or scalar.
    The weight rows are divided by their detached norms, so for unit-norm rows (what the head
    keeps) ``weight.grad`` is OpenSphere's dL/dW_used; nothing is modified in place.
    """
    loss = SphereFace2(lam, r, m, t, lw, margin, grad)
    B, K = embeddings.shape[0], weight.shape[0]
    x_hat = F.normalize(embeddings, dim=1)  # [B, D]
    w_hat = weight / weight.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)  # [K, D]
    cos = x_hat @ w_hat.t()  # [B, K]
    is_t = F.one_hot(labels.long(), K).bool()  # [B, K]
    if loss.exact:
        ghat = loss.margin.value(cos, is_t)
    else:
        ghat = cos + (loss.margin.value(cos.detach(), is_t) - cos.detach())
    z = r * ghat + bias.reshape(())
    pos = lam * BinaryStages.softplus(-z)
    neg = (1.0 - lam) * BinaryStages.softplus(z)
    per = torch.where(is_t, pos, neg)
    return lw / (r * B) * per.sum()


def margin_softmax_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: str = "arcface",
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    grad: str = "straight_through",
) -> torch.Tensor:
    """Dense margin softmax with plain autograd ops (no sampling).

    Like insightface the target probability is floored at 1e-30 in the loss value (a wrapped
    ArcFace target can be far below it) while the gradient stays softmax - onehot.
    """
    loss = MarginSoftmax(margin, s, m1, m2, m3, grad)
    x_hat = F.normalize(embeddings, dim=1)  # [B, D]
    w_hat = F.normalize(weight, dim=1)  # [K, D]
    cos = (x_hat @ w_hat.t()).clamp(-1, 1)  # [B, K]
    is_t = F.one_hot(labels.long(), weight.shape[0]).bool()
    value = loss.margin.value(cos, is_t, exact=loss.exact)
    if not loss.exact and loss.margin.nonlinear:
        value = straight_through(value.detach(), cos)
    logits = loss.s * value
    nll = F.cross_entropy(logits, labels.long(), reduction="none")  # [B]
    # insightface floors p_target at 1e-30 in the value only; its gradient stays softmax - onehot
    floored = nll.clamp_max(-math.log(1e-30))
    return (nll + (floored - nll).detach()).mean()


def sphereface2_partial_loss(cos, target_col, bias, *, lam, r, m, t, lw, margin, grad, batch_size):
    """This shard's SphereFace2 loss from a materialised cosine block: the head's ``fused=False`` path."""
    return binary_block_loss(cos, target_col, bias, SphereFace2(lam, r, m, t, lw, margin, grad), batch_size)


def sphereface2_target_value(cos, is_target, margin: str, m: float, t: float) -> torch.Tensor:
    """g_hat of SphereFace2 margin ``margin`` (C / A / M) on ``cos`` [N, n]."""
    return margin_class("sphereface2", margin)(m, t).value(cos, is_target)


def sphereface2_target_slope(cos, margin: str, m: float, t: float) -> torch.Tensor:
    """d g_hat / d cos on target entries, the margin's analytic derivative."""
    return margin_class("sphereface2", margin)(m, t).slope(cos)


def FusedPlan(lam, r, m, t, lw, margin, grad, batch_size, **options) -> BinaryPlan:  # noqa: N802
    """The former SphereFace2 plan of the fused pass: a BinaryPlan with the SphereFace2 loss."""
    return BinaryPlan(SphereFace2(lam, r, m, t, lw, margin, grad), batch_size, **options)


sphereface2_fused_partial_loss = binary_partial_loss


def assemble(shards: Sequence[torch.Tensor], starts: Sequence[int], num_classes: int) -> torch.Tensor:
    """Concatenate row shards saved with their class starts into the full [K, ...] tensor (the re-sharding
    tests' reference; the package re-shards through :func:`fr_dist.sharding.copy_rows`)."""
    order = sorted(range(len(shards)), key=lambda i: starts[i])
    full = torch.cat([shards[i] for i in order], dim=0)
    if full.shape[0] != num_classes:
        raise ValueError(f"shards cover {full.shape[0]} rows, expected {num_classes}")
    return full
