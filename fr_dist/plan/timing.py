"""Step time (busiest rank): terms summed, no overlap assumed.

* classifier GEMMs 6 N S D FLOPs / (peak x efficiency); backbone 3 x forward FLOPs / (peak x efficiency);
* row traffic: passes over the shard's rows outside the GEMMs (norms, gradient, optimizer: OPT_PASSES,
  PFC_ROW_PASSES, ...) in bytes / stream bandwidth; the fused SphereFace2 update's row ops on the chunk
  (CPU; at the cached rate when the chunk's [c, D] rows fit ``cache_bytes``);
* logit elementwise: the ops per element of the [N, S] block, counted from the implementations
  (SF2_LOGIT_OPS, PFC_LOGIT_OPS): one HBM read + write each on a GPU; on a CPU simple ops and each
  transcendental function at their measured rates;
* fresh allocation (CPU): arrays >= 32 MiB made every step are mapped afresh by glibc (page faults,
  zeroing, munmap), at the measured rate; GPUs' caching allocator makes this 0;
* op overhead: eager ops per step x dispatch / launch cost (the chunk loop's ops scale with S / chunk);
* communication: ring-collective bytes / bus bandwidth (nccl-tests "busbw" convention) + latency per call,
  over the head's collectives (:func:`fr_dist.plan.losses.step_collectives`: the family's and the loss's
  ``extra_collectives``) and the backbone's DDP gradient buckets; ``softmax_allreduce`` is the share of the
  [N]-length all-reduces alone (the softmax family's 3 + the loss's extras; 0 for a binary loss).
"""

from __future__ import annotations

import dataclasses
import math

from fr_dist.plan.backbones import backbone_info
from fr_dist.plan.config import DTYPE_BYTES, PlanConfig
from fr_dist.plan.hardware import Hardware, MiB
from fr_dist.plan.losses import step_collectives
from fr_dist.plan.memory import sf2_chunk, sf2_triton, shard_sizes, softmax_chunk

__all__ = ["SAMPLER_BYTES_PER_CLASS", "step_allocations", "step_time", "softmax_share_point"]


def _busbw(cfg: PlanConfig, hw: Hardware) -> float:
    return (hw.inter_busbw_gbps if cfg.nodes > 1 else hw.intra_busbw_gbps) * 1e9


def _latency(cfg: PlanConfig, hw: Hardware) -> float:
    if cfg.world == 1:
        return 0.0
    levels = math.ceil(math.log2(cfg.nodes)) if cfg.nodes > 1 else 0
    return hw.intra_latency_s + levels * hw.inter_latency_s


def _head_dtype(cfg: PlanConfig) -> str:
    if cfg.head_compute != "auto":
        return cfg.head_compute
    if not cfg.head_amp or cfg.amp == "none":
        return "fp32"
    return "bf16" if cfg.binary else cfg.amp


# Work outside the GEMMs, counted from the implementations (per step, busiest rank). Row passes are reads
# or writes of one [rows, D] array in storage dtype; logit ops are elementwise ops over one element of the
# [N, S] block ("simple": arithmetic, compare, reduction; the rest by name).
#
# torch.optim single-tensor steps (the CPU default; foreach on CUDA moves the same bytes): SGD momentum
# buf.mul_ (r+w), buf.add_(g) (2r+w), p.add_(buf) (2r+w) = 8; AdamW p.mul_ (2), exp_avg.lerp_ (3),
# exp_avg_sq.mul_.addcmul_ (5), denom = sqrt / c + eps (6, two fresh arrays), p.addcdiv_ (4) = 20.
OPT_PASSES = {"sgd": 8, "adamw": 20}
OPT_FRESH_ROWS = {"sgd": 0, "adamw": 2}
# fr_dist.heads.binary per chunk (margin C, t = 3, grad detached): u + 1, u^(t-1) (a square), addcmul
# -> z, sum of softplus, sum of Q; softplus(z), sigmoid(z). Target entries (<= N per step) are not counted.
SF2_LOGIT_OPS = {"simple": 5, "softplus": 1, "sigmoid": 1}
# ... and the torch ops it dispatches per chunk (norm, div, mm, indexing of the targets, pow, addcmul,
# softplus, sums, sigmoid, the two gradient GEMMs, the fused update's 3-4 ops): about 30.
SF2_OPS_PER_CHUNK = 30
# with the Triton kernel (fr_dist.heads.binary_triton) the elementwise part is one read + write of the block
# and one launch instead of ~8 ops
SF2_LOGIT_OPS_TRITON = {"simple": 1}
SF2_OPS_PER_CHUNK_TRITON = 23
# fr_dist.heads.softmax._FusedMarginSoftmax (chunk None): * inv_norm, amax, amin, * s, amax, - max, sum,
# * row scale, * column scale, cos * g, sum over rows; exp. insightface PartialFC_V2 + DistCrossEntropy
# (autocast): cast, clamp, * s, max, - max, sum, / sum, / N, * grad, and the backward of * s, clamp (2),
# cast; exp. V1 the same without the two casts.
PFC_LOGIT_OPS = {
    "fr_dist": {"simple": 11, "exp": 1},
    "v2": {"simple": 13, "exp": 1},
    "v1": {"simple": 11, "exp": 1},
}
# fr_dist's chunked online softmax (chunk_size c): forward * inv_norm, amax, amin, * s, amax, - max, sum;
# exp; backward (the chunk recomputed) * inv_norm, amax, amin, * s (a copy), - max, * row scale, * column
# scale, cos * g, sum over rows; exp.
PFC_CHUNKED_LOGIT_OPS = {"simple": 16, "exp": 2}
PFC_OPS_PER_STEP = 60  # sampler, gather, norms, the fused softmax, its backward, the update: ~60 ops
# ... chunked: per chunk, forward ~12 ops (GEMM, clip check, target gather, max / exp / sum) and backward
# ~16 (GEMM, clip check, exp, gradient scaling, the two gradient GEMMs, radial term)
PFC_OPS_PER_CHUNK = 28
# Row passes besides the optimizer (per n rows of the shard / per S sampled rows), fp32 for Partial FC:
# SphereFace2 unfused: norm read, in-place divide (2), gradient written = 4 over n.
# SphereFace2 fused: each row is read once and written once (the chunk stays in cache between the norm,
# the three GEMMs and the update) and each optimizer state row likewise: 2 + 2 x states over S.
# fr_dist Partial FC, rate 1: norm read, gradient written by the GEMM, radial addcmul_ (3) = 5 over n.
#   rate < 1: the dense gradient's zero fill (1) over n; gather weight[index] (2), norm (1), [S, D] gradient
#   (1), radial addcmul_ (3), index_put_ accumulate into the dense gradient (3) = 10 over S.
# insightface v2: F.normalize (3) + its backward (5) + gradient (1) over the active rows; the dense
# gradient's zero fill over n when sampling, and the gather (2) + index_put_ (3). v1: the memory bank's
# gather of weight and momentum (4) and write-back (4) over S, normalise (3 + 5) + gradient (1).
PFC_ROW_PASSES = {  # impl: (passes over n, passes over S) at rate < 1; rate 1 uses the "full" entry
    "fr_dist": (1, 10),
    "v2": (1, 14),
    "v1": (0, 17),
}
PFC_ROW_PASSES_FULL = {"fr_dist": 5, "v2": 9, "v1": 9}
# The fused SphereFace2 update works on the chunk's rows while they sit in cache: its elementwise ops over
# each used row element are compute, not memory traffic (CPU rate; on GPUs they hide under the row
# passes): norm, divide, and the update (SGD momentum buf.mul_, buf.add_, w.add_; AdamW ~8); for a
# storage dtype other than fp32 the conversions of the row and of each state row in and out are counted
# at the conversion rate (bf16 <-> fp32 has no vector instruction on CPUs without AVX512-BF16).
SF2_FUSED_ROW_OPS = {"sgd": 2 + 3, "adamw": 2 + 8}
# Negative sampling (both heads): uniform keys for the shard's n classes and a top-k of them each step;
# on a GPU about two read + write passes over n fp32 keys (radix select).
SAMPLER_BYTES_PER_CLASS = 16


def _elementwise_seconds(ops: dict, elements: float, hw: Hardware, cached: bool = False) -> float:
    """Time of ``ops`` (name -> count per element) over ``elements`` (``cached``: a block that stays in
    cache, as the SphereFace2 chunk does): CPU rates when the profile has them, else one HBM read + write
    pass (8 bytes per fp32 element) per op."""
    stream = hw.hbm_gbps * 1e9 * hw.elementwise_efficiency
    simple = (hw.cached_elementwise_gelems if cached else None) or hw.elementwise_gelems
    t = 0.0
    for name, count in ops.items():
        if name == "simple" and simple:
            t += count * elements / (simple * 1e9)
        elif name != "simple" and hw.transcendental_gelems and name in hw.transcendental_gelems:
            t += count * elements / (hw.transcendental_gelems[name] * 1e9)
        else:
            t += count * elements * 8 / stream
    return t


def step_allocations(cfg: PlanConfig) -> list[int]:
    """Bytes of the arrays a step allocates afresh (the optimizer's gradient is freed by zero_grad)."""
    n, S, N = shard_sizes(cfg)
    D, f4 = cfg.dim, 4
    extra = [n * D * (DTYPE_BYTES[cfg.proxy_dtype] if cfg.binary else f4)] * OPT_FRESH_ROWS[cfg.optimizer]
    if cfg.binary:
        if cfg.fused_update:
            return []  # chunk-sized buffers only; the update runs inside the pass
        grads = [n * D * f4] + ([n * D * DTYPE_BYTES[cfg.proxy_dtype]] if cfg.proxy_dtype != "fp32" else [])
        return grads + extra
    sampled = S < n
    # the [n, D] gradient (dense: zeros + index_put_ when sampling, the GEMM's output at rate 1), the
    # cosine block and its scaled copy [N, S] (chunked: [N, c] blocks only); when sampling, the [S, D]
    # gather and its gradient
    out = [n * D * f4] + ([] if softmax_chunk(cfg) else [N * S * f4, N * S * f4])
    if sampled:
        out += [S * D * f4, S * D * f4]
    return out + extra


def step_time(cfg: PlanConfig, hw: Hardware) -> dict:
    """Seconds per step by item, with ``total`` and the softmax all-reduces' own share."""
    cfg.validate()
    n, S, N = shard_sizes(cfg)
    D, W = cfg.dim, cfg.world
    t: dict[str, float] = {}
    # classifier GEMMs: cos = x W^T, dx = g W, dW = g^T x  -> 3 x 2 N S D (the chunked softmax recomputes
    # cos in the backward: 4 x 2 N S D)
    sc = softmax_chunk(cfg)
    flops = (8.0 if sc else 6.0) * N * S * D
    t["classifier_compute"] = flops / (hw.tflops[_head_dtype(cfg)] * 1e12 * hw.gemm_efficiency)
    # row traffic: proxies, optimizer state and gradients, outside the GEMMs (tables above)
    stream = hw.hbm_gbps * 1e9 * hw.elementwise_efficiency
    opt = OPT_PASSES[cfg.optimizer]
    gathered, row_ops, conversions = False, 0, 0  # the fused SphereFace2 update's, set below
    c = sf2_chunk(cfg, hw, S) if cfg.binary else S  # classes per chunk
    if cfg.binary:
        p = DTYPE_BYTES[cfg.proxy_dtype]
        states = 2 if cfg.optimizer == "adamw" else 1
        if cfg.fused_update:
            # each used row and state row read and written once; sampled rows are gathered (index_select)
            # and scattered back (index_put_); 16-bit rows are converted to fp32 and back
            row_bytes = S * D * p * (2 + 2 * states)
            gathered = S < n
            row_ops = SF2_FUSED_ROW_OPS[cfg.optimizer]
            conversions = 2 * (1 + states) if p != 4 else 0
        else:
            row_bytes = n * D * p * (4 + opt)
        triton = sf2_triton(cfg, hw)
        logit_ops = SF2_LOGIT_OPS_TRITON if triton else SF2_LOGIT_OPS
        per_chunk = SF2_OPS_PER_CHUNK_TRITON if triton else SF2_OPS_PER_CHUNK
        ops = per_chunk * math.ceil(S / c)
    else:
        if S < n:
            over_n, over_s = PFC_ROW_PASSES[cfg.pfc_impl]
            row_bytes = n * D * 4 * (over_n + opt) + S * D * 4 * over_s
            if cfg.pfc_impl == "v1":  # the memory bank's optimizer runs on the S sub-weight rows only
                row_bytes = S * D * 4 * (over_s + opt)
        else:
            row_bytes = n * D * 4 * (PFC_ROW_PASSES_FULL[cfg.pfc_impl] + opt)
        logit_ops = PFC_CHUNKED_LOGIT_OPS if sc else PFC_LOGIT_OPS[cfg.pfc_impl]
        ops = PFC_OPS_PER_STEP + (PFC_OPS_PER_CHUNK * math.ceil(S / sc) if sc else 0)
    gather = hw.gather_gbps * 1e9 if hw.gather_gbps else stream
    t["row_traffic"] = row_bytes / (gather if gathered else stream)
    # the SphereFace2 chunk's rows [c, D] and its [N, c] temporaries stay in cache when they fit
    rows_cached = c * D * 4 <= hw.cache_bytes
    block_cached = (cfg.binary and N * c * 4 <= hw.cache_bytes) or (sc and N * sc * 4 <= hw.cache_bytes)
    in_pass = cfg.binary and cfg.fused_update and hw.elementwise_gelems
    t["row_elementwise"] = 0.0
    if in_pass:
        t["row_elementwise"] = _elementwise_seconds({"simple": row_ops}, S * D, hw, cached=rows_cached)
        if hw.convert_gelems:
            t["row_elementwise"] += conversions * S * D / (hw.convert_gelems * 1e9)
        else:
            t["row_elementwise"] += _elementwise_seconds(
                {"simple": conversions}, S * D, hw, cached=rows_cached
            )
    sampler = hw.sampler_gelems * 1e9 if hw.sampler_gelems else stream / SAMPLER_BYTES_PER_CLASS
    t["sampling"] = n / sampler if S < n else 0.0
    t["logit_elementwise"] = _elementwise_seconds(logit_ops, N * S, hw, cached=block_cached)
    fresh = sum(b for b in step_allocations(cfg) if b >= hw.fresh_alloc_min_bytes)
    t["fresh_allocation"] = fresh / (hw.fresh_alloc_gbps * 1e9) if hw.fresh_alloc_gbps else 0.0
    t["op_overhead"] = ops * hw.op_overhead_s
    # communication: the head's collectives (all-gather [N, D+1], reduce-scatter [N, D], the family's and
    # the loss's all-reduces) and the backbone's gradient all-reduce. Ring wire bytes per rank: (W-1)/W of
    # the buffer for a gather / scatter, twice that for an all-reduce.
    bw = _busbw(cfg, hw)
    ring = (W - 1) / W if W > 1 else 0.0
    P = backbone_info(cfg.backbone, D)["params"]
    colls = step_collectives(cfg.head, N, D)
    wire = {id(c): c["bytes"] * ring * (2 if c["kind"] == "all_reduce" else 1) for c in colls}
    vectors = [c for c in colls if c["per_sample"]]  # the [N]-length all-reduces
    head_bytes = sum(wire.values())
    t["comm_bandwidth"] = (head_bytes + P * 4 * 2 * ring) / bw if W > 1 else 0.0
    lat = _latency(cfg, hw)
    buckets = math.ceil(P * 4 / (25 * MiB)) if P else 0  # DDP's 25 MiB buckets
    t["comm_latency"] = (len(colls) + buckets) * lat
    info = backbone_info(cfg.backbone, D)
    bdt = "fp32" if cfg.amp == "none" else cfg.amp
    t["backbone_compute"] = 3.0 * info["fwd_flops"] * cfg.batch / (hw.tflops[bdt] * 1e12 * hw.conv_efficiency)
    t["total"] = sum(t.values())
    vector_bytes = sum(wire[id(c)] for c in vectors)
    t["softmax_allreduce"] = len(vectors) * lat + (vector_bytes / bw if W > 1 else 0.0)
    return t


def softmax_share_point(cfg: PlanConfig, hw: Hardware, threshold: float = 0.05) -> dict:
    """Where a softmax-family head's [N] all-reduces (the family's three + its loss's extras) exceed
    ``threshold`` of the step: the smallest node count (W = gpus_per_node x nodes) at this K, and the
    largest K at this W (the share falls as K grows). The head is ``cfg.head`` when its loss is of the
    softmax family, else Partial FC. ``head_only`` repeats it for the classifier step alone
    (benchmarks/classifier.py's step); ``head`` names the head."""
    head = "partial_fc" if cfg.binary else cfg.head
    out = _share_point(dataclasses.replace(cfg, head=head), hw, threshold)
    out["head_only"] = _share_point(dataclasses.replace(cfg, head=head, backbone="none"), hw, threshold)
    out["head"] = head
    return out


def _share_point(pfc: PlanConfig, hw: Hardware, threshold: float) -> dict:

    def share(c: PlanConfig) -> float:
        s = step_time(c, hw)
        return s["softmax_allreduce"] / s["total"]

    nodes_point = None
    for k in range(0, 21):
        c = dataclasses.replace(pfc, nodes=2**k)
        if share(c) > threshold:
            nodes_point = c.world
            break
    k_point = None
    if share(dataclasses.replace(pfc, identities=max(pfc.world, 1))) > threshold:
        lo, hi = max(pfc.world, 1), 10**13
        while hi - lo > max(1, lo // 1000):
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if share(dataclasses.replace(pfc, identities=mid)) > threshold else (lo, mid)
        k_point = lo
    return dict(
        threshold=threshold,
        share_here=share(pfc),
        world_size_above=nodes_point,
        identities_below=k_point,
    )
