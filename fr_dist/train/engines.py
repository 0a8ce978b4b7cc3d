"""Parallelism applied as steps to an unchanged backbone (torchtitan style) + the one dims object.

    dims = ParallelDims(world_size, rank, grad_accum, engine)   # validated once
    model = create_backbone(..., channels_last=True)             # an unchanged model
    engine = apply_ddp(model, dims, device, optimizer)           # or apply_deepspeed(model, dims, ...)
    engine.backward(loss, scaler); grad_norm, ok = engine.step(scaler, clip, finite)   # the trainer's calls
    files = engine.save_files(folder, rank); engine.load_files(folder, meta)          # checkpoints

Both ``apply_*`` return a :class:`BackboneEngine`; it owns every DeepSpeed branch (the trainer and
the checkpoint code never ask which engine runs).

The classifier head is never wrapped: its shards are model parallel, its gradients are never
all-reduced, and its optimizer lives with its shard.

Gradient convention: DDP and DeepSpeed *average* backbone gradients over ranks, while the
head's reduce-scatter returns each rank the exact dL/dx of the global loss. The head is
therefore built with ``embedding_grad_scale = dims.dp`` (:attr:`ParallelDims.embedding_grad_scale`),
which compensates the averaging exactly once.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from fr_dist.checkpoint.deepspeed import (  # ds_*: re-exported (their home is fr_dist.checkpoint.deepspeed)
    ds_full_state,
    ds_load_full_state,
    ds_weights_only_loads,
    load_deepspeed,
    save_deepspeed,
)
from fr_dist.checkpoint.layout import safe_load

__all__ = [
    "ParallelDims",
    "apply_ddp",
    "apply_deepspeed",
    "BackboneEngine",
    "ds_full_state",
    "ds_load_full_state",
    "ds_weights_only_loads",
]


@dataclass(frozen=True)
class ParallelDims:
    """How the job is split: data parallel for the backbone, class parallel for the head."""

    world_size: int
    """Processes in the job."""
    rank: int
    """This process."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    engine: str = "ddp"
    """Backbone data-parallel engine: ddp | deepspeed."""

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.engine not in ("ddp", "deepspeed"):
            raise ValueError(f"unknown engine {self.engine!r}; known: ddp, deepspeed")

    @property
    def dp(self) -> int:
        """Data-parallel degree of the backbone (= world size) and class-parallel degree of the head."""
        return self.world_size

    @property
    def embedding_grad_scale(self) -> float:
        """Factor for the head's reduce-scatter that cancels the engine's 1/dp gradient averaging."""
        return float(self.dp)


def apply_ddp(
    model: nn.Module, dims: ParallelDims, device: torch.device, optimizer=None, process_group=None
) -> BackboneEngine:
    """Wrap in DistributedDataParallel when there is more than one rank (else unchanged)."""
    if dims.dp > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            process_group=process_group,
            broadcast_buffers=False,
            bucket_cap_mb=16,
        )
    return BackboneEngine(model, optimizer, dims)


class BackboneEngine:
    """Uniform interface over plain/DDP and DeepSpeed backbones for the trainer loop."""

    def __init__(self, module: nn.Module, optimizer, dims: ParallelDims, ds_engine=None):
        self.module = module
        self.optimizer = optimizer
        self.dims = dims
        self.ds = ds_engine

    @property
    def bare(self) -> nn.Module:
        """The unwrapped backbone (for checkpoints, eval and export)."""
        m = self.ds.module if self.ds is not None else self.module
        return m.module if hasattr(m, "module") and not isinstance(m, nn.Sequential) else m

    def __call__(self, images):
        if self.ds is not None:  # DeepSpeed bf16/fp16 keeps the module in that dtype
            if self.ds.bfloat16_enabled():
                images = images.to(torch.bfloat16)
            elif self.ds.fp16_enabled():
                images = images.half()
            return self.ds(images)
        return self.module(images)

    def no_sync(self, last_micro: bool):
        """DDP: skip the gradient all-reduce on all but the last micro-step."""
        if self.ds is None and not last_micro and hasattr(self.module, "no_sync"):
            return self.module.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scaler) -> None:
        """One micro-step's backward. DeepSpeed: ``engine.backward`` (it divides by grad_accum) and
        ``engine.step()`` on EVERY micro-step (DeepSpeed applies the update only at the accumulation
        boundary); else ``scaler``'s scaled ``loss / grad_accum``."""
        if self.ds is not None:
            self.ds.backward(loss)
            self.ds.step()
        else:
            scaler.scale(loss / self.dims.grad_accum).backward()

    def step(self, scaler, clip_grad_norm: float, finite: bool) -> tuple[float, bool]:
        """After the last micro-step: (gradient norm, gradients finite). DDP: unscale through ``scaler``,
        clip, step (skipped when not ``finite``, unless the scaler skips non-finite steps itself)."""
        if self.ds is not None:  # DeepSpeed clipped and stepped in backward()
            return float(self.ds.get_global_grad_norm() or 0.0), True
        scaler.unscale_(self.optimizer)
        params = [p for p in self.bare.parameters() if p.grad is not None]
        max_norm = clip_grad_norm if clip_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        ok = math.isfinite(grad_norm)
        if (finite and ok) or scaler.is_enabled():
            scaler.step(self.optimizer)  # GradScaler skips non-finite steps itself
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, ok

    def save_files(self, folder: Path, rank: int) -> dict:
        """``{file name: object}`` this rank writes into checkpoint ``folder``: rank 0 the backbone
        (``backbone.pt``, ``backbone_optim.pt``). DeepSpeed: every rank also writes its ZeRO partition
        into ``folder/deepspeed/`` here, and rank 0 fr_dist's world-size independent copy (fp32 master
        weights, optimizer state by parameter name). Collective under DeepSpeed."""
        if self.ds is None:
            if rank != 0:
                return {}
            return {"backbone.pt": self.bare.state_dict(), "backbone_optim.pt": self.optimizer.state_dict()}
        return save_deepspeed(self.ds, self.bare, folder, rank)  # collective

    def load_files(self, folder: Path, meta: dict) -> None:
        """Restore from checkpoint ``folder`` (any world size; DeepSpeed ZeRO-1/2: :func:`load_deepspeed`)."""
        if self.ds is not None:
            load_deepspeed(self.ds, self.bare, folder, meta, self.dims.world_size, self.dims.rank)
            return
        device = next(self.bare.parameters()).device
        self.bare.load_state_dict(safe_load(Path(folder) / "backbone.pt", map_location=device))
        self.optimizer.load_state_dict(safe_load(Path(folder) / "backbone_optim.pt", map_location=device))

    def train(self, mode: bool = True):
        (self.ds if self.ds is not None else self.module).train(mode)


def apply_deepspeed(
    model: nn.Module, dims: ParallelDims, optimizer, ds_cfg, clip_grad_norm: float, micro_batch: int
) -> BackboneEngine:
    """Wrap the backbone in a DeepSpeed engine (ZeRO stage ``ds_cfg.zero_stage``); the head stays outside.

    DeepSpeed owns the backbone's gradient accumulation boundary (``gradient_accumulation_steps``
    = ``dims.grad_accum``), mixed precision and clipping; fr_dist calls ``engine.backward`` and
    ``engine.step()`` on every micro-step (DeepSpeed updates only at the accumulation boundary),
    and steps the LR schedule itself.
    bf16 works on CPU and GPU; fp16 only on GPU (DeepSpeed refuses it on CPU).
    """
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": dims.grad_accum,
        "train_batch_size": micro_batch * dims.grad_accum * dims.dp,
        "zero_optimization": {"stage": int(ds_cfg.zero_stage)},
        "zero_allow_untested_optimizer": True,  # torch SGD/AdamW with param groups
        "gradient_clipping": float(clip_grad_norm),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds_cfg.bf16:
        config["bf16"] = {"enabled": True}
    elif getattr(ds_cfg, "fp16", False):
        config["fp16"] = {"enabled": True}
    config.update(dict(ds_cfg.config or {}))
    # DeepSpeed casts parameters but not buffers; BatchNorm then mixes bf16 inputs with fp32
    # running statistics and fails on CPU. Cast the whole module (buffers included) up front.
    if "bf16" in config:
        model = model.to(torch.bfloat16)
    elif "fp16" in config:
        model = model.half()
    engine, _ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    # the ZeRO wrapper shares the torch optimizer's param_groups: the LR schedule drives those
    return BackboneEngine(engine, optimizer, dims, ds_engine=engine)
