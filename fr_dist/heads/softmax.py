"""The softmax family: a margin on the target logit + the class-sharded cross-entropy, on the Partial-FC
path (insightface arcface_torch PartialFC_V2 + DistCrossEntropy). Its losses (:class:`SoftmaxLoss`; ArcFace /
CosFace / combined in heads/losses/partial_fc.py, CurricularFace, MagFace, ... one file each in heads/losses/)
run on :class:`SoftmaxHead`.

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

What a loss may add (:class:`SoftmaxLoss`; every default leaves the pass above unchanged, bit for bit):

* ``norms`` [N] + :meth:`SoftmaxLoss.target_norm_slope` (MagFace: a margin differentiable in the embedding
  norm): one more autograd input of the pass; dL/da_i = (p_iy - 1) / N * s * d value / d a_i on this shard's
  target rows, computed in the forward from the target probabilities, scattered [T] -> [N] (zero elsewhere:
  the gather's reduce-scatter sums the ranks' parts);
* :meth:`SoftmaxLoss.regulariser` (MagFace's lambda_g mean g(a)): a term added to the loss with no
  collective (its value from all of x_all, its gradient through this rank's rows of x_all only);
* ``all_targets`` (CurricularFace): one more [N] all-reduce (sum, named by the loss) of every row's clipped
  target cosine before the max, given to :meth:`SoftmaxLoss.with_all_targets` (thresholds, replicated
  state), and the negatives stage (:func:`negatives_stage`: value and d value / d cos of the non-target
  cosines) in the dense forward, the chunked forward and the chunked backward's recompute; the chunked path
  gets the target cosines beforehand from [T] row dots (no extra GEMM); ``extra_collectives`` names it;
* ``ce_floor`` 0 (CurricularFace, MagFace: F.cross_entropy): the exact cross-entropy; log p_target is
  computed and all-reduced instead of p_target (insightface's default floors p_target at 1e-30 in the value).
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
    "SOFTMAX_GRAD_MODES",
]

SOFTMAX_GRAD_MODES = ("straight_through", "exact")  # d margin value / d cos: 1 | the margin's own

# F.normalize's floor on the row norm.
_NORM_EPS = 1e-12


class SoftmaxLoss:
    """What a softmax loss gives the Partial-FC path (heads/losses/*.py subclass it).

    ``s``: the logit scale. :meth:`target`: the margin on the [T] target cosines, value and derivative
    together; ``target_has_slope`` says whether it returns a derivative (else d value / d cos = 1).
    Everything below has a default that leaves the pass as it is (partial_fc, sphereface, adaface use none
    of it): ``norms`` + :meth:`target_norm_slope` (a margin differentiable in the embedding norm: MagFace),
    :meth:`regulariser` (a term on [N] only: MagFace's g(a)), ``all_targets`` + :meth:`with_all_targets` +
    :meth:`negatives` (every row's target cosine on every rank, modulated negatives: CurricularFace).
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
    ce_floor: float = 1e-30
    """insightface's DistCrossEntropy floors the target probability at 1e-30 in the loss value (not in its
    gradient); 0: the exact cross-entropy (F.cross_entropy: CurricularFace, MagFace), its log-probability
    computed and all-reduced as such (same [N] all-reduce, softmax_target)."""
    extra_collectives: tuple[str, ...] = ()
    """Names of the [N] all-reduces the loss sends beyond the family's three (softmax_max / _sum / _target);
    the planner and the benchmarks read them. CurricularFace: ("curricular_target",)."""
    all_targets: str | None = None
    """When set (the all-reduce's name): before the max, the pass all-reduces (sum) every row's clipped target
    cosine ([N], 0 on the ranks where the target is elsewhere), hands it to :meth:`with_all_targets` on every
    rank and runs the :meth:`negatives` stage on every cosine block (dense) or chunk (chunked, forward and
    backward recompute). None: neither is sent nor run."""
    norms: torch.Tensor | None = None
    """[N] a differentiable per-row input of the target margin, set by :meth:`for_batch` (MagFace: a_i =
    clamp(|x_i|, l_a, u_a) of the gathered raw embeddings): the pass takes it as one more autograd input and
    returns dL/da_i = dL/dlogit_iy * s * :meth:`target_norm_slope` on the rows whose target is in this shard
    (zero elsewhere: the gather's reduce-scatter sums the ranks' parts). None: no such input."""

    def for_batch(self, x_all: torch.Tensor, state: dict, training: bool) -> SoftmaxLoss:
        """The loss for this step: x_all [N, D] the gathered raw embeddings (a per-sample margin reads their
        norms here), ``state`` the head's state buffers (updated in place while ``training``). Default: itself."""
        return self

    def target(self, cos_t: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clipped target cosines [T] of global-batch rows ``rows`` [T] -> (margin value [T], d value / d cos
        [T] or None when it is 1)."""
        raise NotImplementedError

    def target_norm_slope(self, cos_t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """d value / d norms[rows] [T] of :meth:`target`'s value (only called when ``norms`` is set)."""
        raise NotImplementedError

    def regulariser(self, own: slice) -> torch.Tensor | None:
        """A term added to the loss (MagFace: lambda_g mean_N g(a)), or None. It sends no collective: its value
        is the global one (from every row of x_all, identical on every rank) and its gradient is counted once,
        through this rank's rows ``own`` of x_all only ([rank * B, (rank + 1) * B)). Default: None."""
        return None

    def with_all_targets(self, cos_y: torch.Tensor) -> None:
        """Every row's clipped target cosine [N] (identical on every rank; only when ``all_targets`` is set):
        the per-row quantities :meth:`negatives` needs (CurricularFace: the thresholds cos(theta_y + m) and the
        EMA t, updated here while training)."""
        raise NotImplementedError

    def negatives(self, cos: torch.Tensor, grads: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clipped cosines [N, c] of a block or chunk -> (the cosines the logits are made of [N, c], a new
        tensor; d value / d cos [N, c], or None unless ``grads``). Target entries are overwritten by the
        pass (value: :meth:`target`'s; derivative: 1 here)."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """Replicated state buffers (name -> initial tensor) the head registers; default none."""
        return {}


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


def _logit_grad_(e, row_scale, r, c, target_sub, dvt, col_scale, over, neg_slope=None):
    """In place on e = exp(logits - max) [N, c]: -> dL/dG = ((e * row_scale) - onehot/N) * dlogit/dcos * col_scale.

    ``neg_slope`` [N, c] (1 on the targets) or None: d value / d cos of the :func:`negatives_stage`."""
    g = e.mul_(row_scale.unsqueeze(1))  # [N, c] * [N, 1]: softmax / N (times the incoming gradient)
    if r.numel():
        g[r, c] -= target_sub  # - onehot / N on the target entries
        if dvt is not None:
            g[r, c] *= dvt  # exact margin derivative on the targets only
    if neg_slope is not None:
        g.mul_(neg_slope)  # [N, c]: the modulated negatives' derivative
    g.mul_(col_scale)  # [N, c] * [c]: s * inv_norm (d logit / d cos and the folded normalisation)
    if over is not None:
        g[over[0]] = g[over[0]].masked_fill_(over[1], 0.0)  # [r, c]: rows the clip touched
    return g


def negatives_stage(cos, loss: SoftmaxLoss, r, c, grads: bool):
    """The modulated negatives (only where ``loss.all_targets``): clipped cosines [N, c] of the dense block or
    of a chunk, (rows [t], columns [t]) of its target entries -> (value [N, c], a new tensor whose target
    entries the caller overwrites; d value / d cos [N, c] with 1 on the targets, or None unless ``grads``).
    The same stage in the dense forward, the chunked forward and the chunked backward's recompute."""
    value, slope = loss.negatives(cos, grads)
    if slope is not None and r.numel():
        slope[r, c] = 1.0  # the target's derivative is the margin's (dvt), applied apart
    return value, slope


def _target_cos(x_mm, w_mm, inv, rows, cols, math_dtype, loss: SoftmaxLoss):
    """The clipped target cosines [T] alone (row dots, not a GEMM): the chunked path needs them before its
    first chunk when ``loss.all_targets``."""
    xt = x_mm.index_select(0, rows).to(math_dtype)  # [T, D]
    wt = w_mm.index_select(0, cols).to(math_dtype)  # [T, D]
    bound = 1.0 - loss.cos_clip
    return ((xt * wt).sum(dim=1) * inv[cols]).clamp_(-bound, bound)  # [T]


def _share_targets(loss: SoftmaxLoss, cos_t, rows, N, group) -> None:
    """[T] target cosines of this shard -> every row's [N] on every rank (one all-reduce, sum; 0 where the
    target is elsewhere, so the sum is exact) -> ``loss.with_all_targets``."""
    cos_y = torch.zeros(N, dtype=cos_t.dtype, device=cos_t.device)
    cos_y[rows] = cos_t
    loss.with_all_targets(comm.all_reduce(cos_y, "sum", group, name=loss.all_targets))  # [N]


class _FusedMarginSoftmax(torch.autograd.Function):
    """x_hat [N, D] (unit rows), raw weight [n, D], target column [N] (-1 = elsewhere) -> mean CE.

    ``loss`` a :class:`SoftmaxLoss` (scale, target margin, optional negatives stage). ``chunk`` None: the
    block is materialised once and dL/dG is computed in place in the forward; an int: online max / sum-exp
    over column chunks and the chunk's cosines recomputed in the backward. ``mm_dtype`` (e.g. bf16 under
    autocast) is the GEMM operand dtype; the softmax math runs in fp32 (fp64 for fp64 weights). ``norms``
    [N] (``loss.norms``) or None: the margin's per-row input; its gradient dL/da (nonzero on this shard's
    target rows only) is computed in the forward from the target probabilities.
    """

    @staticmethod
    def forward(ctx, x_hat, weight, target_col, group, loss, chunk, mm_dtype, norms=None):
        with torch.autocast(x_hat.device.type, enabled=False):
            return _FusedMarginSoftmax._forward(
                ctx, x_hat, weight, target_col, group, loss, chunk, mm_dtype, norms
            )

    @staticmethod
    def _forward(ctx, x_hat, weight, target_col, group, loss: SoftmaxLoss, chunk, mm_dtype, norms):
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
        dva = torch.zeros_like(vt) if norms is not None else None  # [T] d value / d norm
        neg_inf = torch.full((N,), float("-inf"), dtype=math_dtype, device=dev)
        slope = None  # [N, n] d value / d cos of the negatives stage (dense path, all_targets only)
        if chunk is None:
            cos, over = _cos_block(x_mm, w_mm, inv, math_dtype, loss)  # [N, n]
            cos_t = cos[rows, cols]  # [T]
            vt, dvt = loss.target(cos_t, rows)  # [T]
            if dva is not None:
                dva = loss.target_norm_slope(cos_t, rows)  # [T]
            if loss.all_targets:
                _share_targets(loss, cos_t, rows, N, group)
                logits, slope = negatives_stage(cos, loss, rows, cols, True)  # [N, n], [N, n]
                logits.mul_(s)
            else:
                logits = cos * s  # [N, n]
            logits[rows, cols] = vt * s
            local_max = logits.amax(dim=1) if n else neg_inf  # [N]
            gmax = comm.all_reduce(local_max, "max", group, name="softmax_max")  # [N]
            e = logits.sub_(gmax.unsqueeze(1)).exp_()  # [N, n]
            gsum = comm.all_reduce(e.sum(dim=1), "sum", group, name="softmax_sum")  # [N]
            p_here = e[rows, cols] / gsum[rows]  # [T]
        else:
            if loss.all_targets:  # every row's threshold before the first chunk's max
                _share_targets(
                    loss, _target_cos(x_mm, w_mm, inv, rows, cols, math_dtype, loss), rows, N, group
                )
            run_max, run_sum = neg_inf.clone(), torch.zeros(N, dtype=math_dtype, device=dev)  # [N]
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                cos, _ = _cos_block(x_mm, w_mm[lo:hi], inv[lo:hi], math_dtype, loss)  # [N, c]
                sel = ((cols >= lo) & (cols < hi)).nonzero().squeeze(1)  # [t] targets in this chunk
                r, c = rows[sel], cols[sel] - lo
                cos_t = cos[r, c]  # [t]
                v, dv = loss.target(cos_t, r)  # [t]
                vt[sel] = v
                if dvt is not None:
                    dvt[sel] = dv
                if dva is not None:
                    dva[sel] = loss.target_norm_slope(cos_t, r)
                if loss.all_targets:
                    logits = negatives_stage(cos, loss, r, c, False)[0].mul_(s)  # [N, c]
                else:
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
        if loss.ce_floor > 0:
            p_target[rows] = p_here
            p_target = comm.all_reduce(p_target, "sum", group, name="softmax_target")  # [N]
            # insightface floors p_target at 1e-30 in the value only; the gradient stays softmax - onehot
            value = -p_target.clamp_min(loss.ce_floor).log().mean()
        else:  # the exact cross-entropy: log p_target itself travels (one owner per row: the sum is exact)
            p_target[rows] = vt * s - gmax[rows] - gsum[rows].log()  # [T] log p
            value = -comm.all_reduce(p_target, "sum", group, name="softmax_target").mean()

        ctx.s, ctx.chunk, ctx.N, ctx.x_dtype, ctx.loss = s, chunk, N, x_hat.dtype, loss
        ctx.d_norms = None
        if dva is not None:  # dL/da_i = (p_iy - 1) / N * s * d value / d a_i on this shard's target rows
            d_norms = torch.zeros(N, dtype=math_dtype, device=dev)
            d_norms[rows] = (p_here - 1.0) * dva * (s / N)
            ctx.d_norms = d_norms.to(norms.dtype)  # [N]
        col_scale = inv * s  # [n]
        if chunk is None:
            g = _logit_grad_(e, 1.0 / (gsum * N), rows, cols, 1.0 / N, dvt, col_scale, over, slope)  # [N, n]
            del slope
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
                dx, dw = _FusedMarginSoftmax._backward_dense(ctx, grad_out)
            else:
                dx, dw = _FusedMarginSoftmax._backward_chunked(ctx, grad_out)
        d_norms = None if ctx.d_norms is None else ctx.d_norms * grad_out.to(ctx.d_norms.dtype)
        return dx, dw, None, None, None, None, None, d_norms

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
        return dx.to(ctx.x_dtype), dw

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
            slope = None
            if loss.all_targets:  # the mask recomputed from the thresholds the forward kept in ``loss``
                logits, slope = negatives_stage(cos, loss, r, c, True)  # [N, c], [N, c]
                logits.mul_(s)
            else:
                logits = cos * s  # [N, c]
            logits[r, c] = vt[sel] * s
            e = logits.sub_(gmax.unsqueeze(1)).exp_()  # [N, c]
            d_v = dvt[sel] if dvt is not None else None
            g = _logit_grad_(e, row_scale, r, c, target_sub, d_v, inv[lo:hi] * s, over, slope)  # [N, c]
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
        return dx.to(ctx.x_dtype), dw


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
        value = _FusedMarginSoftmax.apply(
            x_hat, weight, target_col, self.process_group, loss, self.chunk_size, mm_dtype, loss.norms
        )
        B = x_all.shape[0] // self.world_size
        extra = loss.regulariser(slice(self.rank * B, (self.rank + 1) * B))  # this rank's rows of x_all
        return value if extra is None else value + extra
