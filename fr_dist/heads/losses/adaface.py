"""AdaFace (Kim et al., CVPR 2022; mk-minchul/AdaFace ``head.py`` ``AdaFace``, the loss of ``train_val.py``) on
the Partial-FC path: a margin that adapts to the image quality, the embedding norm as its proxy.

For a global batch of N raw embeddings x_i (the backbone's output before net.py's l2_norm) with cosines
c_ij = clamp(<x_i/|x_i|, w_j/|w_j|>, -1 + eps, 1 - eps), eps = 1e-3 (zero gradient outside)::

    a_i      = clip(|x_i|, 0.001, 100)                               DETACHED (safe_norms.clone().detach())
    mean     <- t_alpha mean_i a_i + (1 - t_alpha) mean               EMA, updated BEFORE use
    std      <- t_alpha std_i a_i + (1 - t_alpha) std                 (torch's unbiased std, over N)
    g_i      = clip(h (a_i - mean) / (std + eps), -1, 1)              the margin scaler
    theta_m  = clip(acos(c_iy) - m g_i, eps, pi - eps)                on the target
    target   = cos(theta_m) - (m + m g_i)
    logit_ij = s * target (j = y_i),  s * c_ij otherwise;  L = mean_i CE(logits_i, y_i)   (nn.CrossEntropyLoss)

The gradient goes through all of the target (exact, ``target_has_slope``): d target / d c = sin(theta_m) /
sin(theta) where acos(c) - m g lies inside [eps, pi - eps], 0 where the angle clip binds; g carries no
gradient (the norms are detached). The official code also passes every non-target cosine through acos, the
angle clip and cos: with the cosines clamped to +-(1 - 1e-3), acos(c) lies in [0.0447, pi - 0.0447], so the
angle clip at 1e-3 never binds and cos(acos(c)) = c in value and d/dc = sin(acos c) / sqrt(1 - c^2) = 1 in
gradient, up to rounding: fr_dist uses c itself (tests/unit/test_loss_adaface.py checks this).

Distributed: the statistics are taken over the GLOBAL batch (x_all, the gathered embeddings, is the same on
every rank: the buffers stay replicated without a collective, the norms travel with the gathered
embeddings); AdaFace's own DDP trainer computes them per GPU on the local batch (and keeps rank 0's buffers).
The EMA moves only while training (``head.train()``); in eval mode the stored statistics are used and kept.
The official head updates them on every forward, but AdaFace's validation never calls the head (it scores
embeddings only), so in its runs too they move only in training steps.

family: softmax (heads/softmax.py), its 3 [N] all-reduces and nothing more. state: batch_mean (initial 20),
batch_std (initial 100), shape [1] as the official buffers; the official module's third buffer ``t``
(zeros(1)) is never read or written by it, so fr_dist does not keep it. hyper-parameters (official names):
m, h, s, t_alpha; defaults: the official training recipe (scripts/run_ir*_ms1mv2.sh: m 0.4, h 0.333;
config.py: s 64, t_alpha 0.01). ``AdaFace.__init__``'s own t_alpha default (1.0: no EMA) is never used by
its trainer, which always passes config.py's 0.01.
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

__all__ = ["AdaFace", "AdaFaceConfig", "AdaFaceHead", "AdaFaceMargin"]

EPS = 1e-3  # the official self.eps: cosine clamp, angle clip, std floor
NORM_MIN, NORM_MAX = 0.001, 100.0  # torch.clip(norms, min=0.001, max=100)
INITIAL_MEAN, INITIAL_STD = (
    20.0,
    100.0,
)  # register_buffer('batch_mean', ones(1) * 20), ('batch_std', ones(1) * 100)


class AdaFaceMargin:
    """The target: cos(clip(acos(c) - m g, eps, pi - eps)) - (m + m g) on target cosines c [T] with margin
    scalers g [T], and its derivative in c (g is detached)."""

    def __init__(self, m: float):
        self.m = float(m)

    def target(self, c: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(value [T], d value / d c [T]) on clamped cosines c [T] (|c| <= 1 - eps) and scalers g [T]."""
        theta = torch.acos(c)
        angle = theta + self.m * g * -1.0  # the official g_angular = m * margin_scaler * -1
        theta_m = angle.clamp(EPS, math.pi - EPS)
        value = torch.cos(theta_m) - (self.m + self.m * g)
        inside = (angle >= EPS) & (angle <= math.pi - EPS)  # torch.clip passes the gradient on the bounds
        sin = torch.sqrt((1.0 - c * c).clamp_min(EPS))  # sin(theta) >= 0.0447 on the clamped cosines
        slope = torch.where(inside, torch.sin(theta_m) / sin, torch.zeros_like(c))
        return value, slope


class AdaFace(SoftmaxLoss):
    """AdaFace with its hyper-parameters (see the module docstring)."""

    cos_clip = EPS  # cosine.clamp(-1 + eps, 1 - eps), zero gradient outside
    ce_floor = 0.0  # nn.CrossEntropyLoss: no floor on p_target
    target_has_slope = True  # exact: the gradient goes through acos, the angle clip and cos
    norm_aware = True  # the margin reads the norms of the gathered raw embeddings (detached)

    def __init__(self, m: float = 0.4, h: float = 0.333, s: float = 64.0, t_alpha: float = 0.01):
        for name, v in (("m", m), ("h", h), ("s", s), ("t_alpha", t_alpha)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise ValueError(f"AdaFace {name}={v!r} must be a finite number")
        if not 0.0 <= m < math.pi:
            raise ValueError(f"AdaFace margin m={m!r} must be in [0, pi) (radians)")
        if h < 0:
            raise ValueError(f"AdaFace h={h!r} (the margin scaler's concentration) must be >= 0")
        if s <= 0:
            raise ValueError(f"AdaFace scale s={s!r} must be > 0")
        if not 0.0 <= t_alpha <= 1.0:
            raise ValueError(f"AdaFace t_alpha={t_alpha!r} (the statistics' EMA rate) must be in [0, 1]")
        self.m, self.h, self.s, self.t_alpha = float(m), float(h), float(s), float(t_alpha)
        self.margin = AdaFaceMargin(self.m)
        self.margin_scaler: torch.Tensor | None = None  # [N] g_i of this step (set by for_batch)

    def __repr__(self) -> str:
        return f"AdaFace(m={self.m}, h={self.h}, s={self.s}, t_alpha={self.t_alpha})"

    def state(self) -> dict[str, torch.Tensor]:
        return {"batch_mean": torch.ones(1) * INITIAL_MEAN, "batch_std": torch.ones(1) * INITIAL_STD}

    def for_batch(self, x_all, state, training):
        """x_all [N, D] the gathered raw embeddings: their clipped norms, the EMA (while training) and the
        margin scalers [N] of this step, in a copy of the loss (the buffers are updated in place)."""
        step = copy.copy(self)
        mean_buf, std_buf = state["batch_mean"], state["batch_std"]
        math_dtype = torch.float64 if x_all.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            norms = torch.linalg.vector_norm(x_all.detach().to(math_dtype), dim=1)  # [N]
            norms = norms.clamp(NORM_MIN, NORM_MAX)
            if training:  # official order: updated BEFORE use
                if norms.shape[0] < 2:
                    raise ValueError(
                        "AdaFace needs a global batch of >= 2 embeddings in training (the unbiased std of "
                        f"their norms), got {norms.shape[0]}"
                    )
                a = self.t_alpha
                mean_buf.copy_(norms.mean().to(mean_buf.dtype) * a + (1 - a) * mean_buf)
                std_buf.copy_(norms.std().to(std_buf.dtype) * a + (1 - a) * std_buf)
            mean, std = mean_buf.to(math_dtype), std_buf.to(math_dtype)  # [1]
            g = (norms - mean) / (std + EPS)  # [N]
            step.margin_scaler = (g * self.h).clamp(-1.0, 1.0)  # [N]
        return step

    def target(self, cos_t, rows):
        if self.margin_scaler is None:
            raise RuntimeError("AdaFace: for_batch() must compute the step's margin scalers first")
        return self.margin.target(cos_t, self.margin_scaler[rows].to(cos_t.dtype))  # [T]


@register_loss("adaface")
class AdaFaceHead(SoftmaxHead):
    """Model-parallel AdaFace classifier: :class:`AdaFace` on the softmax family's head (``head.name=adaface``;
    every keyword is a ``head.adaface.*`` key). Give it the RAW embeddings: it computes their norms itself."""

    loss_cls = AdaFace

    def log_scalars(self) -> dict[str, float]:
        return {
            "adaface_batch_mean": float(self.batch_mean.detach().reshape(-1)[0]),
            "adaface_batch_std": float(self.batch_std.detach().reshape(-1)[0]),
        }


# ----------------------------------------------------------------------------- config section

_AF = {p.name: p.default for p in inspect.signature(AdaFaceHead).parameters.values()}


@pydantic_dataclass(config=SECTION_CONFIG)
class AdaFaceConfig(SoftmaxFamilyConfig):
    """``head.adaface``: the keyword arguments of :class:`AdaFaceHead` (defaults: its own)."""

    m: float = Field(_AF["m"], ge=0, lt=math.pi)
    """Margin m in radians, in [0, pi) (official 0.4): angular part -m g, additive part m + m g."""
    h: float = Field(_AF["h"], ge=0)
    """Concentration h of the margin scaler g = clip(h (|x| - mean) / (std + eps), -1, 1) (official 0.333)."""
    s: float = Field(_AF["s"], gt=0)
    """Logit scale s (> 0; official 64)."""
    t_alpha: float = Field(_AF["t_alpha"], ge=0, le=1)
    """EMA rate of the norm statistics over the global batch, in [0, 1] (official training 0.01; 1 = the
    batch's own statistics)."""


AdaFaceHead.Config = AdaFaceConfig  # the head.adaface section
