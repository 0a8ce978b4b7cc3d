"""Row optimizers: the per-row updates a head applies inside its own pass (SphereFace2's ``fused_update``),
so the [n, D] gradient of its rows is never allocated. Each computes exactly what its ``torch.optim``
counterpart would on the rows a step uses.

The trainer asks for one when a head's ``optimizer_contract()`` says so and builds it with
:func:`build_row_optimizer` (through ``head.configure_row_optimizer``), from ``train.optimizer``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["RowAdamW", "RowOptimizer", "build_row_optimizer"]


@dataclass
class RowOptimizer:
    """Per-row optimizer applied inside the fused pass (torch.optim.SGD semantics, dampening 0).

    ``lr`` is set by the trainer from the head's LR schedule before every step.
    """

    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov momentum needs momentum > 0")

    def state_fields(self) -> tuple[str, ...]:
        """The :class:`~fr_dist.heads.binary.BinaryPlan` per-row state tensors :meth:`step_` takes after ``w`` and ``g``."""
        return ("momentum",) if self.momentum else ()

    def step_(self, w: torch.Tensor, g: torch.Tensor, buf: Optional[torch.Tensor] = None) -> None:
        """w [c, D] (fp32, updated in place), g [c, D] (consumed), buf [c, D] fp32 momentum or None."""
        if self.weight_decay:
            g.add_(w, alpha=self.weight_decay)
        step = g
        if self.momentum:
            buf.mul_(self.momentum).add_(g)
            step = g.add_(buf, alpha=self.momentum) if self.nesterov else buf
        w.add_(step, alpha=-self.lr)


@dataclass
class RowAdamW:
    """Per-row AdamW applied inside the fused pass: ``torch.optim.AdamW`` semantics (decoupled weight
    decay, bias correction; no amsgrad / maximize) on the rows a step uses.

    The step count of the bias correction is kept PER ROW (``BinaryPlan.row_step``, the head's
    ``weight_step`` buffer [n] int32): a row is stepped exactly as ``torch.optim.AdamW`` would step it
    on the sequence of steps that used it. Without sampling every row is used every step, so all
    counts equal the optimizer step count and the update is ``torch.optim.AdamW`` on the whole shard.
    A per-row count is a [n, ...] row buffer like the moments, so it is checkpointed and re-sharded
    with them (a scalar count could not be), and skipped steps (non-finite inputs) do not count.
    ``lr`` is set by the trainer from the head's LR schedule before every step.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def __post_init__(self):
        b1, b2 = (float(b) for b in self.betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"AdamW betas must be in [0, 1), got {self.betas}")
        if self.eps < 0 or self.weight_decay < 0 or self.lr < 0:
            raise ValueError(f"AdamW lr / eps / weight_decay must be >= 0, got {self}")
        self.betas = (b1, b2)

    def state_fields(self) -> tuple[str, ...]:
        """exp_avg (the head's ``weight_momentum``), exp_avg_sq and the per-row step count."""
        return ("momentum", "exp_avg_sq", "row_step")

    def step_(
        self,
        w: torch.Tensor,
        g: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        step: torch.Tensor,
    ) -> None:
        """w, exp_avg, exp_avg_sq [c, D] (compute dtype, updated in place), g [c, D] (consumed as the
        denominator's buffer), step [c] int32 per-row counts (incremented)."""
        b1, b2 = self.betas
        step.add_(1)
        s = step.to(torch.float64)  # [c]: coefficients in double, as torch's Python-float ones
        step_size = (self.lr / (1.0 - torch.pow(b1, s))).to(w.dtype).unsqueeze(1)  # [c, 1]
        bc2_sqrt = torch.sqrt(1.0 - torch.pow(b2, s)).to(w.dtype).unsqueeze(1)  # [c, 1]
        if self.weight_decay:
            w.mul_(1.0 - self.lr * self.weight_decay)
        exp_avg.lerp_(g, 1.0 - b1)
        exp_avg_sq.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        denom = torch.sqrt(exp_avg_sq, out=g).div_(bc2_sqrt).add_(self.eps)  # [c, D], in g's storage
        w.sub_(torch.div(exp_avg, denom, out=denom).mul_(step_size))  # w -= step_size * m / denom


ROW_OPTIMIZERS = {"sgd": RowOptimizer, "adamw": RowAdamW}  # train.optimizer -> its row optimizer


def build_row_optimizer(kind: str, **hparams) -> RowOptimizer | RowAdamW:
    """The row optimizer of ``train.optimizer`` ``kind`` with the ``hparams`` that kind takes (SGD: lr,
    momentum, nesterov, weight_decay; AdamW: lr, betas, eps, weight_decay); the others, and None values,
    are ignored."""
    cls = ROW_OPTIMIZERS.get(kind.lower())
    if cls is None:
        raise ValueError(f"no row optimizer for train.optimizer={kind!r}; known: {', '.join(ROW_OPTIMIZERS)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in hparams.items() if k in fields and v is not None})
