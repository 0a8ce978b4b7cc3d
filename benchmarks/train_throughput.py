"""End-to-end training throughput: backbone + class-sharded head + data, for both heads.

For every (head, input source) it trains the real thing (``create_backbone`` under DDP,
``create_head`` sharded over the ranks, SGD on both, the project's loaders) and reports

* ``free``: images/s per rank and global of the unmodified step (the trainer's math: DDP
  overlaps its gradient all-reduce with the backward, no timers, no barriers);
* ``timed``: the same step cut into phases, each closed by a synchronisation point, giving the
  share of the step spent waiting on data, in the backbone (forward + backward + optimizer
  step), in the head (forward + backward + update, its own collectives excluded) and in
  collectives (the head's all-gather / reduce-scatter / all-reduce, and the backbone's
  gradient all-reduce).

Timers. A phase ends with ``torch.cuda.synchronize`` on a GPU (kernels are asynchronous) and a
``dist.barrier`` when there is more than one rank; every rank records per phase its work (to
the sync), its wall time (to the barrier exit) and the time inside collectives, and the records
are gathered over ranks. Compute costs what the slowest rank spent (max over ranks); a
collective costs what the rank that arrived last spent in it (min over ranks: on gloo the
others also waited there for it); ``sync`` is the rest of the phase's wall time (barrier
latency + rank imbalance). The phases thus add up to the wall time of the barriered step
without counting a wait twice. The head's collectives are timed by wrapping fr_dist.comm's
collectives (all traffic goes through them; a call counter checks that the timer saw every
call counted by ``comm.comm_stats``). To time the backbone's gradient all-reduce on its own,
the timed step runs the backward under ``no_sync`` and all-reduces the flattened gradients once
with ``comm.all_reduce`` (DDP's math, without its overlap). The ``free`` images/s is the
headline figure; ``timed`` costs a few barriers more.

Input sources: ``synthetic`` (in-memory tensors on the device, data time ~ 0), ``torch``
(RecordIO + DataLoader workers; on CUDA pinned memory + side-stream prefetch) and ``dali``
(``cpu`` decoder here, nvJPEG ``mixed`` on a GPU). Without ``--rec`` a synthetic RecordIO set is
generated once into ``--data-dir`` (default ``/tmp/fr_dist_bench``) and reused.

    # CPU, 2 gloo ranks spawned here, the demo's tiny iresnet (configs/demo_cpu.yaml)
    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --world-size 2 --batch 64 --steps 8 \\
        --warmup 2 --out benchmarks/results/cpu2_202611/train_throughput.json
    # merged into the same JSON / plot (--append): iresnet50 at batch 8, the tiny net at K = 100k
    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --world-size 2 --backbone iresnet50 \\
        --embedding-size 512 --backbone-kwargs '{}' --batch 8 --steps 3 --warmup 1 \\
        --sources synthetic torch --append --out benchmarks/results/cpu2_202611/train_throughput.json
    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --world-size 2 --batch 64 --steps 5 \\
        --warmup 2 --num-classes 100000 --sources synthetic torch --append --out .../train_throughput.json
    # GPU: W from torchrun, backend from fr_dist.runtime (NCCL on CUDA; with one process the
    # script still opens a 1-rank group, so every collective of the step runs through NCCL)
    torchrun --nproc_per_node=1 benchmarks/train_throughput.py --launcher torchrun \\
        --backbone iresnet50 --embedding-size 512 --backbone-kwargs '{}' --num-classes 1000000 \\
        --batch 128 --amp bf16 --out benchmarks/results/h100_202611/train_throughput.json
    # loader alone (DALI ``mixed`` on a GPU), and the largest K one device holds
    python benchmarks/train_throughput.py --mode data --sources torch dali --device cuda
    python benchmarks/train_throughput.py --mode capacity --device cuda --embedding-size 512
    # seconds-long CI smoke (2 ranks, tiny everything)
    python benchmarks/train_throughput.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fr_dist import comm  # noqa: E402
from fr_dist.data import build_train_loader  # noqa: E402
from fr_dist.heads import create_head  # noqa: E402
from fr_dist.models import create_backbone  # noqa: E402
from fr_dist.train.config import HeadConfig, TrainConfig  # noqa: E402
from fr_dist.train.engines import ParallelDims, apply_ddp  # noqa: E402
from fr_dist.train.optim import build_head_optimizer, build_optimizer, param_groups  # noqa: E402

PHASES = ("data", "backbone", "head", "comm", "sync")
# the timed step's sub-phases in order, each charged to a phase (its collectives go to "comm")
SUBPHASES = ("data", "backbone", "head", "backbone", "comm", "backbone", "head")
SOURCES = ("synthetic", "torch", "dali")
DEMO_KWARGS = {"layers": [1, 1, 1, 1], "width": 16, "stem_stride": 2}  # configs/demo_cpu.yaml


# ----------------------------------------------------------------------------- timers
class CommTimer:
    """Wraps fr_dist.comm's collectives: seconds and calls spent in them while ``active``."""

    NAMES = ("all_gather", "reduce_scatter", "all_reduce", "broadcast")

    def __init__(self, device: torch.device):
        self.device, self.active, self.seconds, self.calls = device, False, 0.0, 0
        self._orig = {n: getattr(comm, n) for n in self.NAMES}

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            _cuda_sync(self.device)
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            _cuda_sync(self.device)
            self.seconds += time.perf_counter() - t
            self.calls += 1
            return out

        return timed

    def install(self) -> None:
        # module attributes: the heads call comm.<name>, comm's autograd pairs look the names up
        # in the module globals at call time, so both go through the wrapper
        for n, fn in self._orig.items():
            setattr(comm, n, self._wrap(fn))

    def uninstall(self) -> None:
        for n, fn in self._orig.items():
            setattr(comm, n, fn)

    def take(self) -> tuple[float, int]:
        s, c = self.seconds, self.calls
        self.seconds, self.calls = 0.0, 0
        return s, c


def _cuda_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- data sources
def ensure_dataset(data_dir: Path, identities: int, per_identity: int) -> Path:
    """A synthetic RecordIO set (fr_dist.data.synthetic), generated once and reused."""
    out = data_dir / f"synthetic_{identities}x{per_identity}"
    rec = out / "train.rec"
    if (out / ".complete").exists():
        return rec
    from fr_dist.data import make_synthetic_dataset

    make_synthetic_dataset(
        out,
        num_identities=identities,
        images_per_identity=per_identity,
        heldout_identities=0,
        heldout_pairs=0,
        seed=0,
        progress=False,
    )
    (out / ".complete").write_text("ok\n")
    return rec


def endless(loader):
    """(images, labels) forever, one sampler epoch after the other (like Trainer._batches)."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def synthetic_batches(batch: int, K: int, size: int, device, rank: int, n: int = 4):
    """In-memory float32 [B, 3, S, S] images in [-1, 1] and labels < K, cycled."""
    g = torch.Generator().manual_seed(100 + rank)
    pool = [
        (
            (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device),
            torch.randint(0, K, (batch,), generator=g).to(device),
        )
        for _ in range(n)
    ]
    i = 0
    while True:
        yield pool[i % n]
        i += 1


def make_source(source: str, a, rank: int, world: int, device, K: int):
    if source == "synthetic":
        return synthetic_batches(a.batch, K, a.input_size, device, rank), "in-memory"
    backend = "dali" if source == "dali" else "torch"
    if backend == "dali":
        from fr_dist.data.dali import dali_available

        if not dali_available():
            return None, "nvidia-dali not installed"
    ld = build_train_loader(
        a.rec, rank, world, a.batch, seed=0, num_workers=a.workers, device=device, backend=backend
    )
    detail = f"{backend}, workers/threads={a.workers}"
    if backend == "dali":
        detail += ", decoder=" + ("mixed (nvJPEG)" if device.type == "cuda" else "cpu")
    elif device.type == "cuda":
        detail += ", pinned + side-stream prefetch"
    return endless(ld), detail


# ----------------------------------------------------------------------------- one configuration
def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _head_forward(head, emb, labels, device, head_dtype: str):
    """As Trainer._head_forward: the head in fp32 (or bf16 autocast), whatever the backbone's AMP."""
    if head_dtype == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return head(emb, labels)
    with torch.autocast(device.type, enabled=False):
        return head(emb.float(), labels)


def _configure_row_optimizer(head, tcfg: TrainConfig) -> None:
    """A head with a fused in-pass update (``fused_update=True``) owns its proxies' optimizer."""
    ro = getattr(head, "row_optimizer", None)
    if ro is not None:
        ro.lr, ro.momentum, ro.weight_decay = tcfg.lr, tcfg.momentum, tcfg.weight_decay


def _gather_ranks(x: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """Every rank's copy of ``x`` [...] -> [W, ...] (through the device: NCCL needs CUDA tensors)."""
    if world == 1:
        return x.unsqueeze(0)
    flat = x.reshape(1, -1).to(device)  # [1, n]
    return comm.all_gather(flat, name="bench_timers").cpu().reshape((world,) + tuple(x.shape))  # [W, ...]


def phase_breakdown(t: torch.Tensor) -> tuple[dict, float]:
    """Mean seconds per step in each of PHASES from t [W, steps, SUBPHASES, (work, wall, comm)].

    Per sub-phase and step: its compute (work minus collectives) costs what the slowest rank
    spent (max over ranks); its collectives cost what the rank that arrived last spent in them
    (min over ranks: the others also waited there for it); ``sync`` is the rest of the phase's
    wall time (barrier latency + rank imbalance). The phases add up to the barriered step's wall
    time. Also returns the mean seconds per step by which the slowest rank's work exceeded the
    mean rank's (the load imbalance inside ``sync``).
    """
    work, wall, comm_s = t[..., 0], t[..., 1], t[..., 2]  # [W, steps, sub]
    compute_max = (work - comm_s).clamp_min(0).amax(0)  # [steps, sub]
    comm_min = comm_s.amin(0)  # [steps, sub]
    wall_max = wall.amax(0)  # [steps, sub]
    sync = (wall_max - compute_max - comm_min).clamp_min(0)  # [steps, sub]
    out = {p: 0.0 for p in PHASES}
    for j, kind in enumerate(SUBPHASES):
        out[kind] += float(compute_max[:, j].mean())
        out["comm"] += float(comm_min[:, j].mean())
        out["sync"] += float(sync[:, j].mean())
    imbalance = float((work.amax(0) - work.mean(0)).sum(1).mean())
    return out, imbalance


def _max_over_ranks(x: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """Element-wise max over ranks of a CPU tensor (through the device: NCCL needs CUDA tensors)."""
    if world == 1:
        return x
    return comm.all_reduce(x.to(device), "max", name="bench_timers").cpu()


def run_config(rank: int, world: int, head_name: str, source: str, a, device, timer: CommTimer) -> dict:
    """Free-running and phase-timed steps of one (head, source); figures are max-reduced over ranks."""
    K = a.num_classes
    batches, detail = make_source(source, a, rank, world, device, K)
    if batches is None:
        return dict(head=head_name, source=source, skipped=detail)
    dims = ParallelDims(world, rank)
    torch.manual_seed(0)
    backbone = create_backbone(
        a.backbone,
        embedding_size=a.embedding_size,
        input_size=a.input_size,
        channels_last=a.channels_last,
        **a.backbone_kwargs,
    ).to(device)
    hkw = HeadConfig(name=head_name).head_kwargs()
    hkw.update(a.head_kwargs.get(head_name, {}))
    head = create_head(
        head_name,
        embedding_size=a.embedding_size,
        num_classes=K,
        seed=0,
        embedding_grad_scale=dims.embedding_grad_scale,
        check_finite=False,
        **hkw,
    ).to(device)
    bb = apply_ddp(backbone, dims, device).module  # the (DDP-wrapped) module; the optimizer follows
    tcfg = TrainConfig(lr=a.lr)
    opt_bb = build_optimizer(
        "sgd", param_groups(backbone, a.lr, tcfg.weight_decay), lr=a.lr, weight_decay=tcfg.weight_decay
    )
    opt_head = build_head_optimizer(head, tcfg)
    _configure_row_optimizer(head, tcfg)
    scaler = torch.amp.GradScaler(device.type, enabled=a.amp == "fp16" and device.type == "cuda")
    params = [p for p in backbone.parameters() if p.requires_grad]
    losses = []

    def optim_steps():
        # the head's gradients carry the loss scale too: unscale both before stepping
        scaler.step(opt_bb)
        scaler.step(opt_head)
        scaler.update()
        opt_bb.zero_grad(set_to_none=True)
        opt_head.zero_grad(set_to_none=True)

    def free_step():
        imgs, labels = next(batches)
        with _autocast(device, a.amp):
            emb = bb(imgs)  # [B, D]
        loss = _head_forward(head, emb, labels, device, a.head_dtype)
        scaler.scale(loss).backward()
        optim_steps()
        losses.append(float(loss.detach()))

    def no_sync():
        return bb.no_sync() if hasattr(bb, "no_sync") else contextlib.nullcontext()

    def timed_step() -> tuple[torch.Tensor, int]:
        """[sub-phase, (work, wall, comm)] seconds of this rank (sub-phases: SUBPHASES), comm calls."""
        t = torch.zeros(len(SUBPHASES), 3, dtype=torch.float64)
        state = dict(i=0, start=0.0)

        def begin() -> None:
            state["start"] = time.perf_counter()

        def close(comm_s: float = 0.0) -> None:
            """End sub-phase i: its work (to the device sync), its wall (to the barrier exit)."""
            _cuda_sync(device)
            work = time.perf_counter() - state["start"]
            _barrier(world)
            t[state["i"]] = torch.tensor([work, time.perf_counter() - state["start"], comm_s])
            state["i"] += 1
            state["start"] = time.perf_counter()

        _cuda_sync(device)
        _barrier(world)
        begin()
        imgs, labels = next(batches)
        close()  # data
        with no_sync():
            with _autocast(device, a.amp):
                emb = bb(imgs)  # [B, D]
        close()  # backbone forward
        timer.active = True
        emb_d = emb.detach().requires_grad_(True)  # the head's graph apart from the backbone's
        loss = _head_forward(head, emb_d, labels, device, a.head_dtype)
        scaler.scale(loss).backward()
        timer.active = False
        head_comm, head_calls = timer.take()
        close(head_comm)  # head forward + backward (its collectives: head_comm)
        with no_sync():
            emb.backward(emb_d.grad.to(emb.dtype))
        close()  # backbone backward
        if world > 1:  # DDP's gradient averaging, as one flat all-reduce
            flat = torch.cat([p.grad.reshape(-1) for p in params])  # [sum of numel]
            flat = comm.all_reduce(flat, name="backbone_grads").div_(world)
            off = 0
            for p in params:
                n = p.numel()
                p.grad.copy_(flat[off : off + n].view_as(p.grad))  # [numel] -> p's shape
                off += n
        dp = time.perf_counter() - state["start"]
        close(dp)  # backbone gradient all-reduce: all of it is communication
        scaler.unscale_(opt_bb)
        scaler.step(opt_bb)
        opt_bb.zero_grad(set_to_none=True)
        close()  # backbone optimizer step
        scaler.step(opt_head)
        scaler.update()
        opt_head.zero_grad(set_to_none=True)
        close()  # head update
        losses.append(float(loss.detach()))
        return t, head_calls + (1 if world > 1 else 0)

    # ---- warm-up (allocator, cudnn autotune, worker start-up, DALI pipeline build)
    for _ in range(a.warmup):
        free_step()
    # ---- free-running steps: the headline images/s
    _cuda_sync(device)
    _barrier(world)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        free_step()
    _cuda_sync(device)
    free_s = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    free_s = float(_max_over_ranks(free_s, world, device))
    # ---- phase-timed steps: the breakdown
    comm.reset_comm_stats()
    timer.install()
    try:
        rows = [timed_step() for _ in range(a.steps)]
    finally:
        timer.uninstall()
    stats = comm.comm_stats()
    counted = sum(stats[k]["calls"] for k in comm.KINDS)
    mine = torch.stack([r[0] for r in rows])  # [steps, sub-phases, 3] on this rank
    calls = sum(r[1] for r in rows)
    phases, imbalance = phase_breakdown(_gather_ranks(mine, world, device))
    timed_total = sum(phases.values())
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    out = dict(
        head=head_name,
        source=source,
        source_detail=detail,
        head_kwargs=hkw,
        num_classes=K,
        batch_per_rank=a.batch,
        world_size=world,
        free=dict(
            step_s=free_s / a.steps,
            images_per_s_global=world * a.batch * a.steps / free_s,
            images_per_s_per_rank=a.batch * a.steps / free_s,
        ),
        timed=dict(
            step_s=timed_total,
            images_per_s_global=world * a.batch / timed_total,
            images_per_s_per_rank=a.batch / timed_total,
            phase_s=phases,
            share={p: v / timed_total for p, v in phases.items()},
            imbalance_s=imbalance,
        ),
        comm_calls_timed=int(calls),
        comm_calls_counted=int(counted),
        comm_bytes_per_step={
            k: stats[k]["bytes"] // max(1, a.steps) for k in comm.KINDS if stats[k]["calls"]
        },
        peak_memory_bytes=int(peak),
        peak_memory_kind="cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        loss_first=losses[0],
        loss_last=losses[-1],
    )
    return out


def run_all(rank: int, world: int, a) -> list[dict]:
    """Every (head, source) of the sweep on this rank (one process start for all of them)."""
    device = torch.device(a.device_resolved)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timer = CommTimer(device)
    results = []
    for source in a.sources:
        for head in a.heads:
            r = run_config(rank, world, head, source, a, device, timer)
            if rank == 0 and "skipped" not in r:
                sh = r["timed"]["share"]
                print(
                    f"[{a.backbone} B={a.batch} W={world} K={a.num_classes}] {head:11s} {source:9s} "
                    f"{r['free']['images_per_s_global']:8.1f} img/s global "
                    f"({r['free']['images_per_s_per_rank']:.1f}/rank); timed step "
                    f"{r['timed']['step_s'] * 1e3:7.1f} ms: data {sh['data']:.0%} backbone "
                    f"{sh['backbone']:.0%} head {sh['head']:.0%} comm {sh['comm']:.0%} sync {sh['sync']:.0%}",
                    flush=True,
                )
            elif rank == 0:
                print(f"{head} {source}: skipped ({r['skipped']})", flush=True)
            results.append(r)
    return results


def _spawned(rank: int, world: int, a) -> list[dict]:
    torch.set_num_threads(max(1, a.threads))
    warnings.filterwarnings("ignore", message=".*broadcast_buffers", category=FutureWarning)
    return run_all(rank, world, a)


# ----------------------------------------------------------------------------- loader-only mode
def run_data(a) -> list[dict]:
    """Images/s of each loader alone on one process (``dali`` on CUDA = nvJPEG ``mixed`` decode)."""
    device = torch.device(a.device_resolved)
    out = []
    for source in a.sources:
        if source == "synthetic":
            continue
        batches, detail = make_source(source, a, 0, 1, device, a.num_classes)
        if batches is None:
            out.append(dict(source=source, skipped=detail))
            continue
        for _ in range(a.warmup):
            next(batches)
        _cuda_sync(device)
        t0, n = time.perf_counter(), 0
        for _ in range(a.steps):
            imgs, _labels = next(batches)
            n += imgs.shape[0]
        _cuda_sync(device)
        dt = time.perf_counter() - t0
        assert imgs.device.type == device.type and imgs.dtype == torch.float32
        r = dict(source=source, source_detail=detail, device=str(device), images=n, seconds=dt)
        r["images_per_s"] = n / dt
        print(f"data {source:6s} on {device}: {r['images_per_s']:9.1f} img/s ({detail})", flush=True)
        out.append(r)
    return out


# ----------------------------------------------------------------------------- capacity mode
def _head_on_device(name: str, K: int, a, device):
    """The head with K classes built on the meta device, then materialised on ``device`` (no
    CPU-side initialisation of a [K, D] matrix)."""
    hkw = HeadConfig(name=name).head_kwargs()
    hkw.update(a.head_kwargs.get(name, {}))
    with torch.device("meta"):
        head = create_head(name, embedding_size=a.embedding_size, num_classes=K, check_inputs=False, **hkw)
    head = head.to_empty(device=device)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.01) if p.dim() >= 2 else p.zero_()
        for b in head.buffers():  # momentum rows, fp32 master rows: defined before the first step
            b.zero_()
        if hasattr(head, "weight_master"):
            head.weight_master.copy_(head.weight.float())
    return head


def _try_capacity(name: str, K: int, a, device) -> dict:
    """Build the head with K classes and run 2 SGD steps; peak memory or the OOM."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    head = opt = None
    try:
        head = _head_on_device(name, K, a, device)
        tcfg = TrainConfig(lr=a.lr)
        opt = build_head_optimizer(head, tcfg)
        _configure_row_optimizer(head, tcfg)
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            x = torch.nn.functional.normalize(torch.randn(a.batch, a.embedding_size, generator=g), dim=1)
            y = torch.randint(0, K, (a.batch,), generator=g)
            x, y = x.to(device).requires_grad_(True), y.to(device)
            loss = _head_forward(head, x, y, device, a.head_dtype)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _cuda_sync(device)
        if device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
        else:  # no allocator statistics on CPU: the head's resident state only (not a peak)
            tensors = list(head.parameters()) + list(head.buffers())
            peak = sum(t.numel() * t.element_size() for t in tensors)
            peak += sum(s.numel() * s.element_size() for g in opt.state.values() for s in g.values())
            kind = "cpu_state_bytes"
        return dict(
            head=name, K=K, fits=True, peak_bytes=int(peak), peak_kind=kind, loss=float(loss.detach())
        )
    except torch.OutOfMemoryError as e:
        return dict(head=name, K=K, fits=False, error=str(e).split("\n")[0][:200])
    finally:
        del head, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _planner(name: str, K: int, a, gpu_name: str) -> dict:
    """``fr-dist plan`` for one device at K (guarded: the planner may be absent)."""
    try:
        import fr_dist.plan  # noqa: F401
    except ImportError:
        return dict(skipped="fr_dist.plan not available")
    hw = "cpu"
    for key, prof in (
        ("H200", "h200-141gb"),
        ("H100", "h100-80gb"),
        ("A100", "a100-80gb"),
        ("V100", "v100-32gb"),
    ):
        if key in gpu_name.upper():
            hw = prof
    cmd = [
        sys.executable, "-m", "fr_dist.cli", "plan", "--identities", str(K), "--dim", str(a.embedding_size),
        "--gpus-per-node", "1", "--nodes", "1", "--batch", str(a.batch), "--head", name,
        "--hardware", hw, "--backbone", a.plan_backbone, "--amp", "none", "--json",
    ]  # fmt: skip
    hkw = a.head_kwargs.get(name, {})
    for key, flag in (
        ("proxy_dtype", "--proxy-dtype"),
        ("chunk_size", "--chunk-size"),
        ("sample_rate", "--sample-rate"),
    ):
        if key in hkw:
            cmd += [flag, str(hkw[key])]
    if name == "sphereface2":
        cmd += ["--fused-update" if hkw.get("fused_update") else "--no-fused-update"]
        if hkw.get("master_weights"):
            cmd += ["--fp32-master"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            return dict(cmd=" ".join(cmd), error=(p.stderr or p.stdout)[-400:])
        res = json.loads(p.stdout)
        return dict(
            cmd=" ".join(cmd),
            hardware=hw,
            fits=res.get("fits"),
            max_identities=res.get("max_identities"),
            memory_total_bytes=(res.get("memory_per_gpu") or {}).get("total"),
        )
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        return dict(cmd=" ".join(cmd), error=str(e)[:400])


def run_capacity(a) -> list[dict]:
    """Largest K that fits one device, per head: doubling from ``--k-start``, then bisection."""
    device = torch.device(a.device_resolved)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = []
    for name in a.heads:
        t0 = time.perf_counter()
        trials, lo, hi = [], None, None
        K = a.k_start
        while K <= a.k_max and time.perf_counter() - t0 < a.capacity_budget_s:
            r = _try_capacity(name, K, a, device)
            trials.append(r)
            print(f"capacity {name} K={K:,}: {'fits' if r['fits'] else 'OOM'}", flush=True)
            if not r["fits"]:
                hi = K
                break
            lo = r
            K *= 2
        while hi is not None and lo is not None and hi - lo["K"] > max(lo["K"] // 16, 1):
            if time.perf_counter() - t0 >= a.capacity_budget_s:
                break
            mid = (lo["K"] + hi) // 2
            r = _try_capacity(name, mid, a, device)
            trials.append(r)
            print(f"capacity {name} K={mid:,}: {'fits' if r['fits'] else 'OOM'}", flush=True)
            if r["fits"]:
                lo = r
            else:
                hi = mid
        best = lo or {}
        rec = dict(
            head=name,
            head_kwargs=a.head_kwargs.get(name, {}),
            device=gpu,
            max_k_measured=best.get("K"),
            first_oom_k=hi,
            peak_bytes_at_max=best.get("peak_bytes"),
            device_total_bytes=(
                torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
            ),
            trials=trials,
        )
        if best:
            rec["planner"] = _planner(name, best["K"], a, gpu)
            pl = rec["planner"].get("memory_total_bytes")
            if pl and device.type == "cuda":
                rec["planner_vs_measured_memory"] = pl / best["peak_bytes"]
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- output
def plot(results: list[dict], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    groups = {}
    for r in results:
        if "timed" in r:
            groups.setdefault(r["group"], []).append(r)
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(max(7.5, 6.5 * len(groups)), 4.8), squeeze=False)
    colors = dict(data="#9e9e9e", backbone="#1f77b4", head="#ff7f0e", comm="#2ca02c", sync="#d62728")
    for ax, (group, rs) in zip(axes[0], groups.items()):
        labels = [f"{r['head']}\n{r['source']}" for r in rs]
        bottom = [0.0] * len(rs)
        for p in PHASES:
            vals = [r["timed"]["phase_s"][p] * 1e3 for r in rs]
            ax.bar(labels, vals, bottom=bottom, color=colors[p], label=p)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for i, r in enumerate(rs):
            ips = r["free"]["images_per_s_global"]
            ax.annotate(
                f"{ips:.0f} img/s" if ips >= 10 else f"{ips:.1f} img/s",
                (i, bottom[i]),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_ylim(0, max(bottom) * 1.15)
        ax.set_ylabel("timed step (ms), split by phase")
        ax.set_title(group, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=len(PHASES), frameon=False)
    fig.suptitle("training step split by phase (bars) and free-running global images/s (labels)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"plot: {out.with_suffix('.png')}")


def _host() -> dict:
    h = dict(
        node=platform.node(),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    )
    try:
        h["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    return h


def write(results: list[dict], a, world: int) -> dict:
    group = (
        f"{a.backbone} D={a.embedding_size} B={a.batch}/rank W={world} K={a.num_classes} "
        f"{a.device_resolved} amp={a.amp} head={a.head_dtype}"
    )
    if a.mode != "train":
        group = f"{a.mode} D={a.embedding_size} B={a.batch} {a.device_resolved} head={a.head_dtype}"
    if a.head_kwargs:
        group += f" {json.dumps(a.head_kwargs, sort_keys=True)}"
    for r in results:
        r["group"] = group
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    backend = dist.get_backend() if dist.is_initialized() else ("gloo (spawned)" if world > 1 else None)
    run = dict(
        group=group, mode=a.mode, world_size=world, backend=backend, args=args, host=_host(), results=results
    )
    report = dict(benchmark="train_throughput", notes=__doc__.split("\n\n")[1:4], runs=[run])
    if a.out is not None and a.append and a.out.exists():  # keep the other groups' runs
        old = json.loads(a.out.read_text())
        report["runs"] = [r for r in old.get("runs", []) if r["group"] != group or r["mode"] != a.mode] + [
            run
        ]
    text = json.dumps(report, indent=1)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
        print(f"wrote {a.out}")
        plot([r for run_ in report["runs"] for r in run_["results"]], a.out)
    else:
        print(json.dumps(run["results"], indent=1))
    return report


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["train", "data", "capacity"], default="train")
    p.add_argument("--heads", nargs="+", default=["sphereface2", "partial_fc"])
    p.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    p.add_argument("--backbone", default="iresnet")
    p.add_argument("--backbone-kwargs", type=json.loads, default=DEMO_KWARGS, help="JSON (default: demo's)")
    p.add_argument("--embedding-size", type=int, default=128)
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--num-classes", type=int, default=0, help="K (0: the dataset's identities)")
    p.add_argument(
        "--head-kwargs",
        type=json.loads,
        default={},
        help='per-head constructor extras, JSON: {"sphereface2": {"chunk_size": 65536}, "partial_fc": {...}}',
    )
    p.add_argument("--head-dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="backbone autocast")
    p.add_argument("--batch", type=int, default=64, help="images per rank per step")
    p.add_argument("--steps", type=int, default=10, help="free-running steps, then as many timed ones")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=1, help="torch DataLoader workers / DALI threads per rank")
    p.add_argument("--rec", default=None, help="RecordIO file (default: a generated synthetic set)")
    p.add_argument("--identities", type=int, default=1000, help="generated set: identities")
    p.add_argument("--images-per-identity", type=int, default=16, help="generated set: images each")
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/fr_dist_bench"))
    p.add_argument("--world-size", type=int, default=2, help="gloo ranks spawned here (--launcher spawn)")
    p.add_argument("--launcher", choices=["spawn", "torchrun"], default="spawn")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--k-start", type=int, default=1_000_000, help="capacity: first K")
    p.add_argument("--k-max", type=int, default=2_000_000_000, help="capacity: stop doubling here")
    p.add_argument("--capacity-budget-s", type=float, default=150.0, help="capacity: seconds per head")
    p.add_argument(
        "--plan-backbone", default="none", help="capacity: --backbone of fr-dist plan (none: the head alone)"
    )
    p.add_argument("--out", type=Path, default=None, help="JSON here (PNG beside it)")
    p.add_argument("--append", action="store_true", help="merge into an existing --out (other groups kept)")
    p.add_argument("--smoke", action="store_true", help="seconds-long CI run: 2 ranks, tiny sizes")
    a = p.parse_args(argv)
    if a.smoke:
        a.batch, a.steps, a.warmup, a.identities, a.images_per_identity = 8, 2, 1, 32, 4
        a.backbone_kwargs = dict(DEMO_KWARGS, width=8)
        a.embedding_size, a.k_start, a.k_max, a.capacity_budget_s = 32, 256, 1024, 30.0
        a.world_size = min(a.world_size, 2)
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    a.device_resolved = "cuda:0" if cuda else "cpu"
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.mode == "capacity":
        write(run_capacity(a), a, 1)
        return 0
    if a.rec is None and any(s != "synthetic" for s in a.sources):
        a.rec = str(ensure_dataset(a.data_dir, a.identities, a.images_per_identity))
    if a.num_classes <= 0:
        if a.rec is not None:
            from fr_dist.data import open_recordio

            a.num_classes = open_recordio(a.rec).num_classes
        else:
            a.num_classes = a.identities
    if a.mode == "data":
        write(run_data(a), a, 1)
        return 0
    if a.launcher == "torchrun":
        from fr_dist.runtime import backend_for, init_distributed, shutdown

        env, dev = init_distributed(a.device)
        if not dist.is_initialized():  # one process: a group anyway, so collectives run on NCCL/gloo
            dist.init_process_group(
                backend_for(dev),
                init_method="env://",
                rank=0,
                world_size=1,
                **({"device_id": dev} if dev.type == "cuda" else {}),
            )
        a.device_resolved = str(dev)
        code = 0
        try:
            results = run_all(env.rank, env.world_size, a)
            if env.is_main:
                write(results, a, env.world_size)
        except Exception:  # noqa: BLE001 - printed, then a clean exit code
            import traceback

            traceback.print_exc()
            code = 1
        shutdown(code)
    from fr_dist.testing import spawn_gloo

    results = spawn_gloo(_spawned, a.world_size, args=(a,), timeout_s=3600)[0]
    write(results, a, a.world_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
