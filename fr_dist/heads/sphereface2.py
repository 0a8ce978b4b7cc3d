"""SphereFace2: binary one-vs-all loss without a softmax normaliser, model-parallel over classes.

For a global batch of B embeddings with cosines c_ij = <x_i/|x_i|, w_j/|w_j|>:

    L = (lw / (r B)) sum_i [ lam softplus(-(r g_hat_iy + b)) + (1 - lam) sum_{j != y_i} softplus(r g_hat_ij + b) ]

with g_hat from :func:`fr_dist.heads.margins.sphereface2_target_value`. Every term involves one
(sample, class) pair, so a rank owning classes [start, start + n) computes its part alone: the
forward needs the gathered batch only, and no max/sum all-reduce over B-length vectors exists.

Per step, :class:`SphereFace2Head` issues one all-gather (embeddings with labels packed in),
one reduce-scatter (embedding gradients), a 1-element all-reduce of the loss value and a
1-element all-reduce of dL/db (plus the optional 3-int shape handshake, ``check_inputs``).

Weight normalisation (as OpenSphere): at the start of each forward the head re-projects its
own weight rows onto the unit sphere in place, outside autograd; the forward divides by the
(detached) row norms, so ``weight.grad`` is dL/dW_used, the gradient w.r.t. the unit-norm rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fr_dist import comm
from fr_dist.heads.base import ShardedClassifier
from fr_dist.heads.margins import (
    SPHEREFACE2_MARGINS,
    sphereface2_bias_init,
    sphereface2_target_value,
    target_mask,
)

__all__ = ["SphereFace2Head", "sphereface2_loss", "sphereface2_partial_loss", "GRAD_MODES"]

GRAD_MODES = ("detached", "exact")

# Rows of the [N, n] cosine matrix processed at once in the fused loss (bounds temporaries).
_CHUNK_ELEMS = 1 << 22


def _softplus(z: torch.Tensor) -> torch.Tensor:
    """log(1 + e^z), exact for every z (no threshold switch)."""
    return z.clamp_min(0) + torch.log1p(torch.exp(-z.abs()))


def _check_hparams(margin: str, grad: str, lam: float) -> None:
    if margin not in SPHEREFACE2_MARGINS:
        raise ValueError(f"unknown SphereFace2 margin {margin!r}; known: {SPHEREFACE2_MARGINS}")
    if grad not in GRAD_MODES:
        raise ValueError(f"unknown gradient mode {grad!r}; known: {GRAD_MODES}")
    if not 0.0 < lam < 1.0:
        raise ValueError(f"lam (lambda) must be in (0, 1), got {lam}")


class _SphereFace2Partial(torch.autograd.Function):
    """Fused local loss: cos [N, n], target column [N], bias [1] -> partial loss (scalar).

    The gradient dL/dcos is computed in the forward, chunk by chunk, and kept in cos.dtype
    (one [N, n] tensor), as insightface's DistCrossEntropy does for softmax.
    """

    @staticmethod
    def forward(ctx, cos, target_col, bias, lam, r, m, t, lw, margin, grad, batch_size):
        N, n = cos.shape
        math_dtype = torch.float64 if cos.dtype == torch.float64 else torch.float32
        b = bias.detach().to(math_dtype).reshape(())
        grad_cos = torch.empty_like(cos)
        loss = torch.zeros((), dtype=math_dtype, device=cos.device)
        grad_b = torch.zeros((), dtype=math_dtype, device=cos.device)
        scale = lw / (r * batch_size)
        step = max(1, _CHUNK_ELEMS // max(n, 1))
        for lo in range(0, N, step):
            c = cos[lo : lo + step].detach().to(math_dtype)  # [rows, n]
            is_t = target_mask(target_col[lo : lo + step], n)  # [rows, n]
            if grad == "exact":
                with torch.enable_grad():
                    cr = c.requires_grad_(True)
                    ghat = sphereface2_target_value(cr, is_t, margin, m, t)
                    (dghat,) = torch.autograd.grad(ghat.sum(), cr)
                ghat = ghat.detach()
            else:
                ghat = sphereface2_target_value(c, is_t, margin, m, t)
                dghat = None
            z = r * ghat + b
            w_pos = torch.tensor(lam * scale, dtype=math_dtype, device=cos.device)
            w_neg = torch.tensor((1.0 - lam) * scale, dtype=math_dtype, device=cos.device)
            w = torch.where(is_t, w_pos, w_neg)  # [rows, n] per-entry weight
            isf = is_t.to(math_dtype)
            loss += (w * (_softplus(z) - isf * z)).sum()
            dz = w * (torch.sigmoid(z) - isf)  # dL/dz
            grad_b += dz.sum()
            gc = dz * r if dghat is None else dz * (r * dghat)
            grad_cos[lo : lo + step] = gc.to(cos.dtype)
        ctx.save_for_backward(grad_cos, grad_b)
        ctx.bias_dtype = bias.dtype
        return loss.to(cos.dtype if cos.dtype.is_floating_point else math_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_cos, grad_b = ctx.saved_tensors
        g_cos = grad_cos * grad_out.to(grad_cos.dtype)
        g_b = (grad_b * grad_out.to(grad_b.dtype)).reshape(1).to(ctx.bias_dtype)
        return g_cos, None, g_b, None, None, None, None, None, None, None, None


def sphereface2_partial_loss(
    cos: torch.Tensor,
    target_col: torch.Tensor,
    bias: torch.Tensor,
    *,
    lam: float,
    r: float,
    m: float,
    t: float,
    lw: float,
    margin: str,
    grad: str,
    batch_size: int,
) -> torch.Tensor:
    """This shard's share of the SphereFace2 loss (fused forward/backward, no collectives).

    cos [N, n] for the shard's n classes; target_col [N] in [-1, n); bias [1];
    batch_size is the GLOBAL batch size B that normalises the loss.
    """
    _check_hparams(margin, grad, lam)
    return _SphereFace2Partial.apply(
        cos,
        target_col,
        bias,
        float(lam),
        float(r),
        float(m),
        float(t),
        float(lw),
        margin,
        grad,
        int(batch_size),
    )


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
    """Dense single-process reference, written with plain autograd ops (independent of the fused path).

    embeddings [B, D] (raw), weight [K, D], labels [B] in [0, K), bias [1] or scalar.
    The weight rows are divided by their detached norms, so for unit-norm rows (what the head
    keeps) ``weight.grad`` is OpenSphere's dL/dW_used; nothing is modified in place.
    """
    _check_hparams(margin, grad, lam)
    B, K = embeddings.shape[0], weight.shape[0]
    x_hat = F.normalize(embeddings, dim=1)  # [B, D]
    w_hat = weight / weight.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)  # [K, D]
    cos = x_hat @ w_hat.t()  # [B, K]
    is_t = F.one_hot(labels.long(), K).bool()  # [B, K]
    if grad == "exact":
        ghat = sphereface2_target_value(cos, is_t, margin, m, t)
    else:
        ghat = cos + (sphereface2_target_value(cos.detach(), is_t, margin, m, t) - cos.detach())
    z = r * ghat + bias.reshape(())
    pos = lam * F.softplus(-z, beta=1.0, threshold=1e9)
    neg = (1.0 - lam) * F.softplus(z, beta=1.0, threshold=1e9)
    per = torch.where(is_t, pos, neg)
    return lw / (r * B) * per.sum()


class SphereFace2Head(ShardedClassifier):
    """Model-parallel SphereFace2 classifier (the fr_dist product).

    ``loss = head(local_embeddings [B, D], local_labels [B])`` returns the loss of the GLOBAL
    batch (identical on every rank). ``head.weight`` is this rank's [num_local, D] shard and
    ``head.bias`` the shared learnable bias b, initialised from the GLOBAL K (OpenSphere's
    closed form) and kept identical on all ranks (its gradient is all-reduced).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        lam: float = 0.7,
        r: float = 40.0,
        m: float = 0.4,
        t: float = 3.0,
        lw: float = 50.0,
        margin: str = "C",
        grad: str = "detached",
        process_group=None,
        seed: int = 0,
        embedding_grad_scale: float = 1.0,
        check_inputs: bool = True,
        check_finite: bool = True,
    ):
        _check_hparams(margin, grad, lam)
        super().__init__(
            embedding_size,
            num_classes,
            process_group=process_group,
            seed=seed,
            embedding_grad_scale=embedding_grad_scale,
            check_inputs=check_inputs,
            check_finite=check_finite,
        )
        self.lam, self.r, self.m, self.t, self.lw = (
            float(lam),
            float(r),
            float(m),
            float(t),
            float(lw),
        )
        self.margin, self.grad = margin, grad
        b0 = sphereface2_bias_init(num_classes, lam, r, m, t, margin)
        self.bias = torch.nn.Parameter(torch.tensor([b0], dtype=torch.float32))  # [1], replicated

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", lam={self.lam}, r={self.r}, m={self.m}, t={self.t}, lw={self.lw}, "
            f"margin={self.margin}, grad={self.grad}"
        )

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Project the weight rows back onto the unit sphere (OpenSphere does this every forward)."""
        if self.num_local:
            self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.renormalize_()
        x_all, labels_all = self.gather(embeddings, labels)  # [W*B, D], [W*B]
        target_col = self.local_targets(labels_all)  # [W*B] in [-1, n_r)
        x_hat = F.normalize(x_all, dim=1)  # [W*B, D]
        w = self.weight
        w_hat = w / w.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)  # [n_r, D]
        cos = F.linear(x_hat, w_hat)  # [W*B, n_r] (bf16 under autocast)
        cos = cos.float() if cos.dtype in (torch.bfloat16, torch.float16) else cos
        bias = comm.copy_to_shards(self.bias, self.process_group, name="bias")  # bwd: 1-elem all-reduce
        partial = sphereface2_partial_loss(
            cos,
            target_col,
            bias,
            lam=self.lam,
            r=self.r,
            m=self.m,
            t=self.t,
            lw=self.lw,
            margin=self.margin,
            grad=self.grad,
            batch_size=x_all.shape[0],
        )
        return comm.reduce_from_shards(partial, self.process_group, name="loss")  # 1-elem all-reduce
