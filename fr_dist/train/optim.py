"""Optimisers with parameter groups: no weight decay on BN / PReLU weights and biases (ndim <= 1).

    bb_opt = build_optimizer("sgd", param_groups(backbone, lr=0.1, weight_decay=5e-4), lr=0.1,
                             momentum=0.9, nesterov=False, weight_decay=5e-4)
    head_opt = build_head_optimizer(head, cfg.train)   # head_lr / head_weight_decay; bias b undecayed

The classifier head gets its own optimizer (its parameters are a local shard: never all-reduced,
their momentum / Adam moments live with the shard), built by a separate call.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "OPTIMIZERS",
    "param_groups",
    "build_optimizer",
    "build_backbone_optimizer",
    "build_head_optimizer",
    "head_lr_wd",
    "row_optimizer_args",
]

OPTIMIZERS = ("sgd", "adamw")


def param_groups(
    module: torch.nn.Module | Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    no_decay_bn_bias: bool = True,
) -> list[dict]:
    """Split trainable parameters into a decayed and an undecayed group.

    Matrices / conv kernels (ndim >= 2) get ``weight_decay``; every parameter with ndim <= 1
    (BatchNorm / PReLU weights, biases, SphereFace2's scalar bias b) gets 0 when
    ``no_decay_bn_bias``. Empty groups are dropped; each group carries ``lr``,
    ``weight_decay`` and a ``name`` ("decay" / "no_decay"), so schedulers and logs can tell
    them apart. Frozen parameters (requires_grad=False) are left out. A parameter shared by two
    submodules appears once.
    """
    params = module.parameters() if isinstance(module, torch.nn.Module) else module
    decay, no_decay, seen = [], [], set()
    for p in params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if no_decay_bn_bias and p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    name: str,
    groups: Sequence[dict] | Iterable[torch.nn.Parameter],
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """``sgd`` (momentum, optional Nesterov) or ``adamw`` over ``groups``.

    Group-level ``lr`` / ``weight_decay`` (from :func:`param_groups`) win over the defaults
    given here. AdamW's decoupled weight decay is the group's ``weight_decay`` as well.

    Raises:
        ValueError: unknown optimizer name (lists the known ones) or a bad hyper-parameter.
    """
    name = name.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    if lr <= 0:
        raise ValueError(f"optimizer lr={lr} must be > 0")
    if weight_decay < 0:
        raise ValueError(f"optimizer weight_decay={weight_decay} must be >= 0")
    if isinstance(groups, (list, tuple)) and groups and isinstance(groups[0], dict):
        groups = [dict(g) for g in groups]  # the optimizer must not edit the caller's dicts
    else:
        groups = list(groups)
    if not groups:
        raise ValueError("optimizer got no parameters (all frozen or an empty module?)")
    if name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=lr,
            momentum=momentum,
            nesterov=bool(nesterov and momentum > 0),
            weight_decay=weight_decay,
        )
    b1, b2 = (float(b) for b in betas)
    return torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), weight_decay=weight_decay)


def _train_fields(train_cfg) -> dict:
    return dict(
        momentum=train_cfg.momentum,
        nesterov=train_cfg.nesterov,
        betas=tuple(train_cfg.betas),
    )


def build_backbone_optimizer(module: torch.nn.Module, train_cfg) -> torch.optim.Optimizer:
    """The backbone's optimizer from a :class:`~fr_dist.train.config.TrainConfig`."""
    t = train_cfg
    return build_optimizer(
        t.optimizer,
        param_groups(module, t.lr, t.weight_decay),
        lr=t.lr,
        weight_decay=t.weight_decay,
        **_train_fields(t),
    )


def head_lr_wd(train_cfg) -> tuple[float, float]:
    """(lr, weight decay) of the classifier: ``head_lr`` / ``head_weight_decay``, None = the backbone's."""
    t = train_cfg
    lr = t.head_lr if t.head_lr is not None else t.lr
    return lr, t.head_weight_decay if t.head_weight_decay is not None else t.weight_decay


def row_optimizer_args(train_cfg, head_optimizer: torch.optim.Optimizer) -> dict:
    """Keywords of ``head.configure_row_optimizer`` for a head whose ``optimizer_contract()`` asks for a row
    optimizer inside its pass: ``train.optimizer``'s kind, the head LR / WD, SGD momentum / nesterov, and
    AdamW betas / eps exactly as ``head_optimizer`` (build_optimizer's torch AdamW) has them."""
    t = train_cfg
    lr, wd = head_lr_wd(t)
    g = head_optimizer.param_groups[0]
    return dict(
        kind=t.optimizer,
        lr=lr,
        momentum=t.momentum,
        nesterov=t.nesterov,
        weight_decay=wd,
        betas=g.get("betas"),
        eps=g.get("eps"),
    )


def build_head_optimizer(head: torch.nn.Module, train_cfg) -> torch.optim.Optimizer:
    """The classifier shard's optimizer: ``head_lr`` / ``head_weight_decay`` (None = backbone's).

    The proxies [K_local, D] are decayed; SphereFace2's scalar bias b (ndim 0) is not. A shard
    holding zero classes still gets an optimizer (its [0, D] weight is a valid, empty param).
    """
    t = train_cfg
    lr, wd = head_lr_wd(t)
    return build_optimizer(
        t.optimizer, param_groups(head, lr, wd), lr=lr, weight_decay=wd, **_train_fields(t)
    )
