"""The binary family: a loss with one term per (sample, class) logit and no normaliser, run as ONE fused,
chunked pass over the shard's classes; the [N, n] cosine block is never materialised.

A binary loss (:class:`BinaryLoss`; SphereFace2 and UniFace in heads/losses/) is, for N = W*B gathered
rows, with a bias b shared by all classes::

    L = sum_i [ w_pos softplus(-z_iy) + w_neg sum_{j != y_i} softplus(z_ij) ]
    z_ij = k_z clip(c_ij + 1)^t + z0        negatives: one closed form (this pass and its Triton kernel)
    z_iy = the loss's target logit          targets (at most N per step): any formula, with its derivative

z0 holds b (d z / d b = ``bias_sign``: +1 SphereFace2, -1 UniFace). The clip is the cosine's (SphereFace2's
A / M margins: b still gets the gradient of a clipped entry) or the logit's (``clip_logit``, UniFace's
clamp of z to [-s, s]; exact for t = 1: a clipped entry gives no gradient to the cosine nor to b).

Per chunk of ``c`` classes (D = embedding size)::

    w      = rows of the chunk, normalised IN PLACE (OpenSphere re-projects every forward)   [c, D]
             (or, ``project_rows=False``, a unit copy w_hat beside the raw rows: F.normalize)
    cos    = x_hat @ w^T                                                    GEMM 1     [N, c]
    negatives: z, softplus(z) summed, sigmoid(z) -> Q (:meth:`BinaryStages.negatives_`, or one Triton
               kernel, :mod:`fr_dist.heads.binary_triton`, its eager twin's twin)           [N, c]
    targets patched on [P] vectors (:meth:`BinaryStages.targets`, the loss's target logit / slope)
    grad_W = Q^T @ (alpha x_hat)                                            GEMM 2     [c, D]
    grad_x += Q @ w                                                         GEMM 3     [N, D]
    optional in-pass optimizer update of the chunk's rows (and their optimizer state) right here

Only [N, c] temporaries exist (3 of them; 1 when the elementwise part runs as the Triton kernel). Under
autocast the three GEMMs take operands in its dtype (bf16), as a Linear layer would; everything else stays
fp32. The forward computes every gradient it will return (as fused linear-cross-entropy kernels do); the
backward multiplies them by ``grad_out``. With an in-pass update (``plan.optimizer``) the rows are updated
inside the forward (the [n, D] gradient is never allocated); that update assumes ``grad_out == 1``, which
the trainer guarantees (the head's optimizer contract: grad_accum = 1, no fp16 GradScaler).

Semantics (OpenSphere's, ``BinaryLoss.project_rows``): the rows used are ``W / |W|``, written back in place;
``weight.grad`` (no in-pass update) is dL/dW_used; an update computes exactly what ``torch.optim.SGD`` /
``AdamW`` (:mod:`fr_dist.heads.row_optim`) would on those unit rows with that gradient. With
``project_rows=False`` (UniFace's F.normalize) the stored rows are never re-projected: ``weight.grad`` is
dL/dW_raw = (g - (g . w_hat) w_hat) / max(|w|, eps) for g = dL/dw_hat, and an update steps the raw rows
with it, as ``torch.optim`` would on a head that normalises in its forward. Per-row state is gathered per
chunk into chunk-sized fp32 temporaries when it is stored in another dtype (bf16) or the rows are sampled,
updated in fp32 and written back: no [n, D] temporary exists. With negative sampling the update is lazy:
rows not used in a step keep their values and their state (like SparseAdam / LazyAdam).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from fr_dist.heads.row_optim import RowAdamW, RowOptimizer

__all__ = [
    "BinaryCoefficients",
    "BinaryLoss",
    "BinaryPlan",
    "BinaryStages",
    "auto_chunk_size",
    "binary_partial_loss",
]

# Byte budgets: one [N, chunk] temporary (three exist), and the chunk's [chunk, D] rows (kept in the
# core's L2 across GEMMs 1 and 3 and the update; 2 MB measured best on the 1 MB-L2 EPYC here).
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


@dataclass(frozen=True)
class BinaryCoefficients:
    """One step's constants of a binary loss (Python floats: the Triton kernel's scalar arguments).

    Negative logit z = k_z * v^t + z0 with v = cos + 1, clipped to [lo_u, hi_u] where ``clip``; its loss
    term w_neg softplus(z). Target term w_pos softplus(-z_t). dL/dcos of a negative = alpha * sigmoid(z)
    (* v^(t-1) where ``exact``: the gradient through the power); z_t = r * value(cos) + b on targets.
    """

    w_pos: float
    w_neg: float
    r: float  # d logit / d (margin value)
    k_z: float
    t: float
    z0: float
    alpha: float
    clip: bool  # the margin's: negatives' cosines clipped (a constexpr of the kernel)
    lo_u: float
    hi_u: float
    exact: bool  # gradient through the power v^t (else d logit / d cos = r, straight through)
    # the clip is the LOGIT's, bias included (UniFace clamps z to [-s, s]): a clipped entry gives no
    # gradient to b either (SphereFace2's clips are on the cosine, before b). Needs clip and exact.
    clip_logit: bool = False

    def __post_init__(self):
        if self.clip_logit and not (self.clip and self.exact):
            raise ValueError("BinaryCoefficients: clip_logit needs clip=True and exact=True")


class BinaryLoss:
    """What a binary loss gives the family's pass (heads/losses/*.py subclass it; no state today).

    ``bias_metric``: the log name of the shared bias b (:meth:`BinaryHead.log_scalars`).
    """

    family = "binary"
    bias_metric = "bias"
    bias_sign = 1.0
    """d z / d b: +1 (SphereFace2: z = ... + b) or -1 (UniFace: z = ... - b, the paper's b kept as it is)."""
    project_rows = True
    """True: OpenSphere's in-place re-projection of the rows onto the unit sphere every forward, outside
    autograd (``weight.grad`` = dL/dW_used); False: the rows are normalised differentiably (F.normalize),
    the stored rows are left as they are, ``weight.grad`` is dL/dW_raw, the radial projection included
    ((g - (g . w_hat) w_hat) / max(|w|, eps)), and the in-pass update steps the raw rows with it."""
    norm_eps = 1e-12
    """eps of the embedding and row normalisations, x / max(|x|, eps)."""
    clip_logit = False
    """The negatives' clip and the target's clamp are on the logit, bias included: a clipped entry passes
    no gradient to b (:attr:`BinaryCoefficients.clip_logit`; the target's :meth:`target_slope` is then the
    0/1 mask of its clamp and multiplies its dL/db too)."""

    def weight_init_std(self, embedding_size: int) -> float:
        """Std of the N(0, std^2) initial rows (fr_dist's 0.01 unless the loss's own code says otherwise)."""
        return 0.01

    def initial_bias(self, num_classes: int) -> float:
        """b before training, from the GLOBAL number of classes."""
        raise NotImplementedError

    def coefficients(self, bias: float, batch_size: int) -> BinaryCoefficients:
        """This step's constants for the current bias and the GLOBAL batch size B."""
        raise NotImplementedError

    def target_logit(self, cos_t: torch.Tensor, bias: float) -> torch.Tensor:
        """[P] target cosines -> their logits z_t [P] (differentiable: the tests' reference uses it)."""
        raise NotImplementedError

    def target_slope(self, cos_t: torch.Tensor, bias: float):
        """d (margin value) / d cos on the [P] targets, or 1.0 where the gradient is straight through."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """Replicated state buffers (name -> initial tensor) the head registers; none for SphereFace2."""
        return {}


class BinaryStages:
    """The binary family's math, one named stage each (Megatron's tensor_parallel/cross_entropy.py style),
    shared by the fused pass, the materialised block path (heads/binary_head.py) and the tests' reference."""

    @staticmethod
    def softplus(z: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log1p(exp(z)), switching to z above a threshold where the difference is below the dtype's eps."""
        threshold = 40.0 if z.dtype == torch.float64 else 20.0
        if out is None:
            return F.softplus(z, 1.0, threshold)  # differentiable
        return torch._C._nn.softplus(z, 1.0, threshold, out=out)

    @staticmethod
    def negatives_(u, p, s, targets, col_weight, co: BinaryCoefficients, z0_t, grads: bool):
        """The Triton kernel's eager twin, in place on the chunk's cosines ``u`` [N, c] with the [N, c]
        buffers ``p`` (v^(t-1)) and ``s`` (softplus). ``targets`` = (rows [P], columns [P]) of the target
        entries (not negatives), ``col_weight`` [c] or None (1/p of sampled columns), ``z0_t`` z0 as a 0-dim
        tensor on u's device. With ``grads`` u ends as dL/dz / w_neg (times v^(t-1) and the inside-the-clip
        mask when ``exact``, times col_weight), zero on the targets. Returns the loss and sum dL/dz of the
        negatives (fp64 scalars; dL/db where ``bias_sign`` = 1; the inside-the-clip entries only where
        ``clip_logit``)."""
        pr, pc = targets
        if co.clip:
            u.add_(1.0).clamp_(co.lo_u, co.hi_u)
        else:
            u.add_(1.0)
        torch.pow(u, co.t - 1.0, out=p)  # v^(t-1); also (t/2^(t-1)) v^(t-1) = g'(c)
        mask = ((u > co.lo_u) & (u < co.hi_u)) if (co.clip and co.exact) else None
        torch.addcmul(z0_t, u, p, value=co.k_z, out=u)  # z [N, c]
        BinaryStages.softplus(u, out=s)
        s[pr, pc] = 0.0  # targets are not negatives
        loss = co.w_neg * (s.sum() if col_weight is None else s.sum(0) @ col_weight).double()
        u.sigmoid_()  # Q = sigmoid(z) = dL/dz / w_neg
        u[pr, pc] = 0.0
        if co.clip_logit:
            u.mul_(mask)  # the logit's clip: no gradient outside it, to b either
        grad_b = co.w_neg * (u.sum() if col_weight is None else u.sum(0) @ col_weight).double()
        if grads:
            if co.exact:
                u.mul_(p)
                if mask is not None and not co.clip_logit:
                    u.mul_(mask)
            if col_weight is not None:
                u.mul_(col_weight)  # 1/p on sampled negatives' columns (1 on positive classes)
        return loss, grad_b

    @staticmethod
    def targets(z_t: torch.Tensor, w_pos: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Target logits [P] -> (their loss, fp64 scalar; dL/dz [P])."""
        loss = w_pos * BinaryStages.softplus(-z_t, out=torch.empty_like(z_t)).sum().double()
        return loss, -w_pos * torch.sigmoid(-z_t)

    @staticmethod
    def target_bias_grad(dz_t, cos_t, loss: BinaryLoss, bias: float) -> torch.Tensor:
        """dL/dz [P] of the targets -> their sum dL/dz (fp64; the clamp's mask applied where
        ``loss.clip_logit``): dL/db of the targets times ``bias_sign``."""
        if loss.clip_logit:
            dz_t = dz_t * loss.target_slope(cos_t, bias)
        return dz_t.sum().double()

    @staticmethod
    def target_grad(dz_t, cos_t, loss: BinaryLoss, co: BinaryCoefficients, bias: float) -> torch.Tensor:
        """dL/dz [P] of the targets -> the value their entries of u take (dL/dcos / alpha) [P]."""
        slope = loss.target_slope(cos_t, bias)
        return dz_t * co.r * slope / co.alpha


@dataclass
class BinaryPlan:
    """Everything the fused pass needs besides tensors that autograd must see."""

    loss: BinaryLoss
    batch_size: int  # GLOBAL batch size B normalising the loss
    chunk_size: int = 0  # 0 = auto
    optimizer: Optional[RowOptimizer | RowAdamW] = None  # in-pass update when set
    momentum: Optional[torch.Tensor] = None  # [n, D] per-row momentum / AdamW exp_avg (storage dtype)
    exp_avg_sq: Optional[torch.Tensor] = None  # [n, D] AdamW second moment (storage dtype)
    row_step: Optional[torch.Tensor] = None  # [n] int32 AdamW per-row step count
    master: Optional[torch.Tensor] = None  # [n, D] fp32 master rows (bf16 storage)
    index: Optional[torch.Tensor] = None  # [S] sorted shard rows used this step (sampling)
    col_weight: Optional[torch.Tensor] = None  # [S] 1 / inclusion probability of each used row
    do_update: bool = False  # run the in-pass update this call (training step with grad enabled)
    # GEMM operand dtype (the caller's autocast dtype, e.g. bf16): the three GEMMs take operands in it,
    # as a Linear under autocast would; the chunk math, gradients and update stay fp32. None = fp32.
    mm_dtype: Optional[torch.dtype] = None
    # the chunk's elementwise part: "eager" (BinaryStages.negatives_) or "triton" (one kernel,
    # fr_dist.heads.binary_triton; fp32 only, fp64 stays eager)
    kernel: str = "eager"
    update_ok: bool = True  # False: skip the in-pass update (non-finite inputs)


class _FusedBinary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_hat, weight, bias, target_col, plan: BinaryPlan):
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

        co = plan.loss.coefficients(b, plan.batch_size)
        z0_t = torch.full((), co.z0, dtype=cdt, device=dev)  # addcmul's input: a 0-dim tensor on x's device
        project, eps = plan.loss.project_rows, plan.loss.norm_eps

        csize = plan.chunk_size or auto_chunk_size(N, rows_total, D, torch.finfo(cdt).bits // 8, dev.type)
        csize = max(1, min(csize, max(rows_total, 1)))
        # the Triton kernel (fp32) does the elementwise part in one pass over the cosine buffer
        use_triton = plan.kernel == "triton" and cdt == torch.float32
        if use_triton:
            from fr_dist.heads import binary_triton  # imports triton: only when the kernel runs
        buf_q = torch.empty(N * csize, dtype=cdt, device=dev)
        buf_p = None if use_triton else torch.empty(N * csize, dtype=cdt, device=dev)
        buf_s = None if use_triton else torch.empty(N * csize, dtype=cdt, device=dev)
        tcol_buf = torch.empty(N, dtype=torch.int32, device=dev) if use_triton else None
        convert = W.dtype != cdt or plan.index is not None
        w_tmp = torch.empty(csize, D, dtype=cdt, device=dev) if convert and plan.master is None else None
        # differentiable normalisation: the chunk's unit rows beside its raw ones [csize, D]
        wh_tmp = None if project else torch.empty(csize, D, dtype=cdt, device=dev)
        g_tmp = None
        if need_grads and (fused or plan.index is not None):
            g_tmp = torch.empty(csize, D, dtype=cdt, device=dev)
        # per-row optimizer state [n, ...]; a chunk-sized compute-dtype copy where it is stored in
        # another dtype or gathered (sampling); integer state (step counts) stays integer
        states = []
        for name in plan.optimizer.state_fields() if fused else ():
            st = getattr(plan, name)
            if st is None:
                raise ValueError(f"the fused {type(plan.optimizer).__name__} update needs BinaryPlan.{name}")
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
        xh_a = xh * co.alpha if need_grads else None  # [N, D]: alpha folded into GEMM 2
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
                wc = src[lo:hi]  # a view: normalised (project_rows) and updated in place
            if project:
                wc.div_(torch.linalg.vector_norm(wc, dim=1, keepdim=True).clamp_min_(eps))
                wh = wc
            else:  # F.normalize(wc): the raw rows stay, their unit copy goes into the GEMMs
                nrm = torch.linalg.vector_norm(wc, dim=1, keepdim=True)  # [c, 1]
                den = nrm.clamp_min(eps)  # [c, 1]
                wh = torch.div(wc, den, out=wh_tmp[:c])  # [c, D]
            wc_mm = wh.to(mm) if mm is not None else wh  # [c, D] GEMM operand
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
                col_sp, col_q = binary_triton.negative_terms_(u, tcol, cw, co, grads=need_grads)  # [c], [c]
                loss_acc += co.w_neg * (col_sp.sum() if cw is None else col_sp @ cw).double()
                gb_acc += co.w_neg * (col_q.sum() if cw is None else col_q @ cw).double()
            else:
                p, s = buf_p[: N * c].view(N, c), buf_s[: N * c].view(N, c)
                loss_n, gb_n = BinaryStages.negatives_(u, p, s, (pr, pc), cw, co, z0_t, grads=need_grads)
                loss_acc += loss_n
                gb_acc += gb_n
            # ---- targets: the loss's full formula on [p] vectors
            if pr.numel():
                loss_t, dz_t = BinaryStages.targets(plan.loss.target_logit(cos_t, b), co.w_pos)
                loss_acc += loss_t
                gb_acc += BinaryStages.target_bias_grad(dz_t, cos_t, plan.loss, b)
            if not need_grads:
                continue  # evaluation: converted / gathered copies are not written back
            if pr.numel():
                val = BinaryStages.target_grad(dz_t, cos_t, plan.loss, co, b)  # [p]
                u[pr, pc] = val * cw[pc] if cw is not None else val
            # ---- GEMMs 2 and 3
            u_mm = u.to(mm) if mm is not None else u  # [N, c] GEMM operand
            if grad_x is not None:
                if mm is None:
                    grad_x.addmm_(u, wh)  # [N, D] += [N, c] @ [c, D]
                else:
                    grad_x.add_(torch.mm(u_mm, wc_mm))  # fp32 [N, D] += ([N, c] @ [c, D] in mm)
            if fused:
                g = g_tmp[:c]
                _mm_into(g, u_mm.t(), xh_a_mm)  # dL/dW_used [c, D]
                if not project:
                    _normalize_backward_(g, wh, nrm, den, eps)  # dL/dW_raw [c, D]
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
                gw = grad_w[lo:hi] if ridx is None else g_tmp[:c]  # [c, D]
                _mm_into(gw, u_mm.t(), xh_a_mm)  # dL/dW_used
                if not project:
                    _normalize_backward_(gw, wh, nrm, den, eps)  # dL/dW_raw
                if ridx is not None:
                    grad_w.index_put_((ridx,), gw)  # rows are unique
            # ---- write the chunk's rows back where they are not a view of the storage
            if not project and not (fused and plan.update_ok):
                continue  # differentiable normalisation: the raw rows did not change
            if plan.master is not None:
                if ridx is not None:
                    plan.master.index_put_((ridx,), wc)
                _write_rows(W, lo, hi, ridx, wc)
            elif wc.data_ptr() != W[lo:hi].data_ptr() or ridx is not None:
                _write_rows(W, lo, hi, ridx, wc)

        if grad_x is not None:
            grad_x.mul_(co.alpha)
        if plan.loss.bias_sign != 1.0:
            gb_acc = gb_acc * plan.loss.bias_sign  # sum dL/dz -> dL/db
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


def _normalize_backward_(
    g: torch.Tensor, wh: torch.Tensor, nrm: torch.Tensor, den: torch.Tensor, eps: float
) -> None:
    """F.normalize's backward in place: g = dL/dw_hat [c, D] -> dL/dw = (g - (g . w_hat) w_hat) / den for
    w_hat [c, D], the rows' norms nrm [c, 1] and den = max(nrm, eps) [c, 1] (below eps: g / eps)."""
    dot = torch.bmm(g.unsqueeze(1), wh.unsqueeze(2)).reshape(-1, 1)  # [c, 1]: g . w_hat per row
    dot.mul_(nrm >= eps)  # clamp_min passes the norm's gradient where nrm >= eps
    g.addcmul_(wh, dot, value=-1.0).div_(den)


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


def binary_partial_loss(
    x_hat: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target_col: torch.Tensor,
    plan: BinaryPlan,
) -> torch.Tensor:
    """This shard's share of a binary loss, fused over class chunks (no collectives).

    x_hat [N, D] unit embeddings (differentiable), weight [n, D] the shard (rows re-normalised /
    updated in place), bias [1], target_col [N] in [-1, n) (or [-1, S) into ``plan.index``).
    """
    with torch.autocast(x_hat.device.type, enabled=False):
        return _FusedBinary.apply(x_hat, weight, bias, target_col, plan)
