"""The largest classifier this machine trains: SphereFace2 over K identities on W gloo ranks.

    python -m benchmarks.largest_run --num-classes 10M --steps 200        # the record (minutes)
    python -m benchmarks.largest_run --smoke                              # CI: seconds

Each rank holds its shard of the K x D proxies (bf16 storage, fused SGD-momentum update, so the
[n, D] gradient never exists) and trains on synthetic clustered embeddings: a pool of ``--pool``
identities spread evenly over [0, K) (so every shard owns positives) has one random unit centre
each; a sample is its centre plus Gaussian noise, L2-normalised. ``--sample-rate`` keeps every
positive and a 1/p-weighted sample of the negatives (unbiased). The loss must fall.

Recorded per rank: peak RSS (``ru_maxrss``) and the memory ``fr_dist.plan`` predicts for the same
settings (hardware ``cpu``: this machine's RAM split over the ranks, backbone ``none``); JSON into
``benchmarks/results/<hardware>_<yyyymm>/largest_run.json``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import median, peak_rss_bytes, spawn, write_json_atomic
from fr_dist import plan as P
from fr_dist.heads import create_head
from fr_dist.heads.row_optim import RowOptimizer

ROOT = Path(__file__).resolve().parents[1]


def planner_bytes(a) -> dict:
    cfg = P.PlanConfig(
        identities=a.num_classes,
        dim=a.dim,
        gpus_per_node=a.world_size,
        nodes=1,
        batch=a.batch,
        head="sphereface2",
        sample_rate=a.sample_rate,
        proxy_dtype="bf16",
        fused_update=True,
        optimizer="sgd",
        amp="none",
        backbone="none",
    )
    hw = P.load_hardware("cpu", a.world_size)
    mem = P.memory_breakdown(cfg, hw)
    return dict(memory_per_rank=mem, max_identities=P.max_identities(cfg, hw), rank_memory=hw.memory_bytes)


def worker(rank: int, world: int, a) -> dict:
    """One rank: build its shard, train ``a.steps`` steps; its peak RSS, step time and losses."""
    rss0 = peak_rss_bytes()
    t0 = time.time()
    head = create_head(
        "sphereface2",
        embedding_size=a.dim,
        num_classes=a.num_classes,
        fused_update=True,
        proxy_dtype="bf16",
        sample_rate=a.sample_rate,
        seed=1,
    )
    head.row_optimizer = RowOptimizer(lr=a.lr, momentum=0.9, weight_decay=5e-4)
    opt_bias = torch.optim.SGD([head.bias], lr=a.lr, momentum=0.9)
    build_s = time.time() - t0
    gen = torch.Generator().manual_seed(1234)  # same pool and centres on every rank
    pool = torch.linspace(0, a.num_classes - 1, a.pool).round().long()  # [P] identities over [0, K)
    centres = torch.nn.functional.normalize(torch.randn(a.pool, a.dim, generator=gen), dim=1)  # [P, D]
    data = torch.Generator().manual_seed(99 + rank)  # each rank draws its own batch
    losses, times = [], []
    for _ in range(a.steps):
        pick = torch.randint(0, a.pool, (a.batch,), generator=data)  # [B]
        x = centres[pick] + a.noise * torch.randn(a.batch, a.dim, generator=data)  # [B, D]
        ts = time.perf_counter()
        loss = head(x, pool[pick])
        opt_bias.zero_grad(set_to_none=True)
        loss.backward()
        opt_bias.step()
        times.append(time.perf_counter() - ts)
        losses.append(float(loss.detach()))
    return dict(
        rank=rank,
        num_local=head.num_local,
        shard_bytes=head.weight.numel() * head.weight.element_size()
        + head.weight_momentum.numel() * head.weight_momentum.element_size(),
        peak_rss_bytes=peak_rss_bytes(),
        rss_before_head_bytes=rss0,
        build_s=build_s,
        step_s_median=median(times),
        losses=losses,
    )


def report(a, ranks: list[dict]) -> dict:
    """The JSON of the run (rank 0's losses; every rank's memory), written to ``a.out`` and printed."""
    losses = ranks[0]["losses"]
    first, last = losses[: max(1, a.steps // 10)], losses[-max(1, a.steps // 10) :]
    res = dict(
        settings=vars(a),
        ranks=ranks,
        loss_first=sum(first) / len(first),
        loss_last=sum(last) / len(last),
        planner=planner_bytes(a),
    )
    write_json_atomic(Path(a.out), res)  # temp file + rename: never half a file
    pred = res["planner"]["memory_per_rank"]["total"]
    for r in ranks:
        print(
            f"rank {r['rank']}: {r['num_local']:,} classes, shard {r['shard_bytes'] / 2**30:.2f} GiB, "
            f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB (planner {pred / 2**30:.2f} GiB, "
            f"{r['peak_rss_bytes'] / pred - 1:+.1%}), step {r['step_s_median'] * 1e3:.0f} ms"
        )
    print(f"loss {res['loss_first']:.4f} (first 10%) -> {res['loss_last']:.4f} (last 10%); {a.out}")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-classes", default="10M", help="K: 10M, 1.5e7 or an integer")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="per rank")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--sample-rate", type=float, default=0.01)
    p.add_argument("--pool", type=int, default=4096, help="identities that occur in the stream")
    p.add_argument("--noise", type=float, default=0.02, help="per-coordinate std around the centre")
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="K=20k, 5 steps (CI)")
    a = p.parse_args(argv)
    a.num_classes = P.parse_count(a.num_classes)
    if a.smoke:
        a.num_classes, a.steps, a.dim, a.pool = 20_000, 5, 64, 64
    if a.out is None:
        if a.smoke:
            import tempfile

            a.out = str(Path(tempfile.mkdtemp()) / "largest_run.json")
        else:
            sub = f"cpu{os.cpu_count()}_{datetime.date.today():%Y%m}"
            a.out = str(ROOT / "benchmarks" / "results" / sub / "largest_run.json")
    report(a, spawn(worker, a.world_size, timeout_s=3600, a=a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
