"""The softmax family: a margin on the target logit + the class-sharded cross-entropy, on the Partial-FC
path (insightface arcface_torch PartialFC_V2 + DistCrossEntropy). Its losses (:class:`SoftmaxLoss`; ArcFace /
CosFace / combined in heads/losses/partial_fc.py) run on :class:`SoftmaxHead`.

The softmax normaliser couples every class of a sample, so the class-sharded cross-entropy
needs, per step, three all-reduces of B-length vectors on the critical path (max, sum of
exponentials, target probability), as insightface's ``DistCrossEntropy`` and Megatron's
vocab-parallel cross-entropy do. This family exists to compare honestly with SphereFace2.

Conventions (insightface): weights are normalised differentiably in the forward; cosines are
clipped to [-1, 1]; the margin touches the target logit only; its derivative is the loss's (1 when
straight-through, the margin's own with ``grad="exact"``).

:class:`SoftmaxHead` computes exactly that, fused (:class:`_FusedMarginSoftmax`):

* the row norms of the weight are folded into the cosine columns: cos = (x_hat W^T) * inv_norm
  with ``inv_norm`` [n]; the normalisation's backward is the analytic radial correction
  dL/dW_j = A_j - inv_j u_j W_j (A = dL/dG^T x_hat, u_j = sum_i dL/dG_ij cos_ij), one pass;
* the margin touches the target entries only ([N] gathered cosines, not [N, n]);
* the forward computes dL/dlogits in place (softmax - onehot) / N and returns only the loss;
* ``chunk_size``: None (default) materialises the [N, n] block once (fastest here: three GEMMs);
  an int processes the shard's classes in chunks of that many columns: an online max / sum-exp
  in the forward, a recompute of each chunk's cosines in the backward (four GEMMs), never more
  than [N, chunk] alive. Both send the same 3 all-reduces of [N].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fr_dist import comm
from fr_dist.heads.sampling import sample_classes
from fr_dist.heads.sharded import ShardedClassifier, autocast_gemm_dtype, resolve_loss

__all__ = [
    "SoftmaxHead",
    "SoftmaxLoss",
    "distributed_cross_entropy",
    "SOFTMAX_GRAD_MODES",
]

SOFTMAX_GRAD_MODES = ("straight_through", "exact")  # d margin value / d cos: 1 | the margin's own

# F.normalize's floor on the row norm.
_NORM_EPS = 1e-12


class SoftmaxLoss:
    """What a softmax loss gives the Partial-FC path (heads/losses/*.py subclass it; no state today).

    ``s``: the logit scale. :meth:`target`: the margin on the [T] target cosines, value and derivative
    together; ``target_has_slope`` says whether it returns a derivative (else d value / d cos = 1).
    """

    family = "softmax"
    s: float = 1.0
    target_has_slope: bool = False
    cos_clip: float = 0.0
    """Every cosine is clipped to [-1 + cos_clip, 1 - cos_clip] (insightface: 0, AdaFace: 1e-3, OpenSphere's
    SphereFace: 1e-5) before the margin; the gradient is zero strictly outside unless ``clip_detached``."""
    clip_detached: bool = False
    """The clip changes the value only (OpenSphere's SphereFace computes its margin under no_grad)."""
    project_rows: bool = False
    """OpenSphere's convention: the rows are re-projected onto the sphere in place before every forward and
    ``weight.grad`` is dL/dW_used (no radial term); False: insightface's differentiable normalisation."""

    def for_batch(self, x_all: torch.Tensor, state: dict, training: bool) -> SoftmaxLoss:
        """The loss for this step: x_all [N, D] the gathered raw embeddings (a per-sample margin reads their
        norms here), ``state`` the head's state buffers (updated in place while ``training``). Default: itself."""
        return self

    def target(self, cos_t: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clipped target cosines [T] of global-batch rows ``rows`` [T] -> (margin value [T], d value / d cos
        [T] or None when it is 1)."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """Replicated state buffers (name -> initial tensor) the head registers; none today."""
        return {}


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


# ----------------------------------------------------------------------------- fused head math


def _check_chunk(chunk_size) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be None (materialise the block) or an int >= 1, got {chunk_size!r}"
        )


def _inv_row_norms(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, D] -> (1 / max(|w_j|, eps) [n], |w_j| >= eps [n]): F.normalize's denominator, folded."""
    norm = torch.linalg.vector_norm(weight, dim=1)  # [n]
    return norm.clamp_min(_NORM_EPS).reciprocal(), norm >= _NORM_EPS


def _cos_block(x_mm: torch.Tensor, w_mm: torch.Tensor, inv: torch.Tensor, math_dtype, loss: SoftmaxLoss):
    """Clipped cosines [N, c] = (x_hat W_c^T) * inv_c, and where the clip changed something.

    The clip (insightface's ``clamp(-1, 1)``; ``loss.cos_clip`` moves the bound in; zero gradient strictly
    outside unless ``loss.clip_detached``) is only needed in the rare rows whose extreme exceeds the bound:
    ``over`` = (rows [r], mask [r, c]) or None (also None when the clip is detached).
    """
    cos = torch.mm(x_mm, w_mm.t())  # [N, D] @ [D, c] -> [N, c]
    if cos.dtype != math_dtype:
        cos = cos.to(math_dtype)
    cos.mul_(inv)  # fold the row norms: [N, c] * [c]
    over = None
    bound = 1.0 - loss.cos_clip
    if cos.numel():
        bad = ((cos.amax(dim=1) > bound) | (cos.amin(dim=1) < -bound)).nonzero().squeeze(1)  # [r]
        if bad.numel():
            sub = cos[bad]  # [r, c]
            if not loss.clip_detached:
                over = (bad, sub.abs() > bound)
            cos[bad] = sub.clamp_(-bound, bound)
    return cos, over


def _logit_grad_(e, row_scale, r, c, target_sub, dvt, col_scale, over):
    """In place on e = exp(logits - max) [N, c]: -> dL/dG = ((e * row_scale) - onehot/N) * dlogit/dcos * col_scale."""
    g = e.mul_(row_scale.unsqueeze(1))  # [N, c] * [N, 1]: softmax / N (times the incoming gradient)
    if r.numel():
        g[r, c] -= target_sub  # - onehot / N on the target entries
        if dvt is not None:
            g[r, c] *= dvt  # exact margin derivative on the targets only
    g.mul_(col_scale)  # [N, c] * [c]: s * inv_norm (d logit / d cos and the folded normalisation)
    if over is not None:
        g[over[0]] = g[over[0]].masked_fill_(over[1], 0.0)  # [r, c]: rows the clip touched
    return g


class _FusedMarginSoftmax(torch.autograd.Function):
    """x_hat [N, D] (unit rows), raw weight [n, D], target column [N] (-1 = elsewhere) -> mean CE.

    ``loss`` a :class:`SoftmaxLoss` (scale, target margin). ``chunk`` None: the block is materialised once and
    dL/dG is computed in place in the forward; an int: online max / sum-exp over column chunks
    and the chunk's cosines recomputed in the backward. ``mm_dtype`` (e.g. bf16 under autocast)
    is the GEMM operand dtype; the softmax math runs in fp32 (fp64 for fp64 weights).
    """

    @staticmethod
    def forward(ctx, x_hat, weight, target_col, group, loss, chunk, mm_dtype):
        with torch.autocast(x_hat.device.type, enabled=False):
            return _FusedMarginSoftmax._forward(ctx, x_hat, weight, target_col, group, loss, chunk, mm_dtype)

    @staticmethod
    def _forward(ctx, x_hat, weight, target_col, group, loss: SoftmaxLoss, chunk, mm_dtype):
        N, n, s = x_hat.shape[0], weight.shape[0], loss.s
        math_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        dev = x_hat.device
        x_mm = x_hat.detach().to(mm_dtype or weight.dtype)  # [N, D]
        w_mm = weight.detach().to(mm_dtype) if mm_dtype is not None else weight.detach()  # [n, D]
        inv, norm_ok = _inv_row_norms(weight.detach().to(math_dtype))  # [n], [n]
        if loss.project_rows:  # unit rows (re-projected by the head): cos = x_hat W^T, no radial term
            inv, norm_ok = torch.ones_like(inv), torch.zeros_like(norm_ok)
        rows = (target_col >= 0).nonzero().squeeze(1)  # [T] global-batch rows whose class is here
        cols = target_col[rows]  # [T]
        vt = torch.zeros(rows.shape[0], dtype=math_dtype, device=dev)  # [T] margin values
        dvt = torch.empty_like(vt) if loss.target_has_slope else None
        neg_inf = torch.full((N,), float("-inf"), dtype=math_dtype, device=dev)
        if chunk is None:
            cos, over = _cos_block(x_mm, w_mm, inv, math_dtype, loss)  # [N, n]
            vt, dvt = loss.target(cos[rows, cols], rows)  # [T]
            logits = cos * s  # [N, n]
            logits[rows, cols] = vt * s
            local_max = logits.amax(dim=1) if n else neg_inf  # [N]
            gmax = comm.all_reduce(local_max, "max", group, name="softmax_max")  # [N]
            e = logits.sub_(gmax.unsqueeze(1)).exp_()  # [N, n]
            gsum = comm.all_reduce(e.sum(dim=1), "sum", group, name="softmax_sum")  # [N]
            p_here = e[rows, cols] / gsum[rows]  # [T]
        else:
            run_max, run_sum = neg_inf.clone(), torch.zeros(N, dtype=math_dtype, device=dev)  # [N]
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                cos, _ = _cos_block(x_mm, w_mm[lo:hi], inv[lo:hi], math_dtype, loss)  # [N, c]
                sel = ((cols >= lo) & (cols < hi)).nonzero().squeeze(1)  # [t] targets in this chunk
                r, c = rows[sel], cols[sel] - lo
                v, dv = loss.target(cos[r, c], r)  # [t]
                vt[sel] = v
                if dvt is not None:
                    dvt[sel] = dv
                logits = cos.mul_(s)  # [N, c]
                logits[r, c] = v * s
                new_max = torch.maximum(run_max, logits.amax(dim=1))  # [N]
                e_sum = logits.sub_(new_max.unsqueeze(1)).exp_().sum(dim=1)  # [N]
                run_sum = run_sum * torch.exp(run_max - new_max) + e_sum
                run_max = new_max
            gmax = comm.all_reduce(run_max, "max", group, name="softmax_max")  # [N]
            local_sum = run_sum * torch.exp(run_max - gmax) if n else run_sum  # [N]
            gsum = comm.all_reduce(local_sum, "sum", group, name="softmax_sum")  # [N]
            p_here = torch.exp(vt * s - gmax[rows]) / gsum[rows]  # [T]
        p_target = torch.zeros(N, dtype=math_dtype, device=dev)
        p_target[rows] = p_here
        p_target = comm.all_reduce(p_target, "sum", group, name="softmax_target")  # [N]
        # insightface floors p_target at 1e-30 in the value only; the gradient stays softmax - onehot
        value = -p_target.clamp_min(1e-30).log().mean()

        ctx.s, ctx.chunk, ctx.N, ctx.x_dtype, ctx.loss = s, chunk, N, x_hat.dtype, loss
        col_scale = inv * s  # [n]
        if chunk is None:
            g = _logit_grad_(e, 1.0 / (gsum * N), rows, cols, 1.0 / N, dvt, col_scale, over)  # [N, n]
            u = cos.mul_(g).sum(dim=0)  # [n]: sum_i dL/dG_ij cos_ij
            radial = torch.where(norm_ok, inv * u, torch.zeros_like(u))  # [n]
            del cos, logits
            ctx.save_for_backward(x_mm, w_mm, weight, g, radial)
        else:
            ctx.save_for_backward(x_mm, w_mm, weight, inv, norm_ok, gmax, gsum, rows, cols, vt, dvt)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            if ctx.chunk is None:
                return _FusedMarginSoftmax._backward_dense(ctx, grad_out)
            return _FusedMarginSoftmax._backward_chunked(ctx, grad_out)

    @staticmethod
    def _backward_dense(ctx, grad_out):
        x_mm, w_mm, weight, g, radial = ctx.saved_tensors
        if bool(grad_out != 1):
            g, radial = g * grad_out, radial * grad_out
        g_mm = g.to(x_mm.dtype)  # [N, n]
        dx = torch.mm(g_mm, w_mm)  # [N, n] @ [n, D] -> [N, D]
        dw = torch.mm(g_mm.t(), x_mm)  # [n, N] @ [N, D] -> [n, D]
        dw = dw.to(weight.dtype) if dw.dtype != weight.dtype else dw
        dw.addcmul_(weight.detach(), radial.to(weight.dtype).unsqueeze(1), value=-1.0)  # - radial_j w_j
        return dx.to(ctx.x_dtype), dw, None, None, None, None, None

    @staticmethod
    def _backward_chunked(ctx, grad_out):
        x_mm, w_mm, weight, inv, norm_ok, gmax, gsum, rows, cols, vt, dvt = ctx.saved_tensors
        (s, N, chunk, loss), n = (ctx.s, ctx.N, ctx.chunk, ctx.loss), weight.shape[0]
        math_dtype = gsum.dtype
        w_raw = weight.detach()
        row_scale = grad_out.to(math_dtype) / (gsum * N)  # [N]
        target_sub = grad_out.to(math_dtype) / N
        dx = torch.zeros(x_mm.shape, dtype=math_dtype, device=x_mm.device)  # [N, D]
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)  # [n, D]
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            cos, over = _cos_block(x_mm, w_mm[lo:hi], inv[lo:hi], math_dtype, loss)  # [N, c], recomputed
            sel = ((cols >= lo) & (cols < hi)).nonzero().squeeze(1)  # [t]
            r, c = rows[sel], cols[sel] - lo
            logits = cos * s  # [N, c]
            logits[r, c] = vt[sel] * s
            e = logits.sub_(gmax.unsqueeze(1)).exp_()  # [N, c]
            d_v = dvt[sel] if dvt is not None else None
            g = _logit_grad_(e, row_scale, r, c, target_sub, d_v, inv[lo:hi] * s, over)  # [N, c]
            u = cos.mul_(g).sum(dim=0)  # [c]
            radial = torch.where(norm_ok[lo:hi], inv[lo:hi] * u, torch.zeros_like(u))  # [c]
            g_mm = g.to(x_mm.dtype)
            if g_mm.dtype == math_dtype:
                dx.addmm_(g_mm, w_mm[lo:hi])  # += [N, c] @ [c, D]
            else:
                dx.add_(g_mm @ w_mm[lo:hi])
            dw_c = dw[lo:hi]  # [c, D] contiguous row block
            if g_mm.dtype == dw.dtype:
                torch.mm(g_mm.t(), x_mm, out=dw_c)  # [c, N] @ [N, D]
            else:
                dw_c.copy_(g_mm.t() @ x_mm)
            dw_c.addcmul_(w_raw[lo:hi], radial.to(dw.dtype).unsqueeze(1), value=-1.0)
        return dx.to(ctx.x_dtype), dw, None, None, None, None, None


class SoftmaxHead(ShardedClassifier):
    """Model-parallel classifier with a softmax loss (:class:`SoftmaxLoss`) and Partial-FC negative sampling.

    ``loss = head(local_embeddings [B, D], local_labels [B])`` is the global-batch loss on every
    rank. With ``sample_rate < 1`` each rank keeps every positive class of the global batch and
    ``int(sample_rate * num_local)`` classes in total, drawn uniformly per step from the
    head's generator (seeded by ``seed`` and the rank); unsampled rows get exactly zero gradient.
    The columns used in the last step are in ``head.weight_index`` (None when not sampling).

    ``chunk_size``: None (default, the faster path on CPU) materialises the [W*B, n_local]
    logits once; an int bounds the block to [W*B, chunk_size] (online softmax statistics,
    cosines recomputed in the backward: one more GEMM). Results agree to float rounding.
    A registered subclass sets ``loss_cls``: then ``loss`` may be omitted and its hyper-parameters
    given as keywords.
    """

    loss_cls: type = SoftmaxLoss

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        loss: SoftmaxLoss | None = None,
        sample_rate: float = 1.0,
        process_group=None,
        seed: int = 0,
        embedding_grad_scale: float = 1.0,
        check_inputs: bool = True,
        check_finite: bool = True,
        chunk_size: int | None = None,
        **loss_kwargs,
    ):
        loss = resolve_loss(type(self), loss, loss_kwargs)
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        _check_chunk(chunk_size)
        super().__init__(
            embedding_size,
            num_classes,
            process_group=process_group,
            seed=seed,
            embedding_grad_scale=embedding_grad_scale,
            check_inputs=check_inputs,
            check_finite=check_finite,
        )
        self.attach_loss(loss)
        self.sample_rate = float(sample_rate)
        self.chunk_size = chunk_size
        self.generator = torch.Generator().manual_seed(int(seed) * 7919 + self.rank + 1)
        self.weight_index = None

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", loss={self.loss!r}, sample_rate={self.sample_rate}, chunk_size={self.chunk_size}"
        )

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x_all, labels_all = self.gather(embeddings, labels)  # [W*B, D], [W*B]
        target_col = self.local_targets(labels_all)  # [W*B] in [-1, n_r)
        if self.loss.project_rows:  # OpenSphere: every row of the shard re-projected in place, then used
            with torch.no_grad():
                self.weight.copy_(F.normalize(self.weight, dim=1))
        weight = self.weight  # [n_r, D]
        if self.sample_rate < 1.0:
            index, target_col = sample_classes(target_col, self.num_local, self.sample_rate, self.generator)
            self.weight_index = index
            weight = weight[index]  # [S, D]; unsampled rows get zero gradient
        mm_dtype = autocast_gemm_dtype(x_all.device)
        if mm_dtype is not None and mm_dtype == weight.dtype:
            mm_dtype = None
        loss = self.loss.for_batch(x_all, self.state_buffers(), self.training)
        x_hat = F.normalize(x_all.to(weight.dtype), dim=1)  # [W*B, D]
        return _FusedMarginSoftmax.apply(
            x_hat, weight, target_col, self.process_group, loss, self.chunk_size, mm_dtype
        )
