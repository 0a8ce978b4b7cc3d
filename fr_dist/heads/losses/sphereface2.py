"""SphereFace2 (Wen et al., 2022; OpenSphere's SphereFace2): binary one-vs-all, no softmax normaliser.

For a global batch of B embeddings with cosines c_ij = <x_i/|x_i|, w_j/|w_j|>::

    L = (lw / (r B)) sum_i [ lam softplus(-(r g_hat_iy + b)) + (1 - lam) sum_{j != y_i} softplus(r g_hat_ij + b) ]
    g(u) = 2 ((u + 1) / 2)^t - 1            the similarity adjustment (identity for t = 1)

family: binary (heads/binary.py's fused pass and its Triton kernel, heads/binary_head.py's head).
margin: g_hat, one class per variant (C / A / M below), chosen once by the registry from
``head.sphereface2.margin``; each gives its value AND its target derivative, and the attributes the fused
pass and the kernel read (``clip``, ``negative_shift``, ``cos_bounds``).
state: none. hyper-parameters (OpenSphere's names): lam (``alpha``), r, m, t, lw, margin (``magn_type``),
grad: detached (OpenSphere's ``g_detached``: d logit / d cos = r) | exact (through g and the margin).
"""

from __future__ import annotations

import inspect
import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from fr_dist.config_base import SECTION_CONFIG
from fr_dist.heads.binary import BinaryCoefficients, BinaryLoss
from fr_dist.heads.binary_head import BinaryHead
from fr_dist.heads.registry import margin_class, margin_names, register_loss, register_margin
from fr_dist.heads.sections import BinaryFamilyConfig

__all__ = [
    "GRAD_MODES",
    "SPHEREFACE2_MARGINS",
    "SphereFace2",
    "SphereFace2Config",
    "SphereFace2Head",
    "SphereFace2Margin",
    "SphereFace2Stages",
    "sphereface2_bias_init",
]

GRAD_MODES = ("detached", "exact")

# OpenSphere's clips for the angular (A / M) variants.
_COS_EPS = 1e-5
_THETA_MIN, _THETA_MAX = 1e-5, 3.14159


class SphereFace2Stages:
    """SphereFace2's own math (the binary family's is :class:`~fr_dist.heads.binary.BinaryStages`)."""

    @staticmethod
    def g(u, t: float):
        """Angular map g(u) = 2 ((u + 1) / 2)^t - 1."""
        return 2.0 * ((u + 1.0) / 2.0) ** t - 1.0

    @staticmethod
    def g_prime(u, t: float):
        """g'(u) = t ((u + 1) / 2)^(t - 1)."""
        return t * ((u + 1.0) / 2.0) ** (t - 1.0)

    @staticmethod
    def bias(num_classes: int, lam: float, a_i: float, a_y: float) -> float:
        """OpenSphere's closed-form initial bias for K = ``num_classes`` (the GLOBAL K), from the logits
        (without b) of a negative (a_i) and a target (a_y) at cos = 0:

        z = lam / ((1 - lam)(K - 1)); b = log(2z) - a_i - log(1 - z + sqrt((1 - z)^2 + 4 z exp(a_y - a_i))).
        K = 1 has no negatives and the formula is undefined: 0 is returned.
        """
        if num_classes < 2:
            return 0.0
        z = lam / ((1.0 - lam) * (num_classes - 1))
        return (
            math.log(2.0 * z)
            - a_i
            - math.log(1.0 - z + math.sqrt((1.0 - z) ** 2 + 4.0 * z * math.exp(a_y - a_i)))
        )


class SphereFace2Margin:
    """g_hat, the margin-shifted value that multiplies r in the logit (OpenSphere's conventions).

    ``value(cos, is_target)`` on any entries, ``slope(cos)`` = d value / d cos on TARGET entries (clamps
    pass gradient where ``lo <= x <= hi``, inclusive, as ``torch.clamp`` does). The fused pass evaluates
    negatives in closed form: value = g(clip(c)) + ``negative_shift``, clipped to ``cos_bounds`` where
    ``clip`` (the Triton kernel's CLIP constexpr).
    """

    clip = False
    cos_bounds = (-1.0 + _COS_EPS, 1.0 - _COS_EPS)

    def __init__(self, m: float, t: float):
        self.m, self.t = float(m), float(t)

    @property
    def negative_shift(self) -> float:
        return 0.0

    def value(self, cos: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def slope(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bias_logits(self, r: float) -> tuple[float, float]:
        """(a_i, a_y): r g_hat at cos = 0 of a negative and of a target (for the initial bias)."""
        raise NotImplementedError

    @classmethod
    def check_m(cls, m: float) -> None:
        """The config's rule for m (the head itself takes any m)."""
        if m < 0:
            raise ValueError(f"m={m!r} must be >= 0")


@register_margin("sphereface2", "C")
class AdditiveCosine(SphereFace2Margin):
    """C: g(c) - m on targets, g(c) + m elsewhere."""

    @property
    def negative_shift(self) -> float:
        return self.m

    def value(self, cos, is_target):
        m_t = torch.tensor(self.m, dtype=cos.dtype, device=cos.device)
        return SphereFace2Stages.g(cos, self.t) + torch.where(is_target, -m_t, m_t)

    def slope(self, cos):
        return SphereFace2Stages.g_prime(cos, self.t)

    def bias_logits(self, r):
        t, m = self.t, self.m
        return r * (2.0 * 0.5**t - 1.0 + m), r * (2.0 * 0.5**t - 1.0 - m)


class _Angular(SphereFace2Margin):
    """theta = arccos(clip(c)); theta moved on targets; clip theta; g(cos theta)."""

    clip = True
    d_moved = 1.0  # d moved / d theta

    def moved(self, theta):
        raise NotImplementedError

    def target_angle_at_zero(self) -> float:
        raise NotImplementedError

    def value(self, cos, is_target):
        lo, hi = self.cos_bounds
        theta = torch.acos(cos.clamp(lo, hi))
        theta = torch.where(is_target, self.moved(theta), theta).clamp(_THETA_MIN, _THETA_MAX)
        return SphereFace2Stages.g(torch.cos(theta), self.t)

    def slope(self, cos):
        lo, hi = self.cos_bounds
        c = cos.clamp(lo, hi)
        theta = torch.acos(c)
        moved = self.moved(theta)
        th = moved.clamp(_THETA_MIN, _THETA_MAX)
        slope = (
            SphereFace2Stages.g_prime(torch.cos(th), self.t)
            * torch.sin(th)
            * self.d_moved
            / torch.sqrt(1.0 - c * c)
        )
        keep = (cos >= lo) & (cos <= hi) & (moved >= _THETA_MIN) & (moved <= _THETA_MAX)
        return torch.where(keep, slope, torch.zeros_like(slope))

    def bias_logits(self, r):
        t = self.t
        theta_y = self.target_angle_at_zero()
        return r * (2.0 * 0.5**t - 1.0), r * (2.0 * ((math.cos(theta_y) + 1.0) / 2.0) ** t - 1.0)


@register_margin("sphereface2", "A")
class AdditiveAngular(_Angular):
    """A: theta + m on targets."""

    def moved(self, theta):
        return theta + self.m

    def target_angle_at_zero(self):
        return min(math.pi, math.pi / 2 + self.m)


@register_margin("sphereface2", "M")
class MultiplicativeAngular(_Angular):
    """M: theta * m on targets."""

    @property
    def d_moved(self) -> float:
        return self.m

    def moved(self, theta):
        return theta * self.m

    def target_angle_at_zero(self):
        return min(math.pi, self.m * math.pi / 2)

    @classmethod
    def check_m(cls, m: float) -> None:
        if m < 1:
            raise ValueError(f"m={m!r} must be >= 1 with margin=M (multiplicative)")


SPHEREFACE2_MARGINS = margin_names("sphereface2")


class SphereFace2(BinaryLoss):
    """The SphereFace2 loss with its hyper-parameters (see the module docstring)."""

    bias_metric = "sf2_bias"

    def __init__(
        self,
        lam: float = 0.7,
        r: float = 40.0,
        m: float = 0.4,
        t: float = 3.0,
        lw: float = 50.0,
        margin: str = "C",
        grad: str = "detached",
    ):
        margin_cls = margin_class("sphereface2", margin, "SphereFace2 margin")
        if grad not in GRAD_MODES:
            raise ValueError(f"unknown gradient mode {grad!r}; known: {GRAD_MODES}")
        if not 0.0 < lam < 1.0:
            raise ValueError(f"lam (lambda) must be in (0, 1), got {lam}")
        self.lam, self.r, self.m, self.t, self.lw = float(lam), float(r), float(m), float(t), float(lw)
        self.margin = margin_cls(m, t)
        self.grad = grad
        self.exact = grad == "exact"

    def __repr__(self) -> str:
        return (
            f"SphereFace2(lam={self.lam}, r={self.r}, m={self.m}, t={self.t}, lw={self.lw}, "
            f"margin={self.margin.name}, grad={self.grad})"
        )

    def initial_bias(self, num_classes: int) -> float:
        return SphereFace2Stages.bias(num_classes, self.lam, *self.margin.bias_logits(self.r))

    def coefficients(self, bias: float, batch_size: int) -> BinaryCoefficients:
        r, t = self.r, self.t
        S = self.lw / (r * batch_size)
        w_pos, w_neg = self.lam * S, (1.0 - self.lam) * S
        lo, hi = self.margin.cos_bounds
        return BinaryCoefficients(
            w_pos=w_pos,
            w_neg=w_neg,
            r=r,
            k_z=2.0 * r / 2.0**t,  # r g(c) + r shift + b = k_z (c + 1)^t + z0
            t=t,
            z0=r * (self.margin.negative_shift - 1.0) + bias,
            alpha=w_neg
            * r
            * (t / 2.0 ** (t - 1.0) if self.exact else 1.0),  # dL/dcos = alpha * Q (* v^(t-1))
            clip=self.margin.clip,
            lo_u=lo + 1.0,
            hi_u=hi + 1.0,
            exact=self.exact,
        )

    def target_logit(self, cos_t: torch.Tensor, bias) -> torch.Tensor:
        is_t = torch.ones_like(cos_t, dtype=torch.bool)
        return self.r * self.margin.value(cos_t, is_t) + bias

    def target_slope(self, cos_t: torch.Tensor, bias=None):
        return self.margin.slope(cos_t) if self.exact else 1.0


def sphereface2_bias_init(
    num_classes: int, lam: float, r: float, m: float, t: float, margin: str = "C"
) -> float:
    """OpenSphere's closed-form initial bias for K = ``num_classes`` (the GLOBAL K); see
    :meth:`SphereFace2Stages.bias`."""
    margin_obj = margin_class("sphereface2", margin, "SphereFace2 margin")(m, t)
    return SphereFace2Stages.bias(num_classes, lam, *margin_obj.bias_logits(r))


@register_loss("sphereface2")
class SphereFace2Head(BinaryHead):
    """Model-parallel SphereFace2 classifier (the fr_dist product): :class:`SphereFace2` on the binary
    family's head (``head.name=sphereface2``; every keyword is a ``head.sphereface2.*`` key)."""

    loss_cls = SphereFace2


# ----------------------------------------------------------------------------- config section

_SF2 = {p.name: p.default for p in inspect.signature(SphereFace2Head).parameters.values()}


@pydantic_dataclass(config=SECTION_CONFIG)
class SphereFace2Config(BinaryFamilyConfig):
    """``head.sphereface2``: the keyword arguments of :class:`SphereFace2Head` (defaults: its own, except the
    lean update of every binary loss's section, :class:`~fr_dist.heads.sections.BinaryFamilyConfig`)."""

    lam: float = Field(_SF2["lam"], gt=0, lt=1)
    """lambda in (0, 1): weight of the positive term vs the negatives (OpenSphere's lamb)."""
    r: float = Field(_SF2["r"], gt=0)
    """Scale r of the logits (> 0)."""
    m: float = _SF2["m"]
    """Margin m (a cosine for C, an angle in radians for A, a multiplier for M)."""
    t: float = Field(_SF2["t"], gt=0)
    """Exponent t of the similarity adjustment g(z) = 2((z+1)/2)^t - 1 (> 0; 1 = off)."""
    lw: float = Field(_SF2["lw"], gt=0)
    """Loss weight (OpenSphere's lw), multiplies the loss (> 0)."""
    margin: Literal[SPHEREFACE2_MARGINS] = _SF2["margin"]
    """Margin type: C (additive cosine) | A (additive angular) | M (multiplicative angular)."""
    grad: Literal[GRAD_MODES] = _SF2["grad"]
    """detached (OpenSphere: d logit / d cos = r) | exact (gradient through g)."""

    @model_validator(mode="after")
    def _check_combinations(self):
        margin_class("sphereface2", self.margin).check_m(self.m)  # M: >= 1, else >= 0
        return self


SphereFace2Head.Config = SphereFace2Config  # the head.sphereface2 section (torchtitan-style Component.Config)
