"""Fused, chunked, single-pass SphereFace2 shard loss: the [N, n] cosine block is never materialised.

SphereFace2 has no softmax normaliser, so every (sample, class) term stands alone and the loss,
dL/dx_hat, dL/dW_used and dL/db of a shard are computed in ONE pass over chunks of its classes.
Per chunk of ``c`` classes (N = W*B gathered rows, D = embedding size)::

    w      = rows of the chunk, normalised IN PLACE (OpenSphere re-projects every forward)   [c, D]
    cos    = x_hat @ w^T                                                    GEMM 1     [N, c]
    z      = r * g_hat(cos) + b; softplus(z) summed; sigmoid(z) -> Q                   [N, c]
    target entries (at most N per step) are patched on [N] vectors (full margin formula)
    grad_W = Q^T @ (alpha x_hat)                                            GEMM 2     [c, D]
    grad_x += Q @ w                                                         GEMM 3     [N, D]
    optional fused optimizer update of the chunk's rows (and their optimizer state) right here

Only [N, c] temporaries exist (3 of them; 1 when the elementwise part runs as one Triton kernel,
:mod:`fr_dist.heads.sf2_triton`). Under autocast the three GEMMs take operands in its dtype (bf16),
as a Linear layer would; everything else stays fp32. Negatives are evaluated with the cheap closed form
``z = (2r / 2^t) (c + 1)^t + r (m_neg - 1) + b`` (A/M: c clipped first, as OpenSphere's
arccos/cos round trip does); the acos/cos margin formula runs on the <= N target entries only.

The forward computes every gradient it will return (as fused linear-cross-entropy kernels do);
the backward multiplies them by ``grad_out`` and hands them to autograd. With ``fused_update``
the weight rows are updated inside the forward (the [n, D] gradient is never allocated); that
update assumes ``grad_out == 1`` (the loss is back-propagated unscaled), which the trainer
guarantees (grad_accum = 1, no fp16 GradScaler).

Semantics (identical to OpenSphere / the previous head): the rows used are ``W / |W|``, written
back in place (the stored rows are unit after every forward that does not update them);
``weight.grad`` (non-fused) is dL/dW_used; a fused step computes exactly what ``torch.optim.SGD``
(:class:`RowOptimizer`) or ``torch.optim.AdamW`` (:class:`RowAdamW`) would on those unit rows with
that gradient. Per-row state (momentum / Adam moments, the Adam step count) is gathered per chunk
into chunk-sized fp32 temporaries when it is stored in another dtype (bf16) or the rows are sampled,
updated in fp32 and written back: no [n, D] temporary exists. With negative sampling the update is
lazy: rows not used in a step keep their values and their state (like SparseAdam / LazyAdam).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fr_dist.heads import sf2_triton
from fr_dist.heads.margins import (
    _COS_EPS,
    _THETA_MAX,
    _THETA_MIN,
    sphereface2_target_value,
)

__all__ = [
    "FusedPlan",
    "RowAdamW",
    "RowOptimizer",
    "auto_chunk_size",
    "sphereface2_target_slope",
    "sphereface2_fused_partial_loss",
]

# Sampled rows are gathered with index_select (8x faster than advanced indexing for bf16 rows on this CPU)
# and written back with index_put_ (1.4x faster than index_copy_).
# Byte budgets: one [N, chunk] temporary (three exist), and the chunk's [chunk, D] rows (kept in
# the core's L2 across GEMMs 1 and 3 and the update; 2 MB measured best on the 1 MB-L2 EPYC here).
CHUNK_BUDGET_BYTES = 1 << 20
ROWS_BUDGET_BYTES = 2 << 20
# On a GPU a chunk costs ~20-30 kernel launches (~5 us each): small chunks make the loop launch-bound
# (at N = 1024 the 1 MB CPU budget gives 256 classes, i.e. ~49,000 chunks for 12.5M classes a GPU), so
# the [N, chunk] temporary gets 64 MiB there: 16,384 classes at N = 1024, still ~1/800 of the block.
CUDA_CHUNK_BUDGET_BYTES = 64 << 20


def auto_chunk_size(
    num_rows: int, num_cols: int, dim: int, elem_bytes: int = 4, device_type: str = "cpu"
) -> int:
    """Classes per chunk from the byte budgets of ``device_type`` (>= 16, <= num_cols)."""
    if device_type == "cuda":
        c = CUDA_CHUNK_BUDGET_BYTES // max(1, num_rows * elem_bytes)
        c = c // 64 * 64 if c >= 64 else c  # whole GEMM tiles
    else:
        c = min(
            CHUNK_BUDGET_BYTES // max(1, num_rows * elem_bytes), ROWS_BUDGET_BYTES // max(1, dim * elem_bytes)
        )
    return max(1, min(max(16, c), num_cols))


def sphereface2_target_slope(cos: torch.Tensor, margin: str, m: float, t: float) -> torch.Tensor:
    """d g_hat / d cos on TARGET entries, analytically, matching autograd through
    :func:`fr_dist.heads.margins.sphereface2_target_value` (clamps pass gradient where
    ``lo <= x <= hi``, inclusive, as ``torch.clamp`` does)."""

    def g_prime(u):
        return t * ((u + 1.0) / 2.0) ** (t - 1.0)

    if margin == "C":
        return g_prime(cos)
    lo, hi = -1.0 + _COS_EPS, 1.0 - _COS_EPS
    c = cos.clamp(lo, hi)
    theta = torch.acos(c)
    moved = theta + m if margin == "A" else theta * m
    th = moved.clamp(_THETA_MIN, _THETA_MAX)
    d_moved = 1.0 if margin == "A" else m
    slope = g_prime(torch.cos(th)) * torch.sin(th) * d_moved / torch.sqrt(1.0 - c * c)
    keep = (cos >= lo) & (cos <= hi) & (moved >= _THETA_MIN) & (moved <= _THETA_MAX)
    return torch.where(keep, slope, torch.zeros_like(slope))


@dataclass
class RowOptimizer:
    """Per-row optimizer applied inside the fused pass (torch.optim.SGD semantics, dampening 0).

    ``lr`` is set by the trainer from the head's LR schedule before every step.
    """

    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov momentum needs momentum > 0")

    def state_fields(self) -> tuple[str, ...]:
        """The :class:`FusedPlan` per-row state tensors :meth:`step_` takes after ``w`` and ``g``."""
        return ("momentum",) if self.momentum else ()

    def step_(self, w: torch.Tensor, g: torch.Tensor, buf: Optional[torch.Tensor] = None) -> None:
        """w [c, D] (fp32, updated in place), g [c, D] (consumed), buf [c, D] fp32 momentum or None."""
        if self.weight_decay:
            g.add_(w, alpha=self.weight_decay)
        step = g
        if self.momentum:
            buf.mul_(self.momentum).add_(g)
            step = g.add_(buf, alpha=self.momentum) if self.nesterov else buf
        w.add_(step, alpha=-self.lr)


@dataclass
class RowAdamW:
    """Per-row AdamW applied inside the fused pass: ``torch.optim.AdamW`` semantics (decoupled weight
    decay, bias correction; no amsgrad / maximize) on the rows a step uses.

    The step count of the bias correction is kept PER ROW (``FusedPlan.row_step``, the head's
    ``weight_step`` buffer [n] int32): a row is stepped exactly as ``torch.optim.AdamW`` would step it
    on the sequence of steps that used it. Without sampling every row is used every step, so all
    counts equal the optimizer step count and the update is ``torch.optim.AdamW`` on the whole shard.
    A per-row count is a [n, ...] row buffer like the moments, so it is checkpointed and re-sharded
    with them (a scalar count could not be), and skipped steps (non-finite inputs) do not count.
    ``lr`` is set by the trainer from the head's LR schedule before every step.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def __post_init__(self):
        b1, b2 = (float(b) for b in self.betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"AdamW betas must be in [0, 1), got {self.betas}")
        if self.eps < 0 or self.weight_decay < 0 or self.lr < 0:
            raise ValueError(f"AdamW lr / eps / weight_decay must be >= 0, got {self}")
        self.betas = (b1, b2)

    def state_fields(self) -> tuple[str, ...]:
        """exp_avg (the head's ``weight_momentum``), exp_avg_sq and the per-row step count."""
        return ("momentum", "exp_avg_sq", "row_step")

    def step_(
        self,
        w: torch.Tensor,
        g: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        step: torch.Tensor,
    ) -> None:
        """w, exp_avg, exp_avg_sq [c, D] (compute dtype, updated in place), g [c, D] (consumed as the
        denominator's buffer), step [c] int32 per-row counts (incremented)."""
        b1, b2 = self.betas
        step.add_(1)
        s = step.to(torch.float64)  # [c]: coefficients in double, as torch's Python-float ones
        step_size = (self.lr / (1.0 - torch.pow(b1, s))).to(w.dtype).unsqueeze(1)  # [c, 1]
        bc2_sqrt = torch.sqrt(1.0 - torch.pow(b2, s)).to(w.dtype).unsqueeze(1)  # [c, 1]
        if self.weight_decay:
            w.mul_(1.0 - self.lr * self.weight_decay)
        exp_avg.lerp_(g, 1.0 - b1)
        exp_avg_sq.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        denom = torch.sqrt(exp_avg_sq, out=g).div_(bc2_sqrt).add_(self.eps)  # [c, D], in g's storage
        w.sub_(torch.div(exp_avg, denom, out=denom).mul_(step_size))  # w -= step_size * m / denom


@dataclass
class FusedPlan:
    """Everything the fused pass needs besides tensors that autograd must see."""

    lam: float
    r: float
    m: float
    t: float
    lw: float
    margin: str
    grad: str
    batch_size: int  # GLOBAL batch size B normalising the loss
    chunk_size: int = 0  # 0 = auto
    optimizer: Optional[RowOptimizer | RowAdamW] = None  # fused update when set
    momentum: Optional[torch.Tensor] = None  # [n, D] per-row momentum / AdamW exp_avg (storage dtype)
    exp_avg_sq: Optional[torch.Tensor] = None  # [n, D] AdamW second moment (storage dtype)
    row_step: Optional[torch.Tensor] = None  # [n] int32 AdamW per-row step count
    master: Optional[torch.Tensor] = None  # [n, D] fp32 master rows (bf16 storage)
    index: Optional[torch.Tensor] = None  # [S] sorted shard rows used this step (sampling)
    col_weight: Optional[torch.Tensor] = None  # [S] 1 / inclusion probability of each used row
    do_update: bool = False  # run the fused update this call (training step with grad enabled)
    # GEMM operand dtype (the caller's autocast dtype, e.g. bf16): the three GEMMs take operands in it,
    # as a Linear under autocast would; the chunk math, gradients and update stay fp32. None = fp32.
    mm_dtype: Optional[torch.dtype] = None
    # the chunk's elementwise part: "eager" (torch ops) or "triton" (one kernel, fr_dist.heads.sf2_triton;
    # fp32 only, fp64 stays eager)
    kernel: str = "eager"
    update_ok: bool = True  # False: skip the fused update (non-finite inputs)


def _softplus_out(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # log1p(exp(z)), switching to z above a threshold where the difference is below the dtype's eps
    threshold = 40.0 if z.dtype == torch.float64 else 20.0
    return torch._C._nn.softplus(z, 1.0, threshold, out=out)


class _FusedSF2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_hat, weight, bias, target_col, plan: FusedPlan):
        N, D = x_hat.shape
        cdt = x_hat.dtype if x_hat.dtype == torch.float64 else torch.float32  # compute dtype
        dev = x_hat.device
        xh = x_hat.detach().to(cdt)
        W = weight.detach()
        rows_total = W.shape[0] if plan.index is None else plan.index.numel()
        b = float(bias.detach().reshape(()))
        need_x = x_hat.requires_grad
        fused = plan.optimizer is not None and plan.do_update
        need_w = weight.requires_grad and not fused
        need_grads = need_x or need_w or fused

        S = plan.lw / (plan.r * plan.batch_size)
        w_pos, w_neg = plan.lam * S, (1.0 - plan.lam) * S
        exact = plan.grad == "exact"
        t = plan.t
        m_neg = plan.m if plan.margin == "C" else 0.0
        k_z = 2.0 * plan.r / 2.0**t  # z = k_z * u^t + z0, u = c + 1
        z0 = plan.r * (m_neg - 1.0) + b
        alpha = w_neg * plan.r * (t / 2.0 ** (t - 1.0) if exact else 1.0)  # dL/dcos = alpha * Q * col_w
        clip = plan.margin != "C"
        lo_u, hi_u = (-1.0 + _COS_EPS) + 1.0, (1.0 - _COS_EPS) + 1.0
        z0_t = torch.full((), z0, dtype=cdt, device=dev)  # addcmul's input: a 0-dim tensor on x's device

        csize = plan.chunk_size or auto_chunk_size(N, rows_total, D, torch.finfo(cdt).bits // 8, dev.type)
        csize = max(1, min(csize, max(rows_total, 1)))
        # the Triton kernel (fp32) does the elementwise part in one pass over the cosine buffer
        use_triton = plan.kernel == "triton" and cdt == torch.float32
        buf_q = torch.empty(N * csize, dtype=cdt, device=dev)
        buf_p = None if use_triton else torch.empty(N * csize, dtype=cdt, device=dev)
        buf_s = None if use_triton else torch.empty(N * csize, dtype=cdt, device=dev)
        tcol_buf = torch.empty(N, dtype=torch.int32, device=dev) if use_triton else None
        convert = W.dtype != cdt or plan.index is not None
        w_tmp = torch.empty(csize, D, dtype=cdt, device=dev) if convert and plan.master is None else None
        g_tmp = None
        if need_grads and (fused or plan.index is not None):
            g_tmp = torch.empty(csize, D, dtype=cdt, device=dev)
        # per-row optimizer state [n, ...]; a chunk-sized compute-dtype copy where it is stored in
        # another dtype or gathered (sampling); integer state (step counts) stays integer
        states = []
        for name in plan.optimizer.state_fields() if fused else ():
            st = getattr(plan, name)
            if st is None:
                raise ValueError(f"the fused {type(plan.optimizer).__name__} update needs FusedPlan.{name}")
            tdt = cdt if st.dtype.is_floating_point else st.dtype
            tmp = None
            if st.dtype != tdt or plan.index is not None:
                tmp = torch.empty((csize,) + tuple(st.shape[1:]), dtype=tdt, device=dev)  # [csize, ...]
            states.append((st, tmp))

        grad_w = None
        if need_w:
            alloc = torch.zeros if plan.index is not None else torch.empty
            grad_w = alloc(W.shape, dtype=cdt, device=dev)
        grad_x = torch.zeros(N, D, dtype=cdt, device=dev) if need_x else None
        xh_a = xh * alpha if need_grads else None  # [N, D]: alpha folded into GEMM 2
        mm = plan.mm_dtype if plan.mm_dtype not in (None, cdt) else None
        xh_mm = xh.to(mm) if mm is not None else xh  # [N, D] GEMM operands
        xh_a_mm = xh_a.to(mm) if mm is not None and xh_a is not None else xh_a

        # target entries: row i of the batch, its column in the (possibly sampled) row list
        pos_rows = (target_col >= 0).nonzero().reshape(-1)  # [P]
        pos_cols = target_col[pos_rows]  # [P]
        loss_acc = torch.zeros((), dtype=torch.float64, device=dev)
        gb_acc = torch.zeros((), dtype=torch.float64, device=dev)
        src = plan.master if plan.master is not None else W

        for lo in range(0, rows_total, csize):
            hi = min(lo + csize, rows_total)
            c = hi - lo
            ridx = None if plan.index is None else plan.index[lo:hi]  # [c] shard rows
            # ---- the chunk's rows in the compute dtype, normalised (OpenSphere's in-place re-projection)
            if ridx is not None:
                wc = w_tmp[:c] if w_tmp is not None else torch.empty(c, D, dtype=cdt, device=dev)
                if src.dtype == cdt:
                    torch.index_select(src, 0, ridx, out=wc)
                else:
                    wc.copy_(src.index_select(0, ridx))  # [c, D] gathered, then converted
            elif w_tmp is not None and plan.master is None:
                wc = w_tmp[:c]
                wc.copy_(W[lo:hi])
            else:
                wc = src[lo:hi]  # a view: normalised and updated in place
            wc.div_(torch.linalg.vector_norm(wc, dim=1, keepdim=True).clamp_min_(1e-12))
            wc_mm = wc.to(mm) if mm is not None else wc  # [c, D] GEMM operand
            # ---- GEMM 1 and the binary terms of the negatives
            u = buf_q[: N * c].view(N, c)
            _mm_into(u, xh_mm, wc_mm.t())  # cos [N, c]
            sel = (pos_cols >= lo) & (pos_cols < hi)
            pr, pc = pos_rows[sel], pos_cols[sel] - lo  # [p] rows / chunk columns of targets
            cos_t = u[pr, pc].clone()  # [p]
            cw = None if plan.col_weight is None else plan.col_weight[lo:hi].to(cdt)  # [c]
            if use_triton:  # one kernel: z, softplus, sigmoid, column sums, dL/dz in place
                tcol = tcol_buf.fill_(-1)
                tcol[pr] = pc.to(tcol.dtype)  # [N] the target's column in this chunk, -1 = none
                col_sp, col_q = sf2_triton.negative_terms_(
                    u,
                    tcol,
                    cw,
                    k_z=k_z,
                    z0=z0,
                    t=t,
                    clip=clip,
                    lo_u=lo_u,
                    hi_u=hi_u,
                    exact=exact,
                    grads=need_grads,
                )  # [c], [c]
                loss_acc += w_neg * (col_sp.sum() if cw is None else col_sp @ cw).double()
                gb_acc += w_neg * (col_q.sum() if cw is None else col_q @ cw).double()
            else:
                if clip:
                    u.add_(1.0).clamp_(lo_u, hi_u)
                else:
                    u.add_(1.0)
                sp = buf_p[: N * c].view(N, c)
                torch.pow(u, t - 1.0, out=sp)  # u^(t-1); also (t/2^(t-1)) u^(t-1) = g'(c)
                mask = ((u > lo_u) & (u < hi_u)) if (clip and exact) else None
                torch.addcmul(z0_t, u, sp, value=k_z, out=u)  # z [N, c]
                spl = buf_s[: N * c].view(N, c)
                _softplus_out(u, spl)
                spl[pr, pc] = 0.0  # targets are not negatives
                loss_acc += w_neg * (spl.sum() if cw is None else spl.sum(0) @ cw).double()
                u.sigmoid_()  # Q = sigmoid(z) = dL/dz / w_neg
                u[pr, pc] = 0.0
                gb_acc += w_neg * (u.sum() if cw is None else u.sum(0) @ cw).double()
            # ---- targets: full margin formula on [p] vectors
            if pr.numel():
                is_t = torch.ones_like(cos_t, dtype=torch.bool)
                zt = plan.r * sphereface2_target_value(cos_t, is_t, plan.margin, plan.m, t) + b
                loss_acc += w_pos * _softplus_out(-zt, torch.empty_like(zt)).sum().double()
                dz_t = -w_pos * torch.sigmoid(-zt)  # dL/dz at targets
                gb_acc += dz_t.sum().double()
            if not need_grads:
                continue  # evaluation: converted / gathered copies are not written back
            if exact and not use_triton:
                u.mul_(sp)
                if mask is not None:
                    u.mul_(mask)
            if pr.numel():
                slope = sphereface2_target_slope(cos_t, plan.margin, plan.m, t) if exact else 1.0
                val = dz_t * plan.r * slope / alpha  # [p]
                u[pr, pc] = val * cw[pc] if (use_triton and cw is not None) else val
            if cw is not None and not use_triton:
                u.mul_(cw)  # 1/p on sampled negatives' columns (1 on positive classes)
            # ---- GEMMs 2 and 3
            u_mm = u.to(mm) if mm is not None else u  # [N, c] GEMM operand
            if grad_x is not None:
                if mm is None:
                    grad_x.addmm_(u, wc)  # [N, D] += [N, c] @ [c, D]
                else:
                    grad_x.add_(torch.mm(u_mm, wc_mm))  # fp32 [N, D] += ([N, c] @ [c, D] in mm)
            if fused:
                g = g_tmp[:c]
                _mm_into(g, u_mm.t(), xh_a_mm)  # dL/dW_used [c, D]
                if plan.update_ok:
                    sb = []  # the chunk's state rows: views of the storage or filled temporaries
                    for st, tmp in states:
                        if tmp is None:
                            sb.append(st[lo:hi])
                        else:
                            sb.append(tmp[:c])
                            sb[-1].copy_(st[lo:hi] if ridx is None else st.index_select(0, ridx))
                    plan.optimizer.step_(wc, g, *sb)
                    for (st, tmp), b_ in zip(states, sb):
                        if tmp is not None:
                            _write_rows(st, lo, hi, ridx, b_)
            elif grad_w is not None:
                if ridx is None:
                    _mm_into(grad_w[lo:hi], u_mm.t(), xh_a_mm)  # [c, D]
                else:
                    _mm_into(g_tmp[:c], u_mm.t(), xh_a_mm)  # [c, D]
                    grad_w.index_put_((ridx,), g_tmp[:c])  # rows are unique
            # ---- write the chunk's rows back where they are not a view of the storage
            if plan.master is not None:
                if ridx is not None:
                    plan.master.index_put_((ridx,), wc)
                _write_rows(W, lo, hi, ridx, wc if ridx is None else wc)
            elif wc.data_ptr() != W[lo:hi].data_ptr() or ridx is not None:
                _write_rows(W, lo, hi, ridx, wc)

        if grad_x is not None:
            grad_x.mul_(alpha)
        ctx.grad_x, ctx.grad_w = grad_x, grad_w
        ctx.x_dtype, ctx.w_dtype, ctx.b_dtype = x_hat.dtype, weight.dtype, bias.dtype
        ctx.save_for_backward(gb_acc)
        return loss_acc.to(x_hat.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (gb,) = ctx.saved_tensors
        go = grad_out.detach()
        one = go.device.type == "cpu" and bool(go == 1)
        gx, gw = ctx.grad_x, ctx.grad_w
        ctx.grad_x = ctx.grad_w = None
        if gx is not None:
            gx = (gx if one else gx * go.to(gx.dtype)).to(ctx.x_dtype)
        if gw is not None:
            gw = (gw if one else gw * go.to(gw.dtype)).to(ctx.w_dtype)
        g_b = (gb * go.to(gb.dtype)).reshape(1).to(ctx.b_dtype)
        return gx, gw, g_b, None, None


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b: in place when the operands have out's dtype, else a GEMM in theirs, then cast."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a, b))


def _write_rows(dst: torch.Tensor, lo: int, hi: int, ridx: Optional[torch.Tensor], src: torch.Tensor) -> None:
    """dst[lo:hi] = src (or dst[ridx] = src), converting to dst's storage dtype."""
    if ridx is None:
        dst[lo:hi].copy_(src)
    else:
        dst.index_put_((ridx,), src.to(dst.dtype))  # unique sorted rows; faster than index_copy_ on CPU


def sphereface2_fused_partial_loss(
    x_hat: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target_col: torch.Tensor,
    plan: FusedPlan,
) -> torch.Tensor:
    """This shard's share of the SphereFace2 loss, fused over class chunks.

    x_hat [N, D] unit embeddings (differentiable), weight [n, D] the shard (rows re-normalised /
    updated in place), bias [1], target_col [N] in [-1, n) (or [-1, S) into ``plan.index``).
    """
    with torch.autocast(x_hat.device.type, enabled=False):
        return _FusedSF2.apply(x_hat, weight, bias, target_col, plan)
