"""LR schedules in optimizer steps: linear warmup (from 0, insightface style), then poly | cosine | step."""

from __future__ import annotations

import math

import torch

__all__ = ["lr_factor", "build_scheduler", "steps_from_epochs"]


def steps_from_epochs(
    epochs: float,
    images_per_epoch: int,
    global_batch: int,
    grad_accum: int = 1,
    drop_last: bool = True,
) -> int:
    micro = (
        images_per_epoch // global_batch
        if drop_last
        else math.ceil(images_per_epoch / global_batch)
    )
    return int(epochs * max(1, micro // grad_accum))


def lr_factor(
    step: int,
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    poly_power: float = 2.0,
    milestones_steps=(),
    gamma: float = 0.1,
    min_lr: float = 0.0,
) -> float:
    """Multiplier of the peak LR used for optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    if schedule == "step":
        return gamma ** sum(step >= m for m in milestones_steps)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "poly":
        f = (1.0 - progress) ** poly_power
    elif schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; known: poly, cosine, step")
    return min_lr + (1.0 - min_lr) * f


def build_scheduler(
    optimizer,
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    poly_power: float = 2.0,
    milestones_steps=(),
    gamma: float = 0.1,
    min_lr: float = 0.0,
):
    """LambdaLR to be stepped once per optimizer step (never per micro-batch)."""
    miles = tuple(milestones_steps)

    def fn(step):
        return lr_factor(
            step, schedule, total_steps, warmup_steps, poly_power, miles, gamma, min_lr
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
