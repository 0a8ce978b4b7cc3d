"""MagFace (Meng et al., CVPR 2021; IrvingMeng/MagFace ``models/magface.py`` ``MagLinear`` + ``MagLoss``, the
loop of ``run/trainer.py``) on the Partial-FC path: an ArcFace margin that grows with the embedding's norm,
plus a regulariser on the norm.

For a global batch of N raw embeddings x_i with clipped cosines c_ij = clamp(<x_i/|x_i|, w_j/|w_j|>, -1, 1)::

    a_i    = clamp(|x_i|, l_a, u_a)                       differentiable (gradient inside [l_a, u_a], inclusive)
    m(a)   = (u_margin - l_margin) / (u_a - l_a) (a - l_a) + l_margin        (SoftmaxBuilder._margin)
    target = c cos m - sqrt(1 - c^2) sin m  where c > 0 (easy_margin, MagLinear's default), else c;
             easy_margin=False: that where c > cos(pi - m), else c - sin(pi - m) m
    L_id   = mean_i CE(s * logits_i, y_i)                 (non-targets: s c_ij)
    L      = L_id + lambda_g mean_i g(a_i),  g(a) = a / u_a^2 + 1 / a         (trainer.py's loss)

The margin depends on a_i, so d target / d a_i flows into dL/dx_i through a_i = |x_i| besides the cosines:
the per-step loss (:meth:`MagFace.for_batch`) holds a = clamp(|x_all|) of the gathered raw embeddings as
``SoftmaxLoss.norms``, the fused pass takes it as one more autograd input and returns dL/da_i = dL/dlogit_iy
s d target / d a_i on the rows whose target is in this shard (the gather's reduce-scatter sums the ranks'
parts). The regulariser needs no collective: every rank holds x_all, so its value is the mean of g over all
N rows (identical everywhere) and its gradient is counted once, through this rank's own rows of x_all only:
lambda_g (mean_N g(a).detach() + (g_own - g_own.detach()).sum() / N).

family: softmax (heads/softmax.py); the family's 3 [N] all-reduces and nothing more. state: none.
hyper-parameters (official names; defaults: run/trainer.py's argparse and MagLinear's): s (``arc_scale``,
MagLinear's ``scale``), l_margin, u_margin, l_a, u_a, lambda_g, easy_margin. The official run/run.sh trains
MS1M with lambda_g = 35 (trainer.py's default 20 is below its own printed lower bound for convexity,
s k u_a^2 l_a^2 / (u_a^2 - l_a^2) = 22.6 at the defaults): the ms1mv3 recipe uses 35.

The derivative of sqrt(1 - c^2) floors it at 1e-12 (the official one is infinite at c = +-1).
"""

from __future__ import annotations

import copy
import inspect
import math

import torch
from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from fr_dist.config_base import SECTION_CONFIG
from fr_dist.heads.registry import register_loss
from fr_dist.heads.sections import SoftmaxFamilyConfig
from fr_dist.heads.softmax import SoftmaxHead, SoftmaxLoss

__all__ = ["MagFace", "MagFaceConfig", "MagFaceHead", "MagMargin"]

_SIN_FLOOR = 1e-12  # floor of sqrt(1 - c^2) in the derivative only


class MagMargin:
    """The norm-dependent target: value, d value / d c and d value / d a on target cosines c [T] and their
    margins m [T] (= m(a), :meth:`margin`)."""

    def __init__(self, l_margin: float, u_margin: float, l_a: float, u_a: float, easy_margin: bool):
        self.l_margin, self.u_margin, self.l_a, self.u_a = l_margin, u_margin, l_a, u_a
        self.easy_margin = easy_margin
        self.k = (u_margin - l_margin) / (u_a - l_a)  # d m / d a

    def margin(self, a: torch.Tensor) -> torch.Tensor:
        """m(a): SoftmaxBuilder._margin's formula on clamped norms."""
        return (self.u_margin - self.l_margin) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_margin

    def _on(self, c: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if self.easy_margin:
            return c > 0
        return c > torch.cos(math.pi - m)

    def value(self, c: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        sin = torch.sqrt(1.0 - torch.pow(c, 2))
        cos_theta_m = c * torch.cos(m) - sin * torch.sin(m)
        other = c if self.easy_margin else c - torch.sin(math.pi - m) * m
        return torch.where(self._on(c, m), cos_theta_m, other)

    def slopes(self, c: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d value / d c, d value / d a) [T] each."""
        sin = torch.sqrt((1.0 - c * c).clamp_min(0.0))
        cos_m, sin_m = torch.cos(m), torch.sin(m)
        on = self._on(c, m)
        d_c = torch.where(on, cos_m + c * sin_m / sin.clamp_min(_SIN_FLOOR), torch.ones_like(c))
        d_m_on = -(c * sin_m + sin * cos_m)  # d/dm [c cos m - sqrt(1 - c^2) sin m]
        if self.easy_margin:
            d_m_off = torch.zeros_like(c)
        else:  # d/dm [c - sin(pi - m) m] = cos(pi - m) m - sin(pi - m)
            d_m_off = torch.cos(math.pi - m) * m - torch.sin(math.pi - m)
        return d_c, torch.where(on, d_m_on, d_m_off) * self.k


class MagFace(SoftmaxLoss):
    """MagFace with its hyper-parameters (see the module docstring)."""

    target_has_slope = True
    ce_floor = 0.0  # the official F.cross_entropy, no floor on p_target

    def __init__(
        self,
        s: float = 64.0,
        l_margin: float = 0.45,
        u_margin: float = 0.8,
        l_a: float = 10.0,
        u_a: float = 110.0,
        lambda_g: float = 20.0,
        easy_margin: bool = True,
    ):
        values = dict(s=s, l_margin=l_margin, u_margin=u_margin, l_a=l_a, u_a=u_a, lambda_g=lambda_g)
        for name, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise ValueError(f"MagFace {name}={v!r} must be a finite number")
        if not isinstance(easy_margin, bool):
            raise ValueError(f"MagFace easy_margin={easy_margin!r} must be true or false")
        if s <= 0:
            raise ValueError(f"MagFace scale s={s!r} must be > 0")
        if not 0 < l_a < u_a:
            raise ValueError(f"MagFace norm bounds need 0 < l_a < u_a, got l_a={l_a!r}, u_a={u_a!r}")
        if not 0 <= l_margin <= u_margin < math.pi:
            raise ValueError(
                f"MagFace margins need 0 <= l_margin <= u_margin < pi, got l_margin={l_margin!r}, "
                f"u_margin={u_margin!r}"
            )
        if lambda_g < 0:
            raise ValueError(f"MagFace lambda_g={lambda_g!r} must be >= 0")
        self.s, self.l_margin, self.u_margin = float(s), float(l_margin), float(u_margin)
        self.l_a, self.u_a, self.lambda_g = float(l_a), float(u_a), float(lambda_g)
        self.easy_margin = easy_margin
        self.mag = MagMargin(self.l_margin, self.u_margin, self.l_a, self.u_a, easy_margin)
        self._a: torch.Tensor | None = None  # [N] detached clamped norms of this step

    def __repr__(self) -> str:
        return (
            f"MagFace(s={self.s}, l_margin={self.l_margin}, u_margin={self.u_margin}, l_a={self.l_a}, "
            f"u_a={self.u_a}, lambda_g={self.lambda_g}, easy_margin={self.easy_margin})"
        )

    def norms_of(self, x_all: torch.Tensor) -> torch.Tensor:
        """a = clamp(|x_i|, l_a, u_a) [N] of raw embeddings [N, D] (differentiable; MagLinear's x_norm)."""
        if x_all.dtype in (torch.float16, torch.bfloat16):
            x_all = x_all.float()
        return torch.linalg.vector_norm(x_all, dim=1).clamp(self.l_a, self.u_a)  # [N]

    def g(self, a: torch.Tensor) -> torch.Tensor:
        """The regulariser g(a) = a / u_a^2 + 1 / a (MagLoss.calc_loss_G, before its mean)."""
        return 1 / (self.u_a**2) * a + 1 / a

    def for_batch(self, x_all, state, training):
        step = copy.copy(self)
        step.norms = self.norms_of(x_all)  # [N], the pass's extra autograd input
        step._a = step.norms.detach()
        return step

    def _margins(self, rows, like):
        return self.mag.margin(self._a[rows].to(like.dtype))  # [T]

    def target(self, cos_t, rows):
        m = self._margins(rows, cos_t)
        return self.mag.value(cos_t, m), self.mag.slopes(cos_t, m)[0]

    def target_norm_slope(self, cos_t, rows):
        return self.mag.slopes(cos_t, self._margins(rows, cos_t))[1]

    def regulariser(self, own):
        if self.lambda_g == 0.0:
            return None
        g_all = self.g(self._a)  # [N], detached: the value, identical on every rank
        g_own = self.g(self.norms[own])  # [B] this rank's rows of x_all, differentiable
        N = self._a.shape[0]
        return self.lambda_g * (g_all.mean() + (g_own - g_own.detach()).sum() / N)


@register_loss("magface")
class MagFaceHead(SoftmaxHead):
    """Model-parallel MagFace classifier: :class:`MagFace` on the softmax family's head
    (``head.name=magface``; every keyword is a ``head.magface.*`` key). The returned loss is trainer.py's
    ``loss_id + lambda_g * loss_g``."""

    loss_cls = MagFace


# ----------------------------------------------------------------------------- config section

_MF = {p.name: p.default for p in inspect.signature(MagFaceHead).parameters.values()}


@pydantic_dataclass(config=SECTION_CONFIG)
class MagFaceConfig(SoftmaxFamilyConfig):
    """``head.magface``: the keyword arguments of :class:`MagFaceHead` (defaults: its own)."""

    s: float = Field(_MF["s"], gt=0)
    """Logit scale s (> 0; the official arc_scale / MagLinear scale, 64)."""
    l_margin: float = Field(_MF["l_margin"], ge=0, lt=math.pi)
    """Margin at the lower norm bound l_a, radians (official 0.45)."""
    u_margin: float = Field(_MF["u_margin"], ge=0, lt=math.pi)
    """Margin at the upper norm bound u_a, radians (>= l_margin; official 0.8)."""
    l_a: float = Field(_MF["l_a"], gt=0)
    """Lower bound of the feature norm a (norms are clamped to [l_a, u_a]; official 10)."""
    u_a: float = Field(_MF["u_a"], gt=0)
    """Upper bound of the feature norm a (> l_a; official 110)."""
    lambda_g: float = Field(_MF["lambda_g"], ge=0)
    """Weight of the norm regulariser g(a) = a / u_a^2 + 1 / a (trainer.py default 20; run.sh trains with 35)."""
    easy_margin: bool = _MF["easy_margin"]
    """true (MagLinear's default): no margin where cos <= 0; false: ArcFace's fallback c - sin(pi - m) m
    where cos <= cos(pi - m)."""

    @model_validator(mode="after")
    def _check_bounds(self):
        if not self.l_a < self.u_a:
            raise ValueError(f"head.magface.l_a={self.l_a} must be < head.magface.u_a={self.u_a}")
        if not self.l_margin <= self.u_margin:
            raise ValueError(
                f"head.magface.l_margin={self.l_margin} must be <= head.magface.u_margin={self.u_margin}"
            )
        return self


MagFaceHead.Config = MagFaceConfig  # the head.magface section
