"""Optimisers with parameter groups: no weight decay on BN / PReLU weights and biases (ndim <= 1)."""

from __future__ import annotations

import torch

__all__ = ["param_groups", "build_optimizer", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adamw")


def param_groups(
    module: torch.nn.Module, lr: float, weight_decay: float, no_decay_1d: bool = True
) -> list[dict]:
    """Two groups: matrices/kernels with ``weight_decay``, 1-d params (BN, PReLU, biases, SF2 b) without."""
    decay, no_decay = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_decay_1d and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_optimizer(
    name: str,
    groups: list[dict],
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas=(0.9, 0.999),
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov and momentum > 0,
            weight_decay=weight_decay,
        )
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: {OPTIMIZERS}")
