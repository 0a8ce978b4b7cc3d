"""Classifier-layer benchmark: SphereFace2 vs Partial-FC softmax, side by side.

Per configuration (head, K classes, world size W) it trains the class-sharded head alone on
synthetic class-clustered embeddings and reports step time, global images/s, collectives and
bytes per step (from fr_dist.comm's counters), peak memory and the loss curve.

CPU (spawns W gloo ranks itself)::

    python benchmarks/classifier.py --world-sizes 1 2 4 --num-classes 1000 20000 --steps 10

GPU (one configuration per launch; W from torchrun)::

    torchrun --nproc_per_node=8 benchmarks/classifier.py --launcher torchrun --num-classes 2000000 \\
        --batch 128 --out benchmarks/results/h100x8_202611/classifier_2M.json

Writes JSON (``--out``) and, when matplotlib is present, PNG plots beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fr_dist import comm  # noqa: E402
from fr_dist.heads import PartialFCHead, SphereFace2Head  # noqa: E402


def make_head(name: str, dim: int, K: int, sample_rate: float, grad_scale: float):
    if name == "sphereface2":
        return SphereFace2Head(dim, K, embedding_grad_scale=grad_scale, check_inputs=False)
    return PartialFCHead(
        dim,
        K,
        margin="arcface",
        sample_rate=sample_rate,
        embedding_grad_scale=grad_scale,
        check_inputs=False,
    )


def run_config(
    rank, world, head_name, K, batch, dim, steps, warmup, sample_rate, lr, device="cpu", log=False
):
    """Train the head alone; return timing, comm and memory figures for this rank."""
    dev = torch.device(device)
    head = make_head(head_name, dim, K, sample_rate, 1.0).to(dev)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1000 + rank)
    centres = torch.nn.functional.normalize(
        torch.randn(K, dim, generator=torch.Generator().manual_seed(7)), dim=1
    )
    losses, times = [], []
    stats_per_step = None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for step in range(warmup + steps):
        y = torch.randint(0, K, (batch,), generator=gen)
        x = (
            (centres[y] + 0.5 * torch.randn(batch, dim, generator=gen) / dim**0.5)
            .to(dev)
            .requires_grad_(True)
        )
        y = y.to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        comm.reset_comm_stats()
        t0 = time.perf_counter()
        loss = head(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        if step == warmup:
            stats_per_step = comm.comm_stats()
        if step >= warmup:
            times.append(dt)
        losses.append(float(loss.detach()))
        if log and rank == 0:
            s = comm.comm_stats()
            print(
                f"[{head_name:11s} K={K} W={world}] step {step:3d} loss {float(loss.detach()):8.4f} "
                f"all_gather {s['all_gather']['calls']}x {s['all_gather']['bytes']}B  "
                f"reduce_scatter {s['reduce_scatter']['calls']}x {s['reduce_scatter']['bytes']}B  "
                f"all_reduce {s['all_reduce']['calls']}x {s['all_reduce']['bytes']}B",
                flush=True,
            )
    times.sort()
    median = times[len(times) // 2]
    peak = (
        torch.cuda.max_memory_allocated(dev)
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return dict(
        head=head_name,
        num_classes=K,
        world_size=world,
        batch_per_rank=batch,
        dim=dim,
        sample_rate=sample_rate if head_name == "partial_fc" else None,
        step_time_s=median,
        images_per_s=world * batch / median,
        comm_per_step={k: v for k, v in stats_per_step.items() if "/" in k or k in comm.KINDS},
        peak_memory_bytes=int(peak),
        peak_memory_kind="cuda_max_allocated" if dev.type == "cuda" else "process_max_rss",
        loss_first=losses[0],
        loss_last=losses[-1],
        losses=losses,
    )


def _spawned(rank, world, cfg):
    torch.set_num_threads(max(1, cfg.pop("threads")))
    return run_config(rank, world, **cfg)


def plot(results: list[dict], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for head in sorted({r["head"] for r in results}):
        for W in sorted({r["world_size"] for r in results}):
            rs = sorted(
                (r for r in results if r["head"] == head and r["world_size"] == W),
                key=lambda r: r["num_classes"],
            )
            if not rs:
                continue
            Ks = [r["num_classes"] for r in rs]
            axes[0].plot(Ks, [r["step_time_s"] * 1e3 for r in rs], "o-", label=f"{head} W={W}")
            axes[1].plot(Ks, [r["images_per_s"] for r in rs], "o-", label=f"{head} W={W}")
            wire = [sum(r["comm_per_step"][k]["wire_bytes"] for k in comm.KINDS) for r in rs]
            axes[2].plot(Ks, wire, "o-", label=f"{head} W={W}")
    for ax, title in zip(axes, ["step time (ms)", "global images/s", "wire bytes / step / rank"]):
        ax.set_xscale("log")
        ax.set_xlabel("classes K")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"plot: {out.with_suffix('.png')}")


def _config(a, head: str, K: int, **extra) -> dict:
    """run_config keyword arguments of one (head, K) point of the sweep."""
    return dict(
        head_name=head,
        K=K,
        batch=a.batch,
        dim=a.dim,
        steps=a.steps,
        warmup=a.warmup,
        sample_rate=a.sample_rate,
        lr=a.lr,
        log=a.log,
        **extra,
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
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--launcher", choices=["spawn", "torchrun"], default="spawn")
    p.add_argument("--log", action="store_true", help="print every step's loss and collectives")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)

    results = []
    if a.launcher == "torchrun":
        from fr_dist.runtime import init_distributed, shutdown

        env, dev = init_distributed()
        for head in a.heads:
            for K in a.num_classes:
                cfg = _config(a, head, K, device=str(dev))
                r = run_config(env.rank, env.world_size, **cfg)
                if env.is_main:
                    results.append(r)
                    print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
        if env.is_main:
            _write(results, a)
        shutdown(0)
    from fr_dist.testing import spawn_gloo

    for W in a.world_sizes:
        for head in a.heads:
            for K in a.num_classes:
                cfg = _config(a, head, K, threads=a.threads)
                r = spawn_gloo(_spawned, W, args=(cfg,), timeout_s=1800)[0]
                results.append(r)
                print(
                    f"{head:11s} K={K:>8d} W={W}: step {r['step_time_s'] * 1e3:8.2f} ms, "
                    f"{r['images_per_s']:9.1f} img/s, loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}, "
                    f"all_reduce {r['comm_per_step']['all_reduce']['calls']}x{r['comm_per_step']['all_reduce']['bytes']}B",
                    flush=True,
                )
    _write(results, a)
    return 0


def _write(results, a):
    report = dict(
        benchmark="classifier",
        host=platform.node(),
        machine=platform.machine(),
        torch=torch.__version__,
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        results=results,
    )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {a.out}")
        plot(results, a.out)
    return report


if __name__ == "__main__":
    sys.exit(main())
