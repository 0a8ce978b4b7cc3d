"""Classifier-layer benchmark: every registered loss (fr_dist.heads.list_heads()) against the GEMM bound.

Per configuration (loss, K classes, world size W, batch B per rank, chunk) it trains the
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

Which heads, and how (registry-driven: a new loss file needs no edit here): ``--losses`` (default: every
registered loss; ``--heads`` is the older name). Each loss runs with its own defaults; a loss of the
*binary* family (``loss_cls.family``) with the lean settings, ``fused_update=True`` where its head takes it
(what the SphereFace2 rows of the README use; ``--no-lean`` drops it, ``--binary-opt key=value`` adds or
overrides options of every binary head); a loss of the *softmax* family once per ``--softmax-chunks`` entry:
``none`` the materialised [N, n] block, an int the chunked online softmax (default: both, ``none 8192``).
``--sample-rate`` is the softmax heads' Partial-FC rate.

Beside the JSON (``--out``) it writes ``<out>.md``, the README table (loss | family | path | K | W |
step / 3-GEMM | peak step MiB); ``--table JSON`` rewrites it from a finished JSON without running.
Results live in ``benchmarks/results/<hardware>_<yyyymm>/`` (e.g. ``cpu2_202612``: this 2-core CPU).

Why not RSS: the process high-water mark never goes down between configurations, includes the
allocator's caching and the interpreter, and cannot isolate one step; tracemalloc does not see
torch's allocations at all.

CPU (spawns W gloo ranks itself)::

    python -m benchmarks.classifier --world-sizes 1 2 --num-classes 1000 10000 100000 1000000 \\
        --pfc-chunks none 8192 --out benchmarks/results/cpu2_202611/classifier.json

Every loss at K = 10^5 and 10^6 (the README table)::

    nice python -m benchmarks.classifier --world-sizes 1 2 --num-classes 100000 1000000 --steps 4 \\
        --warmup 1 --out benchmarks/results/cpu2_202612/classifier_losses.json

Smoke (seconds, ``make bench-smoke``; ``--smoke``: every loss, K = 1000, W = 2, all configurations in one
spawned group)::

    python -m benchmarks.classifier --world-sizes 2 --num-classes 1000 --steps 3 --dim 128 --batch 16
    python -m benchmarks.classifier --smoke --out /tmp/classifier_smoke.json

Options of the binary heads (``chunk_size``, ``fused_update``, ``proxy_dtype``, ...) are passed with
``--binary-opt key=value`` (repeatable; ``--sf2-opt`` is the older name); keys a head does not accept are
reported and ignored. GPU (one configuration per launch; W from torchrun)::

    torchrun --nproc_per_node=8 -m benchmarks.classifier --launcher torchrun --num-classes 2000000 \\
        --batch 128 --out benchmarks/results/h100x8_202611/classifier_2M.json

Writes JSON (``--out``) and, when matplotlib is present, a PNG beside it.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
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
from fr_dist.heads import SphereFace2Head, list_heads
from fr_dist.heads.registry import head_class

# the lean settings of a binary-family head (the README's SphereFace2 rows): the in-pass row update
LEAN_BINARY = {"fused_update": True}
DEFAULT_SOFTMAX_CHUNKS = ["none", "8192"]
# --smoke: every loss, seconds
SMOKE = dict(
    world_sizes=[2], num_classes=[1000], steps=2, warmup=1, dim=64, batch=8, softmax_chunks=["none", "300"]
)


def _accepted(cls, opts: dict) -> tuple[dict, list]:
    """Split ``opts`` into the keywords ``cls`` accepts and the names it does not."""
    params = inspect.signature(cls.__init__).parameters
    ok = {k: v for k, v in opts.items() if k in params}
    return ok, sorted(set(opts) - set(ok))


def family(name: str) -> str:
    """The loss family of registered loss ``name``: ``binary`` | ``softmax``."""
    return head_class(name).loss_cls.family


def make_head(name: str, dim: int, K: int, sample_rate: float, chunk, sf2_opts: dict):
    """Build registered loss ``name``'s head with its defaults and: a binary head ``sf2_opts`` (its options,
    e.g. fused_update), a softmax head ``chunk`` (None: the materialised block) and ``sample_rate``;
    returns (head, options applied, options ignored)."""
    cls = head_class(name)
    if family(name) == "binary":
        want = dict(sf2_opts)
    else:
        want = {"chunk_size": chunk} if chunk is not None else {}
        if sample_rate < 1.0:
            want["sample_rate"] = sample_rate
    opts, ignored = _accepted(cls, want)
    return cls(dim, K, check_inputs=False, **opts), opts, ignored


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
    softmax = family(head_name) == "softmax"
    n_used = head.num_local if sample_rate >= 1 or not softmax else int(sample_rate * head.num_local)
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
        family=family(head_name),
        num_classes=K,
        world_size=world,
        batch_per_rank=batch,
        dim=dim,
        num_local=head.num_local,
        classes_used=n_used,
        chunk=chunk if softmax else applied.get("chunk_size"),
        sample_rate=sample_rate if softmax else None,
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


def run_configs(rank, world, configs: list[dict]) -> list[dict]:
    """:func:`run_config` for each of ``configs`` in this one process group (``--smoke``: one spawn)."""
    return [run_config(rank, world, **cfg) for cfg in configs]


def _family_of(r: dict) -> str:
    return r.get("family") or ("softmax" if r["head"] == "partial_fc" else "binary")  # older JSON: 2 heads


def path(r: dict) -> str:
    """How the head ran: softmax ``dense`` | ``chunked <c>``; binary its options (``fused_update=True``)."""
    if _family_of(r) == "softmax":
        return "dense" if r["chunk"] is None else f"chunked {r['chunk']}"
    return ",".join(f"{k}={v}" for k, v in sorted(r["head_options"].items())) or "defaults"


def label(r: dict) -> str:
    if _family_of(r) == "softmax":
        return r["head"] + ("" if r["chunk"] is None else f" chunk={r['chunk']}")
    opts = ",".join(f"{k}={v}" for k, v in sorted(r["head_options"].items()))
    return r["head"] + (f" {opts}" if opts else "")


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
    """run_config keyword arguments of every (loss, chunk, K) point of one world size: a softmax loss once
    per ``--softmax-chunks`` entry, a binary loss with the binary options (lean unless ``--no-lean``)."""
    out = []
    for head in a.losses:
        chunks = _chunks(a.softmax_chunks) if family(head) == "softmax" else [None]
        for chunk in chunks:
            for K in a.num_classes:
                out.append(
                    dict(head_name=head, K=K, batch=a.batch, dim=a.dim, steps=a.steps, warmup=a.warmup,
                         sample_rate=a.sample_rate, lr=a.lr, chunk=chunk, sf2_opts=a.sf2_opts, log=a.log,
                         measure_memory=not a.no_memory)
                )  # fmt: skip
    return out


# the planner's items that are a step's transient allocations (benchmarks/plan_vs_measured.py's TRANSIENT +
# what the loss adds): what peak_step_bytes measures
PLAN_TRANSIENT = ("logit_block", "sampled_copies", "embeddings", "comm_buffers", "loss_extras")


def planned_step_bytes(r: dict) -> int | None:
    """``fr-dist plan``'s step transients (cpu profile) for result ``r``'s configuration, or None where the
    planner cannot plan it (a loss no longer registered)."""
    from fr_dist import plan as P

    opts = r.get("head_options") or {}
    binary = _family_of(r) == "binary"
    try:
        cfg = P.PlanConfig(
            identities=r["num_classes"], dim=r["dim"], gpus_per_node=r["world_size"], nodes=1,
            batch=r["batch_per_rank"], head=r["head"], sample_rate=r.get("sample_rate") or 1.0,
            chunk_size=int(opts.get("chunk_size", 0)) if binary else 0,
            softmax_chunk=0 if binary else int(r.get("chunk") or 0),
            proxy_dtype=opts.get("proxy_dtype", "fp32") if binary else "fp32",
            fused_update=bool(r.get("fused_update")) if binary else False, optimizer="sgd", amp="none",
            head_amp=False, backbone="none", pfc_impl="fr_dist", ddp_bucket_copy=False, sf2_kernel="eager",
        )  # fmt: skip
        mem = P.memory_breakdown(cfg, P.load_hardware("cpu", r["world_size"]))
    except ValueError:
        return None
    return sum(mem[k] for k in PLAN_TRANSIENT)


def markdown_table(results: list[dict]) -> str:
    """The README table of ``results``: one row per (loss, path, K, W), by loss name; ``plan MiB`` is
    :func:`planned_step_bytes`, the planner's figure for the measured peak step memory."""
    lines = [
        "| loss | family | path | K | W | step / 3-GEMM | peak step MiB | plan MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    order = sorted(  # per loss: the dense softmax before the chunked one
        results,
        key=lambda r: (r["head"], r.get("chunk") is not None, path(r), r["num_classes"], r["world_size"]),
    )
    for r in order:
        peak, planned = r.get("peak_step_bytes"), planned_step_bytes(r)
        lines.append(
            f"| {r['head']} | {_family_of(r)} | {path(r)} | {_count(r['num_classes'])} | {r['world_size']} | "
            f"{r['ratio_to_gemm3']:.2f} | {_mib(peak)} | {_mib(planned)} |"
        )
    return "\n".join(lines) + "\n"


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _count(k: int) -> str:
    """10^5 for 100000; other counts as digits with thousands separators."""
    e = len(str(k)) - 1
    return f"10^{e}" if k == 10**e and e >= 3 else f"{k:,}"


def write_table(json_path: Path) -> Path:
    """``<json>.md`` beside ``json_path``: its results as :func:`markdown_table`."""
    report = json.loads(Path(json_path).read_text())
    md = Path(json_path).with_suffix(".md")
    args = report.get("args", {})
    head = (
        f"<!-- benchmarks.classifier: B = {args.get('batch')}/rank, D = {args.get('dim')}, "
        f"{args.get('steps')} steps after {args.get('warmup')} warm-up, host {report.get('host', {}).get('cpu_count', '?')} "
        f"CPUs; step / 3-GEMM = median step / median of the 3 GEMMs timed in the same process -->\n"
    )
    md.write_text(head + markdown_table(report["results"]))
    print(f"table: {md}")
    return md


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
    p.add_argument("--losses", "--heads", dest="losses", nargs="+", default=None, metavar="LOSS",
                   help=f"registered losses (default: all: {' '.join(list_heads())})")  # fmt: skip
    p.add_argument("--num-classes", nargs="+", type=int, default=[1000, 10000])
    p.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batch", type=int, default=64, help="per-rank batch")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sample-rate", type=float, default=1.0, help="softmax heads' Partial-FC sample rate")
    p.add_argument("--softmax-chunks", "--pfc-chunks", dest="softmax_chunks", nargs="+", default=None,
                   help=f"softmax heads' chunk sizes; none = materialised (default: {' '.join(DEFAULT_SOFTMAX_CHUNKS)})")  # fmt: skip
    p.add_argument("--binary-opt", "--sf2-opt", dest="sf2_opts", action="append", default=[], metavar="KEY=VALUE",
                   help="binary heads' keyword (e.g. chunk_size=4096, fused_update=False, proxy_dtype=bf16)")  # fmt: skip
    p.add_argument("--no-lean", action="store_true",
                   help=f"binary heads without the lean defaults {LEAN_BINARY}")  # fmt: skip
    p.add_argument("--keep-going", action="store_true",
                   help="a point that fails is listed under 'failed' in the JSON and the sweep goes on")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help=f"every loss in seconds, one spawn: {SMOKE}")
    p.add_argument("--table", type=Path, default=None, metavar="JSON",
                   help="only write the markdown table of a finished JSON (beside it, .md)")  # fmt: skip
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                   help="only merge finished JSONs (e.g. a second run for losses added later) into --out, "
                        "with its table and plot")  # fmt: skip
    p.add_argument("--max-k-for-world", nargs="*", default=[], metavar="W=K",
                   help="skip K above this for world size W, e.g. 4=100000")  # fmt: skip
    p.add_argument("--no-memory", action="store_true", help="skip the profiled memory step")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--launcher", choices=["spawn", "torchrun"], default="spawn")
    p.add_argument("--log", action="store_true", help="print every step's loss and time")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.table:
        write_table(a.table)
        return 0
    if a.merge:
        merge(a.merge, a.out)
        return 0
    if a.smoke:
        for key, value in SMOKE.items():
            setattr(a, key, value)
    a.losses = list(a.losses or list_heads())
    for name in a.losses:
        head_class(name)  # an unknown name: the error lists the registered ones
    a.softmax_chunks = a.softmax_chunks or list(DEFAULT_SOFTMAX_CHUNKS)
    a.sf2_opts = {**({} if a.no_lean else LEAN_BINARY), **_parse_opts(a.sf2_opts)}
    max_k = {int(w): int(k) for w, k in (item.split("=") for item in a.max_k_for_world)}
    a.failed = []

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
        if a.smoke:  # all configurations in one spawned group: seconds, not a spawn per point
            for r in spawn(run_configs, W, threads=a.threads, configs=_configs(a))[0]:
                results.append(r)
                print(_summary(r), flush=True)
            continue
        for cfg in _configs(a):
            if cfg["K"] > max_k.get(W, cfg["K"]):
                continue
            try:
                r = spawn(run_config, W, threads=a.threads, **cfg)[0]
            except Exception as e:  # noqa: BLE001 - a long sweep keeps going with --keep-going
                if not a.keep_going:
                    raise
                a.failed.append(dict(head=cfg["head_name"], K=cfg["K"], world_size=W, chunk=cfg["chunk"],
                                     error=f"{type(e).__name__}: {e}"[-2000:]))  # fmt: skip
                print(f"FAILED {cfg['head_name']} K={cfg['K']} W={W}: {e}", flush=True)
                continue
            results.append(r)
            print(_summary(r), flush=True)
            _write(results, a, final=False)  # after every point: a cut run keeps what it measured
    _write(results, a)
    return 0


def merge(paths: list[Path], out: Path) -> dict:
    """One report of the finished JSONs ``paths`` (results in order; each run's args, host and failures
    under ``merged_from``) written to ``out`` with its table and plot."""
    if out is None:
        raise SystemExit("--merge needs --out")
    reports = [json.loads(Path(q).read_text()) for q in paths]
    results = [r for rep in reports for r in rep["results"]]
    add_ratios(results)
    merged = dict(
        benchmark="classifier",
        host=reports[0].get("host"),
        args=reports[0].get("args"),
        complete=all(rep.get("complete") for rep in reports),
        merged_from=[
            dict(path=str(q), args=rep.get("args"), host=rep.get("host"), failed=rep.get("failed", []))
            for q, rep in zip(paths, reports)
        ],
        results=results,
        failed=[f for rep in reports for f in rep.get("failed", [])],
    )
    write_json_atomic(out, merged)
    print(f"wrote {out}")
    write_table(out)
    plot(results, out)
    return merged


def _write(results, a, final: bool = True):
    """The report so far (atomically: temp file + rename); the plot only when ``final``."""
    add_ratios(results)
    report = dict(
        benchmark="classifier",
        host=host_facts(),
        sphereface2_accepts=sorted(inspect.signature(SphereFace2Head.__init__).parameters)[1:],
        args={k: v for k, v in args_record(a).items() if k != "failed"},
        complete=final,
        results=results,
        failed=getattr(a, "failed", []),
    )
    if a.out:
        write_json_atomic(a.out, report)
        if final:
            print(f"wrote {a.out}")
            write_table(a.out)
            plot(results, a.out)
    return report


if __name__ == "__main__":
    sys.exit(main())
