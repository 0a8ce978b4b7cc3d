"""The training loop: data-parallel backbone + class-sharded head, one readable file.

    fr-dist train --config configs/demo_cpu.yaml output_dir=runs/demo              # 1 process
    torchrun --nproc_per_node=2 -m fr_dist.cli train --config configs/demo_cpu.yaml  # 2 ranks
    srun --ntasks-per-node=8 fr-dist train --config configs/ms1mv3_r50_sf2.yaml       # Slurm

One optimizer step = ``grad_accum`` micro-steps; the LR schedule, clipping, NaN guard,
logging, evaluation and checkpoints all count optimizer steps, never micro-batches.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from fr_dist import comm
from fr_dist.heads import create_head
from fr_dist.models import create_backbone
from fr_dist.runtime import DistEnv
from fr_dist.train import checkpoint as ckpt
from fr_dist.train.config import Config, save_config
from fr_dist.train.engines import BackboneEngine, ParallelDims, apply_ddp, apply_deepspeed
from fr_dist.train.logging import MetricsLogger, Throughput, format_progress
from fr_dist.train.optim import build_optimizer, param_groups
from fr_dist.train.schedule import build_scheduler
from fr_dist.train.signals import StopSignals

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
        self.dims = ParallelDims(env.world_size, env.rank, cfg.train.grad_accum, cfg.engine)
        self.out = Path(cfg.output_dir)
        t = cfg.train

        # ---- model: an unchanged backbone, parallelism applied as steps; the head is never wrapped
        torch.manual_seed(cfg.seed)  # identical backbone init on every rank and every world size
        m = cfg.model
        backbone = create_backbone(
            m.name,
            embedding_size=m.embedding_size,
            input_size=m.input_size,
            dropout=m.dropout,
            activation_checkpointing=m.activation_checkpointing,
            channels_last=m.channels_last,
            **m.kwargs,
        ).to(device)
        self.head = create_head(
            cfg.head.name,
            embedding_size=m.embedding_size,
            num_classes=num_classes,
            seed=cfg.seed,
            embedding_grad_scale=self.dims.embedding_grad_scale,
            check_finite=False,  # a NaN step is skipped by the guard below, not raised
            **cfg.head.head_kwargs(),
        ).to(device)
        self.head_dtype = cfg.head.dtype
        _seed_all(cfg.seed + env.rank)  # per-rank random streams (dropout, ...) from here on

        # ---- optimisers (the classifier shard apart, with its own LR / WD), schedules in optimizer steps
        self.steps_per_epoch = max(1, len(loader) // t.grad_accum)
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        head_lr = t.lr if t.head_lr is None else t.head_lr
        head_wd = t.weight_decay if t.head_weight_decay is None else t.head_weight_decay
        okw = dict(momentum=t.momentum, nesterov=t.nesterov, betas=tuple(t.betas))
        self.opt_head = build_optimizer(
            t.optimizer, param_groups(self.head, head_lr, head_wd), lr=head_lr, weight_decay=head_wd, **okw
        )
        opt_bb = build_optimizer(
            t.optimizer,
            param_groups(backbone, t.lr, t.weight_decay),
            lr=t.lr,
            weight_decay=t.weight_decay,
            **okw,
        )
        if cfg.engine == "deepspeed":
            self.bb = apply_deepspeed(
                backbone, self.dims, opt_bb, cfg.deepspeed, t.clip_grad_norm, cfg.data.batch_size
            )
        else:
            self.bb = BackboneEngine(apply_ddp(backbone, self.dims, device), opt_bb, self.dims)
        skw = dict(
            total_steps=self.total_steps,
            poly_power=t.poly_power,
            gamma=t.gamma,
            min_lr=t.min_lr,
            warmup_steps=t.warmup_steps or int(round(t.warmup_epochs * self.steps_per_epoch)),
            milestones_steps=[int(round(e * self.steps_per_epoch)) for e in t.milestones],
        )
        self.sched_bb = build_scheduler(self.bb.optimizer, t.schedule, **skw)
        self.sched_head = build_scheduler(self.opt_head, t.schedule, **skw)
        use_scaler = t.amp == "fp16" and device.type == "cuda" and cfg.engine == "ddp"
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

        self.step, self.epoch, self.consumed, self.nonfinite = 0, 0, 0, 0
        self.best_acc = -1.0
        self.log = MetricsLogger(self.out, env.rank, tensorboard=t.tensorboard)
        self.evaluator, self.last_eval = None, None

    # ------------------------------------------------------------------ helpers
    def _head_forward(self, emb, labels):
        if self.head_dtype == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.head(emb, labels)
        with torch.autocast(self.device.type, enabled=False):
            return self.head(emb.float(), labels)

    def _batches(self):
        """Endless (images, labels) stream; counts consumed samples so the sampler resumes exactly."""
        resumed = self.consumed > 0
        global_batch = self.cfg.data.batch_size * self.env.world_size
        while True:
            if not resumed:
                self.loader.sampler.set_epoch(self.epoch)
                self.consumed = 0
            resumed = False
            for batch in self.loader:
                self.consumed += global_batch
                yield batch
            self.epoch += 1

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, batches) -> dict:
        t = self.cfg.train
        self.bb.train(True)
        self.head.train(True)
        loss_sum, images = 0.0, 0
        for micro in range(t.grad_accum):
            imgs, labels = next(batches)
            last = micro == t.grad_accum - 1
            with self.bb.no_sync(last):
                with _autocast(self.device, t.amp):
                    emb = self.bb(imgs)  # [B, D]
                loss = self._head_forward(emb, labels)
                if self.bb.ds is not None:
                    self.bb.ds.backward(loss)  # DeepSpeed divides by grad_accum itself
                    self.bb.ds.step()  # applies the update only at the accumulation boundary
                else:
                    self.scaler.scale(loss / t.grad_accum).backward()
            loss_sum += float(loss.detach()) / t.grad_accum
            images += imgs.shape[0] * self.env.world_size
        finite = math.isfinite(loss_sum)
        grad_norm = float("nan")
        if self.bb.ds is not None:
            grad_norm = float(self.bb.ds.get_global_grad_norm() or 0.0)
        else:
            self.scaler.unscale_(self.bb.optimizer)
            params = [p for p in self.bb.bare.parameters() if p.grad is not None]
            max_norm = t.clip_grad_norm if t.clip_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
            finite = finite and math.isfinite(grad_norm)
            if finite or self.scaler.is_enabled():
                self.scaler.step(self.bb.optimizer)  # GradScaler skips non-finite steps itself
            self.scaler.update()
            self.bb.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.opt_head.step()
        self.opt_head.zero_grad(set_to_none=True)
        if finite:
            self.nonfinite = 0
        else:
            self.nonfinite += 1
            warnings.warn(
                f"step {self.step}: non-finite loss/grad ({loss_sum}, {grad_norm}); step skipped",
                stacklevel=1,
            )
            if self.nonfinite >= t.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{self.nonfinite} non-finite steps in a row (last loss {loss_sum}): aborting; "
                    "lower train.lr, enable train.clip_grad_norm or use train.amp=bf16"
                )
        self.sched_bb.step()
        self.sched_head.step()
        self.step += 1
        return dict(loss=loss_sum, grad_norm=grad_norm, images=images, skipped=not finite)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        return ckpt.save_trainer(self)

    def load_checkpoint(self, path: Path) -> None:
        ckpt.load_trainer(self, path)

    # ------------------------------------------------------------------ loop
    def fit(self, stop_at: int | None = None) -> dict:
        """Train to ``total_steps`` (or stop after step ``stop_at``, e.g. before a preemption)."""
        cfg, t, rank0 = self.cfg, self.cfg.train, self.env.is_main
        if rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        path = ckpt.resume_path(self.out, cfg.checkpoint.resume)
        if path is not None:
            self.load_checkpoint(path)
            if rank0:
                print(f"resumed from {path} at step {self.step} (epoch {self.epoch})", flush=True)
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
            loss=out["loss"], lr=lr, images_per_s=meter.rate, grad_norm=out["grad_norm"], epoch=self.epoch
        )
        if hasattr(self.head, "bias"):
            scalars["sf2_bias"] = float(self.head.bias.detach())
        if self.env.is_main:
            eta = meter.eta(self.total_steps - self.step)
            line = format_progress(self.step, self.total_steps, self.epoch, out["loss"], lr, meter.rate, eta)
            print(line, flush=True)
        self.log.log(self.step, **scalars)

    def run_eval(self) -> dict:
        res = self.evaluator(self.bb.bare)
        flat = {
            f"eval/{name}/{k}": v for name, r in res.items() for k, v in r.items() if isinstance(v, float)
        }
        self.log.log(self.step, **flat)
        if self.env.is_main:
            for name, r in res.items():
                print(
                    f"[eval step {self.step}] {name}: acc {r['accuracy']:.4f} +- {r['accuracy_std']:.4f}",
                    flush=True,
                )
        self.best_acc = self.evaluator.best  # the callback keeps RUN/best; its score is checkpointed
        self.last_eval = res
        return res
