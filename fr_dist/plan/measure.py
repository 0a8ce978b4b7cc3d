"""``fr-dist plan --measure``: the ``cpu`` profile's rates timed on this machine.

A GEMM (fp32, bf16), the host rates of the step model (:func:`measure_rates`) and gloo all-gather /
all-reduce between local ranks, all timed in every rank at once (the ranks of a run share the memory bus).
:func:`measure_cpu_profile` runs them as a ``torchrun --standalone`` job of this module, the ranks joined
the way a training run joins them (:func:`fr_dist.runtime.init_distributed`)::

    torchrun --standalone --nproc-per-node=2 -m fr_dist.plan.measure OUT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fr_dist import comm
from fr_dist.plan.hardware import CPU_DEFAULT
from fr_dist.runtime import init_distributed, shutdown

__all__ = ["measure_rates", "measure_cpu_profile"]


def _gemm_tflops(dtype_name: str, size: int = 1024, reps: int = 5) -> float:
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(size, size).to(dt)
    b = torch.randn(size, size).to(dt)
    return 2 * size**3 / _best_time(lambda: a @ b, reps) / 1e12


def _best_time(fn, reps: int) -> float:
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


def _collectives_worker(world: int) -> dict:
    import torch

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


def measure_cpu_profile(world: int = 2, timeout_s: float = 300.0) -> dict:
    """In ``world`` local processes at once (1 thread each): a fp32 / bf16 GEMM, the host rates of
    :func:`measure_rates` and gloo all-gather / all-reduce; return Hardware field overrides for the ``cpu``
    profile (rank 0's figures)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={max(2, world)}",
            "-m", "fr_dist.plan.measure", str(out),
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"fr-dist plan --measure: no result within {timeout_s:g} s ({' '.join(cmd)})"
            ) from None
        if p.returncode != 0 or not out.is_file():
            raise RuntimeError(
                f"fr-dist plan --measure: {' '.join(cmd)} exited {p.returncode}:\n{(p.stderr or p.stdout)[-2000:]}"
            )
        coll = json.loads(out.read_text())
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


def _rank_main(out_path: str) -> None:
    """One rank of :func:`measure_cpu_profile`'s job: rank 0 writes its figures to ``out_path``."""
    import torch

    torch.set_num_threads(1)
    env, _ = init_distributed(device="cpu", timeout_s=300.0)
    res = _collectives_worker(env.world_size)
    if env.rank == 0:
        Path(out_path).write_text(json.dumps(res))
    shutdown(0)


if __name__ == "__main__":
    _rank_main(sys.argv[1])
