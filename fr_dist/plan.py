"""Cluster cost model for the class-sharded head: memory per GPU, largest K, step time (``fr-dist plan``).

Pure arithmetic (no torch.distributed; torch only for ``--measure`` and unknown backbones). Every figure
is bytes or seconds for the busiest rank (rank 0 owns ``ceil(K / W)`` classes, fr_dist.sharding).

    fr-dist plan --identities 100M --dim 512 --gpus-per-node 8 --nodes 1 --batch 128 --head sphereface2 \\
        --hardware h100-80gb --proxy-dtype bf16 --fused-update --sample-rate 1.0 --backbone iresnet50 --json

Memory model (N = W * B gathered rows, n = local classes, S = active classes = int(rate * n) or n, c = chunk):

* SphereFace2, fused chunked head (fr_dist): proxies n*D*p (p = proxy dtype bytes); SGD momentum n*D*p
  (AdamW: 2*n*D*p); optional fp32 master n*D*4; proxy gradient 0 with the fused update, else n*D*p; logit
  block = chunk temporaries only: SF2_LOGIT_BUFFERS fp32 [N, c] (SF2_LOGIT_BUFFERS_TRITON with the chunk's
  Triton kernel, the default on GPU profiles) plus SF2_CHUNK_ROWS fp32 [c, D]; c = the chunk the head picks.
* Partial FC, ``pfc_impl="v2"`` (insightface PartialFC_V2 and fr_dist's PartialFCHead): fp32 proxies and
  momentum, a dense fp32 [n, D] proxy gradient (``weight[index]``'s backward), per active class the sampled
  copy / normalised copy / casts / their gradients (PFC_V2_ROWS_SAMPLED or _FULL [S, D] fp32 rows) and
  PFC_V2_LOGIT_BUFFERS fp32-equivalent [N, S] buffers live at the peak (fp16 logits, the fp32 copy, the
  clamp input autograd keeps, the scaled logits that become the softmax, the gradient).
* ``pfc_impl="v1"`` (insightface arcface_torch 2021 memory bank): proxies + momentum, per active class a
  sub-weight Parameter copy and its momentum copy, an [S, D] gradient (no dense one), fp32 logits with
  the in-place ArcFace margin (autograd keeps clones) -- PFC_V1_LOGIT_BUFFERS.
* Both: gathered embeddings and their gradient, all-gather / reduce-scatter buffers, backbone fp32
  params + grads + optimizer state + DDP bucket copy, activations (measured bytes/image, halved under
  fp16/bf16 autocast), and a constant framework overhead per hardware profile (CUDA context, cuBLAS /
  cuDNN workspaces, allocator slack; stated in the profile).

Step time model (per step, busiest rank; terms summed, no overlap assumed):

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
* communication: ring-collective bytes / bus bandwidth (nccl-tests "busbw" convention) + latency per call.

Validated on this machine's CPU against benchmarks/classifier.py with rates measured in the same processes
(benchmarks/plan_vs_measured.py) and on GPU only against insightface's published V100 throughput, with one
fitted figure (``conv_efficiency``; benchmarks/plan_validation.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Hardware",
    "PlanConfig",
    "HARDWARE",
    "BACKBONES",
    "parse_count",
    "load_hardware",
    "memory_breakdown",
    "step_time",
    "max_identities",
    "plan",
    "softmax_share_point",
    "measure_cpu_profile",
    "add_plan_arguments",
    "run_plan_cli",
]

GiB = 1 << 30
MiB = 1 << 20
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# ---------------------------------------------------------------------------------------------------
# Hardware profiles. Figures are public datasheet / nccl-tests numbers, rounded; override any of them
# with a YAML file of the same field names (``--hardware my_cluster.yaml``).
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: int  # usable memory per GPU (as nvidia-smi reports the total)
    tflops: dict  # peak dense TFLOP/s per compute dtype: fp32 (no TF32), fp16, bf16
    hbm_gbps: float  # memory bandwidth, GB/s
    intra_busbw_gbps: float  # nccl-tests bus bandwidth inside a node (NVLink), GB/s
    inter_busbw_gbps: float  # nccl-tests bus bandwidth across nodes (InfiniBand), GB/s
    intra_latency_s: float  # small-message collective latency inside a node
    inter_latency_s: float  # extra small-message latency per inter-node tree level
    overhead_bytes: int  # CUDA context + library workspaces + allocator slack, per GPU
    gemm_efficiency: float = 0.7  # achieved / peak on the head's large GEMMs
    # achieved / peak on the backbone (112x112 convs, BN, PReLU): 0.19 fitted on the insightface V100 record
    # (iresnet50 fp16, 125K identities, where the head is < 3% of the step: 5,004 img/s; see
    # benchmarks/plan_validation.py); the same figure is assumed, unvalidated, for the other GPUs.
    conv_efficiency: float = 0.19
    elementwise_efficiency: float = 0.8  # achieved / peak HBM bandwidth on streaming kernels
    source: str = ""
    device: str = "cuda"  # torch device type the head runs on (its automatic chunk size depends on it)
    # Host / kernel costs outside the FLOP and byte counts. GPUs: every elementwise op is one HBM read +
    # write pass (the None defaults below), the caching allocator hands memory back untouched, and each
    # eager op costs a launch. CPUs (measured by ``--measure``): vectorised ops and transcendental functions
    # have their own rates, and glibc maps every allocation of >= 32 MiB afresh (page faults + zeroing +
    # munmap on every step that makes it).
    op_overhead_s: float = 5e-6  # dispatch + launch of one eager op (CUDA launch latency ~5 us)
    elementwise_gelems: float | None = (
        None  # simple vectorised op (mul, add, compare, sum) over a block, 1e9 elements/s
    )
    cached_elementwise_gelems: float | None = None  # the same on a block that stays in cache (a chunk), 1e9/s
    cache_bytes: int = 2 * (1 << 20)  # a chunk's [c, D] rows or [N, c] block up to this size stays in cache
    transcendental_gelems: dict | None = None  # {"exp", "softplus", "sigmoid"}: 1e9 elements/s
    fresh_alloc_gbps: float | None = None  # first touch + release of a freshly mapped block, GB/s
    fresh_alloc_min_bytes: int = 32 * (1 << 20)  # allocations at least this large are mapped afresh each time
    convert_gelems: float | None = None  # bf16 <-> fp32 conversion, 1e9 elements/s (None: a simple op)
    gather_gbps: float | None = None  # index_select / index_put_ of random [D] rows, GB/s (None: stream)
    sampler_gelems: float | None = None  # negative sampling: rand + topk over the shard's keys, 1e9 keys/s


HARDWARE: dict[str, Hardware] = {
    # NVIDIA Tesla V100 SXM2 32GB datasheet: 15.7 TFLOP/s fp32, 125 TFLOP/s fp16 tensor core, HBM2 900 GB/s;
    # no bf16 tensor cores (bf16 runs at the fp32 rate). 32,510 MiB total as nvidia-smi/gpustat reports it
    # (insightface arcface_torch docs/speed_benchmark.md log). DGX-1V nccl-tests all_reduce busbw ~130 GB/s
    # over the NVLink hybrid cube mesh; 4 x EDR 100 Gb/s InfiniBand per node -> ~42 GB/s busbw across nodes;
    # small-message latency ~15 us intra-node, ~25 us per inter-node tree level. Overhead 0.5 GiB: CUDA 10/11
    # context (~0.3-0.4 GiB on V100) + cuBLAS/cuDNN handles and workspace.
    "v100-32gb": Hardware(
        "v100-32gb",
        32510 * MiB,
        {"fp32": 15.7, "fp16": 125.0, "bf16": 15.7},
        900.0,
        130.0,
        42.0,
        15e-6,
        25e-6,
        GiB // 2,
        source="NVIDIA V100 datasheet; nccl-tests busbw on DGX-1V (NVLink) / 4xEDR IB",
    ),
    # NVIDIA A100 SXM4 80GB datasheet: 19.5 fp32, 312 fp16/bf16 dense, HBM2e 2,039 GB/s, 81,920 MiB.
    # DGX A100 nccl-tests all_reduce busbw ~230 GB/s (NVLink3/NVSwitch); 8 x HDR 200 Gb/s IB -> ~180 GB/s
    # across nodes. Latency ~10 us intra, ~20 us per inter-node level. Overhead 1 GiB (CUDA 11/12 context,
    # cuBLAS/cuDNN workspaces, NCCL buffers).
    "a100-80gb": Hardware(
        "a100-80gb",
        81920 * MiB,
        {"fp32": 19.5, "fp16": 312.0, "bf16": 312.0},
        2039.0,
        230.0,
        180.0,
        10e-6,
        20e-6,
        GiB,
        source="NVIDIA A100 datasheet; nccl-tests busbw on DGX A100 (NVSwitch) / 8xHDR IB",
    ),
    # NVIDIA H100 SXM5 80GB datasheet: 67 fp32, 989 fp16/bf16 dense (1,979 with sparsity), HBM3 3.35 TB/s;
    # nvidia-smi reports 81,559 MiB. DGX H100 nccl-tests all_reduce busbw ~450 GB/s (NVLink4/NVSwitch);
    # 8 x NDR 400 Gb/s IB -> ~350 GB/s across nodes. Latency ~10 us intra, ~20 us per inter-node level.
    "h100-80gb": Hardware(
        "h100-80gb",
        81559 * MiB,
        {"fp32": 67.0, "fp16": 989.0, "bf16": 989.0},
        3350.0,
        450.0,
        350.0,
        10e-6,
        20e-6,
        GiB,
        source="NVIDIA H100 SXM datasheet; nccl-tests busbw on DGX H100 (NVSwitch) / 8xNDR IB",
    ),
    # NVIDIA H200 SXM 141GB product brief: same compute as H100 SXM, HBM3e 4.8 TB/s, 141 GB (143,771 MiB as
    # nvidia-smi reports). Same NVLink4 / NDR fabric as DGX H100 (HGX H200).
    "h200-141gb": Hardware(
        "h200-141gb",
        143771 * MiB,
        {"fp32": 67.0, "fp16": 989.0, "bf16": 989.0},
        4800.0,
        450.0,
        350.0,
        10e-6,
        20e-6,
        GiB,
        source="NVIDIA H200 product brief; fabric as DGX H100",
    ),
}

# The ``cpu`` profile without ``--measure``: conservative defaults for one gloo rank on a small x86 box
# (bf16 matmul ~4x slower than fp32 on CPUs without AMX; fp16 is not benchmarked on CPU). The memory per
# "GPU" is the machine's RAM divided by the ranks on it (filled in by :func:`load_hardware`).
CPU_DEFAULT = Hardware(
    "cpu",
    0,
    {"fp32": 0.03, "bf16": 0.0075, "fp16": 0.0075},
    8.0,
    1.0,
    1.0,
    100e-6,
    100e-6,
    350 * MiB,
    gemm_efficiency=1.0,
    conv_efficiency=0.5,
    elementwise_efficiency=1.0,
    source="defaults; run `fr-dist plan --measure` to time a GEMM and gloo collectives here",
    device="cpu",
    op_overhead_s=5e-6,
    elementwise_gelems=2.5,
    cached_elementwise_gelems=5.0,
    transcendental_gelems={"exp": 1.0, "softplus": 0.6, "sigmoid": 2.0},
    fresh_alloc_gbps=2.0,
)

# ---------------------------------------------------------------------------------------------------
# Backbones: parameter count from the registry, forward FLOPs per 112x112 image (FlopCounterMode on the
# meta device, batch 2 / 2) and activation bytes per image: bytes of the tensors autograd saves in a
# training forward (torch.autograd.graph.saved_tensors_hooks, storages deduplicated, parameters excluded),
# fp32, measured on CPU as (saved(B=4) - saved(B=2)) / 2 with torch 2.13. Under bf16 autocast iresnet50
# measures 35,400,192 B/image: half, as :func:`activation_bytes` assumes for fp16/bf16.
# ---------------------------------------------------------------------------------------------------

BACKBONES: dict[str, dict] = {
    "iresnet_tiny": dict(params=1_358_704, fwd_flops=57_554_944, act_bytes=2_468_352),
    "iresnet18": dict(params=24_025_600, fwd_flops=5_219_909_632, act_bytes=46_113_792),
    "iresnet34": dict(params=34_139_328, fwd_flops=8_919_285_760, act_bytes=61_166_592),
    "iresnet50": dict(params=43_590_848, fwd_flops=12_618_661_888, act_bytes=70_800_384),
    "iresnet100": dict(params=65_156_160, fwd_flops=24_179_212_288, act_bytes=111_744_000),
    "iresnet200": dict(params=118_833_920, fwd_flops=46_837_891_072, act_bytes=195_437_568),
    "mobilefacenet": dict(params=2_059_520, fwd_flops=875_041_792, act_bytes=45_214_720),
    "mobilefacenet_large": dict(params=6_314_880, fwd_flops=3_632_965_632, act_bytes=113_554_432),
    "none": dict(params=0, fwd_flops=0, act_bytes=0),  # head alone (benchmarks/classifier.py)
}
_BACKBONE_CACHE: dict[tuple, dict] = {}


def backbone_info(name: str, dim: int = 512) -> dict:
    """{params, fwd_flops, act_bytes} of a backbone at 112x112 (table above; else measured once, cached)."""
    if name in BACKBONES and (dim == 512 or name == "none"):
        return dict(BACKBONES[name])
    key = (name, dim)
    if key not in _BACKBONE_CACHE:
        _BACKBONE_CACHE[key] = _measure_backbone(name, dim)
    return _BACKBONE_CACHE[key]


def _measure_backbone(name: str, dim: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fr_dist.models import create_backbone

    with torch.device("meta"):
        meta = create_backbone(name, embedding_size=dim)
    params = sum(p.numel() for p in meta.parameters())
    with FlopCounterMode(display=False) as fc:
        meta(torch.empty(2, 3, 112, 112, device="meta"))
    net = create_backbone(name, embedding_size=dim).train()
    pptr = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved = {}
    for b in (2, 4):
        seen: dict[int, int] = {}

        def pack(t, seen=seen):
            s = t.untyped_storage()
            if s.data_ptr() not in pptr:
                seen[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(torch.randn(b, 3, 112, 112))
        saved[b] = sum(seen.values())
    return dict(params=params, fwd_flops=fc.get_total_flops() // 2, act_bytes=(saved[4] - saved[2]) // 2)


# ---------------------------------------------------------------------------------------------------
# Buffer counts of the heads (see the module docstring)
# ---------------------------------------------------------------------------------------------------

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

HEADS = ("sphereface2", "partial_fc")
PFC_IMPLS = ("v2", "v1", "fr_dist")


@dataclass
class PlanConfig:
    identities: int = 1_000_000
    dim: int = 512
    gpus_per_node: int = 8
    nodes: int = 1
    batch: int = 128  # per GPU
    head: str = "sphereface2"
    sample_rate: float = 1.0
    chunk_size: int = (
        0  # SphereFace2 classes per chunk; 0 = as the head picks it (auto_chunk_size, per device)
    )
    proxy_dtype: str = "bf16"  # sphereface2 storage of proxies + momentum (Partial FC: always fp32)
    fused_update: bool = True
    fp32_master: bool = False
    optimizer: str = "sgd"
    amp: str = "fp16"  # backbone autocast dtype (none | fp16 | bf16)
    # the head's GEMMs under autocast: Partial FC in the backbone's amp dtype (insightface fp16=True does),
    # SphereFace2 in bf16 (fr_dist's head.dtype=bf16: the fused pass takes bf16 GEMM operands, fp32 math)
    head_amp: bool = True
    backbone: str = "iresnet50"
    pfc_impl: str = "v2"
    # dtype of the head's GEMMs: auto = as head_amp says (fp32 without it); or fp32 | bf16 | fp16 explicitly.
    head_compute: str = "auto"
    # the fused SphereFace2 chunk's elementwise part: auto = the Triton kernel on a GPU profile (fr_dist's
    # kernel=auto on CUDA), torch ops on the cpu profile; or eager | triton
    sf2_kernel: str = "auto"
    ddp_bucket_copy: bool = True  # DDP gradient buckets are a separate copy (gradient_as_bucket_view=False)

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    def validate(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.proxy_dtype not in DTYPE_BYTES:
            raise ValueError(f"proxy dtype must be one of {sorted(DTYPE_BYTES)}, got {self.proxy_dtype!r}")
        if self.amp not in ("none", "fp16", "bf16"):
            raise ValueError(f"amp must be none|fp16|bf16, got {self.amp!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd|adamw, got {self.optimizer!r}")
        if self.head_compute not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"head compute must be auto|fp32|bf16|fp16, got {self.head_compute!r}")
        if self.sf2_kernel not in ("auto", "eager", "triton"):
            raise ValueError(f"sf2 kernel must be auto|eager|triton, got {self.sf2_kernel!r}")
        if self.pfc_impl not in PFC_IMPLS:
            raise ValueError(f"pfc_impl must be one of {PFC_IMPLS}, got {self.pfc_impl!r}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        if int(self.chunk_size) < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = automatic), got {self.chunk_size}")
        for k in ("identities", "dim", "gpus_per_node", "nodes", "batch"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")


def parse_count(text) -> int:
    """'100M' -> 100_000_000, '1.5e8', '29M', '1.4M', '2K', '3B', '12345' -> int."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgG]?)", s)
    if not m:
        raise ValueError(f"cannot read a count from {text!r} (examples: 100M, 1.5e8, 2K, 12345)")
    mult = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m.group(2).lower()]
    return int(round(float(m.group(1)) * mult))


def load_hardware(spec: str, gpus_per_node: int = 1, measured: dict | None = None) -> Hardware:
    """A built-in profile name, ``cpu`` (RAM / ranks; measured figures when given) or a YAML file."""
    if spec in HARDWARE:
        return HARDWARE[spec]
    if spec == "cpu":
        hw = CPU_DEFAULT
        mem = _ram_bytes() // max(1, gpus_per_node)
        hw = dataclasses.replace(hw, memory_bytes=mem)
        if measured:
            hw = dataclasses.replace(hw, **{k: v for k, v in measured.items() if k in _HW_FIELDS})
        return hw
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"unknown hardware {spec!r}: built-in {sorted(HARDWARE) + ['cpu']} or a YAML file")
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    base = HARDWARE.get(data.pop("base", ""), None)
    unknown = set(data) - _HW_FIELDS
    if unknown:
        raise ValueError(f"{path}: unknown hardware fields {sorted(unknown)}; known {sorted(_HW_FIELDS)}")
    if "memory_gb" in data:
        data["memory_bytes"] = int(float(data.pop("memory_gb")) * 1e9)
    data.setdefault("name", path.stem)
    if base is not None:
        return dataclasses.replace(base, **data)
    missing = {f.name for f in dataclasses.fields(Hardware) if f.default is dataclasses.MISSING} - set(data)
    if missing:
        raise ValueError(f"{path}: missing hardware fields {sorted(missing)} (or give base: h100-80gb)")
    return Hardware(**data)


_HW_FIELDS = {f.name for f in dataclasses.fields(Hardware)} | {"memory_gb", "base"}


def _ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * GiB


# ---------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------


def _local(cfg: PlanConfig) -> tuple[int, int, int]:
    """(n, S, N): the busiest rank's classes, its active classes, the gathered rows."""
    n = -(-cfg.identities // cfg.world)  # rank 0 of fr_dist.sharding.class_range owns ceil(K / W)
    S = n if cfg.sample_rate >= 1.0 else max(1, int(cfg.sample_rate * n))  # SphereFace2: sampled compute
    return n, S, cfg.world * cfg.batch


def activation_bytes(cfg: PlanConfig) -> int:
    per = backbone_info(cfg.backbone, cfg.dim)["act_bytes"]
    return int(per * cfg.batch * (0.5 if cfg.amp in ("fp16", "bf16") else 1.0))


def sf2_chunk(cfg: PlanConfig, hw: Hardware, cols: int) -> int:
    """SphereFace2 classes per chunk over ``cols`` classes: the configured size, or (0) the one the head
    picks on the profile's device (fr_dist.heads.sf2_fused.auto_chunk_size)."""
    if cfg.chunk_size:
        return max(1, min(cfg.chunk_size, cols))
    from fr_dist.heads.sf2_fused import auto_chunk_size

    return auto_chunk_size(cfg.world * cfg.batch, max(cols, 1), cfg.dim, 4, hw.device)


def sf2_triton(cfg: PlanConfig, hw: Hardware) -> bool:
    """Does the SphereFace2 chunk run its Triton kernel (fr_dist's kernel=auto: on CUDA)?"""
    return cfg.sf2_kernel == "triton" or (cfg.sf2_kernel == "auto" and hw.device == "cuda")


def memory_breakdown(cfg: PlanConfig, hw: Hardware) -> dict:
    """Bytes per GPU by item, with ``total``, at the step's peak (head forward-backward over live
    backbone activations)."""
    cfg.validate()
    n, S, N = _local(cfg)
    D = cfg.dim
    f4 = 4
    m: dict[str, int] = {}
    if cfg.head == "sphereface2":
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
        m["logit_block"] = int(S * N * f4 * logit)
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


# ---------------------------------------------------------------------------------------------------
# Step time
# ---------------------------------------------------------------------------------------------------


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
    return "bf16" if cfg.head == "sphereface2" else cfg.amp


# Work outside the GEMMs, counted from the implementations (per step, busiest rank). Row passes are reads
# or writes of one [rows, D] array in storage dtype; logit ops are elementwise ops over one element of the
# [N, S] block ("simple": arithmetic, compare, reduction; the rest by name).
#
# torch.optim single-tensor steps (the CPU default; foreach on CUDA moves the same bytes): SGD momentum
# buf.mul_ (r+w), buf.add_(g) (2r+w), p.add_(buf) (2r+w) = 8; AdamW p.mul_ (2), exp_avg.lerp_ (3),
# exp_avg_sq.mul_.addcmul_ (5), denom = sqrt / c + eps (6, two fresh arrays), p.addcdiv_ (4) = 20.
OPT_PASSES = {"sgd": 8, "adamw": 20}
OPT_FRESH_ROWS = {"sgd": 0, "adamw": 2}
# fr_dist.heads.sf2_fused per chunk (margin C, t = 3, grad detached): u + 1, u^(t-1) (a square), addcmul
# -> z, sum of softplus, sum of Q; softplus(z), sigmoid(z). Target entries (<= N per step) are not counted.
SF2_LOGIT_OPS = {"simple": 5, "softplus": 1, "sigmoid": 1}
# ... and the torch ops it dispatches per chunk (norm, div, mm, indexing of the targets, pow, addcmul,
# softplus, sums, sigmoid, the two gradient GEMMs, the fused update's 3-4 ops): about 30.
SF2_OPS_PER_CHUNK = 30
# with the Triton kernel (fr_dist.heads.sf2_triton) the elementwise part is one read + write of the block
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
PFC_OPS_PER_STEP = 60  # sampler, gather, norms, the fused softmax, its backward, the update: ~60 ops
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
    n, S, N = _local(cfg)
    D, f4 = cfg.dim, 4
    extra = [n * D * (DTYPE_BYTES[cfg.proxy_dtype] if cfg.head == "sphereface2" else f4)] * OPT_FRESH_ROWS[
        cfg.optimizer
    ]
    if cfg.head == "sphereface2":
        if cfg.fused_update:
            return []  # chunk-sized buffers only; the update runs inside the pass
        grads = [n * D * f4] + ([n * D * DTYPE_BYTES[cfg.proxy_dtype]] if cfg.proxy_dtype != "fp32" else [])
        return grads + extra
    sampled = S < n
    # the [n, D] gradient (dense: zeros + index_put_ when sampling, the GEMM's output at rate 1), the
    # cosine block and its scaled copy [N, S]; when sampling, the [S, D] gather and its gradient
    out = [n * D * f4, N * S * f4, N * S * f4]
    if sampled:
        out += [S * D * f4, S * D * f4]
    return out + extra


def step_time(cfg: PlanConfig, hw: Hardware) -> dict:
    """Seconds per step by item, with ``total`` and the softmax all-reduces' own share."""
    cfg.validate()
    n, S, N = _local(cfg)
    D, W = cfg.dim, cfg.world
    t: dict[str, float] = {}
    # classifier GEMMs: cos = x W^T, dx = g W, dW = g^T x  -> 3 x 2 N S D
    flops = 6.0 * N * S * D
    t["classifier_compute"] = flops / (hw.tflops[_head_dtype(cfg)] * 1e12 * hw.gemm_efficiency)
    # row traffic: proxies, optimizer state and gradients, outside the GEMMs (tables above)
    stream = hw.hbm_gbps * 1e9 * hw.elementwise_efficiency
    opt = OPT_PASSES[cfg.optimizer]
    gathered, row_ops, conversions = False, 0, 0  # the fused SphereFace2 update's, set below
    c = sf2_chunk(cfg, hw, S) if cfg.head == "sphereface2" else S  # classes per chunk
    if cfg.head == "sphereface2":
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
        logit_ops = PFC_LOGIT_OPS[cfg.pfc_impl]
        ops = PFC_OPS_PER_STEP
    gather = hw.gather_gbps * 1e9 if hw.gather_gbps else stream
    t["row_traffic"] = row_bytes / (gather if gathered else stream)
    # the SphereFace2 chunk's rows [c, D] and its [N, c] temporaries stay in cache when they fit
    rows_cached = c * D * 4 <= hw.cache_bytes
    block_cached = cfg.head == "sphereface2" and N * c * 4 <= hw.cache_bytes
    in_pass = cfg.head == "sphereface2" and cfg.fused_update and hw.elementwise_gelems
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
    # communication: all-gather [N, D+1], reduce-scatter [N, D], backbone gradient all-reduce
    bw = _busbw(cfg, hw)
    ring = (W - 1) / W if W > 1 else 0.0
    P = backbone_info(cfg.backbone, D)["params"]
    head_bytes = N * (D + 1) * 4 * ring + N * D * 4 * ring
    softmax_bytes = 3 * N * 4 * 2 * ring if cfg.head == "partial_fc" else 0.0
    t["comm_bandwidth"] = (head_bytes + softmax_bytes + P * 4 * 2 * ring) / bw if W > 1 else 0.0
    lat = _latency(cfg, hw)
    buckets = math.ceil(P * 4 / (25 * MiB)) if P else 0  # DDP's 25 MiB buckets
    calls = 4 + (3 if cfg.head == "partial_fc" else 0) + buckets
    t["comm_latency"] = calls * lat
    info = backbone_info(cfg.backbone, D)
    bdt = "fp32" if cfg.amp == "none" else cfg.amp
    t["backbone_compute"] = 3.0 * info["fwd_flops"] * cfg.batch / (hw.tflops[bdt] * 1e12 * hw.conv_efficiency)
    t["total"] = sum(t.values())
    if cfg.head == "partial_fc":
        t["softmax_allreduce"] = 3 * lat + (softmax_bytes / bw if W > 1 else 0.0)
    else:
        t["softmax_allreduce"] = 0.0
    return t


def softmax_share_point(cfg: PlanConfig, hw: Hardware, threshold: float = 0.05) -> dict:
    """Where Partial FC's three softmax all-reduces exceed ``threshold`` of the step: the smallest node
    count (W = gpus_per_node x nodes) at this K, and the largest K at this W (the share falls as K grows).
    ``head_only`` repeats it for the classifier step alone (benchmarks/classifier.py's step)."""
    out = _share_point(dataclasses.replace(cfg, head="partial_fc"), hw, threshold)
    out["head_only"] = _share_point(
        dataclasses.replace(cfg, head="partial_fc", backbone="none"), hw, threshold
    )
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


# ---------------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------------


def plan(cfg: PlanConfig, hw: Hardware) -> dict:
    mem = memory_breakdown(cfg, hw)
    kmax = max_identities(cfg, hw)
    st = step_time(cfg, hw)
    return dict(
        fits=bool(mem["total"] <= hw.memory_bytes),
        max_identities=int(kmax),
        memory_per_gpu=mem,
        step_time_s=st,
        images_per_s=cfg.world * cfg.batch / st["total"],
        capacity_bytes=int(hw.memory_bytes),
        identities_per_gb=kmax / (cfg.world * hw.memory_bytes / 1e9),
        softmax_allreduce=softmax_share_point(cfg, hw),
        config=dataclasses.asdict(cfg),
        hardware=dataclasses.asdict(hw),
    )


def side_by_side(cfg: PlanConfig, hw: Hardware) -> dict[str, dict]:
    """The requested configuration and the other head (SphereFace2 keeps the proxy settings; Partial FC
    is fp32 with the given sample rate, or 0.1 when the request is SphereFace2)."""
    if cfg.head == "sphereface2":
        sf2 = cfg
        pfc = dataclasses.replace(
            cfg, head="partial_fc", sample_rate=0.1 if cfg.sample_rate >= 1 else cfg.sample_rate
        )
    else:
        pfc = cfg
        sf2 = dataclasses.replace(cfg, head="sphereface2")
    return {"sphereface2": plan(sf2, hw), "partial_fc": plan(pfc, hw)}


def _fmt_bytes(b: float) -> str:
    return f"{b / GiB:9.2f} GiB"


def format_table(res: dict[str, dict]) -> str:
    heads = list(res)
    mem_keys = [k for k in res[heads[0]]["memory_per_gpu"]]
    time_keys = [k for k in res[heads[0]]["step_time_s"]]
    w = 22
    lines = []
    c0 = res[heads[0]]["config"]
    lines.append(
        f"fr-dist plan: K={c0['identities']:,} D={c0['dim']} W={c0['gpus_per_node']}x{c0['nodes']} "
        f"B={c0['batch']}/GPU backbone={c0['backbone']} amp={c0['amp']} optimizer={c0['optimizer']} "
        f"hardware={res[heads[0]]['hardware']['name']} ({res[heads[0]]['capacity_bytes'] / GiB:.1f} GiB/GPU)"
    )
    desc = []
    for h in heads:
        c = res[h]["config"]
        if h == "sphereface2":
            desc.append(
                f"sphereface2 {c['proxy_dtype']} {'fused' if c['fused_update'] else 'unfused'} chunk {c['chunk_size']}"
            )
        else:
            desc.append(f"partial_fc fp32 rate {c['sample_rate']} ({c['pfc_impl']})")
    lines.append(f"{'':24s}" + "".join(f"{d:>{w + 14}s}" for d in desc))
    lines.append("memory per GPU")
    for k in mem_keys:
        lines.append(
            f"  {k:22s}" + "".join(f"{_fmt_bytes(res[h]['memory_per_gpu'][k]):>{w + 14}s}" for h in heads)
        )
    lines.append(f"  {'fits':22s}" + "".join(f"{str(res[h]['fits']):>{w + 14}s}" for h in heads))
    lines.append(
        f"  {'max identities':22s}" + "".join(f"{res[h]['max_identities']:>{w + 14},d}" for h in heads)
    )
    lines.append(
        f"  {'identities per GB':22s}"
        + "".join(f"{res[h]['identities_per_gb'] / 1e6:>{w + 11}.3f} M" for h in heads)
    )
    lines.append("step time")
    for k in time_keys:
        lines.append(
            f"  {k:22s}" + "".join(f"{res[h]['step_time_s'][k] * 1e3:>{w + 11}.2f} ms" for h in heads)
        )
    lines.append(
        f"  {'images/s (global)':22s}" + "".join(f"{res[h]['images_per_s']:>{w + 14},.0f}" for h in heads)
    )
    sm = res["partial_fc"]["softmax_allreduce"]
    for label, d in (("full step", sm), ("head alone", sm["head_only"])):
        lines.append(
            f"partial_fc softmax all-reduces ({label}): {d['share_here'] * 100:.2f}% of the step here; > 5% from "
            f"W = {d['world_size_above'] if d['world_size_above'] else 'never (<= 2^20 nodes)'} at this K"
            + (f", or for K <= {d['identities_below']:,} at this W" if d["identities_below"] else "")
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# --measure: time a GEMM and gloo collectives between 2 local processes (the ``cpu`` profile)
# ---------------------------------------------------------------------------------------------------


def _gemm_tflops(dtype_name: str, size: int = 1024, reps: int = 5) -> float:
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(size, size).to(dt)
    b = torch.randn(size, size).to(dt)
    return 2 * size**3 / _best_time(lambda: a @ b, reps) / 1e12


def _best_time(fn, reps: int) -> float:
    import time

    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _op_rates(numel: int, reps: int) -> dict:
    import torch

    x = torch.rand(numel)
    y = torch.rand(numel)
    small, calls = 1 << 17, 32  # two 512 KiB arrays: they stay in a 1 MiB L2
    xs, ys = x[:small].clone(), y[:small].clone()

    def cached():
        for _ in range(calls):
            ys.mul_(xs)

    return dict(
        hbm_gbps=12 * numel / _best_time(lambda: y.add_(x), reps) / 1e9,
        elementwise_gelems=numel / _best_time(lambda: y.mul_(x), reps) / 1e9,
        cached_elementwise_gelems=calls * small / _best_time(cached, reps) / 1e9,
        transcendental_gelems={
            "exp": numel / _best_time(lambda: torch.exp(x, out=y), reps) / 1e9,
            "softplus": numel / _best_time(lambda: torch._C._nn.softplus(x, 1.0, 20.0, out=y), reps) / 1e9,
            "sigmoid": numel / _best_time(lambda: torch.sigmoid(x, out=y), reps) / 1e9,
        },
    )


def measure_rates(numel: int = 1 << 23, reps: int = 5) -> dict:
    """The host rates of the step model, timed in this process (run it in every rank at once: the ranks
    share the memory bus): ``hbm_gbps`` (in-place ``y += x`` over 32 MiB arrays, 12 bytes per element),
    ``elementwise_gelems`` (``y *= x``; ``cached_elementwise_gelems`` on 512 KiB arrays),
    ``transcendental_gelems`` (exp, softplus, sigmoid), ``fresh_alloc_gbps`` (``torch.zeros`` of a new
    256 MiB array, written once and freed: glibc maps it afresh), ``op_overhead_s`` (an in-place op on
    one element), ``convert_gelems``, ``gather_gbps`` and ``sampler_gelems``."""
    import torch

    out = _op_rates(numel, reps)
    big = 1 << 26  # 256 MiB

    def fresh():
        z = torch.zeros(big)
        del z

    out["fresh_alloc_gbps"] = 4 * big / _best_time(fresh, reps) / 1e9
    one = torch.zeros(1)

    def tiny_ops():
        for _ in range(100):
            one.add_(1.0)

    out["op_overhead_s"] = _best_time(tiny_ops, reps) / 100
    out.update(_row_and_sampler_rates(reps))
    return out


def _row_and_sampler_rates(reps: int) -> dict:
    """bf16 <-> fp32 conversion, gather / scatter of random 512-wide bf16 rows, and a negative-sampling draw
    (rand + top-2 % of 4M keys), as the heads do them."""
    import torch

    x = torch.rand(1 << 22)
    xb = x.to(torch.bfloat16)
    t_conv = _best_time(lambda: x.copy_(xb), reps) + _best_time(lambda: xb.copy_(x), reps)
    table = torch.rand(1 << 16, 512).to(torch.bfloat16)  # 64 MiB
    idx = torch.randperm(1 << 16)[:2048].sort()[0]
    rows = table.index_select(0, idx)
    t_gather = _best_time(lambda: table.index_select(0, idx), reps) + _best_time(
        lambda: table.index_put_((idx,), rows), reps
    )
    n = 1 << 22
    t_sample = _best_time(lambda: torch.topk(torch.rand(n), k=n // 50), max(1, reps // 2))
    return dict(
        convert_gelems=2 * x.numel() / t_conv / 1e9,
        gather_gbps=2 * rows.numel() * rows.element_size() / t_gather / 1e9,
        sampler_gelems=n / t_sample / 1e9,
    )


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _collectives_worker(rank: int, world: int) -> dict:
    import time

    import torch

    from fr_dist import comm

    out = {"baseline_rss_bytes": _rss_bytes()}  # python + torch + fr_dist + a gloo group
    comm.barrier()
    out["rates"] = measure_rates()  # every rank at once, as the ranks of a run share the memory bus
    out["gemm_fp32_tflops"] = _gemm_tflops("fp32")
    out["gemm_bf16_tflops"] = _gemm_tflops("bf16", size=1024, reps=3)
    comm.barrier()
    big = torch.randn(1 << 20)  # 4 MiB per rank
    small = torch.randn(8)
    for name, fn, nbytes, factor in (
        ("all_gather", lambda t: comm.all_gather(t, None), big.numel() * 4 * world, (world - 1) / world),
        ("all_reduce", lambda t: comm.all_reduce(t, "sum", None), big.numel() * 4, 2 * (world - 1) / world),
    ):
        out[name + "_busbw_gbps"] = nbytes * factor / _best_time(lambda fn=fn: fn(big), 5) / 1e9
    lat = []
    for _ in range(20):
        t0 = time.perf_counter()
        comm.all_reduce(small, "sum", None)
        lat.append(time.perf_counter() - t0)
    lat.sort()
    out["latency_s"] = lat[len(lat) // 2]
    return out


def measure_cpu_profile(world: int = 2) -> dict:
    """In ``world`` local processes at once (1 thread each): a fp32 / bf16 GEMM, the host rates of
    :func:`measure_rates` and gloo all-gather / all-reduce; return Hardware field overrides for the ``cpu``
    profile (rank 0's figures)."""
    from fr_dist.testing import spawn_gloo

    coll = spawn_gloo(_collectives_worker, max(2, world), args=(), timeout_s=300)[0]
    fp32, bf16 = coll["gemm_fp32_tflops"], coll["gemm_bf16_tflops"]
    rates = coll.pop("rates")
    bus = min(coll["all_gather_busbw_gbps"], coll["all_reduce_busbw_gbps"])
    flat = {k: v for k, v in rates.items() if k != "transcendental_gelems"}
    flat.update({f"{k}_gelems": v for k, v in rates["transcendental_gelems"].items()})
    return dict(
        rates,
        tflops={"fp32": fp32, "bf16": bf16, "fp16": bf16},
        intra_busbw_gbps=bus,
        inter_busbw_gbps=bus,
        intra_latency_s=coll["latency_s"],
        inter_latency_s=coll["latency_s"],
        overhead_bytes=int(coll["baseline_rss_bytes"]) or CPU_DEFAULT.overhead_bytes,
        measured=dict(coll, **flat),
    )


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--identities", "-K", default="1M", help="classes K: 100M, 1.5e8, 29M, 2K or an integer")
    p.add_argument("--dim", type=int, default=512, help="embedding size D")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--batch", type=int, default=128, help="images per GPU per step")
    p.add_argument("--head", choices=HEADS, default="sphereface2")
    p.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC negative-class sample rate")
    p.add_argument(
        "--chunk-size", type=int, default=0, help="SphereFace2 classes per chunk (0: as the head picks)"
    )
    p.add_argument(
        "--proxy-dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="SphereFace2 proxy storage"
    )
    p.add_argument("--fused-update", dest="fused_update", action="store_true", default=True)
    p.add_argument("--no-fused-update", dest="fused_update", action="store_false")
    p.add_argument("--fp32-master", action="store_true", help="SphereFace2: keep an fp32 master copy")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--amp", choices=("none", "fp16", "bf16"), default="fp16", help="backbone autocast")
    p.add_argument("--backbone", default="iresnet50", help="registry name, or 'none' for the head alone")
    p.add_argument(
        "--no-head-amp",
        dest="head_amp",
        action="store_false",
        default=True,
        help="head GEMMs in fp32 (default: under autocast: Partial FC in the amp dtype, SphereFace2 in bf16)",
    )
    p.add_argument("--pfc-impl", choices=PFC_IMPLS, default="v2", help="Partial FC buffer model")
    p.add_argument(
        "--head-compute",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="dtype of the head GEMMs (auto: see --no-head-amp)",
    )
    p.add_argument(
        "--sf2-kernel",
        choices=("auto", "eager", "triton"),
        default="auto",
        help="SphereFace2 chunk's elementwise part (auto: the Triton kernel on GPU profiles, torch ops on cpu)",
    )
    p.add_argument("--hardware", default="h100-80gb", help=f"{sorted(HARDWARE) + ['cpu']} or a YAML file")
    p.add_argument(
        "--measure", action="store_true", help="cpu profile: time a GEMM and gloo collectives here"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def config_from_args(a) -> PlanConfig:
    return PlanConfig(
        identities=parse_count(a.identities),
        dim=a.dim,
        gpus_per_node=a.gpus_per_node,
        nodes=a.nodes,
        batch=a.batch,
        head=a.head,
        sample_rate=a.sample_rate,
        chunk_size=a.chunk_size,
        proxy_dtype=a.proxy_dtype,
        fused_update=a.fused_update,
        fp32_master=a.fp32_master,
        optimizer=a.optimizer,
        amp=a.amp,
        backbone=a.backbone,
        pfc_impl=a.pfc_impl,
        head_compute=a.head_compute,
        head_amp=a.head_amp,
        sf2_kernel=a.sf2_kernel,
    )


def run_plan_cli(a) -> int:
    try:
        cfg = config_from_args(a)
        cfg.validate()
        measured = None
        if a.measure:
            if a.hardware != "cpu":
                print("fr-dist plan: --measure applies to --hardware cpu; using cpu", file=sys.stderr)
                a.hardware = "cpu"
            measured = measure_cpu_profile(max(2, cfg.gpus_per_node))
            if not a.json:
                print("measured cpu profile: " + json.dumps(measured["measured"]))
        hw = load_hardware(a.hardware, cfg.gpus_per_node, measured)
    except ValueError as e:
        print(f"fr-dist plan: {e}", file=sys.stderr)
        return 2
    res = side_by_side(cfg, hw)
    if a.json:
        out = dict(res[cfg.head])
        out["heads"] = {h: {k: v for k, v in r.items() if k not in ("hardware",)} for h, r in res.items()}
        if measured:
            out["measured_profile"] = measured
        print(json.dumps(out, default=float))
    else:
        print(format_table(res))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fr-dist plan", description=__doc__.split("\n\n")[0])
    add_plan_arguments(p)
    return run_plan_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
