"""Hardware profiles of the planner: datasheet / nccl-tests figures per GPU, the ``cpu`` profile, YAML files.

Figures are public datasheet / nccl-tests numbers, rounded; override any of them with a YAML file of the
same field names (``--hardware my_cluster.yaml``). A built-in profile may be named by its short name
(``h100`` for ``h100-80gb``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Hardware", "HARDWARE", "CPU_DEFAULT", "GiB", "MiB", "load_hardware"]

GiB = 1 << 30
MiB = 1 << 20


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

# short names of the built-in profiles: h100 -> h100-80gb
SHORT_NAMES = {name.split("-")[0]: name for name in HARDWARE}


def load_hardware(spec: str, gpus_per_node: int = 1, measured: dict | None = None) -> Hardware:
    """A built-in profile name (or its short name, ``h100``), ``cpu`` (RAM / ranks; measured figures
    when given) or a YAML file."""
    spec = SHORT_NAMES.get(spec, spec)
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
        known = sorted(HARDWARE) + sorted(SHORT_NAMES) + ["cpu"]
        raise ValueError(f"unknown hardware {spec!r}: built-in {known} or a YAML file")
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
