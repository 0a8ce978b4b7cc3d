"""Triton kernel for the elementwise part of the binary family's fused chunk (one pass instead of ~8 ops).

After GEMM 1 the chunk's cosines ``u`` [N, c] go through, per element (its eager twin,
:meth:`fr_dist.heads.binary.BinaryStages.negatives_`, does it with ~8 torch ops and three [N, c] buffers);
the scalars and the constexpr flags are the loss's :class:`~fr_dist.heads.binary.BinaryCoefficients`
(``clip`` is its margin's: SphereFace2's A / M clip, C does not; CLIP = 2 is ``clip_logit``, UniFace's
clamp of the logit, bias included)::

    v  = clip(u + 1)                          (a clipping margin: OpenSphere's arccos / cos round trip)
    p  = v^(t-1)
    z  = z0 + k_z * v * p                      the negative logit, closed form
    softplus(z), sigmoid(z)                    one exp shared by both
    column sums of softplus and sigmoid        (target entries, at most one per row, excluded; with
                                               CLIP = 2 the sigmoid's clipped entries too: dL/db)
    u <- sigmoid(z) [* p * inside(v)] [* col_weight]   dL/dz / w_neg, what GEMMs 2 and 3 read

One program owns BLOCK_C columns and walks all N rows (no atomics): the column sums, and so the
loss, are deterministic. fp32 only; the caller keeps the eager path for fp64 and where Triton is
absent. On CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``), which is how
the tests check it against the eager path before any GPU runs it.
"""

from __future__ import annotations

import functools
import os

import torch

from fr_dist.heads.binary import BinaryCoefficients

# Triton at module level: a compiled kernel resolves names such as ``tl`` from its module's globals (Triton
# before mid-2025 could not see closure variables: pytorch#132534, "NameError: tl is not defined"), and the
# interpreter runs the kernel as plain Python, so only a module-level import is right for both.
try:
    import triton
    import triton.language as tl
except ImportError:  # optional extra: the caller keeps the eager path
    triton = tl = None

__all__ = ["available", "binary_negatives", "negative_terms_"]

BLOCK_N, BLOCK_C = 32, 64


def available(device: torch.device) -> bool:
    """Triton importable and able to run on ``device`` (a CUDA device, or the CPU interpreter)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return triton is not None


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel, built on first use per mode: ``triton.jit`` reads TRITON_INTERPRET when it
    decorates, so a kernel built for one mode (compiled / interpreted) is never called in the other."""
    if triton is None:
        raise ImportError(
            "the binary loss Triton kernel needs the triton package (pip install fr_dist[triton])"
        )
    return triton.jit(binary_negatives)


def binary_negatives(
    u_ptr,
    tcol_ptr,
    cw_ptr,
    colsp_ptr,
    colq_ptr,
    N,
    C,
    stride_n,
    k_z,
    z0,
    tm1,
    lo_u,
    hi_u,
    CLIP: tl.constexpr,
    EXACT: tl.constexpr,
    HAS_CW: tl.constexpr,
    GRADS: tl.constexpr,
    POW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    cmask = cols < C
    if HAS_CW:
        cw = tl.load(cw_ptr + cols, mask=cmask, other=0.0)
    acc_sp = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_q = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        rmask = rows < N
        m = rmask[:, None] & cmask[None, :]  # [BLOCK_N, BLOCK_C]
        ptrs = u_ptr + rows[:, None] * stride_n + cols[None, :]
        v = tl.load(ptrs, mask=m, other=0.0) + 1.0
        if CLIP:
            v = tl.minimum(tl.maximum(v, lo_u), hi_u)
        if POW == 0:
            p = v * 0.0 + 1.0
        elif POW == 1:
            p = v
        elif POW == 2:
            p = v * v
        elif POW == 3:
            p = v * v * v
        else:
            p = tl.where(v > 0.0, tl.exp(tm1 * tl.log(tl.maximum(v, 1e-30))), 0.0)
        z = z0 + k_z * v * p
        e = tl.exp(-tl.abs(z))  # shared by softplus and sigmoid
        log1p_e = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
        sp = tl.where(z > 20.0, z, tl.maximum(z, 0.0) + log1p_e)  # torch's softplus, threshold 20
        q = tl.where(z >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))  # sigmoid(z)
        tcol = tl.load(tcol_ptr + rows, mask=rmask, other=-1)  # [BLOCK_N] target column or -1
        keep = m & (cols[None, :] != tcol[:, None])  # targets are not negatives
        sp = tl.where(keep, sp, 0.0)
        if CLIP == 2:  # the logit's clip (clip_logit): no gradient outside it, to the bias either
            q = tl.where(keep & (v > lo_u) & (v < hi_u), q, 0.0)
        else:
            q = tl.where(keep, q, 0.0)
        acc_sp += tl.sum(sp, axis=0)
        acc_q += tl.sum(q, axis=0)
        if GRADS:
            g = q
            if EXACT:
                g = g * p
                if CLIP == 1:  # (CLIP == 2: q is masked already)
                    g = tl.where((v > lo_u) & (v < hi_u), g, 0.0)
            if HAS_CW:
                g = g * cw[None, :]
            tl.store(ptrs, g, mask=m)
    tl.store(colsp_ptr + cols, acc_sp, mask=cmask)
    tl.store(colq_ptr + cols, acc_q, mask=cmask)


def negative_terms_(
    u: torch.Tensor,
    target_col: torch.Tensor,
    col_weight: torch.Tensor | None,
    co: BinaryCoefficients,
    *,
    grads: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place on the chunk's cosines ``u`` [N, c] (fp32, rows contiguous): with ``grads`` it becomes
    sigmoid(z) (times v^(t-1) and the inside-the-clip mask when ``co.exact``, times ``col_weight`` [c]),
    zero on the target entries ``target_col`` [N] (column in this chunk, -1 = none). Returns the
    column sums [c] of softplus(z) and of sigmoid(z) over the non-target entries."""
    if u.dtype != torch.float32 or u.dim() != 2 or u.stride(1) != 1:
        raise ValueError(f"u must be a row-contiguous fp32 [N, c] block, got {u.dtype} {tuple(u.stride())}")
    kern = _kernel(os.environ.get("TRITON_INTERPRET") == "1")
    N, C = u.shape
    colsp = torch.empty(C, dtype=torch.float32, device=u.device)  # [c]
    colq = torch.empty(C, dtype=torch.float32, device=u.device)  # [c]
    tm1 = float(co.t) - 1.0
    pw = int(tm1) if tm1.is_integer() and 0 <= tm1 <= 3 else -1
    cw = col_weight.to(torch.float32) if col_weight is not None else colsp  # a dummy pointer when absent
    kern[(triton.cdiv(C, BLOCK_C),)](
        u,
        target_col.to(torch.int32),
        cw,
        colsp,
        colq,
        N,
        C,
        u.stride(0),
        float(co.k_z),
        float(co.z0),
        tm1,
        float(co.lo_u),
        float(co.hi_u),
        CLIP=2 if co.clip_logit else bool(co.clip),
        EXACT=bool(co.exact),
        HAS_CW=col_weight is not None,
        GRADS=bool(grads),
        POW=pw,
        BLOCK_N=BLOCK_N,
        BLOCK_C=BLOCK_C,
    )
    return colsp, colq
