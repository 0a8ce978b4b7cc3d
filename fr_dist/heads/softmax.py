"""Partial-FC margin-softmax baseline (insightface arcface_torch PartialFC_V2 + DistCrossEntropy).

The softmax normaliser couples every class of a sample, so the class-sharded cross-entropy
needs, per step, three all-reduces of B-length vectors on the critical path (max, sum of
exponentials, target probability), as insightface's ``DistCrossEntropy`` and Megatron's
vocab-parallel cross-entropy do. This module exists to compare honestly with SphereFace2.

Conventions (insightface): weights are normalised differentiably in the forward; cosines are
clipped to [-1, 1]; ArcFace's margin is straight-through by default (d logit / d cos = s on
every entry), ``grad="exact"`` differentiates cos(m1 theta + m2) - m3 instead. CosFace is exact
either way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fr_dist import comm
from fr_dist.heads.base import ShardedClassifier
from fr_dist.heads.margins import SOFTMAX_MARGINS, softmax_margin_cos, straight_through, target_mask
from fr_dist.heads.sampling import sample_classes

__all__ = [
    "PartialFCHead",
    "distributed_cross_entropy",
    "margin_softmax_loss",
    "SOFTMAX_GRAD_MODES",
]

SOFTMAX_GRAD_MODES = ("straight_through", "exact")


def _check(margin: str, grad: str, s: float, sample_rate: float) -> None:
    if margin not in SOFTMAX_MARGINS:
        raise ValueError(f"unknown margin {margin!r}; known: {SOFTMAX_MARGINS}")
    if grad not in SOFTMAX_GRAD_MODES:
        raise ValueError(f"unknown gradient mode {grad!r}; known: {SOFTMAX_GRAD_MODES}")
    if s <= 0:
        raise ValueError(f"scale s must be > 0, got {s}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")


def _margin_logits(cos, is_t, margin, s, m1, m2, m3, grad):
    value = softmax_margin_cos(cos, is_t, margin, m1, m2, m3, exact=(grad == "exact"))
    if grad == "straight_through" and margin != "cosface":
        value = straight_through(value.detach(), cos)
    return s * value


class _DistCrossEntropy(torch.autograd.Function):
    """logits [N, n] of this shard, target column [N] (-1 = elsewhere) -> mean CE over N (scalar)."""

    @staticmethod
    def forward(ctx, logits, target_col, group):
        N, n = logits.shape
        with torch.no_grad():
            if n:
                local_max = logits.max(dim=1).values  # [N]
            else:
                local_max = torch.full((N,), float("-inf"), dtype=logits.dtype, device=logits.device)
            gmax = comm.all_reduce(local_max, "max", group, name="softmax_max")  # [N]
            e = torch.exp(logits - gmax.unsqueeze(1))  # [N, n]
            gsum = comm.all_reduce(e.sum(dim=1), "sum", group, name="softmax_sum")  # [N]
            p = e.div_(gsum.unsqueeze(1))  # [N, n], softmax over all K
            here = target_col >= 0
            rows = here.nonzero().squeeze(1)
            p_target = torch.zeros(N, dtype=logits.dtype, device=logits.device)
            p_target[rows] = p[rows, target_col[rows]]
            p_target = comm.all_reduce(p_target, "sum", group, name="softmax_target")  # [N]
            loss = -p_target.clamp_min(1e-30).log().mean()
            p[rows, target_col[rows]] -= 1.0
            p.div_(N)  # dL/dlogits
        ctx.save_for_backward(p)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return g * grad_out, None, None


def distributed_cross_entropy(logits: torch.Tensor, target_col: torch.Tensor, group=None) -> torch.Tensor:
    """Class-sharded softmax cross-entropy: all-reduce MAX, SUM and the target probability ([N] each)."""
    return _DistCrossEntropy.apply(logits, target_col, comm.resolve_group(group))


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
    """Dense single-process reference with plain autograd ops (no sampling).

    Like insightface the target probability is floored at 1e-30 in the loss value (a wrapped
    ArcFace target can be far below it) while the gradient stays softmax - onehot.
    """
    _check(margin, grad, s, 1.0)
    x_hat = F.normalize(embeddings, dim=1)  # [B, D]
    w_hat = F.normalize(weight, dim=1)  # [K, D]
    cos = (x_hat @ w_hat.t()).clamp(-1, 1)  # [B, K]
    is_t = F.one_hot(labels.long(), weight.shape[0]).bool()
    logits = _margin_logits(cos, is_t, margin, s, m1, m2, m3, grad)
    nll = F.cross_entropy(logits, labels.long(), reduction="none")  # [B]
    # insightface floors p_target at 1e-30 in the value only; its gradient stays softmax - onehot
    floored = nll.clamp_max(-math.log(1e-30))
    return (nll + (floored - nll).detach()).mean()


class PartialFCHead(ShardedClassifier):
    """Model-parallel margin-softmax classifier with Partial-FC negative sampling.

    ``loss = head(local_embeddings [B, D], local_labels [B])`` is the global-batch loss on every
    rank. With ``sample_rate < 1`` each rank keeps every positive class of the global batch and
    ``int(sample_rate * num_local)`` classes in total, drawn uniformly per step from the
    head's generator (seeded by ``seed`` and the rank); unsampled rows get exactly zero gradient.
    The columns used in the last step are in ``head.weight_index`` (None when not sampling).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: str = "arcface",
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        sample_rate: float = 1.0,
        process_group=None,
        grad: str = "straight_through",
        seed: int = 0,
        embedding_grad_scale: float = 1.0,
        check_inputs: bool = True,
        check_finite: bool = True,
    ):
        _check(margin, grad, s, sample_rate)
        super().__init__(
            embedding_size,
            num_classes,
            process_group=process_group,
            seed=seed,
            embedding_grad_scale=embedding_grad_scale,
            check_inputs=check_inputs,
            check_finite=check_finite,
        )
        self.margin, self.grad = margin, grad
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.sample_rate = float(sample_rate)
        self.generator = torch.Generator().manual_seed(int(seed) * 7919 + self.rank + 1)
        self.weight_index = None

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", margin={self.margin}, s={self.s}, m=({self.m1}, {self.m2}, {self.m3}), "
            f"sample_rate={self.sample_rate}, grad={self.grad}"
        )

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x_all, labels_all = self.gather(embeddings, labels)  # [W*B, D], [W*B]
        target_col = self.local_targets(labels_all)  # [W*B] in [-1, n_r)
        weight = self.weight  # [n_r, D]
        if self.sample_rate < 1.0:
            index, target_col = sample_classes(target_col, self.num_local, self.sample_rate, self.generator)
            self.weight_index = index
            weight = weight[index]  # [S, D]; unsampled rows get zero gradient
        x_hat = F.normalize(x_all, dim=1)  # [W*B, D]
        w_hat = F.normalize(weight, dim=1)  # [S, D]
        cos = F.linear(x_hat, w_hat)  # [W*B, S]
        cos = (cos.float() if cos.dtype in (torch.bfloat16, torch.float16) else cos).clamp(-1, 1)
        is_t = target_mask(target_col, cos.shape[1])  # [W*B, S]
        logits = _margin_logits(cos, is_t, self.margin, self.s, self.m1, self.m2, self.m3, self.grad)
        return distributed_cross_entropy(logits, target_col, self.process_group)
