"""SphereFace (A-Softmax; Liu et al., CVPR 2017) as OpenSphere trains it: ydwen/opensphere
``opensphere/module/head/sphereface.py`` ``SphereFace`` (with ``common.py``'s wrapping / fusing / scoring), the
multiplicative angular margin with SphereFace-R's detached margin (Liu et al., "SphereFace Revived", 2022).

For a global batch of N embeddings, with the rows re-projected onto the sphere before every forward::

    w_j     <- w_j / |w_j|                                 in place, no gradient (OpenSphere's w.data = ...)
    c_ij    = <x_i / |x_i|, w_j>                           differentiable
    theta   = acos(clamp(c, -1 + 1e-5, 1 - 1e-5))          no gradient (under no_grad in the official code)
    psi     = (-1)^k cos(m theta) - 2k,  k = floor(m theta / pi)          on the target (m theta_iy)
    logit_ij = s * (c_ij + d_ij),  d_ij = psi_ij - c_ij detached  (non-targets: psi = cos(theta) = clamp(c))
    L       = mean_i CE(logits_i, y_i)                     (F.cross_entropy: no floor on p_target)

So every logit's value is s * psi (targets) or s * clamp(c) (non-targets) and d logit / d c = s everywhere
(straight-through: ``target_has_slope = False``; the clamp changes the value only: ``cos_clip = 1e-5``,
``clip_detached``). ``project_rows``: the head re-projects its rows in place before each forward and
``weight.grad`` is dL/dW_used (no radial term), as OpenSphere's parameter after ``w.data = normalize(w)``.

family: softmax (heads/softmax.py), its 3 [N] all-reduces and nothing more. state: none.
hyper-parameters (official names and defaults: ``SphereFace(feat_dim, subj_num, s=30., m=1.7)``): s, m.
OpenSphere's MS1M recipe (config/train/ms1m_iresnet100_sphereface.yml) trains with s = 64, m = 1.7.
"""

from __future__ import annotations

import inspect
import math

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from fr_dist.config_base import SECTION_CONFIG
from fr_dist.heads.registry import register_loss
from fr_dist.heads.sections import SoftmaxFamilyConfig
from fr_dist.heads.softmax import SoftmaxHead, SoftmaxLoss

__all__ = ["SphereFace", "SphereFaceConfig", "SphereFaceHead", "SphereFaceMargin"]

COS_CLIP = 1e-5  # OpenSphere: acos(cos_theta.clamp(-1. + 1e-5, 1. - 1e-5)) under no_grad


class SphereFaceMargin:
    """psi(theta) = (-1)^k cos(m theta) - 2k, k = floor(m theta / pi): monotonically decreasing on [0, pi],
    psi(0) = 1, psi(pi) = (-1)^k cos(m pi) - 2k (k = floor(m)); its derivative is never used (detached)."""

    def __init__(self, m: float):
        self.m = float(m)

    def value(self, c: torch.Tensor) -> torch.Tensor:
        """psi on clipped cosines c (any shape), in OpenSphere's order of operations."""
        m_theta = torch.acos(c) * self.m
        k = (m_theta / math.pi).floor()
        sign = -2.0 * torch.remainder(k, 2) + 1.0  # (-1)^k
        return sign * torch.cos(m_theta) - 2.0 * k


class SphereFace(SoftmaxLoss):
    """OpenSphere's SphereFace with its hyper-parameters (see the module docstring)."""

    cos_clip = COS_CLIP
    clip_detached = True  # the official clamp sits inside no_grad: value only
    project_rows = True  # the official forward re-projects w in place (w.data = F.normalize(w.data))
    ce_floor = 0.0  # F.cross_entropy
    target_has_slope = False  # d_theta is detached: d logit / d cos = s on the target too

    def __init__(self, s: float = 30.0, m: float = 1.7):
        for name, v in (("s", s), ("m", m)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise ValueError(f"SphereFace {name}={v!r} must be a finite number")
        if s <= 0:
            raise ValueError(f"SphereFace scale s={s!r} must be > 0")
        if m < 1:
            raise ValueError(f"SphereFace multiplicative margin m={m!r} must be >= 1 (1 = no margin)")
        self.s, self.m = float(s), float(m)
        self.margin = SphereFaceMargin(self.m)

    def __repr__(self) -> str:
        return f"SphereFace(s={self.s}, m={self.m})"

    def target(self, cos_t, rows):
        return self.margin.value(cos_t), None


@register_loss("sphereface")
class SphereFaceHead(SoftmaxHead):
    """Model-parallel SphereFace (A-Softmax) classifier: :class:`SphereFace` on the softmax family's head
    (``head.name=sphereface``; every keyword is a ``head.sphereface.*`` key). Its rows are kept on the unit
    sphere by the head itself (re-projected in place before every forward)."""

    loss_cls = SphereFace


# ----------------------------------------------------------------------------- config section

_SF = {p.name: p.default for p in inspect.signature(SphereFaceHead).parameters.values()}


@pydantic_dataclass(config=SECTION_CONFIG)
class SphereFaceConfig(SoftmaxFamilyConfig):
    """``head.sphereface``: the keyword arguments of :class:`SphereFaceHead` (defaults: its own)."""

    s: float = Field(_SF["s"], gt=0)
    """Logit scale s (> 0; OpenSphere's SphereFace default 30, its MS1M recipe 64)."""
    m: float = Field(_SF["m"], ge=1)
    """Multiplicative angular margin m (>= 1; OpenSphere 1.7): psi = (-1)^k cos(m theta) - 2k on the target."""


SphereFaceHead.Config = SphereFaceConfig  # the head.sphereface section
