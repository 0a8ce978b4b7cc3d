"""Classifier-layer benchmark: SphereFace2 vs Partial-FC softmax against the GEMM bound.

Per configuration (head, K classes, world size W, batch B per rank, chunk) it trains the
class-sharded head alone on synthetic class-clustered embeddings and reports, per rank 0:

* ``step_time_s``   median of forward + backward + SGD(momentum) update of the shard;
* ``gemm3_time_s``  median, measured in the same process interleaved with the steps, of the three
                    classifier GEMMs of the same shapes (logits [N, D] @ [D, n], d-embeddings
                    [N, n] @ [n, D], d-weights [n, N] @ [N, D], written into arrays allocated once
                    so that no page fault is timed; N = W*B, n = the shard's (sampled) classes) and
                    ``ratio_to_gemm3``;
* ``peak_step_bytes`` the peak of torch's own CPU/CUDA allocations during one step ABOVE what was
                    allocated before it (weights, gradients, optimizer state): on CPU from
                    torch.profiler's raw memory events (every tensor allocation and free, exact
                    bytes, summed in time order; old gradients freed before the profiled step and
                    the new gradients' bytes subtracted), on CUDA from max_memory_allocated - allocated;
                    ``peak_ratio_to_pfc_materialised`` divides it by the Partial-FC step with
                    materialised fp32 logits (chunk None) at the same (K, W, B);
* ``comm_per_step`` collective calls, logical bytes and ring wire bytes (fr_dist.comm counters).

Why not RSS: the process high-water mark never goes down between configurations, includes the
allocator's caching and the interpreter, and cannot isolate one step; tracemalloc does not see
torch's allocations at all.

CPU (spawns W gloo ranks itself)::

    python -m benchmarks.classifier --world-sizes 1 2 --num-classes 1000 10000 100000 1000000 \\
        --pfc-chunks none 8192 --out benchmarks/results/cpu2_202611/classifier.json

Smoke (seconds, ``make bench-smoke``)::

    python -m benchmarks.classifier --world-sizes 2 --num-classes 1000 --steps 3 --dim 128 --batch 16

SphereFace2 options of a newer head (``chunk_size``, ``fused_update``, ``proxy_dtype``, ...) are
passed with ``--sf2-opt key=value`` (repeatable); keys the installed head does not accept are
reported and ignored. GPU (one configuration per launch; W from torchrun)::

    torchrun --nproc_per_node=8 -m benchmarks.classifier --launcher torchrun --num-classes 2000000 \\
        --batch 128 --out benchmarks/results/h100x8_202611/classifier_2M.json

Writes JSON (``--out``) and, when matplotlib is present, a PNG beside it.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import (
    args_record,
    cuda_memory,
    cuda_sync,
    host_facts,
    median,
    pyplot,
    save_figure,
    spawn,
    write_json_atomic,
)
from fr_dist import comm
from fr_dist.heads import PartialFCHead, SphereFace2Head


def _accepted(cls, opts: dict) -> tuple[dict, list]:
    """Split ``opts`` into the keywords ``cls`` accepts and the names it does not."""
    params = inspect.signature(cls.__init__).parameters
    ok = {k: v for k, v in opts.items() if k in params}
    return ok, sorted(set(opts) - set(ok))


def make_head(name: str, dim: int, K: int, sample_rate: float, chunk, sf2_opts: dict):
    """Build the head; returns (head, options applied, options ignored)."""
    if name == "sphereface2":
        opts, ignored = _accepted(SphereFace2Head, sf2_opts)
        return SphereFace2Head(dim, K, check_inputs=False, **opts), opts, ignored
    opts, ignored = _accepted(PartialFCHead, {"chunk_size": chunk} if chunk is not None else {})
    head = PartialFCHead(dim, K, margin="arcface", sample_rate=sample_rate, check_inputs=False, **opts)
    return head, opts, ignored


def _configure_fused_update(head, lr: float, momentum: float) -> bool:
    """A head that updates its own rows (SphereFace2 ``fused_update``) gets the benchmark's SGD settings."""
    row_opt = getattr(head, "row_optimizer", None)
    if row_opt is None:
        return False
    for key, value in (("lr", lr), ("momentum", momentum), ("nesterov", False), ("weight_decay", 0.0)):
        if hasattr(row_opt, key):
            setattr(row_opt, key, value)
    return True


def _peak_above_start_cpu(step) -> int:
    """Peak of torch's CPU allocations during ``step()`` above those alive when it started (bytes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # every allocation (+bytes) and free (-bytes) of the step, in time order (raw kineto events)
    deltas = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    cur = peak = 0
    for _, d in deltas:
        cur += d
        peak = max(peak, cur)
    return int(peak)


def run_config(
    rank,
    world,
    head_name,
    K,
    batch,
    dim,
    steps,
    warmup,
    sample_rate,
    lr,
    chunk=None,
    sf2_opts=None,
    device="cpu",
    log=False,
    measure_memory=True,
):
    """Train the head alone; return timing, GEMM bound, comm and memory figures for this rank."""
    dev = torch.device(device)
    head, applied, ignored = make_head(head_name, dim, K, sample_rate, chunk, dict(sf2_opts or {}))
    head = head.to(dev)
    fused = _configure_fused_update(head, lr, 0.9)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1000 + rank)
    centres = torch.nn.functional.normalize(
        torch.randn(min(K, 100_000), dim, generator=torch.Generator().manual_seed(7)), dim=1
    )  # class c's centre is centres[c % 100000] (bounded memory at K = 10^7)

    def batch_xy():
        y = torch.randint(0, K, (batch,), generator=gen)
        x = centres[y % centres.shape[0]] + 0.5 * torch.randn(batch, dim, generator=gen) / dim**0.5
        return x.to(dev).requires_grad_(True), y.to(dev)

    def sync():
        cuda_sync(dev)

    losses = []

    def step():
        x, y = batch_xy()
        opt.zero_grad(set_to_none=True)
        loss = head(x, y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    N = world * batch
    n_used = (
        head.num_local if sample_rate >= 1 or head_name != "partial_fc" else int(sample_rate * head.num_local)
    )
    n3 = max(n_used, 1)
    g3 = dict(
        x=torch.randn(N, dim, device=dev),  # [N, D]
        w=torch.randn(n3, dim, device=dev),  # [n, D]
        g=torch.randn(N, n3, device=dev),  # [N, n]
        # outputs written in place: the bound is the GEMMs, not the first touch of fresh pages (on CPU
        # every step would otherwise map the [n, D] output afresh: page faults worth ~1/4 of the GEMMs)
        logits=torch.empty(N, n3, device=dev),  # [N, n]
        dx=torch.empty(N, dim, device=dev),  # [N, D]
        dw=torch.empty(n3, dim, device=dev),  # [n, D]
    )

    def gemm3():
        torch.mm(g3["x"], g3["w"].t(), out=g3["logits"])  # logits [N, n]
        torch.mm(g3["g"], g3["w"], out=g3["dx"])  # d embeddings [N, D]
        torch.mm(g3["g"].t(), g3["x"], out=g3["dw"])  # d weights [n, D]

    times, gtimes, stats_per_step = [], [], None
    for i in range(warmup + steps):
        sync()
        comm.reset_comm_stats()
        t0 = time.perf_counter()
        step()
        sync()
        dt = time.perf_counter() - t0
        if i == warmup:
            stats_per_step = comm.comm_stats()
        sync()
        t1 = time.perf_counter()
        gemm3()
        sync()
        gt = time.perf_counter() - t1
        if i >= warmup:
            times.append(dt)
            gtimes.append(gt)
        if log and rank == 0:
            print(
                f"[{head_name} K={K} W={world}] step {i} loss {losses[-1]:.4f} {dt * 1e3:.1f} ms", flush=True
            )
    g3.clear()
    peak, peak_kind = None, None
    if measure_memory:
        if dev.type == "cuda":
            sync()
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)  # the peaks of cuda_memory below: this one step
            step()
            sync()
            peak, peak_kind = torch.cuda.max_memory_allocated(dev) - base, "cuda_max_allocated_above_start"
        else:
            # free the old gradients before the profiler starts (it cannot see frees of earlier blocks),
            # then take off the gradients the step leaves allocated: they are state, not step memory
            opt.zero_grad(set_to_none=True)
            raw = _peak_above_start_cpu(step)
            grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
            peak, peak_kind = raw - grads, "torch_profiler_cpu_allocations_above_start_minus_new_grads"
    med, gmed = median(times), median(gtimes)
    return dict(
        head=head_name,
        num_classes=K,
        world_size=world,
        batch_per_rank=batch,
        dim=dim,
        num_local=head.num_local,
        classes_used=n_used,
        chunk=chunk if head_name == "partial_fc" else applied.get("chunk_size"),
        sample_rate=sample_rate if head_name == "partial_fc" else None,
        head_options=applied,
        head_options_ignored=ignored,
        fused_update=fused,
        step_time_s=med,
        gemm3_time_s=gmed,
        ratio_to_gemm3=med / gmed,
        step_times_s=times,
        gemm3_times_s=gtimes,
        images_per_s=world * batch / med,
        comm_per_step={k: v for k, v in stats_per_step.items() if "/" in k or k in comm.KINDS},
        peak_step_bytes=peak,
        peak_memory_kind=peak_kind,
        # driver + allocator view after the steps (max_* over the memory step when it ran): with
        # gpu_calibrate.py's context figure, what fr_dist.plan's memory model is compared against
        cuda_memory=cuda_memory(dev),
        loss_first=losses[0],
        loss_last=losses[-1],
        losses=losses,
    )


def label(r: dict) -> str:
    if r["head"] == "partial_fc":
        return "partial_fc" + ("" if r["chunk"] is None else f" chunk={r['chunk']}")
    opts = ",".join(f"{k}={v}" for k, v in sorted(r["head_options"].items()))
    return "sphereface2" + (f" {opts}" if opts else "")


def add_ratios(results: list[dict]) -> None:
    """peak_ratio_to_pfc_materialised: peak / that of Partial FC with chunk None at the same (K, W, B)."""
    base = {
        (r["num_classes"], r["world_size"], r["batch_per_rank"]): r["peak_step_bytes"]
        for r in results
        if r["head"] == "partial_fc" and r["chunk"] is None and r["peak_step_bytes"]
    }
    for r in results:
        b = base.get((r["num_classes"], r["world_size"], r["batch_per_rank"]))
        r["peak_ratio_to_pfc_materialised"] = r["peak_step_bytes"] / b if b and r["peak_step_bytes"] else None


def wire_bytes(r: dict) -> int:
    return sum(r["comm_per_step"][k]["wire_bytes"] for k in comm.KINDS)


def plot(results: list[dict], out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    from matplotlib.lines import Line2D

    worlds = sorted({r["world_size"] for r in results})
    labels = sorted({label(r) for r in results})
    colours = {W: plt.cm.tab10(i) for i, W in enumerate(worlds)}
    styles = {lab: s for lab, s in zip(labels, ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1))] * 3)}
    markers = {lab: m for lab, m in zip(labels, "osD^vP*X" * 3)}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    panels = [
        ("step time (s): fwd + bwd + SGD-momentum update", lambda r: r["step_time_s"]),
        ("peak step memory above weights/grads/state (MiB)", lambda r: (r["peak_step_bytes"] or 0) / 2**20),
        ("wire bytes per step per rank", wire_bytes),
    ]
    for ax, (title, f) in zip(axes, panels):
        for W in worlds:
            for lab in labels:
                rs = sorted(
                    (r for r in results if r["world_size"] == W and label(r) == lab),
                    key=lambda r: r["num_classes"],
                )
                ys = [f(r) for r in rs]
                if not rs or not any(y > 0 for y in ys):
                    continue
                ax.plot([r["num_classes"] for r in rs], ys, linestyle=styles[lab], marker=markers[lab],
                        color=colours[W], ms=5)  # fmt: skip
            if ax is axes[0]:  # the 3-GEMM bound of the full (unsampled) shard, per W
                rs = {r["num_classes"]: r["gemm3_time_s"] for r in results if r["world_size"] == W}
                Ks = sorted(rs)
                ax.plot(
                    Ks, [rs[k] for k in Ks], color=colours[W], linestyle="none", marker="_", ms=14, mew=2.5
                )
                ax.plot(Ks, [rs[k] for k in Ks], color=colours[W], alpha=0.25, linewidth=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("classes K")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
    handles = [Line2D([], [], color=colours[W], linewidth=3, label=f"W = {W} ranks") for W in worlds]
    handles += [
        Line2D([], [], color="k", linestyle=styles[lab], marker=markers[lab], label=lab) for lab in labels
    ]
    handles.append(Line2D([], [], color="grey", alpha=0.4, linewidth=6, label="3-GEMM bound (same process)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    save_figure(fig, out, dpi=110)


def _parse_opts(items) -> dict:
    opts = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try:
            opts[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            opts[key] = value  # a bare word, e.g. proxy_dtype=bf16
    return opts


def _chunks(values) -> list:
    return [None if str(v).lower() in ("none", "0", "dense") else int(v) for v in values]


def _configs(a) -> list[dict]:
    """run_config keyword arguments of every (head, chunk, K) point of one world size."""
    out = []
    for head in a.heads:
        for chunk in _chunks(a.pfc_chunks) if head == "partial_fc" else [None]:
            for K in a.num_classes:
                out.append(
                    dict(head_name=head, K=K, batch=a.batch, dim=a.dim, steps=a.steps, warmup=a.warmup,
                         sample_rate=a.sample_rate, lr=a.lr, chunk=chunk, sf2_opts=a.sf2_opts, log=a.log,
                         measure_memory=not a.no_memory)
                )  # fmt: skip
    return out


def _summary(r: dict) -> str:
    peak = r["peak_step_bytes"]
    ar = r["comm_per_step"]["all_reduce"]
    return (
        f"{label(r):32s} K={r['num_classes']:>8d} W={r['world_size']}: step {r['step_time_s'] * 1e3:9.1f} ms, "
        f"3-GEMM {r['gemm3_time_s'] * 1e3:9.1f} ms, ratio {r['ratio_to_gemm3']:5.2f}, "
        f"peak {'-' if peak is None else f'{peak / 2**20:8.1f} MiB'}, "
        f"all_reduce {ar['calls']}x{ar['bytes']}B, wire {wire_bytes(r)} B"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", nargs="+", default=["sphereface2", "partial_fc"])
    p.add_argument("--num-classes", nargs="+", type=int, default=[1000, 10000])
    p.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batch", type=int, default=64, help="per-rank batch")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sample-rate", type=float, default=1.0, help="Partial-FC sample rate")
    p.add_argument(
        "--pfc-chunks", nargs="+", default=["none"], help="Partial-FC chunk sizes; none = materialised"
    )
    p.add_argument("--sf2-opt", dest="sf2_opts", action="append", default=[], metavar="KEY=VALUE",
                   help="SphereFace2Head keyword (e.g. chunk_size=4096, fused_update=True, proxy_dtype=bf16)")  # fmt: skip
    p.add_argument("--max-k-for-world", nargs="*", default=[], metavar="W=K",
                   help="skip K above this for world size W, e.g. 4=100000")  # fmt: skip
    p.add_argument("--no-memory", action="store_true", help="skip the profiled memory step")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--launcher", choices=["spawn", "torchrun"], default="spawn")
    p.add_argument("--log", action="store_true", help="print every step's loss and time")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    a.sf2_opts = _parse_opts(a.sf2_opts)
    max_k = {int(w): int(k) for w, k in (item.split("=") for item in a.max_k_for_world)}

    results = []
    if a.launcher == "torchrun":
        from fr_dist.runtime import init_distributed, shutdown

        env, dev = init_distributed()
        for cfg in _configs(a):
            r = run_config(env.rank, env.world_size, device=str(dev), **cfg)
            if env.is_main:
                results.append(r)
                print(_summary(r), flush=True)
                _write(results, a, final=False)  # after every point: a cut run keeps what it measured
        if env.is_main:
            _write(results, a)
        shutdown(0)
    for W in a.world_sizes:
        for cfg in _configs(a):
            if cfg["K"] > max_k.get(W, cfg["K"]):
                continue
            r = spawn(run_config, W, threads=a.threads, **cfg)[0]
            results.append(r)
            print(_summary(r), flush=True)
            _write(results, a, final=False)  # after every point: a cut run keeps what it measured
    _write(results, a)
    return 0


def _write(results, a, final: bool = True):
    """The report so far (atomically: temp file + rename); the plot only when ``final``."""
    add_ratios(results)
    report = dict(
        benchmark="classifier",
        host=host_facts(),
        sphereface2_accepts=sorted(inspect.signature(SphereFace2Head.__init__).parameters)[1:],
        args=args_record(a),
        complete=final,
        results=results,
    )
    if a.out:
        write_json_atomic(a.out, report)
        if final:
            print(f"wrote {a.out}")
            plot(results, a.out)
    return report


if __name__ == "__main__":
    sys.exit(main())
