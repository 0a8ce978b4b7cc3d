"""LR schedules in optimizer steps: linear warmup from 0 (insightface style), then poly | cosine | step.

Everything counts OPTIMIZER steps (one step = ``grad_accum`` micro-batches), never micro-batches::

    spe = optimizer_steps_per_epoch(num_images, batch_size * world_size, grad_accum)
    plan = resolve_schedule(cfg.train, spe)          # total / warmup / milestone steps
    sched = build_scheduler(opt, cfg.train.schedule, **plan)
    for step in range(plan["total_steps"]):
        ...; opt.step(); sched.step()                # once per optimizer step

The LR used by optimizer step ``s`` (0-based) is ``peak * lr_factor(s)``:

* warmup (``s < W``): ``s / W`` -- starts at 0 like insightface's PolyScheduler;
* poly: ``min_lr + (1 - min_lr) (1 - p)^power`` with ``p = (s - W) / (T - W)``, so the last
  step of the run uses ``(1/(T-W))^power`` and step ``T`` reaches ``min_lr`` exactly;
* cosine: ``min_lr + (1 - min_lr) (1 + cos(pi p)) / 2``;
* step: ``gamma ** (number of milestones <= s)`` (milestones in optimizer steps).

``min_lr`` is a fraction of each group's peak LR, so backbone and classifier (different peak
LRs) decay in proportion. The scheduler's ``state_dict`` (``last_epoch`` = optimizer steps
taken) resumes exactly when rebuilt with the same arguments; the schedule's parameters are not
in it (rebuilt from the config), so a resumed run with a longer ``max_steps`` follows the new
schedule from the resumed step on.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

__all__ = [
    "SCHEDULES",
    "lr_factor",
    "build_scheduler",
    "optimizer_steps_per_epoch",
    "epochs_to_steps",
    "resolve_schedule",
]

SCHEDULES = ("poly", "cosine", "step")


def optimizer_steps_per_epoch(
    images_per_epoch: int, global_batch: int, grad_accum: int = 1, drop_last: bool = True
) -> int:
    """Optimizer steps in one epoch (at least 1).

    Args:
        images_per_epoch: dataset size.
        global_batch: images per MICRO-step over all ranks (batch_size x world_size).
        grad_accum: micro-steps per optimizer step; a trailing partial accumulation is dropped.
        drop_last: drop the incomplete last global micro-batch (else it counts as one).
    """
    if images_per_epoch < 0 or global_batch < 1 or grad_accum < 1:
        raise ValueError(
            f"need images_per_epoch >= 0, global_batch >= 1, grad_accum >= 1; got "
            f"{images_per_epoch}, {global_batch}, {grad_accum}"
        )
    micro = images_per_epoch // global_batch if drop_last else math.ceil(images_per_epoch / global_batch)
    return max(1, micro // grad_accum)


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """``epochs`` (may be fractional: warmup_epochs=0.5, milestones=[8.5]) -> optimizer steps."""
    if epochs < 0:
        raise ValueError(f"epochs={epochs} must be >= 0")
    return int(round(epochs * steps_per_epoch))


def resolve_schedule(train_cfg, steps_per_epoch: int, micro_batches_per_epoch: int | None = None) -> dict:
    """``TrainConfig`` + optimizer steps per epoch -> :func:`build_scheduler` keyword arguments.

    ``max_steps > 0`` wins over ``epochs``; ``warmup_steps > 0`` wins over ``warmup_epochs``;
    milestones are converted from epochs to optimizer steps. With ``micro_batches_per_epoch``
    (a loader whose micro-batches flow across epoch ends, as the trainer's) the run has
    ``max(1, epochs * micro_batches_per_epoch // grad_accum)`` steps, so every epoch is used.
    """
    t = train_cfg
    if t.max_steps > 0:
        total = t.max_steps
    elif micro_batches_per_epoch is not None:
        total = max(1, t.epochs * micro_batches_per_epoch // t.grad_accum)
    else:
        total = t.epochs * steps_per_epoch
    warmup = t.warmup_steps if t.warmup_steps > 0 else epochs_to_steps(t.warmup_epochs, steps_per_epoch)
    return dict(
        total_steps=int(total),
        warmup_steps=int(min(warmup, total)),
        poly_power=float(t.poly_power),
        milestones_steps=[epochs_to_steps(m, steps_per_epoch) for m in t.milestones],
        gamma=float(t.gamma),
        min_lr=float(t.min_lr),
    )


def lr_factor(
    step: int,
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    poly_power: float = 2.0,
    milestones_steps: Sequence[int] = (),
    gamma: float = 0.1,
    min_lr: float = 0.0,
) -> float:
    """Multiplier of the peak LR used by optimizer step ``step`` (0-based). See the module doc."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    if schedule == "step":
        return gamma ** sum(step >= m for m in milestones_steps)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "poly":
        f = (1.0 - progress) ** poly_power
    elif schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    return min_lr + (1.0 - min_lr) * f


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    poly_power: float = 2.0,
    milestones_steps: Sequence[int] = (),
    gamma: float = 0.1,
    min_lr: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepped ONCE PER OPTIMIZER STEP (never per micro-batch).

    Right after construction the optimizer's LR is the one of step 0 (0 with warmup).

    Raises:
        ValueError: unknown schedule, total_steps < 1, negative warmup, decreasing milestones.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
    miles = tuple(int(m) for m in milestones_steps)
    if any(b < a for a, b in zip(miles, miles[1:])):
        raise ValueError(f"milestones_steps={list(miles)} must be increasing")
    # functools.partial: picklable, and its arguments are not in __dict__, so LambdaLR's
    # state_dict holds only the step count -- a resumed run follows ITS config's schedule.
    fn = functools.partial(
        lr_factor,
        schedule=schedule,
        total_steps=int(total_steps),
        warmup_steps=int(warmup_steps),
        poly_power=float(poly_power),
        milestones_steps=miles,
        gamma=float(gamma),
        min_lr=float(min_lr),
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
