"""End-to-end training throughput: the trainer's own step, ``Trainer.train_step``, for both heads.

For every (head, input source) it builds the real :class:`~fr_dist.train.trainer.Trainer` from a config
(``fr_dist.train.config_load.load_config``: the backbone under DDP, the class-sharded head, both optimizers,
the LR schedules, clipping and the GradScaler of ``fr-dist train``), feeds it the source's batches and
times ``train_step`` itself; it reports

* ``free``: images/s per rank and global of the unmodified step (DDP overlaps its gradient all-reduce with
  the backward; no hooks, no barriers);
* ``timed``: the same ``train_step`` cut into phases, each closed by a synchronisation point, giving the
  share of the step spent waiting on data, in the backbone (forward + backward + optimizer step), in the
  head (forward + backward + update, its own collectives excluded) and in collectives (the head's
  all-gather / reduce-scatter / all-reduce, and the backbone's gradient all-reduce).

Timers. The timed step is the same ``train_step`` call with hooks marking where its sub-phases end: the
batch iterator returning (data), the head's forward pre-hook (backbone forward), the gradient of the
head's input embeddings (a tensor hook: head forward + backward), the backbone optimizer's step pre-hook
(backbone backward, unscale and clip) and post-hook (its update), ``train_step`` returning (head update +
LR schedules). A sub-phase ends with ``torch.cuda.synchronize`` on a GPU (kernels are asynchronous) and
a ``dist.barrier`` when there is more than one rank; every rank records per sub-phase its work (to the
sync), its wall time (to the barrier exit) and the time inside collectives, and the records are gathered
over ranks. Compute costs what the slowest rank spent (max over ranks); a collective costs what the rank
that arrived last spent in it (min over ranks: on gloo the others also waited there for it); ``sync`` is
the rest of the sub-phase's wall time (barrier latency + rank imbalance). The phases thus add up to the
wall time of the barriered step without counting a wait twice. Collectives are timed by wrapping
fr_dist.comm's (all of the head's traffic goes through them; a call counter checks that the timer saw
every call counted by ``comm.comm_stats``). To time the backbone's gradient all-reduce on its own, the
timed steps (after the free ones) run DDP with a communication hook that all-reduces each gradient bucket
with ``comm.all_reduce`` at once (DDP's math, without its overlap). The ``free`` images/s is the headline
figure; ``timed`` costs a few barriers more.

Input sources: ``synthetic`` (in-memory tensors on the device, data time ~ 0), ``torch`` (RecordIO +
DataLoader workers; on CUDA pinned memory + side-stream prefetch) and ``dali`` (``cpu`` decoder here,
nvJPEG ``mixed`` on a GPU): the trainer's own loader (``fr_dist.train.run.build_trainer``, ``data.loader``).
Without ``--rec`` a synthetic RecordIO set is generated once into ``--data-dir`` (default
``/tmp/fr_dist_bench``) and reused. ``--set KEY=VALUE`` passes any other config override
(``train.clip_grad_norm=0``, ``head.sphereface2.fused_update=true``, ...).

    # CPU, 2 gloo ranks spawned here, the demo's tiny iresnet (configs/demo_cpu.yaml)
    OMP_NUM_THREADS=1 python -m benchmarks.train_throughput --world-size 2 --batch 64 --steps 8 \\
        --warmup 2 --out benchmarks/results/cpu2_202611/train_throughput.json
    # merged into the same JSON / plot (--append): iresnet50 at batch 8, the tiny net at K = 100k
    OMP_NUM_THREADS=1 python -m benchmarks.train_throughput --world-size 2 --backbone iresnet50 \\
        --embedding-size 512 --backbone-kwargs '{}' --batch 8 --steps 3 --warmup 1 \\
        --sources synthetic torch --append --out benchmarks/results/cpu2_202611/train_throughput.json
    OMP_NUM_THREADS=1 python -m benchmarks.train_throughput --world-size 2 --batch 64 --steps 5 \\
        --warmup 2 --num-classes 100000 --sources synthetic torch --append --out .../train_throughput.json
    # GPU: W from torchrun, backend from fr_dist.runtime (NCCL on CUDA; with one process the
    # script still opens a 1-rank group, so every collective of the step runs through NCCL)
    torchrun --nproc_per_node=1 -m benchmarks.train_throughput --launcher torchrun \\
        --backbone iresnet50 --embedding-size 512 --backbone-kwargs '{}' --num-classes 1000000 \\
        --batch 128 --amp bf16 --out benchmarks/results/h100_202611/train_throughput.json
    # loader alone (DALI ``mixed`` on a GPU), and the largest K one device holds
    python -m benchmarks.train_throughput --mode data --sources torch dali --device cuda
    python -m benchmarks.train_throughput --mode capacity --device cuda --embedding-size 512
    # seconds-long CI smoke (2 ranks, tiny everything)
    python -m benchmarks.train_throughput --smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks._common import (
    args_record,
    cuda_memory,
    cuda_sync,
    host_facts,
    peak_rss_bytes,
    pyplot,
    save_figure,
    spawn,
    synthetic_recordio,
    write_json_atomic,
)
from benchmarks.gpu_calibrate import base_profile, head_plan_kwargs
from fr_dist import comm
from fr_dist.data import build_train_loader
from fr_dist.heads import create_head
from fr_dist.runtime import DistEnv
from fr_dist.train.config import HeadConfig, TrainConfig
from fr_dist.train.config_load import load_config
from fr_dist.train.optim import build_head_optimizer, row_optimizer_args
from fr_dist.train.run import build_trainer
from fr_dist.train.trainer import Trainer

PHASES = ("data", "backbone", "head", "comm", "sync")
# the timed step's sub-phases in order (StepTimer's marks), each charged to a phase; the collectives
# inside a sub-phase (the head's, the backbone's gradient all-reduce in its backward) go to "comm"
SUBPHASES = ("data", "backbone", "head", "backbone", "backbone", "head")
SUBPHASE_NAMES = ("data", "backbone_forward", "head_forward_backward", "backbone_backward", "backbone_update",
                  "head_update")  # fmt: skip
DATA, BACKBONE_FWD, HEAD, BACKBONE_BWD, BACKBONE_STEP, HEAD_STEP = range(len(SUBPHASES))
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
            cuda_sync(self.device)
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            cuda_sync(self.device)
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


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _bucket_all_reduce(world: int):
    """A DDP communication hook: each gradient bucket averaged over ranks by ``comm.all_reduce`` before
    the hook returns (DDP's math without its overlap; the collective is timed and counted by fr_dist.comm)."""

    def hook(state, bucket):
        fut = torch.futures.Future()
        fut.set_result(comm.all_reduce(bucket.buffer(), name="backbone_grads") / world)  # [bucket numel]
        return fut

    return hook


class StepTimer:
    """Cuts ``trainer.train_step`` into SUBPHASES at hooks (module docstring) while installed: per timed
    step, this rank's [sub-phase, (work, wall, comm)] seconds."""

    def __init__(self, trainer: Trainer, world: int, timer: CommTimer):
        self.trainer, self.world, self.timer = trainer, world, timer
        self.row, self.start, self.calls, self.handles = None, 0.0, 0, []

    def install(self) -> None:
        opt = self.trainer.bb.optimizer
        self.handles = [
            self.trainer.head.register_forward_pre_hook(self._head_starts),
            opt.register_step_pre_hook(lambda *_: self.close(BACKBONE_BWD)),
            opt.register_step_post_hook(lambda *_: self.close(BACKBONE_STEP)),
        ]
        ddp = self.trainer.bb.module
        if self.world > 1 and hasattr(ddp, "register_comm_hook"):  # once: the free steps ran without it
            ddp.register_comm_hook(None, _bucket_all_reduce(self.world))
        comm.reset_comm_stats()
        self.timer.install()
        self.timer.active = True

    def uninstall(self) -> None:
        self.timer.active = False
        self.timer.uninstall()
        for h in self.handles:
            h.remove()

    def _head_starts(self, module, args) -> None:
        self.close(BACKBONE_FWD)
        emb = args[0]  # [B, D], what the head differentiates: its gradient ends the head's backward
        if emb.requires_grad:
            emb.register_hook(lambda grad: self.close(HEAD))

    def batches(self, source):
        """``source``'s batches, the data sub-phase closed as each is handed over."""
        for batch in source:
            self.close(DATA)
            yield batch

    def close(self, i: int) -> None:
        """End sub-phase ``i``: its work (to the device sync), its wall (to the barrier exit), its collectives."""
        cuda_sync(self.trainer.device)
        work = time.perf_counter() - self.start
        _barrier(self.world)
        comm_s, calls = self.timer.take()
        self.row[i] += torch.tensor([work, time.perf_counter() - self.start, comm_s], dtype=torch.float64)
        self.calls += calls
        self.start = time.perf_counter()

    def step(self, batches) -> dict:
        """One barriered ``train_step``; its sub-phases added to ``self.row``."""
        cuda_sync(self.trainer.device)
        _barrier(self.world)
        self.timer.take()
        self.start = time.perf_counter()
        out = self.trainer.train_step(batches)
        self.close(HEAD_STEP)
        return out


# ----------------------------------------------------------------------------- data sources
def endless(loader):
    """(images, labels) forever, one sampler epoch after the other (the loader alone: ``--mode data``)."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


class InMemoryLoader:
    """The ``synthetic`` source as the trainer's loader: ``n`` in-memory batches of float32 [B, 3, S, S]
    images in [-1, 1] and labels < K on the device, one epoch = the ``n`` batches (data time ~ 0)."""

    def __init__(self, batch: int, K: int, size: int, device, rank: int, n: int = 4):
        g = torch.Generator().manual_seed(100 + rank)
        self.pool = [
            (
                (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device),
                torch.randint(0, K, (batch,), generator=g).to(device),
            )
            for _ in range(n)
        ]
        self.sampler = self  # the trainer sets the sampler's epoch: nothing to reshuffle

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.pool)

    def __iter__(self):
        return iter(self.pool)


def _dali_missing() -> str | None:
    from fr_dist.data.dali import dali_available

    return None if dali_available() else "nvidia-dali not installed"


def source_detail(source: str, a, device) -> str:
    if source == "synthetic":
        return "in-memory"
    detail = f"{source}, workers/threads={a.workers}"
    if source == "dali":
        return detail + ", decoder=" + ("mixed (nvJPEG)" if device.type == "cuda" else "cpu")
    return detail + (", pinned + side-stream prefetch" if device.type == "cuda" else "")


def make_source(source: str, a, rank: int, world: int, device):
    """The loader alone (``--mode data``): endless batches of ``build_train_loader``, or (None, why not)."""
    if source == "dali" and _dali_missing():
        return None, _dali_missing()
    ld = build_train_loader(
        a.rec, rank, world, a.batch, seed=0, num_workers=a.workers, device=device, backend=source
    )
    return endless(ld), source_detail(source, a, device)


# ----------------------------------------------------------------------------- one configuration
def config_overrides(a, head_name: str, source: str, output_dir: str) -> list[str]:
    """``fr-dist train`` overrides of one (head, source): the benchmark's flags, then ``--set``."""
    ov = {
        "output_dir": output_dir,
        "device": "cuda" if a.device_resolved.startswith("cuda") else "cpu",
        "model.name": a.backbone,
        "model.embedding_size": a.embedding_size,
        "model.input_size": a.input_size,
        "model.channels_last": a.channels_last,
        "model.kwargs": a.backbone_kwargs,
        "head.name": head_name,
        "head.dtype": a.head_dtype,
        "data.rec": a.rec or "in-memory",
        "data.num_classes": a.num_classes,
        "data.batch_size": a.batch,
        "data.num_workers": a.workers,
        "data.loader": "torch" if source == "synthetic" else source,
        "train.lr": a.lr,
        "train.amp": a.amp,
        "train.max_steps": 10**6,  # the poly schedule barely moves the LR over the measured steps
        "train.tensorboard": False,
        "checkpoint.save_at_end": False,
        "checkpoint.save_on_signal": False,
    }
    ov.update({f"head.{head_name}.{k}": v for k, v in a.head_kwargs.get(head_name, {}).items()})
    return [f"{k}={json.dumps(v)}" for k, v in ov.items()] + list(a.set)  # JSON values are YAML


def make_trainer(rank: int, world: int, head_name: str, source: str, a, device, output_dir: str):
    """The Trainer of one (head, source) on this rank (``train_step`` is what is timed) and its overrides."""
    overrides = config_overrides(a, head_name, source, output_dir)
    cfg = load_config(None, overrides, check_paths=False)
    env = DistEnv(rank=rank, world_size=world)
    if source == "synthetic":
        loader = InMemoryLoader(a.batch, a.num_classes, a.input_size, device, rank)
        trainer = Trainer(cfg, env, device, loader, a.num_classes)
    else:
        trainer = build_trainer(cfg, env, device)  # the training's own loader (data.loader)
    return trainer, overrides


def run_config(rank: int, world: int, head_name: str, source: str, a, device, timer: CommTimer) -> dict:
    """Free-running and phase-timed ``train_step`` calls of one (head, source); figures max-reduced over ranks."""
    if source == "dali" and _dali_missing():
        return dict(head=head_name, source=source, skipped=_dali_missing())
    if device.type == "cuda":  # this configuration's own peak (the previous ones are freed by now)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="fr_dist_tt_") as run_dir:
        trainer, overrides = make_trainer(rank, world, head_name, source, a, device, run_dir)
        try:
            return _measure(trainer, overrides, world, head_name, source, a, device, timer)
        finally:
            trainer.log.close()


def _measure(trainer, overrides, world, head_name, source, a, device, timer) -> dict:
    batches = trainer._batches()  # the trainer's own stream of its loader (sampler epochs, resumable)
    losses, images = [], 0

    def step(it, run=trainer.train_step) -> None:
        nonlocal images
        out = run(it)
        losses.append(out["loss"])
        images += out["images"]

    # ---- warm-up (allocator, cudnn autotune, worker start-up, DALI pipeline build, DDP bucket rebuild)
    for _ in range(a.warmup):
        step(batches)
    # ---- free-running steps: the headline images/s
    cuda_sync(device)
    _barrier(world)
    images, t0 = 0, time.perf_counter()
    for _ in range(a.steps):
        step(batches)
    cuda_sync(device)
    free_s = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    free_s = float(_max_over_ranks(free_s, world, device))
    free_images = images  # global images (the step counts W x B per micro-step)
    # ---- phase-timed steps: the same train_step, cut at hooks
    st = StepTimer(trainer, world, timer)
    st.install()
    rows = []
    try:
        timed = st.batches(batches)
        for _ in range(a.steps):
            st.row = torch.zeros(len(SUBPHASES), 3, dtype=torch.float64)
            step(timed, st.step)
            rows.append(st.row)
    finally:
        st.uninstall()
    stats = comm.comm_stats()
    counted = sum(stats[k]["calls"] for k in comm.KINDS)
    mine = torch.stack(rows)  # [steps, sub-phases, 3] on this rank
    gathered = _gather_ranks(mine, world, device)  # [W, steps, sub-phases, 3]
    phases, imbalance = phase_breakdown(gathered)
    sub_wall = gathered[..., 1].amax(0).mean(0)  # [sub-phases]: the slowest rank's wall, mean over steps
    timed_total = sum(phases.values())
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    per_step = free_images / a.steps  # global images per step
    return dict(
        head=head_name,
        source=source,
        source_detail=source_detail(source, a, device),
        step="fr_dist.train.trainer.Trainer.train_step",
        config_overrides=overrides,
        head_kwargs=trainer.cfg.head.head_kwargs(),
        num_classes=trainer.head.num_classes,
        batch_per_rank=a.batch,
        world_size=world,
        free=dict(
            step_s=free_s / a.steps,
            images_per_s_global=free_images / free_s,
            images_per_s_per_rank=free_images / world / free_s,
        ),
        timed=dict(
            step_s=timed_total,
            images_per_s_global=per_step / timed_total,
            images_per_s_per_rank=per_step / world / timed_total,
            phase_s=phases,
            share={p: v / timed_total for p, v in phases.items()},
            imbalance_s=imbalance,
            subphase_wall_s={n: float(w) for n, w in zip(SUBPHASE_NAMES, sub_wall)},
        ),
        comm_calls_timed=int(st.calls),
        comm_calls_counted=int(counted),
        comm_bytes_per_step={
            k: stats[k]["bytes"] // max(1, a.steps) for k in comm.KINDS if stats[k]["calls"]
        },
        peak_memory_bytes=int(peak),
        peak_memory_kind="cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        cuda_memory=cuda_memory(device),  # driver + allocator view at the end (max_*: this configuration)
        loss_first=losses[0],
        loss_last=losses[-1],
    )


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


def run_all(rank: int, world: int, a) -> list[dict]:
    """Every (head, source) of the sweep on this rank (one process start for all of them)."""
    warnings.filterwarnings("ignore", message=".*broadcast_buffers", category=FutureWarning)
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
            if rank == 0:
                write_partial(results, a, world)
    return results


# ----------------------------------------------------------------------------- loader-only mode
def run_data(a) -> list[dict]:
    """Images/s of each loader alone on one process (``dali`` on CUDA = nvJPEG ``mixed`` decode)."""
    device = torch.device(a.device_resolved)
    out = []
    for source in a.sources:
        if source == "synthetic":
            continue
        batches, detail = make_source(source, a, 0, 1, device)
        if batches is None:
            out.append(dict(source=source, skipped=detail))
            continue
        for _ in range(a.warmup):
            next(batches)
        cuda_sync(device)
        t0, n = time.perf_counter(), 0
        for _ in range(a.steps):
            imgs, _labels = next(batches)
            n += imgs.shape[0]
        cuda_sync(device)
        dt = time.perf_counter() - t0
        assert imgs.device.type == device.type and imgs.dtype == torch.float32
        r = dict(source=source, source_detail=detail, device=str(device), images=n, seconds=dt)
        r["images_per_s"] = n / dt
        r["cuda_memory"] = cuda_memory(device)
        print(f"data {source:6s} on {device}: {r['images_per_s']:9.1f} img/s ({detail})", flush=True)
        out.append(r)
        write_partial(out, a, 1)
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
        if head.optimizer_contract().row_optimizer:  # its fused in-pass update, as the Trainer sets it up
            head.configure_row_optimizer(**row_optimizer_args(tcfg, opt))
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            x = torch.nn.functional.normalize(torch.randn(a.batch, a.embedding_size, generator=g), dim=1)
            y = torch.randint(0, K, (a.batch,), generator=g)
            x, y = x.to(device).requires_grad_(True), y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.head_dtype == "bf16"):
                loss = head(x, y)  # x: fp32 [B, D]; bf16 autocast as head.dtype=bf16 runs it
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        cuda_sync(device)
        mem = cuda_memory(device)  # driver + allocator view at the peak's end, for the planner comparison
        if device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
        else:  # no allocator statistics on CPU: the head's resident state only (not a peak)
            tensors = list(head.parameters()) + list(head.buffers())
            peak = sum(t.numel() * t.element_size() for t in tensors)
            peak += sum(s.numel() * s.element_size() for g in opt.state.values() for s in g.values())
            kind = "cpu_state_bytes"
        return dict(
            head=name,
            K=K,
            fits=True,
            peak_bytes=int(peak),
            peak_kind=kind,
            cuda_memory=mem,
            loss=float(loss.detach()),
        )
    except torch.OutOfMemoryError as e:
        return dict(
            head=name, K=K, fits=False, error=str(e).split("\n")[0][:200], cuda_memory=cuda_memory(device)
        )
    finally:
        del head, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _planner(name: str, K: int, a, gpu_name: str) -> dict:
    """``fr_dist.plan`` for one device at K, in this process (its public functions; errors recorded): the
    built-in profile named in the device name (benchmarks.gpu_calibrate's ``base_profile``)."""
    try:
        from fr_dist import plan as P

        hw_name = "cpu" if gpu_name == "cpu" else base_profile(gpu_name)
        kw = head_plan_kwargs(
            name, K, a.embedding_size, 1, a.batch, a.head_kwargs.get(name, {}),
            backbone=a.plan_backbone, head_amp=a.head_dtype == "bf16",
        )  # fmt: skip
        cfg, hw = P.PlanConfig(**kw), P.load_hardware(hw_name, 1)
        total = P.memory_breakdown(cfg, hw)["total"]
        return dict(
            hardware=hw_name,
            config=kw,
            fits=total <= hw.memory_bytes,
            max_identities=P.max_identities(cfg, hw),
            memory_total_bytes=int(total),
        )
    except Exception as e:  # noqa: BLE001 - the measurement stands without the planner
        return dict(error=f"{type(e).__name__}: {e}"[:400])


def run_capacity(a) -> list[dict]:
    """Largest K that fits one device, per head: doubling from ``--k-start``, then bisection. The JSON is
    rewritten after every trial: a run cut by a timeout keeps every trial it made."""
    device = torch.device(a.device_resolved)
    out = []
    for name in a.heads:
        _capacity_of(name, a, device, out)
    return out


def _capacity_of(name: str, a, device, out: list[dict]) -> None:
    """One head's search: its record appended to ``out`` and updated (JSON rewritten) after every trial."""
    t0 = time.perf_counter()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rec = dict(
        head=name,
        head_kwargs=a.head_kwargs.get(name, {}),
        device=gpu,
        device_total_bytes=torch.cuda.get_device_properties(device).total_memory
        if device.type == "cuda"
        else None,
        trials=[],
    )
    out.append(rec)
    best, oom = {}, None  # the trial of the largest K that fitted, the smallest K that did not

    def trial(K: int) -> bool:
        nonlocal best, oom
        r = _try_capacity(name, K, a, device)
        rec["trials"].append(r)
        print(f"capacity {name} K={K:,}: {'fits' if r['fits'] else 'OOM'}", flush=True)
        if r["fits"]:
            best = r
        else:
            oom = K
        rec.update(max_k_measured=best.get("K"), first_oom_k=oom, peak_bytes_at_max=best.get("peak_bytes"))
        write_partial(out, a, 1)
        return r["fits"]

    def budget_left() -> bool:
        return time.perf_counter() - t0 < a.capacity_budget_s

    K = a.k_start
    while K <= a.k_max and budget_left() and trial(K):
        K *= 2
    while best and oom is not None and oom - best["K"] > max(best["K"] // 16, 1) and budget_left():
        trial((best["K"] + oom) // 2)
    if best:
        rec["planner"] = _planner(name, best["K"], a, gpu)
        pl = rec["planner"].get("memory_total_bytes")
        if pl and device.type == "cuda":
            rec["planner_vs_measured_memory"] = pl / best["peak_bytes"]
    write_partial(out, a, 1)


# ----------------------------------------------------------------------------- output
def plot(results: list[dict], out: Path) -> None:
    plt = pyplot()
    if plt is None:
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
    save_figure(fig, out)


def write_partial(results: list[dict], a, world: int) -> None:
    """The JSON so far (after every measured point; no plot): a run cut by a timeout keeps it."""
    if a.out is not None:
        write(results, a, world, final=False)


def write(results: list[dict], a, world: int, final: bool = True) -> dict:
    """The report of this run into ``--out`` (atomically; merged with the file's other groups under
    ``--append``); the plot only when ``final``."""
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
    args = args_record(a)
    backend = dist.get_backend() if dist.is_initialized() else ("gloo (spawned)" if world > 1 else None)
    run = dict(
        group=group,
        mode=a.mode,
        world_size=world,
        backend=backend,
        args=args,
        host=host_facts(),
        complete=final,
        results=results,
    )
    report = dict(benchmark="train_throughput", notes=__doc__.split("\n\n")[1:4], runs=[run])
    if a.out is not None and a.append and a.out.exists():  # keep the other groups' runs
        old = json.loads(a.out.read_text())
        report["runs"] = [r for r in old.get("runs", []) if r["group"] != group or r["mode"] != a.mode] + [
            run
        ]
    if a.out is not None:
        write_json_atomic(a.out, report)
        if final:
            print(f"wrote {a.out}")
            plot([r for run_ in report["runs"] for r in run_["results"]], a.out)
    elif final:
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
        help="per-head options (config keys head.<name>.<key>; the capacity mode passes them to the head), "
        'JSON: {"sphereface2": {"chunk_size": 65536}, "partial_fc": {...}}',
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
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="another fr-dist train config override of the timed trainer (repeatable): train.clip_grad_norm=0",
    )  # fmt: skip
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
        data = a.data_dir / f"synthetic_{a.identities}x{a.images_per_identity}"
        a.rec = str(synthetic_recordio(data, a.identities, a.images_per_identity))
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
    results = spawn(run_all, a.world_size, threads=a.threads, a=a)[0]
    write(results, a, a.world_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
