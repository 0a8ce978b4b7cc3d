"""The plain class-sharded softmax cross-entropy on materialised logits (insightface's ``DistCrossEntropy``):
three all-reduces of [N] vectors (max, sum of exponentials, target probability). The fused heads use
heads/softmax.py's pass; this is the public building block for logits computed elsewhere."""

from __future__ import annotations

import torch

from fr_dist import comm

__all__ = ["distributed_cross_entropy"]


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
