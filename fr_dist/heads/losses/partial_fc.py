"""The insightface margin softmax (arcface_torch's CombinedMarginLoss) on the Partial-FC path: ArcFace,
CosFace and their combination, the baseline SphereFace2 is compared with.

    logit_iy = s * margin(cos_iy),  logit_ij = s * cos_ij (j != y_i);  L = mean_i CE(logits_i, y_i)

family: softmax (heads/softmax.py's :class:`~fr_dist.heads.softmax.SoftmaxHead`). margin: one class per
variant, chosen once by the registry from ``head.partial_fc.margin``:

    arcface:  cos(theta + m2) on the target (m1, m3 unused); no easy-margin fallback
    cosface:  cos - m3 on the target (m1, m2 unused)
    combined: cos(m1 theta + m2) - m3 on the target

state: none. hyper-parameters (insightface's names): s, m1, m2, m3, margin, grad: straight_through
(insightface: d logit / d cos = s on every entry) | exact (through the margin; CosFace is exact either way).
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from fr_dist.config_base import SECTION_CONFIG
from fr_dist.heads.registry import margin_class, margin_names, register_loss, register_margin
from fr_dist.heads.sections import SoftmaxFamilyConfig
from fr_dist.heads.softmax import SOFTMAX_GRAD_MODES, SoftmaxHead, SoftmaxLoss

__all__ = ["SOFTMAX_MARGINS", "MarginSoftmax", "PartialFCConfig", "PartialFCHead", "SoftmaxMargin"]


class SoftmaxMargin:
    """The margin-modified target cosine (before the scale s), value and derivative together.

    ``value(cos, is_target, exact)`` on any entries (non-targets unchanged); with ``exact`` the arccos
    argument is clipped to (-1, 1) by 1e-7 so the derivative sin(m1 theta + m2) m1 / sin(theta) stays
    finite. ``nonlinear``: its derivative is not 1 (straight-through differs from exact).
    """

    nonlinear = True

    def __init__(self, m1: float, m2: float, m3: float):
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)

    def value(self, cos: torch.Tensor, is_target: torch.Tensor, exact: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def target(self, cos_t: torch.Tensor, exact: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target cosines [T] -> (value [T], d value / d cos [T], or None where straight-through / linear)."""
        on = torch.ones_like(cos_t, dtype=torch.bool)  # [T]: every entry is a target
        if exact and self.nonlinear:
            with torch.enable_grad():
                c = cos_t.detach().requires_grad_(True)
                v = self.value(c, on, exact=True)
                (dv,) = torch.autograd.grad(v.sum(), c)
            return v.detach(), dv
        return self.value(cos_t, on, exact=False), None


class _AngularFormula(SoftmaxMargin):
    """cos(m1 theta + m2) - m3 on the target."""

    def value(self, cos, is_target, exact=False):
        c = cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7) if exact else cos
        theta = torch.acos(c)
        return torch.where(is_target, torch.cos(self.m1 * theta + self.m2) - self.m3, cos)


@register_margin("partial_fc", "arcface")
class ArcFace(_AngularFormula):
    """cos(theta + m2): the combined formula with m1 = 1, m3 = 0."""

    def __init__(self, m1: float, m2: float, m3: float):
        super().__init__(1.0, m2, 0.0)


@register_margin("partial_fc", "cosface")
class CosFace(SoftmaxMargin):
    """cos - m3 (linear: exact either way)."""

    nonlinear = False

    def value(self, cos, is_target, exact=False):
        return torch.where(is_target, cos - self.m3, cos)


@register_margin("partial_fc", "combined")
class CombinedMargin(_AngularFormula):
    """cos(m1 theta + m2) - m3."""


SOFTMAX_MARGINS = margin_names("partial_fc")


class MarginSoftmax(SoftmaxLoss):
    """The insightface margin softmax with its hyper-parameters (see the module docstring)."""

    def __init__(
        self,
        margin: str = "arcface",
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        grad: str = "straight_through",
    ):
        margin_cls = margin_class("partial_fc", margin, "margin")
        if grad not in SOFTMAX_GRAD_MODES:
            raise ValueError(f"unknown gradient mode {grad!r}; known: {SOFTMAX_GRAD_MODES}")
        if s <= 0:
            raise ValueError(f"scale s must be > 0, got {s}")
        self.s = float(s)
        self.margin = margin_cls(m1, m2, m3)
        self.grad = grad
        self.exact = grad == "exact"
        self.target_has_slope = self.exact and self.margin.nonlinear

    def __repr__(self) -> str:
        mg = self.margin
        return f"MarginSoftmax(margin={mg.name}, s={self.s}, m=({mg.m1}, {mg.m2}, {mg.m3}), grad={self.grad})"

    def target(self, cos_t, rows):
        return self.margin.target(cos_t, self.exact)


@register_loss("partial_fc")
class PartialFCHead(SoftmaxHead):
    """Model-parallel margin-softmax classifier with Partial-FC negative sampling: :class:`MarginSoftmax`
    on the softmax family's head (``head.name=partial_fc``; every keyword is a ``head.partial_fc.*`` key)."""

    loss_cls = MarginSoftmax


# ----------------------------------------------------------------------------- config section

_PFC = {p.name: p.default for p in inspect.signature(PartialFCHead).parameters.values()}


@pydantic_dataclass(config=SECTION_CONFIG)
class PartialFCConfig(SoftmaxFamilyConfig):
    """``head.partial_fc``: the keyword arguments of :class:`PartialFCHead` (defaults: its own)."""

    margin: Literal[SOFTMAX_MARGINS] = _PFC["margin"]
    """arcface (cos(theta + m2)) | cosface (cos - m3) | combined (cos(m1 theta + m2) - m3)."""
    s: float = Field(_PFC["s"], gt=0)
    """Logit scale s (> 0)."""
    m1: float = Field(_PFC["m1"], ge=1)
    """Multiplicative angular margin (combined only; 1 = none)."""
    m2: float = Field(_PFC["m2"], ge=0)
    """Additive angular margin in radians (arcface, combined)."""
    m3: float = Field(_PFC["m3"], ge=0)
    """Additive cosine margin (cosface, combined); insightface's CosFace uses 0.4."""
    grad: Literal[SOFTMAX_GRAD_MODES] = _PFC["grad"]
    """straight_through (insightface ArcFace) | exact (gradient through the margin)."""


PartialFCHead.Config = PartialFCConfig  # the head.partial_fc section (torchtitan-style Component.Config)
