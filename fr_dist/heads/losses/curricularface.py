"""CurricularFace (Huang et al., CVPR 2020; HuangYG123/CurricularFace ``head/metrics.py`` ``CurricularFace``) on
the Partial-FC path: an ArcFace target with a fallback, and hard negatives modulated by an EMA t.

For a global batch of N embeddings with clipped cosines c_ij = clamp(<x_i/|x_i|, w_j/|w_j|>, -1, 1)::

    c_m,i   = c_iy cos m - sqrt(1 - c_iy^2) sin m                       cos(theta_y + m), differentiable
    target  = c_m,i where c_iy > cos(pi - m), else c_iy - sin(pi - m) m
    t       <- 0.01 mean_i c_iy + 0.99 t                                 detached, BEFORE use, every step
    hard    = c_ij > c_m,i  (j != y_i; a boolean mask, no gradient through the threshold)
    logit_ij = s * (c_ij (t + c_ij) where hard, else c_ij)   (d / d c: s (t + 2 c_ij) where hard)
    L       = mean_i CE(logits_i, y_i)

The official train.py uses ``LOSS_NAME = 'Softmax'`` (config.py), i.e. ``nn.CrossEntropyLoss`` on the head's
output (its LOSS_DICT holds nothing else): fr_dist uses cross-entropy too, no focal loss.

family: softmax (heads/softmax.py). Sharded, the target cosine of row i lives on one rank while every rank
needs row i's threshold c_m,i before its max: ONE all-reduce (sum) of the [N] target cosines (0 where the
target is elsewhere), named ``curricular_target`` (``SoftmaxLoss.all_targets``), from which every rank
computes the thresholds and t identically (t stays replicated: a state buffer, checkpointed and re-sharded by
the head); the hard-negative modulation is the pass's negatives stage (``negatives_stage``: value and
d value / d cos), run in the dense forward and in the chunked forward and backward (the backward recomputes
the mask from the thresholds kept by the step's loss).

Differences from the official code, on purpose: the official module updates t on every forward (eval mode
too) from its own GPU's batch (DDP broadcasts rank 0's buffers); fr_dist updates t while training only, from
the global batch. The target's derivative cos m + c sin m / sqrt(1 - c^2) floors the square root at 1e-12
(the official one is infinite at c = +-1).

state: t (initial 0, shape [1] as the official buffer). hyper-parameters (official names): m, s.
"""

from __future__ import annotations

import copy
import inspect
import math

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from fr_dist.config_base import SECTION_CONFIG
from fr_dist.heads.registry import register_loss
from fr_dist.heads.sections import SoftmaxFamilyConfig
from fr_dist.heads.softmax import SoftmaxHead, SoftmaxLoss

__all__ = ["CurricularFace", "CurricularFaceConfig", "CurricularFaceHead", "CurricularMargin"]

T_MOMENTUM = 0.01  # the official EMA rate: t = mean * 0.01 + (1 - 0.01) * t

# floor of sqrt(1 - c^2) in the target's derivative only
_SIN_FLOOR = 1e-12


class CurricularMargin:
    """The target margin: cos(theta + m) where theta + m < pi (c > cos(pi - m)), else c - sin(pi - m) m;
    ``value`` also returns c_m = cos(theta + m) on every entry (the hard-negative threshold)."""

    def __init__(self, m: float):
        self.m = float(m)
        self.cos_m, self.sin_m = math.cos(self.m), math.sin(self.m)
        self.threshold = math.cos(math.pi - self.m)
        self.mm = math.sin(math.pi - self.m) * self.m

    def cos_theta_m(self, c: torch.Tensor) -> torch.Tensor:
        """cos(theta + m) = c cos m - sqrt(1 - c^2) sin m on clipped cosines c (any shape)."""
        return c * self.cos_m - torch.sqrt(1.0 - torch.pow(c, 2)) * self.sin_m

    def value(self, c: torch.Tensor) -> torch.Tensor:
        """The final target logit (before s) on target cosines c [T]."""
        return torch.where(c > self.threshold, self.cos_theta_m(c), c - self.mm)

    def slope(self, c: torch.Tensor) -> torch.Tensor:
        """d value / d c [T]: cos m + c sin m / sqrt(1 - c^2) on the margin branch, 1 on the fallback."""
        sin = torch.sqrt((1.0 - c * c).clamp_min(0.0)).clamp_min(_SIN_FLOOR)
        return torch.where(c > self.threshold, self.cos_m + c * self.sin_m / sin, torch.ones_like(c))


class CurricularFace(SoftmaxLoss):
    """CurricularFace with its hyper-parameters (see the module docstring)."""

    target_has_slope = True
    ce_floor = 0.0  # the official F.cross_entropy, no floor on p_target
    all_targets = "curricular_target"
    extra_collectives = ("curricular_target",)

    def __init__(self, m: float = 0.5, s: float = 64.0):
        for name, v in (("m", m), ("s", s)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise ValueError(f"CurricularFace {name}={v!r} must be a finite number")
        if not 0.0 <= m < math.pi:
            raise ValueError(f"CurricularFace margin m={m!r} must be in [0, pi) (radians)")
        if s <= 0:
            raise ValueError(f"CurricularFace scale s={s!r} must be > 0")
        self.m, self.s = float(m), float(s)
        self.margin = CurricularMargin(self.m)
        self._t_buf: torch.Tensor | None = None  # the head's state buffer (set by for_batch)
        self._training = False
        self.t: torch.Tensor | None = None  # t used in this step ([1], detached)
        self.thresholds: torch.Tensor | None = None  # [N] cos(theta_y + m) of every row

    def __repr__(self) -> str:
        return f"CurricularFace(m={self.m}, s={self.s})"

    def state(self) -> dict[str, torch.Tensor]:
        return {"t": torch.zeros(1)}  # the official register_buffer('t', torch.zeros(1))

    def for_batch(self, x_all, state, training):
        step = copy.copy(
            self
        )  # this step's thresholds and t stay with the step (the chunked backward reads them)
        step._t_buf, step._training = state["t"], training
        return step

    def target(self, cos_t, rows):
        return self.margin.value(cos_t), self.margin.slope(cos_t)

    def with_all_targets(self, cos_y):
        t_buf = self._t_buf
        if t_buf is None:
            raise RuntimeError("CurricularFace: for_batch() must give the step its state buffer t first")
        with torch.no_grad():
            self.thresholds = self.margin.cos_theta_m(cos_y)  # [N]
            if self._training:  # official order: updated BEFORE use
                t_new = cos_y.mean() * T_MOMENTUM + (1 - T_MOMENTUM) * t_buf.to(cos_y.dtype)  # [1]
                t_buf.copy_(t_new)
            self.t = t_buf.detach().to(cos_y.dtype).clone()  # [1]

    def negatives(self, cos, grads):
        hard = cos > self.thresholds.unsqueeze(1)  # [N, c] vs [N, 1]: a mask, no gradient through it
        t = self.t.to(cos.dtype)  # [1]
        value = torch.where(hard, cos * (t + cos), cos)  # [N, c]
        slope = torch.where(hard, 2.0 * cos + t, torch.ones_like(cos)) if grads else None  # [N, c]
        return value, slope


@register_loss("curricularface")
class CurricularFaceHead(SoftmaxHead):
    """Model-parallel CurricularFace classifier: :class:`CurricularFace` on the softmax family's head
    (``head.name=curricularface``; every keyword is a ``head.curricularface.*`` key)."""

    loss_cls = CurricularFace

    def log_scalars(self) -> dict[str, float]:
        return {"curricular_t": float(self.t.detach().reshape(-1)[0])}


# ----------------------------------------------------------------------------- config section

_CF = {p.name: p.default for p in inspect.signature(CurricularFaceHead).parameters.values()}


@pydantic_dataclass(config=SECTION_CONFIG)
class CurricularFaceConfig(SoftmaxFamilyConfig):
    """``head.curricularface``: the keyword arguments of :class:`CurricularFaceHead` (defaults: its own)."""

    m: float = Field(_CF["m"], ge=0, lt=math.pi)
    """Additive angular margin in radians, in [0, pi) (official 0.5)."""
    s: float = Field(_CF["s"], gt=0)
    """Logit scale s (> 0; official 64)."""


CurricularFaceHead.Config = CurricularFaceConfig  # the head.curricularface section
