"""Memory per GPU at the step's peak (busiest rank) and the largest K that fits.

N = W * B gathered rows, n = local classes (rank 0 owns ``ceil(K / W)``, fr_dist.sharding), S = active
classes = int(rate * n) or n, c = chunk:

* SphereFace2, fused chunked head (fr_dist): proxies n*D*p (p = proxy dtype bytes); SGD momentum n*D*p
  (AdamW: 2*n*D*p); optional fp32 master n*D*4; proxy gradient 0 with the fused update, else n*D*p; logit
  block = chunk temporaries only: SF2_LOGIT_BUFFERS fp32 [N, c] (SF2_LOGIT_BUFFERS_TRITON with the chunk's
  Triton kernel, the default on GPU profiles) plus SF2_CHUNK_ROWS fp32 [c, D]; c = the chunk the head picks.
* Partial FC, ``pfc_impl="v2"`` (insightface PartialFC_V2): fp32 proxies and
  momentum, a dense fp32 [n, D] proxy gradient (``weight[index]``'s backward), per active class the sampled
  copy / normalised copy / casts / their gradients (PFC_V2_ROWS_SAMPLED or _FULL [S, D] fp32 rows) and
  PFC_V2_LOGIT_BUFFERS fp32-equivalent [N, S] buffers live at the peak (fp16 logits, the fp32 copy, the
  clamp input autograd keeps, the scaled logits that become the softmax, the gradient).
* ``pfc_impl="v1"`` (insightface arcface_torch 2021 memory bank): proxies + momentum, per active class a
  sub-weight Parameter copy and its momentum copy, an [S, D] gradient (no dense one), fp32 logits with
  the in-place ArcFace margin (autograd keeps clones) -- PFC_V1_LOGIT_BUFFERS.
* ``pfc_impl="fr_dist"`` (fr_dist's softmax head, every softmax-family loss; the planner's choice for a
  training recipe): fp32 proxies, momentum and dense gradient, one [N, S] block turned into dL/dlogits in
  place (PFC_FRDIST_LOGIT_BUFFERS) and, when sampling, the [S, D] gathered rows and their gradient; with
  ``softmax_chunk`` c > 0 (the chunked online softmax) the block is PFC_FRDIST_CHUNK_BUFFERS fp32 [N, c]
  + PFC_FRDIST_CHUNK_ROW_BYTES per active class instead. A loss with the negatives stage (CurricularFace)
  adds PFC_NEGATIVES_CHUNK_BUFFERS [N, c] / PFC_NEGATIVES_DENSE_BUFFERS [N, S] (its value, slope, mask).
* ``loss_extras`` (:func:`fr_dist.plan.losses.loss_extra_bytes`): what the loss adds to its family's model,
  its replicated state buffers, the [N] norm vector of a norm-aware loss (AdaFace, MagFace) and one [N]
  buffer per extra all-reduce (CurricularFace): bytes, 0 for SphereFace2 / Partial FC.
* Both: gathered embeddings and their gradient, all-gather / reduce-scatter buffers, backbone fp32
  params + grads + optimizer state + DDP bucket copy, activations (measured bytes/image, halved under
  fp16/bf16 autocast), and a constant framework overhead per hardware profile (CUDA context, cuBLAS /
  cuDNN workspaces, allocator slack; stated in the profile).
"""

from __future__ import annotations

import dataclasses

from fr_dist.heads.binary import auto_chunk_size
from fr_dist.plan.backbones import backbone_info
from fr_dist.plan.config import DTYPE_BYTES, PlanConfig
from fr_dist.plan.hardware import Hardware
from fr_dist.plan.losses import loss_extra_bytes, modulated_negatives

__all__ = [
    "SF2_LOGIT_BUFFERS",
    "SF2_LOGIT_BUFFERS_TRITON",
    "SF2_CHUNK_ROWS",
    "shard_sizes",
    "activation_bytes",
    "sf2_chunk",
    "softmax_chunk",
    "sf2_triton",
    "memory_breakdown",
    "max_identities",
]

# fr_dist fused SphereFace2 chunk: cosines, dL/dcos and two elementwise temporaries, fp32 [N, c].
SF2_LOGIT_BUFFERS = 4.0
# ... with the Triton kernel: the cosine block, turned into dL/dz in place, and under autocast its 16-bit
# copy and the 16-bit GEMM output (0.5 + 0.5).
SF2_LOGIT_BUFFERS_TRITON = 2.0
# fr_dist fused SphereFace2 chunk: the chunk's proxies upcast to fp32, normalised, and their gradient [c, D].
SF2_CHUNK_ROWS = 3.0
# insightface PartialFC_V2 (fp16 autocast): fp16 logits (0.5) + fp32 copy (1) + clamp input kept by autograd
# (1) + scaled logits -> softmax in place (1) + gradient (1); 4.5 fp32-equivalents of [N, S]. Measured 4.50
# on CPU with an op-for-op re-run (bf16 autocast) by tracking live malloc bytes after every aten op.
PFC_V2_LOGIT_BUFFERS = 4.5
# fr_dist's fused PartialFCHead (heads/softmax.py _FusedMarginSoftmax, chunk_size None): the [N, S] block is
# made once and turned into dL/dlogits in place; row norms are folded into the columns (no normalised copy).
PFC_FRDIST_LOGIT_BUFFERS = 1.0
# ... chunked (chunk_size c): the backward's recomputed cosines [N, c] and their scaled copy (turned into
# dL/dlogits in place), and the next chunk's cosines made while the last chunk's copy is still bound: 3 fp32
# [N, c]; plus, per active class, the inverse row norm (fp32) and its mask (bool), [S] each, which beside
# a small block are no longer negligible. Measured (benchmarks/classifier.py, N = 64, c = 8192, K = 10^5
# and 10^6 on 1 rank): 7.1 and 11.4 MiB for Partial FC / MagFace: 3 blocks + 5 bytes per class + the
# embedding buffers.
PFC_FRDIST_CHUNK_BUFFERS = 3.0
PFC_FRDIST_CHUNK_ROW_BYTES = 5
# ... a loss with the negatives stage (``all_targets``: CurricularFace): the modulated value and its slope
# [N, c] fp32, a temporary of torch.where and the bool mask (0.25): measured 13.5 / 17.8 MiB at the
# points above, 3.2 blocks more (and the same at W = 2, N = 128).
PFC_NEGATIVES_CHUNK_BUFFERS = 3.25
# ... on the dense path: the [N, S] bool mask of the hard negatives (0.25 of an fp32 block); measured at
# W = 2 (CurricularFace 31.4 / 308.2 MiB against Partial FC's 25.5 / 246.9 at K = 10^5 / 10^6), not seen
# at W = 1 (the peak there falls before the mask is made): counted, an upper bound.
PFC_NEGATIVES_DENSE_BUFFERS = 0.25
# its [S, D] rows: the sampled copy weight[index] and its [S, D] gradient (rate < 1 only; at rate 1 the
# gradient is the dense proxy gradient itself).
PFC_FRDIST_ROWS_SAMPLED = 2.0
# [S, D] fp32 rows per active class, v2: sampled copy weight[index] (1, only when rate < 1) + normalised copy
# (1) + autocast fp16 copy (0.5) + its fp16 gradient (0.5) + fp32 gradient (1) + normalise-backward temp (1).
PFC_V2_ROWS_FULL = 4.0
PFC_V2_ROWS_SAMPLED = 5.0
# insightface 2021 (v1) ArcFace, fp32: logits modified in place (1) + acos_ clone autograd keeps (1) +
# softmax/gradient (1) + the flowing gradient (1) + acos backward temporaries (-x, x*x, +1, rsqrt, neg,
# product: up to 6 at once with C++ expression temporaries) -> ~10; measured 9.4 (rate 1) to 12.0
# (rate 0.1) with the same live-bytes tracker. CosFace measures 8.0.
PFC_V1_LOGIT_BUFFERS = 10.0
# v1 [S, D] rows per active class: sub-weight copy + momentum copy (rate < 1 only) + normalised copy +
# [S, D] gradient + normalised gradient + normalise-backward temp.
PFC_V1_ROWS_FULL = 4.0
PFC_V1_ROWS_SAMPLED = 6.0
# Gathered embeddings: x [N, D], normalised x, dL/dx accumulator [N, D] (fp32); + packed all-gather buffer
# [N, D+1] and the reduce-scatter output [B, D] counted under communication buffers.
EMBED_BUFFERS = 3.0


def shard_sizes(cfg: PlanConfig) -> tuple[int, int, int]:
    """(n, S, N): the busiest rank's classes, its active classes, the gathered rows."""
    n = -(-cfg.identities // cfg.world)  # rank 0 of fr_dist.sharding.class_range owns ceil(K / W)
    S = n if cfg.sample_rate >= 1.0 else max(1, int(cfg.sample_rate * n))  # SphereFace2: sampled compute
    return n, S, cfg.world * cfg.batch


def activation_bytes(cfg: PlanConfig) -> int:
    per = backbone_info(cfg.backbone, cfg.dim)["act_bytes"]
    return int(per * cfg.batch * (0.5 if cfg.amp in ("fp16", "bf16") else 1.0))


def sf2_chunk(cfg: PlanConfig, hw: Hardware, cols: int) -> int:
    """SphereFace2 classes per chunk over ``cols`` classes: the configured size, or (0) the one the head
    picks on the profile's device (fr_dist.heads.binary.auto_chunk_size)."""
    if cfg.chunk_size:
        return max(1, min(cfg.chunk_size, cols))

    return auto_chunk_size(cfg.world * cfg.batch, max(cols, 1), cfg.dim, 4, hw.device)


def softmax_chunk(cfg: PlanConfig) -> int:
    """Columns per chunk of fr_dist's chunked online softmax over the S active classes, or 0 when the
    block is materialised (``softmax_chunk`` 0, a binary loss, or insightface's v1 / v2 heads)."""
    if cfg.binary or cfg.pfc_impl != "fr_dist" or not cfg.softmax_chunk:
        return 0
    _, S, _ = shard_sizes(cfg)
    return max(1, min(cfg.softmax_chunk, S))


def sf2_triton(cfg: PlanConfig, hw: Hardware) -> bool:
    """Does the SphereFace2 chunk run its Triton kernel (fr_dist's kernel=auto: on CUDA)?"""
    return cfg.sf2_kernel == "triton" or (cfg.sf2_kernel == "auto" and hw.device == "cuda")


def memory_breakdown(cfg: PlanConfig, hw: Hardware) -> dict:
    """Bytes per GPU by item, with ``total``, at the step's peak (head forward-backward over live
    backbone activations)."""
    cfg.validate()
    n, S, N = shard_sizes(cfg)
    D = cfg.dim
    f4 = 4
    m: dict[str, int] = {}
    if cfg.binary:
        p = DTYPE_BYTES[cfg.proxy_dtype]
        c = sf2_chunk(cfg, hw, n)
        m["proxies"] = n * D * p
        m["optimizer_state"] = n * D * p * (2 if cfg.optimizer == "adamw" else 1)
        if cfg.optimizer == "adamw" and cfg.fused_update:
            m["optimizer_state"] += n * 4  # the fused AdamW's per-row step count, int32 [n]
        m["fp32_master"] = n * D * f4 if cfg.fp32_master and p < 4 else 0
        m["proxy_grad"] = 0 if cfg.fused_update else n * D * p
        m["sampled_copies"] = 0
        bufs = SF2_LOGIT_BUFFERS_TRITON if sf2_triton(cfg, hw) else SF2_LOGIT_BUFFERS
        m["logit_block"] = int(c * (bufs * N * f4 + SF2_CHUNK_ROWS * D * f4))
    else:
        m["proxies"] = n * D * f4
        m["optimizer_state"] = n * D * f4 * (2 if cfg.optimizer == "adamw" else 1)
        m["fp32_master"] = 0
        sampled = S < n
        if cfg.pfc_impl == "v1":
            m["proxy_grad"] = S * D * f4  # grad of the sub-weight Parameter only
            rows = PFC_V1_ROWS_SAMPLED if sampled else PFC_V1_ROWS_FULL
            logit = PFC_V1_LOGIT_BUFFERS
            rows -= 1  # the [S, D] gradient is counted above
        else:
            m["proxy_grad"] = n * D * f4  # dense [n, D] gradient
            rows = PFC_V2_ROWS_SAMPLED if sampled else PFC_V2_ROWS_FULL
            if not (cfg.head_amp and cfg.amp != "none"):
                rows -= 1  # no fp16 copy of the normalised rows and no fp16 gradient (0.5 + 0.5)
            if cfg.pfc_impl == "fr_dist":
                rows = PFC_FRDIST_ROWS_SAMPLED if sampled else 0.0
            logit = PFC_V2_LOGIT_BUFFERS if cfg.pfc_impl == "v2" else PFC_FRDIST_LOGIT_BUFFERS
        m["sampled_copies"] = int(S * D * f4 * rows)
        c = softmax_chunk(cfg)
        if c:
            bufs = PFC_FRDIST_CHUNK_BUFFERS + (
                PFC_NEGATIVES_CHUNK_BUFFERS if modulated_negatives(cfg.head) else 0
            )
            m["logit_block"] = int(c * N * f4 * bufs + S * PFC_FRDIST_CHUNK_ROW_BYTES)
        else:
            if cfg.pfc_impl == "fr_dist" and modulated_negatives(cfg.head):
                logit += PFC_NEGATIVES_DENSE_BUFFERS
            m["logit_block"] = int(S * N * f4 * logit)
    m["loss_extras"] = loss_extra_bytes(cfg.head, N)
    m["embeddings"] = int(EMBED_BUFFERS * N * D * f4)
    info = backbone_info(cfg.backbone, D)
    P = info["params"]
    m["backbone_params"] = P * f4
    m["backbone_grads"] = P * f4
    m["backbone_optimizer"] = P * f4 * (2 if cfg.optimizer == "adamw" else 1)
    m["activations"] = activation_bytes(cfg)
    m["comm_buffers"] = N * (D + 1) * f4 + cfg.batch * D * f4 + (P * f4 if cfg.ddp_bucket_copy and P else 0)
    m["framework_overhead"] = hw.overhead_bytes
    m["total"] = sum(m.values())
    return m


def max_identities(cfg: PlanConfig, hw: Hardware) -> int:
    """Largest K whose memory fits ``hw.memory_bytes`` with everything else fixed (bisection; 0 if none)."""

    def fits(k: int) -> bool:
        return memory_breakdown(dataclasses.replace(cfg, identities=k), hw)["total"] <= hw.memory_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 10**15:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
