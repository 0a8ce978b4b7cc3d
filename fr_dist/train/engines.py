"""Parallelism applied as steps to an unchanged backbone (torchtitan style) + the one dims object.

    dims = ParallelDims(world_size, rank, grad_accum, engine)   # validated once
    model = create_backbone(..., channels_last=True)             # an unchanged model
    model = apply_ddp(model, dims, device)                       # or apply_deepspeed(model, dims, ...)

The classifier head is never wrapped: its shards are model parallel, its gradients are never
all-reduced, and its optimizer lives with its shard.

Gradient convention: DDP and DeepSpeed *average* backbone gradients over ranks, while the
head's reduce-scatter returns each rank the exact dL/dx of the global loss. The head is
therefore built with ``embedding_grad_scale = dims.dp`` (:attr:`ParallelDims.embedding_grad_scale`),
which compensates the averaging exactly once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["ParallelDims", "apply_ddp", "apply_deepspeed", "apply_compile", "BackboneEngine"]


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


def apply_compile(model: nn.Module) -> nn.Module:
    return torch.compile(model)


def apply_ddp(model: nn.Module, dims: ParallelDims, device: torch.device, process_group=None) -> nn.Module:
    """Wrap in DistributedDataParallel when there is more than one rank (else unchanged)."""
    if dims.dp == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=process_group,
        broadcast_buffers=False,
        bucket_cap_mb=16,
    )


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

    def backward(self, loss):
        if self.ds is not None:
            self.ds.backward(loss)
        else:
            loss.backward()

    def train(self, mode: bool = True):
        (self.ds if self.ds is not None else self.module).train(mode)


def apply_deepspeed(
    model: nn.Module, dims: ParallelDims, optimizer, ds_cfg, clip_grad_norm: float, micro_batch: int
) -> BackboneEngine:
    """Wrap the backbone in a DeepSpeed engine (ZeRO stage ``ds_cfg.zero_stage``); the head stays outside.

    DeepSpeed owns the backbone's gradient accumulation boundary (``gradient_accumulation_steps``
    = ``dims.grad_accum``), mixed precision and clipping; fr_dist calls ``engine.backward`` per
    micro-step and ``engine.step()`` once per optimizer step, and steps the LR schedule itself.
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
