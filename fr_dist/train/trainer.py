"""The training loop: data-parallel backbone + class-sharded head, one readable file.

    fr-dist train --config configs/demo_cpu.yaml output_dir=runs/demo              # 1 process
    torchrun --nproc_per_node=2 -m fr_dist.cli train --config configs/demo_cpu.yaml  # 2 ranks
    srun --ntasks-per-node=8 fr-dist train --config configs/ms1mv3_r50_sf2.yaml       # Slurm

One optimizer step = ``grad_accum`` micro-steps; the LR schedule, clipping, NaN guard,
logging, evaluation and checkpoints all count optimizer steps, never micro-batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from fr_dist import comm
from fr_dist.checkpoint.states import SamplerState, ScheduleState
from fr_dist.errors import ConfigError
from fr_dist.heads import create_head
from fr_dist.models import create_backbone
from fr_dist.runtime import DistEnv
from fr_dist.signals import StopSignals, signal_name
from fr_dist.train import checkpoint as ckpt
from fr_dist.train.config import Config
from fr_dist.train.config_load import config_errors, save_config
from fr_dist.train.engines import ParallelDims, apply_ddp, apply_deepspeed
from fr_dist.train.logging import MetricsLogger, Throughput, format_progress, rank0_print
from fr_dist.train.optim import build_backbone_optimizer, build_head_optimizer, row_optimizer_args
from fr_dist.train.resume import UNFUSED, head_build_kwargs, resize_line, resize_plan, saved_head_update
from fr_dist.train.schedule import build_scheduler, optimizer_steps_per_epoch, resolve_schedule
from fr_dist.train.state import Progress

__all__ = ["Trainer"]


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Builds everything from a validated :class:`Config` on an initialised runtime, then ``fit()``."""

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, loader, num_classes: int):
        self.cfg, self.env, self.device, self.loader = cfg, env, device, loader
        self.out = Path(cfg.output_dir)
        self._resume, self._resize = False, None  # (False: not looked up yet) see _keep_global_batch
        if cfg.train.on_resize == "keep_global_batch" and cfg.checkpoint.resume != "none":
            cfg = self.cfg = self._keep_global_batch(cfg, env)  # grad_accum for the checkpoint's global batch
        self.dims = ParallelDims(env.world_size, env.rank, cfg.train.grad_accum, cfg.engine)
        t = cfg.train

        # ---- model: an unchanged backbone, parallelism applied as steps; the head is never wrapped
        torch.manual_seed(cfg.seed)  # identical backbone init on every rank and every world size
        m = cfg.model
        with config_errors(f"model ({m.name!r}, model.kwargs={m.kwargs})", {}):  # e.g. bad layers
            backbone = create_backbone(m).to(device)
        head_kwargs, fallback = head_build_kwargs(cfg)  # the lean in-pass update, or why not
        if fallback and env.is_main:
            warnings.warn(fallback, stacklevel=2)
        self._num_classes = num_classes
        self._build_head(head_kwargs)
        self.head_dtype = cfg.head.dtype
        _seed_all(cfg.seed + env.rank)  # per-rank random streams (dropout, ...) from here on

        # ---- optimisers (the classifier shard apart, with its own LR / WD), schedules in optimizer steps
        # micro-batches flow across epoch ends, so epochs x batches // grad_accum steps use every epoch
        global_batch = cfg.data.batch_size * env.world_size
        spe = optimizer_steps_per_epoch(len(loader) * global_batch, global_batch, t.grad_accum)
        plan = resolve_schedule(t, spe, micro_batches_per_epoch=len(loader))
        self.total_steps = plan["total_steps"]
        self._plan = plan
        self._build_head_optimizer()
        opt_bb = build_backbone_optimizer(backbone, t)
        if self.dims.engine == "deepspeed":
            self.bb = apply_deepspeed(
                backbone, self.dims, opt_bb, cfg.deepspeed, t.clip_grad_norm, cfg.data.batch_size
            )
        else:
            self.bb = apply_ddp(backbone, self.dims, device, opt_bb)
        self.sched_bb = build_scheduler(self.bb.optimizer, t.schedule, **plan)
        self._lr0_bb = list(self.sched_bb.base_lrs)  # the configured peak LRs (before any on_resize scale)
        self._lr_first_batch, self._lr_scale = global_batch * t.grad_accum, 1.0  # see resize_plan
        use_scaler = t.amp == "fp16" and device.type == "cuda" and cfg.engine == "ddp"
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

        self.progress = Progress(env.world_size, global_batch)
        self.log = MetricsLogger(self.out, env.rank, tensorboard=t.tensorboard)
        self.evaluator, self.last_eval = None, None

    @property
    def step(self) -> int:
        return self.progress.step

    # ------------------------------------------------------------------ the head
    def _build_head(self, kwargs: dict) -> None:
        cfg = self.cfg
        self.head = create_head(
            cfg.head.name,
            embedding_size=cfg.model.embedding_size,
            num_classes=self._num_classes,
            seed=cfg.seed,
            embedding_grad_scale=self.dims.embedding_grad_scale,
            check_finite=False,  # a NaN step is skipped by the guard below, not raised
            **kwargs,
        ).to(self.device)

    def _build_head_optimizer(self) -> None:
        """torch.optim on the head's trainable parameters, the in-pass row update when the head asks for
        one (its LR set every step), and the head's LR schedule."""
        t = self.cfg.train
        self.opt_head = build_head_optimizer(self.head, t)
        contract = self.head.optimizer_contract()
        if contract.row_optimizer:
            if t.grad_accum != 1:
                raise ValueError(f"{contract.option} needs train.grad_accum=1")
            self.head.configure_row_optimizer(**row_optimizer_args(t, self.opt_head))
        self.sched_head = build_scheduler(self.opt_head, t.schedule, **self._plan)
        self._lr0_head = list(self.sched_head.base_lrs)

    def _head_update(self) -> dict | None:
        """How the head updates and stores its rows (None: a head without these options)."""
        if not hasattr(self.head, "fused_update"):
            return None
        return {k: getattr(self.head, k) for k in UNFUSED}

    def _resume_head_update(self, path: Path) -> None:
        """Resume a checkpoint with the head update it was written by: one of a run started before the
        lean default (unfused, fp32 rows) resumes unfused, whatever the config now asks (a Slurm requeue
        of an old run goes on as it started); rank 0 says so once."""
        mine = self._head_update()
        saved = saved_head_update(path, self.cfg.head.name) if mine is not None else None
        if saved is None or saved == mine:
            return
        if self.env.is_main:
            warnings.warn(
                f"checkpoint {path} was written by the head with {saved}; the config's head has {mine}: "
                "resuming with the checkpoint's (start a new run for the config's: checkpoint.resume=none)",
                stacklevel=3,
            )
        kwargs = {**self.cfg.head.head_kwargs(), **saved}
        self.head = self.opt_head = self.sched_head = None  # one head in memory at a time
        self._build_head(kwargs)
        self._build_head_optimizer()

    # ------------------------------------------------------------------ helpers
    def _head_forward(self, emb, labels):
        if self.head_dtype == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.head(emb, labels)
        with torch.autocast(self.device.type, enabled=False):
            return self.head(emb.float(), labels)

    def _batches(self):
        """Endless (images, labels) stream; counts consumed samples so the sampler resumes exactly."""
        p = self.progress
        resumed = p.consumed > 0
        while True:
            if not resumed:
                self.loader.sampler.set_epoch(p.epoch)
                p.consumed = 0
            resumed = False
            for batch in self.loader:
                p.consumed += p.global_batch
                yield batch
            p.epoch += 1

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, batches) -> dict:
        t, p = self.cfg.train, self.progress
        self.bb.train(True)
        self.head.train(True)
        loss_sum, images = 0.0, 0
        self.head.set_row_lr(self.opt_head.param_groups[0]["lr"])  # the head schedule's LR (if it asked)
        for micro in range(t.grad_accum):
            imgs, labels = next(batches)
            last = micro == t.grad_accum - 1
            with self.bb.no_sync(last):
                with _autocast(self.device, t.amp):
                    emb = self.bb(imgs)  # [B, D]
                loss = self._head_forward(emb, labels)
                self.bb.backward(loss, self.scaler)  # the scaler scales the whole loss (fp16 on CUDA)
            loss_sum += float(loss.detach()) / t.grad_accum
            images += imgs.shape[0] * self.env.world_size
        grad_norm, grads_ok = self.bb.step(self.scaler, t.clip_grad_norm, math.isfinite(loss_sum))
        finite = math.isfinite(loss_sum) and grads_ok
        # the head's gradients carry the loss scale too: unscale and step them through the scaler
        # (the fused SphereFace2 row update ran inside the head's forward, on unscaled gradients)
        self.scaler.unscale_(self.opt_head)
        if finite or self.scaler.is_enabled():
            self.scaler.step(self.opt_head)
        self.scaler.update()
        self.opt_head.zero_grad(set_to_none=True)
        # a finite loss whose gradients overflowed under a loss scale > 1 is the scaler's to fix (it skipped
        # the step and backed the scale off: fp16 warm-up from 2^16); only what it cannot recover from counts.
        # The scale this step used is read only then (get_scale() synchronises with the device).
        scaler_skip = (
            not finite
            and math.isfinite(loss_sum)
            and self.scaler.is_enabled()
            and self.scaler.get_scale() / self.scaler.get_backoff_factor() > 1.0
        )
        if scaler_skip:
            p.scaler_skips += 1
        else:
            p.nonfinite = 0 if finite else p.nonfinite + 1
        if not finite and not scaler_skip:
            warnings.warn(
                f"step {p.step}: non-finite loss/grad ({loss_sum}, {grad_norm}); step skipped", stacklevel=1
            )
            if p.nonfinite >= t.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{p.nonfinite} non-finite steps in a row (last loss {loss_sum}): aborting; "
                    "lower train.lr, enable train.clip_grad_norm or use train.amp=bf16"
                )
        self.sched_bb.step()
        self.sched_head.step()
        p.step += 1
        return dict(
            loss=loss_sum, grad_norm=grad_norm, images=images, skipped=not finite, scaler_skip=scaler_skip
        )

    # ------------------------------------------------------------------ checkpoints
    def _states(self) -> dict:
        """Everything a checkpoint holds, by name (train/checkpoint.py knows no Trainer attribute)."""
        return dict(
            backbone=self.bb,
            head=ckpt.HeadShards(self.head, self.opt_head),
            trainer=self.progress,
            sched_bb=ScheduleState(self.sched_bb),
            sched_head=ScheduleState(self.sched_head),
            scaler=self.scaler,
            sampler=SamplerState(self.loader.sampler, self.progress),
            rng=ckpt.RngState(self.env.rank, self.env.world_size),
        )

    def _identity(self) -> dict:
        h = self.head
        return dict(num_classes=h.num_classes, embedding_size=h.embedding_size, engine=self.cfg.engine)

    def save_checkpoint(self) -> Path:
        meta = dict(world_size=self.env.world_size, **self._identity(), head=self.cfg.head.name)
        t = self.cfg.train  # the batch policy's inputs on a resume at another world size (resize_plan)
        meta.update(
            global_batch=self.progress.global_batch * t.grad_accum,
            grad_accum=t.grad_accum,
            lr_global_batch=self._lr_first_batch,
            lr_scale=self._lr_scale,
        )
        if self._head_update() is not None:
            meta["head_update"] = self._head_update()  # resumed as written (_resume_head_update)
        return ckpt.save_checkpoint(
            self.out, self.step, self._states(), self.env.rank, meta, self.cfg.checkpoint.keep, self.cfg
        )

    def load_checkpoint(self, path: Path) -> None:
        self._resume_head_update(Path(path))
        meta = ckpt.load_checkpoint(path, self._states(), dict(self._identity(), head=self.cfg.head.name))
        plan, self._resize = self._resize or resize_plan(self.cfg, meta, self.env.world_size), None
        self._lr_scale = float(meta.get("lr_scale", 1.0))
        first = plan["lr_global_batch"] if plan else meta.get("lr_global_batch", self._lr_first_batch)
        self._lr_first_batch = int(first)
        if plan is not None:
            self._apply_lr_scale(plan["lr_scale"])
            rank0_print(
                self.env.rank,
                resize_line(plan, self.head.num_classes, self._lr0_bb[0], self.cfg.train.on_resize),
            )

    # ------------------------------------------------------------------ a resume on another world size
    def _keep_global_batch(self, cfg: Config, env: DistEnv) -> Config:
        """train.on_resize=keep_global_batch: the config with the grad_accum that keeps the resumed
        checkpoint's global batch (decided before the head and the schedule are built from it)."""
        self._resume = ckpt.resume_path(self.out, cfg.checkpoint.resume, env.rank)
        if self._resume is None:
            return cfg
        self._resize = resize_plan(cfg, ckpt.read_meta(self._resume), env.world_size)
        if self._resize is None or self._resize["grad_accum"] == cfg.train.grad_accum:
            return cfg
        accum = self._resize["grad_accum"]
        saved = saved_head_update(self._resume, cfg.head.name)
        if accum != 1 and saved is not None and saved["fused_update"]:
            raise ConfigError(
                f"train.on_resize=keep_global_batch: world size {self._resize['old_world']} -> "
                f"{env.world_size} needs train.grad_accum={accum} for the global batch "
                f"{self._resize['old_global']}, but {self._resume} was written by the fused head update "
                f"(head.{cfg.head.name}.fused_update), which cannot accumulate; resume with "
                "train.on_resize=keep_per_rank_batch_scale_lr"
            )
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum))

    def set_first_global_batch(self, n: int) -> None:
        """The run's first global batch, which ``train.on_resize`` scales the LR from on another world size
        (a run converted from another tool started at the source's: fr_dist.convert.run)."""
        self._lr_first_batch = int(n)

    def _apply_lr_scale(self, scale: float) -> None:
        """Peak LRs = the configured ones x ``scale``; the schedules' current LRs follow (same step)."""
        for sched, lr0 in ((self.sched_bb, self._lr0_bb), (self.sched_head, self._lr0_head)):
            sched.base_lrs = [lr * scale for lr in lr0]
            for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["initial_lr"], group["lr"] = base, base * fn(sched.last_epoch)
            sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
        self._lr_scale = scale

    # ------------------------------------------------------------------ loop
    def fit(self, stop_at: int | None = None) -> dict:
        """Train to ``total_steps`` (or stop after step ``stop_at``, e.g. before a preemption)."""
        cfg, t, rank0 = self.cfg, self.cfg.train, self.env.is_main
        if rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        if self._resume is False:  # not looked up in __init__ (keep_global_batch)
            path = ckpt.resume_path(self.out, cfg.checkpoint.resume, self.env.rank)
        else:
            path, self._resume = self._resume, False
        if path is not None:
            self.load_checkpoint(path)
            self.log.truncate_after(self.step)  # the steps after the checkpoint are re-run: no repeats
            rank0_print(
                self.env.rank, f"resumed from {path} at step {self.step} (epoch {self.progress.epoch})"
            )
        self._signals = StopSignals(cfg.checkpoint.save_on_signal)
        batches = self._batches()
        meter = Throughput()
        last = {}
        t_start = time.time()
        end = min(self.total_steps, stop_at or self.total_steps)
        while self.step < end:
            comm.reset_comm_stats()
            t0 = time.perf_counter()
            out = self.train_step(batches)
            meter.update(out["images"], time.perf_counter() - t0)
            last = out
            if self.step % t.log_every == 0 or self.step == end:
                self._log_step(out, meter)
                if self._preempted():
                    self.save_checkpoint()
                    last["preempted"] = True
                    break
            if self.evaluator is not None and cfg.eval.every and self.step % cfg.eval.every == 0:
                self.run_eval()
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.save_checkpoint()
        self._signals.restore()
        preempted = bool(last.get("preempted"))  # checkpoint already written: leave fast
        evaluated = cfg.eval.every and self.step % cfg.eval.every == 0  # the loop just did
        if self.evaluator is not None and not (preempted or evaluated):
            self.run_eval()  # before the final checkpoint, so that it records the best accuracy
        saved = cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0
        if cfg.checkpoint.save_at_end and not (preempted or saved):
            self.save_checkpoint()
        results = dict(step=self.step, loss=last.get("loss"), images_per_s=meter.rate, preempted=preempted)
        if preempted:  # run.py reports "stopped by signal, checkpoint at step N" and exits 0
            results["signal"] = signal_name(self._signals.received)
        results["wall_s"] = time.time() - t_start
        if self.last_eval is not None and not preempted:
            results["eval"] = self.last_eval
        self.log.close()
        return results

    def _preempted(self) -> bool:
        """Did any rank receive a stop signal? (all ranks decide together at log steps)"""
        if not self._signals.enabled:
            return False
        flag = torch.tensor([1.0 if self._signals.received else 0.0], device=self.device)
        return bool(comm.all_reduce(flag, "max", name="stop_flag").item() > 0)

    def _log_step(self, out: dict, meter: Throughput) -> None:
        lr = self.sched_bb.get_last_lr()[0]
        scalars = dict(
            loss=out["loss"],
            lr=lr,
            images_per_s=meter.rate,
            grad_norm=out["grad_norm"],
            epoch=self.progress.epoch,
        )
        scalars.update(self.head.log_scalars())
        if self.scaler.is_enabled():
            scalars.update(loss_scale=float(self.scaler.get_scale()), scaler_skips=self.progress.scaler_skips)
        eta = meter.eta(self.total_steps - self.step)
        line = format_progress(
            self.step, self.total_steps, self.progress.epoch, out["loss"], lr, meter.rate, eta
        )
        rank0_print(self.env.rank, line)
        self.log.log(self.step, **scalars)

    def run_eval(self) -> dict:
        res, self.progress.best_acc = self.evaluator(self.bb.bare, self.progress.best_acc)
        flat = {
            f"eval/{name}/{k}": v for name, r in res.items() for k, v in r.items() if isinstance(v, float)
        }
        self.log.log(self.step, **flat)
        for name, r in res.items():
            rank0_print(
                self.env.rank,
                f"[eval step {self.step}] {name}: acc {r['accuracy']:.4f} +- {r['accuracy_std']:.4f}",
            )
        self.last_eval = res
        return res
